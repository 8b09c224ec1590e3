"""The sidecar store: a session held through the flock of ``<session>.holder``.

This is protocol version 1's embedded store (docs/PROTOCOL.md): open the sidecar, take
its OS lock (waiting in the kernel, or failing fast), check that the locked inode is
still the one at the path, then write the record; the token is the last record's
plus one, never below the session file's token mark. Release marks the record
``released`` and drops the lock; the sidecar stays. `SessionLock` reaches it through
the `fencelock._store.SessionStore` interface, one `SidecarHolder` per lock object.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from fencelock import (
    _cleanup,
    _fingerprint,
    _forkguard,
    _identity,
    _platform,
    _record,
    _registry,
    _sidecar,
    _tokens,
    _wait,
)
from fencelock._errors import (
    CorruptRecordError,
    FenceLockError,
    NotHeldError,
    PlantedFileError,
    SessionContendedError,
    SidecarAccessError,
    record_lags,
    shell_word,
)
from fencelock._record import HELD, PROMPT, RELEASED, WRITE, HolderInfo

if TYPE_CHECKING:
    from fencelock._lock import SessionLock

_next_run_id = _identity.RUN_IDS.next
_CANCEL_POLL = 0.05

FAIL_GRACE = 0.05
"""How long ``on_contention="fail"`` waits when the lock is held but the record is not
``held``: a probe's momentary shared lock, or an acquirer about to write its record."""

NAMING_GRACE = 0.01
"""How long the error for a session found taken looks again at a record that names no
live run before naming the lock's holders as processes outside fencelock (`contended`)."""

_MARK_TRUST_AGE_NS = 20_000_000
"""How old a session file's ctime must be for its unchanged stat to vouch for its token
mark: a change within the same coarse clock tick (4-10 ms) leaves ctime as it was."""

RECORD_LAG = 1.0
"""In the write phase an append leaves the record alone unless it was last written
this many seconds ago: the record leaves out the appends made within this much of its
last write until it is written again (its heartbeat lags the holder's by less than
this; its fingerprint by those appends, however long the run then makes no other).
Entering and leaving the prompt window, `touch` and release write them at once."""

HAND_OVER_AFTER = 0.001
"""A release that ends a hold at least this long (in seconds) yields the CPU right
after unlocking (`_platform.hand_over`), so that a waiter does not wait for the rest of
the releaser's work: the yield costs a system call, nothing next to such a hold, and a
loop of short holds does not pay it."""

_PEEK_BYTES = 4096
"""A first read of the old record; records are far smaller unless something is wrong."""


def _released_note(session: str) -> str:
    """The fix of a release whose record could not be marked released."""
    return ("the session is released, but its record still says held, so it reads as "
            f"stale; once the sidecar can be written, fencelock clear {shell_word(session)} "
            "marks it released")


def holder_alive(record: HolderInfo) -> bool | None:
    """Whether the record's owner still runs, or the command a `fencelock run` owner
    started (which shares its lock); None when that cannot be known from here."""
    alive = _identity.owner_alive(record.pid, record.host, record.process_start)
    command = record.command if not alive else None
    if command is None:
        return alive
    other = _identity.owner_alive(command.pid, record.host, command.process_start)
    if other or alive is None or other is None:
        return other or None
    return False


def may_be_live(record: HolderInfo | None) -> bool:
    """Whether a record names a holder that may still run (for a lock found taken: a
    record that is not held, or whose owner is gone, means a probe or an acquirer
    about to write has the lock for a moment)."""
    return record is not None and record.state is HELD and holder_alive(
        record
    ) is not False


def held_by_others(record: HolderInfo | None) -> bool:
    """Whether the lock on a sidecar holding ``record`` may be held by processes that are
    not the record's run, so that they are named from the system's lock list: no record,
    a released one, or one whose owner is dead (for a `fencelock run`'s, its command
    too: then what that command left running may hold it on, which the list tells from
    a process outside fencelock, `_record.left_by_run`)."""
    if record is None or record.state is not HELD:
        return True
    return holder_alive(record) is False


def contended(
    session: str, sidecar: str, record: HolderInfo | None = None, waited: float | None = None
) -> SessionContendedError:
    """The error for a session whose sidecar's lock someone else holds: named by its
    record (read now unless given), or, when that is a past run's, by the processes the
    system lists (or as the leftovers of the `fencelock run` that record names).

    A record read now that names no live run is read again for up to `NAMING_GRACE`: an
    acquirer writes its record only once it has the lock, so a lane that takes the
    session again right after releasing it, or the next run taking over, holds the lock
    over the record of the run before for a moment, and would be named as a process
    outside fencelock."""
    if record is None:
        record = read_quietly(sidecar)
        end = time.monotonic() + NAMING_GRACE
        while held_by_others(record):  # read again at least once, however late this runs
            time.sleep(NAMING_GRACE / 10)
            record = read_quietly(sidecar)
            if time.monotonic() >= end:
                break
    last = None
    if held_by_others(record):
        last, record = record, None  # a past run's record: released, or its owner dead
    owners = _platform.lock_owners(sidecar) if record is None else None
    return SessionContendedError(session, record, waited=waited, lock_owners=owners,
                                 last=_record.left_by_run(last, owners))


def read_quietly(sidecar: str) -> HolderInfo | None:
    """The sidecar's record, or None when there is none or it cannot be read."""
    try:
        return _sidecar.using(
            sidecar, lambda opened, st: _sidecar.read(opened.fd, sidecar, st.st_size))
    except Exception:
        return None


class SidecarHolder:
    """One `SessionLock`'s holder in the session's sidecar: the locked descriptor, the
    record's length on disk, and what the session's token mark was last seen to be."""

    __slots__ = (
        "_behind",
        "_fd",
        "_mark",
        "_mark_fp",
        "_moving",
        "_opened",
        "_record_len",
        "_since",
        "_unmarked",
        "_written",
        "_written_at",
        "_written_token",
        "mode",
        "name",
        "session",
        "sidecar",
    )

    shares_fd = True
    """`fencelock run` can hand the locked descriptor to its command."""
    opens_session = False
    """Fence checks stat the session's path: one host, no cached attributes to doubt."""
    tries_in_place = True
    releases_in_place = True
    cancel_grace = 10.0
    """A waiting attempt notices a cancel within 50 ms (`_CANCEL_POLL`); only a host that
    does not run its thread takes longer, and the cancelled task waits for it rather
    than end while the attempt may still take the lock."""
    space = ""
    record_extra: dict[str, Any] | None = None
    """The record is fencelock's own fields only."""

    def __init__(self, session: str, sidecar: str, mode: int) -> None:
        self.session = session
        self.sidecar = sidecar
        self.name = sidecar
        self.mode = mode
        self._fd = -1
        self._opened: object = None
        """``_fd``'s tracking entry (`_forkguard.entry`), for the release's close."""
        self._record_len = 0
        self._written = b""
        self._written_token = 0
        """The sidecar's bytes after this holder's last record write, and that record's
        token. A release leaves them with the head released in place, or writes them
        released: the next acquire that reads back exactly that takes the token from
        here (no parse)."""
        self._written_at = 0.0
        """`time.monotonic` of the last record write."""
        self._since = 0.0
        """`time.monotonic` of the run's first record write: how long it holds is told
        by it, not by the record's wall-clock time, which a clock set back shortens."""
        self._behind = False
        """The record lags the fingerprint and heartbeat of the holder's last append."""
        self._unmarked = False
        """The session file did not exist at acquire, so no token mark covers this run's
        token: if it exists when the run ends (made by the holder's own writer, a
        `fencelock run` command, or anything else), the release sets the mark. An
        append that creates it sets the mark itself and clears this."""
        self._moving = False
        """The sidecar had `_sidecar.MOVING` set when this acquire locked it: a recover
        is moving, or was killed moving, the session's last run (docs/PROTOCOL.md 5.1)."""
        self._mark_fp: _fingerprint.Fingerprint | None = None
        self._mark = 0
        """The session's token mark was ``_mark`` (or more) when its stat was
        ``_mark_fp``: while the stat is unchanged, the mark need not be read again. Any
        change to the mark moves ctime; ctime is coarse (a clock tick), so only a stat
        whose ctime was `_MARK_TRUST_AGE_NS` old when the mark was read is trusted. Not
        carried over the holder's own appends: a change to the mark made while a line
        was being written (or under the content fence, which does not compare ctime,
        any time in the run) is taken into the stat the append leaves."""

    # -- acquire -----------------------------------------------------------------

    def acquire(
        self,
        lock: SessionLock,
        me: object,
        deadline: float | None,
        cancel: threading.Event | None,
        start: float,
        only_if_free: bool = False,
    ) -> bool:
        """Lock the sidecar, write the first record and count ``lock`` as held by ``me``
        (`SessionStore.acquire`)."""
        run_id = _next_run_id()
        lock._prepare_record(run_id)
        # The lock object's ``_io`` is taken before the wait and held until the first
        # record is written: a thread whose `touch` began in the previous run then writes
        # after it, never into a half-set record, and the first write needs no lock of
        # its own after the wait. (``with``, not explicit acquire/release calls: a signal
        # handler that raises runs right after a call returns, and would leave it held.)
        with lock._io:
            locked = False
            try:  # from the lock on: an interrupt landing anywhere leaves it not taken
                if not self._lock_sidecar(lock, deadline, cancel, start, only_if_free):
                    return False
                locked = True
                if cancel is not None and cancel.is_set():
                    raise _registry.cancelled()  # got it just as the caller gave up
                self._write_new_record(lock, run_id)
                lock._count, lock._owner, lock._pid = 1, me, _identity.ME.pid
                return True
            except BaseException as e:
                lock._count = 0

                def remove_if_empty(error: BaseException = e) -> None:
                    # No record of ours was written. Only where no process outside
                    # fencelock may wait on the sidecar (flock(1) would not look again
                    # at the path, and would hold a removed file): a planted session
                    # (refused: its owner could not open a sidecar of ours), and a
                    # fresh session of recover's, whose name only recovers know.
                    if locked and (lock._sole_name or isinstance(error, PlantedFileError)):
                        self._remove_if_empty()

                steps = (lambda: self._unwrite_record(lock, run_id), remove_if_empty,
                         self._close_fd)
                try:
                    _cleanup.to_the_end(*steps)
                except BaseException:  # one that landed as it was entered: once more
                    _cleanup.to_the_end(*steps)
                    raise
                raise

    def _remove_if_empty(self) -> None:
        """After a failure with the lock taken and no record written: remove the sidecar
        if it is empty (this acquire made it, most likely), while its lock is still ours
        (a waiter of fencelock's looks at the path again once it has the lock)."""
        with contextlib.suppress(OSError):
            _sidecar.unlink_if_still(self.sidecar, os.fstat(self._fd), self._fd)

    def _lock_sidecar(
        self,
        lock: SessionLock,
        deadline: float | None,
        cancel: threading.Event | None,
        start: float,
        only_if_free: bool,
    ) -> bool:
        """Leave ``self._fd`` open and locked on the sidecar now at the path: True. With
        ``only_if_free``, where it is locked: closed, and False."""
        # While acquiring, self._fd names the descriptor this thread owns; while a helper
        # thread waits, the helper owns it. (Either way _forkguard closes a fork's copy.)
        while True:
            try:
                # ``self._fd`` and ``self._opened`` set as it is tracked, before it returns
                fd, st = _sidecar.open_checked(self.sidecar, create=True, mode=self.mode,
                                               like=lock._like, into=self)
            except SidecarAccessError:
                if only_if_free:
                    return False  # the wait's thread says why (a probe may wait a moment)
                if lock.on_contention == "fail" or deadline is not None:
                    self._raise_if_held_elsewhere()  # (a wait could not end in the lock)
                raise
            try:
                locked = _platform.try_lock(fd)
            except BaseException:
                self._close_fd()
                raise
            if not locked:
                if only_if_free:
                    self._close_fd()
                    return False
                fd, st = self._wait_for_lock(lock, fd, st, deadline, cancel, start)
            now = _sidecar.at_path(self.sidecar, st)  # (taken once the lock is ours)
            if now is not None:
                self._moving = bool(now.st_mode & _sidecar.MOVING)
                return True
            self._close_fd()  # removed or replaced while we waited: lock the new one

    def _close_fd(self) -> None:
        """Close ``_fd``; safe to run again after an interrupt cut it short
        (`_cleanup.to_the_end`): only while it is still the open ``_opened`` names."""
        fd, opened = self._fd, self._opened
        if fd >= 0:
            _forkguard.close_if_still(fd, opened)
            self._fd = -1

    def _wait_for_lock(
        self,
        lock: SessionLock,
        fd: int,
        st: os.stat_result,
        deadline: float | None,
        cancel: threading.Event | None,
        start: float,
    ) -> tuple[int, os.stat_result]:
        """Return a locked descriptor of the sidecar (``fd``, or one an earlier wait
        left blocked) and its stat, with ``self._fd`` naming it; otherwise raise.

        ``self._fd`` is ``fd`` on entry, and names at every moment the descriptor this
        thread must close if an interrupt (KeyboardInterrupt, a signal handler's
        exception) lands (the caller closes it): ``fd`` until a helper thread takes it,
        -1 while the helper waits, the locked descriptor once `give_up` hands it back."""
        _sidecar.refuse_own_run(self.sidecar, fd, st)
        fail = lock.on_contention == "fail"
        record: HolderInfo | None = None
        if fail or (deadline is not None and deadline - time.monotonic() < FAIL_GRACE):
            record = self._peek(fd, st)
            if not may_be_live(record):
                # The lock is held by a probe, or by an acquirer that has not yet
                # replaced a released or stale record: give it a moment, also for a
                # try (timeout 0) or a wait shorter than that moment.
                grace = time.monotonic() + FAIL_GRACE
                if fail or deadline is None or grace > deadline:
                    deadline = grace
            elif fail:
                raise self._contended(None, record)
        if deadline is None and cancel is None and _platform.CAN_BLOCK:
            _platform.lock_blocking(fd)
            return fd, st
        if deadline is not None and deadline <= time.monotonic():
            # A try (timeout 0): no helper to start. Named by the live record just read:
            # read again, it may be a looping holder's own released one, with the lock
            # already taken again for its next run and the new record not yet written.
            # (One that named no live run, read before a grace this thread slept past:
            # read again.)
            raise self._contended(start, record if may_be_live(record) else None)
        box: list[tuple[_wait.Waiter, object]] = []
        got: list[int] = []
        try:
            _wait.Waiter.start((self.sidecar, False), self, box)  # ``_fd`` the helper's
            waiter, claim = box[0]
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
            if waiter.give_up(claim, got):
                self._fd, self._opened = got[0], waiter.opened
        except BaseException:  # e.g. KeyboardInterrupt, perhaps just as the lock came
            if got and self._fd != got[0]:
                _sidecar.close(got[0])
            try:
                _wait.abandon(self, box, got)
            except BaseException:  # one that landed as it was entered: once more
                _wait.abandon(self, box, got)
                raise
            raise
        if not got:
            if cancel is not None and cancel.is_set():
                raise _registry.cancelled()
            # A timed wait says how long it lasted, grace included; a fail-fast one
            # nothing (its moment's grace is no wait its caller asked for).
            raise self._contended(None if fail else start)
        return (fd, st) if got[0] == fd else (got[0], os.fstat(got[0]))

    def _raise_if_held_elsewhere(self) -> None:
        """For a fail-fast or timed acquire that cannot open the sidecar for writing
        (another user's, or a read-only filesystem): `SessionContendedError` when a live
        run holds the session, as for any caller who finds it held (a timed one at once:
        its wait could only end in the error below); else the caller raises why it
        cannot take it."""
        from fencelock._probe import held_error  # only on this error path

        error = held_error(self.session)
        if error is not None:
            raise error from None

    def _peek(self, fd: int, st: os.stat_result) -> HolderInfo | None:
        try:
            return _sidecar.read(fd, self.sidecar, st.st_size)
        except CorruptRecordError:
            return None

    def _contended(self, start: float | None, record: HolderInfo | None = None) -> Exception:
        waited = None if start is None else time.monotonic() - start
        return contended(self.session, self.sidecar, record, waited)

    def _write_new_record(self, lock: SessionLock, run_id: str) -> None:
        fd, previous = self._fd, None
        try:
            data = _platform.pread(fd, _PEEK_BYTES, 0)
        except OSError as e:
            raise SidecarAccessError(self.sidecar, e, "its record cannot be read") from None
        old_len = len(data) if len(data) < _PEEK_BYTES else os.fstat(fd).st_size
        written = self._written
        last: tuple[str, int] | None = None  # the last run's id and token
        stale_origin: str | None = None
        if len(data) == len(written) and data.startswith(_record.RELEASED_HEAD) and \
                data[_record.HEAD_LEN:] == written[_record.HEAD_LEN:]:
            token = self._written_token + 1  # the record this holder left, as it left it
        elif (quick := _record.peek(data) if data and len(data) < _PEEK_BYTES else None) \
                is not None and quick[0] is RELEASED:
            token = quick[1] + 1
        else:
            old = _sidecar.read(fd, self.sidecar, old_len)
            if old is None:
                # A planted session file is refused as planted before its mark is read
                # (one at the limit would refuse the acquire with a fix for its owner).
                _sidecar.refuse_planted_at(self.session)
                token = max(_tokens.floor(self.session), lock._token_floor) + 1
            else:
                token = old.token + 1
                previous = old.as_previous() if old.state is HELD else None
                last = (old.run_id, old.token)
                if old.state is HELD:
                    stale_origin = old.origin
        if token > _record.MAX_TOKEN:
            raise FenceLockError(
                f"{self.sidecar}: its fencing tokens are exhausted ({token - 1}); check "
                f"where that token came from (the record, the session's "
                f"{_tokens.XATTR} attribute, .corrupt-* copies) before resetting them"
            )
        # A move a killed recover left unfinished, finished before the fingerprint: a
        # recover sets `_sidecar.MOVING` before it names a fresh session (a run of a
        # fresh session finds its maker's stale record instead).
        if self._moving:
            lock._follow_last_run(last or self._last_run_quietly(fd, old_len), stale_origin)
            _sidecar.set_moving(self.sidecar, False, fd)  # this record now covers the last
        elif stale_origin is not None:
            lock._follow_last_run(None, stale_origin)
        self._record_len = old_len
        lock._token, lock._run_id, lock._previous = token, run_id, previous
        lock._acquired_at = lock._heartbeat_at = time.time()
        lock._phase = WRITE
        fp = lock._session_fingerprint()
        if fp is not None and (
            token > self._mark or (fp is not self._mark_fp and fp != self._mark_fp)
        ):
            wrote, self._mark = _tokens.reserve_known(self.session, token)
            if wrote:
                fp = _fingerprint.take(self.session, lock.fence_mode)  # the mark moved ctime
            aged = fp is not None and time.time_ns() - fp.ctime_ns > _MARK_TRUST_AGE_NS
            self._mark_fp = fp if aged else None
        lock._fp = fp
        lock._tail_checked = False
        self._unmarked = fp is None
        self.write(lock)  # under lock._io, which acquire() holds
        self._since = self._written_at

    def _last_run_quietly(self, fd: int, size: int) -> tuple[str, int] | None:
        """The run id and token of the record this acquire writes over, read in full
        (only where `_sidecar.MOVING` was set); None where it cannot be read (the
        acquire continues its token all the same)."""
        try:
            old = _sidecar.read(fd, self.sidecar, size)
        except (FenceLockError, OSError):
            return None
        return None if old is None else (old.run_id, old.token)

    def _unwrite_record(self, lock: SessionLock, run_id: str) -> None:
        """An interrupt (KeyboardInterrupt, a signal handler's exception) landed after
        this acquire (run ``run_id``) wrote its record but before it counted as held:
        mark the record released, so the session does not read as stale once the lock
        is dropped. Nothing to do (nothing read) unless this acquire got as far as its
        record: ``self._fd`` may be a descriptor that never got the lock."""
        if self._fd >= 0 and lock._run_id is run_id:
            self._flip_if_ours(self._fd, lock)  # else it reads as stale: no worse than before

    def _flip_if_ours(self, fd: int, lock: SessionLock) -> bool:
        """Mark the record on disk released, in the write phase, over its head in place
        (no new space needed), if it is this run's; whether it now says released."""
        try:
            record = _sidecar.read(fd, self.sidecar)
            if record is None or (record.run_id, record.token) != (lock._run_id, lock._token):
                return False
            if record.state is RELEASED:
                return True  # written whole, and only cutting the file after it failed
            if _record.in_layout_held(_platform.pread(fd, len(_record.RELEASED_HEAD), 0)):
                _platform.pwrite(fd, _record.RELEASED_HEAD, 0)
                return True
        except (OSError, FenceLockError):
            pass
        return False

    # -- while held --------------------------------------------------------------

    def write(self, lock: SessionLock) -> None:
        """Write the holder's record (called under the lock object's ``_io``)."""
        if self._fd < 0:
            raise NotHeldError(f"{self.session}: released while the record was updated")
        lock._info = None
        phase = lock._phase  # what the record says, unless a window ends meanwhile
        # Cleared before the record is encoded: an append from another thread that
        # moves the fence point after that (it sets `_behind` without ``_io``) leaves
        # the record behind, and the release must then write the last fence point.
        self._behind = False
        try:
            written = _sidecar.write_bytes(
                self._fd, self.sidecar, lock._encode(), self._record_len
            )
            self._written, self._written_token = written, lock._token
            self._record_len = len(written)
        except BaseException:
            # What the record says is unknown: the next append or the release writes it.
            self._behind, lock._phase_said = True, False
            raise
        lock._phase_said = lock._phase is phase
        self._written_at = time.monotonic()

    def appended(self, lock: SessionLock, before: _fingerprint.Fingerprint | None) -> None:
        """The holder appended, moving the session's fingerprint from ``before`` to
        ``lock._fp``: in the write phase the record follows at most `RECORD_LAG`
        seconds later."""
        if before is None:
            self._unmarked = False  # the append created the file, with the mark set
        if lock._phase is PROMPT or not lock._phase_said or \
                time.monotonic() - self._written_at >= RECORD_LAG:
            try:
                lock._write_record()
            except NotHeldError:
                # Released meanwhile (by a signal handler in this thread: a release
                # from another thread waits for the append): its record is the last.
                pass
            except SidecarAccessError as e:
                # The line is in the session: a record that cannot follow it (a full
                # disk) must not report the append as failed (a caller would write it
                # again). It follows at the next write, or the release.
                warnings.warn(record_lags(lock.session, e), stacklevel=5)
        else:
            self._behind, lock._info = True, None

    def leave_prompt_said(self, lock: SessionLock) -> None:
        """Over the record's head in place (one small pwrite: the record is this
        holder's, in fencelock's layout)."""
        with lock._io_held():
            if self._fd < 0:
                return
            with contextlib.suppress(OSError):  # the append goes on
                _platform.pwrite(self._fd, _record.HELD_WRITE_HEAD, 0)

    def fence_moved(self, lock: SessionLock) -> None:
        self._behind, lock._info = True, None

    def check(self) -> None:
        """Nothing to confirm: the kernel keeps the lock while the descriptor is open."""

    def missing_directory(self, lock: SessionLock) -> FenceLockError:
        # As opening the sidecar there would say it.
        missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return _sidecar.access_error(self.sidecar, missing, True)

    # -- release -----------------------------------------------------------------

    def holding(self) -> bool:
        return self._fd >= 0

    def release(self, lock: SessionLock) -> None:
        """Mark the record released and drop the lock (under the lock object's ``_io``,
        or where no record write can follow: see `SessionLock.release`)."""
        long = time.monotonic() - self._since >= HAND_OVER_AFTER
        # After a run's length (not a loop of short ones) one getxattr is nothing.
        if self._unmarked or long:  # (a loop of short runs on one file makes no call)
            self._mark_what_the_run_left(lock, look=long)
        fd, self._fd, opened = self._fd, -1, self._opened
        written = False
        try:
            self._write_released(fd, lock, look=long)
            written = True
        finally:
            try:
                if not written:
                    # An interrupt (KeyboardInterrupt, a signal handler's exception) cut
                    # the write short: once more, or the session reads as stale (its
                    # record "held", the lock free) though its run ended and lives on.
                    with contextlib.suppress(Exception):
                        self._write_released(fd, lock, look=long)
                _platform.unlock(fd)
                if long:
                    _platform.hand_over()
            finally:
                try:
                    _sidecar.close(fd)  # also drops the lock if unlocking failed
                except BaseException:
                    # Cut short (an interrupt as it began, or an error of the close
                    # itself): closed again, only if still this open's (`close_if_still`).
                    _cleanup.to_the_end(lambda: _forkguard.close_if_still(fd, opened))
                    raise

    def _mark_what_the_run_left(self, lock: SessionLock, *, look: bool) -> None:
        """Before letting go: mark a session file the run made without `append` (found
        with access(2): no exception to raise and catch where, as most often, none was
        made); else, given ``look``, one whose mark no longer covers the run's token
        (renamed over the file the run began with, or its mark removed)."""
        if self._unmarked:
            if os.access(self.session, os.F_OK):
                self._mark_session(lock)
        elif look:
            self._mark_if_replaced(lock)

    def _mark_if_replaced(self, lock: SessionLock) -> None:
        """Mark the session file again if its mark no longer covers the run's token:
        a file written anew and renamed over it (a compaction, ``sed -i``), whose new
        inode carries no mark, or the mark removed during the run, so that tokens never
        go back even if the sidecar is then removed by hand. The mark itself is read
        (one call, as a stat would be): under the content fence, and for a change made
        while one of the run's own lines was being written, the fence point has taken
        the new file in. Quietly nothing where it cannot be read."""
        if _tokens.needs_mark(self.session, lock._token):
            self._mark_session(lock)

    def _mark_session(self, lock: SessionLock) -> None:
        """Set the token mark on a session file that was made during the run by
        something other than `SessionLock.append` (which sets it on a file it creates):
        the holder's own writer, a `fencelock run` command, or a write from outside the
        protocol; or one renamed over the session during the run. While the lock is
        still held: tokens then never go back for it, even if the sidecar is removed.
        Quietly nothing where the file is still missing, is not a regular file (the mark
        is set through a descriptor of the file itself), is another user's in a
        directory anyone can write to (planted: an acquire refuses it, and leaves it
        untouched), or takes no extended attributes."""
        self._unmarked = False
        try:
            fd, st = _sidecar.open_regular(self.session, os.O_RDONLY)
        except (OSError, FenceLockError):
            return
        try:
            _sidecar.refuse_planted(self.session, st)
            _tokens.reserve(fd, lock._token)
        except PlantedFileError:
            pass
        finally:
            os.close(fd)

    def share_fd(self) -> int:
        """The locked descriptor, for `fencelock run` to pass to its command."""
        return self._fd

    def release_shared(self, lock: SessionLock) -> None:
        """Mark the record released and close this process's descriptor without
        unlocking (under the lock object's ``_io``): the processes that share the
        descriptor keep the session until the last of them closes it."""
        self._mark_what_the_run_left(lock, look=True)  # `run`'s command ran a while
        if lock._follow_session():  # after the mark, which moves the session's ctime
            self._behind = True
        fd, self._fd = self._fd, -1
        try:
            self._write_released(fd, lock, look=True)
        finally:
            _sidecar.close(fd)

    def _write_released(self, fd: int, lock: SessionLock, *, look: bool) -> None:
        """Mark the record released, with the last fence point. Where the whole record
        cannot be written (a full disk: a longer record may need a new block), its head
        is marked released in place, and the record keeps the fence point of its last
        write (a probe finds the fence moved); only where that fails too does the session read as
        stale, which the error says.

        With ``look`` (a run of a millisecond or more, where one read is nothing), the
        head is read before it is flipped in place: a sidecar written over from outside
        the protocol during the run (emptied: ``: > S.holder``) gets the whole record,
        which the flip would have turned into a corrupt one that stops every run."""
        try:
            # The last appends' fence point with "released"; or a release inside the
            # prompt window, which ends the window too.
            whole = self._behind or lock._phase is PROMPT or not lock._phase_said
            old_len = self._record_len
            if look and not whole and (size := self._size_if_written_over(fd)) is not None:
                whole, old_len = True, size
            if whole:
                # Behind until written: a second try after an interrupt writes it all.
                self._behind, lock._phase = True, WRITE
                try:
                    self._written, self._written_token = _sidecar.write_bytes(
                        fd, self.sidecar, lock._encode(RELEASED), old_len
                    ), lock._token
                except SidecarAccessError as e:
                    if not self._flip_if_ours(fd, lock):
                        raise SidecarAccessError(
                            self.sidecar, e.cause, _released_note(self.session)
                        ) from None
                self._behind = False
            else:  # flip "held" to "released" in place: one small write
                _platform.pwrite(fd, _record.RELEASE_PATCH, _record.STATE_OFFSET)
        except OSError as e:
            raise SidecarAccessError(self.sidecar, e, _released_note(self.session)) from None

    def _size_if_written_over(self, fd: int) -> int | None:
        """The sidecar's size where its head is not that of a held record in fencelock's
        layout (written over from outside the protocol); None where it is, or where it
        cannot be read (the record is then taken as this holder wrote it)."""
        try:
            if _record.in_layout_held(_platform.pread(fd, _record.HEAD_LEN, 0)):
                return None
            return os.fstat(fd).st_size
        except OSError:
            return None

    def forget_in_child(self) -> None:
        """In a forked child: the inherited descriptor is not this process's (fork
        safety closes it)."""
        self._fd = -1
