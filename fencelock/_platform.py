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
from typing import NamedTuple

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

    def sole_lock(fd: int) -> bool:
        """Windows byte locks are exclusive: the probe's own lock says it all."""
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

    def sole_lock(fd: int) -> bool:
        """After ``try_lock(fd, shared=True)`` succeeded: whether no other open file
        holds a shared lock too (a process outside fencelock can hold one for as long as
        it likes, and it keeps every exclusive acquirer out).

        The shared lock is converted to an exclusive one, without waiting; flock(2)
        does not convert atomically, so after False the caller may hold no lock at all.
        Where the test cannot be made (a read-only descriptor where flock is emulated
        with POSIX locks, as on NFS), True: the shared probe's answer stands.
        """
        try:
            fcntl.flock(fd, _EX_NB)
        except BlockingIOError:
            return False
        except OSError:
            return True
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



class LockOwner(NamedTuple):
    """A process that holds a file's lock, as the system lists it (``/proc/locks``).
    (A named tuple: this module is loaded on its own by the portability tests.)"""

    pid: int
    """The process that took the lock. flock(2) locks belong to an open file, and
    ``/proc/locks`` names the process that locked it, even after that process exited
    and left the lock to a child that inherited the descriptor (``flock FILE CMD``)."""
    shared: bool
    command: str | None
    """``/proc/<pid>/comm``; None when ``pid`` is gone (a child it started holds on)."""


_PROC_LOCKS = "/proc/locks"


def lock_owners(path: str) -> tuple[LockOwner, ...] | None:
    """Who holds flock(2) locks on ``path``, read from ``/proc/locks`` as lslocks(8)
    reads it (the entry whose ``major:minor:inode`` is the file's).

    None where the system does not say (not Linux, no ``/proc``); an empty tuple when
    no listed lock matches: the holder is on another host (NFS) or in another PID
    namespace, which ``/proc/locks`` does not show. Reads a system-wide list, so it is
    for diagnosis only, never for deciding whether a lock is held.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        st = os.stat(path, follow_symlinks=False)
        with open(_PROC_LOCKS, "rb") as f:
            listing = f.read()
    except OSError:
        return None
    dev = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    needle = b":%d " % st.st_ino
    owners: list[LockOwner] = []
    for line in listing.splitlines():
        if needle not in line + b" ":
            continue
        # "1: FLOCK  ADVISORY  WRITE 6961 fe:00:2157137 0 EOF"; a waiter's line has "->"
        parts = line.split()
        if len(parts) < 6 or parts[1] != b"FLOCK":
            continue
        try:
            pid = int(parts[4])
            major, minor, ino = parts[5].split(b":")
            where = (int(major, 16), int(minor, 16), int(ino))
        except ValueError:
            continue
        if where != dev or pid <= 0:  # 0 or -1: an owner this namespace cannot name
            continue
        shared = parts[3] == b"READ"
        if any(o.pid == pid and o.shared == shared for o in owners):
            continue  # the list is read in pieces: one changing meanwhile can repeat a line
        owners.append(LockOwner(pid, shared, _command(pid)))
    return tuple(owners)


def _command(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return os.fsdecode(f.read().rstrip(b"\n"))
    except OSError:
        return None
