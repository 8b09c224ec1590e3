"""Waiting for a sidecar's lock in a helper thread, so a wait can time out or be
cancelled (the kernel offers no timed flock).

A wait that gives up leaves its helper blocked in the kernel. An abandoned helper drops
the lock the moment it gets it, unless a later wait on the same sidecar has adopted it
first: timed waits against a long-held session reuse one blocked thread instead of
leaving one behind each.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import math
import os
import threading
import time

from fencelock import _platform, _sidecar
from fencelock._errors import SidecarAccessError

_pending: dict[tuple[str, bool], Waiter] = {}
"""Abandoned waiters still blocked in the kernel, by (sidecar, shared)."""


class _Done:
    """Set once by the helper, waited for by one thread at a time: a bare lock, which
    wakes the waiting thread with less work on both sides than `threading.Event`."""

    def __init__(self) -> None:
        self._flag = False
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self._flag = True
        self._lock.release()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None) -> bool:
        if self._flag:
            return True
        if self._lock.acquire(True, -1 if timeout is None else timeout):
            self._lock.release()  # so that a later wait returns at once
            return True
        return self._flag


class Waiter:
    """A blocking flock on ``fd`` in a helper thread; see the module docstring.

    Built by `start`, which puts it in the caller's box before its thread starts, so
    that an interrupt (KeyboardInterrupt, a signal handler's exception) landing
    anywhere in the start leaves the caller a waiter to give up, never a helper that
    takes the lock for nobody."""

    def __init__(self, fd: int, key: tuple[str, bool]) -> None:
        self.fd = fd
        self.key = key
        self.shared = key[1]
        self.done = _Done()
        self.mutex = threading.Lock()
        self.abandoned = False
        self.running = False
        """Its thread has begun: only then can a later wait adopt it. A waiter given
        up before that is never pending: its thread closes the descriptor as it
        begins (an interrupt before the thread was made leaves the descriptor open,
        with no lock on it)."""
        self.finished = False
        self.error: BaseException | None = None

    def _begin(self) -> None:
        # The bare thread primitive: `threading.Thread.start` waits for the thread to
        # come up, a wait an interrupt can cut short with the thread running or not.
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        with self.mutex:
            self.running = True
            if self.abandoned:  # given up before this thread began: nothing to wait for
                _sidecar.close(self.fd)
                self.finished = True
                return
        try:
            _platform.lock_blocking(self.fd, self.shared)
        except BaseException as e:  # handed to the waiting side
            self.error = e
        with self.mutex:
            if self.abandoned:
                _sidecar.close(self.fd)  # closing the last descriptor drops the lock
                self.finished = True
                if _pending.get(self.key) is self:
                    del _pending[self.key]
                return
            self.done.set()

    def adopt(self, box: list[Waiter]) -> bool:
        """Take over an abandoned waiter that is still blocked, putting it in ``box``;
        False if it is gone (or its thread never began)."""
        with self.mutex:
            if self.finished or not self.running:
                return False
            self.abandoned = False
            box.append(self)  # in the box before anything can interrupt the caller
            return True

    @staticmethod
    def start(key: tuple[str, bool], fd: int, box: list[Waiter]) -> None:
        """Put in ``box`` a waiter for ``fd``'s sidecar: an abandoned one still
        blocked, or a new one. An empty ``box`` (an interrupt came first) leaves ``fd``
        the caller's; once the box holds a waiter, ``fd`` is its (closed when an
        existing waiter is adopted), and the caller gives the waiter up if it stops."""
        old = _pending.pop(key, None)
        if old is not None and old.adopt(box):
            _sidecar.close(fd)
            return
        waiter = Waiter(fd, key)
        box.append(waiter)
        waiter._begin()

    def give_up(self, got: list[int] | None = None) -> bool:
        """Stop waiting: True if the lock arrived meanwhile (the fd is then ours, and
        put in ``got`` before anything can interrupt the caller)."""
        with self.mutex:
            if self.done.is_set():  # the descriptor is the caller's from here
                if self.error is not None:
                    _sidecar.close(self.fd)
                    raise SidecarAccessError(
                        self.key[0], self.error if isinstance(self.error, OSError)
                        else OSError(str(self.error)), "waiting for its lock failed"
                    ) from self.error
                if got is not None:
                    got.append(self.fd)
                return True
            self.abandoned = True
            if self.running:  # else its thread, if it ever begins, ends at once
                _pending[self.key] = self
            return False

    def give_up_and_close(self) -> None:
        """Stop waiting because of an error: a lock that arrived meanwhile is dropped."""
        with contextlib.suppress(SidecarAccessError):  # its descriptor is closed then
            if self.give_up():
                _sidecar.close(self.fd)


def limit(seconds: float | None, what: str = "timeout") -> float | None:
    """A wait's limit as the waiting code takes it: None for no limit (also for
    infinity, or more than the platform can wait); ValueError for NaN or below 0."""
    if seconds is None:
        return None
    # Any real number (int, float, Decimal, Fraction, numpy's); not a bool or a string,
    # which float() would take too.
    if isinstance(seconds, bool | str | bytes) or not hasattr(seconds, "__float__"):
        raise TypeError(f"{what} must be None or a number of seconds, not "
                        f"{type(seconds).__name__} {seconds!r}")
    try:
        value = float(seconds)
    except OverflowError:  # an integer past a float's range
        value = math.inf if seconds > 0 else -math.inf
    if math.isnan(value) or value < 0:
        raise ValueError(f"{what} must be None or a number >= 0, not {seconds!r}")
    return None if value >= threading.TIMEOUT_MAX else value


def wait_until_unlocked(sidecar: str, timeout: float | None) -> bool:
    """Block until no process holds ``sidecar``'s lock; False on timeout.

    Takes and drops a shared lock (and, to see that no other process holds a shared
    one, converts it to exclusive for an instant), so it writes nothing and bumps no
    token. A wait that
    times out leaves its helper thread blocked in the kernel until the holder lets go
    (it then drops the lock at once), so call it once with the whole timeout rather
    than in a loop of short ones.
    """
    timeout = limit(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fd, st = _sidecar.open_checked(sidecar, create=False)
        except SidecarAccessError as e:
            if e.cause.errno == errno.ENOENT:
                return True
            raise
        locked = _shared_lock(fd, st, sidecar, deadline)
        if locked is None:
            return False
        if not _sidecar.still_at_path(sidecar, locked):
            continue  # removed (and perhaps made anew) meanwhile: the one at the path counts
        # No exclusive holder now; a process outside fencelock may still hold a shared
        # lock, which keeps acquirers out as surely.
        alone = _no_shared_holder(sidecar, deadline)
        if alone is not None:
            return alone


def _no_shared_holder(sidecar: str, deadline: float | None) -> bool | None:
    """Wait until no other process holds a shared lock on the sidecar either: True, or
    False on timeout; None when an exclusive holder came back (wait in the kernel again).

    Polled (every 1 ms, growing to 50 ms): the kernel wakes no one when the last
    shared lock goes, and shared locks other than fencelock's momentary test locks
    are rare.
    """
    pause = 0.001
    while True:
        try:
            fd, _ = _sidecar.open_checked(sidecar, create=False)
        except SidecarAccessError as e:
            if e.cause.errno == errno.ENOENT:
                return True
            raise
        try:
            if not _platform.try_lock(fd, shared=True):
                return None
            if _platform.sole_lock(fd):
                return True
        finally:
            _sidecar.close(fd)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        time.sleep(pause if remaining is None else min(pause, remaining))
        pause = min(pause * 2, 0.05)


def _shared_lock(
    fd: int, st: os.stat_result, sidecar: str, deadline: float | None
) -> os.stat_result | None:
    """Take and drop a shared lock on the sidecar by ``deadline``: the stat of the file
    locked (``fd``'s, or an earlier wait's still-blocked descriptor's), None on timeout.
    ``fd`` is closed or handed to a helper either way."""
    if _platform.try_lock(fd, shared=True):
        _sidecar.close(fd)
        return st
    if deadline is None and _platform.CAN_BLOCK:
        try:
            _platform.lock_blocking(fd, shared=True)
        finally:
            _sidecar.close(fd)
        return st
    box: list[Waiter] = []
    got: list[int] = []
    try:
        Waiter.start((sidecar, True), fd, box)
        waiter = box[0]
        waiter.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not waiter.give_up(got):
            return None
        return st if got[0] == fd else os.fstat(got[0])
    except BaseException:
        if not got:
            if box:
                box[0].give_up_and_close()
            else:
                _sidecar.close(fd)  # not handed to a waiter yet
        raise
    finally:
        if got:
            _sidecar.close(got[0])  # the shared lock was taken: drop it


def _after_fork_in_child() -> None:
    # The helpers' threads did not survive the fork; their descriptors are tracked, and
    # closed in the child by _forkguard.
    _pending.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
