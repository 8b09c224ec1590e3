"""The seam between `SessionLock` and the store that holds a session for it.

`SessionLock` owns the record's fields and the life cycle (reentrancy, the in-process
registry, the fence); it talks to one `SessionStore` object, made once per lock by
`for_lock`, without knowing which store that is. The sidecar store (section 2 of the
protocol) is `fencelock._sidecar_holder.SidecarHolder`. A store outside this host
implements the smaller `HolderStore` driver interface (records as bytes; etcd's
`EtcdHolder`), which `RemoteStore` adapts; `open_store` picks a driver from a
backend URL.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from fencelock import _backend, _fingerprint, _identity, _record, _sidecar, _tokens
from fencelock._errors import (
    FenceLockError,
    HolderLostError,
    StoreUnavailableError,
    record_lags,
)
from fencelock._sidecar_holder import SidecarHolder

if TYPE_CHECKING:
    from fencelock._fingerprint import Fingerprint
    from fencelock._lock import SessionLock
    from fencelock._probe import HolderStatus
    from fencelock._record import HolderInfo


class SessionStore(Protocol):
    """What `SessionLock` asks of the store that holds its session. One object per
    lock; each call gets the lock, whose fields are the record's."""

    name: str
    """Where the holder lives, as messages show it."""
    shares_fd: bool
    """Whether the lock is a descriptor `fencelock run` can share with its command."""
    opens_session: bool
    """Whether fence checks open the session file rather than stat its path: a store
    for several hosts (etcd) sees a shared filesystem, where only an open revalidates
    cached attributes (close-to-open consistency)."""
    tries_in_place: bool
    """Whether ``acquire(timeout=0)`` on a held session only looks (a sidecar's lock
    tried) rather than joining a queue and leaving it again (etcd)."""
    releases_in_place: bool
    """Whether a release never waits (a sidecar's unlock); an etcd release may ride out
    an outage, so ``async with`` releases in a worker thread."""
    cancel_grace: float
    """How long a cancelled `acquire_async` waits, in seconds, for its attempt to end
    before it raises CancelledError (the attempt ends on its own after that)."""
    space: str
    """What the in-process registry puts before the session's key for this store
    (`_registry.in_store`): "" for the sidecar store."""
    @property
    def record_extra(self) -> dict[str, Any] | None:
        """Fields the store adds to the holder's record (etcd: ``lease``, ``store``),
        for the `HolderInfo` that `SessionLock` gives out; None when it adds none."""

    def acquire(
        self,
        lock: SessionLock,
        me: object,
        deadline: float | None,
        cancel: threading.Event | None,
        start: float,
        only_if_free: bool = False,
    ) -> bool:
        """Take the session, write the first record (setting the lock's record fields)
        and count ``lock`` as held by ``me``: True. On any failure leave nothing held.
        With ``only_if_free``: False, having waited for nothing and taken nothing, where
        the session is held this moment or the store cannot tell without waiting (one
        whose ``tries_in_place`` is False)."""

    def write(self, lock: SessionLock) -> None:
        """Store the lock's record now (called under ``lock._io``)."""

    def appended(self, lock: SessionLock, before: Fingerprint | None) -> None:
        """The holder appended: ``lock._fp`` moved from ``before``; write the record, or
        let it lag as the store allows."""

    def leave_prompt_said(self, lock: SessionLock) -> None:
        """An append in the prompt phase is about to move the fence point (with
        ``lock._line_going_in`` set): make the record say the write phase until
        `appended` writes it again, so that a holder that dies between its line and
        that record leaves one whose fingerprint readers know may lag
        (docs/PROTOCOL.md 2.4). Where etcd does not answer, the append goes on; a
        holder found lost raises `HolderLostError`, and the append writes nothing."""

    def fence_moved(self, lock: SessionLock) -> None:
        """``lock._fp`` moved without an append (a line taken back): the record must
        carry it at the release at the latest."""

    def check(self) -> None:
        """Raise `HolderLostError` unless the holder is sure it still holds the session."""

    def missing_directory(self, lock: SessionLock) -> FenceLockError:
        """The error of an acquire whose session's directory has a component missing,
        which it does not open: a name made meanwhile may be another user's symlink."""

    def release(self, lock: SessionLock) -> None:
        """Leave the record released and give the lock back (under ``lock._io``, or
        where no record write can follow: see `SessionLock.release`)."""

    def holding(self) -> bool:
        """Whether the store still holds the lock: after `release` raised, that it did
        not get as far as letting go (an interrupt at its start)."""

    def share_fd(self) -> int:
        """The locked descriptor to share with a command; -1 when there is none."""

    def release_shared(self, lock: SessionLock) -> None:
        """Like `release`, for a lock shared with a command (a descriptor, or a lease
        that `fencelock run`'s keeper keeps alive): mark the record released and leave
        the lock to the processes that still share it."""

    def forget_in_child(self) -> None:
        """In a forked child: let go of the parent's holder without touching it."""


class HolderStore(Protocol):
    """One session's holder in a store other than the sidecar, for one `SessionLock`."""

    name: str
    """Where the holder lives, as messages and `HolderStatus.sidecar` show it."""
    space: str
    """As `SessionStore.space`: one for each cluster, prefix and root of etcd's."""
    @property
    def record_extra(self) -> dict[str, Any] | None:
        """As `SessionStore.record_extra`, for the run this holder holds."""

    def rekey(self) -> None:
        """Name the session as the store names it now (before an acquire: the path may
        lead elsewhere than when the holder was made); `name` follows."""

    def revision(self) -> int:
        """The store's revision now: every later acquisition's token is above it."""
        ...

    probed_revision: int
    """The store's revision as the last `probe` read it (0 before one)."""

    def owner_lease_left(self, deadline: float | None = None) -> tuple[float | None, int]:
        """The seconds the lease of the key that owns the session has left (None when
        none owns it, or its lease is gone), and the store's term (a restart moves it)."""

    def acquire(
        self,
        fail: bool,
        deadline: float | None,
        cancel: threading.Event | None,
        record: Callable[[int, HolderInfo | None], bytes] | None,
        start: float | None = None,
    ) -> int:
        """Take the session's lock (waiting unless ``fail``) and return the fencing token.

        Once the lock is this holder's, ``record(token, last)`` gives the first record to
        store, where ``last`` is the session's last record (its ``state`` says whether
        that run ended cleanly); it may be called more than once. ``start``: when the
        caller's acquire began (`time.monotonic`), which a contention error's ``waited``
        counts from. Raises `SessionContendedError`, `StoreUnavailableError`, or a
        cancellation."""

    def write(self, record: bytes, *, ride_out: bool = True) -> None:
        """Store the holder's record; `HolderLostError` when no longer the holder.
        ``ride_out``: while the store cannot be reached but the holder may still hold
        the session, keep trying (else one short request, `StoreUnavailableError`
        when it goes unanswered)."""

    def check(self) -> None:
        """Raise `HolderLostError` unless the holder is sure it still holds the session."""

    def holding(self) -> bool:
        """Whether the holder still holds (or waits for) the session."""

    def release(self, record: bytes | None) -> None:
        """Give the lock back, leaving ``record`` (the released record) as the last one."""

    def wait_free(self, timeout: float | None, *, ride_out: bool = True) -> bool:
        """Block until the session has no live holder; False on timeout. Without
        ``ride_out``, `StoreUnavailableError` at once where the store cannot be reached
        (a step of a longer wait, which rides the outage out itself)."""

    def probe(self, stuck_after: float, deadline: float | None = None) -> HolderStatus:
        """The session's state, as `fencelock.probe` reports it; asked within ``deadline``
        (`time.monotonic`) when given, as a waiting caller's requests are."""

    def clear(self, remove: bool, force: bool) -> HolderStatus:
        """Clear a stale record under the lock, as `fencelock.clear` does: a corrupt one
        only with ``force``, which sets it aside."""


class RemoteStore:
    """A `SessionStore` over a `HolderStore` driver (a store outside this host)."""

    __slots__ = ("holder", "name", "space")

    shares_fd = False
    opens_session = True
    tries_in_place = False
    releases_in_place = False
    cancel_grace = 0.5
    """An etcd request under way may take its whole timeout: the cancelled task does
    not wait for it longer than this."""

    def __init__(self, holder: HolderStore) -> None:
        self.holder = holder
        self.name = holder.name
        self.space = holder.space

    @property
    def record_extra(self) -> dict[str, Any] | None:
        return self.holder.record_extra

    def acquire(
        self,
        lock: SessionLock,
        me: object,
        deadline: float | None,
        cancel: threading.Event | None,
        start: float,
        only_if_free: bool = False,
    ) -> bool:
        if only_if_free:
            return False  # etcd tells only by queueing (`tries_in_place`)
        holder = self.holder
        # As a sidecar's acquire refuses it (its sidecar cannot be made): no run can
        # write there, and a holder taken would hold nothing but the store's key.
        missing = _sidecar.directory_error(lock.session, True)
        if missing is not None:
            raise missing
        holder.rekey()
        self.name = holder.name
        # Read before waiting, so that it costs the hand-off nothing: the lines a
        # holder appends meanwhile carry tokens of this store, below this one's.
        stamped = max(_tokens.last_stamped(lock.session), lock._stamped_floor)

        def first_record(token: int, last: HolderInfo | None) -> bytes:
            if token <= stamped:
                raise _tokens.went_backwards(lock.session, token, stamped, holder.name)
            lock._token, lock._run_id = token, lock._run_id or _identity.RUN_IDS.next()
            lock._previous = last.as_previous() if last is not None and last.state is \
                _record.HELD else None
            # A move a killed recover left unfinished, finished before the fingerprint.
            lock._follow_last_run(
                None if last is None else (last.run_id, last.token),
                last.origin if last is not None and last.state is _record.HELD else None)
            lock._acquired_at = lock._heartbeat_at = time.time()
            lock._phase = _record.WRITE
            lock._fp = _fingerprint.take(lock.session, lock.fence_mode, opened=True)
            if lock._fp is not None:  # as for a sidecar (`SessionLock._session_fingerprint`)
                _sidecar.refuse_planted_at(lock.session)
                if lock._copies_up:
                    _fingerprint.copy_up(lock.session)
                    lock._fp = _fingerprint.take(lock.session, lock.fence_mode, opened=True)
            lock._tail_checked = False
            lock._info = None
            return lock._encode()

        lock._run_id = ""
        holder.acquire(lock.on_contention == "fail", deadline, cancel, first_record, start)
        try:
            if cancel is not None and cancel.is_set():
                import asyncio

                raise asyncio.CancelledError()
            # The record's fingerprint was taken once no other run could write any
            # more (the session's turn had come to this one): a write that lands
            # after it came from outside the protocol, and the fence reports it.
            lock._count, lock._owner, lock._pid = 1, me, _identity.ME.pid
        except BaseException:
            lock._count = 0
            holder.release(None)
            raise
        return True

    def write(self, lock: SessionLock) -> None:
        lock._info = None
        phase = lock._phase  # what the record says, unless a window ends meanwhile
        self.holder.write(lock._encode())
        lock._phase_said = lock._phase is phase

    def appended(self, lock: SessionLock, before: Fingerprint | None) -> None:
        # The line is in the session by now: a record that cannot follow it must not
        # report the append as failed (a caller would write it again). The record
        # lags until the next write. A holder found lost is said at once, the line
        # stored: the run may have written it after another took the session (paused
        # between its check and its write), and must not go on as if it held.
        try:
            with lock._io_held():
                if not lock._count:  # released meanwhile (a signal handler in this
                    return  # thread): the release's record is the last
                lock._info = None
                phase = lock._phase
                # Not waited for: the next write, or the release, carries it.
                self.holder.write(lock._encode(), ride_out=False)
                lock._phase_said = lock._phase is phase
        except HolderLostError as e:
            self._heard()
            raise HolderLostError(lock.session, e.why, stored=True) from None
        except StoreUnavailableError as e:
            import warnings

            warnings.warn(record_lags(lock.session, e), stacklevel=5)  # append's caller

    def leave_prompt_said(self, lock: SessionLock) -> None:
        with lock._io_held():
            if not lock._count:
                return
            try:
                with contextlib.suppress(StoreUnavailableError):  # the append goes on
                    self.holder.write(lock._encode(), ride_out=False)  # the write phase
            except HolderLostError:  # the append writes nothing, and says so
                self._heard()
                raise

    def _heard(self) -> None:
        """A `HolderLostError` from a record write is about to reach the caller: its
        release need not say it again (`check` marks a loss heard as it raises it)."""
        with contextlib.suppress(HolderLostError):
            self.holder.check()

    def fence_moved(self, lock: SessionLock) -> None:
        lock._info = None  # the release writes the whole record

    def check(self) -> None:
        self.holder.check()

    def missing_directory(self, lock: SessionLock) -> FenceLockError:
        missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return _sidecar.no_directory(lock.session, missing, True)

    def release(self, lock: SessionLock) -> None:
        self.holder.release(self._released(lock))

    def holding(self) -> bool:
        return self.holder.holding()

    def share_fd(self) -> int:
        return -1

    def release_shared(self, lock: SessionLock) -> None:
        # Reached only while `fencelock run`'s keeper keeps the lease alive: the holder
        # stays in the store, its record released, until the keeper revokes the lease.
        self.holder.write(self._released(lock))

    @staticmethod
    def _released(lock: SessionLock) -> bytes:
        lock._phase = _record.WRITE  # a release inside the prompt window ends it
        data = lock._encode()
        at, patch = _record.STATE_OFFSET, _record.RELEASE_PATCH
        return data[:at] + patch + data[at + len(patch):]

    def forget_in_child(self) -> None:
        pass


def for_lock(session: str, sidecar: str, mode: int, backend: str | None) -> SessionStore:
    """The store for one `SessionLock` on ``session`` under ``backend`` (or
    ``$FENCELOCK_BACKEND``): the sidecar unless a backend names another."""
    if backend is not None or _backend.env_set():
        holder = open_store(backend, session)
        if holder is not None:
            return RemoteStore(holder)
    return SidecarHolder(session, sidecar, mode)


def open_store(backend: str | None, session: str) -> HolderStore | None:
    """The store for ``session`` under ``backend`` (or ``$FENCELOCK_BACKEND``); None for
    the sidecar store."""
    url = _backend.selected(backend)
    if url is None:
        return None
    from fencelock import _etcd

    return _etcd.EtcdHolder(url, session)
