"""The HTTP sessions the etcd store gives etcd3gw's clients and its watches (requests
sessions), and taking their connections down.

Imported only when an etcd URL is used: ``requests`` comes with the ``etcd`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
import zlib
from typing import Any

import requests

from fencelock import _platform


def base_url(host: str, port: int, tls: bool = False) -> str:
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"


class TLS:
    """What an HTTPS session to etcd uses: the CA file (None: the system's CAs), the
    client certificate and key (or None), and the `ssl.SSLContext` made from them."""

    def __init__(self, ca: str | None, cert: str | None, key: str | None) -> None:
        self.ca, self.cert, self.key = ca, cert, key
        self.context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            self.context.load_cert_chain(cert, key)

    @property
    def requests_cert(self) -> str | tuple[str, str] | None:
        """The client certificate as requests takes it."""
        if self.cert is None:
            return None
        return self.cert if self.key is None else (self.cert, self.key)


def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a TLS handshake: asked of an endpoint that closed a
    plain HTTP request without a word, as etcd's TLS-only client port does. Its
    certificate is not checked: the handshake completing, or the server's TLS alert
    (a client certificate wanted, say), is the answer. Not TLS: a refusal, a reset, a
    close, or a reply in another protocol (a wrong version number). ``timeout`` bounds
    the connect and each read."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            return handshakes(raw, host)
    except OSError:
        return False


def handshakes(raw: socket.socket, host: str) -> bool:
    """Whether the far end of the connected socket ``raw`` answers a TLS client
    handshake (as `speaks_tls` tells it). The handshake runs in memory and ``raw``
    carries its bytes, so the socket stays the caller's to close whatever happens: an
    `ssl.SSLSocket` made from a connection the far end has already reset raises with
    the descriptor taken from ``raw``, and leaves it open. OSError when ``raw`` fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    while True:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError as e:
            return "ALERT" in (e.reason or "")
        raw.sendall(outgoing.read())
        if done:
            return True
        received = raw.recv(16384)
        if not received:
            return False
        incoming.write(received)


def serves_plain_etcd(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` serves etcd in plain HTTP: asked of an endpoint that closed
    a TLS handshake without a word, as etcd's plain client port does (and so does a
    proxy whose etcd is down, which is no such port: it does not answer this either)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/version")
        answer = connection.getresponse()
        return answer.status == 200 and b'"etcdserver"' in answer.read(4096)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class Session(requests.Session):
    """A requests session for one etcd endpoint, with the proxy settings read from the
    environment once, when it is made.

    With ``trust_env`` on, requests looks up the proxy variables and ~/.netrc at every
    request, about 0.3 ms of a transaction's 1-2 ms on loopback. The proxy in force stays
    the one the environment names (a netrc login does not apply: etcd's gateway takes
    none).

    A plain JSON POST to the endpoint with no proxy in between (all the store and
    etcd3gw's client send, but for a watch's stream), and etcd3gw's GET of the server's
    version, go on one keep-alive ``http.client`` connection of the session's own, and
    the answer comes back as an `Answer`. requests would merge the session's cookies,
    hooks, auth and settings into each request, urllib3 would add its pool's
    bookkeeping and send the headers and the body in two writes, and requests would
    build a `requests.Response` (a cookie jar, redirect and cookie handling) from each
    answer: none of it applies to etcd's gateway, and all of it runs cold after a pause
    (a holder that held its session through a model call), when each step costs
    several times what it costs in a loop.
    After 30 ms idle a transaction took 2.45 ms through requests and 2.05 ms this way;
    a hand-off sends two on its critical path (fencelock-bench).

    What urllib3's pool does for the store is kept: a connection that etcd closed while
    it was idle is found before it is used again (as urllib3 does, by polling it) and
    replaced; a connection that fails midway is closed, never reused; the timeout bounds
    the connect and each read; a compressed answer is decompressed; the errors reach
    the caller as requests' exceptions, as its adapter raises them, which etcd3gw maps
    to its own; and a session dropped unclosed closes its connection when collected.
    """

    def __init__(self, url: str, tls: TLS | None = None) -> None:
        super().__init__()
        self.proxies.update(requests.utils.get_environ_proxies(url))
        self.trust_env = False
        parsed = urllib.parse.urlsplit(url)
        self._origin = f"{parsed.scheme}://{parsed.netloc}"
        self._host, self._port = parsed.hostname or "", parsed.port or 80
        self.tls = tls
        self._context = None
        if parsed.scheme == "https":
            # requests (a proxy, a watch's stream) checks etcd's certificate as the
            # session's own connection does, and shows the same client certificate.
            self._context = (tls or TLS(None, None, None)).context
            self.verify = True if tls is None or tls.ca is None else tls.ca
            self.cert = None if tls is None else tls.requests_cert
        # Proxy variables that name no proxy for this URL (NO_PROXY alone, HTTPS_PROXY
        # for an http URL) leave it direct.
        self._direct = parsed.scheme in ("http", "https") and \
            requests.utils.select_proxy(url, self.proxies) is None
        # etcd's gateway answers uncompressed; saying so keeps it that way.
        self._get_headers: dict[str, Any] = {**self.headers, "Accept-Encoding": "identity"}
        self._json_headers = {**self._get_headers, "Content-Type": "application/json"}
        self._conn: http.client.HTTPConnection | None = None
        self._timeout: float | None = None
        self._mu = threading.Lock()
        # A session dropped unclosed (a client of a thread that ended) closes its
        # connection when it is collected, or at exit, as urllib3's pools do.
        self._held: list[http.client.HTTPConnection] = []
        weakref.finalize(self, _close_all, self._held)

    def _own(self, url: str, kwargs: dict[str, Any]) -> bool:
        """Whether a request for ``url`` goes on the session's own connection: to its
        endpoint, with no proxy, and no option but a timeout in seconds (or None)."""
        timeout = kwargs.get("timeout")
        return self._direct and url.startswith(self._origin + "/") and \
            not kwargs.keys() - {"timeout"} and \
            (timeout is None or type(timeout) in (int, float))

    def post(self, url: str | bytes, data: Any = None, json: Any = None,
             **kwargs: Any) -> Any:
        url = url if isinstance(url, str) else url.decode()
        if data is not None or json is None or not self._own(url, kwargs):
            return super().post(url, data=data, json=json, **kwargs)
        body = _dumps(json)
        headers = self._json_headers.copy()
        headers["Content-Length"] = str(len(body))
        with self._mu:
            return self._send("POST", url[len(self._origin):], body, headers,
                              kwargs.get("timeout"))

    def get(self, url: str | bytes, params: Any = None, **kwargs: Any) -> Any:
        """A GET with no parameters (etcd3gw's look at the server's version) goes on
        the same connection as the POSTs: a second one per client would stay open
        idle."""
        url = url if isinstance(url, str) else url.decode()
        if params is not None or not self._own(url, kwargs):
            return super().get(url, params=params, **kwargs)
        with self._mu:
            return self._send("GET", url[len(self._origin):], None, self._get_headers,
                              kwargs.get("timeout"))

    def _send(self, method: str, target: str, body: bytes | None, headers: dict[str, Any],
              timeout: float | None) -> Answer:
        conn = self._conn
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            conn.close()
        if conn is None:
            conn = self._conn = (
                http.client.HTTPConnection(self._host, self._port) if self._context is None
                else http.client.HTTPSConnection(self._host, self._port,
                                                 context=self._context))
            self._held[:] = [conn]
        reading = False
        try:
            if conn.sock is None:
                conn.timeout = timeout
                conn.connect()
                self._timeout = timeout
            reading = True
            if timeout != self._timeout:
                assert conn.sock is not None
                conn.sock.settimeout(timeout)
                self._timeout = timeout
            if timeout is not None:
                # The whole answer within the timeout, not each read of it: a server
                # that sends a byte now and then would otherwise hold the caller for good.
                self._timeout = -1.0  # the reads change it: set again for the next request
                conn.response_class = functools.partial(  # type: ignore[assignment]
                    _BoundedResponse, deadline=time.monotonic() + timeout)
            else:
                conn.response_class = http.client.HTTPResponse
            conn.request(method, target, body, headers)
            answer = conn.getresponse()
            content = _decoded(answer.read(), answer.getheader("Content-Encoding"))
        except BaseException as e:
            # Midway, its state is unknown: never reused.
            self._conn = None
            conn.close()
            if isinstance(e, Exception):
                raise _as_requests_error(e, reading) from None
            raise
        # etcd3gw keeps only the reason phrase of a status it does not map, and the store
        # tells a proxy's 502 by it: the standard one, whatever the proxy wrote (Apache
        # writes "Proxy Error").
        reason = "Bad Gateway" if answer.status == 502 else answer.reason
        return Answer(answer.status, reason, content)

    def close(self) -> None:
        with self._mu:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        super().close()

    def inherited_socket(self) -> socket.socket | None:
        """The connection's socket (in a forked child: this process's copy of it)."""
        conn = self._conn
        return None if conn is None else conn.sock


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only what is left of the time for the answer.
    ``held`` is the socket's own reader, closed with this one: until then it keeps the
    socket open for the answer (a connection that will close closes its socket as the
    answer begins, and the socket waits for its readers)."""

    def __init__(self, sock: socket.socket, deadline: float, held: Any) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._held = held

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._held.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the answer did not come whole in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _BoundedResponse(http.client.HTTPResponse):
    """An answer whose status line, headers and body must all arrive by ``deadline``
    (`time.monotonic`)."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, deadline: float) -> None:
        super().__init__(sock, debuglevel, method, url)
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline, self.fp))


def _close_all(conns: list[http.client.HTTPConnection]) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.close()


def _decoded(content: bytes, encoding: str | None) -> bytes:
    """An answer's body as sent before compression (a proxy in front of etcd may
    compress although asked not to): gzip (every member), or deflate with or without
    its zlib header, as urllib3 reads them. `requests.exceptions.ContentDecodingError`
    when it does not decompress."""
    kind = (encoding or "").strip().lower()
    if not content or kind not in ("gzip", "deflate"):
        return content
    try:
        if kind == "deflate":
            try:
                return zlib.decompress(content)
            except zlib.error:
                return zlib.decompress(content, -zlib.MAX_WBITS)  # raw, no header
        parts, rest = [], content
        while rest:
            member = zlib.decompressobj(16 + zlib.MAX_WBITS)
            parts.append(member.decompress(rest))
            if not member.eof:
                raise zlib.error("the gzip stream ends early")
            rest = member.unused_data
        return b"".join(parts)
    except zlib.error as e:
        raise requests.exceptions.ContentDecodingError(
            f"an answer that says {kind} does not decompress: {e}") from None


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle keep-alive connection was closed by the far end (it reads as
    ready: at its end, or with bytes nobody asked for) or cannot be polled."""
    try:
        return bool(_platform.wait_ready((sock.fileno(),), (), 0)[0])
    except (OSError, ValueError):
        return True


class Answer:
    """An answer to a JSON POST: what etcd3gw's client reads of one (``status_code``,
    ``reason``, ``text``, ``json()``)."""

    __slots__ = ("content", "reason", "status_code")

    def __init__(self, status: int, reason: str | None, content: bytes) -> None:
        self.status_code = status
        self.reason = reason
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _as_requests_error(e: Exception, reading: bool) -> Exception:
    """The exception requests raises where ``e`` ends a request: a time-out while
    connecting or while waiting for the answer, or a connection that failed."""
    if isinstance(e, requests.RequestException):  # one of requests' already
        return e
    if isinstance(e, TimeoutError):
        return requests.ReadTimeout(e) if reading else requests.ConnectTimeout(e)
    if isinstance(e, ssl.SSLError):
        return requests.exceptions.SSLError(e)
    if isinstance(e, OSError | http.client.HTTPException):
        return requests.ConnectionError(e)
    return e


def _dumps(payload: Any) -> bytes:
    """The body requests would send for ``json=payload``."""
    return json.dumps(payload, allow_nan=False).encode()


def close_client(client: Any) -> None:
    """Close an etcd3gw client's connections now (urllib3 2 closes a pool's connections
    only once the garbage collector finalizes the pool, not on the session's close)."""
    with contextlib.suppress(Exception):
        for adapter in client.session.adapters.values():
            pools = adapter.poolmanager.pools
            for key in pools.keys():  # noqa: SIM118 (the container refuses iteration)
                pools[key].close()
        client.session.close()


def close_inherited(client: Any) -> None:
    """In a forked child: close this process's copies of a client's idle connections
    (the parent's stay open), touching no lock a parent's thread may have held."""
    with contextlib.suppress(Exception):
        session = client.session
        sock = session.inherited_socket() if isinstance(session, Session) else None
        if sock is not None:
            sock.close()
        for adapter in session.adapters.values():
            # Direct connections, and those through a proxy (a pool manager per proxy).
            for manager in [adapter.poolmanager, *adapter.proxy_manager.values()]:
                for pool in list(manager.pools._container.values()):
                    for conn in list(getattr(pool.pool, "queue", None) or ()):
                        sock = getattr(conn, "sock", None)
                        if sock is not None:
                            sock.close()
