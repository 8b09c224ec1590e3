"""The locks the benchmark measures, each behind one `Locker` interface: fencelock's
`SessionLock`, raw ``flock(2)`` syscalls, ``filelock.FileLock``, ``portalocker.Lock``
(polling and kernel-blocking), and `FloorLock`, protocol v1 in bare syscalls.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import platform
import re
import stat
import time
from collections.abc import Callable
from typing import Protocol

import fencelock
from fencelock import _identity
from fencelock._moved import XATTR as MOVED

# An internal the protocol floor needs, imported deliberately: it writes records in
# fencelock's own layout, so that fencelock reads them, continues their tokens and
# releases with the same one-pwrite patch.
from fencelock._record import (
    MAX_TOKEN,
    RECORD_HEAD,
    RELEASE_PATCH,
    STATE_OFFSET,
    TOKEN_WIDTH,
    Phase,
    State,
)
from fencelock._sidecar_holder import _MARK_TRUST_AGE_NS as MARK_TRUST_AGE_NS
from fencelock._sidecar_holder import HAND_OVER_AFTER
from fencelock._tokens import (
    RESERVE,
    SET_ASIDE_MARKER,
    TAIL,
    XATTR,
    _mark_value,
    _read_mark,
    _set_aside_tokens,
    removed_token,
)

# The peers come with the optional "bench" extra; without it their columns are empty.
try:
    import filelock
except ImportError:
    filelock = None  # type: ignore[assignment]
try:
    import portalocker
except ImportError:
    portalocker = None  # type: ignore[assignment]

# The raw peer and the floor are POSIX syscalls by design: they are what flock costs.
RAW_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
SESSION_FLAGS = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""A holder's open of the session for an append (protocol v1, section 3), adding
``O_CREAT | O_EXCL`` where the run's fingerprint is null."""


class Locker(Protocol):
    def acquire(self) -> None: ...
    def release(self) -> None: ...


@functools.lru_cache(maxsize=1024)
def _record_middle(session: str, lane: str, pid: int) -> str:
    """A record's fields that stay the same for a session, lane and process: made once,
    as fencelock makes them once per lock object and process (a fresh peer for each
    cycle must not pay for them each time)."""
    return (
        f',"pid":{pid},"host":{json.dumps(platform.node())}'
        f',"process_start":{json.dumps(_identity.ME.start)},"session":{json.dumps(session)}'
        f',"lane":{json.dumps(lane)},"fence":"stat","acquired_at":'
    )


class RecordMaker:
    """Holder records in fencelock's layout (`fencelock._record`: `RECORD_HEAD`,
    `TOKEN_WIDTH`), built at each acquire with the time and the next token, as any
    holder that writes a record must: the floor's, and the peers' records of the same
    size and cost. Their fixed parts are built once."""

    def __init__(self, session: str, lane: str) -> None:
        self.held = RECORD_HEAD[State.HELD, Phase.WRITE]
        self.released = RECORD_HEAD[State.RELEASED, Phase.WRITE]
        self.middle = _record_middle(session, lane, os.getpid())

        self.token = 0
        """The last token `next_held` gave."""

    def next_held(self) -> bytes:
        """A held record with the next token, acquired now (a peer's acquire)."""
        self.token += 1
        return self.make(self.token, time.time())

    def make(self, token: int, at: float, fp: str = "null", head: str | None = None) -> bytes:
        return (
            f'{head or self.held}{token:<{TOKEN_WIDTH}},"run_id":"{token}"'
            f'{self.middle}{at!r}'
            f',"heartbeat_at":{time.time()!r},"fingerprint":{fp},"previous":null}}'
        ).encode()


@functools.lru_cache(maxsize=64)
def record_bytes(path: str) -> bytes:
    """A record the size of fencelock's, for the sidecars the benchmark makes in bulk
    (made once per path)."""
    now = time.time()
    record = {
        "version": 1, "state": "held", "session": path, "pid": os.getpid(),
        "host": platform.node(), "process_start": "123456@00000000-0000-0000-0000-000000000000"
        "@4026531836", "lane": "bench", "run_id": "0123456789ab-1", "token": 1,
        "acquired_at": now, "heartbeat_at": now, "phase": "write",
        "fingerprint": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5},
        "previous": None, "fence": "stat",
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class RawLock:
    """The protocol in bare syscalls: open, flock, inode check, pwrite record / unlock, close."""

    def __init__(self, path: str, record: RecordMaker | None) -> None:
        self.path = path
        self.record = record
        self.fd = -1

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, RAW_FLAGS, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                now = os.lstat(self.path)
            except BaseException:
                os.close(fd)
                raise
            if st.st_ino == now.st_ino and st.st_dev == now.st_dev:
                break
            os.close(fd)
        if self.record is not None:
            os.pwrite(fd, self.record.next_held(), 0)
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class FileLockPeer:
    """``filelock.FileLock``, blocking acquire (it polls every ``poll_interval``, 0.05 s)."""

    def __init__(self, path: str, record: RecordMaker | None) -> None:
        assert filelock is not None
        hook: Callable[[int], None] | None = None
        if record is not None:
            maker = record

            def hook(fd: int) -> None:
                os.pwrite(fd, maker.next_held(), 0)

        self.lock = filelock.FileLock(path, on_acquired=hook)

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()


TIMED_WAIT = 60.0
"""The time limit of the timed waits the benchmark measures (fencelock's, and the
polling peers' own: portalocker's ``timeout``)."""


class PortalockerPeer:
    """``portalocker.Lock``: default flags poll every ``check_interval`` (0.25 s);
    ``blocking=True`` passes ``LockFlags.EXCLUSIVE`` so the wait sleeps in the kernel."""

    def __init__(self, path: str, record: RecordMaker | None, blocking: bool = False) -> None:
        assert portalocker is not None
        self.record = record
        flags = portalocker.LockFlags.EXCLUSIVE
        if not blocking:
            flags |= portalocker.LockFlags.NON_BLOCKING
        # "r+b", not the default "a": pwrite on an O_APPEND descriptor appends on Linux.
        # "r+b" creates nothing: the benchmark makes the lock file first, as it is where
        # portalocker's users lock one (an opener adding O_CREAT cost portalocker an
        # ioctl(FIOCLEX) and a Python call each acquire, about 1 us, flattering fencelock).
        # No timeout in blocking mode: the kernel waits (portalocker warns if given one).
        self.lock = portalocker.Lock(path, "r+b", timeout=None if blocking else TIMED_WAIT,
                                     flags=flags)

    def acquire(self) -> None:
        fh = self.lock.acquire()
        if self.record is not None:
            os.pwrite(fh.fileno(), self.record.next_held(), 0)

    def release(self) -> None:
        self.lock.release()


class FenceLockPeer:
    """fencelock's `SessionLock` (``on_contention="wait"``); ``path`` is the session.
    With ``timeout``, every acquire waits at most that long (as a caller passing a
    timeout does: the wait then blocks in a helper thread)."""

    def __init__(self, path: str, record: bytes | None = None, lane: str = "bench",
                 timeout: float | None = None) -> None:
        self.lock = fencelock.SessionLock(path, lane=lane, on_contention="wait",
                                          timeout=timeout)

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()


_FLOOR_TOKEN = re.compile(rb'"token":(\d+)')
_FLOOR_STAMP = re.compile(rb'"_fencelock":\{"token":(\d+)')


class FloorLock:
    """Protocol v1's floor: only the syscalls a v1 holder must make, in flat code.

    Acquire: open the sidecar, fstat it (a non-regular sidecar is refused), flock,
    lstat the path (the inode re-check), pread the old record (for the next token;
    with no record, the session's token floor: its mark, its last stamps, the
    directory's set-aside and removed-token markers), lstat the session (its fingerprint), read the
    session's token mark unless its stat is the one the mark was last read at (not
    carried over its own appends, as fencelock does not) and that stat's ctime was then
    20 ms old, pwrite the record. A
    fenced append: open the session (creating it with ``O_EXCL`` when the run found
    none, then its mark; else flock it shared and listxattr it: no recover's moved
    mark, PROTOCOL.md 5.1), fstat it (the fence check), on the run's first append pread
    its last byte (the torn-tail check), write, fsync, fstat (the new fence point),
    pread the line back (the concurrent-write check), lstat the session (still its
    name: not renamed over or removed meanwhile), listxattr it again (a mark set
    without the lock), close (which lets the shared lock go), and fsync the directory
    of a file it created; in the write phase the record need not be rewritten.
    Release: where the run found no session and made none, set the mark on one made
    since (access(2) says whether there is one), pwrite the record with ``"released"``
    and the last fence point (or only the ``"released"`` state when no append moved
    it), unlock, yield the CPU after a hold of 1 ms or more (fencelock's hand-over to a
    woken waiter, `_platform.hand_over`), close. The record's fixed
    parts are precomputed (`RecordMaker`, in fencelock's layout, with the in-place
    release at `STATE_OFFSET`). There is no registry, no reentrancy, no fork safety and
    no error handling: this is a lower bound for a Python holder that opens the sidecar
    per acquire, not a usable lock. ``path`` is the session.
    """

    def __init__(self, path: str, record: bytes | None = None, fsync: bool = True) -> None:
        self.session, self.sidecar, self.fsync = path, path + ".holder", fsync
        self.marker = os.path.join(os.path.dirname(path), SET_ASIDE_MARKER)
        self.fd = -1
        self.records = RecordMaker(path, "floor")
        self.token, self.at, self.fp = 0, 0.0, "null"
        self.behind = False
        self.first = True
        self.marked: tuple[str, int] = ("", 0)  # the stat at which the mark was read, and it

    def _write(self, head: str | None = None) -> None:
        os.pwrite(self.fd, self.records.make(self.token, self.at, self.fp, head), 0)

    @staticmethod
    def _fp(st: os.stat_result) -> str:
        return (f'{{"dev":{st.st_dev},"ino":{st.st_ino},"size":{st.st_size},'
                f'"mtime_ns":{st.st_mtime_ns},"ctime_ns":{st.st_ctime_ns}}}')

    def _mark(self) -> int:
        """The session's token mark (0 for none, or one that does not parse)."""
        try:
            return _mark_value(os.getxattr(self.session, XATTR, follow_symlinks=False))
        except OSError:
            return 0

    def _token_floor(self) -> int:
        """The session's token floor, for a sidecar with no record (section 4): its
        mark, the stamps in its last `TAIL` bytes, where the set-aside marker is
        beside it, the corrupt copies, and the directory's removed-token marker."""
        floor = self._mark()
        try:
            fd = os.open(self.session, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, TAIL, max(0, size - TAIL))
            os.close(fd)
            stamps = (int(t) for t in _FLOOR_STAMP.findall(tail))
            floor = max([floor, *(t for t in stamps if t <= MAX_TOKEN)])
        if os.path.lexists(self.marker):
            floor = max(floor, _set_aside_tokens(self.session))
        return max(floor, removed_token(os.path.dirname(self.session)))

    def acquire(self) -> None:
        while True:
            fd = os.open(self.sidecar, RAW_FLAGS, 0o600)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                os.close(fd)
                raise RuntimeError(f"{self.sidecar}: not a plain regular file")
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = os.lstat(self.sidecar)
            if st.st_ino == now.st_ino and st.st_dev == now.st_dev:
                break
            os.close(fd)
        m = _FLOOR_TOKEN.search(os.pread(fd, 4096, 0))
        self.token = int(m[1]) + 1 if m else self._token_floor() + 1
        try:
            st = os.lstat(self.session)
        except FileNotFoundError:
            self.fp = "null"
        else:
            self.fp = self._fp(st)
            seen, mark = self.marked
            if self.fp != seen or self.token > mark:
                mark = self._mark()
                if mark < self.token:  # raise it (a block of tokens): the ctime moves
                    mark = self.token + RESERVE - 1
                    os.setxattr(self.session, XATTR, b"%d" % mark, follow_symlinks=False)
                    st = os.lstat(self.session)
                    self.fp = self._fp(st)
                # An unchanged stat vouches for the mark only once its ctime is old
                # enough that a change within the clock's tick would have moved it.
                aged = time.time_ns() - st.st_ctime_ns > MARK_TRUST_AGE_NS
                self.marked = (self.fp, mark) if aged else ("", 0)
        self.fd, self.at, self.first = fd, time.time(), True
        self._write()

    def append(self, line: bytes) -> None:
        made = self.fp == "null"
        fd = os.open(self.session, SESSION_FLAGS | (os.O_CREAT | os.O_EXCL if made else 0),
                     0o600)
        try:
            if made:  # its mark first
                os.setxattr(fd, XATTR, b"%d" % (self.token + RESERVE - 1))
            else:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                if MOVED in os.listxattr(self.session, follow_symlinks=False):
                    raise RuntimeError(f"{self.session}: moved")
            size = os.fstat(fd).st_size
            if self.first and size:
                os.pread(fd, 1, size - 1)
            self.first = False
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
            self.fp = self._fp(os.fstat(fd))
            os.pread(fd, len(line), size)
            os.lstat(self.session)  # still the session's name (here it is found so)
            if not made and MOVED in os.listxattr(self.session, follow_symlinks=False):
                raise RuntimeError(f"{self.session}: moved")  # (set without the lock)
        finally:
            os.close(fd)
        if made:  # the new name made durable
            dfd = os.open(os.path.dirname(self.session) or ".", os.O_RDONLY | os.O_CLOEXEC)
            os.fsync(dfd)
            os.close(dfd)
        self.behind = True  # (the mark is read again at the next acquire, as fencelock does)

    def release(self) -> None:
        long = time.time() - self.at >= HAND_OVER_AFTER
        # No session at acquire, nor made by an append: mark one made since. After a
        # run's length, a session file renamed over the one the run began with too
        # (one lstat; here it is found the same).
        if self.fp == "null" and os.access(self.session, os.F_OK):
            with contextlib.suppress(OSError):
                if _read_mark(self.session) < self.token:
                    os.setxattr(self.session, XATTR, b"%d" % (self.token + RESERVE - 1),
                                follow_symlinks=False)
        elif long and self.fp != "null":
            with contextlib.suppress(OSError):
                os.lstat(self.session)
        if self.behind:
            self.behind = False
            self._write(self.records.released)
        else:
            os.pwrite(self.fd, RELEASE_PATCH, STATE_OFFSET)
        fd, self.fd = self.fd, -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        if long:
            os.sched_yield()  # as fencelock hands over after a long hold
        os.close(fd)


def make_locker(peer: str, path: str, record: bool = True) -> Locker:
    """A locker for ``peer`` on ``path`` (a lock file; for fencelock the session file)."""
    if peer == "fencelock":
        return FenceLockPeer(path)
    if peer == "fencelock-timed":
        return FenceLockPeer(path, timeout=TIMED_WAIT)
    if peer == "floor":
        return FloorLock(path)
    data = RecordMaker(path, "bench") if record else None
    if peer == "raw":
        return RawLock(path, data)
    if peer == "filelock":
        return FileLockPeer(path, data)
    if peer == "portalocker":
        return PortalockerPeer(path, data)
    if peer == "portalocker-blocking":
        return PortalockerPeer(path, data, blocking=True)
    raise ValueError(f"unknown peer {peer!r}")


def available(peer: str) -> bool:
    """Whether ``peer``'s library is installed (the "bench" extra)."""
    if peer == "filelock":
        return filelock is not None
    if peer.startswith("portalocker"):
        return portalocker is not None
    return True
