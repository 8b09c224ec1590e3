"""The OS advisory lock on a sidecar, decided once per platform at import.

POSIX: ``flock(2)`` whole-file locks, the primitive portalocker selects on POSIX
(``portalocker.portalocker.LOCKER``). fencelock calls that primitive directly rather
than through ``portalocker.lock()``, whose per-call validation costs about ten times
the syscall, and refuses a LOCKER switched to ``lockf``: POSIX record locks are
dropped for the whole process when any descriptor of the file is closed.

Windows: ``msvcrt.locking`` on one byte at `WINDOWS_LOCK_OFFSET`. Windows locks are
mandatory, so the locked byte lies past the record (at most 64 KiB) and other
processes can still read it. portalocker's Windows lockers always lock from byte 0,
which would hide the record. Only this module knows the platform.
"""

from __future__ import annotations

import os
import sys
import time

from fencelock import _forkguard

WINDOWS = sys.platform == "win32"
WINDOWS_LOCK_OFFSET = 1 << 20
"""Where the Windows lock byte lies: past any record a reader will read."""

O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
O_BINARY: int = getattr(os, "O_BINARY", 0)

OPEN_FLAGS = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY
"""Never follow a symlink; never hang opening a planted FIFO."""

CAN_BLOCK = not WINDOWS
"""Whether a waiter can sleep in the kernel until the lock is released."""

if WINDOWS:  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _locking(fd: int, mode: int) -> None:
        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, mode, 1)  # type: ignore[attr-defined]

    def try_lock(fd: int, shared: bool = False) -> bool:
        """Take the lock without waiting; False when someone else has it."""
        try:
            _locking(fd, msvcrt.LK_NBLCK)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True

    def lock_blocking(fd: int, shared: bool = False) -> None:
        # msvcrt has no untimed blocking lock; poll with a short, growing pause.
        pause = 0.0005
        while not try_lock(fd, shared):
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def unlock(fd: int) -> None:
        _locking(fd, msvcrt.LK_UNLCK)  # type: ignore[attr-defined]

else:
    import fcntl
    from collections.abc import Callable

    _EX_NB = fcntl.LOCK_EX | fcntl.LOCK_NB
    _SH_NB = fcntl.LOCK_SH | fcntl.LOCK_NB

    def _resolve(fd: int, operation: int) -> None:
        # portalocker is imported when a process first takes a holder's lock, not at
        # start-up: its import pulls in importlib.metadata, which would double the
        # cold start of read-only commands such as `fencelock status`.
        global _flock
        # Under the fork guard: a child forked while another thread is inside this
        # import would inherit its module lock, held by a thread it does not have,
        # and hang on its first lock.
        with _forkguard.guard:
            from portalocker import portalocker as chosen

        locker = getattr(chosen, "LOCKER", None)
        if locker is not fcntl.flock:
            # portalocker can be switched to lockf; POSIX record locks vanish when any
            # descriptor of the file is closed, so the holder stays on flock.
            locker = fcntl.flock
        _flock = locker
        _flock(fd, operation)

    _flock: Callable[[int, int], None] = _resolve
    """The holder's exclusive lock: portalocker's POSIX primitive, flock(2)."""

    def try_lock(fd: int, shared: bool = False) -> bool:
        """Take the lock without waiting; False when someone else has it.

        ``shared`` is a probe's test lock (never held for long), taken with the same
        flock(2) call directly so that probing never loads the holder's wrapper.
        """
        try:
            if shared:
                fcntl.flock(fd, _SH_NB)
            else:
                _flock(fd, _EX_NB)
        except BlockingIOError:
            return False
        return True

    def lock_blocking(fd: int, shared: bool = False) -> None:
        """Sleep in the kernel until the lock is ours: hand-off is immediate."""
        if shared:
            fcntl.flock(fd, fcntl.LOCK_SH)
        else:
            _flock(fd, fcntl.LOCK_EX)

    def unlock(fd: int) -> None:
        _flock(fd, fcntl.LOCK_UN)


def describe_mode(mode: int) -> str:
    """What a non-regular file is, in words for an error message."""
    import stat

    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"

