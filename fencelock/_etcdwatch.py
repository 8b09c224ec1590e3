"""A watch on the deletion of one key, over etcd's HTTP gateway (how a waiter learns
that the key ahead of it in the queue has gone), and the thread that stops the watches
whose waiter's turn came, off that waiter's way."""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import socket
import threading
from typing import Any

from fencelock import _etcdwire as wire
from fencelock._errors import StoreUnavailableError, no_thread


class Watch:
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
        create: dict[str, Any] = {"key": wire.b64(key), "filters": ["NOPUT"]}
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
                self._reader.join(wire.REQUEST_TIMEOUT)
        with contextlib.suppress(Exception):
            # Now, not when the garbage collector gets to it (perhaps while the
            # interpreter exits, with the modules its clean-up needs gone).
            self._chunks.close()
        with contextlib.suppress(Exception):
            self._response.close()
        with contextlib.suppress(Exception):
            self._session.close()




_retired: collections.deque[Watch] = collections.deque()
"""Watches whose waiter's turn came, for `_retirer` to stop."""
_retired_wake = threading.Event()
_retirer: threading.Thread | None = None
_retirer_mu = threading.Lock()
_stopping: Watch | None = None
"""The watch `_retirer` is stopping now (no longer in `_retired`)."""
_inherited: list[collections.deque[Watch]] = []
"""In a forked child: the parent's retired watches, kept unstopped (see
`_after_fork_in_child`)."""


def retire(watch: Watch) -> bool:
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


def _after_fork_in_child() -> None:
    global _retired, _retired_wake, _retirer, _retirer_mu, _stopping
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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
