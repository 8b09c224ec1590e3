"""The etcd holder store: etcd's own lock recipe (the one ``etcdctl lock`` and
``concurrency.Mutex`` use) under one lease per process, kept alive in the background.

Layout under PREFIX: each contender for a session puts ``sessions/<key>/<lease hex>``
under its lease; the key with the lowest create revision owns the lock, and its create
revision is the fencing token. Each waiter watches only the key just ahead of it. The
owner's key holds its JSON record; ``last/<key>`` (no lease) keeps the last record
written, so a session whose owner died mid-run reads as stale.

A holder counts itself lost once it cannot be sure its lease is alive (no keepalive
answer within the lease's time to live, less a safety margin); from then on it writes
nothing, and every record write is also guarded by a compare on its own key.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import functools
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from fencelock import _backend, _record
from fencelock._errors import (
    CorruptRecordError,
    FenceLockError,
    HolderLostError,
    NotHeldError,
    OutsideRootError,
    RecordTooLargeError,
    SessionContendedError,
    StoreUnavailableError,
    describe_leftovers,
    no_thread,
    shell_word,
)
from fencelock._record import HolderInfo, State

if TYPE_CHECKING:
    from fencelock._etcdurl import EtcdURL
    from fencelock._probe import HolderStatus

_REQUEST_TIMEOUT = 2.0
"""The longest one request to etcd may take (less when the caller's deadline is near)."""
_QUICK_FAILURE = 0.1
"""An endpoint that failed faster than this (refused the connection) took none of the
caller's time: the next is asked even past the caller's deadline."""
_MIN_REQUEST_TIMEOUT = 0.5
"""A request is always given this long, even past the caller's deadline: cut shorter, a
slow answer on a busy machine would read as an unreachable store (and leave unknown
whether the request took effect)."""
_TLS_PROBE_TIMEOUT = 1.0
"""How long the look at an endpoint that closed a request or a TLS handshake unanswered
may take (a TLS handshake, or a plain GET of etcd's version)."""
_NO_ANSWER = "no answer in time"
"""An endpoint's reason when a request timed out (asked then whether it has a leader)."""
_NOT_ETCD = "answered, but not as etcd's v3 API does"
"""An endpoint's reason when it answered as some other server (`_not_etcd`)."""
_WITHOUT_RECORD = ("a holder without a fencelock record (etcdctl lock, another client's "
                   "Mutex, one about to write its record, or a waiter that died or was "
                   "paused in the queue, until its lease runs out)")
"""What holds a session whose owner key has a lease but no fencelock record."""
_LEADER_PROBE_TIMEOUT = 0.5
"""How long the question whether a member that did not answer in time has a leader may
take."""
_RECHECK_MAX = 5.0
"""The longest a waiter trusts its watch before it looks at the queue again (a third of
the TTL where that is shorter): a member that stops answering keeps a watch's stream
open and silent, and the key ahead may have gone meanwhile."""

_ASCEND, _DESCEND = 1, 2
_BY_CREATE = 2  # SortTarget: KEY, VERSION, CREATE, MOD, VALUE
_CANCEL_STEP = 0.05
_T = TypeVar("_T")
_RETRY_PAUSE = 0.2
"""How long a waiter that cannot reach etcd pauses before it looks again."""
_NO_SPACE = "database space exceeded"
"""etcd's answer to writes while its NOSPACE alarm is on ("mvcc: database space
exceeded"): no outage to wait out."""


def _b64(text: str | bytes) -> str:
    if isinstance(text, str):
        return _b64_key(text)
    return base64.b64encode(text).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _b64_key(text: str) -> str:
    """A key as the gateway takes it. Kept: a holder names the same few keys in every
    request, and a hand-off's requests are built right after a long wait, when each
    step costs several times more than in a loop."""
    # A session name that is not UTF-8 reaches us as os.fsdecode gives it (lone
    # surrogates): the key is the name's bytes, as the filesystem has them.
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _key_text(kv: dict[str, Any]) -> str:
    """A key as text, its bytes that are not UTF-8 as os.fsdecode gives them."""
    return _unb64(kv["key"]).decode("utf-8", "surrogateescape")


def _prefix_end(prefix: str) -> str:
    """The end of the key range of every key starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _range(key: str, *, prefix: bool = False, first: bool = False, last: bool = False,
           max_create: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(key)}
    if prefix:
        req["range_end"] = _b64(_prefix_end(key))
    if first or last:
        req.update(sort_order=_ASCEND if first else _DESCEND, sort_target=_BY_CREATE, limit=1)
    if max_create is not None:
        req["max_create_revision"] = max_create
    return {"request_range": req}


def _put(key: str, value: bytes | _Encoded, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(key), "value": value if isinstance(value, _Encoded)
                           else _b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


class _Encoded(str):
    """A value base64-encoded once for the several puts that store it."""


_QUEUE_TRIES = 3
"""How many times an acquire puts its key in the queue after finding one there left by
etcd's past (`EtcdHolder._queue`)."""


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _created(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": revision}


def _holds(key: str, value: bytes) -> dict[str, Any]:
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def _holds_value(txn: dict[str, Any], value: bytes) -> bool:
    """Whether a failed transaction's one range found ``value``."""
    responses = txn.get("responses") or [{}]
    kvs = _kvs(responses[0])
    return bool(kvs) and base64.b64decode(kvs[0].get("value", "")) == value


def _kvs(response: dict[str, Any]) -> list[dict[str, Any]]:
    return list(response.get("response_range", {}).get("kvs", []))


def _count(response: dict[str, Any]) -> int:
    return int(response.get("response_range", {}).get("count", 0))


if hasattr(time, "CLOCK_BOOTTIME"):
    def _lease_clock() -> float:
        """Seconds on a clock that goes on counting while the host is suspended (etcd's
        lease runs out meanwhile): `time.monotonic` stops on Linux."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
else:
    _lease_clock = time.monotonic


def margin(ttl: float) -> float:
    """How long before a lease may have expired its holder counts it lost: what a
    renewal's answer may take to arrive, and clocks may drift, within one TTL."""
    return min(1.0, ttl / 4)


class _Lease:
    """This process's lease on one etcd cluster, and how long it is known to live."""

    def __init__(self, lease_id: int, ttl: float, confirmed_until: float) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.confirmed_until = confirmed_until
        """The `_lease_clock` time before which etcd cannot have expired the lease."""
        self._lost = ""
        self.gone = threading.Event()
        """Set once the lease counts as lost."""

    @property
    def lost(self) -> str:
        """Why the lease counts as lost (empty while it does not)."""
        return self._lost

    @lost.setter
    def lost(self, why: str) -> None:
        self._lost = why
        if why:
            self.gone.set()

    def safety(self) -> float:
        return margin(self.ttl)

    def alive(self) -> bool:
        if self.lost:
            return False
        if _lease_clock() >= self.confirmed_until - self.safety():
            self.lost = ("its etcd lease could not be renewed in time: etcd did not answer, "
                         "or this process was paused or stalled past what its last renewal "
                         "vouched for (the lease's TTL less the time since, less a margin)")
            return False
        return True


class _Watch:
    """A watch on one key's deletion. `wait` returns once the key is deleted
    (`deleted`), the stream ends (etcd went away) or the time is up.

    Read by the waiting thread itself (``inline``), a deletion wakes it with no thread
    in between; a stream whose read timed out cannot be read again, so an inline watch
    that timed out once answers every later `wait` at once, and the waiter looks again.
    Otherwise a thread of its own reads the stream and sets `wake`, so that the waiter
    can also watch a cancellation event."""

    def __init__(self, client: Any, key: str, timeout: float, display: str,
                 inline: bool) -> None:
        import requests

        from fencelock import _etcdhttp

        self.wake = threading.Event()
        self.deleted = False
        self.revision = 0
        """The store's revision when the watch began: it sees every event after it."""
        # From the current revision, never from an earlier one: etcd serves a watch that
        # starts behind its current revision from a loop that catches up every 100 ms,
        # so such a watch hears of a deletion up to 100 ms late (measured: 93 ms median
        # against 1.4 ms). On a cluster where other sessions write, the revision moves
        # between any look and the watch that follows it.
        create: dict[str, Any] = {"key": _b64(key), "filters": ["NOPUT"]}
        # A session of its own: a stream cut off by `stop` leaves its connection in no
        # state to carry another request, so it must never go back to the pool the
        # client's requests are sent from.
        self._session = _etcdhttp.Session(client.base_url,
                                          getattr(client.session, "tls", None))
        # One connection ever: a pool sized for one is quicker to take down (closing a
        # pool visits every slot it has).
        self._session.mount(client.base_url.partition(":")[0] + "://",
                            requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1))
        self._sock: socket.socket | None = None
        self._pending = b""
        try:
            # The timeout bounds the connect and the wait for etcd's first answer, which
            # says that the watch is in place (a hung etcd accepts the connection and
            # says nothing)...
            self._response = self._session.post(
                client.get_url("/watch"), json={"create_request": create}, stream=True,
                timeout=(timeout, timeout))
            self._response.raise_for_status()
            self._sock = getattr(getattr(self._response.raw, "connection", None), "sock",
                                 None)
            self._chunks = self._response.iter_content(chunk_size=None)
            created = self._next_result()
            if not created.get("created") or created.get("canceled"):
                raise EOFError  # refused (etcd says why in cancel_reason)
            self.revision = int(created["header"]["revision"])
        except Exception as e:  # requests' errors, or no watch in the answer
            with contextlib.suppress(Exception):
                self._response.close()
            self._session.close()
            timed_out = isinstance(e, requests.Timeout | socket.timeout) \
                or "Timeout" in type(e).__name__ or "timed out" in str(e).lower()
            raise StoreUnavailableError(display, "no answer in time" if timed_out
                                        else "cannot watch") from None
        # ... but not the wait for the event, which lasts as long as the holder ahead.
        if self._sock is not None:
            self._sock.settimeout(None)
        self.inline = inline and self._sock is not None  # an inline read needs its timeout
        self._reader: threading.Thread | None = None
        if not self.inline:
            reader = threading.Thread(target=self._read, name="fencelock-etcd-watch",
                                      daemon=True)
            try:
                reader.start()
            except RuntimeError:  # "can't start new thread": a limit reached
                with contextlib.suppress(Exception):
                    self._response.close()
                self._session.close()
                raise no_thread(display, "watching etcd") from None
            self._reader = reader

    def fire(self) -> None:
        """Count the key as deleted (seen otherwise), waking the waiter at once."""
        self.deleted = True
        self.wake.set()

    def _next_result(self) -> dict[str, Any]:
        """The stream's next message; `EOFError` at its end."""
        while b"\n" not in self._pending:
            self._pending += next(self._chunks, b"") or _eof()
        line, _, self._pending = self._pending.partition(b"\n")
        result: dict[str, Any] = json.loads(line or b"{}").get("result", {})
        return result

    def _until_woken(self) -> None:
        """Read the stream until the key's deletion, a cancel or the stream's end."""
        while True:
            try:
                result = self._next_result()
            except EOFError:
                return
            if result.get("events"):
                self.deleted = True
                return
            if result.get("canceled"):
                return

    def _read(self) -> None:
        try:
            self._until_woken()
        except Exception:  # the stream broke: the waiter looks again
            return
        finally:
            self.wake.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once woken (see `deleted`)."""
        if not self.inline:
            return self.wake.wait(timeout)
        if self.wake.is_set():
            return True
        try:
            assert self._sock is not None
            self._sock.settimeout(max(timeout, 0.001))
            self._until_woken()
        except Exception:  # timed out, or the stream broke: either way it is spent
            self.wake.set()
            return self.deleted
        self.wake.set()
        return True

    def close_inherited(self) -> None:
        """In a forked child: close this process's copy of the watch's socket (its
        descriptor itself: the stream's reader keeps the socket object open)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                os.close(self._sock.detach())

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if self._reader is not None and self._reader is not threading.current_thread():
                # The stream ends at once now: let its reader finish with the connection
                # before it is closed under it (two threads on one connection leave a
                # socket that nobody closes).
                self._reader.join(_REQUEST_TIMEOUT)
        with contextlib.suppress(Exception):
            # Now, not when the garbage collector gets to it (perhaps while the
            # interpreter exits, with the modules its clean-up needs gone).
            self._chunks.close()
        with contextlib.suppress(Exception):
            self._response.close()
        with contextlib.suppress(Exception):
            self._session.close()


def _http_status(e: Exception, exceptions: Any) -> str:
    """The HTTP status behind one of etcd3gw's outage errors, which carry only the reason
    phrase: 503 raises `ConnectionFailedError`, 408 and 504 `ConnectionTimeoutError`."""
    reason = str(e.args[0] or "") if e.args else ""
    if isinstance(e, exceptions.ConnectionFailedError):
        code = "503"
    else:
        code = _TIMEOUT_STATUS.get(reason, "408 or 504")
    return f"{code} {reason}".rstrip()


_TIMEOUT_STATUS = {"Request Timeout": "408", "Gateway Timeout": "504"}


def _integer(value: object) -> bool:
    """Whether ``value`` is an integer as etcd's gateway writes one (int64 as a string)."""
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def _objects(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _misshapen(path: str, payload: dict[str, Any], result: dict[str, Any]) -> str | None:
    """What an answer to ``path`` (asked with ``payload``) lacks of the shape etcd
    always gives it and the store reads (a lease's ID, one response for each operation
    of the branch a transaction took, ...); None when it has that shape."""
    if not isinstance(result.get("header", {}), dict):
        return "a header object"
    if path == "/lease/grant" and not (_integer(result.get("ID"))
                                       and _integer(result.get("TTL", 0))):
        return "a lease ID and TTL"
    if path == "/lease/keepalive":
        kept = result.get("result", {})
        if not isinstance(kept, dict) or not _integer(kept.get("TTL", -1)):
            return "a lease TTL"
    if path == "/kv/lease/timetolive" and not _integer(result.get("TTL", -1)):
        return "a lease TTL"
    if not _objects(result.get("kvs", [])):
        return "a list of keys"
    responses = result.get("responses", [])
    if not _objects(responses) or not all(
        isinstance(part, dict) for response in responses for part in response.values()
    ):
        return "a list of responses"
    if path == "/kv/txn":
        # etcd leaves out what is empty or false: "succeeded" when the compare failed,
        # "responses" when the branch taken has no operations.
        taken = payload.get("success" if result.get("succeeded") else "failure") or []
        if len(responses) != len(taken):
            return "a response for each operation"
    for response in responses:
        kvs = response.get("response_range", {}).get("kvs", [])
        if not _objects(kvs):
            return "a list of keys"
    return None


def _bad_gateway(e: Exception, exceptions: Any) -> bool:
    """Whether ``e`` is etcd3gw's error for an HTTP 502 answer that is not etcd's (which
    carries a JSON body): etcd3gw keeps only the reason phrase of a status it does not
    map, and a proxy's 502 says "Bad Gateway"."""
    return (type(e) is exceptions.Etcd3Exception and bool(e.args)
            and str(e.args[0]).strip().lower() == "bad gateway"
            and not (getattr(e, "detail_text", None) or "").lstrip().startswith("{"))


@functools.cache
def _etcd3gw_exceptions() -> Any:
    """etcd3gw's exceptions (imported once the store is used: it comes with an extra)."""
    from etcd3gw import exceptions

    return exceptions


_retired: collections.deque[_Watch] = collections.deque()
"""Watches whose waiter's turn came, for `_retirer` to stop."""
_retired_wake = threading.Event()
_retirer: threading.Thread | None = None
_retirer_mu = threading.Lock()
_stopping: _Watch | None = None
"""The watch `_retirer` is stopping now (no longer in `_retired`)."""
_inherited: list[collections.deque[_Watch]] = []
"""In a forked child: the parent's retired watches, kept unstopped (see
`_after_fork_in_child`)."""


def _retire(watch: _Watch) -> bool:
    """Have ``watch`` stopped soon, by a thread of its own: stopping a watch (and freeing
    its connection) costs about 0.15 ms, which the waiter whose turn it saw come would
    otherwise spend before `acquire` returns. False when no thread can be started: the
    caller stops it."""
    global _retirer
    _retired.append(watch)
    if _retirer is None or not _retirer.is_alive():
        with _retirer_mu:
            if _retirer is None or not _retirer.is_alive():
                thread = threading.Thread(target=_stop_retired, name="fencelock-etcd-retire",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had: the caller stops it
                    with contextlib.suppress(ValueError):
                        _retired.remove(watch)
                    return False
                _retirer = thread
    _retired_wake.set()
    return True


def _stop_retired() -> None:
    while True:
        _retired_wake.wait()
        _retired_wake.clear()
        _stop_all_retired()


def _stop_all_retired() -> None:
    global _stopping
    while True:
        try:
            watch = _stopping = _retired.popleft()
        except IndexError:
            return
        with contextlib.suppress(Exception):
            watch.stop()
        _stopping = None


# A process that exits just after a turn came stops that watch first: left to the
# interpreter's teardown, the stream's reader fails noisily on modules already gone.
atexit.register(_stop_all_retired)


def _eof() -> bytes:
    raise EOFError


class _Cluster:
    """Clients for one cluster's endpoints (one per thread), and the process's lease."""

    def __init__(self, url: EtcdURL) -> None:
        self.url = url
        self.ttl = url.ttl
        self._local = threading.local()
        self._mu = threading.Lock()
        self._lease: _Lease | None = None
        self._keeper: threading.Thread | None = None
        self._wake = threading.Event()
        self._preferred = 0
        self._tls_settings: Any = None
        self._tls_only: dict[int, bool] = {}
        """Endpoints (by index) asked whether they speak TLS only: asked once, so that an
        outage's repeated failures do not each pay a handshake."""
        self._to_revoke: list[int] = []
        self._to_take_back: list[tuple[_Lease, str, Callable[[], None]]] = []
        """Queued keys a failed acquire could not take out while etcd was away: (lease,
        key, the requests that do it), retried by the lease's keeper."""
        self._claimed: set[str] = set()
        """Keys that holders of this process have queued (or hold) under the lease."""
        self._unclaimed = threading.Condition()
        self._by_thread: dict[threading.Thread, list[Any]] = {}
        self._by_thread_mu = threading.Lock()

    # -- requests ----------------------------------------------------------------

    def _clients(self) -> list[Any]:
        clients: list[Any] | None = getattr(self._local, "clients", None)
        if clients is None:
            import etcd3gw

            from fencelock import _etcdhttp

            tls = self._tls()
            clients = [
                etcd3gw.client(
                    host=host, port=port, protocol="https" if self.url.tls else "http",
                    timeout=_REQUEST_TIMEOUT,
                    session=_etcdhttp.Session(_etcdhttp.base_url(host, port, self.url.tls), tls))
                for host, port in self.url.endpoints
            ]
            self._local.clients = clients
            # An ended thread's clients hold their connections open until the garbage
            # collector finds them (each `acquire_async` waits in a thread of its own):
            # close them now, so that open descriptors do not pile up meanwhile.
            with self._by_thread_mu:
                for thread, old in list(self._by_thread.items()):
                    if not thread.is_alive():
                        del self._by_thread[thread]
                        for client in old:
                            _etcdhttp.close_client(client)
                self._by_thread[threading.current_thread()] = clients
        return clients

    def _tls(self) -> Any:
        """The HTTPS settings of an ``etcds://`` URL (`_etcdhttp.TLS`, made once), None
        for ``etcd://``. `StoreUnavailableError` naming the file that cannot be used."""
        if not self.url.tls:
            return None
        if self._tls_settings is None:
            from fencelock import _etcdhttp

            try:
                self._tls_settings = _etcdhttp.TLS(self.url.ca, self.url.cert, self.url.key)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                named = ", ".join(
                    f"{k}={v}" for k, v in (("ca", self.url.ca), ("cert", self.url.cert),
                                            ("key", self.url.key)) if v is not None)
                why = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
                if self.url.cert is not None and self.url.key is None and \
                        "PEM lib" in str(e):  # (OpenSSL's word for a cert it cannot load)
                    why += (" (cert= without key=: the certificate file must then hold "
                            "the private key too; give key=FILE, or check that cert= is a "
                            "PEM certificate)")
                raise StoreUnavailableError(
                    self.url.display,
                    f"its TLS files cannot be used ({named or 'the system CAs'}): {why}",
                    "check ca=, cert= and key= in the backend URL: PEM files this user "
                    "can read, the key the certificate's") from None
        return self._tls_settings

    def _tls_failed(self, index: int, error: str) -> StoreUnavailableError:
        """A TLS handshake that the other end answered, but failed (``error``: the `ssl`
        module's text): a setting to fix, not an outage to wait out."""
        reason = error.rpartition("] ")[2].split(" (_ssl.c:")[0].strip() or error
        if "WRONG_VERSION_NUMBER" in error:  # it answered in plain text (HTTP)
            return self._not_tls(index, reason)
        return StoreUnavailableError(
            self.url.display, f"the TLS handshake with {self._where(index)} failed: {reason}",
            "check ca= in the backend URL (the CA that signed etcd's certificate, which "
            "must name the host as the URL does) and cert=/key= (a client certificate "
            "signed by the CA etcd trusts, when etcd asks for one)")

    def _where(self, index: int) -> str:
        """Endpoint ``index`` as HOST:PORT ([HOST]:PORT for an IPv6 address)."""
        host, port = self.url.endpoints[index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _not_tls(self, index: int, detail: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            self.url.display, f"{self._where(index)} does not answer in TLS (HTTPS): {detail}",
            "name it etcd://, not etcds://, if it is etcd's plain-HTTP client URL")

    def _plain_port(self, index: int, timeout: float) -> StoreUnavailableError | None:
        """The error to raise when the endpoint that closed a TLS handshake without
        answering serves etcd in plain HTTP (a wrong URL); None when it does not: a
        proxy whose etcd is down closes handshakes too, and that is an outage."""
        from fencelock._etcdhttp import serves_plain_etcd

        host, port = self.url.endpoints[index]
        if serves_plain_etcd(host, port, min(timeout, _TLS_PROBE_TIMEOUT)):
            return self._not_tls(index, "it serves etcd in plain HTTP")
        return None

    def _not_etcd(self, index: int, detail: str) -> StoreUnavailableError:
        """An endpoint that answered, but not as etcd does: a wrong URL, not an outage to
        wait out (its `fix` says so). ``detail`` (say, an HTML page) on one line."""
        detail = " ".join(detail.split())[:200] or "no detail"
        return StoreUnavailableError(
            self.url.display, f"{self._where(index)} answered, but not as etcd's v3 API does: "
            f"{detail}", "check the backend URL's host and port: it must name etcd's "
            "client URL (port 2379 by default), not another server")

    def _tls_only_port(self, index: int, timeout: float) -> StoreUnavailableError | None:
        """The error to raise when the endpoint that closed a request without answering
        speaks TLS: etcd's client port with a certificate serves HTTPS only, and the
        store speaks plain HTTP (a wrong URL, not an outage to wait out); else None."""
        from fencelock._etcdhttp import speaks_tls

        host, port = self.url.endpoints[index]
        tls = self._tls_only.get(index)
        if tls is None:
            tls = self._tls_only[index] = speaks_tls(
                host, port, min(timeout, _TLS_PROBE_TIMEOUT))
        if not tls:
            return None
        return StoreUnavailableError(
            self.url.display, f"{self._where(index)} speaks TLS (HTTPS) only, and an etcd:// "
            "URL speaks plain HTTP", "write etcds:// (with ca=, and cert= and key= if etcd "
            "asks for a client certificate), or name a plain-HTTP client URL of etcd's "
            "(an http:// entry of its --listen-client-urls)")

    def call(self, path: str, payload: dict[str, Any],
             deadline: float | None = None, share: bool = False) -> dict[str, Any]:
        """POST one request to the first endpoint that answers (etcd3gw's client, whose
        session keeps its connection alive between requests). ``share``: the time left
        to ``deadline`` is shared out among the endpoints not yet asked (a lease's
        renewal, which one member that hangs must not keep past the moment its holder
        counts the lease lost while others would answer)."""
        clients = self._clients()
        exceptions = _etcd3gw_exceptions()
        why = "no endpoint"
        misfit: StoreUnavailableError | None = None
        said: str | None = None  # etcd's own reason for not serving ("no leader")
        reasons: dict[int, str] = {}  # each endpoint's, for the error
        n = len(clients)
        first, tried = self._preferred, 0
        asked_at = 0.0  # when the last endpoint was asked
        for i in range(n):
            index = (first + i) % n
            client = clients[index]
            timeout = _REQUEST_TIMEOUT
            if deadline is not None:
                now = time.monotonic()
                left = deadline - now
                # The caller's time is up, spent on an endpoint that did not answer in
                # time: the next would outlast it. (One that refused the connection
                # took none of it: the next is asked past the deadline too.) Not shared
                # out among the endpoints ahead: a loaded cluster answers every member's
                # requests slowly, and each request must get the time it needs.
                if i and left <= 0 and now - asked_at >= _QUICK_FAILURE:
                    break
                timeout = max(_MIN_REQUEST_TIMEOUT,
                              min(timeout, left / (n - i) if share else left))
            client.timeout = timeout
            tried = i + 1
            asked_at = time.monotonic()
            try:
                result: dict[str, Any] = client.post(client.get_url(path), json=payload)
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as e:
                # etcd's own 503/504 answer ("no leader") carries its reason: keep it.
                answer = (e.detail_text or "").lstrip()
                if answer.startswith("{"):
                    said = reasons[index] = _etcd_error(self.url.display, answer).why
                    continue
                if e.args:
                    # An HTTP answer (etcd3gw adds its reason) that is not etcd's: a proxy
                    # in front of etcd said 503 or 504. Its status says why, not any
                    # words on its page.
                    page = " ".join(answer.split())[:120] or "an empty page"
                    why = (f"HTTP {_http_status(e, exceptions)} from a server other than etcd, "
                           f"which said: {page}")
                elif self.url.tls and "[SSL" in answer and "EOF" not in answer:
                    # A handshake answered, but failed: a setting to fix, raised unless
                    # another endpoint answers (as is a scheme that does not fit, below).
                    misfit = self._tls_failed(index, answer)
                    why = "TLS handshake failed"
                else:  # no answer: etcd3gw keeps requests' error in detail_text
                    why = ("connection refused" if "refused" in answer.lower() else
                           _NO_ANSWER if isinstance(e, exceptions.ConnectionTimeoutError)
                           else "cannot connect")
                    if why == "cannot connect":  # closed unanswered: a wrong scheme?
                        misfit = (self._plain_port(index, timeout) if self.url.tls
                                  else self._tls_only_port(index, timeout)) or misfit
                reasons[index] = why
                continue
            except exceptions.Etcd3Exception as e:
                detail = (e.detail_text or str(e)).strip()
                if _bad_gateway(e, exceptions):
                    # A proxy in front of etcd whose etcd is down or restarting (nginx,
                    # haproxy and Envoy say 502): an outage, as its 503 and 504 are.
                    page = " ".join(detail.split())[:120] or "an empty page"
                    why = f"HTTP 502 Bad Gateway from a server other than etcd, which said: {page}"
                    reasons[index] = why
                    continue
                if _GATEWAY_CN in detail:
                    raise _certificate_not_a_login(self.url.display, detail) from None
                if isinstance(e, exceptions.ApiVersionDiscoveryFailedError) or \
                        not (e.detail_text or "").lstrip().startswith("{"):
                    # No version API, or an HTTP error (a 500 too) without etcd's JSON
                    # error body: some other server listens there (a wrong port, a proxy
                    # that refuses or fails). Another endpoint may serve.
                    misfit = self._not_etcd(index, detail)
                    reasons[index] = why = _NOT_ETCD
                    continue
                raise _etcd_error(self.url.display, detail) from None
            except Exception as e:  # e.g. a reply that is not JSON: not an etcd there
                misfit = self._not_etcd(index, type(e).__name__)
                reasons[index] = why = _NOT_ETCD
                continue
            lacking = (
                # etcd heads every answer (a keepalive's sits in "result"): a server that
                # answers {} is not etcd, and its empty answers must not read as "free".
                "a header" if not isinstance(result, dict)
                or not ("header" in result or "result" in result)
                # A server that imitates etcd, or a proxy's rewrite.
                else _misshapen(path, payload, result))
            if lacking is not None:
                misfit = self._not_etcd(index, f"an answer without {lacking}")
                reasons[index] = why = _NOT_ETCD
                continue
            self._preferred = index
            return result
        # The next request starts with the first endpoint this one did not ask: one that
        # hangs would otherwise be asked first, and alone, by every request whose
        # deadline is short (a lease's renewal near its end), while others would serve.
        self._preferred = (first + tried) % n
        # A wrong setting (or a server other than etcd) is raised only when no endpoint
        # served: etcd answering "no leader" makes this an outage, which the waiting
        # commands ride out.
        raise (None if said else misfit) or self._unavailable(reasons, said or why, deadline)

    def _unavailable(self, reasons: dict[int, str], why: str,
                     deadline: float | None) -> StoreUnavailableError:
        """The error for a request no endpoint served (``why``: the last reason, or
        etcd's own): an outage, which holders and waiters ride out. Where the URL names
        several endpoints, each one asked with its reason; where one that is up knows no
        leader (asked within ``deadline``), that the cluster lost its quorum."""
        lost = False
        for index, reason in reasons.items():
            if reason in (_NO_ANSWER, "etcdserver: request timed out") and \
                    self._without_leader(index, deadline):
                reasons[index], lost = "up, without a leader", True
                break  # one says it for the cluster
        if len(self.url.endpoints) > 1 and reasons:
            why = "; ".join(f"{self._where(i)} {r}" for i, r in sorted(reasons.items()))
        elif lost:
            why = "etcd is up, without a leader"
        if lost:
            why = f"the cluster has lost its quorum, start its members that are down: {why}"
        return StoreUnavailableError(self.url.display, why)

    def _without_leader(self, index: int, deadline: float | None) -> bool:
        """Whether endpoint ``index`` answers, before ``deadline``, that its member
        knows no leader (a cluster that lost its quorum: a member serves this question
        on its own)."""
        timeout = _LEADER_PROBE_TIMEOUT
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return False
        client = self._clients()[index]
        client.timeout = timeout
        try:
            status = client.post(client.get_url("/maintenance/status"), json={})
        except Exception:  # no answer, or not one to read: nothing to say
            return False
        return isinstance(status, dict) and str(status.get("leader") or "0") == "0"

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None,
            deadline: float | None = None) -> dict[str, Any]:
        return self.call("/kv/txn", {"compare": compare, "success": success,
                                     "failure": failure or []}, deadline)

    def watch(self, key: str, deadline: float | None, inline: bool = False) -> _Watch:
        """A watch for the deletion of ``key`` from now on (its `revision`), created
        within the request timeout (less when ``deadline`` is near); ``inline``: read by
        the waiting thread."""
        client = self._clients()[self._preferred]
        timeout = _REQUEST_TIMEOUT
        if deadline is not None:
            timeout = max(_MIN_REQUEST_TIMEOUT, min(timeout, deadline - time.monotonic()))
        return _Watch(client, key, timeout, self.url.display, inline)

    def claim(self, key: str, fail: bool, deadline: float | None,
              cancel: threading.Event | None) -> bool:
        """Reserve ``key`` for one holder of this process, waiting (unless ``fail``) for
        another holder of it to let it go; False when it stays taken.

        A key is the lock name plus the process's lease: two holders of one process on
        one lock name (one session seen through two paths, say two mounts of a share)
        would share one key, and each would take the other's for its own."""
        with self._unclaimed:
            while key in self._claimed:
                if cancel is not None and cancel.is_set():
                    import asyncio

                    raise asyncio.CancelledError()
                remaining = None if deadline is None else deadline - time.monotonic()
                if fail or (remaining is not None and remaining <= 0):
                    return False
                if cancel is not None:
                    remaining = min(remaining or _CANCEL_STEP, _CANCEL_STEP)
                self._unclaimed.wait(remaining)
            self._claimed.add(key)
            return True

    def unclaim(self, key: str) -> None:
        with self._unclaimed:
            self._claimed.discard(key)
            self._unclaimed.notify_all()

    # -- the lease ---------------------------------------------------------------

    def lease(self, deadline: float | None) -> _Lease:
        """The process's live lease, granted now if there is none (or it was lost)."""
        lease = self._lease
        if lease is not None and lease.alive():
            return lease
        # Another thread may be granting one: wait for it no longer than a request of
        # our own would take (on a hung etcd, each waiter gives up at its deadline).
        wait = -1.0 if deadline is None else max(_MIN_REQUEST_TIMEOUT,
                                                 deadline - time.monotonic())
        if not self._mu.acquire(timeout=wait):
            raise StoreUnavailableError(self.url.display, "no answer in time")
        try:
            lease = self._lease
            if lease is not None and lease.alive():
                return lease
            if lease is not None:
                self._to_revoke.append(lease.id)
            sent = _lease_clock()
            ttl = max(1, math.ceil(self.ttl))
            result = self.call("/lease/grant", {"TTL": ttl, "ID": 0}, deadline)
            lease = _Lease(int(result["ID"]), ttl, sent + int(result.get("TTL", ttl)))
            if self._keeper is None or not self._keeper.is_alive():
                # Started before the lease is published (another thread may take a
                # published one without ``_mu``): it reads the lease under ``_mu``, once
                # this call lets go of it. No lease is kept without its keeper.
                keeper = threading.Thread(
                    target=self._keep_alive, name="fencelock-etcd-lease", daemon=True
                )
                try:
                    keeper.start()
                except RuntimeError:  # "can't start new thread": a limit reached
                    lease.lost = "no thread could be started to keep it alive"
                    with contextlib.suppress(StoreUnavailableError):
                        self.call("/kv/lease/revoke", {"ID": lease.id}, deadline)
                    raise no_thread(self.url.display, "keeping an etcd lease alive") from None
                self._keeper = keeper
            self._lease = lease
            return lease
        finally:
            self._mu.release()

    def forget(self, lease: _Lease) -> None:
        """etcd does not know ``lease`` (it lost its data, say): the next `lease` call
        grants a new one."""
        lease.lost = lease.lost or "etcd no longer knows its lease"
        with self._mu:
            if self._lease is lease:
                self._lease = None

    def take_back_later(self, lease: _Lease, key: str, take_back: Callable[[], None]) -> None:
        """Have the lease's keeper run ``take_back`` (which takes ``key`` out of its queue)
        once etcd answers, while ``lease`` lives: giving the lease up instead would lose
        every holder of this process. ``key`` stays claimed until then."""
        with self._mu:
            self._to_take_back.append((lease, key, take_back))
        self._wake.set()

    def _take_back_pending(self) -> None:
        with self._mu:
            pending, self._to_take_back = self._to_take_back, []
        for lease, key, take_back in pending:
            if not lease.lost:  # a lost lease takes its keys with it
                try:
                    take_back()
                except StoreUnavailableError:
                    with self._mu:
                        self._to_take_back.append((lease, key, take_back))
                    continue
                except Exception:  # never the keeper's end; the lease's expiry takes it
                    pass
            self.unclaim(key)

    def drop(self, lease: _Lease, why: str) -> None:
        """Give a lease up (a release that could not be stored): revoke it when possible,
        so that keys it carries do not outlive this process's interest in them."""
        lease.lost = lease.lost or why
        with self._mu:
            if self._lease is lease:
                self._lease = None
            self._to_revoke.append(lease.id)
        self._wake.set()

    def _sweep(self, lease: _Lease, deadline: float) -> None:
        """Delete the keys under ``lease`` that no holder of this process has claimed:
        keys etcd brought back with the lease (a snapshot restore revives both), which
        would hold or queue for their sessions for as long as this process keeps the
        lease alive. Each is deleted only at the revision seen while it was unclaimed:
        a holder that claims it meanwhile puts it anew, at a later one. No request is
        begun past ``deadline``: the lease's next renewal must not wait for it."""
        answer = self.call("/kv/lease/timetolive", {"ID": lease.id, "keys": True}, deadline)
        for key in answer.get("keys") or []:
            name = _unb64(key).decode("utf-8", "surrogateescape")
            with self._unclaimed:
                if name in self._claimed:
                    continue
            if time.monotonic() >= deadline:
                return  # the rest next time
            found = _kvs(self.txn([], [_range(name)], [], deadline)["responses"][0])
            with self._unclaimed:
                if not found or name in self._claimed:
                    continue
            self.txn([_created(name, int(found[0]["create_revision"]))], [_delete(name)],
                     [], deadline)

    def _keep_alive(self) -> None:
        sweep_at = 0.0
        while True:
            with self._mu:
                lease = self._lease
                revoke, self._to_revoke = self._to_revoke, []
            for lease_id in revoke:
                try:
                    self.call("/kv/lease/revoke", {"ID": lease_id})
                except StoreUnavailableError as e:
                    if _LEASE_GONE in e.why:
                        continue  # gone already: nothing left to revoke
                    with self._mu:
                        self._to_revoke.append(lease_id)
            # A lease whose holder's clock already counts it lost (this process was
            # paused past it) is not renewed: the holder said lost stays lost, whichever
            # thread looks first once the process runs again.
            if lease is not None and lease.alive():
                sent = _lease_clock()
                try:
                    # The time until the holder would count the lease lost (an answer
                    # after that saves nothing), shared out among the endpoints: one
                    # that hangs must not take it all while another would answer.
                    result = self.call("/lease/keepalive", {"ID": lease.id}, share=True,
                                       deadline=time.monotonic() + lease.confirmed_until
                                       - lease.safety() - sent)
                    ttl = int(result.get("result", {}).get("TTL", -1))
                except StoreUnavailableError:
                    ttl = 0  # unknown: try again soon
                if ttl < 0:
                    lease.lost = "its etcd lease expired"
                elif ttl > 0:
                    lease.confirmed_until = sent + ttl
                    if sent >= sweep_at:  # once a TTL, in the time to the next renewal
                        sweep_at = sent + lease.ttl
                        with contextlib.suppress(Exception):  # never the keeper's end
                            self._sweep(lease, time.monotonic() + self.ttl / 4)
                lease.alive()  # marks it lost once the margin has run out
            self._take_back_pending()
            with self._mu:
                pending = bool(self._to_revoke or self._to_take_back)
            step = self.ttl / 4
            if lease is None or lease.lost or pending:
                step = min(step, 0.25)
            elif ttl == 0:
                step = min(step, 0.2)
            self._wake.wait(step)
            self._wake.clear()


_LEASE_GONE = "requested lease not found"
"""etcd's error for a lease it does not know (expired, revoked, or its data lost)."""
_AUTH_CODES = (7, 16)
"""gRPC codes of etcd's answers to a request without the credentials it asks for
(PermissionDenied, Unauthenticated)."""
_AUTH_MESSAGES = ("user name is empty", "authentication failed", "auth token")
"""The same answers under other codes (a request with no user is InvalidArgument)."""
_GATEWAY_CN = "CommonName of client sending a request against gateway"
"""The start of etcd's plain-text 400 to a client certificate on its HTTP gateway with
authentication on: the gateway does not take the certificate's name as the user."""
_NO_LOGIN = ("fencelock's etcd store does not log in; give it an etcd (or a gateway) "
             "without authentication, or pick another store with --backend")


def _etcd_error(endpoint: str, detail: str) -> StoreUnavailableError:
    """The error for etcd's own error answer (JSON: ``error``, ``code``, ``message``):
    its message rather than the JSON, and for an etcd that wants credentials, what to
    do about it."""
    try:
        body = json.loads(detail)
        message = str(body.get("message") or body.get("error") or detail)
        code = body.get("code")
    except (ValueError, AttributeError):
        return StoreUnavailableError(endpoint, " ".join(detail.split())[:200])
    message = " ".join(message.split())
    if _NO_SPACE in message:
        return StoreUnavailableError(
            endpoint, f"{message[:200]}: etcd is out of space (its NOSPACE alarm is on)",
            "compact and defragment etcd, then clear its alarm (etcdctl alarm disarm), as "
            "etcd's maintenance guide describes")
    if code in _AUTH_CODES or any(text in message for text in _AUTH_MESSAGES):
        return StoreUnavailableError(
            endpoint, f"{message[:200]}: etcd has authentication on", _NO_LOGIN)
    return StoreUnavailableError(endpoint, message[:200])


def _certificate_not_a_login(endpoint: str, detail: str) -> StoreUnavailableError:
    """etcd's answer to a client certificate with authentication on (`_GATEWAY_CN`)."""
    return StoreUnavailableError(
        endpoint, f"{' '.join(detail.split())[:200]}: etcd has authentication on, and its "
        "HTTP gateway, which fencelock's etcd store speaks to, does not take a client "
        "certificate's name as the user", _NO_LOGIN)


def _seconds_left(answer: dict[str, Any]) -> int:
    """The whole seconds a lease has left by etcd's answer to ``/kv/lease/timetolive``
    (rounded toward zero), and -1 for a lease etcd has not. etcd's JSON leaves a TTL of
    0 out: under a second left (a renewal still saves it), or just expired and not yet
    revoked (its keys are still there, so nobody else holds what they hold)."""
    return int(answer.get("TTL", 0))


def lease_left(cluster: _Cluster, lease_id: int, key: str,
               deadline: float | None) -> float | None:
    """The whole seconds etcd says lease ``lease_id`` has left (0: its last second); None
    when it or ``key`` under it is gone. `StoreUnavailableError` without an answer."""
    r = cluster.call("/kv/lease/timetolive", {"ID": lease_id, "keys": True}, deadline)
    ttl = _seconds_left(r)
    return float(ttl) if ttl >= 0 and _b64(key) in r.get("keys", []) else None


def _pause_to_retry(cancel: threading.Event | None, until: float) -> None:
    """The pause before an acquire tries etcd again (`_RETRY_PAUSE`, not past ``until``);
    `asyncio.CancelledError` once ``cancel`` is set (an async acquire's task was
    cancelled), before or during it."""
    pause = max(0.0, min(_RETRY_PAUSE, until - time.monotonic()))
    if cancel is None:
        time.sleep(pause)
    elif cancel.is_set() or cancel.wait(pause):
        import asyncio

        raise asyncio.CancelledError()


def _telling(first: StoreUnavailableError, last: StoreUnavailableError) -> StoreUnavailableError:
    """Which of an outage's errors to raise when riding it out has ended: the last, unless
    it only says that no answer came in time (a try cut short by the deadline) where the
    first, asked with a whole request's time, said more (a lost quorum, a refused
    connection)."""
    if _NO_ANSWER in last.why and _NO_ANSWER not in first.why:
        return first
    return last


def through_outage(attempt: Callable[[], _T], ttl: float, deadline: float | None) -> _T:
    """``attempt()``, asked again every `_RETRY_PAUSE` while etcd cannot be reached: a
    restart shorter than a holder's lease (``ttl``) keeps the holder, and so the answer.
    After ``ttl`` of trying, or past ``deadline``, the last `StoreUnavailableError`
    stands, or the first where the last was cut short by the deadline (`_telling`)."""
    start = time.monotonic()
    first: StoreUnavailableError | None = None
    while True:
        try:
            return attempt()
        except StoreUnavailableError as e:
            now = time.monotonic()
            if e.fix is not None:  # an error that names its own fix (authentication on)
                raise  # is no outage to wait out
            first = first or e
            if now - start >= ttl or (deadline is not None and now >= deadline):
                told = _telling(first, e)
                if told is e:
                    raise
                raise told from None
            pause = _RETRY_PAUSE if deadline is None else min(_RETRY_PAUSE, deadline - now)
            time.sleep(max(pause, 0.0))


_clusters: dict[tuple[object, ...], _Cluster] = {}
"""By endpoints, TTL and TLS settings (what of the URL but its prefix and root)."""
_clusters_lock = threading.Lock()


def cluster(url: EtcdURL) -> _Cluster:
    key = (url.endpoints, url.ttl, url.tls, url.ca, url.cert, url.key)
    with _clusters_lock:
        found = _clusters.get(key)
        if found is None:
            _require_client(url)
            found = _clusters[key] = _Cluster(url)
        return found


def _require_client(url: EtcdURL) -> None:
    """`StoreUnavailableError` saying which extra to install where the etcd client
    (etcd3gw, and requests under it) is not installed."""
    import importlib.util

    missing = [name for name in ("etcd3gw", "requests") if importlib.util.find_spec(name) is None]
    if missing:
        raise StoreUnavailableError(
            url.text, f"its client, {' and '.join(missing)}, is not installed",
            "install fencelock with the etcd extra: pip install '.[etcd]' in its "
            "checkout (pip install 'fencelock[etcd]' where it comes from a package index)")


def _after_fork_in_child() -> None:
    # A child has neither the parent's lease keeper nor a right to its lease, and no
    # use for the parent's connections.
    global _clusters_lock, _retired, _retired_wake, _retirer, _retirer_mu, _stopping
    # Its copies of the sockets of watches the parent is about to stop: closed, not shut
    # down (that would end the parent's connections), and the watches kept, not freed
    # (freeing one runs its stream's clean-up, which may take a lock a parent's thread
    # held at the fork).
    if _stopping is not None:
        _retired.appendleft(_stopping)
    for watch in list(_retired):
        watch.close_inherited()
    _inherited.append(_retired)
    _retired, _retired_wake, _retirer, _stopping = \
        collections.deque(), threading.Event(), None, None
    _retirer_mu = threading.Lock()
    # Nothing is imported here (the parent may have held an import lock): a client was
    # made only once its module was.
    http = sys.modules.get("fencelock._etcdhttp")
    for found in _clusters.values():
        for clients in list(found._by_thread.values()):
            for client in clients:
                if http is not None:
                    http.close_inherited(client)
    _clusters.clear()
    _clusters_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _raw(kvs: list[dict[str, Any]]) -> bytes | None:
    """The value of the first key in ``kvs``, None when there is none."""
    return _unb64(kvs[0].get("value", "")) if kvs else None


def _decode(value: bytes | None, where: str, command: str | None = None) -> HolderInfo | None:
    """A record from a key's value (`_raw`): None for no key, or an empty value; a value
    of spaces or NULs is corrupt, as such a sidecar is (fencelock never writes one)."""
    if not value:
        return None
    try:
        return _record.decode(value)
    except ValueError as e:
        raise CorruptRecordError(where, str(e), command) from None


def _clear_command(url: EtcdURL, session: str) -> str:
    """The command that sets a corrupt last record in etcd aside."""
    return f"fencelock clear --force --backend {shell_word(url.text)} {shell_word(session)}"


def _decode_quietly(value: bytes | None, where: str) -> HolderInfo | None:
    try:
        return _decode(value, where)
    except CorruptRecordError:
        return None


class _Attempt(NamedTuple):
    """One acquire's terms, handed whole from each try to the next (`EtcdHolder.acquire`):
    fail fast or wait, until ``deadline`` or ``cancel``, writing ``record``'s first
    record; ``start`` is when the acquire began (what a contention error counts)."""

    fail: bool
    deadline: float | None
    cancel: threading.Event | None
    record: Callable[[int, HolderInfo | None], bytes] | None
    start: float


class EtcdHolder:
    """One session's holder in etcd (a `fencelock._store.HolderStore`)."""

    def __init__(self, url: EtcdURL, session: str) -> None:
        self.url = url
        self.session = session
        # The cluster, the prefix and the root: what names its keys (a NUL is in no path).
        self.space = f"\0{url.connection_text}\0{url.prefix}\0{url.root or ''}\0"
        self.rekey()

    def rekey(self) -> None:
        """Take the session's key (`_backend.session_key`) as it is now: an acquire does,
        while it holds nothing, for a lock object made before its sessions directory
        was made, or before a filesystem was mounted on or above it."""
        url = self.url
        self.key = _backend.session_key(self.session, url.root)
        self.lock_name = f"{url.prefix}/sessions/{self.key}"
        self.last_key = f"{url.prefix}/last/{self.key}"
        self.name = f"{url.display}/{self.lock_name}"
        self.last_name = f"{url.display}/{self.last_key}"
        self._lease: _Lease | None = None
        self._trying: _Lease | None = None
        """The lease the acquire under way queued (or tries to queue) its key under."""
        self._my_key = ""
        self._token = 0
        self._suffix = b""
        self.record_extra: dict[str, Any] | None = None
        """The fields `_value` adds to the run's record, as the `HolderInfo` shows them."""
        self._lost = ""
        """Why this holder is lost though its lease may not be (its key was deleted)."""
        self._told = False
        """The caller has been told this holder is lost (a `HolderLostError` raised)."""
        self._before: bytes | None = None
        """The session's last record (as stored) before this holder's first one."""
        self._wrote: bytes | None = None
        """What this holder last put (or tried to put) as the session's last record,
        since it queued; None while it has written nothing there."""

    @property
    def _cluster(self) -> _Cluster:
        # Looked up on each use, not kept: a holder made before a fork must use the
        # child's own cluster (its own lease and connections), never the parent's.
        return cluster(self.url)

    @property
    def lease_id(self) -> int | None:
        """The lease the holder's key lives under, while it holds or waits."""
        return self._lease.id if self._my_key and self._lease is not None else None

    @property
    def run_key(self) -> str:
        """The holder's key in the session's queue (empty while it has none)."""
        return self._my_key

    # -- acquire -----------------------------------------------------------------

    def acquire(
        self,
        fail: bool,
        deadline: float | None,
        cancel: threading.Event | None,
        record: Callable[[int, HolderInfo | None], bytes] | None,
        start: float | None = None,
    ) -> int:
        attempt = _Attempt(fail, deadline, cancel, record,
                           time.monotonic() if start is None else start)
        self._trying = None
        try:
            return self._acquire(attempt)
        except StoreUnavailableError as e:
            if self._trying is not None:
                return self._after_lapse(e, attempt)
            if fail or e.fix is not None:
                raise  # a fail-fast acquire says so at once, as does a setting to fix
            first = failed = e
        # etcd away from the first request (restarting, say): ridden out as `wait` and
        # `recover` ride it out (`through_outage`), for up to the TTL and not past the
        # deadline, until a try gets a lease; what follows is the queue's own rules.
        until = time.monotonic() + self.url.ttl
        if deadline is not None:
            until = min(until, deadline)
        while True:
            _pause_to_retry(cancel, until)
            if time.monotonic() >= until:
                raise _telling(first, failed)
            self._trying = None
            try:
                return self._acquire(attempt)
            except StoreUnavailableError as e:
                if self._trying is not None:
                    return self._after_lapse(e, attempt)
                if e.fix is not None:
                    raise
                failed = e

    def _after_lapse(self, e: StoreUnavailableError, attempt: _Attempt) -> int:
        """An acquire whose try under a lease (``_trying``) failed with ``e``: raised,
        unless the lease lapsed while it waited (this process was paused, or etcd was
        away, for longer than the TTL). Its key left the queue then, but nothing was
        held: it queues again under a new lease once etcd answers, a timed acquire until
        its deadline, one with none while etcd is away for up to one more TTL, and once
        more only if the new lease lapses too; a fail-fast acquire, once."""
        fail, deadline, cancel = attempt.fail, attempt.deadline, attempt.cancel
        if not self._lapsed(e, deadline):
            raise e  # the wait's own end
        until = deadline if deadline is not None else time.monotonic() + self.url.ttl
        while True:
            self._trying = None
            try:
                return self._acquire(attempt)
            except StoreUnavailableError as again:
                # No lease granted (etcd still away), or, for a timed acquire, one that
                # lapsed again: tried again. Not an error that names its own fix
                # (authentication on, etcd out of space): no outage to wait out.
                # (`_lapsed` first: it forgets a lease etcd lost, whatever follows.)
                retry = self._trying is None or (
                    self._lapsed(again, deadline) and deadline is not None)
                if not retry or fail or again.fix is not None or time.monotonic() >= until:
                    raise
                failed = again
            _pause_to_retry(cancel, until)
            if time.monotonic() >= until:
                raise failed  # no try begun past the caller's time

    def _lapsed(self, e: StoreUnavailableError, deadline: float | None) -> bool:
        """Whether the lease the failed request named (``_trying``) is gone or lapsed,
        so that nothing was held and the acquire may queue again under a new one (not
        past ``deadline``)."""
        lease = self._trying
        assert lease is not None
        if _LEASE_GONE in e.why:
            # The process's lease is gone before its keeper noticed (etcd restarted
            # without its data).
            self._cluster.forget(lease)
        elif not lease.lost:
            return False
        return deadline is None or time.monotonic() < deadline

    def _acquire(self, attempt: _Attempt) -> int:
        fail, deadline, cancel, record, start = attempt
        c = self._cluster
        lease = c.lease(deadline)
        self._trying = lease
        my = f"{self.lock_name}/{lease.id:x}"
        pfx = self.lock_name + "/"
        if not c.claim(my, fail, deadline, cancel):
            raise self._contended(self._owner_kvs(deadline),
                                  waited=None if fail else time.monotonic() - start)
        self._lease, self._my_key, self._token, self._lost = lease, my, 0, ""
        self._told = False
        self._before = self._wrote = None
        self._suffix = f',"lease":"{lease.id:x}","store":"etcd"}}'.encode()
        self.record_extra = {"lease": f"{lease.id:x}", "store": "etcd"}
        try:
            r = self._queue(my, lease, pfx, deadline)
        except BaseException:
            # Unanswered is not undone: etcd may have queued the key, under a lease this
            # process keeps alive. Take it out (or give the lease up).
            self._abandon()
            raise
        responses = r.get("responses", [])
        revision = int(r["header"]["revision"])
        self._token = revision
        try:
            owner = _kvs(responses[1])
            if owner and int(owner[0]["create_revision"]) == revision:
                if record is not None:
                    self._before = _raw(_kvs(responses[2]))
                    self._write_first(record(revision, self._last_checked(_kvs(responses[2]))))
                return revision
            if fail:
                raise self._contended(owner)
            self._wait_for_turn(revision, attempt)
            return revision
        except BaseException:
            self._abandon()
            raise

    def _queue(self, my: str, lease: _Lease, pfx: str, deadline: float | None
               ) -> dict[str, Any]:
        """Put our key ``my`` in the session's queue; the answer also gives the queue's
        first key and the last record.

        A key ``my`` there already (this process lets one holder at a time claim it) was
        left by etcd's past: brought back with the lease by a snapshot restore, or put
        by an earlier try of this request whose answer was lost. Its revision is no
        token to give out now (others may have been given higher ones since): it is
        deleted, and the key queued anew."""
        c = self._cluster
        for _ in range(_QUEUE_TRIES):
            r = c.txn(
                [_created(my, 0)],
                [_put(my, b"", lease.id), _range(pfx, prefix=True, first=True),
                 _range(self.last_key)],
                [_range(my)],
                deadline,
            )
            if r.get("succeeded"):
                return r
            found = _kvs(r.get("responses", [{}])[0])
            if found:
                c.txn([_created(my, int(found[0]["create_revision"]))], [_delete(my)], [],
                      deadline)
        raise StoreUnavailableError(self.url.display,
                                    f"a key of this process's lease, {my}, came back each "
                                    f"time it was deleted")

    def _write_first(self, record: bytes) -> None:
        """Write the run's first record. The caller does not hold the session yet: a
        lease that may have expired meanwhile (etcd away, or this process paused) is an
        acquire that failed, which may be tried again, not a holder lost."""
        try:
            self.write(record)
        except HolderLostError as e:
            raise StoreUnavailableError(self.url.display,
                                        f"{e.why} before the session was taken") from None

    def _last(self, kvs: list[dict[str, Any]]) -> HolderInfo | None:
        """The record in the first of ``kvs`` (None for none, or an unreadable one)."""
        return _decode_quietly(_raw(kvs), self.name)

    def _last_checked(self, kvs: list[dict[str, Any]]) -> HolderInfo | None:
        """The last record, or `CorruptRecordError`: as with a sidecar, a run does not
        write over a record nobody could read (``clear --force`` sets it aside)."""
        return _decode(_raw(kvs), self.last_name, _clear_command(self.url, self.session))

    def _wait_for_turn(self, revision: int, attempt: _Attempt) -> None:
        """Wait until no key older than ours is left, then write the first record.

        When the key ahead goes, one transaction both checks that no older key is left
        and writes the record: a hand-off costs one round trip after the watch event.
        """
        _, deadline, cancel, record, start = attempt
        c = self._cluster
        pfx = self.lock_name + "/"
        recheck = min(c.ttl / 3, _RECHECK_MAX)
        look = [_range(pfx, prefix=True, last=True, max_create=revision - 1),
                _range(self._my_key), _range(self.last_key)]
        r = c.txn([], look, [], deadline)
        while True:
            responses = r.get("responses", [])
            if not _kvs(responses[1]):
                assert self._lease is not None
                if self._key_gone_with_lease(self._lease):
                    raise StoreUnavailableError(self.url.display,
                                                "the lease expired while waiting")
                raise StoreUnavailableError(self.url.display,
                                            "its key was deleted while it waited")
            ahead = _kvs(responses[0])
            if not ahead:
                if record is not None:
                    self._write_first(record(revision, self._last_checked(_kvs(responses[2]))))
                return
            try:
                watch = self._watch_for_deletion(ahead[0], int(r["header"]["revision"]),
                                                 deadline, cancel, inline=cancel is None)
            except StoreUnavailableError as e:
                r = self._look_again(look, deadline, start, cancel, failed=e)
                continue
            retired = False
            try:
                watched = time.monotonic()
                while True:
                    now = time.monotonic()
                    if cancel is not None and cancel.is_set():
                        import asyncio

                        raise asyncio.CancelledError()
                    if watch.deleted:
                        break  # seen, perhaps just as the time ran out: take the turn
                    if deadline is not None and now >= deadline:
                        raise self._contended(self._owner_kvs(deadline),
                                              waited=now - start)
                    if now - watched >= recheck:
                        break  # look again: a watch may not survive an etcd restart
                    step = recheck - (now - watched)
                    if deadline is not None:
                        step = min(step, deadline - now)
                    if cancel is not None:
                        step = min(step, _CANCEL_STEP)
                    if watch.wait(max(step, 0.0)):
                        break
                assert self._lease is not None
                if not self._lease.alive():
                    raise StoreUnavailableError(self.url.display, self._lease.lost)
                if not watch.deleted or record is None:
                    r = self._look_again(look, deadline, start, cancel)
                    continue
                # Ours if every key left is no older than ours: check and write at once
                # (before closing the watch, which costs a moment).
                value = self._value(record(revision, None))
                self._before, self._wrote = _raw(_kvs(responses[2])), value
                encoded = _Encoded(_b64(value))
                r = c.txn(
                    [_created(self._my_key, revision),
                     {**_created(pfx, revision - 1), "range_end": _b64(_prefix_end(pfx)),
                      "result": "GREATER"}],
                    [_range(self.last_key), _put(self._my_key, encoded, self._lease.id),
                     _put(self.last_key, encoded)],
                    # Not cut short by the caller's deadline: a transaction that
                    # timed out might still have made us the owner, unknown to us.
                    look,
                )
                if r.get("succeeded"):
                    kvs = _kvs(r.get("responses", [{}])[0])
                    self._before = _raw(kvs)
                    retired = _retire(watch)
                    # Usually a release just wrote it: its head says so, no need to parse.
                    quick = _record.peek(self._before) if self._before else None
                    if quick is None or quick[0] is State.HELD:
                        # A corrupt one raises, and the caller's undo puts it back.
                        old = self._last_checked(kvs)
                        if old is not None and old.state is State.HELD:
                            self._write_first(record(revision, old))  # took over a stale run
                            return
                    if quick is None or quick[1] != int(ahead[0]["create_revision"]):
                        # The last release is not that of the key this waiter watched
                        # (a waiter ahead gave up, or an etcdctl lock went): an older
                        # holder may have written the session after the fingerprint
                        # was taken, before its release. Take it again, now.
                        self._write_first(record(revision, None))
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    # Not this waiter's turn after all (an older key is left): only a
                    # turn taken may outlast the deadline.
                    raise self._contended(self._owner_kvs(deadline), waited=now - start)
            finally:
                if not retired:
                    watch.stop()

    def _watch_for_deletion(self, seen: dict[str, Any], looked_at: int,
                            deadline: float | None, cancel: threading.Event | None,
                            inline: bool) -> _Watch:
        """A watch for the deletion of the key ``seen``, found by a look at revision
        ``looked_at`` (``inline``: read by the waiting thread, see `_Watch`).

        A watch begins at the store's current revision: if anything was written since
        the look, that key may have gone before the watch began, which would then never
        see it. So it looks at the key once more, and `fire`s the watch if it went."""
        watch = self._cluster.watch(_key_text(seen), deadline, inline)
        # Not once the caller gave up (no request that would outlast it); but near the
        # deadline too: a key ahead that went unseen would have the wait report the
        # session as held when it was this waiter's turn.
        if watch.revision <= looked_at or (cancel is not None and cancel.is_set()):
            return watch
        try:
            r = self._cluster.txn([], [_range(_key_text(seen))], [], deadline)
        except StoreUnavailableError:
            return watch  # the watch's own checks remain
        except BaseException:
            watch.stop()
            raise
        now = _kvs(r.get("responses", [{}])[0])
        if not now or now[0].get("create_revision") != seen.get("create_revision"):
            watch.fire()
        return watch

    def _look_again(self, look: list[dict[str, Any]], deadline: float | None, start: float,
                    cancel: threading.Event | None,
                    failed: StoreUnavailableError | None = None) -> dict[str, Any]:
        """The waiter's look at the queue, tried again while etcd cannot be reached but
        the waiter's lease may still be alive (``failed``: how the last try failed).
        A restarted etcd restores leases and keys, so a waiter rides out a restart as a
        holder does; past its deadline the wait ran out, and once its lease may have
        expired etcd counts as unavailable."""
        while True:
            if failed is None:
                try:
                    return self._cluster.txn([], look, [], deadline)
                except StoreUnavailableError as e:
                    failed = e
            self._ran_out(deadline, start, failed)
            failed = None
            assert self._lease is not None
            if not self._lease.alive():
                raise StoreUnavailableError(self.url.display, self._lease.lost)
            if cancel is not None and cancel.is_set():
                import asyncio

                raise asyncio.CancelledError()
            pause = _RETRY_PAUSE
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)

    def _ran_out(self, deadline: float | None, start: float,
                 failed: StoreUnavailableError) -> None:
        """A request cut short by the caller's deadline (it ``failed``): the wait ran out,
        which is `SessionContendedError`, not etcd failing, unless the one etcd endpoint
        did not answer at all: then that is what is known (the owner's record, asked for
        the message, would wait as long again; with several endpoints, the next may)."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            if _NO_ANSWER in failed.why and len(self.url.endpoints) == 1:
                raise failed from None
            raise self._contended(self._owner_kvs(deadline), waited=now - start) from None

    def _contended(self, owner: list[dict[str, Any]], waited: float | None = None
                   ) -> SessionContendedError:
        """The session is held: by the run of the owner key (the first of ``owner``), or,
        when its record is released, by what that `fencelock run`'s command left running
        (its keeper keeps the key); or, with no record, by the key (`_recordless`)."""
        record = self._last(owner)
        if record is not None and record.state is State.RELEASED:
            return SessionContendedError(self.session, None, waited=waited,
                                         backend=self.url.text, last=record)
        held_by = _recordless(owner, self.url.etcdctl) if owner and record is None else None
        return SessionContendedError(self.session, record, waited=waited,
                                     backend=self.url.text, held_by=held_by)

    def _owner_kvs(self, deadline: float | None) -> list[dict[str, Any]]:
        """The owner key (with its record), for the message of a wait that ran out: a
        request like any near the caller's deadline (bounded by the minimum past it).
        When etcd does not answer it, `StoreUnavailableError`: that, not a holder, is
        what is known."""
        r = self._cluster.call("/kv/range", _range(self.lock_name + "/", prefix=True,
                                                   first=True)["request_range"], deadline)
        kvs: list[dict[str, Any]] = r.get("kvs", [])
        return kvs

    def _abandon(self) -> None:
        """Take our key out of the queue (a failed or given-up acquire). A first record
        that may have been written is taken back too: the session's last record is again
        what it was before (unless someone wrote another since), as if this acquire had
        never happened; otherwise the session would read as stale, its run never ran."""
        my, lease, token = self._my_key, self._lease, self._token
        before, wrote = self._before, self._wrote
        self._my_key, self._token, self._before, self._wrote = "", 0, None, None
        if not my or lease is None:
            return
        c = self._cluster
        last_key = self.last_key  # this run's: a later acquire may take the key anew

        def take_back() -> None:
            # One request's time in all, the check for a lost quorum that follows an
            # unanswered request included (a caller whose wait ran out waits for this).
            deadline = time.monotonic() + _REQUEST_TIMEOUT
            if wrote is not None and token:
                undo = _put(last_key, before) if before is not None else _delete(last_key)
                r = c.txn([_created(my, token), _holds(last_key, wrote)],
                          [undo, _delete(my)], None, deadline)
                if r.get("succeeded"):
                    return
            c.txn([], [_delete(my)], None, deadline)

        try:
            take_back()
        except StoreUnavailableError:
            # etcd is away (a restart, say): take the key out once it answers, keeping
            # it claimed until then. Revoking the lease would lose this process's other
            # holders, which ride out a restart shorter than their lease.
            c.take_back_later(lease, my, take_back)
            return
        except BaseException:
            c.unclaim(my)
            raise
        c.unclaim(my)

    # -- while held --------------------------------------------------------------

    def check(self) -> None:
        lease = self._lease
        if not self._my_key or lease is None:
            raise NotHeldError(f"{self.session}: this SessionLock does not hold the session")
        if self._lost or not lease.alive():
            self._told = True  # the caller has heard of the loss
            raise HolderLostError(self.session, self._lost or lease.lost)

    def lease_left(self, deadline: float | None) -> float | None:
        """The whole seconds etcd says this holder's lease has left (0: its last second),
        asked of etcd rather than counted (this process's clock cannot tell a pause from
        an expiry); None when the lease or the holder's key is gone.
        `StoreUnavailableError` without an answer."""
        lease = self._lease
        if not self._my_key or lease is None or self._lost:
            return None
        return lease_left(self._cluster, lease.id, self._my_key, deadline)

    def lost_within(self, timeout: float) -> str:
        """Why this holder counts itself lost, as soon as it does within ``timeout``
        seconds; empty if it does not. Woken when its lease is found lost, and when the
        time the lease is known to live runs out (no request needed for that)."""
        lease = self._lease
        if not self._my_key or lease is None:
            return ""
        end = time.monotonic() + timeout
        while not (self._lost or not lease.alive()):
            left = end - time.monotonic()
            if left <= 0:
                return ""
            margin = lease.confirmed_until - lease.safety() - _lease_clock()
            lease.gone.wait(min(left, max(margin, 0.0) + 0.001))
        return self._lost or lease.lost

    def _key_gone_with_lease(self, lease: _Lease) -> bool:
        """Our key is gone: whether the lease went with it (then every holder of this
        process is lost), or only the key was deleted (by hand, say), and only this
        holder is. When etcd cannot say, the lease counts as gone."""
        try:
            r = self._cluster.call("/kv/lease/timetolive", {"ID": lease.id})
            # The last second counts as gone too (it may be expired, not yet revoked):
            # our key is gone already, and a lease kept in error would keep holders
            # counting on it; one lost in error costs a new acquire.
            gone = _seconds_left(r) <= 0
        except StoreUnavailableError:
            gone = True
        if gone:
            lease.lost = lease.lost or "its etcd lease expired"
        return gone

    def _value(self, record: bytes) -> bytes:
        """The record as stored: with the holder's lease and the store's name."""
        return record[:-1] + self._suffix if record.endswith(b"}") else record

    def _ride_out(self, lease: _Lease, attempt: Callable[[], _T]) -> _T:
        """``attempt()``, asked again while etcd cannot be reached but ``lease`` may still
        be alive: a holder rides out an etcd restart shorter than its lease, in every
        request it makes, as its keeper does. Once the lease may have expired, the last
        `StoreUnavailableError` stands."""
        start = time.monotonic()
        while True:
            try:
                return attempt()
            except StoreUnavailableError as e:
                # Not an error that names its fix (etcd out of space, authentication),
                # nor past the lease's time to live: an etcd that keeps the lease alive
                # but refuses every write would hold the caller for good.
                if e.fix is not None or not lease.alive() or \
                        time.monotonic() - start >= lease.ttl:
                    raise
                left = lease.confirmed_until - lease.safety() - _lease_clock()
                time.sleep(max(0.0, min(_RETRY_PAUSE, left)))

    def write(self, record: bytes, *, ride_out: bool = True) -> None:
        self.check()
        lease = self._lease
        assert lease is not None
        value = self._wrote = self._value(record)
        encoded = _Encoded(_b64(value))
        # Not riding out: one short request (an append's record update must not hold
        # the append up for a whole request timeout while etcd hangs).
        deadline = None if ride_out else time.monotonic() + _MIN_REQUEST_TIMEOUT

        def put() -> dict[str, Any]:
            return self._cluster.txn(
                [_created(self._my_key, self._token)],
                [_put(self._my_key, encoded, lease.id), _put(self.last_key, encoded)],
                deadline=deadline,
            )

        try:
            r = self._ride_out(lease, put) if ride_out else put()
        except StoreUnavailableError:
            # etcd was away past the lease, or this process was paused past it with
            # the request under way: the holder is lost, not only the store away.
            if not lease.alive():
                raise HolderLostError(self.session, lease.lost) from None
            raise
        if not r.get("succeeded"):
            self._lost = "its key in etcd is gone"
            self._key_gone_with_lease(lease)
            self._told = True
            raise HolderLostError(self.session, self._lost)

    def holding(self) -> bool:
        return bool(self._my_key)

    def release(self, record: bytes | None) -> None:
        if record is None:  # never delivered (a failed or cancelled acquire): undo it
            self._abandon()
            return
        my, lease, token = self._my_key, self._lease, self._token
        self._my_key, self._token, self._before, self._wrote = "", 0, None, None
        if not my or lease is None:
            return
        value = self._value(record)
        ops = [_put(self.last_key, value), _delete(my)]
        queued = False
        try:
            # On a failed compare, the last record: a retried release finds its own there.
            r = self._ride_out(lease, lambda: self._cluster.txn(
                [_created(my, token)], ops, [_range(self.last_key)]))
        except StoreUnavailableError as e:
            # The key must not stay behind under a lease this process keeps alive.
            self._cluster.drop(lease, "a release could not be stored")
            raise StoreUnavailableError(
                e.endpoint, f"{e.why}; the release was not stored",
                f"once its lease ends the session reads as stale, and the next run takes "
                f"it over (or clear it now: "
                f"{_clear_command(self.url, self.session).replace(' --force', '')})",
            ) from None
        except BaseException:
            # An interrupt (KeyboardInterrupt, a signal handler's exception): the key
            # would stay under a lease this process keeps alive, the session held by
            # nobody. The lease's keeper makes the release (it keeps the key claimed).
            c = self._cluster

            def release_later() -> None:
                c.txn([_created(my, token)], ops)

            c.take_back_later(lease, my, release_later)
            queued = True
            raise
        finally:
            if not queued:
                self._cluster.unclaim(my)
        # A failed compare: our key was gone. Not a loss to report when the caller heard
        # of it already, when the last record is the one this release wrote (an earlier
        # try of it that etcd applied), or when the lease lives (an earlier try deleted
        # the key, and a waiter has written since; or a hand deleted it).
        if not r.get("succeeded") and not self._told and not _holds_value(r, value) \
                and self._key_gone_with_lease(lease):
            raise HolderLostError(
                self.session, "its key in etcd was gone at release: its lease ended while "
                "it held the session")

    # -- from outside ------------------------------------------------------------

    def wait_free(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        c = self._cluster
        while True:
            # Rides out a restart as waiting runs do (see `through_outage`).
            watch = through_outage(lambda: self._watch_holder(deadline), c.ttl, deadline)
            if watch is None:
                return True
            gone = watch.wake
            try:
                remaining = c.ttl / 3
                if deadline is not None:
                    remaining = min(remaining, deadline - time.monotonic())
                gone.wait(max(remaining, 0.0))
                if not gone.is_set() and deadline is not None and time.monotonic() >= deadline:
                    return False
            finally:
                watch.stop()

    def _watch_holder(self, deadline: float | None) -> _Watch | None:
        """A watch for the deletion of the newest key in the queue; None when empty."""
        r = self._cluster.txn([], [_range(self.lock_name + "/", prefix=True, last=True)], [],
                              deadline)
        kvs = _kvs(r.get("responses", [{}])[0])
        if not kvs:
            return None
        return self._watch_for_deletion(kvs[0], int(r["header"]["revision"]), deadline, None,
                                        inline=False)

    def owner_lease_left(self, deadline: float | None = None) -> tuple[float | None, int]:
        """The seconds the lease of the session's owner key has left (as etcd counts
        them, whole seconds), None when no key owns the session or its lease is gone;
        and etcd's raft term (a restart begins a new one, and gives every lease its
        whole TTL again)."""
        r = self._cluster.txn([], [_range(self.lock_name + "/", prefix=True, first=True)], [],
                              deadline)
        term = int(r.get("header", {}).get("raft_term", 0))
        kvs = _kvs(r.get("responses", [{}])[0])
        lease = kvs[0].get("lease") if kvs else None
        if not lease:
            return None, term
        left = _seconds_left(self._cluster.call("/kv/lease/timetolive", {"ID": int(lease)},
                                                deadline))
        return (None if left < 0 else float(left)), term

    def probe(self, stuck_after: float, deadline: float | None = None) -> HolderStatus:
        def look() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
            r = self._cluster.txn([], [_range(self.lock_name + "/", prefix=True, first=True),
                                       _range(self.last_key)], [], deadline)
            responses = r.get("responses", [{}, {}])
            return _kvs(responses[0]), _kvs(responses[1]), max(0, _count(responses[0]) - 1)

        def reread() -> HolderInfo | None:
            """The record read again, where the first look found it (`_probe._fence_ok`)."""
            again, last_again, _ = look()
            try:
                if owner:
                    return _decode(_raw(again), self.name) if again else None
                return _decode(_raw(last_again), self.last_name) if last_again else None
            except CorruptRecordError:
                return None

        owner, last, waiters = look()
        return _status(self.session, self.name, owner=owner, last=last, waiters=waiters,
                       stuck_after=stuck_after, last_where=self.last_name,
                       command=_clear_command(self.url, self.session),
                       etcdctl=self.url.etcdctl, reread=reread)

    def clear(self, remove: bool, force: bool) -> HolderStatus:
        from fencelock._probe import ProbeState

        found = self.probe(0.0)
        if found.state is ProbeState.LIVE:
            raise found._contended(backend=self.url.text)
        if found.state is ProbeState.FREE and (not remove or found.record is None):
            return found  # nothing to clear, or (no record) nothing to remove
        self.acquire(True, time.monotonic() + _REQUEST_TIMEOUT * 2, None, None)
        my, token = self._my_key, self._token
        aside = None
        try:
            r = self._cluster.txn([], [_range(self.last_key)], [])
            kvs = _kvs(r.get("responses", [{}])[0])
            value = _raw(kvs) or b""
            ops = [_delete(my)]
            fix = _clear_command(self.url, self.session)
            try:
                old = _decode(value, self.last_name, fix)
            except CorruptRecordError:
                if not force:
                    raise  # kept as it is; the lock is given back below
                old = None
            again = None  # a stale record marked released
            moved = "corrupt record"
            if old is not None and old.state is State.HELD:
                again = _record.released_again(old)
                if again is None:  # too large to mark released: kept (also by --remove,
                    # as the sidecar store keeps it), or set aside with --force
                    if not force:  # set aside as a corrupt one is
                        raise RecordTooLargeError(self.last_name, fix, found)
                    old, moved = None, _record.TOO_LARGE
            if old is None and value:  # corrupt, or too large to mark released
                # Set aside, never deleted: a key nobody can guess, created only if new.
                aside = (f"{self.url.prefix}/corrupt/{self.key}/"
                         f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(8).hex()}")
                ops[:0] = [_put(aside, value), _delete(self.last_key)]
            if aside is None and remove:
                ops.insert(0, _delete(self.last_key))
            elif again is not None:
                ops.insert(0, _put(self.last_key, again[0]))
            compare = [_created(my, token)]
            if aside is not None:
                compare.append(_created(aside, 0))
            r = self._cluster.txn(compare, ops, [_delete(my)])
        except BaseException:
            # The key must not stay queued under a lease this process keeps alive.
            self._abandon()
            raise
        self._cluster.unclaim(my)
        self._my_key, self._token = "", 0
        if aside is not None:
            if not r.get("succeeded"):  # the lock is ours, so the new name was taken
                raise CorruptRecordError(self.last_name, "its set-aside name was taken; "
                                         "try again", fix)
            where = f"{self.url.display}/{aside}"
            return replace(found, reason=f"{moved} moved to {where}", set_aside=where)
        what = "removed" if remove else "cleared"
        return replace(found, reason=f"{what} (was: {found.reason})" if found.reason else what,
                       removed=remove)


def _owner_of(owner: list[dict[str, Any]]) -> str:
    """The owner key's name and create revision: one acquisition's, whatever its value."""
    return f"{owner[0].get('key', '')}@{owner[0].get('create_revision', '')}"


def _recordless(owner: list[dict[str, Any]], etcdctl: str) -> str:
    """Who holds a session whose owner key holds no fencelock record, in words."""
    if owner[0].get("lease"):  # (etcd's JSON leaves out a lease of 0)
        return _WITHOUT_RECORD
    key = _key_text(owner[0])
    return (f"the key {key}, which has no lease and never expires (put by hand, or by a "
            f"client that takes no lease); if no client holds it, delete it: {etcdctl} del "
            f"{shell_word(key)}")


def _status(session: str, where: str, *, owner: list[dict[str, Any]],
            last: list[dict[str, Any]], waiters: int, stuck_after: float,
            last_where: str, command: str, etcdctl: str, fence: bool = True,
            reread: Callable[[], HolderInfo | None] | None = None) -> HolderStatus:
    """A session's state from its owner key (the first in the queue, if any) and its
    last record; ``fence``: whether ``session`` is its file on this host, and
    ``reread`` (see `fencelock._probe._status`)."""
    from fencelock import _probe
    from fencelock._probe import HolderStatus as holder_status
    from fencelock._probe import ProbeState as states

    now = time.time()
    try:
        if owner:
            # The owner key alone makes the session live: a value that is no fencelock
            # record (empty, or another client's) is a holder without a record.
            try:
                record = _decode(_raw(owner), where)
            except CorruptRecordError:
                record = None
            if record is None:
                who = _recordless(owner, etcdctl)
                status: HolderStatus = holder_status(
                    session, where, states.LIVE, reason="held by " + who, _held_by=who,
                    _owner=_owner_of(owner))
            elif record.state is State.RELEASED:
                # Only `fencelock run` leaves a released record in a live owner key: its
                # keeper keeps the key for what the command left running.
                status = holder_status(session, where, states.LIVE, record=record,
                                       reason="held by " + describe_leftovers(record),
                                       left_by_run=True, _owner=_owner_of(owner))
            else:
                status = replace(_probe._status(session, where, states.LIVE, record,
                                                stuck_after=stuck_after, now=now, fence=fence,
                                                reread=reread),
                                 _owner=_owner_of(owner))
        else:
            record = _decode(_raw(last), last_where, command)
            if record is None:
                status = holder_status(session, where, states.FREE, reason="no record")
            else:
                state = states.STALE if record.state is State.HELD else states.FREE
                status = _probe._status(session, where, state, record,
                                        stuck_after=stuck_after, now=now, fence=fence,
                                        reread=reread)
                if state is states.STALE:
                    status = replace(status, reason="no owner key: its lease expired while it "
                                     "held the session (the owner died, was paused or lost "
                                     "etcd)")
    except CorruptRecordError as e:
        return holder_status(session, where, states.UNREADABLE, reason=str(e))
    return replace(status, waiters=waiters)


def _local_path(url: EtcdURL, key: str, record: HolderInfo | None) -> str | None:
    """The path on this host of the session stored under ``key``: under the URL's
    ``root``; else the record's own path when it names that key here too (a host that
    mounts the share elsewhere wrote another); None when not known."""
    if url.root is not None:
        return os.path.join(os.path.realpath(url.root), key)
    if record is None:
        return None
    try:
        here = _backend.session_key(record.session, None) == key
    except (OSError, FenceLockError):
        return None
    return record.session if here else None


_PAGE = 1000
"""Keys a listing asks etcd for at a time: every session ever held keeps its last
record, so a prefix may hold more than one answer should carry."""


def _paged(c: _Cluster, prefix: str, *, keys_only: bool = False
           ) -> Iterator[dict[str, Any]]:
    """Every key under ``prefix`` in key order, read `_PAGE` keys a request. Each page
    is read as it is then: a listing, not a snapshot."""
    start, end = _b64(prefix), _b64(_prefix_end(prefix))
    while True:
        request: dict[str, Any] = {"key": start, "range_end": end, "limit": _PAGE}
        if keys_only:
            request["keys_only"] = True
        r = c.call("/kv/range", request)
        kvs = r.get("kvs", [])
        yield from kvs
        if not kvs or not r.get("more"):
            return
        start = base64.b64encode(_unb64(kvs[-1]["key"]) + b"\0").decode("ascii")


def list_holders(url: EtcdURL, stuck_after: float) -> Iterator[HolderStatus]:
    """Every holder under the URL's prefix, in key order: each session with an owner
    (live), a last record that says held (stale) or one that cannot be read; not
    released ones. The last records are read a page at a time, and not kept."""
    c = cluster(url)
    sessions = f"{url.prefix}/sessions/"
    lasts = f"{url.prefix}/last/"
    queues: dict[bytes, list[dict[str, Any]]] = {}  # the queued keys: the runs under way
    skip = len(sessions.encode("utf-8", "surrogateescape"))
    for kv in _paged(c, sessions):
        key = _unb64(kv["key"])[skip:]
        queues.setdefault(key.rpartition(b"/")[0], []).append(kv)
    queued = sorted(queues)
    i = 0
    skip = len(lasts.encode("utf-8", "surrogateescape"))
    for kv in _paged(c, lasts):
        key = _unb64(kv["key"])[skip:]
        while i < len(queued) and queued[i] < key:
            yield from _listed(url, queued[i], queues[queued[i]], None, stuck_after)
            i += 1
        if i < len(queued) and queued[i] == key:
            i += 1
        yield from _listed(url, key, queues.get(key, []), kv, stuck_after)
    for key in queued[i:]:
        yield from _listed(url, key, queues[key], None, stuck_after)


def _listed(url: EtcdURL, name: bytes, queued: list[dict[str, Any]],
            last: dict[str, Any] | None, stuck_after: float) -> Iterator[HolderStatus]:
    """`list_holders`'s row of the session whose key is ``name``, unless released."""
    from fencelock._probe import ProbeState

    key = name.decode("utf-8", "surrogateescape")
    queue = sorted(queued, key=lambda kv: int(kv["create_revision"]))
    where = f"{url.display}/{url.prefix}/sessions/{key}"
    lst = [] if last is None else [last]
    record = _decode_quietly(_raw(lst), where)
    owner_record = _decode_quietly(_raw(queue), where)
    session = _local_path(url, key, owner_record or record)
    command = None
    if session is None:  # the path is known only relative to some host's mount point
        command = (f"{_clear_command(url, 'SESSION')}, SESSION being the session "
                   f"file whose path in its filesystem, from the filesystem's top, is {key}")
    status = _status(session or key, where, owner=queue[:1], last=lst,
                     waiters=max(0, len(queue) - 1), stuck_after=stuck_after,
                     last_where=f"{url.display}/{url.prefix}/last/{key}",
                     command=command or _clear_command(url, session or key),
                     etcdctl=url.etcdctl, fence=session is not None)
    if status.state is not ProbeState.FREE:  # a released run holds nothing
        yield status


def names_in(url: EtcdURL, directory: str) -> set[str]:
    """Names of the sessions in ``directory`` that etcd has a holder or record for."""
    try:
        base = _backend.session_key(os.path.join(directory, "x"), url.root)[:-1]
    except OutsideRootError:
        raise OutsideRootError(directory, url.root or "/") from None
    found = set()
    for kind in ("sessions", "last"):
        pfx = f"{url.prefix}/{kind}/{base}"
        for kv in _paged(cluster(url), pfx, keys_only=True):
            rest = _key_text(kv)[len(pfx):]
            name = rest.split("/", 1)[0] if kind == "sessions" else rest
            if rest.count("/") == (1 if kind == "sessions" else 0):
                found.add(name)
    return found


def server_ok(url: EtcdURL) -> None:
    """Raise `StoreUnavailableError` unless some endpoint answers."""
    cluster(url).call("/maintenance/status", {})


def record_json(record: HolderInfo) -> str:
    return json.dumps(record.to_json())
