"""The in-process registry: which `SessionLock` of this process holds which session.

Two runs in one process contend exactly as two processes do, even where flock alone
would not make them (some filesystems emulate it per process). Each holder takes its
session's slot, keyed by the session's real path, before it takes the store's lock,
and frees it after. Outside `SessionLock`, the registry answers who holds a session
here (`held_in_process`) and asks that run to stop (`abort`).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING

from fencelock import _cleanup, _platform, _sidecar
from fencelock._errors import FenceLockError, SessionContendedError

if TYPE_CHECKING:
    from fencelock._lock import SessionLock

_held: dict[str, tuple[SessionLock, object]] = {}
"""Each taken slot: the lock object holding it, and the attempt (`take`'s ``attempt``)
that took it. Several owners (threads, tasks) may be acquiring one `SessionLock` at
once, and an attempt that gives up frees only a slot it took itself."""
_lines: dict[str, list[tuple[SessionLock, object]]] = {}
"""The attempts waiting for each taken slot, longest first (`take`)."""
_mu = threading.RLock()
"""Guards every change to a taken slot and its line. The uncontended path takes a free
slot with one atomic ``setdefault``, without it. Reentrant only so that it can say
whether this thread holds it (``_is_owned``, in one step): nothing of fencelock's takes
it twice; a signal handler or finaliser that frees a slot (a release) while its thread
is inside it frees it from a thread of its own (`free`), not in the middle of the
change that thread is making (a waiter queued but not yet asleep would miss its
wake-up)."""
_sleepers: list[_thread.LockType] = []
"""One locked lock per acquirer asleep until a slot changes hands: `wake` releases each,
and each acquirer takes its own off the list (under ``_mu``). Not `threading.Condition`,
whose wait takes the mutex back in a step an interrupt (Ctrl-C's KeyboardInterrupt, a
signal handler's exception) can cut short, leaving the waiter's ``with _mu`` to release
a mutex another thread holds: the registry then wedged every acquire and release of the
process. Here the mutex is only ever taken by ``with`` blocks, and the sleep is outside
them."""


def cancelled() -> BaseException:
    """The exception a cancelled acquire raises (asyncio's, imported only then)."""
    import asyncio

    return asyncio.CancelledError()


def real_key(session: str) -> str:
    """The registry key of an absolute session path: its real directory plus its name.

    Raises `ForeignSymlinkError` when the directory goes through another user's symlink.
    """
    return walked_key(session)[0]


_KEYS: dict[str, tuple[str, tuple[int, int] | None]] = {}
"""`walked_key`'s keys of paths walked whole (the walk costs a system call a component),
each with the device and inode its directory had then if a symlink led there."""
_KEYS_KEPT = 4096


def walked_key(session: str) -> tuple[str, bool]:
    """`real_key`, and whether its directory was walked whole (`_sidecar.walk`): a key
    of a directory with a missing component is not kept, and is walked again next time.
    A kept key that a symlink led to serves while the path still leads to the directory
    it was walked to (one stat): the symlink may be pointed elsewhere since."""
    directory = os.path.dirname(session)
    kept = _KEYS.get(session)
    if kept is not None and (kept[1] is None or _sidecar.directory_id(directory) == kept[1]):
        return kept[0], True
    real, whole = _sidecar.walk(directory)
    key = os.path.join(real, os.path.basename(session))
    if whole:
        found = None if real == directory else _sidecar.directory_id(real)
        if found is not None or real == directory:
            if len(_KEYS) >= _KEYS_KEPT:
                _KEYS.clear()
            _KEYS[session] = (key, found)
    return key, whole


def registry_key(session: str) -> str:
    """The registry's key for a session (the session itself for a path no
    `SessionLock` accepts: nothing here can hold it)."""
    try:
        return real_key(session)
    except FenceLockError:
        return session


def in_store(session_key: str, space: str) -> str:
    """The registry's key for ``session_key`` in the store whose `space` is ``space``
    ("" for the sidecar store): runs in two stores, or under two etcd prefixes, do not
    exclude each other in one process, as in two processes they do not."""
    return space + session_key


def held_in_process(session_key: str) -> SessionLock | None:
    """The lock object of this process that holds ``session_key``, if any."""
    with _mu:
        slot = _held.get(session_key)
    return None if slot is None else slot[0]


def any_held() -> bool:
    """Whether any session is held in this process (a check that takes no lock)."""
    return bool(_held)


def abort(session_key: str) -> bool:
    """Ask the run of this process that holds ``session_key`` to abort (its `on_abort`
    callbacks); False when no run here holds it. A lock object whose slot it is but
    which is still waiting for the session (held by another process) has no run to
    abort."""
    lock = held_in_process(session_key)
    if lock is None or not lock.held:
        return False
    lock._abort()
    return True


def take(
    key: str,
    lock: SessionLock,
    fail: bool,
    deadline: float | None,
    cancel: threading.Event | None,
    start: float,
    attempt: object = None,
) -> None:
    """Take ``key``'s slot for ``lock`` on behalf of ``attempt``, waiting for another
    holder of this process (or another attempt on ``lock``) to free it unless ``fail``;
    `SessionContendedError` past ``deadline``.

    Waiters are served in the order they came: a freed slot goes straight to the one
    that has waited longest, so a lane that takes the session again right after
    releasing it cannot keep out a waiter of its own process. (Between processes the
    kernel keeps no order: the release's yield gives a woken waiter the first chance,
    which a machine with every CPU busy may not let it take.) The slot's owner may hold
    nothing yet, or no more: it is about to hold the session, or has just released it
    (or waits for a holder elsewhere, who is then named). A fail-fast or timed-out
    acquire gives that moment the grace a fail-fast acquirer gives a sidecar locked
    without a live record."""
    entry = (lock, attempt)
    # The common case in one step, with no mutex: a dict's setdefault is atomic, and
    # every other change to a slot is made under ``_mu`` (`free` hands a slot on, or
    # deletes it when nobody waits).
    if _held.setdefault(key, entry) is entry:
        return
    graced = False
    while True:
        other = _wait_turn(key, entry, fail and not graced, deadline, cancel)
        if other is None:
            return
        # A fail-fast acquire waited for nothing (its grace is not reported).
        waited = None if fail else time.monotonic() - start
        holder = other.info
        if holder is not None:
            raise SessionContendedError(
                lock.session, holder, waited=waited, backend=lock._backend_url())
        # ``other`` is between runs, or waits too: the session may be held elsewhere
        # (looked up outside ``_mu``).
        error = _held_elsewhere(lock, waited)
        if error is not None:
            raise error
        if graced:  # still starting or ending its run: named by that run
            raise SessionContendedError(lock.session, other._record_now(), waited=waited,
                                        backend=lock._backend_url())
        from fencelock._sidecar_holder import FAIL_GRACE  # only on this path

        graced, deadline = True, time.monotonic() + FAIL_GRACE


def take_if_free(key: str, lock: SessionLock, attempt: object) -> bool:
    """Take ``key``'s slot for ``lock`` on behalf of ``attempt`` if it is free this
    moment (nobody of this process holds or waits for it: a freed slot goes straight to
    its longest waiter); False, having waited for nothing, when it is not."""
    entry = (lock, attempt)
    return _held.setdefault(key, entry) is entry


def _wait_turn(
    key: str,
    entry: tuple[SessionLock, object],
    fail: bool,
    deadline: float | None,
    cancel: threading.Event | None,
) -> SessionLock | None:
    """Give ``key``'s slot to ``entry`` (None), waiting in line for it unless ``fail``;
    the slot's owner when it could not be had (``fail``, or past ``deadline``)."""
    queued = False
    sleeper: _thread.LockType | None = None

    def leave() -> None:  # safe to run again (`_cleanup.to_the_end`)
        # What to undo is looked up, not remembered: an interrupt can land between a
        # step and the note that it was taken.
        with _mu:
            _forget(sleeper)
            _leave_line(key, entry)

    try:
        while True:
            with _mu:
                _forget(sleeper)  # (one whose sleep timed out is still listed)
                # Not freed while anyone waits in line (handed on), but taken if free.
                slot = _held.setdefault(key, entry)
                if slot is entry:
                    return None
                if cancel is not None and cancel.is_set():
                    raise cancelled()
                remaining = None if deadline is None else deadline - time.monotonic()
                if fail or (remaining is not None and remaining <= 0):
                    return slot[0]
                if not queued:  # in line from the first wait on
                    _lines.setdefault(key, []).append(entry)
                    queued = True
                sleeper = _thread.allocate_lock()
                sleeper.acquire()
                _sleepers.append(sleeper)
            # Woken when a slot changes hands (or by `wake`), then looks again; on
            # Windows at least every `WAIT_SLICE`, which lets Ctrl-C through.
            timeout = -1 if remaining is None else remaining
            if not _platform.CAN_BLOCK:
                timeout = _platform.WAIT_SLICE if timeout < 0 else \
                    min(timeout, _platform.WAIT_SLICE)
            sleeper.acquire(True, timeout)
    finally:
        try:
            _cleanup.to_the_end(leave)
        except BaseException:  # one that landed as it was entered: once more
            _cleanup.to_the_end(leave)
            raise


def _leave_line(key: str, entry: tuple[SessionLock, object]) -> None:
    """Take ``entry`` out of ``key``'s line, if it is in it (under ``_mu``)."""
    line = _lines.get(key)
    if line is None:
        return
    for i, queued in enumerate(line):
        if queued is entry:
            del line[i]
            break
    if not line:
        del _lines[key]


def _held_elsewhere(lock: SessionLock, waited: float | None) -> SessionContendedError | None:
    """The contention error naming the session's live holder in another process (or
    host), for an acquirer queued behind a lock object of this process that does not
    hold it; None when no live holder is found."""
    from fencelock._probe import held_error  # only on this error path

    return held_error(lock.session, lock._backend_url(), waited)


def busy() -> bool:
    """Whether the registry's mutex is taken (by this thread, perhaps: see
    `SessionLock._exit_closed`)."""
    if _mu._is_owned():  # type: ignore[attr-defined]  # (CPython's and the pure one)
        return True
    if not _mu.acquire(False):
        return True
    _mu.release()
    return False


def free(key: str, lock: SessionLock, attempt: object = None) -> None:
    """Free ``key``'s slot if ``lock`` has it (and, given ``attempt``, if that attempt
    took it): it goes to the longest waiter, if any. Called by a signal handler (or a
    finaliser) of a thread inside the mutex, in the middle of a change: from a thread of
    its own, once that thread lets the mutex go."""
    if _mu._is_owned():  # type: ignore[attr-defined]  # (CPython's and the pure one)
        _free_later(key, lock, attempt)
        return
    with _mu:
        slot = _held.get(key)
        if slot is not None and slot[0] is lock and (attempt is None or slot[1] is attempt):
            line = _lines.get(key)
            if line:
                # Handed on with no call between the two steps (an interrupt lands at a
                # call): a waiter popped but not yet given the slot would be lost.
                _held[key] = line[0]
                del line[0]
                wake()
            else:
                del _held[key]


def _free_later(key: str, lock: SessionLock, attempt: object) -> None:
    """`free`, from a thread of its own (a bare one: `threading`'s own locks may be what
    the calling thread is inside), which takes the mutex once the calling thread lets
    it go. Where no thread can be had (a process at its limit), the slot stays taken:
    this process's later acquires of the session wait for it."""
    with contextlib.suppress(RuntimeError):
        _thread.start_new_thread(free_surely, (key, lock, attempt))


def free_surely(key: str, lock: SessionLock, attempt: object = None) -> None:
    """`free`, then wake every waiter: run again after an interrupt cut it short
    (`_cleanup.to_the_end`), it also wakes a waiter handed the slot whose wake-up the
    interrupt cut short."""
    free(key, lock, attempt)
    wake()


def wake() -> None:
    """Wake every waiter, so that a cancelled one notices. Without the mutex: the caller
    may be a thread inside it (a coroutine closed by the garbage collector), and an
    interrupt cannot leave taken what is not taken. A sleeper woken twice, or before it
    sleeps, only looks again; each waiter takes its own off the list."""
    for sleeper in list(_sleepers):
        with contextlib.suppress(RuntimeError):  # woken already
            sleeper.release()


def _forget(sleeper: _thread.LockType | None) -> None:
    """Take ``sleeper`` off `_sleepers` if it is there (under ``_mu``)."""
    if sleeper is not None:
        with contextlib.suppress(ValueError):
            _sleepers.remove(sleeper)


def waiters() -> int:
    """How many acquirers of this process wait for a slot."""
    with _mu:
        return sum(len(line) for line in _lines.values())


def _after_fork_in_child() -> None:
    # A forked child does not hold its parent's sessions: forget them, and close the
    # inherited descriptors (closing never unlocks: the parent's copy keeps the lock).
    global _mu
    for lock, _ in _held.values():
        lock._forget_in_child()
    _held.clear()
    _lines.clear()
    _mu = threading.RLock()
    _sleepers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
