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

from fencelock import _forkguard, _platform, _sidecar
from fencelock._errors import SidecarAccessError, no_thread

_pending: dict[tuple[str, bool], Waiter] = {}
"""Abandoned waiters still blocked in the kernel, by (sidecar, shared)."""


class _Done:
    """Set once by the helper, waited for by one thread at a time: a bare lock, which
    wakes the waiting thread with less work on both sides than `threading.Event`."""

    def __init__(self) -> None:
        self.flag = False
        """Set: read as an attribute where no call may come between (`Waiter.give_up`)."""
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self.flag = True
        self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        if self.flag:
            return True
        if not _platform.CAN_BLOCK:  # Windows: see `_wait_in_slices`
            return self._wait_in_slices(timeout)
        if self._lock.acquire(True, -1 if timeout is None else timeout):
            self._lock.release()  # so that a later wait returns at once
            return True
        return self.flag

    def _wait_in_slices(self, timeout: float | None) -> bool:
        """`wait` in steps of `_platform.WAIT_SLICE`: on Windows a lock's wait does not
        let Ctrl-C through before Python 3.14, so an untimed one could not be
        interrupted until the holder let go."""
        end = None if timeout is None else time.monotonic() + timeout
        piece = _platform.WAIT_SLICE
        while True:
            step = piece if end is None else min(piece, max(0.0, end - time.monotonic()))
            if self._lock.acquire(True, step):
                self._lock.release()
                return True
            if end is not None and time.monotonic() >= end:
                return self.flag


class Waiter:
    """A blocking flock on ``fd`` in a helper thread; see the module docstring.

    Whoever waits on it holds a claim: `start` puts the waiter and the caller's claim in
    the caller's box before its thread starts, and `give_up` acts for the current claim
    only, once. So an interrupt (KeyboardInterrupt, a signal handler's exception)
    landing anywhere leaves the caller a waiter to give up, never a helper that takes
    the lock for nobody, and a second give-up (the caller's error path, after a later
    wait adopted the waiter) closes nothing twice and takes nothing back."""

    def __init__(self, fd: int, key: tuple[str, bool]) -> None:
        self.fd = fd
        self.opened: object = None
        """``fd``'s tracking entry (`_forkguard.entry`), for a close safe to run again."""
        self.key = key
        self.shared = key[1]
        self.done = _Done()
        self.mutex = threading.Lock()
        self.claim: object | None = object()
        """The claim of the wait the waiter serves now; None once given up."""
        self.abandoned = False
        self.running = False
        """Its thread has begun: only then can a later wait adopt it. A waiter given
        up before that is never pending, and its descriptor is closed there and then
        (its thread, if it ever begins, ends at once)."""
        self.finished = False
        self.error: BaseException | None = None

    def _begin(self) -> None:
        # The bare thread primitive: `threading.Thread.start` waits for the thread to
        # come up, a wait an interrupt can cut short with the thread running or not.
        try:
            _thread.start_new_thread(self._run, ())
        except RuntimeError:  # "can't start new thread": a limit reached
            raise no_thread(self.key[0], "waiting for its lock") from None

    def _run(self) -> None:
        with self.mutex:
            self.running = True
            if self.abandoned:  # given up before this thread began
                # Closed by the wait that gave up, unless an interrupt cut that close
                # short: its cleanup closes it again only while no thread has begun.
                _forkguard.close_if_still(self.fd, self.opened)
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

    def adopt(self, box: list[tuple[Waiter, object]]) -> bool:
        """Take over an abandoned waiter that is still blocked, putting it and a new
        claim in ``box``; False if it is gone (or its thread never began)."""
        claim = object()  # made first: from ``abandoned`` cleared to the box, no call
        with self.mutex:
            if self.finished or not self.running or not self.abandoned:
                return False
            self.abandoned = False
            self.claim = claim
            box.append((self, claim))  # in the box before anything can interrupt the caller
            return True

    @staticmethod
    def start(
        key: tuple[str, bool], mine: _forkguard.Owner, box: list[tuple[Waiter, object]]
    ) -> None:
        """Put in ``box`` a waiter for the sidecar of ``mine``'s descriptor, with the
        caller's claim: an abandoned waiter still blocked (the descriptor is then
        closed), or a new one (which takes it: ``mine._fd`` is then -1). What ``mine``
        still has after an interrupt is the caller's, to close with `abandon`."""
        old = _pending.pop(key, None)
        if old is not None and old.adopt(box):
            _forkguard.close_if_still(mine._fd, mine._opened)  # (safe to run again)
            return
        waiter = Waiter(-1, key)
        box.append((waiter, waiter.claim))
        # Handed over with no call between the two steps (an interrupt lands at a call):
        # ``mine``'s until the first, the waiter's from the second.
        waiter.fd, waiter.opened = mine._fd, mine._opened
        mine._fd = -1
        waiter._begin()

    def give_up(self, claim: object, got: list[int]) -> bool:
        """Stop waiting, for ``claim`` (once; any other claim gets False and changes
        nothing). True if the lock arrived meanwhile: the descriptor is then the
        caller's, put in ``got`` before anything can interrupt the caller."""
        with self.mutex:
            if claim is not self.claim:
                return False  # given up already, or adopted by a later wait since
            # From here to the outcome's record (the descriptor in ``got``, or the
            # waiter abandoned) no call: an interrupt lands only at one, and one here
            # left the claim gone with the waiter neither given up nor taken, so that
            # its helper then took the lock for nobody.
            self.claim = None
            if self.done.flag:  # the descriptor is the caller's from here
                if self.error is not None:
                    fd, self.fd = self.fd, -1
                    _sidecar.close(fd)
                    raise SidecarAccessError(
                        self.key[0], self.error if isinstance(self.error, OSError)
                        else OSError(str(self.error)), "waiting for its lock failed"
                    ) from self.error
                got.append(self.fd)
                return True
            self.abandoned = True
            if self.running:
                _pending[self.key] = self
            else:  # no thread uses the descriptor yet (it checks `abandoned` first)
                self.close_unstarted()  # (run again by `abandon` if cut short)
            return False

    def close_unstarted(self) -> None:
        """Close the descriptor of a waiter given up before its thread began (safe to
        run again: an interrupt as it begins leaves it to `abandon`)."""
        if self.abandoned and not self.running:
            _forkguard.close_if_still(self.fd, self.opened)

    def give_up_and_close(self, claim: object) -> None:
        """Stop waiting because of an error: a lock that arrived meanwhile is dropped."""
        got: list[int] = []
        with contextlib.suppress(SidecarAccessError):  # its descriptor is closed then
            if self.give_up(claim, got):
                _sidecar.close(got[0])


def abandoned_waits() -> bool:
    """Whether a wait of this process gave up with its helper still blocked in the
    kernel (it drops the lock it gets only if a thread of this process can still run)."""
    return bool(_pending)


def abandon(
    mine: _forkguard.Owner, box: list[tuple[Waiter, object]], got: list[int]
) -> None:
    """After an interrupt or error in a wait that used `Waiter.start`: close or give up
    whatever of it is still the caller's (a descriptor ``got`` back is the caller's
    to close, unless it already has)."""
    if box and not got:
        box[0][0].give_up_and_close(box[0][1])
    if box:
        box[0][0].close_unstarted()
    _forkguard.close_if_still(mine._fd, mine._opened)


def limit(seconds: float | None, what: str = "timeout") -> float | None:
    """A wait's limit as the waiting code takes it: None for no limit (also for
    infinity, or more than the platform can wait); ValueError for NaN or below 0."""
    if seconds is None:
        return None
    value = duration(seconds, what, "None or ")
    return None if value >= threading.TIMEOUT_MAX else value


def duration(seconds: float, what: str, alternatives: str = "") -> float:
    """``seconds`` as a float >= 0 (infinity included): TypeError for anything but a
    real number (int, float, Decimal, Fraction, numpy's; not a bool or a string, which
    float() would take too), ValueError for NaN or below 0. ``alternatives`` begins the
    messages' list of what is accepted ("None or ")."""
    if isinstance(seconds, bool | str | bytes) or not hasattr(seconds, "__float__"):
        raise TypeError(f"{what} must be {alternatives}a number of seconds, not "
                        f"{type(seconds).__name__} {seconds!r}")
    try:
        value = float(seconds)
    except OverflowError:  # an integer past a float's range
        value = math.inf if seconds > 0 else -math.inf
    if math.isnan(value) or value < 0:
        raise ValueError(f"{what} must be {alternatives}a number >= 0, not {seconds!r}")
    return value


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
        try:  # (its close drops the shared lock, if it was taken)
            locked = _sidecar.using(
                sidecar, lambda opened, st: _shared_lock(opened, st, sidecar, deadline))
        except SidecarAccessError as e:
            if e.cause.errno == errno.ENOENT:
                return True
            raise
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
            alone = _sidecar.using(sidecar, _sole_shared)
        except SidecarAccessError as e:
            if e.cause.errno == errno.ENOENT:
                return True
            raise
        if alone is not False:
            return alone
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        time.sleep(pause if remaining is None else min(pause, remaining))
        pause = min(pause * 2, 0.05)


def _sole_shared(opened: _sidecar.Opened, st: os.stat_result) -> bool | None:
    """Whether this is the only shared lock on the sidecar (its test lock is dropped as
    ``opened`` is closed); None when an exclusive holder has it."""
    if not _platform.try_lock(opened.fd, shared=True):
        return None
    return _platform.sole_lock(opened.fd)


def _shared_lock(
    opened: _sidecar.Opened, st: os.stat_result, sidecar: str, deadline: float | None
) -> os.stat_result | None:
    """Take a shared lock on the sidecar by ``deadline``: the stat of the file locked
    (``opened``'s, whose close drops the lock, or an earlier wait's still-blocked
    descriptor's, closed here), None on timeout. ``opened`` keeps its descriptor unless
    a helper thread takes it."""
    fd = opened.fd
    if _platform.try_lock(fd, shared=True):
        return st
    _sidecar.refuse_own_run(sidecar, fd, st)
    if deadline is None and _platform.CAN_BLOCK:
        _platform.lock_blocking(fd, shared=True)
        return st
    box: list[tuple[Waiter, object]] = []
    got: list[int] = []
    try:
        Waiter.start((sidecar, True), opened, box)  # (the helper's from there)
        waiter, claim = box[0]
        waiter.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not waiter.give_up(claim, got):
            return None
        return st if got[0] == fd else os.fstat(got[0])
    except BaseException:
        try:
            abandon(opened, box, got)
        except BaseException:  # one that landed as it was entered: once more
            abandon(opened, box, got)
            raise
        raise
    finally:
        if got:  # the shared lock was taken: drop it (once more if cut short)
            opened_got = box[0][0].opened
            try:
                _forkguard.close_if_still(got[0], opened_got)
            except BaseException:
                _forkguard.close_if_still(got[0], opened_got)
                raise


def _after_fork_in_child() -> None:
    # The helpers' threads did not survive the fork; their descriptors are tracked, and
    # closed in the child by _forkguard.
    _pending.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
