"""The HTTP sessions the etcd store gives etcd3gw's clients and its watches (requests
sessions), and taking their connections down.

Imported only when an etcd URL is used: ``requests`` comes with the ``etcd`` extra.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import requests
import urllib3


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class Session(requests.Session):
    """A requests session for one etcd endpoint, with the proxy settings read from the
    environment once, when it is made.

    With ``trust_env`` on, requests looks up the proxy variables and ~/.netrc at every
    request, about 0.3 ms of a transaction's 1-2 ms on loopback. The proxy in force stays
    the one the environment names (a netrc login does not apply: etcd's gateway takes
    none).

    A plain JSON POST (all the store and etcd3gw's client send, but for a watch's stream)
    goes without a proxy straight to the urllib3 connection pool requests' adapter keeps
    for the endpoint, and its answer comes back as an `Answer`: requests would merge this
    session's cookies, hooks, auth and settings into each request, and build a
    `requests.Response` (a cookie jar, redirect and cookie handling) from each answer,
    none of which apply to etcd's gateway. Their code runs cold after a pause (a holder
    that held its session through a model call), when each of these steps costs several
    times what it costs in a loop: skipping them takes about 0.4 ms off a hand-off's
    2 ms above the store's protocol floor (fencelock-bench). The pool, its connections,
    timeouts and retries are requests' own; urllib3's errors reach the caller as
    requests' exceptions, as the adapter raises them, and etcd3gw maps them to its own.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.proxies.update(requests.utils.get_environ_proxies(url))
        self.trust_env = False
        self._json_headers = {**self.headers, "Content-Type": "application/json"}
        self._routes: dict[str, tuple[Any, str, Any]] = {}
        """URL: (its urllib3 pool, the request target, the adapter's retries)."""
        self._timeouts: dict[Any, urllib3.Timeout] = {}

    def post(self, url: str | bytes, data: Any = None, json: Any = None,
             **kwargs: Any) -> Any:
        if data is not None or json is None or kwargs.keys() - {"timeout"} or self.proxies:
            return super().post(url, data=data, json=json, **kwargs)
        url = url if isinstance(url, str) else url.decode()
        body = _dumps(json)
        route = self._routes.get(url)
        if route is None:
            adapter = self.get_adapter(url)
            if not isinstance(adapter, requests.adapters.HTTPAdapter):
                return super().post(url, json=json, **kwargs)
            parsed = urllib3.util.parse_url(url)
            pool = adapter.poolmanager.connection_from_host(
                parsed.host, parsed.port, parsed.scheme)
            route = self._routes[url] = (pool, parsed.request_uri, adapter.max_retries)
        pool, target, retries = route
        wait = kwargs.get("timeout")
        timeout = self._timeouts.get(wait)
        if timeout is None:
            timeout = self._timeouts[wait] = urllib3.Timeout(connect=wait, read=wait)
        headers = self._json_headers.copy()
        headers["Content-Length"] = str(len(body))
        try:
            raw = pool.urlopen("POST", target, body=body, headers=headers, redirect=False,
                               assert_same_host=False, preload_content=True,
                               retries=retries, timeout=timeout)
        except Exception as e:
            raise _as_requests_error(e) from None
        return Answer(raw.status, raw.reason, raw.data)


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


def _as_requests_error(e: Exception) -> Exception:
    """The exception requests' adapter raises for urllib3's ``e`` (``e`` itself when it
    raises that unchanged)."""
    from urllib3 import exceptions as u

    if isinstance(e, u.MaxRetryError):
        reason = e.reason
        if isinstance(reason, u.ConnectTimeoutError) and \
                not isinstance(reason, u.NewConnectionError):
            return requests.ConnectTimeout(e)
        if isinstance(reason, u.ProxyError):
            return requests.exceptions.ProxyError(e)
        return requests.ConnectionError(e)
    if isinstance(e, u.ReadTimeoutError):
        return requests.ReadTimeout(e)
    if isinstance(e, u.ProtocolError | OSError | u.ClosedPoolError):
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
        for adapter in client.session.adapters.values():
            # Direct connections, and those through a proxy (a pool manager per proxy).
            for manager in [adapter.poolmanager, *adapter.proxy_manager.values()]:
                for pool in list(manager.pools._container.values()):
                    for conn in list(getattr(pool.pool, "queue", None) or ()):
                        sock = getattr(conn, "sock", None)
                        if sock is not None:
                            sock.close()
