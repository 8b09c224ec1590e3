"""`SessionLock`: the run-level holder of one session file.

Life cycle: take a slot in the in-process registry (so two runs in one process
contend even where flock would not make them), open the sidecar, take its OS lock
(waiting in the kernel, or failing fast), check that the locked inode is still the
one at the path, then write the record. The lock stays held through the prompt
window; release marks the record ``released`` and drops the lock. The sidecar stays.
"""

from __future__ import annotations

import functools
import itertools
import os
import stat
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from fencelock import (
    _backend,
    _fence,
    _fingerprint,
    _identity,
    _platform,
    _record,
    _sidecar,
    _store,
    _tokens,
    _wait,
)
from fencelock._errors import (
    CorruptRecordError,
    FenceLockError,
    FenceLockWarning,
    NotHeldError,
    SessionContendedError,
    SessionWriteError,
    SidecarAccessError,
)
from fencelock._fingerprint import FenceMode, Fingerprint
from fencelock._record import HolderInfo, Phase, PreviousHolder, State

if TYPE_CHECKING:
    import asyncio

OnContention = Literal["wait", "fail"]

_CANCEL_POLL = 0.05

FAIL_GRACE = 0.05
"""How long ``on_contention="fail"`` waits when the lock is held but the record is not
``held``: a probe's momentary shared lock, or an acquirer about to write its record."""

_MARK_TRUST_AGE_NS = 20_000_000
"""How old a session file's ctime must be for its unchanged stat to vouch for its token
mark: a change within the same coarse clock tick (4-10 ms) leaves ctime as it was."""

RECORD_LAG = 1.0
"""In the write phase an append leaves the record alone unless it was last written
this many seconds ago: the record's fingerprint and heartbeat then lag the holder's own
appends by at most this much. Entering and leaving the prompt window, `touch` and
release write them at once."""

_PEEK_BYTES = 4096
"""A first read of the old record; records are far smaller unless something is wrong."""

_registry: dict[str, SessionLock] = {}
_registry_lock = threading.Lock()
_registry_cond = threading.Condition(_registry_lock)
"""Waited on by acquirers whose session another object of this process holds. The
uncontended path takes ``_registry_lock`` directly, which costs less than the
Condition's own context manager."""
_registry_waiters = 0


def _after_fork_in_child() -> None:
    # A forked child does not hold its parent's sessions: forget them, and close the
    # inherited descriptors (closing never unlocks: the parent's copy keeps the lock).
    global _registry_lock, _registry_cond, _registry_waiters
    for lock in _registry.values():
        lock._forget_in_child()
    _registry.clear()
    _registry_lock = threading.Lock()
    _registry_cond = threading.Condition(_registry_lock)
    _registry_waiters = 0
    _run_ids.reset()


class _RunIds:
    """Unique run ids without a syscall each: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)  # next() on it is atomic under the GIL

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter)}"


_run_ids = _RunIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cancelled() -> BaseException:
    import asyncio

    return asyncio.CancelledError()


@functools.lru_cache(maxsize=256)
def _directory_facts(directory: str) -> tuple[str, FenceMode]:
    """(real path, fence mode) of a sessions directory; cached, as both cost syscalls.

    Raises `ForeignSymlinkError` when the path goes through another user's symlink.
    Also warns, once per directory, when anyone may create files in the real directory:
    another user could then plant a sidecar or session of their own there.
    """
    real = _sidecar.real_directory(directory)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        mode = 0
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        shown = directory if real == directory else f"{directory} (really {real})"
        warnings.warn(
            f"{shown}: sessions directory is world-writable without the sticky bit; "
            f"any user can plant or delete sidecars there. chmod o-w (or +t) it",
            FenceLockWarning,
            stacklevel=4,
        )
    return real, _fingerprint.detect_mode(real)


@functools.lru_cache(maxsize=4096)
def _session_facts(session: str) -> tuple[str, FenceMode]:
    """(registry key, detected fence mode) of an absolute session path."""
    real_dir, mode = _directory_facts(os.path.dirname(session))
    return os.path.join(real_dir, os.path.basename(session)), mode


@functools.lru_cache(maxsize=1024)
def _static_part(
    *, pid: int, host: str, start: str, session: str, lane: str, fence: FenceMode,
    origin: str | None,
) -> str:
    """The record's fixed fields, shared by lock objects that would write the same."""
    return _record.static_part(
        pid=pid, host=host, process_start=start, session=session, lane=lane, fence=str(fence),
        origin=origin, extra={},
    )


def registry_key(session: str) -> str:
    """The in-process registry's key for a session: its real directory plus its name."""
    try:
        return _session_facts(session)[0]
    except FenceLockError:  # a path no SessionLock accepts: nothing here holds it
        return session


def _whoami() -> object:
    """The owner identity for reentrancy: the asyncio task if any, else the thread."""
    # No task can be running in a process that never imported asyncio.
    aio = sys.modules.get("asyncio")
    if aio is None or aio._get_running_loop() is None:
        return threading.get_ident()
    task = aio.current_task()
    return task if task is not None else threading.get_ident()


class SessionLock:
    """Holds one session file for a whole run. See the README for the protocol."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        lane: str = "default",
        *,
        on_contention: OnContention = "wait",
        timeout: float | None = None,
        fence: FenceMode | str = FenceMode.AUTO,
        stamp: bool = False,
        mode: int = 0o600,
        origin: str | None = None,
        backend: str | None = None,
    ) -> None:
        if on_contention not in ("wait", "fail"):
            raise ValueError(f"on_contention must be 'wait' or 'fail', not {on_contention!r}")
        if timeout is not None:
            timeout = _wait.limit(timeout)
        self.check_lane(lane)
        if origin is not None and len(origin) > _record.MAX_TEXT:
            raise ValueError(f"origin is longer than {_record.MAX_TEXT} characters")
        self.session, self.sidecar = _sidecar.paths(path)
        self.lane = lane
        self.on_contention: OnContention = on_contention
        self.timeout = timeout
        self.stamp = stamp
        self.mode = mode
        self.origin = origin
        self._key, detected = _session_facts(self.session)
        self.fence_mode = detected if fence == FenceMode.AUTO else FenceMode(fence)
        self._fd = -1
        self._io = threading.Lock()
        self._append_mu = threading.Lock()
        self._count = 0
        self._pid = 0
        self._owner: object = None
        self._info: HolderInfo | None = None
        """The record as a HolderInfo, built on demand from the fields below."""
        self._token = 0
        self._run_id = ""
        self._acquired_at = 0.0
        self._heartbeat_at = 0.0
        self._phase = Phase.WRITE
        self._previous: PreviousHolder | None = None
        self._static = ""
        self._static_pid = 0
        self._fp: Fingerprint | None = None
        self._record_len = 0
        self._written_at = 0.0
        """`time.monotonic` of the last record write."""
        self._behind = False
        """The record lags the fingerprint and heartbeat of the holder's last append."""
        self._tail_checked = False
        self._abort_callbacks: list[Any] = []
        self._token_floor = 0
        """A new sidecar's first token is above this (`recover` sets it for a fresh
        session that carries another session's stamped lines)."""
        self._mark_fp: Fingerprint | None = None
        self._mark = 0
        """The session's token mark was ``_mark`` (or more) when its stat was
        ``_mark_fp``: while the stat is unchanged, the mark need not be read again. Any
        change to the mark moves ctime; ctime is coarse (a clock tick), so only a stat
        whose ctime was `_MARK_TRUST_AGE_NS` old when the mark was read is trusted."""
        self._store = (
            None if backend is None and not _backend.env_set()
            else _store.open_store(backend, self.session)
        )
        """Where the holder lives when it is not the sidecar (e.g. etcd), else None."""

    # -- state -------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this process holds the session through this object."""
        return self._count > 0 and self._pid == _identity.ME.pid

    @property
    def info(self) -> HolderInfo | None:
        """The record as last written, while held."""
        if not self.held:
            return None
        if self._info is None:
            me = _identity.ME
            self._info = _record.holder_info(
                state=State.HELD, session=self.session, pid=me.pid, host=me.host,
                process_start=me.start, lane=self.lane, run_id=self._run_id, token=self._token,
                acquired_at=self._acquired_at, heartbeat_at=self._heartbeat_at,
                phase=self._phase, fingerprint=self._fp, previous=self._previous,
                fence=str(self.fence_mode), origin=self.origin, version=_record.VERSION,
                extra={},
            )
        return self._info

    def _encode(self, state: State = State.HELD) -> bytes:
        pid = _identity.ME.pid
        if self._static_pid != pid:
            me = _identity.ME
            self._static = _static_part(
                pid=pid, host=me.host, start=me.start, session=self.session, lane=self.lane,
                fence=self.fence_mode, origin=self.origin,
            )
            self._static_pid = pid
        return _record.encode(
            state=state, phase=self._phase, token=self._token, run_id=self._run_id,
            static=self._static, acquired_at=self._acquired_at,
            heartbeat_at=self._heartbeat_at, fingerprint=self._fp, previous=self._previous,
        )

    def _rewrite(self, **changes: Any) -> None:
        """Update some record fields and write the record again (or change nothing)."""
        before = {name: getattr(self, name) for name in changes}
        for name, value in changes.items():
            setattr(self, name, value)
        try:
            self._write_record()
        except BaseException:
            for name, value in before.items():
                setattr(self, name, value)
            raise

    def _write_record(self) -> None:
        # Under the object's own lock, so a heartbeat from another thread can never
        # write through a descriptor that release() has just closed.
        with self._io:
            if self._store is not None:
                self._info = None
                self._store.write(self._encode())
                return
            if self._fd < 0:
                raise NotHeldError(f"{self.session}: released while the record was updated")
            self._info = None
            self._record_len = _sidecar.write_bytes(
                self._fd, self.sidecar, self._encode(), self._record_len
            )
            self._written_at, self._behind = time.monotonic(), False

    def _forget_in_child(self) -> None:
        # The inherited descriptor itself is closed by _forkguard's hook.
        self._fd, self._count, self._info = -1, 0, None
        self._io = threading.Lock()  # another thread may have held it at the fork
        self._append_mu = threading.Lock()
        self._pid = -1  # marks "inherited through fork": release() becomes a no-op

    @staticmethod
    def check_lane(lane: str) -> None:
        """Raise ValueError for a lane no record can carry: longer than
        `_record.MAX_TEXT` characters, or not valid UTF-8 text (a name with bytes that
        are not UTF-8, as ``os.fsdecode`` gives them, would reach the record as escapes
        of lone surrogates, which strict JSON readers reject)."""
        if len(lane) > _record.MAX_TEXT:
            raise ValueError(f"lane is longer than {_record.MAX_TEXT} characters")
        if not lane.isascii():
            try:
                lane.encode()
            except UnicodeEncodeError:
                try:
                    raw = lane.encode("utf-8", "surrogateescape")
                    shown = "'" + raw.decode("utf-8", "backslashreplace") + "'"
                except UnicodeEncodeError:
                    shown = ascii(lane)
                raise ValueError(
                    f"lane {shown} is not valid UTF-8 text; name lanes in UTF-8"
                ) from None

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"<SessionLock {self.session!r} lane={self.lane!r} {state}>"

    # -- acquire / release -------------------------------------------------------

    def acquire(
        self, *, timeout: float | Literal["default"] | None = "default"
    ) -> HolderInfo:
        """Take the session; returns the record written. Reentrant for the same owner."""
        self._enter(self.timeout if timeout == "default" else _wait.limit(timeout))
        info = self.info
        assert info is not None
        return info

    def _enter(self, wait: float | None) -> None:
        me = _whoami()
        if self._count and self._owner == me and self._pid == _identity.ME.pid:
            self._count += 1
        else:
            self._acquire(me, None if wait is None else time.monotonic() + wait, None)

    def _acquire(
        self, me: object, deadline: float | None, cancel: threading.Event | None
    ) -> None:
        start = time.monotonic()
        # Every step inside the try, so that an interrupt (KeyboardInterrupt, a
        # cancellation) landing anywhere leaves neither the slot nor the lock behind.
        try:
            self._take_slot(deadline, cancel, start)
            if self._store is not None:
                self._acquire_store(me, deadline, cancel)
                return
            self._lock_sidecar(deadline, cancel, start)
            try:
                if cancel is not None and cancel.is_set():
                    raise _cancelled()  # got it just as the caller gave up
                self._write_new_record()
                self._count, self._owner, self._pid = 1, me, _identity.ME.pid
            except BaseException:
                self._count = 0
                self._unwrite_record()
                self._close_fd()
                raise
        except BaseException:
            self._free_slot()  # only if it is this object's
            raise

    def _acquire_store(
        self, me: object, deadline: float | None, cancel: threading.Event | None
    ) -> None:
        store = self._store
        assert store is not None

        def first_record(token: int, last: HolderInfo | None) -> bytes:
            self._token, self._run_id = token, self._run_id or _run_ids.next()
            self._previous = last.as_previous() if last is not None and last.state is State.HELD \
                else None
            self._acquired_at = self._heartbeat_at = time.time()
            self._phase = Phase.WRITE
            self._fp = _fingerprint.take(self.session, self.fence_mode)
            self._tail_checked = False
            self._info = None
            return self._encode()

        self._run_id = ""
        store.acquire(self.on_contention == "fail", deadline, cancel, first_record)
        try:
            if cancel is not None and cancel.is_set():
                raise _cancelled()
            self._count, self._owner, self._pid = 1, me, _identity.ME.pid
            # The record's fingerprint may predate the lock by a moment: the fence
            # starts from the session as it is now that the lock is ours.
            fp = _fingerprint.take(self.session, self.fence_mode)
            if fp != self._fp:
                self._rewrite(_fp=fp)
        except BaseException:
            self._count = 0
            store.release(None)
            raise

    def _take_slot(
        self, deadline: float | None, cancel: threading.Event | None, start: float
    ) -> None:
        global _registry_waiters
        with _registry_lock:
            while True:
                other = _registry.get(self._key)
                if other is None:
                    _registry[self._key] = self
                    return
                if cancel is not None and cancel.is_set():
                    raise _cancelled()
                remaining = None if deadline is None else deadline - time.monotonic()
                if self.on_contention == "fail" or (remaining is not None and remaining <= 0):
                    waited = time.monotonic() - start
                    raise SessionContendedError(self.session, other.info, waited=waited)
                _registry_waiters += 1
                try:
                    _registry_cond.wait(remaining)
                finally:
                    _registry_waiters -= 1

    def _free_slot(self) -> None:
        with _registry_lock:
            if _registry.get(self._key) is self:
                del _registry[self._key]
                if _registry_waiters:
                    _registry_cond.notify_all()

    def _lock_sidecar(
        self, deadline: float | None, cancel: threading.Event | None, start: float
    ) -> None:
        """Leave ``self._fd`` open and locked on the sidecar now at the path."""
        # While acquiring, self._fd names the descriptor this thread owns; while a helper
        # thread waits, the helper owns it. (Either way _forkguard closes a fork's copy.)
        while True:
            fd, st = _sidecar.open_checked(self.sidecar, create=True, mode=self.mode)
            self._fd = fd
            try:
                locked = _platform.try_lock(fd)
            except BaseException:
                self._close_fd()
                raise
            if not locked:
                self._fd = -1
                fd, st = self._wait_for_lock(fd, st, deadline, cancel, start)
                self._fd = fd
            if _sidecar.still_at_path(self.sidecar, st):
                return
            self._close_fd()  # removed or replaced while we waited: lock the new one

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _sidecar.close(fd)

    def _wait_for_lock(
        self,
        fd: int,
        st: os.stat_result,
        deadline: float | None,
        cancel: threading.Event | None,
        start: float,
    ) -> tuple[int, os.stat_result]:
        """Return a locked descriptor of the sidecar (``fd``, or one an earlier wait
        left blocked) and its stat; otherwise raise, with ``fd`` closed or handed off."""
        try:
            if self.on_contention == "fail":
                record = self._peek(fd, st)
                if may_be_live(record):
                    raise self._contended(None, record)
                # Otherwise the lock is held by a probe, or by an acquirer that has not
                # yet replaced a released or stale record: give it a moment.
                deadline = time.monotonic() + FAIL_GRACE
            if deadline is None and cancel is None and _platform.CAN_BLOCK:
                _platform.lock_blocking(fd)
                return fd, st
        except BaseException:
            _sidecar.close(fd)
            raise
        key = (self.sidecar, False)
        waiter = _wait.Waiter.start(key, fd)
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                # With a cancel event, wake every 50 ms to notice it.
                step = remaining if cancel is None else min(_CANCEL_POLL, remaining or _CANCEL_POLL)
                if (step is None or step > 0) and waiter.done.wait(step):
                    break
                if remaining is not None and remaining <= 0:
                    break
                if cancel is not None and cancel.is_set():
                    break
        except BaseException:  # e.g. KeyboardInterrupt, perhaps just as the lock came
            waiter.give_up_and_close()
            raise
        # From here the helper thread owns its fd unless give_up() says it is ours.
        locked = waiter.give_up()
        if not locked:
            if cancel is not None and cancel.is_set():
                raise _cancelled()
            raise self._contended(start)
        if waiter.fd == fd:
            return fd, st
        try:
            return waiter.fd, os.fstat(waiter.fd)
        except BaseException:
            _sidecar.close(waiter.fd)
            raise

    def _peek(self, fd: int, st: os.stat_result) -> HolderInfo | None:
        try:
            return _sidecar.read(fd, self.sidecar, st.st_size)
        except CorruptRecordError:
            return None

    def _contended(self, start: float | None, record: HolderInfo | None = None) -> Exception:
        if record is None:
            record = _read_quietly(self.sidecar)
        if record is not None and record.state is not State.HELD:
            record = None  # a record from before the live holder wrote its own
        waited = None if start is None else time.monotonic() - start
        # Without a held record a process outside fencelock has the lock: name it.
        owners = _platform.lock_owners(self.sidecar) if record is None else None
        return SessionContendedError(self.session, record, waited=waited, lock_owners=owners)

    def _write_new_record(self) -> None:
        fd, previous = self._fd, None
        try:
            data = os.pread(fd, _PEEK_BYTES, 0)
        except OSError as e:
            raise SidecarAccessError(self.sidecar, e, "its record cannot be read") from None
        old_len = len(data) if len(data) < _PEEK_BYTES else os.fstat(fd).st_size
        quick = _record.peek(data) if data and len(data) < _PEEK_BYTES else None
        if quick is not None and quick[0] is State.RELEASED:
            token = quick[1] + 1
        else:
            old = _sidecar.read(fd, self.sidecar, old_len)
            if old is None:
                token = max(_tokens.floor(self.session), self._token_floor) + 1
            else:
                token = old.token + 1
                previous = old.as_previous() if old.state is State.HELD else None
        if token > _record.MAX_TOKEN:
            raise FenceLockError(
                f"{self.sidecar}: its fencing tokens are exhausted ({token - 1}); check "
                f"where that token came from (the record, the session's "
                f"{_tokens.XATTR} attribute, .corrupt-* copies) before resetting them"
            )
        self._record_len = old_len
        self._token, self._run_id, self._previous = token, _run_ids.next(), previous
        self._acquired_at = self._heartbeat_at = time.time()
        self._phase = Phase.WRITE
        fp = self._session_fingerprint()
        if fp is not None and (token > self._mark or fp != self._mark_fp):
            wrote, self._mark = _tokens.reserve_known(self.session, token)
            if wrote:
                fp = _fingerprint.take(self.session, self.fence_mode)  # the mark moved ctime
            aged = fp is not None and time.time_ns() - fp.ctime_ns > _MARK_TRUST_AGE_NS
            self._mark_fp = fp if aged else None
        self._fp = fp
        self._tail_checked = False
        self._write_record()

    def _unwrite_record(self) -> None:
        """An interrupt (KeyboardInterrupt, a signal handler's exception) landed after
        this acquire wrote its record but before it counted as held: mark the record
        released, so the session does not read as stale once the lock is dropped."""
        if self._fd < 0 or not self._run_id:
            return
        try:
            record = _sidecar.read(self._fd, self.sidecar)
            if (
                record is not None and record.state is State.HELD
                and record.run_id == self._run_id and record.token == self._token
            ):
                os.pwrite(self._fd, _record.RELEASE_PATCH, _record.STATE_OFFSET)
        except (OSError, FenceLockError):
            pass  # it reads as stale: no worse than before
    def _session_fingerprint(self) -> Fingerprint | None:
        """The session's fingerprint now; the last one's object again if nothing moved."""
        if self.fence_mode is FenceMode.STAT:
            try:
                st = os.lstat(self.session)
            except FileNotFoundError:
                return None
            except OSError:
                pass  # take() below reports it
            else:
                last = self._fp
                if _fence._stat_matches(last, st) and stat.S_ISREG(st.st_mode):
                    return last
        return _fingerprint.take(self.session, self.fence_mode)

    def release(self) -> None:
        """Give the session back (once per acquire). A forked child never releases.

        Any thread or task of the holding process may call it, as with
        `threading.Lock`: ``await asyncio.wait_for(lock.acquire_async(), t)`` acquires in
        a task of its own, and the caller's task then releases.
        """
        if self._pid != _identity.ME.pid or self._count == 0:
            if self._pid == -1 or (self._count and self._pid != _identity.ME.pid):
                return  # inherited through fork: the parent's to release
            raise NotHeldError(f"{self.session}: release() without a matching acquire()")
        self._count -= 1
        if self._count:
            return
        if self._store is not None:
            try:
                with self._io:
                    data = self._encode()
                    at = _record.STATE_OFFSET
                    self._store.release(
                        data[:at] + _record.RELEASE_PATCH + data[at + len(_record.RELEASE_PATCH):]
                    )
            finally:
                self._info = None
                self._free_slot()
            return
        try:
            with self._io:
                fd, self._fd = self._fd, -1
                try:
                    if self._behind:  # the last appends' fence point, with "released"
                        self._behind = False
                        _sidecar.write_bytes(
                            fd, self.sidecar, self._encode(State.RELEASED), self._record_len
                        )
                    else:  # flip "held" to "released" in place: one small write
                        os.pwrite(fd, _record.RELEASE_PATCH, _record.STATE_OFFSET)
                except OSError as e:
                    raise SidecarAccessError(
                        self.sidecar, e, "the session is released, but its record still "
                        "says held (it will read as stale)"
                    ) from None
                finally:
                    try:
                        _platform.unlock(fd)
                    finally:
                        _sidecar.close(fd)  # also drops the lock if unlocking failed
        finally:
            self._info = None
            self._free_slot()

    # -- sharing the lock with a command (`fencelock run`) ---------------------------

    def _shared_fd(self) -> int:
        """The locked descriptor, for `fencelock run` to pass to the command it starts:
        a flock lock belongs to the open file description, so the command (and whatever
        it leaves running with the descriptor) holds the session with this process.
        -1 when the holder lives in a store (etcd): there is no descriptor to share."""
        self._require()
        return -1 if self._store is not None else self._fd

    def _name_command(self, pid: int) -> None:
        """Add ``command`` (the pid and start of the process that shares the lock) to
        the record, so a holder whose own process was killed is still named."""
        self._require()
        start = _identity.process_start(pid)
        with self._io:
            self._encode()  # makes self._static this process's fixed part
            self._static += _record.command_part(pid, start)
        self._write_record()

    def _release_shared(self) -> None:
        """Like `release`, for a lock shared with a command: mark the record released
        and close this process's descriptor without unlocking. LOCK_UN would free the
        session for every process sharing the descriptor; closing frees it only once
        the last of them has closed it (or exited)."""
        if self._pid != _identity.ME.pid or self._count != 1 or self._store is not None:
            self.release()
            return
        self._count = 0
        try:
            with self._io:
                fd, self._fd = self._fd, -1
                try:
                    os.pwrite(fd, _record.RELEASE_PATCH, _record.STATE_OFFSET)
                except OSError as e:
                    raise SidecarAccessError(
                        self.sidecar, e, "the session is released, but its record still "
                        "says held (it will read as stale)"
                    ) from None
                finally:
                    _sidecar.close(fd)
        finally:
            self._info = None
            self._free_slot()

    def __enter__(self) -> SessionLock:
        self._enter(self.timeout)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- asyncio -----------------------------------------------------------------

    async def acquire_async(self) -> HolderInfo:
        """Like `acquire`, but waiting happens off the event loop and can be cancelled."""
        import asyncio

        me = _whoami()
        if self.held and self._owner == me:
            self._count += 1
        else:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            cancel = threading.Event()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            # A thread of its own, not the loop's default executor: waits can last
            # minutes, and a few of them would starve to_thread() and getaddrinfo().
            threading.Thread(
                target=self._acquire_for, args=(loop, future, me, deadline, cancel),
                name="fencelock-acquire", daemon=True,
            ).start()
            try:
                await future
            except asyncio.CancelledError:
                cancel.set()
                with _registry_cond:
                    _registry_cond.notify_all()
                if future.done() and not future.cancelled() and future.exception() is None:
                    self.release()  # cancelled after the lock was delivered: give it back
                raise
        info = self.info
        assert info is not None
        return info

    def _acquire_for(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[None],
        me: object,
        deadline: float | None,
        cancel: threading.Event,
    ) -> None:
        """Acquire in a helper thread and hand the outcome to the awaiting task."""
        try:
            self._acquire(me, deadline, cancel)
            error: BaseException | None = None
        except BaseException as e:
            error = e

        def deliver() -> None:
            if future.cancelled():
                if error is None:
                    self.release()  # the task gave up just as the lock arrived
            elif error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            if error is None:
                self.release()

    async def __aenter__(self) -> SessionLock:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- the fence ---------------------------------------------------------------

    def _require(self) -> None:
        if not self.held:
            raise NotHeldError(f"{self.session}: this SessionLock does not hold the session")

    def append(self, entry: dict[str, Any] | str, *, stamp: bool | None = None) -> None:
        """Write one fenced, fsynced JSONL line; `SessionTakeoverError` if the fence moved."""
        self._require()
        use_stamp = self.stamp if stamp is None else stamp
        self._append_bytes(
            _fence.encode_entry(entry, (self._token, self._run_id) if use_stamp else None)
        )

    def _append_bytes(self, data: bytes) -> None:
        # One append at a time per holder: another thread's line landing between this
        # one's fence check and its write would read as a foreign write.
        with self._append_mu:
            self._append_locked(data)

    def _append_locked(self, data: bytes) -> None:
        self._require()
        if self._store is not None:
            self._store.check()  # a holder that may be lost writes nothing
        check_tail, self._tail_checked = not self._tail_checked, False
        try:
            fp = _fence.append(
                self.session, data, self._fp, self.fence_mode,
                check_tail=check_tail, file_mode=self.mode, token=self._token,
            )
        except SessionWriteError as e:
            if e.fingerprint is not None:
                self._fp = e.fingerprint
            raise
        self._tail_checked = True
        if self._mark_fp is not None and self._mark_fp == self._fp:
            self._mark_fp = fp  # our own line moved the stat, not a change to the mark
        self._fp, self._heartbeat_at = fp, time.time()
        if self._phase is Phase.PROMPT or time.monotonic() - self._written_at >= RECORD_LAG:
            self._write_record()
        else:
            self._behind, self._info = True, None

    def verify_fence(self) -> Fingerprint | None:
        """Raise `SessionTakeoverError` if the session moved since the last fence point."""
        self._require()
        if self._store is not None:
            self._store.check()
        return _fence.check(self.session, self._fp, self.fence_mode)

    def touch(self) -> None:
        """Heartbeat: refresh ``heartbeat_at`` so the holder is not reported stuck."""
        self._require()
        self._rewrite(_heartbeat_at=time.time())

    @contextmanager
    def prompt_window(self) -> Iterator[SessionLock]:
        """The model-call window: still held, ``phase: "prompt"``, fence checked on exit."""
        self._require()
        _fence.check(self.session, self._fp, self.fence_mode)
        self._rewrite(_phase=Phase.PROMPT, _heartbeat_at=time.time())
        try:
            yield self
        finally:
            if self.held:
                self._rewrite(_phase=Phase.WRITE, _heartbeat_at=time.time())
        # Against the fence point, which the holder's own appends inside the window move.
        self._fp = _fence.check(self.session, self._fp, self.fence_mode)

    # -- recovery hook -----------------------------------------------------------

    def on_abort(self, callback: Any) -> None:
        """Register a callable that in-process `recover` calls to abort this run."""
        self._abort_callbacks.append(callback)

    def _abort(self) -> None:
        for callback in list(self._abort_callbacks):
            callback()


def holder_alive(record: HolderInfo) -> bool | None:
    """Whether the record's owner still runs, or the command a `fencelock run` owner
    started (which shares its lock); None when that cannot be known from here."""
    alive = _identity.owner_alive(record.pid, record.host, record.process_start)
    command = _record.command_of(record) if not alive else None
    if command is None:
        return alive
    other = _identity.owner_alive(command[0], record.host, command[1])
    if other or alive is None or other is None:
        return other or None
    return False


def may_be_live(record: HolderInfo | None) -> bool:
    """Whether a record names a holder that may still run (for a lock found taken: a
    record that is not held, or whose owner is gone, means a probe or an acquirer
    about to write has the lock for a moment)."""
    return record is not None and record.state is State.HELD and holder_alive(
        record
    ) is not False


def held_in_process(session_key: str) -> SessionLock | None:
    """The lock object of this process that holds ``session_key``, if any."""
    with _registry_cond:
        return _registry.get(session_key)


def _read_quietly(sidecar: str) -> HolderInfo | None:
    try:
        fd, st = _sidecar.open_checked(sidecar, create=False)
    except Exception:
        return None
    try:
        return _sidecar.read(fd, sidecar, st.st_size)
    except Exception:
        return None
    finally:
        _sidecar.close(fd)
