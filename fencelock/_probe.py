"""Looking at holders from outside: `probe`, `scan` and `clear`.

The lock decides live or not: a probe takes a *shared* lock without waiting, which
fails when some process holds the exclusive one, then converts it to exclusive, which
fails when another process holds a shared one (a process outside fencelock may). A
lock found taken without a live record behind it gets the grace fail-fast acquirers
give it (`_sidecar_holder.FAIL_GRACE`): fencelock's own probes and waits hold theirs for
microseconds. The record only describes.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from fencelock import (
    _backend,
    _cleanup,
    _fingerprint,
    _forkguard,
    _identity,
    _moved,
    _platform,
    _record,
    _registry,
    _sidecar,
    _sidecar_holder,
    _store,
    _tokens,
    _wait,
)
from fencelock._constants import DEFAULT_STUCK_AFTER as DEFAULT_STUCK_AFTER
from fencelock._constants import SESSION_SUFFIX
from fencelock._errors import (
    NO_SESSION_NAME,
    SIDECAR_OF_A_SIDECAR,
    CorruptRecordError,
    FenceLockError,
    PlantedFileError,
    RecordTooLargeError,
    SessionContendedError,
    SidecarAccessError,
    UnsafeSidecarError,
    describe_holder,
    unsafe_path_fix,
)
from fencelock._fingerprint import FenceMode
from fencelock._record import HELD, RELEASED, WRITE, HolderInfo
from fencelock._sidecar_holder import (
    contended,
    held_by_others,
    holder_alive,
    may_be_live,
    read_quietly,
)

if TYPE_CHECKING:
    from fencelock._etcdurl import EtcdURL


class ProbeState(enum.StrEnum):
    """What a probe found: ``LIVE`` (the lock is held), ``FREE`` (not held; no record,
    or a released one), ``STALE`` (not held, the record still says held: its run
    died), ``UNREADABLE`` (the sidecar cannot be probed, or its record is corrupt)."""

    FREE = "free"
    LIVE = "live"
    STALE = "stale"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class HolderStatus:
    """What a probe saw for one session."""

    session: str
    sidecar: str
    state: ProbeState
    record: HolderInfo | None = None
    owner_alive: bool | None = None
    stuck: bool = False
    fence_ok: bool | None = None
    reason: str = ""
    removed: bool = False
    """Set by `clear`: the sidecar was deleted."""
    set_aside: str | None = None
    """Set by `clear(force=True)`: where the corrupt sidecar was moved."""
    lock_owners: tuple[_platform.LockOwner, ...] | None = None
    """For a session that is live without a held record (a process outside fencelock
    holds the lock): the processes the system lists as holding it (Linux:
    ``/proc/locks``); an empty tuple when none is listed (another host or PID
    namespace). None otherwise, or where the system cannot say."""
    waiters: int = 0
    """Processes queued behind the holder, one each whatever its runs (the etcd store
    counts them; sidecars do not)."""
    left_by_run: bool = False
    """The session is live, held by processes that the command of an ended `fencelock
    run` left running: ``record`` is that run's last record (released, or held by the
    run, killed with its command)."""
    moved_to: str | None = None
    """The fresh session a recover moved the conversation to, where the session is
    marked so (`SessionMovedError`, PROTOCOL.md 5.1): runs there are refused. None
    otherwise."""
    _held_by: str = field(default="", repr=False, compare=False)
    """Live without a record: what holds the session, in the store's words, where it
    says more than the lock's owners do (etcd: the owner key). Private, as ``_owner``."""
    _owner: str = field(default="", repr=False, compare=False)
    """etcd: the live owner key and its create revision, which tell one holder from the
    next also where it has written no record (yet). Private: not for callers (though
    ``dataclasses.asdict`` and pickling carry it, as any field)."""

    @property
    def _live_record(self) -> HolderInfo | None:
        """The live holder's record: None when not live, or when the record is a past
        run's (released, or its owner dead) and the processes the system lists
        (`lock_owners`) hold the lock."""
        record = self.record
        if self.state is not ProbeState.LIVE or record is None or \
                record.state is not HELD:
            return None
        return None if self.lock_owners is not None and self.owner_alive is False else record

    def _contended(
        self, *, waited: float | None = None, backend: str | None = None
    ) -> SessionContendedError:
        """The contention error for a session this status found live: named by its
        holder's record, or by the processes the system lists as holding the lock (and
        the ended `fencelock run` that left them)."""
        return SessionContendedError(self.session, self._live_record, waited=waited,
                                     lock_owners=self.lock_owners, backend=backend,
                                     last=self.record if self.left_by_run else None,
                                     held_by=self._held_by or None)

    @property
    def pid(self) -> int | None:
        return self.record.pid if self.record else None

    @property
    def lane(self) -> str | None:
        return self.record.lane if self.record else None

    @property
    def token(self) -> int | None:
        return self.record.token if self.record else None

    @property
    def held_by(self) -> int | None:
        """The pid holding the session now: a live record's (its `fencelock run`
        command's once the record's own process is gone), or the one lock owner listed
        for a holder outside fencelock; None when not held or unknown. (``pid`` is the
        record's, which for a free or stale session is the last run's.)"""
        if self.state is not ProbeState.LIVE:
            return None
        record = self._live_record
        if record is not None:
            command = _left_holding(record)
            if command is None:
                # A dead owner's pid (etcd: its lease not expired yet) holds nothing; one
                # from another PID namespace of this host names another process here.
                if self.owner_alive is False or _identity.in_other_pid_namespace(
                    record.host, record.process_start
                ):
                    return None
                return record.pid
            return None if command[1] is False else command[0]
        owners = self.lock_owners or ()
        return owners[0].pid if len(owners) == 1 and owners[0].command is not None else None


def probe(
    path: _sidecar.AnyPath, *, stuck_after: float = DEFAULT_STUCK_AFTER,
    backend: str | None = None,
) -> HolderStatus:
    """The state of the session at ``path`` (the session file or its sidecar), in the
    store ``backend`` names (default: ``$FENCELOCK_BACKEND``, else the sidecar)."""
    return _with_move(_probe_path(path, stuck_after, backend))


def _with_move(found: HolderStatus) -> HolderStatus:
    """``found``, with the fresh session a recover's mark on the session names
    (`HolderStatus.moved_to`): one `listxattr` where there is none."""
    moved = _moved.target(found.session)
    return found if moved is None else replace(found, moved_to=moved)


def _probe_path(path: _sidecar.AnyPath, stuck_after: float,
                backend: str | None) -> HolderStatus:
    """`probe`'s look at the holder."""
    stuck_after = _wait.duration(stuck_after, "stuck_after")
    session, sidecar = _sidecar.paths(path)
    store = _store.open_store(backend, session)
    if store is not None:
        found = store.probe(stuck_after)
        missing = _in_no_directory(found)
        if missing is not None:
            return replace(found, state=ProbeState.UNREADABLE, reason=str(missing))
        return _unless_planted(_unless_behind(found, store))
    try:
        st: os.stat_result | None = os.lstat(session)
    except OSError:
        st = None  # missing (or unreachable: the sidecar's probe says so)
    if st is not None and not stat.S_ISREG(st.st_mode):
        return _not_a_session(session, sidecar, _platform.describe_mode(st.st_mode, session))
    found = _probe(session, sidecar, stuck_after, time.time())
    return found if st is None else _unless_planted(found, st)


def _in_no_directory(found: HolderStatus) -> SidecarAccessError | None:
    """For a holder store's (etcd's) answer: the error of a session with nothing recorded
    whose directory is missing or a file, which a sidecar's probe shows unreadable and
    its clear refuses; None otherwise (a record kept there is shown, and cleared)."""
    if found.state is ProbeState.FREE and found.record is None:
        return _sidecar.directory_error(found.session, False)
    return None


def _unless_behind(found: HolderStatus, store: _store.HolderStore) -> HolderStatus:
    """For a holder store's (etcd's) answer ``found``: itself, unless no run can take the
    session: free or stale, with its last lines stamped with a token above the store's
    revision, as the probe read it (etcd lost its data, or is another one; a record
    copied from the old one vouches for nothing). An acquire there is refused (tokens
    must never go back), so it is shown unreadable, saying why and what to do, as
    `recover` refuses it. Costs a read of the session's tail."""
    if found.state not in (ProbeState.FREE, ProbeState.STALE):
        return found
    stamped = _tokens.last_stamped(found.session)
    at = (store.probed_revision or store.revision()) if stamped else 0
    if at >= stamped:
        return found
    return replace(found, state=ProbeState.UNREADABLE,
                   reason=str(_tokens.store_behind(found.session, at, stamped, store.name)))


def _unless_planted(
    status: HolderStatus, st: os.stat_result | None = None, path: str | None = None
) -> HolderStatus:
    """``status``, unless it is free or stale and its session file (or ``path``, its
    sidecar; ``st``, else looked at here) belongs to another user in a directory anyone
    can create files in: no run of this user takes that session (`PlantedFileError`),
    so it is shown unreadable, saying why, not free to use. (A held one is shown held,
    naming its holder.)"""
    if status.state is not ProbeState.FREE and status.state is not ProbeState.STALE:
        return status
    path = path or status.session
    try:
        _sidecar.refuse_planted(path, st or os.lstat(path))
    except PlantedFileError as e:
        return replace(status, state=ProbeState.UNREADABLE, reason=str(e))
    except OSError:
        pass  # no file there: nothing planted
    return status


def _not_a_session(session: str, sidecar: str, what: str) -> HolderStatus:
    """No run can take a session path that is not a regular file: acquirers refuse it."""
    return HolderStatus(session, sidecar, ProbeState.UNREADABLE,
                        reason=f"{session}: {what}, not a regular file; no run can use it "
                        f"as a session. {unsafe_path_fix(session, what)}")


def held_error(
    session: str, backend: str | None = None, waited: float | None = None
) -> SessionContendedError | None:
    """The contention error naming ``session``'s live holder as `probe` finds it, in
    the store ``backend`` names (else the sidecar); None when it is not live, or
    cannot be read (the caller says why it cannot take the session)."""
    try:
        status = probe(session, backend=backend or "local")
    except FenceLockError:
        return None
    if status.state is not ProbeState.LIVE:
        return None
    return status._contended(waited=waited, backend=backend)


def _probe(session: str, sidecar: str, stuck_after: float, now: float) -> HolderStatus:
    looks: list[_Watch] = []
    try:
        found = _look(session, sidecar, stuck_after, now, into=looks)
        assert found is not None  # only a busy scan gets None
        status = found if isinstance(found, HolderStatus) else _decided(found)
    finally:  # also when interrupted (a KeyboardInterrupt, a handler's timeout)
        try:
            _close_all(looks)
        except BaseException:  # one that landed as it began: once more
            _close_all(looks)
            raise
    return status


def _decided(watch: _Watch) -> HolderStatus:
    """Test a watched lock until its grace decides it. (A loop of its own: from 3.12 a
    ``while`` loop's backward jump inside a ``try`` is outside the ``try``'s handlers,
    and an interrupt there escaped the ``finally`` that closes the watch.)"""
    while watch.result is None:
        time.sleep(_GRACE_STEP)  # a probe's or a waiter's test lock lasts microseconds
        watch.step()
    return watch.result


def _close_all(*groups: Iterable[object]) -> None:
    """Close the descriptors of the watches in ``groups`` (each safe to close again)."""
    _cleanup.to_the_end(*(look.close for group in groups for look in group
                          if isinstance(look, _Watch)))


def _look(
    session: str, sidecar: str, stuck_after: float, now: float, *, into: list[_Watch],
    busy: bool = False,
) -> HolderStatus | _Watch | None:
    """The session's status; or, for a lock found taken with no live record behind it,
    a `_Watch` that decides it within the grace. ``busy``: descriptors are open on
    watched sidecars, so None when this process is out of descriptors (the caller
    tries again once a watch is over).

    The sidecar's descriptor is opened into a watch put in ``into`` first, and closed
    here unless that watch is returned: an interrupt (KeyboardInterrupt, a signal
    handler's exception) anywhere leaves it there for the caller to close."""
    if _registry.any_held():
        # A holder in this process answers for itself: opening and locking a second
        # descriptor could disturb its lock where flock is emulated (NFS).
        mine = _registry.held_in_process(_registry.registry_key(session))
        record = mine.info if mine is not None else None
        if mine is not None and record is not None:
            holder = mine
            return _status(session, sidecar, ProbeState.LIVE, record,
                           stuck_after=stuck_after, now=now, reread=lambda: holder.info)
    watch = _Watch(session, sidecar, stuck_after, now)
    into.append(watch)
    try:
        fd, st = _sidecar.open_checked(sidecar, create=False, into=watch)
    except UnsafeSidecarError as e:
        return HolderStatus(session, sidecar, ProbeState.UNREADABLE, reason=str(e))
    except SidecarAccessError as e:
        if e.cause.errno == errno.ENOENT and os.path.isdir(os.path.dirname(sidecar)):
            return HolderStatus(session, sidecar, ProbeState.FREE, reason=_no_sidecar(session))
        if busy and e.cause.errno in (errno.EMFILE, errno.ENFILE):
            return None
        return HolderStatus(session, sidecar, ProbeState.UNREADABLE, reason=str(e))
    try:
        free = _unlocked(fd)
        record, corrupt = _read(fd, sidecar, st.st_size)
    except (OSError, SidecarAccessError) as e:
        watch.close()
        return _unprobed(session, sidecar, e)
    if not free and not (record is not None and may_be_live(record)):
        watch.begin()
        return watch
    watch.close()  # also drops the test lock
    return _unless_planted(
        _conclude(session, sidecar, free, record, corrupt, None, stuck_after, now), st, sidecar)


def _unprobed(session: str, sidecar: str, e: OSError | SidecarAccessError) -> HolderStatus:
    if isinstance(e, OSError):  # e.g. ENOLCK: no lock service on this NFS mount
        e = SidecarAccessError(sidecar, e, "its lock cannot be probed here")
    return HolderStatus(session, sidecar, ProbeState.UNREADABLE, reason=str(e))


class _Watch:
    """A sidecar whose lock was found taken with no live holder's record behind it,
    watched for the grace fail-fast acquirers give (`_sidecar_holder.FAIL_GRACE`): free
    within it, the taker was fencelock's own (a probe, an acquirer about to write its
    record); still taken after it, a process outside fencelock holds it. A holder
    outside fencelock keeps the lock the same way (exclusive, or shared) all along;
    fencelock's own test locks last microseconds and come and go, so the grace starts
    again whenever what blocks the lock changes (at most 20 graces in all). `scan`
    watches many at once, so that they share their graces."""

    def __init__(self, session: str, sidecar: str, stuck_after: float, now: float) -> None:
        self.session, self.sidecar = session, sidecar
        self.stuck_after, self.now = stuck_after, now
        self._fd = -1
        self._opened: object = None
        """The sidecar's descriptor and its tracking entry (`_sidecar.open_checked`'s
        ``into``), for a `close` that is safe to run again."""
        self.deadline = self.cap = self.next_try = 0.0
        self.blocked_by_exclusive: bool | None = None
        self.result: HolderStatus | None = None

    def begin(self) -> None:
        """Start the grace: the lock was just found taken."""
        start = time.monotonic()
        self.deadline, self.cap = start + _GRACE, start + 20 * _GRACE
        self.next_try = start + _GRACE_STEP

    def step(self) -> None:
        """Test the lock again if a step has passed since the last test; set ``result``
        once the lock comes free or the grace is over."""
        now = time.monotonic()
        if self.result is not None or now < self.next_try:
            return
        self.next_try = now + _GRACE_STEP
        try:
            shared = _platform.try_lock(self._fd, shared=True)
            if shared and _platform.sole_lock(self._fd):
                self._decide(True)
                return
            if self.blocked_by_exclusive is not None and self.blocked_by_exclusive == shared:
                self.deadline = now + _GRACE  # blocked the other way now: someone came and went
            self.blocked_by_exclusive = not shared
            if now >= min(self.deadline, self.cap):
                self._decide(False)
        except OSError as e:
            self.close()
            self.result = _unprobed(self.session, self.sidecar, e)

    def _decide(self, free: bool) -> None:
        session, sidecar, fd = self.session, self.sidecar, self._fd
        owners: tuple[_platform.LockOwner, ...] | None = None
        try:
            try:
                record, corrupt = _read(fd, sidecar, None)
                if not free and held_by_others(record):
                    owners = _platform.lock_owners(sidecar)  # only now: it reads a system list
            except (OSError, SidecarAccessError) as e:
                self.result = _unprobed(session, sidecar, e)
                return
        finally:
            self.close()
        self.result = _conclude(
            session, sidecar, free, record, corrupt, owners, self.stuck_after, self.now
        )

    def close(self) -> None:
        """Close the descriptor (which drops the test lock), unless closed already."""
        _forkguard.close_if_still(self._fd, self._opened)


_GRACE = _sidecar_holder.FAIL_GRACE
_GRACE_STEP = 0.001
"""How often a watched lock is tested again."""


def _conclude(
    session: str,
    sidecar: str,
    free: bool,
    record: HolderInfo | None,
    corrupt: str,
    owners: tuple[_platform.LockOwner, ...] | None,
    stuck_after: float,
    now: float,
) -> HolderStatus:
    """The status from what the probe saw of the lock and the record."""
    if not free:
        state = ProbeState.LIVE
    elif corrupt:
        return HolderStatus(session, sidecar, ProbeState.UNREADABLE, reason=corrupt)
    elif record is not None and record.state is HELD:
        state = ProbeState.STALE
    else:
        state = ProbeState.FREE
    if state is ProbeState.LIVE and held_by_others(record):
        # A lock with no live holder's record behind it, past the grace: a process
        # outside fencelock holds it (a record left there is a past run's, released or
        # its owner dead).
        run = _record.left_by_run(record, owners)
        held = "held by " + describe_holder(None, owners, run)
        if corrupt:
            held += f"; {corrupt}"
        return HolderStatus(session, sidecar, state, record=record, lock_owners=owners,
                            reason=held, owner_alive=False if record is not None
                            and record.state is HELD else None,
                            left_by_run=run is not None)
    if record is None:
        return HolderStatus(session, sidecar, state, reason=corrupt or "no record")
    return _status(session, sidecar, state, record, stuck_after=stuck_after, now=now,
                   reread=lambda: _sidecar_holder.read_quietly(sidecar))


def _no_sidecar(session: str) -> str:
    """Why a session without a sidecar is free: no run has held it, or none started."""
    return "no sidecar" if os.path.lexists(session) else "no session file or sidecar yet"


def _unlocked(fd: int) -> bool:
    """Whether no other process holds the sidecar's lock, exclusive or shared."""
    return _platform.try_lock(fd, shared=True) and _platform.sole_lock(fd)


def _read(fd: int, sidecar: str, size: int | None) -> tuple[HolderInfo | None, str]:
    """The record and, when it is corrupt, why (the record is then None): for one
    another user planted where anyone may write, that (`clear --force` refuses it)."""
    try:
        return _sidecar.read(fd, sidecar, size), ""
    except CorruptRecordError as e:
        try:
            _sidecar.refuse_planted(sidecar, os.fstat(fd))
        except PlantedFileError as planted:
            return None, str(planted)
        except OSError:
            pass
        return None, str(e)


def _status(
    session: str,
    sidecar: str,
    state: ProbeState,
    record: HolderInfo,
    *,
    stuck_after: float,
    now: float,
    fence: bool = True,
    reread: Callable[[], HolderInfo | None] | None = None,
) -> HolderStatus:
    """The status of a session whose record is ``record``; ``fence``: whether
    ``session`` names the record's session file on this host (else `fence_ok` is
    None: it is not known here); ``reread`` reads the record again (`_fence_ok`)."""
    alive = None
    if record.state is HELD:
        alive = holder_alive(record)
    stuck = state is ProbeState.LIVE and now - record.heartbeat_at > stuck_after
    return HolderStatus(
        session,
        sidecar,
        state,
        record=record,
        owner_alive=alive,
        stuck=stuck,
        fence_ok=_fence_ok(session, record, reread) if fence else None,
        reason=_reason(state, record, alive, stuck),
    )


def _fence_ok(
    session: str, record: HolderInfo, reread: Callable[[], HolderInfo | None] | None = None
) -> bool | None:
    """Whether the session is as ``record`` says its run left it. The record is read
    before the session's fingerprint is taken, so a live holder's append may land
    between the two (in the prompt phase its record follows at once): a difference
    counts only once the record, read again (``reread``), is still the same."""
    for _ in range(_FENCE_LOOKS):
        ok = _fence_matches(session, record)
        if ok is not False:
            return ok
        if record.state is HELD and record.phase is WRITE:
            return None  # in the write phase the holder's own last appends may be unrecorded
        if reread is None:
            return False
        try:
            again = reread()
        except (OSError, FenceLockError):
            return None
        if again is None or again.run_id != record.run_id:
            return None  # another run's record by now: not known for this one
        if (again.state, again.phase, again.fingerprint, again.heartbeat_at) == (
                record.state, record.phase, record.fingerprint, record.heartbeat_at):
            return False
        record = again
    return None  # the holder keeps writing: not known


_FENCE_LOOKS = 3
"""How many times `_fence_ok` reads a record that keeps changing before it gives up."""


def _fence_matches(session: str, record: HolderInfo) -> bool | None:
    try:
        mode = FenceMode(record.fence)
    except ValueError:
        mode = FenceMode.STAT
    try:
        actual = _fingerprint.take(session, mode)
    except (OSError, FenceLockError):
        return None
    expected = record.fingerprint
    if expected is None:
        return actual is None
    if actual is not None and record.host != _identity.ME.host:
        # Another host's holder (a shared store): a network filesystem has another
        # device number on each host that mounts it; the rest of the stat is the file's.
        actual = replace(actual, dev=expected.dev)
    return expected.matches(actual, mode)


def _left_holding(record: HolderInfo) -> tuple[int, bool | None] | None:
    """For a live record whose own process is gone: (the pid of the command its
    `fencelock run` started, whether that still runs); None otherwise."""
    command = record.command
    if command is None or _identity.owner_alive(
        record.pid, record.host, record.process_start
    ) is not False:
        return None
    return command.pid, _identity.owner_alive(command.pid, record.host, command.process_start)


def _reason(state: ProbeState, record: HolderInfo, alive: bool | None, stuck: bool) -> str:
    if state is ProbeState.STALE:
        if alive:
            return "owner process still runs but no longer holds the lock"
        if alive is None:
            return (f"no process holds the lock; its owner (pid {record.pid} on "
                    f"{record.host}) cannot be checked from here")
        return f"owner pid {record.pid} died while holding it"
    if state is ProbeState.LIVE:
        if record.state is not HELD:
            return ("locked, and the record is not held: an acquirer about to write its "
                    "record, or a process a `fencelock run` command left running")
        command = _left_holding(record)
        if command is not None and command[1] is False:
            return (f"held by a process that the command (pid {command[0]}) of a "
                    f"`fencelock run` (pid {record.pid}) left running; both are gone")
        if command is not None:
            return (f"held by pid {command[0]}, the command of a `fencelock run` whose "
                    f"own process (pid {record.pid}) is gone")
        if alive is False:  # a store's lock outlives its owner a while (an etcd lease)
            return (f"its owner, pid {record.pid}, is gone; the store keeps the lock until "
                    f"its lease expires")
        if stuck:
            return "live, but its heartbeat is older than the stuck threshold"
        return "held"
    return "released" if record.state is RELEASED else ""


def scan(
    directory: _sidecar.AnyPath, *, stuck_after: float = DEFAULT_STUCK_AFTER,
    backend: str | None = None,
) -> Iterator[HolderStatus]:
    """Every sidecar and ``*.jsonl`` session in ``directory``, sorted by session name
    (with an etcd ``backend``: every ``*.jsonl`` session, probed in etcd). A symlink
    named ``*.jsonl`` with no sidecar beside it is an alias, not a session: passed over."""
    stuck_after = _wait.duration(stuck_after, "stuck_after")
    base = _sidecar.absolute(directory)
    rows = (_scan_store(base, stuck_after, backend) if _backend.selected(backend) is not None
            else _scan_rows(base, stuck_after))
    planted = _anyone_may_create(base)  # (where another user's file may be)
    with contextlib.closing(rows):  # closed at once if the caller stops early
        for row in rows:
            yield _with_move(_unless_planted(row) if planted else row)


def _anyone_may_create(directory: str) -> bool:
    """Whether anyone may create files in ``directory`` (where a file of another user's
    may have been planted)."""
    try:
        return bool(os.stat(directory).st_mode & stat.S_IWOTH)
    except OSError:
        return False


def _scan_rows(base: str, stuck_after: float) -> Generator[HolderStatus, None, None]:
    """`scan`'s rows for the sidecars and sessions in ``base``."""
    names = set()
    beside = set()  # the sessions named by the sidecars listed
    odd: dict[str, os.DirEntry[str]] = {}
    """Entries that are not regular files (from the listing's file types: no system
    call): a session name among them is what no run can use."""
    try:
        with os.scandir(base) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(_sidecar.SUFFIX):
                    beside.add(name[: -len(_sidecar.SUFFIX)])  # whatever its session is
                elif name.endswith(SESSION_SUFFIX):
                    names.add(name)
                if not entry.is_file(follow_symlinks=False):
                    odd[name] = entry
    except OSError as e:
        raise SidecarAccessError(base, e, _sidecar.listing_fix(base, e)) from None
    names |= beside
    # A symlink named like a session with no sidecar beside it (``latest.jsonl`` for
    # the newest session) is an alias: no run holds it, and its target has its own row.
    names.difference_update(name for name, entry in odd.items()
                            if name not in beside and entry.is_symlink())
    now = time.time()
    # Rows in order; a lock found taken without a live record is watched for its grace
    # while the scan goes on, so that such sessions share their graces.
    rows: deque[HolderStatus | _Watch] = deque()
    watched: list[_Watch] = []
    looks: list[_Watch] = []  # `_look`'s, until the row is kept
    try:
        for name in sorted(names):
            looks.clear()  # the last row's: closed, or kept in ``rows`` by now
            session = os.path.join(base, name)
            sidecar = session + _sidecar.SUFFIX
            # What it is now (the listing's entry may be old); a regular file by now is
            # looked at as any session is.
            what = _sidecar.found_at(session) if name in odd else None
            if what is not None:
                row: HolderStatus | _Watch = _not_a_session(session, sidecar, what)
            elif name in ("", ".", ".."):  # ".holder", "..holder": no session is its
                row = HolderStatus(session, sidecar, ProbeState.UNREADABLE,
                                   reason=str(UnsafeSidecarError(sidecar, NO_SESSION_NAME)))
            elif name.endswith(_sidecar.SUFFIX):  # "S.holder.holder": S.holder is a sidecar
                row = HolderStatus(session, sidecar, ProbeState.UNREADABLE, reason=str(
                    UnsafeSidecarError(sidecar, SIDECAR_OF_A_SIDECAR)))
            else:
                row = yield from _look_in_turn(session, sidecar, stuck_after, now, looks,
                                               rows, watched)
            if isinstance(row, _Watch):
                watched.append(row)
            elif not rows:  # nothing held back (the usual case): out at once
                yield row
                continue
            rows.append(row)
            yield from _ready(rows, watched, _MAX_WATCHED, _MAX_PENDING_ROWS)
        yield from _ready(rows, watched, 0, 0)
    finally:
        try:  # (no generator before it: entering one is a point for a signal handler)
            _close_all(looks, watched, rows)
        except BaseException:  # one that landed as it began: once more
            _close_all(looks, watched, rows)
            raise


def _look_in_turn(
    session: str, sidecar: str, stuck_after: float, now: float, looks: list[_Watch],
    rows: deque[HolderStatus | _Watch], watched: list[_Watch],
) -> Generator[HolderStatus, None, HolderStatus | _Watch]:
    """`_look` for `_scan_rows`; out of descriptors, once a watch is over (yielding the
    rows that are ready meanwhile). (A loop of its own: see `_decided`.)"""
    found = _look(session, sidecar, stuck_after, now, into=looks, busy=bool(watched))
    while found is None:
        yield from _ready(rows, watched, len(watched), _MAX_PENDING_ROWS)
        found = _look(session, sidecar, stuck_after, now, into=looks, busy=bool(watched))
    return found


_MAX_WATCHED = 64
"""Sidecars `scan` watches at once (each an open descriptor)."""
_MAX_PENDING_ROWS = 1024
"""Rows `scan` keeps behind a watched one before it waits for that one."""


def _ready(
    rows: deque[HolderStatus | _Watch], watched: list[_Watch], most_watched: int,
    most_rows: int,
) -> Iterator[HolderStatus]:
    """Yield the rows decided at the front of ``rows``; wait (testing the watched
    locks) while ``watched`` or ``rows`` hold more than ``most_watched`` or
    ``most_rows`` (0: until every row is out)."""
    while True:
        for watch in watched:
            watch.step()
        watched[:] = [watch for watch in watched if watch.result is None]
        while rows:
            row = rows[0]
            if isinstance(row, _Watch):
                if row.result is None:
                    break
                row = row.result
            rows.popleft()
            yield row
        if len(watched) < max(most_watched, 1) and len(rows) <= most_rows:
            return
        time.sleep(_GRACE_STEP)


def list_store(url: EtcdURL, stuck_after: float) -> Iterator[HolderStatus]:
    """Every session the etcd store ``url`` has a holder or record for (`fencelock
    status --backend URL` with no path), a session file another user planted where
    anyone may create files shown as `probe` shows it."""
    from fencelock import _etcdlist

    for row in _etcdlist.list_holders(url, stuck_after):
        yield _unless_planted(row)


def _scan_store(
    base: str, stuck_after: float, backend: str | None
) -> Generator[HolderStatus, None, None]:
    try:
        with os.scandir(base) as entries:  # a symlink is an alias (see `_scan_rows`)
            names = [e.name for e in entries
                     if e.name.endswith(SESSION_SUFFIX) and not e.is_symlink()]
    except OSError as e:
        raise SidecarAccessError(base, e, _sidecar.listing_fix(base, e)) from None
    from fencelock import _etcdlist

    url = _backend.selected(backend)
    assert url is not None
    for name in sorted(set(names) | set(_etcdlist.names_in(url, base))):
        store = _store.open_store(backend, os.path.join(base, name))
        assert store is not None
        yield _unless_behind(store.probe(stuck_after), store)


def clear(
    path: _sidecar.AnyPath, *, remove: bool = False, force: bool = False,
    backend: str | None = None,
) -> HolderStatus:
    """Clear a stale record under the sidecar's lock; never touches a live holder.

    Returns what was found, with ``reason`` saying what was done. ``remove`` also
    deletes the sidecar (the session's token is kept on the session file first); where
    the directory refuses, `SidecarAccessError` carries what this would have returned
    as its ``status``. ``force`` sets a corrupt record aside as
    ``<sidecar>.corrupt-<time>-<random>``.
    """
    session, sidecar = _sidecar.paths(path)
    store = _store.open_store(backend, session)
    # Take the session's in-process slot for the whole clear, as an acquirer would:
    # where flock is emulated with per-process locks (NFS), the OS lock alone would
    # not keep another thread of this process from acquiring meanwhile.
    from fencelock._lock import SessionLock  # here: `status` starts without the lock's code

    slot = SessionLock(session, "clear", on_contention="fail", backend=backend)
    key = slot._key
    try:  # the take too: an interrupt as it is handed the slot must not keep it
        _registry.take(key, slot, True, None, None, time.monotonic())  # contended: held here
        if store is not None:
            found = store.clear(remove, force)
            missing = _in_no_directory(found)
            if missing is not None:
                raise missing
            return found
        # As acquire refuses it and probe calls it unreadable: a session path no run can
        # use (a directory, say) leaves the sidecar beside it alone.
        _sidecar.refuse_unusable_session(sidecar)
        cleared: HolderStatus | None = None
        while cleared is None:
            opened = _sidecar.Opened()
            try:
                try:
                    fd, st = _sidecar.open_checked(sidecar, create=False, write=True,
                                                   into=opened)
                except SidecarAccessError as e:
                    if e.cause.errno == errno.ENOENT:
                        if os.path.isdir(os.path.dirname(sidecar)):
                            return HolderStatus(session, sidecar, ProbeState.FREE,
                                                reason=_no_sidecar(session))
                        # Nothing to clear there: no "create it first", as a run is told.
                        raise _sidecar.access_error(sidecar, e.cause, False) from None
                    if e.cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                        # Not writable here: a live holder is still the answer that counts
                        # (as on a writable filesystem); otherwise why it cannot be cleared.
                        found = _probe(session, sidecar, DEFAULT_STUCK_AFTER, time.time())
                        if found.state is ProbeState.LIVE:
                            raise found._contended() from None
                        if found.state is ProbeState.FREE and not remove:
                            return HolderStatus(session, sidecar, ProbeState.FREE,
                                                record=found.record, reason="was free")
                    raise
                if not _lock_for_clear(fd, sidecar):
                    _sidecar.refuse_own_run(sidecar, fd, st)  # held by the run we are in
                    raise contended(session, sidecar)
                if _sidecar.still_at_path(sidecar, st):  # else removed meanwhile: again
                    cleared = _clear_locked(fd, st, session, sidecar, remove, force)
            finally:
                try:  # (which drops the lock)
                    opened.close()
                except BaseException:  # one that landed as it began: once more
                    opened.close()
                    raise
        return cleared
    finally:
        try:
            _registry.free(key, slot)
        except BaseException:  # an interrupt as it began or in it: given back once more
            _cleanup.to_the_end(lambda: _registry.free_surely(key, slot))
            raise


def _lock_for_clear(fd: int, sidecar: str) -> bool:
    """Take the sidecar's exclusive lock; False when a live holder has it.

    The lock may also be held for a moment by probes (shared test locks), or by an
    acquirer about to replace a stale record: when only shared locks are held, or the
    record's owner is known to be gone, keep trying for `_sidecar_holder.FAIL_GRACE`, as a
    fail-fast acquirer does.
    """
    try:
        if _platform.try_lock(fd):
            return True
        exclusive = not _platform.try_lock(fd, shared=True)
        if not exclusive and _platform.WINDOWS:
            return True  # Windows has no shared locks: that one is exclusive, and ours
        if exclusive and may_be_live(read_quietly(sidecar)):
            return False
        deadline = time.monotonic() + _sidecar_holder.FAIL_GRACE
        while time.monotonic() < deadline:
            time.sleep(0.001)  # a probe holds its test lock for microseconds
            if _platform.try_lock(fd):
                return True
        return False
    except OSError as e:
        raise SidecarAccessError(sidecar, e, "its lock cannot be taken") from None


def _aside_error(sidecar: str, aside: str, e: OSError) -> SidecarAccessError:
    """Setting a corrupt record aside failed: why (for the new name, which is what
    failed), and the way out by hand."""
    why = _sidecar.path_fix(aside, e, writing=True, sidecar=False)
    name = len(os.fsencode(os.path.basename(aside)))
    limit = _sidecar.name_max(os.path.dirname(aside)) if e.errno == errno.ENAMETOOLONG else 0
    if limit and name > limit:
        added = name - len(os.fsencode(os.path.basename(sidecar))) + len(_sidecar.SUFFIX)
        why = (f"the name it would be moved to ({os.path.basename(aside)}) is {name} "
               f"bytes, more than the {limit} this filesystem allows; `clear --force` "
               f"adds {added} bytes to the session's name, so it takes session names "
               f"within {limit - added} bytes")
    by_hand = "or move the corrupt sidecar aside by hand"
    return SidecarAccessError(sidecar, e, f"{why}, {by_hand}" if why else by_hand[3:])


def _set_aside(sidecar: str) -> str:
    """Move a corrupt sidecar to a new ``<sidecar>.corrupt-<time>-<random>`` name.

    The name is claimed first with an exclusive create, so an earlier aside (or a file
    someone planted under a name they guessed) is never replaced, and its random part
    leaves nobody a name to guess in advance; the rename then moves the sidecar in one
    step (other acquirers never see it with two names).
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for _ in range(_SET_ASIDE_TRIES):
        aside = f"{sidecar}.corrupt-{stamp}-{os.urandom(8).hex()}"
        try:
            fd, = map(os.open, (aside,),  # see `_sidecar.open_regular`
                      (os.O_WRONLY | os.O_CREAT | os.O_EXCL | _platform.OPEN_FLAGS,), (0o600,))
        except FileExistsError:
            continue
        except OSError as e:
            raise _aside_error(sidecar, aside, e) from None
        os.close(fd)
        try:
            os.rename(sidecar, aside)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(aside)  # the empty name claimed above
            raise _aside_error(sidecar, aside, e) from None
        return aside
    raise FenceLockError(f"{sidecar}: no unused name for a set-aside copy; check the directory")


_SET_ASIDE_TRIES = 16
"""Random names taken before giving up (a collision of 64 random bits is not luck)."""


def _release_stale(fd: int, sidecar: str, record: HolderInfo, size: int) -> bool | None:
    """Mark a stale record released (in the write phase): over its head, in place, when
    it is in fencelock's layout, so that every other byte stays as its writer left it;
    otherwise written anew, with its writer's own fields unless they no longer fit in a
    record encoded again (`_record.released_again`): whether they were dropped. None,
    writing nothing, where it does not fit even without them."""
    try:
        in_place = _record.in_layout_held(_platform.pread(fd, len(_record.RELEASED_HEAD), 0))
        if in_place:
            _platform.pwrite(fd, _record.RELEASED_HEAD, 0)
    except OSError as e:
        raise _sidecar.access_error(sidecar, e, True) from None
    if in_place:
        return False
    again = _record.released_again(record)
    if again is None:
        return None
    _sidecar.write_bytes(fd, sidecar, again[0], size)
    return again[1]


def _kept(error: Exception, status: HolderStatus) -> Exception:
    """``error`` (a sidecar that `clear` was to remove, and stays) with what `clear`
    found and did first as its ``status``, for a caller to report."""
    if isinstance(error, SidecarAccessError):
        error.status = status
    return error


def stale_record(record: HolderInfo) -> str:
    """A stale ``record`` as `clear`'s reason names it, on both stores."""
    return f"the stale record of pid {record.pid} (lane {record.lane!r})"


def dropped_part(record: HolderInfo, session: str) -> str:
    """Remove the copy a recover of ``record``'s that did not finish left (`<fresh>.part`:
    ``record`` names an origin); what was done, for `clear`'s reason. Call holding the
    session (both stores' `clear` do)."""
    if record.origin is None:
        return ""
    from fencelock import _fence

    left = _fence.drop_part(session)
    return "" if left is None else f"; removed {left}, the copy a recover that did not finish left"


def _clear_locked(
    fd: int, st: os.stat_result, session: str, sidecar: str, remove: bool, force: bool
) -> HolderStatus:
    def set_aside(state: ProbeState, what: str, record: HolderInfo | None = None,
                  done: str = "") -> HolderStatus:
        _tokens.keep_before_set_aside(session, fd)
        aside = _set_aside(sidecar)
        return HolderStatus(session, sidecar, state, record=record,
                            reason=f"{what} moved to {aside}{done}", set_aside=aside)

    try:
        record = _sidecar.read(fd, sidecar, st.st_size)
    except CorruptRecordError:
        if not force:
            raise
        return set_aside(ProbeState.UNREADABLE, "corrupt record")
    was_stale = record is not None and record.state is HELD
    state = ProbeState.STALE if was_stale else ProbeState.FREE
    done = "was free"
    if record is not None and was_stale:
        dropped = _release_stale(fd, sidecar, record, st.st_size)
        who = stale_record(record)
        if dropped is None:  # kept, also by --remove: both stores alike
            part = dropped_part(record, session)  # while the lock still keeps others out
            if not force:
                raise RecordTooLargeError(sidecar, status=HolderStatus(
                    session, sidecar, state, record=record, reason=f"kept {who}{part}"))
            return set_aside(state, _record.TOO_LARGE, record, part)
        done = f"cleared {who}"
        if dropped:
            done += (" without its fields of other writers (" + ", ".join(record.extra)
                     + "), which no longer fit in a record once written again")
    if was_stale and record is not None:
        done += dropped_part(record, session)
    removed = False
    if remove:
        # What this returns, for the error of a sidecar that stays to carry (`_kept`).
        found = HolderStatus(session, sidecar, state, record=record, reason=done)
        token = record.token if record is not None else 0
        exists = os.path.exists(session)
        why = _tokens.save(session, token) if token and exists else None
        # Also beside it: the session file may lose its mark (written anew and renamed
        # over) before the session is taken again, or have none to keep it on.
        try:
            kept = _tokens.keep_removed(session, token) if token and why is None else None
        except OSError as e:  # a directory this user cannot make a file in
            raise _kept(_sidecar.unlink_error(sidecar, e, done if was_stale else ""),
                        found) from None
        if why is not None:  # without the sidecar, its tokens could start over
            done += f"; sidecar kept, as the session's token cannot be saved on it: {why}"
        elif kept is not None:
            done += (f"; sidecar kept, as the session's token cannot be kept in its "
                     f"directory: {kept}")
        else:
            try:
                os.unlink(sidecar)
            except OSError as e:
                # Say what was done before the removal failed: the record is released.
                done_first = done if was_stale else ""
                raise _kept(_sidecar.unlink_error(sidecar, e, done_first), found) from None
            removed = True
            done += "; sidecar removed"
    return HolderStatus(session, sidecar, state, record=record, reason=done, removed=removed)
