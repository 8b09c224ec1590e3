"""Stuck-session recovery done safely: never re-fire on a session that a run still holds.

`recover` asks any in-process run on the session to abort, waits up to ``wait``
seconds for the holder to let go, and then either answers ``"refire"`` (the session
is free; a stale record is cleared first) or starts a fresh session file beside the
old one (``"fresh"``), optionally carrying the old transcript's complete lines over.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import hashlib
import os
import stat
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fencelock import (
    _backend,
    _cleanup,
    _fence,
    _fingerprint,
    _forkguard,
    _lock,
    _moved,
    _platform,
    _probe,
    _registry,
    _sidecar,
    _store,
    _successors,
    _tokens,
    _wait,
)
from fencelock._constants import DEFAULT_STUCK_AFTER
from fencelock._errors import (
    FenceLockError,
    FenceLockWarning,
    HolderLostError,
    RecordTooLargeError,
    SessionContendedError,
    SessionWriteError,
    SidecarAccessError,
    StoreUnavailableError,
    UnsafePathError,
    shell_word,
    warn_each_time,
)
from fencelock._fingerprint import FenceMode
from fencelock._platform import describe_mode
from fencelock._probe import HolderStatus, ProbeState
from fencelock._record import MAX_TOKEN, HolderInfo


class Action(enum.StrEnum):
    """What `recover` decided: ``REFIRE`` the same session (its run is gone), or use a
    ``FRESH`` one (its run is still stuck in it)."""

    REFIRE = "refire"
    FRESH = "fresh"


@dataclass(frozen=True, slots=True)
class Recovery:
    """What `recover` decided: the action, the session to use, and what it found."""

    action: Action
    session: str
    holder: HolderStatus
    waited: float = 0.0
    carried_lines: int = 0
    """Lines carried into a fresh session; 0 when another recover of the same stuck run
    made it (it is named after that run)."""


def fresh_session(path: _sidecar.AnyPath) -> str:
    """A new, unused ``<uuid>.jsonl`` path beside ``path`` (not created)."""
    session, _ = _sidecar.paths(path)
    directory = os.path.dirname(session)
    while True:
        candidate = os.path.join(directory, f"{uuid.uuid4()}.jsonl")
        if not os.path.lexists(candidate) and not os.path.lexists(candidate + _sidecar.SUFFIX):
            return candidate


def recover(
    path: _sidecar.AnyPath,
    *,
    wait: float = 30.0,
    fresh: bool = True,
    carry: bool = True,
    lane: str = "recovery",
    stuck_after: float = DEFAULT_STUCK_AFTER,
    backend: str | None = None,
) -> Recovery:
    """The stuck-session recovery step. Raises `SessionContendedError` when the
    session is still held after ``wait`` and ``fresh`` is False. On etcd, an owner key
    without a record gets up to the URL's TTL and a margin (2 s, or half the TTL) more
    to write one or go, longer across an etcd restart (`_record_or_gone`), unless it
    shows the run waited for gone (the key is another acquisition's); ``waited``
    counts that too.

    ``"refire"`` means the stuck run is gone, not that the session is reserved: another
    lane may take it before the re-fired run does, so that run acquires it as any run
    does (waiting by default), and never races the other.
    """
    limit = _wait.limit(wait, "wait")
    stuck_after = _wait.duration(stuck_after, "stuck_after")
    if fresh:
        _lock.SessionLock.check_lane(lane)  # before any wait: a fresh session takes it
    session, sidecar = _sidecar.paths(path)
    _registry.real_key(session)  # refuses a path through another user's symlink
    _fingerprint.take(session, FenceMode.STAT)  # refuses a directory, FIFO or symlink
    _sidecar.refuse_planted_at(session)  # another user's, where anyone may create files
    store = _store.open_store(backend, session)
    if store is None:
        # Its record names the fresh session every recover answers: one another user
        # planted (and the fresh session of that name they made) would take the run's
        # next lines.
        _sidecar.refuse_planted_at(sidecar)
    else:  # no run or fresh session can be made there: as the sidecar's probe refuses it
        missing = _sidecar.directory_error(session, False)
        if missing is not None:
            raise missing
    found = _probe_through_restart(session, stuck_after, backend, limit)
    if found.state is ProbeState.UNREADABLE:
        raise _unreadable(session, sidecar, found, sidecars=store is None)
    moved = _moved.target(session)
    if moved is not None and _published(moved, session):  # (a part a recover left goes)
        # A recover moved the conversation: it goes on there, whoever holds it now
        # (with the lines its recover, killed before it carried them, left behind).
        _finish_move(session, moved, lane if fresh else "recovery", backend)
        return Recovery(Action.FRESH, moved, found, 0.0, 0)
    waited, released = 0.0, False
    if found.state is ProbeState.LIVE:
        _registry.abort(_registry.in_store(_registry.registry_key(session),
                                           "" if store is None else store.space))
        start = time.monotonic()
        released = _wait_for_let_go(
            store, session,
            lambda: _let_go(found, _probe.probe(session, stuck_after=stuck_after,
                                                backend=backend)), limit)
        waited = time.monotonic() - start
        # The run waited for may have let go with another run taking the session at once
        # (a queued lane): then the lock was never seen free, yet the stuck run is gone,
        # and its turn is re-fired (queued in turn), not moved to a fresh session.
        now = None if released else _probe.probe(session, stuck_after=stuck_after,
                                                 backend=backend)
        if now is not None and now._owner and now.record is None and store is not None \
                and not _let_go(found, now):  # (gone already: another key owns it now)
            now = _record_or_gone(session, now, stuck_after, backend, store)
            waited = time.monotonic() - start
        if now is not None and not _let_go(found, now):
            if not fresh:
                url = _backend.selected(backend)
                raise found._contended(waited=waited,
                                       backend=None if url is None else url.text)
            old_token = found.record.token if found.record is not None else 0
            stuck = _holding_run(now) or _holding_run(found)
            successor = _successor(session, stuck) or _owner_successor(session, now)
            try:
                new, carried, made = _start_fresh(session, lane, carry, old_token, backend,
                                                  waited, successor, stuck)
            except _RunEnded as e:  # it let go as the fresh session was begun: re-fire
                # Its lock given back, a holder store (etcd) keeps the released record.
                _drop_unfinished(session, e.fresh, None, backend)
            else:
                if stuck is not None and made:  # a run's (a holder outside fencelock's:
                    # its own). Marked by this call (`_fill_fresh`), unless finishing it
                    # failed first: for every later run and recover of it (under the
                    # session file's lock, as its maker does: see there).
                    _mark_held(session, new)
                elif stuck is not None:  # another recover's: finished, where it was killed
                    _finish_move(session, new, lane, backend)
                try:
                    return Recovery(Action.FRESH, new, found, waited, carried)
                except BaseException:  # an interrupt: the caller never learns its name
                    if made and successor is None:  # (another recover may answer it)
                        _remove_fresh(new)
                    raise
    now = _probe.probe(session, stuck_after=stuck_after, backend=backend)
    # The run waited for is gone: seen letting go (``released``: a look that still shows
    # it holding met the lock taken for an instant, another recover's test of it or a
    # clear of its stale record, while the run's process was still exiting), or seen
    # gone with another run holding the session now (queued behind it). Then a fresh
    # session a recover made for it is the answer: every recover that found it stuck
    # answers the same.
    ended = (_holding_run(found) if found.state is ProbeState.LIVE
             and (released or _let_go(found, now)) else None)
    taken_over = _taken_over(session, now, backend, ended)
    if taken_over is not None:  # the conversation was moved there
        # (Again, where its recover was stopped first; under the lock, as it marks.)
        _finish_move(session, taken_over, lane if fresh else "recovery", backend)
        return Recovery(Action.FRESH, taken_over, found, waited, 0)
    if found._owner and found.record is None and now._owner != found._owner:
        # An owner key without a record, gone since: a recover that took it for a holder
        # outside fencelock named its fresh session by that key (no mark: such a
        # holder's session is not fencelock's to close).
        taken_over = _made_for(session, _owner_successor(session, found), backend)
        if taken_over is not None:
            return Recovery(Action.FRESH, taken_over, found, waited, 0)
    if store is not None and (stamped := _tokens.last_stamped(session)) and \
            (revision := _revision(store, backend)) < stamped:  # (etcd lost its data)
        raise _tokens.store_behind(session, revision, stamped, store.name)
    if now.state is ProbeState.STALE:
        with contextlib.suppress(SessionContendedError, RecordTooLargeError):
            # Raised only when another run took the session in the meantime: its new
            # record replaces the stale one, and the re-fired run waits for it as any
            # run does. (A stale record too large to write back released is written
            # over by the re-fired run's, whose token follows it.)
            _probe.clear(session, backend=backend)
    elif store is None:
        _refuse_unwritable(sidecar)
    return Recovery(Action.REFIRE, session, found, waited)


def _refuse_unwritable(sidecar: str) -> None:
    """A session whose sidecar this user cannot open for writing (a read-only
    filesystem, a 0444 sidecar) is no session to re-fire a run on: its acquire would
    fail at once. Said here, with the fix, rather than answered; so is a missing sidecar
    that its directory does not let this user make (the run's acquire would make it)."""
    if not os.path.lexists(sidecar):
        refused = _platform.creating_refused(os.path.dirname(sidecar))
        if refused:
            raise _sidecar.access_error(sidecar, OSError(refused, os.strerror(refused)), True)
        return
    if os.access(sidecar, os.W_OK, effective_ids=_platform.EFFECTIVE_IDS):
        return  # (asked without opening it: no descriptor for an interrupt to leave open)
    try:  # to say why, as an acquire would
        fd = os.open(sidecar, os.O_RDWR | _platform.OPEN_FLAGS)
    except OSError as e:
        raise _sidecar.access_error(sidecar, e, True) from None
    os.close(fd)  # access(2) and open(2) disagree (an ACL's mask, say): let the run try


_LET_GO_LOOK = 0.25
"""Seconds between looks, while recover waits for a lock (`_wait_for_let_go`), at
whether the stuck run is gone, or the fresh session another recover copies is named."""
_LET_GO_LOOK_STORE = 1.0
"""The same with a holder store (etcd: each step's wait is a request, as is a look at
the stuck run)."""


def _wait_for_let_go(store: _store.HolderStore | None, session: str,
                     gone: Callable[[], bool], limit: float | None) -> bool:
    """Wait up to ``limit`` seconds for ``session`` to be free in ``store`` (None: its
    sidecar): True once it is. A run queued behind the holder waited for that takes the
    session as it lets go leaves it never free: so at every step (`_LET_GO_LOOK`)
    ``gone`` is asked whether the wait is over all the same (the stuck run gone, the
    fresh session named), which ends it too (False). (A sidecar's wait that times out
    leaves its helper blocked in the kernel, and the next step's wait takes it over.)"""
    def wait_once(timeout: float | None, whole: bool = False) -> bool:
        if store is None:
            return _wait.wait_until_unlocked(session + _sidecar.SUFFIX, timeout)
        return store.wait_free(timeout, ride_out=whole)  # a step's outage: ridden below

    step = _LET_GO_LOOK if store is None else _LET_GO_LOOK_STORE
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            if wait_once(step if left is None else min(step, left)):
                return True
            if (deadline is not None and time.monotonic() >= deadline) or gone():
                return False
        except StoreUnavailableError:
            # The store is away (etcd restarting): the rest of the wait in one, which
            # rides a restart out as a waiting run does; a step's would give up at its end.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return wait_once(left, whole=True)


def _revision(store: _store.HolderStore, backend: str | None) -> int:
    """The store's revision, asked again while it cannot be reached (within its TTL), as
    recover's other requests are."""
    from fencelock._etcdcluster import through_outage

    url = _backend.selected(backend)
    assert url is not None
    return through_outage(store.revision, url.ttl, None)


def _probe_through_restart(session: str, stuck_after: float, backend: str | None,
                           limit: float | None) -> HolderStatus:
    """The session's state; from a store (etcd) that cannot be reached, asked again
    within the wait's limit: recover rides out a restart as a waiting run does."""
    url = _backend.selected(backend)
    if url is None:
        return _probe.probe(session, stuck_after=stuck_after, backend=backend)
    from fencelock import _etcd, _etcdcluster

    deadline = None if limit is None else time.monotonic() + limit
    store = _etcd.EtcdHolder(url, session)
    # Each request bounded by the wait's deadline too (a request gets at least 0.5 s).
    return _probe._with_move(_etcdcluster.through_outage(
        lambda: store.probe(stuck_after, deadline), url.ttl, deadline))


def _unreadable(session: str, sidecar: str, found: HolderStatus, *,
                sidecars: bool) -> FenceLockError:
    """Why ``found`` is unreadable, as the error of its own kind where the sidecar shows
    it again (`UnsafeSidecarError`, `SidecarAccessError`, `CorruptRecordError`), so that
    a caller can catch it as it would from `SessionLock`; else a `FenceLockError`."""
    if sidecars:
        try:
            _sidecar.using(sidecar, lambda opened, _: _sidecar.read(opened.fd, sidecar))
        except FenceLockError as e:
            return e
    return FenceLockError(f"{session}: cannot recover: {found.reason}")


CARRY_CHUNK = 4 * 1024 * 1024
"""How much of the old transcript `recover` holds in memory at a time when it carries
it to a fresh session (the chunks written one after the other, fsynced once whole)."""
_LONG_LINE = 1024 * 1024
"""Lines longer than this are searched for a stamp only in their last `_tokens.TAIL`."""


def _still_holds(session: str, run: HolderInfo, backend: str | None) -> bool:
    """Whether the run ``run`` may still hold ``session``: not known to be gone."""
    return not _gone(run, _probe.probe(session, backend=backend))


def _let_go(found: HolderStatus, now: HolderStatus) -> bool:
    """Whether the run that held the session when ``found`` was read is known to be
    gone ``now``; False when ``found`` named no run (but an etcd owner key without a
    record is told by its revision: gone once another key owns the session, or none)."""
    before = _holding_run(found)
    if before is None:  # as `_gone`: a look that could not read the session is no sign
        return bool(found._owner) and found.record is None and (
            now.state in (ProbeState.FREE, ProbeState.STALE)
            or (now.state is ProbeState.LIVE and now._owner != found._owner))
    return _gone(before, now)


_RECORD_POLL = 0.05
"""How often `_record_or_gone` looks again (a request to etcd each time)."""
_LEASE_LOOK = 1.0
"""How often it asks how long the owner's lease has left."""
_LEASE_SLACK = 2.0
"""Seconds past a lease's end within which etcd has let it go, at least (half the
URL's TTL where that is more)."""


def _record_or_gone(session: str, now: HolderStatus, stuck_after: float,
                    backend: str | None, store: _store.HolderStore) -> HolderStatus:
    """``now`` shows an etcd owner key without a record: a waiter whose turn came and
    that is about to write its record, or one that died (or was paused) while it
    queued, whose key owns the session until its lease runs out. Every recover must
    name one fresh session for the run that holds, which only a record names: the
    session as it is once that owner has written its record or is gone. The owner's
    lease bounds the wait: a dead or paused waiter renews it no more, and one renewed
    meanwhile is a live holder's that writes no record (a waiter whose turn came
    writes its own at once): one outside fencelock (etcdctl lock), answered at once.
    etcd lets a lease go some time after it ran out (later on a busy host): what it
    had left is given `_LEASE_SLACK` more, or half the URL's TTL. A lease longer than
    the URL's TTL (another client's, etcdctl lock's 60 s) is waited for only that TTL:
    its holder is then taken for one outside fencelock, and its fresh session named
    by its key (`_owner_successor`), which every recover that sees it answers (one
    that starts after it went finds no trace of it, and re-fires). Rides out an etcd
    restart, as the look before the wait does, each restart moving the end out."""
    from fencelock._etcdcluster import through_outage

    url = _backend.selected(backend)
    ttl = 0.0 if url is None else url.ttl
    slack = max(_LEASE_SLACK, ttl / 2)
    begun = time.monotonic()
    # None: the lease is gone, its key not yet (etcd deletes it a moment later).
    left, term = through_outage(store.owner_lease_left, ttl, None)
    deadline, looked = begun + min(left or 0.0, ttl) + slack, begun
    while time.monotonic() < deadline:
        time.sleep(_RECORD_POLL)
        # An outage is ridden out past the deadline (up to the TTL): a restart gives
        # the lease its whole TTL again, which the term says once etcd answers.
        later = _probe_through_restart(session, stuck_after, backend,
                                       max(ttl, deadline - time.monotonic()))
        if later.state is not ProbeState.LIVE or later._owner != now._owner or \
                later.record is not None:
            return later
        if left is not None and time.monotonic() - looked >= _LEASE_LOOK:
            looked = time.monotonic()
            again, now_term = through_outage(store.owner_lease_left, ttl, None)
            if again is not None and now_term != term:
                # etcd restarted (a new term): it gave every lease its whole TTL again,
                # a dead waiter's too. Counted anew from here.
                left, term, begun = again, now_term, looked
                deadline = max(deadline, looked + min(again, ttl) + slack)
            elif again is not None and again > left - (looked - begun) + 1.5:
                return later  # renewed: a live holder outside fencelock
    return now


def _gone(run: HolderInfo, now: HolderStatus) -> bool:
    """Whether ``now`` shows the run ``run`` gone: the session free, stale, or another
    run's (on etcd, another acquisition's owner key, a holder outside fencelock's too).
    Not a look that could not read the session (out of descriptors, a corrupt record),
    nor a lock held with no record of the run's (with sidecars): the run may hold it
    still."""
    after = _holding_run(now)
    if after is None:
        if now.state is ProbeState.LIVE and now._owner and now.record is None:
            # An etcd owner key with no record yet (a queued run about to write its
            # own, a clear): its create revision is its acquisition's token, so one
            # other than the run's is another acquisition's, which owns the session
            # only once the run's key is gone.
            return now._owner.rpartition("@")[2] != str(run.token)
        return now.state in (ProbeState.FREE, ProbeState.STALE)
    return (after.run_id, after.token) != (run.run_id, run.token)


def _holding_run(found: HolderStatus) -> HolderInfo | None:
    """The record of the fencelock run that holds the session, for naming its fresh
    session: the live holder's (`HolderStatus._live_record`), or that of a `fencelock
    run` whose command left processes behind. Those hold the session through the
    descriptor the run's process locked, after the run released its record: the lock
    the system lists is that process's (which has exited), so the record still names
    the run."""
    held = found._live_record
    if held is not None or found.state is not ProbeState.LIVE:
        return held
    return found.record if found.left_by_run else None


def _successor(session: str, stuck: HolderInfo | None) -> str | None:
    """The fresh session that takes over from the stuck run ``stuck``: one name per
    stuck run (`_successors.of_run`), so that recovers of the same stuck run, at once or
    later, from any host, agree on it. None for a holder without a record (nothing to
    name it by)."""
    if stuck is None or not stuck.run_id:
        return None
    return _successors.of_run(session, stuck.run_id, stuck.token)


def _owner_successor(session: str, now: HolderStatus) -> str | None:
    """For an etcd owner key that writes no record (a holder outside fencelock, etcdctl
    lock): a fresh session named by the key and its revision, so that the recovers of
    that one acquisition agree on it; None elsewhere (a holder a random name is given)."""
    if now.record is not None or not now._owner:
        return None
    return _successors.named(session, b"owner", now._owner.encode("utf-8", "surrogatepass"))


class _RunEnded(Exception):
    """The stuck run let go of the session before its fresh session was begun: the
    recover re-fires instead, as every recover coming after it does. ``fresh``: the
    name it was to have, now removed."""

    def __init__(self, fresh: str) -> None:
        super().__init__(fresh)
        self.fresh = fresh


def _start_fresh(
    session: str, lane: str, carry: bool, old_token: int, backend: str | None, waited: float,
    successor: str | None = None, stuck: HolderInfo | None = None,
) -> tuple[str, int, bool]:
    """The fresh session beside ``session``, how many lines it carries, and whether this
    call made it: ``successor`` when given, else a new name.

    A fresh session gets its name only once its copy is whole (`_fence.publish`), so a
    successor that exists was made whole by another recover of the same stuck run: it
    is answered with 0 lines. While another recover makes it, this one waits for that
    (up to `SUCCESSOR_WAIT`), and makes it itself if that one failed or died first.

    When it cannot be made, the error says that recover failed, why, and what to do;
    what was made of it is removed, a successor's sidecar included (only an interrupt
    landing after its lock was given back leaves that sidecar, to the next recover)."""
    deadline = time.monotonic() + SUCCESSOR_WAIT
    while True:
        if successor is not None and _published(successor, session):
            return successor, 0, False
        new = successor or fresh_session(session)
        try:
            return _make_fresh(session, new, lane, carry, old_token, backend, waited,
                               successor is not None, stuck)
        except SessionContendedError:
            if successor is None:
                raise
            if _published(successor, session):
                continue  # made meanwhile, and perhaps already in use: answer it
        # Another recover of the same stuck run is making it: wait for that.
        if not _wait_made(successor, session, backend, deadline):
            if _published(successor, session):
                continue
            raise FenceLockError(
                f"{session}: still held after {waited:.1f} s, and another recover has been "
                f"making its fresh session {successor} for over {SUCCESSOR_WAIT:.0f} s; see "
                "who holds it (fencelock status) and recover again once it is done"
            )


SUCCESSOR_WAIT = 300.0
"""How long `recover` waits for another recover's copy of the same stuck run."""


def _taken_over(session: str, now: HolderStatus, backend: str | None,
                ended: HolderInfo | None = None) -> str | None:
    """The fresh session a recover made for the run that last held ``session``, when
    that run is gone (``now`` free or stale; or it is ``ended``, known to have let go):
    every recover of that run answers it, also once the run has ended. It waits for a
    copy under way; None when no recover made one (or its copy failed)."""
    if ended is None and now.state not in (ProbeState.FREE, ProbeState.STALE):
        return None
    return _made_for(session, _successor(session, ended or now.record), backend)


def _made_for(session: str, successor: str | None, backend: str | None) -> str | None:
    """``successor`` (a stuck run's fresh session) once a recover has made it whole,
    waiting for a copy under way; None when none is made (or its copy failed)."""
    if successor is None:
        return None
    if _published(successor, session):
        return successor
    found: HolderStatus | None = _probe.probe(successor, backend=backend)
    if found is not None and found.state is ProbeState.LIVE:
        _sidecar.refuse_planted_at(successor + _sidecar.SUFFIX)  # a lock held to stall us
        made = _wait_made(successor, session, backend, time.monotonic() + SUCCESSOR_WAIT)
        if _published(successor, session):
            return successor
        if not made:
            raise FenceLockError(
                f"{session}: another recover has been making the fresh session {successor} "
                f"of its last run for over {SUCCESSOR_WAIT:.0f} s; see who holds it "
                "(fencelock status) and recover again once it is done")
        found = None  # its copy failed, or its maker died: looked at again
    elif _published(successor, session):
        return successor  # named as its maker let go (or died) after the look above
    _drop_unfinished(session, successor, found, backend)
    return None  # nobody makes it now


def _drop_unfinished(session: str, fresh: str, found: HolderStatus | None,
                     backend: str | None) -> None:
    """Remove what is left of ``fresh`` (``found``: as probed, or None to probe it), a
    fresh session of ``session``'s that was never named and that no recover makes now,
    the run it was for being gone: the stale record of a recover killed while it made
    it, with its part copy; the released one a recover that found the run gone leaves
    in a holder store (etcd); the empty sidecar of one killed before its first record.
    As `clear --remove` does, under its lock. Left as it is where that fails (`status`
    and `clear` then show it): the recover re-fires all the same."""
    with contextlib.suppress(FenceLockError, OSError):
        if found is None:
            found = _probe.probe(fresh, backend=backend)
        record = found.record
        if record is not None:
            left = record.origin == session and found.state in (ProbeState.STALE,
                                                                 ProbeState.FREE)
        else:
            left = found.state is ProbeState.FREE and os.path.lexists(found.sidecar)
        if left and not os.path.lexists(fresh):
            _probe.clear(fresh, remove=True, backend=backend)


def _published(successor: str, session: str) -> bool:
    """Whether the fresh session ``successor`` exists (whole: see `_start_fresh`)."""
    try:
        mode = os.lstat(successor).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return False  # no such file can be there (making one is refused in its turn)
        raise SidecarAccessError(successor, e, _sidecar.path_fix(
            successor, e, writing=True, sidecar=False) or "recover needs to read it") from None
    # Not one recover made: its name can be worked out from the stuck run's record.
    _sidecar.refuse_planted_at(successor)  # another user's, made in advance: named so
    if not stat.S_ISREG(mode):
        raise UnsafePathError(successor, describe_mode(mode, successor))
    _fence.forget_part(successor)
    return True


def _wait_made(successor: str, session: str, backend: str | None, deadline: float) -> bool:
    """Wait (until ``deadline``) for nobody to hold ``successor``, or for it to be named;
    False on timeout. (A recover killed just after naming it leaves its lock to a run of
    the fresh session at once: on etcd its lock stays until its lease runs out, then
    goes straight to the run queued behind it; with sidecars a run woken with this wait
    may take it first. Either way it is never seen free.)"""
    named = functools.partial(_published, successor, session)
    # (In steps, riding an etcd restart out as recover's wait for the stuck run does.)
    return _wait_for_let_go(_store.open_store(backend, successor), successor, named,
                            max(0.0, deadline - time.monotonic())) or named()


def _make_fresh(
    session: str, new: str, lane: str, carry: bool, old_token: int, backend: str | None,
    waited: float, successor: bool, stuck: HolderInfo | None = None,
) -> tuple[str, int, bool]:
    """`_start_fresh`'s making of ``new`` (`SessionContendedError`: a ``successor``
    another recover holds)."""
    copied: list[int] = []
    try:
        _fill_fresh(session, new, lane, carry, old_token, backend, copied, successor, stuck)
        if not copied:
            return new, 0, False  # another recover of the same stuck run made it
    except SessionContendedError:
        raise
    except (FenceLockError, OSError) as e:
        if copied:
            # Made whole and named: only what comes after failed (the directory's fsync,
            # its record's fence point, giving its lock back). It is the session to use
            # all the same: for a stuck run with a record, every later recover answers
            # it, and the run itself may have been told (`superseded`).
            cause = getattr(e, "why", None) or getattr(e, "cause", None) or e
            try:
                warnings.warn(FenceLockWarning(
                    f"{new}: the fresh session is made, but finishing it failed ({cause}); "
                    "it is the session to use (its first run writes its record anew)"),
                    stacklevel=4)
            except BaseException:  # raised (warnings as errors): nobody learns its name
                if not successor:  # a new name only this call knew; a successor stays
                    _remove_fresh(new)
                raise
            return new, copied[0], True
        if not successor:  # a new name nobody has: take back what its acquire made
            _remove_fresh(new)
        cause = getattr(e, "cause", e)
        where = getattr(e, "path", None) or getattr(e, "session", None) or new
        reason = (f"{where}: {cause.strerror}" if isinstance(cause, OSError) and cause.strerror
                  else str(e))
        if isinstance(cause, OSError) and cause.errno == errno.ENAMETOOLONG:
            reason = f"{where}: {_sidecar.path_fix(where, cause, writing=True, sidecar=False)}"
        # Starting it empty helps where the copy did not fit, not where its record did not.
        empty = ("" if not carry or isinstance(e, SidecarAccessError)
                 or not isinstance(cause, OSError) or cause.errno not in (
                     errno.ENOSPC, errno.EDQUOT)
                 else ", or start it empty (--no-carry, carry=False)")
        raise FenceLockError(
            f"{session}: still held after {waited:.1f} s, and a fresh session could not be "
            f"started beside it ({reason}); fix that and recover again{empty}, or recover "
            "without a fresh session (--no-fresh, fresh=False) to report the holder instead"
        ) from e
    except BaseException:  # an interrupt (SIGTERM, Ctrl-C), whole or not
        if not successor:  # a new name nobody has; a successor's is left to the next recover
            _remove_fresh(new)
        raise
    return new, copied[0], True


def _remove_fresh(new: str) -> None:
    """Remove a fresh session whose name nobody was given, its sidecar, and a part copy
    an earlier recover killed while making it left (call holding it, or with a name
    only this call knows: nobody else writes its part then)."""
    with contextlib.suppress(OSError, FenceLockError):
        _fence.drop_part(new)  # (before the sidecar: no record will lead to it after)
    for made in (new, new + _sidecar.SUFFIX):
        with contextlib.suppress(OSError):
            os.unlink(made)


def _fresh_mode(session: str) -> int:
    """The mode of a fresh session and its sidecar: 0o600, or 0o660 where the session
    is shared with its group (it can read and write it), as a gateway made it with
    ``mode=0o660``, so that the group keeps the conversation, and the fresh files get
    that group too (as root; else in a set-group-ID directory of that group, or where
    it is this process's own): another group must not read the conversation. Never
    wider: a sidecar others can read, they can lock and hold."""
    try:
        st = os.lstat(session)
    except OSError:
        return 0o600
    shared = stat.S_ISREG(st.st_mode) and st.st_mode & 0o060 == 0o060
    return 0o660 if shared and _platform.group_of_new(session, st) == st.st_gid else 0o600


def _fill_fresh(
    session: str, new: str, lane: str, carry: bool, old_token: int, backend: str | None,
    copied: list[int], successor: bool = False, stuck: HolderInfo | None = None,
) -> None:
    """Make ``new`` with the old transcript's complete lines, under its lock; their count
    goes into ``copied`` once they are all there. A ``successor`` that exists once its
    lock is ours was made by another recover: it is left as it is, and ``copied`` stays
    empty."""
    lock = _lock.SessionLock(new, lane, on_contention="fail", origin=session, backend=backend,
                             mode=_fresh_mode(session))
    lock._sole_name = True  # a sidecar a failed acquire leaves would list as a session
    lock._like = session  # made as root, its files are the stuck session's owner's
    # The fresh session continues the old one's tokens: its stamped lines come along.
    # Its lock is taken before the old transcript is read, so that a recover arriving
    # meanwhile (the stuck run gone by then) finds this copy under way and answers it.
    last = _tokens.last_stamped(session) if carry else 0  # uncarried lines bind nothing
    lock._token_floor = max(old_token, last)
    lock._stamped_floor = last  # the lines' own tokens (a store's may be of another kind)
    fd = -1
    move: _Move | None = None
    copying = [-1]  # the old session, opened to copy it (`_close_copy`)
    held: _Held = []  # the old session, locked to mark it
    let_go = (functools.partial(_let_go_of_marked, held),
              functools.partial(_close_copy, copying))  # (made before: see `_cleanup`)
    try:
        with lock:
            # Another recover of the same stuck run made it meanwhile; but not what
            # another user put at its name in advance, nor anything but a regular file
            # (`_published` refuses those): a recover must never answer one.
            try:
                answered = bool(successor) and _published(new, session)
            except BaseException:
                # Refused: this acquire's sidecar goes (it could keep out the next
                # recover, another user's), while its lock is ours; never theirs.
                with contextlib.suppress(OSError):
                    os.unlink(new + _sidecar.SUFFIX)
                raise
            if answered:
                if stuck is not None and lock._previous is not None:
                    # Its maker died holding it (this acquire took its record over):
                    # finished here, as `_finish_move` would have, before this release
                    # leaves a record that no longer says so. (Where that fails, the
                    # recover's caller marks it all the same: `recover`.)
                    with contextlib.suppress(FenceLockError, OSError):
                        _finish_held(lock, session, new)
                return
            # The decision, taken again under this lock: a recover that found the stuck
            # run gone re-fired unless it found this fresh session begun (held or made),
            # so one that begins it only now must re-fire too.
            if stuck is not None and not _still_holds(session, stuck, backend):
                _remove_fresh(new)  # while its lock is ours: nothing of it stays
                raise _RunEnded(new)
            taken = lock._token  # the first record's
            try:
                # The old session's token floor (its mark; its set-aside copies, which can
                # take long to read) only now that the lock is taken: the sooner it is, the
                # sooner a recover arriving after the stuck run ended finds this copy.
                floor = _tokens.floor(session)
                # (Stored with no point for a signal handler between: see `_open_old`.)
                copying[0], = map(_open_old, (session,)) if carry else (-1,)
                fd = copying[0]
                # The old transcript up to its last line break (a torn last line stays
                # behind), as it is now: the live holder may still append while this copies.
                end = _complete_end(fd, session) if fd >= 0 else 0
                lines, highest, digest = _scan(fd, session, end)  # reads nothing when end is 0
                if floor >= lock._token and not isinstance(lock._store, _store.RemoteStore):
                    lock._token = floor + 1  # its record says so from the copy on
                if highest >= lock._token:  # a line above the record and the last lines
                    if isinstance(lock._store, _store.RemoteStore):
                        raise _tokens.went_backwards(new, lock._token, highest, lock._store.name)
                    if highest >= MAX_TOKEN:
                        raise FenceLockError(
                            f"{session}: a line in it is stamped with the largest token "
                            f"({highest}), so a fresh session carrying it has no token left "
                            f"above it; nothing was made. Check where that stamp came from "
                            f"(fencelock verify {shell_word(session)})")
                    lock._token = highest + 1  # its record says so from the copy on
                if lock._token != taken:
                    # Before the copy is named: a recover killed after naming it leaves
                    # this record, which the fresh session's next run continues.
                    lock._write_record()
                # As root, the stuck session's owner's: the file copied (its descriptor),
                # never whatever is at its name by now.
                owner = _platform.owner_for(new, session, os.fstat(fd) if fd >= 0 else None)
                # The old session's own lock, for its mark, is taken before the copy is
                # named (`_hold_to_mark`): a recover stopped while it waits for an append
                # leaves no fresh session that a later one would answer unmarked. (Its
                # file is made where the stuck run had written none, to carry the mark.)
                to_mark = functools.partial(_hold_to_mark, session, held, True, True) \
                    if stuck is not None else (lambda: None)
                # Once the copy is named, the move is finished whatever comes (below).
                move = _Move(lock, session, new, held, fd, end) if stuck is not None else None
                try:
                    _fence.publish(new, _chunks(fd, session, end, digest), token=lock._token,
                                   file_mode=lock.mode, check=lock._store.check, owner=owner,
                                   before_name=to_mark)
                except SessionWriteError as e:
                    if e.stored and os.path.lexists(new):
                        copied.append(lines)  # named; only the directory's fsync failed
                    raise
                # Whole and named: every later recover of a stuck run with a record
                # answers it, and the run itself learns of it (`SessionLock.superseded`),
                # so this recover answers it too, whatever fails after this.
                copied.append(lines)
            except HolderLostError:
                raise  # another holder's now: nothing here is this call's to remove
            except BaseException:  # an interrupt (SIGTERM, Ctrl-C) too
                if not os.path.lexists(new):
                    # While its lock is ours, nothing of it stays: not even a successor's
                    # sidecar, which could keep out the next recover (another user's).
                    _remove_fresh(new)
                    if stuck is not None:  # (`_hold_to_mark` may have set it: no move)
                        _sidecar.set_moving(session + _sidecar.SUFFIX, False)
                elif move is not None:  # named (only the directory's fsync failed, say)
                    _finish_all_the_same(move)
                    if copied:
                        copied[0] += move.carried
                raise
            # Named: from here on, an interrupt (SIGTERM, Ctrl-C) ends the recover only
            # once the old session is marked and the lines it gained while this copied
            # are carried (milliseconds); else they would stay in a session nobody reads
            # (a recover killed first leaves that to the next: `_finish_move`).
            try:
                # The published copy is the fence point the record carries (taken by
                # opening it where the store is shared by hosts, as its fence checks do).
                lock._fp = _fingerprint.take(new, lock.fence_mode,
                                             opened=lock._store.opens_session)
                if move is not None:
                    copied[0] += move.finish()
            except (FenceLockError, OSError):
                if move is not None and not move.read:  # (the fence point's take, say)
                    _finish_all_the_same(move)
                    copied[0] += move.carried
                raise
            except BaseException:
                if move is not None:
                    _finish_all_the_same(move)
                raise
            lock._write_record()
    finally:
        try:
            _cleanup.to_the_end(*let_go)
        except BaseException:  # one that landed as it was entered: once more
            _cleanup.to_the_end(*let_go)
            raise


def _close_copy(copying: list[int]) -> None:
    """Close the old session's descriptor the copy read, if open; safe to run again
    after an interrupt cut it short (`_cleanup.to_the_end`): it is marked closed, with
    no point for a signal handler between, before it is closed."""
    fd = copying[0]
    if fd >= 0:
        copying[0] = -1
        os.close(fd)


MARK_WAIT = 10.0
"""Seconds a recover waits for the old session file's own lock to set its mark (an
append holds it shared for one write and its fsync: `_fence.append`)."""


_Held = list[tuple[int, os.stat_result, object]]
"""The old session opened and locked to mark it (`_hold_to_mark`): its descriptor, its
stat, and the descriptor's tracking entry (`_forkguard.entry`), for `_let_go_of_marked`
to close it only while it is still that open."""


def _hold_to_mark(session: str, held: _Held, make: bool = False, moving: bool = False) -> None:
    """Open ``session`` and take its file's own lock exclusively (up to `MARK_WAIT`: an
    append holds it shared from its look at the mark until its line is in), into
    ``held`` (nothing where it cannot be opened: the mark is then set without it).
    With ``make`` (the recover that moves a stuck run), one with no file yet is made
    (`_make_to_mark`). With ``moving`` (that recover, before it names the fresh
    session), the session's sidecar gets `_sidecar.MOVING` until the mark is set
    (`_mark_and_read_tail`): killed in between, the next acquire of the session finishes
    the move (docs/PROTOCOL.md 5.1)."""
    if moving:
        _sidecar.set_moving(session + _sidecar.SUFFIX, True)
    if not _open_to_mark(session, held) and not (make and _make_to_mark(session, held)):
        return
    if not _platform.lock_session(held[-1][0], False, MARK_WAIT):
        warn_each_time(
            f"{session}: an append has held the session file's own lock for over "
            f"{MARK_WAIT:g} s (a run stopped in its write, or a process that locks the file "
            f"itself: lslocks names it), so it is marked moved without waiting for it; "
            f"that append's line may be in both sessions (its writer is told so)",
            stacklevel=None)


def _let_go_of_marked(held: _Held) -> None:
    """Close what `_hold_to_mark` opened (its lock goes with it). Closed before it is
    dropped from ``held``, and only while it is still that open: run again after an
    interrupt cut it short, it neither leaves the descriptor (and the lock, which would
    hold up every append to the old session) open nor closes another open's number."""
    while held:
        fd, _, opened = held[-1]
        _forkguard.close_if_still(fd, opened)  # (a forked child never keeps a copy)
        held.pop()


def _make_to_mark(session: str, held: _Held) -> bool:
    """Where the old session has no file yet (its stuck run had appended nothing, a
    `fencelock run` whose command had not written): make it, empty, as `_open_to_mark`
    opens one, into ``held``, so that it carries the mark (no name, no mark) and every
    run of it, the stuck one and a later one, learns of the move rather than writing
    into a session nobody reads. Its mode and owner are the sidecar's, as a run's
    first append would have made it; one a run made meanwhile is opened instead.
    False where it cannot be made (the mark is then not set: the move stands)."""
    if not _moved.CAN_MARK:
        return False
    sidecar = session + _sidecar.SUFFIX
    mode = _fresh_mode(sidecar)
    with _forkguard.guard:
        fd = -1
        try:
            (fd, st), = map(_sidecar.open_regular, (session,),
                            (os.O_RDWR | os.O_CREAT | os.O_EXCL,), (mode,))
            _platform.set_mode(fd, mode, _platform.owner_for(session, sidecar))
            _forkguard.track(fd, st)
            held.append((fd, os.fstat(fd), _forkguard.entry(fd)))
            return True
        except FileExistsError:
            pass
        except BaseException as e:
            if fd >= 0 and (not held or held[-1][0] != fd):
                _forkguard.close(fd)  # (untracked too, if it came before `track`)
            if isinstance(e, OSError | FenceLockError):
                return False
            raise
    return _open_to_mark(session, held)  # made by a run meanwhile


def _open_to_mark(session: str, held: _Held) -> bool:
    """Open ``session`` for `_hold_to_mark` (read and write where this user may: flock
    needs no write access, but where it is emulated, NFS, it does), tracked for fork
    (`_forkguard`), into ``held``; False where it cannot be opened. An interrupt before
    it is in ``held`` closes it (the open's result is stored with no point for a signal
    handler between: see `_open_old`)."""
    for flags in (os.O_RDWR, os.O_RDONLY):
        with _forkguard.guard:
            fd = -1
            try:
                (fd, st), = map(_sidecar.open_regular, (session,), (flags,))
                _forkguard.track(fd, st)
                held.append((fd, st, _forkguard.entry(fd)))
                return True
            except (OSError, FenceLockError):
                continue
            except BaseException:
                if fd >= 0 and (not held or held[-1][0] != fd):
                    _forkguard.close(fd)  # (untracked too, if it came before `track`)
                raise
    return False


def _mark_held(session: str, new: str) -> None:
    """Mark ``session`` moved to ``new`` holding its file's own lock, as the recover that
    made ``new`` did (again, where it was stopped or failed first); nothing where the
    mark names ``new`` already (its lock is not waited for again: an append stopped in
    its write holds it up to `MARK_WAIT`)."""
    if _moved.target(session) == new:
        return
    held: _Held = []
    try:
        _hold_to_mark(session, held)
        _mark_and_read_tail(session, new, held, -1, 0)
    finally:
        _let_go_of_marked(held)


def _finish_move(session: str, new: str, lane: str, backend: str | None) -> None:
    """Mark ``session`` moved to ``new``, a fresh session another recover made, as
    `_mark_held` does, and finish that recover's carry where it was killed (SIGKILL)
    between naming ``new`` and carrying.

    Only on that recover's own evidence: ``new``'s record is still the stale one of a
    run begun from ``session`` (``origin``, which only a recover's run of a fresh session
    writes; a finished move leaves it released, a run of ``new`` its own). Then, holding
    ``new``'s lock (taken without waiting, first: the order its maker takes the two
    locks in) and ``session``'s own exclusively, where ``new`` is still the bare copy
    (`_copy_end`) the lines ``session`` has past it are appended to it (`_carry_tail`);
    a failed carry is warned of, naming the lines and how to carry them by hand. Where
    ``new``'s lock is held (another recover finishing it) or cannot be taken, nothing
    is carried."""
    try:
        found = _probe.probe(new, backend=backend)
    except (FenceLockError, OSError):
        found = None
    unfinished = (found is not None and found.state is ProbeState.STALE
                  and found.record is not None and found.record.origin == session)
    if not unfinished:
        _mark_held(session, new)
        return
    lock = _lock.SessionLock(new, lane, on_contention="fail", origin=session, backend=backend,
                             mode=_fresh_mode(session))
    lock._like = session  # as root, its files stay the stuck session's owner's
    try:
        with lock:  # (no point for an interrupt between its acquire and its release's care)
            _finish_held(lock, session, new)
    except (FenceLockError, OSError):  # taken meanwhile, or unusable: marked all the same
        _mark_held(session, new)


def _finish_held(lock: _lock.SessionLock, session: str, new: str,
                 to_the_end: bool = False) -> None:
    """`_finish_move`'s work, ``lock`` holding ``new`` (its dead maker's record taken
    over): the maker's own end of the move (`_Move`), from ``session``'s own lock taken
    exclusively, where ``new`` is still the bare copy (`_copy_end`) of its first bytes;
    else only the mark. A carry that fails is warned of (`_Move.finish_quietly`); with
    ``to_the_end``, an interrupt that lands once the old session's lock is had ends it
    only once the mark is set and the lines carried (`_finish_all_the_same`)."""
    held: _Held = []
    try:
        _hold_to_mark(session, held)
        end = _copy_end(new, held[0][0]) if held else -1
        move = _Move(lock, session, new, held, held[0][0] if end > 0 else -1, max(end, 0))
        if to_the_end:
            _finish_all_the_same(move)
        else:
            move.finish_quietly()
        if move.carried:
            lock._write_record()  # the token the carry raised
    finally:
        _let_go_of_marked(held)


def finish_for_next_run(session: str, fresh: str, backend: str | None) -> None:
    """For a run about to write its first record over that of the run a recover named
    ``fresh`` for (`_successors.made`: that run's fresh session exists): the move is
    finished before the run takes ``session``'s fingerprint, where the recover that named
    ``fresh`` was killed (SIGKILL) before it marked ``session``, as the next recover of
    it would (`_finish_move`: the mark, and the lines ``session`` gained past the bare
    copy carried). Else the record that names the moved run, the only trace of the
    move, would be gone with this run's, and the run would write into ``session``
    (a lane queued behind the stuck run), to be moved again by a later recover or
    left behind by a run of ``fresh``: the conversation split in two. Nothing where
    ``session`` is marked moved to another fresh session already (a later move), and
    nothing fails the run's acquire: where the move cannot be finished, the run goes
    on as it would have (a recover finishing it later sees to it)."""
    mark = _moved.target(session)
    if mark is not None and mark != fresh:
        return
    with contextlib.suppress(FenceLockError, OSError):
        _finish_move(session, fresh, "recovery", backend)


def finish_as_first_run(lock: _lock.SessionLock, origin: str) -> None:
    """For a run of a fresh session ``lock`` holds, whose acquire took over the stale
    record of a recover's run begun from ``origin`` (the recover that moved ``origin``
    there, or one finishing that move, killed before it let go): finish that move, as
    the next recover would (`_finish_move`), before the run writes anything: the mark
    on ``origin``, and the lines it gained past the bare copy carried. Otherwise the
    run's record, written over that stale one, would leave no trace of the unfinished
    move: the lines left in ``origin`` would stay there, and runs of ``origin`` would go
    on writing there. Nothing where ``origin`` is not beside the fresh session, or is
    marked moved to another fresh session (a later move); where it cannot be finished
    (a carry that fails is warned of), the run goes on."""
    new = lock.session
    if os.path.dirname(origin) != os.path.dirname(new):
        return  # not a recover's: a fresh session is made beside the session it moves
    mark = _moved.target(origin)
    if mark is not None and mark != new:
        return
    with contextlib.suppress(FenceLockError, OSError):
        _finish_held(lock, origin, new, to_the_end=True)


def _copy_end(new: str, old: int) -> int:
    """The size of ``new`` where it is still the copy a recover made of the old session
    (open as ``old``), and the old session has more: its bytes are the old session's
    first ones and end a line. -1 otherwise: carried already, appended to since, started
    empty (`carry=False`), or unreadable."""
    try:
        (fd, st), = map(_sidecar.open_regular, (new,), (os.O_RDONLY,))  # (see `_open_old`)
    except (OSError, FenceLockError):
        return -1
    try:
        size = st.st_size
        if not size or os.fstat(old).st_size <= size:
            return -1
        offset, last = 0, b""
        while offset < size:
            want = min(CARRY_CHUNK, size - offset)
            last = _platform.pread(fd, want, offset)
            if not last or last != _platform.pread(old, len(last), offset):
                return -1
            offset += len(last)
        return size if last.endswith(b"\n") else -1
    except OSError:
        return -1
    finally:
        os.close(fd)


def _mark_and_read_tail(session: str, new: str, held: _Held,
                        copied: int, end: int) -> bytes | None:
    """Mark ``session`` moved to ``new`` (`_moved`) holding the session file's own lock
    exclusively (``held``: `_hold_to_mark`, taken before ``new`` got its name), and
    read, still holding it, the complete lines it gained past the ``end`` the copy took
    of it (open as ``copied``, -1 for none): those the stuck run, or a run queued behind
    it, appended meanwhile, told nothing. An append holds that lock shared from its
    look at the mark until its line is in, so each line either went in before the
    mark, and is read here, or is refused; none is left in the old session alone, nor
    written as the mark is set. None where nothing is carried: no copy, or ``session``
    is no longer the file copied, or it was rewritten in place (a `FenceLockWarning`
    says so). (Where it could not be opened, or a writer stuck in its write held it
    past `MARK_WAIT`, the mark is set without it.)"""
    if not held:
        _moved.mark(session, new)
        _sidecar.set_moving(session + _sidecar.SUFFIX, False)  # (set by `_hold_to_mark`)
        return None
    fd, st, _ = held[0]
    _moved.mark(session, new, fd)
    _sidecar.set_moving(session + _sidecar.SUFFIX, False)
    if copied < 0:
        return None
    was = os.fstat(copied)
    if (was.st_dev, was.st_ino) != (st.st_dev, st.st_ino):
        return None  # replaced: the stuck run's appends there are takeovers
    tail_end = _complete_end(fd, session)
    if tail_end <= end:
        return None
    if end and _pread(fd, session, 1, end - 1) != b"\n":
        warn_each_time(
            f"{session}: it was rewritten in place while recover copied it, so the "
            f"lines it gained after the copy were not carried to {new}; compare the "
            f"two (fencelock verify {shell_word(session)})", stacklevel=None)
        return None
    tail = b""
    while len(tail) < tail_end - end:
        tail += _pread(fd, session, tail_end - end - len(tail), end + len(tail))
    return tail


class _Move:
    """The end of a recover's move of a stuck run's session to the fresh one it named:
    the mark on the old session, and the lines it gained while it was copied carried
    (`_mark_and_read_tail`, `_carry_tail`). `finish` does what is left of it, so it can
    be run again after an interrupt cut it short: the mark set again is the same mark,
    the old session read again under its lock the same lines, and the fresh session,
    which this recover holds, is appended to only while it is still the size it was."""

    def __init__(self, lock: _lock.SessionLock, session: str, new: str,
                 held: _Held, copied: int, end: int) -> None:
        self.lock, self.session, self.new = lock, session, new
        self.held, self.copied, self.end = held, copied, end
        self.read = False
        self.tail: bytes | None = None
        self.carried = 0
        """How many lines the carry appended."""

    def finish(self) -> int:
        """Mark, let go of the old session, carry: how many lines were carried."""
        if not self.read:  # (still holding the old session's lock: read the same again)
            self.tail = _mark_and_read_tail(self.session, self.new, self.held,
                                            self.copied, self.end)
            self.read = True
        _let_go_of_marked(self.held)  # (`_fill_fresh` lets go where this raises)
        # The fresh session as named is the copy of the old one's first ``end`` bytes.
        if not self.tail or os.stat(self.new).st_size != self.end:
            return 0  # nothing to carry, or carried before an interrupt
        # The fence point the carry appends from, taken again: after an interrupt it may
        # not have been taken yet, or not after the fresh session's token mark moved.
        lock = self.lock
        lock._fp = _fingerprint.take(self.new, lock.fence_mode,
                                     opened=lock._store.opens_session)
        self.carried = _carry_tail(lock, self.session, self.new, self.tail, self.end)
        return self.carried

    def finish_quietly(self) -> None:
        """`finish`, for a recover that goes on once it is done (an interrupt raised
        after it, or an answer: `_finish_held`): a failure to carry is said as a warning
        (naming the lines and how to carry them by hand)."""
        try:
            self.finish()
        except (FenceLockError, OSError) as e:
            with contextlib.suppress(Warning):  # (warnings as errors: the interrupt goes on)
                warn_each_time(str(e), stacklevel=None)
            self.tail = None


def _finish_all_the_same(move: _Move) -> None:
    """`_Move.finish_quietly`, to its end whatever interrupts it (`_cleanup`), for a
    recover that ends with an exception once its fresh session is named."""
    try:
        _cleanup.to_the_end(move.finish_quietly)
    except BaseException:  # one that landed as it was entered: once more
        _cleanup.to_the_end(move.finish_quietly)
        raise


def _carry_tail(lock: _lock.SessionLock, session: str, new: str, tail: bytes,
                end: int) -> int:
    """Append ``tail`` (`_mark_and_read_tail`: the lines ``session`` gained past ``end``
    while it was copied) to the fresh session ``new`` that ``lock`` holds, its token
    raised above their stamps first (lines of a run queued behind the stuck one carry
    tokens the copy did not see); how many lines that was. Where they cannot be
    written, the error names them and how to carry them by hand."""
    highest = _tokens.largest_token(tail)
    if highest >= lock._token and not isinstance(lock._store, _store.RemoteStore) \
            and highest < MAX_TOKEN:  # (etcd's tokens: dealt after the fresh session's)
        lock._token = highest + 1  # its record says so as this call ends
        if _tokens.reserve(new, lock._token):  # (the mark moves the ctime)
            lock._fp = _fingerprint.take(new, lock.fence_mode,
                                         opened=lock._store.opens_session)
    try:
        lock._append_bytes(tail)  # fenced: a failed write is taken back out of it
    except (FenceLockError, OSError) as e:
        lines = tail.count(b"\n")
        raise FenceLockError(
            f"the {lines} line{'s' if lines != 1 else ''} {session} gained while it was "
            f"copied could not be carried ({e}); append them by hand: tail -c "
            f"+{end + 1} {shell_word(session)} | head -c {len(tail)} >> {shell_word(new)}"
        ) from e
    return tail.count(b"\n")


def _chunks(fd: int, session: str, end: int, digest: bytes) -> Iterator[bytes]:
    """The old transcript's first ``end`` bytes, `CARRY_CHUNK` at a time; raises, before
    the copy is published, if they are not the bytes `_scan` read (digest ``digest``):
    a writer outside the protocol rewrote lines meanwhile, and the copy would mix the
    two versions (with lines and stamps the scan never saw)."""
    offset = 0
    copied = _digest()
    while offset < end:
        chunk = _pread(fd, session, min(CARRY_CHUNK, end - offset), offset)
        offset += len(chunk)
        copied.update(chunk)
        yield chunk
    if copied.digest() != digest:
        raise FenceLockError(
            f"{session}: lines already in it were rewritten while recover copied it (by "
            f"a writer outside the protocol); nothing was made; recover again")


def _digest() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=16)


_START_EMPTY = "recover with carry=False (fencelock recover --no-carry) to start empty"


def _open_old(session: str) -> int:
    """``session`` opened to copy it; -1 where it is missing. Called through `map` and
    unpacked, as it calls `open_regular`: an interrupt right after a call returns (where a
    signal handler runs) would drop the descriptor on the floor, left open."""
    try:
        (fd, _), = map(_sidecar.open_regular, (session,), (os.O_RDONLY,))
    except FileNotFoundError:
        return -1
    except OSError as e:
        raise SidecarAccessError(session, e, _START_EMPTY) from None
    return fd


def _pread(fd: int, session: str, size: int, offset: int) -> bytes:
    try:
        data = _platform.pread(fd, size, offset)
    except OSError as e:
        raise SidecarAccessError(session, e, _START_EMPTY) from None
    if not data:
        raise FenceLockError(f"{session}: it shrank while recover copied it; recover again")
    return data


def _complete_end(fd: int, session: str) -> int:
    """The offset just past the old transcript's last line break (0 if none)."""
    try:
        end = os.fstat(fd).st_size
    except OSError as e:
        raise SidecarAccessError(session, e, _START_EMPTY) from None
    return _fence.last_line_start(fd, end, lambda fd, n, at: _pread(fd, session, n, at))


def _scan(fd: int, session: str, end: int) -> tuple[int, int, bytes]:
    """(lines, highest stamped token, digest) of the first ``end`` bytes, read a chunk at
    a time. A line longer than `_LONG_LINE` counts for the stamp at its end; the lines of
    a chunk that are all shorter go to `_tokens.largest_token`, which parses only those
    that may hold the highest stamp (a stamped session has one on every line)."""
    lines = best = 0
    read = _digest()
    partial = b""
    long_line = False
    offset = 0
    while offset < end:
        chunk = _pread(fd, session, min(CARRY_CHUNK, end - offset), offset)
        offset += len(chunk)
        read.update(chunk)
        pieces = chunk.split(b"\n")
        if len(pieces) > 1:  # the line begun before this chunk ends in it
            best = max(best, _line_token(partial + pieces[0], long_line))
            lines += len(pieces) - 1
            partial, long_line = b"", False
            middle = pieces[1:-1]
            if middle and max(map(len, middle)) <= _LONG_LINE:
                best = max(best, _tokens.largest_token(
                    chunk[len(pieces[0]) + 1:len(chunk) - len(pieces[-1]) - 1]))
            else:
                for line in middle:
                    best = max(best, _line_token(line, False))
        line = partial + pieces[-1]  # not finished in this chunk
        if len(line) > _LONG_LINE:
            line, long_line = line[-_tokens.TAIL:], True
        partial = line
    return lines, best, read.digest()


def _line_token(line: bytes, long_line: bool) -> int:
    """A whole line's token for `_scan` (``long_line``: only its end was kept)."""
    if long_line or len(line) > _LONG_LINE:
        return _tokens.trailing_token(line)
    return _tokens.line_token(line)
