"""One etcd cluster as fencelock's etcd store sees it: a client per thread for each of
its endpoints, each request sent to the first that answers, what their failures mean
(an outage to ride out, or a setting to fix), and the process's one lease, kept alive
by a thread of its own."""

from __future__ import annotations

import atexit
import contextlib
import functools
import html
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fencelock import _etcdwatch
from fencelock import _etcdwire as wire
from fencelock._errors import (
    FenceLockWarning,
    StoreUnavailableError,
    no_thread,
    warn_each_time,
)

if TYPE_CHECKING:
    from fencelock._etcdurl import EtcdURL

_QUICK_FAILURE = 0.1
"""An endpoint that failed faster than this (refused the connection) took none of the
caller's time: the next is asked even past the caller's deadline."""
MIN_REQUEST_TIMEOUT = 0.5
"""A request is always given this long, even past the caller's deadline: cut shorter, a
slow answer on a busy machine would read as an unreachable store (and leave unknown
whether the request took effect)."""
_TLS_PROBE_TIMEOUT = 1.0
"""How long the look at an endpoint that closed a request or a TLS handshake unanswered
may take (a TLS handshake, or a plain GET of etcd's version)."""
NO_ANSWER = "no answer in time"
"""An endpoint's reason when a request timed out (asked then whether it has a leader)."""
_NOT_ETCD = "answered, but not as etcd's v3 API does"
"""An endpoint's reason when it answered as some other server (`_not_etcd`)."""
_NO_HOST = "its host name did not resolve"
"""An endpoint's reason when its host name did not resolve (a typo, or DNS away)."""
_NAME_NOT_FOUND = ("NameResolutionError", "Failed to resolve", "Name or service not known",
                   "name resolution", "nodename nor servname", "getaddrinfo failed")
"""How the HTTP client's error says that a host name did not resolve (urllib3's own
words, and the system's on Linux, macOS and Windows)."""
_LEADER_PROBE_TIMEOUT = 0.5
"""How long the question whether a member that did not answer in time has a leader may
take."""
CANCEL_STEP = 0.05
_T = TypeVar("_T")
RETRY_PAUSE = 0.2
"""How long a waiter that cannot reach etcd pauses before it looks again."""
_NO_SPACE = "database space exceeded"
"""etcd's answer to writes while its NOSPACE alarm is on ("mvcc: database space
exceeded"): no outage to wait out."""


if hasattr(time, "CLOCK_BOOTTIME"):
    def lease_clock() -> float:
        """Seconds on a clock that goes on counting while the host is suspended (etcd's
        lease runs out meanwhile): `time.monotonic` stops on Linux."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
else:
    lease_clock = time.monotonic


def margin(ttl: float) -> float:
    """How long before a lease may have expired its holder counts it lost: what a
    renewal's answer may take to arrive, and clocks may drift, within one TTL."""
    return min(1.0, ttl / 4)


class Lease:
    """This process's lease on one etcd cluster, and how long it is known to live."""

    def __init__(self, lease_id: int, ttl: float, confirmed_until: float) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.confirmed_until = confirmed_until
        """The `lease_clock` time before which etcd cannot have expired the lease."""
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
        if lease_clock() >= self.confirmed_until - self.safety():
            self.lost = ("its etcd lease could not be renewed in time: etcd did not answer, "
                         "or this process was paused or stalled past what its last renewal "
                         "vouched for (the lease's TTL less the time since, less a margin)")
            return False
        return True




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



class Cluster:
    """Clients for one cluster's endpoints (one per thread), and the process's lease."""

    def __init__(self, url: EtcdURL) -> None:
        self.url = url
        self.ttl = url.ttl
        self._local = threading.local()
        self._mu = threading.Lock()
        self._lease: Lease | None = None
        self._keeper: threading.Thread | None = None
        self._wake = threading.Event()
        self._preferred = 0
        self._tls_settings: Any = None
        self._tls_only: dict[int, bool] = {}
        """Endpoints (by index) asked whether they speak TLS only: asked once, so that an
        outage's repeated failures do not each pay a handshake."""
        self._to_revoke: list[int] = []
        self._to_take_back: list[tuple[Lease, str, Callable[[], None]]] = []
        """Queued keys a failed acquire could not take out while etcd was away: (lease,
        key, the requests that do it), retried by the lease's keeper."""
        self._claimed: set[str] = set()
        """Keys that holders of this process have queued (or hold) under the lease."""
        self._unclaimed = threading.Condition()
        self._by_thread: dict[threading.Thread, list[Any]] = {}
        self._by_thread_mu = threading.Lock()
        self._handed_over: set[int] = set()
        """Leases a `fencelock run` keeper process keeps alive past this process (not
        revoked at its exit: `revoke_at_exit`)."""

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
                    timeout=wire.REQUEST_TIMEOUT,
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
        detail = _page_text(detail, 200) or "no detail"
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
            timeout = wire.REQUEST_TIMEOUT
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
                timeout = max(MIN_REQUEST_TIMEOUT,
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
                    page = _page_text(answer, 120) or "an empty page"
                    why = (f"HTTP {_http_status(e, exceptions)} from a server other than etcd, "
                           f"which said: {page}")
                elif self.url.tls and "[SSL" in answer and "EOF" not in answer:
                    # A handshake answered, but failed: a setting to fix, raised unless
                    # another endpoint answers (as is a scheme that does not fit, below).
                    misfit = self._tls_failed(index, answer)
                    why = "TLS handshake failed"
                else:  # no answer: etcd3gw keeps requests' error in detail_text
                    why = ("connection refused" if "refused" in answer.lower() else
                           _NO_HOST if any(n in answer for n in _NAME_NOT_FOUND) else
                           NO_ANSWER if isinstance(e, exceptions.ConnectionTimeoutError)
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
                    page = _page_text(detail, 120) or "an empty page"
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
                else wire.misshapen(path, payload, result))
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
            if reason in (NO_ANSWER, "etcdserver: request timed out") and \
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

    def watch(self, key: str, deadline: float | None, inline: bool = False) -> _etcdwatch.Watch:
        """A watch for the deletion of ``key`` from now on (its `revision`), created
        within the request timeout (less when ``deadline`` is near); ``inline``: read by
        the waiting thread."""
        client = self._clients()[self._preferred]
        timeout = wire.REQUEST_TIMEOUT
        if deadline is not None:
            timeout = max(MIN_REQUEST_TIMEOUT, min(timeout, deadline - time.monotonic()))
        return _etcdwatch.Watch(client, key, timeout, self.url.display, inline)

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
                    remaining = min(remaining or CANCEL_STEP, CANCEL_STEP)
                self._unclaimed.wait(remaining)
            self._claimed.add(key)
            return True

    def unclaim(self, key: str) -> None:
        with self._unclaimed:
            self._claimed.discard(key)
            self._unclaimed.notify_all()

    # -- the lease ---------------------------------------------------------------

    def lease(self, deadline: float | None) -> Lease:
        """The process's live lease, granted now if there is none (or it was lost)."""
        lease = self._lease
        if lease is not None and lease.alive():
            return lease
        # Another thread may be granting one: wait for it no longer than a request of
        # our own would take (on a hung etcd, each waiter gives up at its deadline).
        wait = -1.0 if deadline is None else max(MIN_REQUEST_TIMEOUT,
                                                 deadline - time.monotonic())
        if not self._mu.acquire(timeout=wait):
            raise StoreUnavailableError(self.url.display, "no answer in time")
        try:
            lease = self._lease
            if lease is not None and lease.alive():
                return lease
            if lease is not None:
                self._to_revoke.append(lease.id)
            sent = lease_clock()
            ttl = max(1, math.ceil(self.ttl))
            result = self.call("/lease/grant", {"TTL": ttl, "ID": 0}, deadline)
            lease = Lease(int(result["ID"]), ttl, sent + int(result.get("TTL", ttl)))
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

    def hand_over(self, lease_id: int) -> None:
        """``lease_id`` is kept alive by another process from now on (`fencelock run`'s
        keeper): this one's exit leaves it."""
        self._handed_over.add(lease_id)

    def revoke_at_exit(self) -> None:
        """At this process's exit: revoke its lease, so that it does not linger in etcd
        for its TTL, and the sessions of any holder left held are free (stale) at once,
        as the kernel frees a sidecar's lock. A moment at most; not one handed over."""
        lease = self._lease
        if lease is None or lease.lost or lease.id in self._handed_over:
            return
        lease.lost = "this process is exiting"
        with contextlib.suppress(Exception):  # (etcd away: the TTL ends it)
            self.call("/kv/lease/revoke", {"ID": lease.id}, time.monotonic() + _EXIT_REVOKE)

    def forget(self, lease: Lease) -> None:
        """etcd does not know ``lease`` (it lost its data, say): the next `lease` call
        grants a new one."""
        lease.lost = lease.lost or "etcd no longer knows its lease"
        with self._mu:
            if self._lease is lease:
                self._lease = None

    def take_back_later(self, lease: Lease, key: str, take_back: Callable[[], None]) -> None:
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

    def drop(self, lease: Lease, why: str) -> None:
        """Give a lease up (a release that could not be stored): revoke it when possible,
        so that keys it carries do not outlive this process's interest in them."""
        lease.lost = lease.lost or why
        with self._mu:
            if self._lease is lease:
                self._lease = None
            self._to_revoke.append(lease.id)
        self._wake.set()

    def _sweep(self, lease: Lease, deadline: float) -> None:
        """Delete the keys under ``lease`` that no holder of this process has claimed:
        keys etcd brought back with the lease (a snapshot restore revives both), which
        would hold or queue for their sessions for as long as this process keeps the
        lease alive. Each is deleted only at the revision seen while it was unclaimed:
        a holder that claims it meanwhile puts it anew, at a later one. No request is
        begun past ``deadline``: the lease's next renewal must not wait for it."""
        answer = self.call("/kv/lease/timetolive", {"ID": lease.id, "keys": True}, deadline)
        for key in answer.get("keys") or []:
            name = wire.unb64(key).decode("utf-8", "surrogateescape")
            with self._unclaimed:
                if name in self._claimed:
                    continue
            if time.monotonic() >= deadline:
                return  # the rest next time
            found = wire.kvs(self.txn([], [wire.key_range(name)], [], deadline)["responses"][0])
            with self._unclaimed:
                if not found or name in self._claimed:
                    continue
            self.txn([wire.created(name, int(found[0]["create_revision"]))], [wire.delete(name)],
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
                    if LEASE_GONE in e.why:
                        continue  # gone already: nothing left to revoke
                    with self._mu:
                        self._to_revoke.append(lease_id)
            # A lease whose holder's clock already counts it lost (this process was
            # paused past it) is not renewed: the holder said lost stays lost, whichever
            # thread looks first once the process runs again.
            if lease is not None and lease.alive():
                sent = lease_clock()
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


LEASE_GONE = "requested lease not found"
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


def _page_text(text: str, limit: int) -> str:
    """What a server that is not etcd said, for one line of an error: an HTML page's text
    without its tags, on one line, cut at a word to about ``limit`` characters."""
    if re.search(r"<(html|body|head|!doctype)\b", text, re.IGNORECASE):
        text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>|<!--.*?-->", " ", text)
        title = re.search(r"(?is)<title\b[^>]*>(.*?)</title\s*>", text)
        if title is not None:
            # A page that heads its body with its title (Python's http.server: "Error
            # response" twice) says it once.
            body = text[title.end():]
            if _words(body).startswith(_words(title[1])):
                text = body
        text = html.unescape(re.sub(r"<[^>]*>", " ", text))
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut if cut > limit // 2 else limit] + " ..."


def _words(markup: str) -> str:
    """The words of a piece of an HTML page, on one line."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", markup)).split())


def _etcd_error(endpoint: str, detail: str) -> StoreUnavailableError:
    """The error for etcd's own error answer (JSON: ``error``, ``code``, ``message``):
    its message rather than the JSON, and for an etcd that wants credentials, what to
    do about it."""
    try:
        body = json.loads(detail)
        message = str(body.get("message") or body.get("error") or detail)
        code = body.get("code")
    except (ValueError, AttributeError):
        return StoreUnavailableError(endpoint, _page_text(detail, 200))
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


def seconds_left(answer: dict[str, Any]) -> int:
    """The whole seconds a lease has left by etcd's answer to ``/kv/lease/timetolive``
    (rounded toward zero), and -1 for a lease etcd has not. etcd's JSON leaves a TTL of
    0 out: under a second left (a renewal still saves it), or just expired and not yet
    revoked (its keys are still there, so nobody else holds what they hold)."""
    return int(answer.get("TTL", 0))


def lease_left(cluster: Cluster, lease_id: int, key: str,
               deadline: float | None) -> float | None:
    """The whole seconds etcd says lease ``lease_id`` has left (0: its last second); None
    when it or ``key`` under it is gone. `StoreUnavailableError` without an answer."""
    r = cluster.call("/kv/lease/timetolive", {"ID": lease_id, "keys": True}, deadline)
    ttl = seconds_left(r)
    return float(ttl) if ttl >= 0 and wire.b64(key) in r.get("keys", []) else None


def pause_to_retry(cancel: threading.Event | None, until: float) -> None:
    """The pause before an acquire tries etcd again (`RETRY_PAUSE`, not past ``until``);
    `asyncio.CancelledError` once ``cancel`` is set (an async acquire's task was
    cancelled), before or during it."""
    pause = max(0.0, min(RETRY_PAUSE, until - time.monotonic()))
    if cancel is None:
        time.sleep(pause)
    elif cancel.is_set() or cancel.wait(pause):
        import asyncio

        raise asyncio.CancelledError()


def note_outage(e: StoreUnavailableError, seconds: float) -> None:
    """Say that a ride-out of an outage (``e``, the first try's error) begins, and for how
    long it may try: a command would otherwise pause silently for up to the TTL. A
    `FenceLockWarning`, one line on a command's stderr; where the caller's filters make
    warnings errors, the note is dropped, not raised in the middle of the ride-out."""
    with contextlib.suppress(FenceLockWarning):
        warn_each_time(
            f"{e.endpoint}: the etcd holder store is unavailable ({e.why}); trying "
            f"again for up to {_seconds_up(seconds)} s", stacklevel=2)


def _seconds_up(seconds: float) -> str:
    """``seconds`` rounded up, as an upper bound is said: whole seconds from 1 s, tenths
    below (a request's time taken off a 10 s ride-out still reads 10 s)."""
    seconds = round(seconds, 6)  # (a sum's float error is not a second more)
    if seconds >= 1:
        return str(math.ceil(seconds))
    return f"{math.ceil(max(seconds, 0.0) * 10) / 10:g}"


def telling(first: StoreUnavailableError, last: StoreUnavailableError) -> StoreUnavailableError:
    """Which of an outage's errors to raise when riding it out has ended: the last, unless
    it only says that no answer came in time (a try cut short by the deadline) where the
    first, asked with a whole request's time, said more (a lost quorum, a refused
    connection)."""
    if NO_ANSWER in last.why and NO_ANSWER not in first.why:
        return first
    return last


def through_outage(attempt: Callable[[], _T], ttl: float, deadline: float | None) -> _T:
    """``attempt()``, asked again every `RETRY_PAUSE` while etcd cannot be reached: a
    restart shorter than a holder's lease (``ttl``) keeps the holder, and so the answer.
    After ``ttl`` of trying, or past ``deadline``, the last `StoreUnavailableError`
    stands, or the first where the last was cut short by the deadline (`telling`)."""
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
                told = telling(first, e)
                if told is e:
                    raise
                raise told from None
            if first is e:
                left = ttl - (now - start)
                note_outage(e, left if deadline is None else min(left, deadline - now))
            pause = RETRY_PAUSE if deadline is None else min(RETRY_PAUSE, deadline - now)
            time.sleep(max(pause, 0.0))


_clusters: dict[tuple[object, ...], Cluster] = {}
"""By endpoints, TTL and TLS settings (what of the URL but its prefix and root)."""
_clusters_lock = threading.Lock()
_EXIT_REVOKE = 1.0
"""How long a process's exit waits for etcd to revoke its lease."""


def revoke_leases() -> None:
    """Revoke this process's leases as it exits (`Cluster.revoke_at_exit`)."""
    with _clusters_lock:
        found = list(_clusters.values())
    for each in found:
        each.revoke_at_exit()


atexit.register(revoke_leases)


def cluster(url: EtcdURL) -> Cluster:
    key = (url.endpoints, url.ttl, url.tls, url.ca, url.cert, url.key)
    with _clusters_lock:
        found = _clusters.get(key)
        if found is None:
            _require_client(url)
            found = _clusters[key] = Cluster(url)
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
    global _clusters_lock
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
