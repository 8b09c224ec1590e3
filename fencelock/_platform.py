"""The OS advisory lock on a sidecar, decided once per platform at import.

POSIX: ``flock(2)`` whole-file locks, called directly (``fcntl.flock``). Never POSIX
record locks (``lockf``, ``F_SETLK``): they are dropped for the whole process when any
descriptor of the file is closed.

Windows: ``msvcrt.locking`` on one byte at `WINDOWS_LOCK_OFFSET`. Windows locks are
mandatory, so the locked byte lies past the record (at most 64 KiB) and other
processes can still read it (a lock from byte 0, as portalocker's Windows lockers take,
would hide the record).

Only this module knows the platform: the open flags, the lock, the signals that ask a
process to stop, where the system lists its mounts and its locks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

WINDOWS = sys.platform == "win32"
WINDOWS_LOCK_OFFSET = 1 << 20
"""Where the Windows lock byte lies: past any record a reader will read."""

O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
O_BINARY: int = getattr(os, "O_BINARY", 0)

OPEN_FLAGS = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY
"""Never follow a symlink; never hang opening a planted FIFO."""

FOLLOWS_SYMLINKS = not O_NOFOLLOW
"""Opens cannot refuse a symlink (Windows): whoever opens a path then asks whether it is
one (``os.path.islink``) right after. (A constant, not a call: opens are on the hot
path, and elsewhere the open refused it already.)"""

EFFECTIVE_IDS = os.access in os.supports_effective_ids
"""Whether access(2) can ask with the effective ids (a setuid program's), as an open does."""

CAN_BLOCK = not WINDOWS
"""Whether a waiter can sleep in the kernel until the lock is released."""

WAIT_SLICE = 0.1
"""Where `CAN_BLOCK` is false (Windows), how long a thread waits on a lock at a time: a
lock's wait there does not let Ctrl-C through before Python 3.14."""

NOT_TAKEN, TAKEN, TAKEN_AFTER_A_WAIT = 0, 1, 2
"""What `lock_session` gives: false only for the first."""


def _seek_pread(fd: int, size: int, offset: int) -> bytes:
    """`os.pread` where the system has none (Windows): a seek and a read, then the
    descriptor's position put back (an append reads it to find where its line went),
    one thread at a time."""
    return _at(fd, offset, lambda: os.read(fd, size))


def _seek_pwrite(fd: int, data: bytes, offset: int) -> int:
    """`os.pwrite` where the system has none (Windows), as `_seek_pread`."""
    return _at(fd, offset, lambda: os.write(fd, data))


_T = TypeVar("_T")


def _at(fd: int, offset: int, io: Callable[[], _T]) -> _T:
    """``io`` with ``fd`` at ``offset``, its position then put back."""
    with _POSITIONED:
        was = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            return io()
        finally:
            os.lseek(fd, was, os.SEEK_SET)


_POSITIONED = threading.RLock()
"""Reentrant: a signal handler may release a session (a record write) while its thread
is inside a positioned read; each call puts back the position it found."""

pread = getattr(os, "pread", _seek_pread)
"""Read ``size`` bytes at ``offset`` without moving the descriptor's position (POSIX
``pread(2)``; Python has it only on POSIX)."""
pwrite = getattr(os, "pwrite", _seek_pwrite)
"""Write ``data`` at ``offset`` (POSIX ``pwrite(2)``; Python has it only on POSIX)."""


def wait_ready(
    read: tuple[int, ...], write: tuple[int, ...], timeout: float | None = None
) -> tuple[list[int], list[int]]:
    """The descriptors of ``read`` that can be read and those of ``write`` that can be
    written, waiting up to ``timeout`` seconds for one (None: as long as it takes), as
    ``select.select`` says, but for any descriptor number: select(2) refuses those past
    ``FD_SETSIZE`` (1024), which a process that inherited many has. An error or hang-up
    counts as ready: the read or write that follows says what it is."""
    if not hasattr(select, "poll"):  # Windows: sockets only, as select takes them
        readable, writable, _ = select.select(read, write, [], timeout)
        return readable, writable
    poller = select.poll()
    masks: dict[int, int] = {}
    for fd in read:
        masks[fd] = masks.get(fd, 0) | select.POLLIN
    for fd in write:
        masks[fd] = masks.get(fd, 0) | select.POLLOUT
    for fd, mask in masks.items():
        poller.register(fd, mask)
    events = dict(poller.poll(None if timeout is None else timeout * 1000))
    done = select.POLLERR | select.POLLHUP | select.POLLNVAL
    return ([fd for fd in read if events.get(fd, 0) & (select.POLLIN | done)],
            [fd for fd in write if events.get(fd, 0) & (select.POLLOUT | done)])


def hung_up(fd: int) -> bool:
    """Whether ``fd`` (a pipe's or socket's end that is written to) reports that nobody
    can read what is written to it any more: POLLHUP or POLLERR, as poll(2) says with no
    event asked for. False where that cannot be asked (Windows)."""
    if not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(fd, 0)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def stop_signals() -> tuple[int, ...]:
    """The signals that ask a process to stop (Windows has no SIGHUP; its Ctrl-Break
    is SIGBREAK). A function, so that taking a lock never imports `signal`."""
    import signal

    return tuple(
        getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT", "SIGBREAK")
        if hasattr(signal, name)
    )


def run_signals() -> tuple[int, ...]:
    """What `fencelock run` owns and passes on to its command: the stop signals, and
    the others whose default action ends a process and that a supervisor or a user may
    send (SIGQUIT, Ctrl-\\; SIGUSR1, SIGUSR2, SIGALRM), so that none ends it holding the
    session."""
    import signal

    return stop_signals() + tuple(
        getattr(signal, name) for name in ("SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
        if hasattr(signal, name)
    )


def in_terminal_foreground(pid: int) -> bool:
    """Whether process ``pid`` is in its terminal's foreground process group, to which
    the terminal sends Ctrl-C's SIGINT (not so a command that moved to a group of its
    own: ``timeout``, ``setsid``). On Windows, True: the console sends Ctrl-C to every
    process attached to it (a child started without a process group of its own, as
    `fencelock run`'s command is), and a child can be sent no SIGINT."""
    if WINDOWS:
        return True
    try:
        fd, = map(os.open, ("/dev/tty",), (os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | O_CLOEXEC,))
    except OSError:
        return False
    try:
        return bool(os.tcgetpgrp(fd) == os.getpgid(pid))
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def initial_environment(name: str) -> tuple[bool, str | None]:
    """Variable ``name`` as the process was started with it (None: unset), before the
    interpreter changed its own copy (Python's locale coercion sets ``LC_CTYPE``, PEP
    538); (False, None) where the system does not say (``/proc/self/environ``)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return False, None
    key = os.fsencode(name) + b"="
    for entry in block.split(b"\0"):
        if entry.startswith(key):
            return True, os.fsdecode(entry[len(key):])
    return True, None


def holds_flock(fd: int) -> bool | None:
    """Whether the open file description behind ``fd`` holds a flock(2) lock (the
    system's ``/proc/self/fdinfo`` lists it); None where the system does not say."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            info = f.read()
    except OSError:
        return None
    return any(line.startswith("lock:") and " FLOCK " in line for line in info.splitlines())


_MOUNTS = "/proc/self/mounts"
_MOUNTINFO = "/proc/self/mountinfo"


def _unescaped(field: bytes) -> str:
    """A mountinfo path as the filesystem names it: the kernel writes a space, tab,
    newline and backslash as octal escapes (``\\040``), and every other byte as it is."""
    import re  # only where mounts are looked up

    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


class Mount(NamedTuple):
    """One mount of this process's mount namespace."""

    point: str
    root: str
    """The directory of its filesystem mounted there: ``/``, or a bind-mounted
    subdirectory's path in its filesystem."""
    device: tuple[int, int]
    """Its filesystem's (major, minor) device numbers."""


def mounts() -> list[Mount]:
    """The mounts of this process's mount namespace (``/proc/self/mountinfo``), longest
    point first, and of mounts stacked on one point the ones on top first; only ``/``
    where the system does not list them."""
    try:
        with open(_MOUNTINFO, "rb") as f:
            lines = f.read().split(b"\n")  # a \r in a path is written as it is
    except OSError:
        return [Mount("/", "/", (-1, -1))]
    stacked: dict[str, list[tuple[bytes, bytes, Mount]]] = {}
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            major, _, minor = fields[2].partition(b":")
            root = _unescaped(fields[3])
            if root.endswith("//deleted"):  # the bind-mounted directory was removed
                root = root[: -len("//deleted")]
            point = _unescaped(fields[4])
            device = (int(major), int(minor)) if major.isdigit() and minor.isdigit() \
                else (-1, -1)
            stacked.setdefault(point, []).append(
                (fields[0], fields[1], Mount(point, root, device)))
    found: list[Mount] = []
    for group in stacked.values():
        # On top: a mount no other mount at that point is mounted on (mountinfo's order
        # is not the stacking order: `mount --move` and mounts made beneath reorder it).
        parents = {parent for _, parent, _ in group}
        found += reversed([mount for mount_id, _, mount in group if mount_id not in parents])
        found += reversed([mount for mount_id, _, mount in group if mount_id in parents])
    return sorted(found, key=lambda mount: len(mount.point), reverse=True)  # stable


def mounts_table() -> str | None:
    """The system's table of mounted filesystems (``/proc/self/mounts``: device, mount
    point, type, ... per line), None where the system offers none."""
    try:
        with open(_MOUNTS, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


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

    def hand_over() -> None:
        """Nothing to do: a waiter here polls (see `lock_blocking`)."""

    def lock_session(fd: int, shared: bool, limit: float) -> int:
        """`TAKEN`: nothing to take. The session file's own lock orders appends with a
        recover's moved mark, which Windows never has (no extended attributes)."""
        return TAKEN

    def set_mode(fd: int, mode: int, owner: tuple[int, int] | None = None) -> None:
        """Nothing to do: Windows files carry no POSIX permission bits."""

    def owner_for(
        path: str, like: str = "", st: os.stat_result | None = None
    ) -> tuple[int, int] | None:
        """Nobody: Windows files carry no POSIX owners to give."""
        return None

    def group_of_new(path: str, like: os.stat_result) -> int | None:
        """None: Windows files carry no POSIX group."""
        return None

    def creating_refused(directory: str) -> int:
        """0: access(2) on a Windows directory says nothing of creating files in it (only
        its read-only attribute, which does not stop that); the create itself tells."""
        return 0

else:
    import fcntl

    _flock = fcntl.flock
    _geteuid = os.geteuid
    _EX_NB = fcntl.LOCK_EX | fcntl.LOCK_NB
    _SH_NB = fcntl.LOCK_SH | fcntl.LOCK_NB

    def try_lock(fd: int, shared: bool = False) -> bool:
        """Take the lock without waiting; False when someone else has it.

        ``shared`` is a probe's test lock (never held for long).
        """
        try:
            _flock(fd, _SH_NB if shared else _EX_NB)
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
            _flock(fd, _EX_NB)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def lock_blocking(fd: int, shared: bool = False) -> None:
        """Sleep in the kernel until the lock is ours: hand-off is immediate."""
        _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)

    def unlock(fd: int) -> None:
        _flock(fd, fcntl.LOCK_UN)

    _SESSION_STEP = 0.001

    def lock_session(fd: int, shared: bool, limit: float) -> int:
        """Take flock(2)'s lock on the session file itself (``fd``; its sidecar's lock
        is another file's), shared for an append, exclusive for a recover setting its
        moved mark (PROTOCOL.md 5.1), waiting up to ``limit`` seconds: `TAKEN` at
        once, `TAKEN_AFTER_A_WAIT` (whoever held it meanwhile may have written: look at
        the file again), `NOT_TAKEN` when it could not be had by then. Either side holds
        it for one write and its fsync, so the wait is polled. Where the filesystem
        refuses it (a descriptor opened read only where flock is emulated with POSIX
        locks, as on NFS), `TAKEN`: it orders nothing there, as without it."""
        how = _SH_NB if shared else _EX_NB
        deadline = 0.0
        while True:
            try:
                _flock(fd, how)
            except BlockingIOError:
                now = time.monotonic()
                if not deadline:
                    deadline = now + limit
                elif now >= deadline:
                    return NOT_TAKEN
                time.sleep(_SESSION_STEP)
                continue
            except OSError:
                return TAKEN
            return TAKEN_AFTER_A_WAIT if deadline else TAKEN

    _sched_yield = getattr(os, "sched_yield", lambda: None)

    def hand_over() -> None:
        """Right after `unlock` that ends a long hold: let a waiter the unlock woke run
        first. Linux often wakes it on the releaser's own CPU, where it would wait until
        the releaser blocks or its time slice ends; a yield with nothing else to run
        costs one system call."""
        _sched_yield()

    def set_mode(fd: int, mode: int, owner: tuple[int, int] | None = None) -> None:
        """Give a file this process has just created exactly ``mode``, which the open's
        own mode argument gets only as far as the umask lets it (``mode=0o660`` under
        umask 022 would be 0o640, shutting the group out), and ``owner`` (uid, gid):
        see `owner_for`. Best effort: a filesystem without POSIX permissions (FAT, some
        SMB mounts) refuses and keeps its own."""
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)
        if owner is not None:
            with contextlib.suppress(OSError):
                os.fchown(fd, *owner)

    def owner_for(
        path: str, like: str = "", st: os.stat_result | None = None
    ) -> tuple[int, int] | None:
        """Who a file fencelock makes at ``path`` should belong to when it runs as root
        (an operator's ``sudo fencelock run``, ``hold`` or ``recover``), so that the
        user whose session it is is not locked out of it by a root-owned 0600 file:
        the owner and group of the session file it is made for (``st``, its stat taken
        through the descriptor its data is read from; else ``like``'s, if a regular
        file is there), or where there is none, of its directory (unless that is
        root's). None (root's it stays) when not root, and in a directory anyone may
        write to, where another user's file is refused as planted."""
        if _geteuid() != 0:
            return None
        try:
            where = os.stat(os.path.dirname(path) or ".")
            if where.st_mode & 0o002:
                return None
            if st is None and like:
                with contextlib.suppress(FileNotFoundError):
                    found = os.lstat(like)
                    if not stat.S_ISREG(found.st_mode):
                        return None
                    st = found
        except OSError:
            return None
        if st is not None:
            return st.st_uid, st.st_gid
        if (where.st_uid, where.st_gid) == (0, 0):
            return None
        return where.st_uid, where.st_gid

    def group_of_new(path: str, like: os.stat_result) -> int | None:
        """The group a file this process makes at ``path`` for the session ``like`` (its
        stat) gets: as root, the session's (`owner_for`), or root's own where it keeps
        its files; else the directory's where it is set-group-ID, else this process's
        effective group. None where that cannot be told."""
        if _geteuid() == 0:
            owner = owner_for(path, st=like)
            return os.getegid() if owner is None else owner[1]
        try:
            where = os.stat(os.path.dirname(path) or ".")
        except OSError:
            return None
        return where.st_gid if where.st_mode & stat.S_ISGID else os.getegid()

    def creating_refused(directory: str) -> int:
        """Why a file cannot be made in ``directory``, asked without making one: EROFS
        on a read-only filesystem; EPERM for root (whom only an attribute such as
        immutable stops), else EACCES, where write and search permission are missing;
        0 where nothing says it cannot (then only the create itself can tell)."""
        try:
            if os.access(directory, os.W_OK | os.X_OK, effective_ids=EFFECTIVE_IDS):
                return 0
            if os.statvfs(directory).f_flag & os.ST_RDONLY:
                return errno.EROFS
        except OSError:
            return 0
        return errno.EPERM if _geteuid() == 0 else errno.EACCES


def describe_mode(mode: int, path: str = "") -> str:
    """What a non-regular file is, in words for an error message; a symlink at ``path``
    that leads nowhere but round a loop is named as such."""
    if path and stat.S_ISLNK(mode) and leads_in_a_loop(path):
        return "a symlink that leads in a loop"
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



def leads_in_a_loop(path: str) -> bool:
    """Whether following ``path`` goes round a loop of symlinks."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


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
    for diagnosis only, never for deciding whether a lock is held. The list read is
    kept for a moment (`_LOCKS_KEPT`): a scan that names many holders decides them in
    bursts, and reads it once a burst, not once a row. Its callers ask once they have
    seen the lock held for a probe's grace (50 ms), longer than the list is kept: a
    holder that held it through the grace is in the list (one that took it over from
    another within the grace may not be).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        st = os.stat(path, follow_symlinks=False)
        where = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        at, listed = _locks
        if time.monotonic() - at >= _LOCKS_KEPT:
            listed = _read_locks()
    except OSError:
        return None
    return tuple(LockOwner(pid, shared, _command(pid)) for pid, shared in listed.get(where, ()))


_LOCKS_KEPT = 0.02
"""Seconds `lock_owners` answers from the list it read last (a lock may change hands
within them, as it may between any read of the list and its use)."""
_locks: tuple[float, dict[tuple[int, int, int], list[tuple[int, bool]]]] = (-1e9, {})
"""When ``/proc/locks`` was read last, and its flock entries: (major, minor, inode) to
(pid, shared) pairs."""


def _read_locks() -> dict[tuple[int, int, int], list[tuple[int, bool]]]:
    global _locks
    at = time.monotonic()
    with open(_PROC_LOCKS, "rb") as f:
        listing = f.read()
    listed: dict[tuple[int, int, int], list[tuple[int, bool]]] = {}
    for line in listing.splitlines():
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
        if pid <= 0:  # 0 or -1: an owner this namespace cannot name
            continue
        owner = (pid, parts[3] == b"READ")
        owners = listed.setdefault(where, [])
        if owner not in owners:  # the list is read in pieces: one changing meanwhile can
            owners.append(owner)  # repeat a line
    _locks = (at, listed)
    return listed


def _command(pid: int) -> str | None:
    """Process ``pid``'s command name (``/proc/<pid>/stat``'s, which is ``comm``'s); None
    when it is gone, or has exited and is not yet reaped (a zombie with no thread left:
    its descriptors are closed, so what holds the lock it took is a process that
    inherited one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    head, _, rest = data.rpartition(b")")
    if rest.split()[:1] in ([b"Z"], [b"X"]) and not _threads_left(pid):
        return None
    return os.fsdecode(head.partition(b"(")[2])


def _threads_left(pid: int) -> bool:
    """Whether threads of process ``pid`` run on after its first one exited (which
    leaves that one a zombie while they do)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False
