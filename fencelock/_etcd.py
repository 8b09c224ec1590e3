"""The etcd holder store: etcd's own lock recipe (the one ``etcdctl lock`` and
``concurrency.Mutex`` use) under one lease per process, kept alive in the background.

Layout under PREFIX: each contender for a session puts ``sessions/<key>/<lease hex>``
under its lease; the key with the lowest create revision owns the lock, and its create
revision is the fencing token. Each waiter watches only the key just ahead of it. The
owner's key holds its JSON record; ``last/<key>`` (no lease) keeps the last record
written, so a session whose owner died mid-run reads as stale.

A holder counts itself lost once it cannot be sure its lease is alive (no keepalive
answer within the lease's time to live, less a safety margin); from then on it writes
nothing, and every record write is also guarded by a compare on its own key.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from fencelock import _backend, _etcdcluster, _etcdwatch, _record
from fencelock import _etcdwire as wire
from fencelock._errors import (
    CorruptRecordError,
    HolderLostError,
    NotHeldError,
    RecordTooLargeError,
    SessionContendedError,
    StoreUnavailableError,
    describe_leftovers,
    own_record_too_long,
    shell_word,
)
from fencelock._record import MAX_RECORD, HolderInfo, State

if TYPE_CHECKING:
    from fencelock._etcdurl import EtcdURL
    from fencelock._probe import HolderStatus

_WITHOUT_RECORD = ("a holder without a fencelock record (etcdctl lock, another client's "
                   "Mutex, one about to write its record, or a waiter that died or was "
                   "paused in the queue, until its lease runs out)")
"""What holds a session whose owner key has a lease but no fencelock record."""
_T = TypeVar("_T")
_RECHECK_MAX = 5.0
"""The longest a waiter trusts its watch before it looks at the queue again (a third of
the TTL where that is shorter): a member that stops answering keeps a watch's stream
open and silent, and the key ahead may have gone meanwhile."""
_QUEUE_TRIES = 3
"""How many times an acquire puts its key in the queue after finding one there left by
etcd's past (`EtcdHolder._queue`)."""



def _decode(value: bytes | None, where: str, command: str | None = None) -> HolderInfo | None:
    """A record from a key's value (`wire.raw`): None for no key, or an empty value; a value
    of spaces or NULs is corrupt, as such a sidecar is (fencelock never writes one)."""
    if not value:
        return None
    try:
        return _record.decode(value)
    except ValueError as e:
        raise CorruptRecordError(where, str(e), command) from None


def clear_command(url: EtcdURL, session: str) -> str:
    """The command that sets a corrupt last record in etcd aside."""
    return f"fencelock clear --force --backend {shell_word(url.text)} {shell_word(session)}"


def decode_quietly(value: bytes | None, where: str) -> HolderInfo | None:
    try:
        return _decode(value, where)
    except CorruptRecordError:
        return None


class _Attempt(NamedTuple):
    """One acquire's terms, handed whole from each try to the next (`EtcdHolder.acquire`):
    fail fast or wait, until ``deadline`` or ``cancel``, writing ``record``'s first
    record; ``start`` is when the acquire began (what a contention error counts)."""

    fail: bool
    deadline: float | None
    cancel: threading.Event | None
    record: Callable[[int, HolderInfo | None], bytes] | None
    start: float


class EtcdHolder:
    """One session's holder in etcd (a `fencelock._store.HolderStore`)."""

    def __init__(self, url: EtcdURL, session: str) -> None:
        self.url = url
        self.session = session
        # The cluster, the prefix and the root: what names its keys (a NUL is in no path).
        self.space = f"\0{url.connection_text}\0{url.prefix}\0{url.root or ''}\0"
        self.rekey()

    def rekey(self) -> None:
        """Take the session's key (`_backend.session_key`) as it is now: an acquire does,
        while it holds nothing, for a lock object made before its sessions directory
        was made, or before a filesystem was mounted on or above it."""
        url = self.url
        self.key = _backend.session_key(self.session, url.root)
        self.lock_name = f"{url.prefix}/sessions/{self.key}"
        self.last_key = f"{url.prefix}/last/{self.key}"
        self.name = f"{url.display}/{self.lock_name}"
        self.last_name = f"{url.display}/{self.last_key}"
        self._lease: _etcdcluster.Lease | None = None
        self._trying: _etcdcluster.Lease | None = None
        """The lease the acquire under way queued (or tries to queue) its key under."""
        self._my_key = ""
        self._token = 0
        self.probed_revision = 0
        """etcd's revision as the last `probe` read it (0 before one)."""
        self._suffix = b""
        self.record_extra: dict[str, Any] | None = None
        """The fields `_value` adds to the run's record, as the `HolderInfo` shows them."""
        self._lost = ""
        """Why this holder is lost though its lease may not be (its key was deleted)."""
        self._told = False
        """The caller has been told this holder is lost (a `HolderLostError` raised)."""
        self._before: bytes | None = None
        """The session's last record (as stored) before this holder's first one."""
        self._wrote: bytes | None = None
        """What this holder last put (or tried to put) as the session's last record,
        since it queued; None while it has written nothing there."""

    @property
    def _cluster(self) -> _etcdcluster.Cluster:
        # Looked up on each use, not kept: a holder made before a fork must use the
        # child's own cluster (its own lease and connections), never the parent's.
        return _etcdcluster.cluster(self.url)

    @property
    def lease_id(self) -> int | None:
        """The lease the holder's key lives under, while it holds or waits."""
        return self._lease.id if self._my_key and self._lease is not None else None

    @property
    def run_key(self) -> str:
        """The holder's key in the session's queue (empty while it has none)."""
        return self._my_key

    # -- acquire -----------------------------------------------------------------

    def acquire(
        self,
        fail: bool,
        deadline: float | None,
        cancel: threading.Event | None,
        record: Callable[[int, HolderInfo | None], bytes] | None,
        start: float | None = None,
    ) -> int:
        attempt = _Attempt(fail, deadline, cancel, record,
                           time.monotonic() if start is None else start)
        self._trying = None
        try:
            return self._acquire(attempt)
        except StoreUnavailableError as e:
            if self._trying is not None:
                return self._after_lapse(e, attempt)
            if fail or e.fix is not None:
                raise  # a fail-fast acquire says so at once, as does a setting to fix
            first = failed = e
        # etcd away from the first request (restarting, say): ridden out as `wait` and
        # `recover` ride it out (`through_outage`), for up to the TTL and not past the
        # deadline, until a try gets a lease; what follows is the queue's own rules.
        now = time.monotonic()
        until = now + self.url.ttl
        if deadline is not None:
            until = min(until, deadline)
        if until > now:  # (a first try that took the caller's whole time: no ride-out)
            _etcdcluster.note_outage(first, until - now)
        while True:
            _etcdcluster.pause_to_retry(cancel, until)
            if time.monotonic() >= until:
                raise _etcdcluster.telling(first, failed)
            self._trying = None
            try:
                return self._acquire(attempt)
            except StoreUnavailableError as e:
                if self._trying is not None:
                    return self._after_lapse(e, attempt)
                if e.fix is not None:
                    raise
                failed = e

    def _after_lapse(self, e: StoreUnavailableError, attempt: _Attempt) -> int:
        """An acquire whose try under a lease (``_trying``) failed with ``e``: raised,
        unless the lease lapsed while it waited (this process was paused, or etcd was
        away, for longer than the TTL). Its key left the queue then, but nothing was
        held: it queues again under a new lease once etcd answers, a timed acquire until
        its deadline, one with none while etcd is away for up to one more TTL, and once
        more only if the new lease lapses too; a fail-fast acquire, once."""
        fail, deadline, cancel = attempt.fail, attempt.deadline, attempt.cancel
        if not self._lapsed(e, deadline):
            raise e  # the wait's own end
        until = deadline if deadline is not None else time.monotonic() + self.url.ttl
        failed: StoreUnavailableError | None = None
        while True:
            self._trying = None
            try:
                return self._acquire(attempt)
            except StoreUnavailableError as again:
                # No lease granted (etcd still away), or, for a timed acquire, one that
                # lapsed again: tried again. Not an error that names its own fix
                # (authentication on, etcd out of space): no outage to wait out.
                # (`_lapsed` first: it forgets a lease etcd lost, whatever follows.)
                retry = self._trying is None or (
                    self._lapsed(again, deadline) and deadline is not None)
                if not retry or fail or again.fix is not None or time.monotonic() >= until:
                    raise
                if failed is None:
                    _etcdcluster.note_outage(again, until - time.monotonic())
                failed = again
            _etcdcluster.pause_to_retry(cancel, until)
            if time.monotonic() >= until:
                assert failed is not None
                raise failed  # no try begun past the caller's time

    def _lapsed(self, e: StoreUnavailableError, deadline: float | None) -> bool:
        """Whether the lease the failed request named (``_trying``) is gone or lapsed,
        so that nothing was held and the acquire may queue again under a new one (not
        past ``deadline``)."""
        lease = self._trying
        assert lease is not None
        if _etcdcluster.LEASE_GONE in e.why:
            # The process's lease is gone before its keeper noticed (etcd restarted
            # without its data).
            self._cluster.forget(lease)
        elif not lease.lost:
            return False
        return deadline is None or time.monotonic() < deadline

    def _acquire(self, attempt: _Attempt) -> int:
        fail, deadline, cancel, record, start = attempt
        c = self._cluster
        lease = c.lease(deadline)
        self._trying = lease
        my = f"{self.lock_name}/{lease.id:x}"
        pfx = self.lock_name + "/"
        if not c.claim(my, fail, deadline, cancel):
            raise self._contended(self._owner_kvs(deadline),
                                  waited=None if fail else time.monotonic() - start)
        self._lease, self._my_key, self._token, self._lost = lease, my, 0, ""
        self._told = False
        self._before = self._wrote = None
        self._suffix = f',"lease":"{lease.id:x}","store":"etcd"}}'.encode()
        self.record_extra = {"lease": f"{lease.id:x}", "store": "etcd"}
        try:
            r = self._queue(my, lease, pfx, deadline)
        except BaseException:
            # Unanswered is not undone: etcd may have queued the key, under a lease this
            # process keeps alive. Take it out (or give the lease up).
            self._abandon()
            raise
        responses = r.get("responses", [])
        revision = int(r["header"]["revision"])
        self._token = revision
        try:
            owner = wire.kvs(responses[1])
            if owner and int(owner[0]["create_revision"]) == revision:
                if record is not None:
                    self._before = wire.raw(wire.kvs(responses[2]))
                    self._write_first(record(revision, self._last_checked(wire.kvs(responses[2]))))
                return revision
            if fail:
                raise self._contended(owner)
            self._wait_for_turn(revision, attempt)
            return revision
        except BaseException:
            self._abandon()
            raise

    def _queue(self, my: str, lease: _etcdcluster.Lease, pfx: str, deadline: float | None
               ) -> dict[str, Any]:
        """Put our key ``my`` in the session's queue; the answer also gives the queue's
        first key and the last record.

        A key ``my`` there already (this process lets one holder at a time claim it) was
        left by etcd's past: brought back with the lease by a snapshot restore, or put
        by an earlier try of this request whose answer was lost. Its revision is no
        token to give out now (others may have been given higher ones since): it is
        deleted, and the key queued anew."""
        c = self._cluster
        for _ in range(_QUEUE_TRIES):
            r = c.txn(
                [wire.created(my, 0)],
                [wire.put(my, b"", lease.id), wire.key_range(pfx, prefix=True, first=True),
                 wire.key_range(self.last_key)],
                [wire.key_range(my)],
                deadline,
            )
            if r.get("succeeded"):
                return r
            found = wire.kvs(r.get("responses", [{}])[0])
            if found:
                c.txn([wire.created(my, int(found[0]["create_revision"]))], [wire.delete(my)], [],
                      deadline)
        raise StoreUnavailableError(self.url.display,
                                    f"a key of this process's lease, {my}, came back each "
                                    f"time it was deleted")

    def _write_first(self, record: bytes) -> None:
        """Write the run's first record. The caller does not hold the session yet: a
        lease that may have expired meanwhile (etcd away, or this process paused) is an
        acquire that failed, which may be tried again, not a holder lost."""
        try:
            self.write(record)
        except HolderLostError as e:
            raise StoreUnavailableError(self.url.display,
                                        f"{e.why} before the session was taken") from None

    def _last(self, kvs: list[dict[str, Any]]) -> HolderInfo | None:
        """The record in the first of ``kvs`` (None for none, or an unreadable one)."""
        return decode_quietly(wire.raw(kvs), self.name)

    def _last_checked(self, kvs: list[dict[str, Any]]) -> HolderInfo | None:
        """The last record, or `CorruptRecordError`: as with a sidecar, a run does not
        write over a record nobody could read (``clear --force`` sets it aside)."""
        return _decode(wire.raw(kvs), self.last_name, clear_command(self.url, self.session))

    def _wait_for_turn(self, revision: int, attempt: _Attempt) -> None:
        """Wait until no key older than ours is left, then write the first record.

        When the key ahead goes, one transaction both checks that no older key is left
        and writes the record: a hand-off costs one round trip after the watch event.
        """
        _, deadline, cancel, record, start = attempt
        c = self._cluster
        pfx = self.lock_name + "/"
        recheck = min(c.ttl / 3, _RECHECK_MAX)
        look = [wire.key_range(pfx, prefix=True, last=True, max_create=revision - 1),
                wire.key_range(self._my_key), wire.key_range(self.last_key)]
        r = c.txn([], look, [], deadline)
        while True:
            responses = r.get("responses", [])
            if not wire.kvs(responses[1]):
                assert self._lease is not None
                if self._key_gone_with_lease(self._lease):
                    raise StoreUnavailableError(self.url.display,
                                                "the lease expired while waiting")
                raise StoreUnavailableError(self.url.display,
                                            "its key was deleted while it waited")
            ahead = wire.kvs(responses[0])
            if not ahead:
                if record is not None:
                    self._write_first(record(revision, self._last_checked(wire.kvs(responses[2]))))
                return
            try:
                watch = self._watch_for_deletion(ahead[0], int(r["header"]["revision"]),
                                                 deadline, cancel, inline=cancel is None)
            except StoreUnavailableError as e:
                r = self._look_again(look, deadline, start, cancel, failed=e)
                continue
            retired = False
            try:
                watched = time.monotonic()
                while True:
                    now = time.monotonic()
                    if cancel is not None and cancel.is_set():
                        import asyncio

                        raise asyncio.CancelledError()
                    if watch.deleted:
                        break  # seen, perhaps just as the time ran out: take the turn
                    if deadline is not None and now >= deadline:
                        raise self._contended(self._owner_kvs(deadline),
                                              waited=now - start)
                    if now - watched >= recheck:
                        break  # look again: a watch may not survive an etcd restart
                    step = recheck - (now - watched)
                    if deadline is not None:
                        step = min(step, deadline - now)
                    if cancel is not None:
                        step = min(step, _etcdcluster.CANCEL_STEP)
                    if watch.wait(max(step, 0.0)):
                        break
                assert self._lease is not None
                if not self._lease.alive():
                    raise StoreUnavailableError(self.url.display, self._lease.lost)
                if not watch.deleted or record is None:
                    r = self._look_again(look, deadline, start, cancel)
                    continue
                # Ours if every key left is no older than ours: check and write at once
                # (before closing the watch, which costs a moment).
                value = self._value(record(revision, None))
                self._before, self._wrote = wire.raw(wire.kvs(responses[2])), value
                encoded = wire.Encoded(wire.b64(value))
                r = c.txn(
                    [wire.created(self._my_key, revision),
                     {**wire.created(pfx, revision - 1),
                      "range_end": wire.b64(wire.prefix_end(pfx)), "result": "GREATER"}],
                    [wire.key_range(self.last_key), wire.put(self._my_key, encoded, self._lease.id),
                     wire.put(self.last_key, encoded)],
                    # Not cut short by the caller's deadline: a transaction that
                    # timed out might still have made us the owner, unknown to us.
                    look,
                )
                if r.get("succeeded"):
                    kvs = wire.kvs(r.get("responses", [{}])[0])
                    self._before = wire.raw(kvs)
                    retired = _etcdwatch.retire(watch)
                    # Usually a release just wrote it: its head says so, no need to parse.
                    quick = _record.peek(self._before) if self._before else None
                    if quick is None or quick[0] is State.HELD:
                        # A corrupt one raises, and the caller's undo puts it back.
                        old = self._last_checked(kvs)
                        if old is not None and old.state is State.HELD:
                            self._write_first(record(revision, old))  # took over a stale run
                            return
                    if quick is None or quick[1] != int(ahead[0]["create_revision"]):
                        # The last release is not that of the key this waiter watched
                        # (a waiter ahead gave up, or an etcdctl lock went): an older
                        # holder may have written the session after the fingerprint
                        # was taken, before its release. Take it again, now.
                        self._write_first(record(revision, None))
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    # Not this waiter's turn after all (an older key is left): only a
                    # turn taken may outlast the deadline.
                    raise self._contended(self._owner_kvs(deadline), waited=now - start)
            finally:
                if not retired:
                    watch.stop()

    def _watch_for_deletion(self, seen: dict[str, Any], looked_at: int,
                            deadline: float | None, cancel: threading.Event | None,
                            inline: bool) -> _etcdwatch.Watch:
        """A watch for the deletion of the key ``seen``, found by a look at revision
        ``looked_at`` (``inline``: read by the waiting thread, see `_etcdwatch.Watch`).

        A watch begins at the store's current revision: if anything was written since
        the look, that key may have gone before the watch began, which would then never
        see it. So it looks at the key once more, and `fire`s the watch if it went."""
        watch = self._cluster.watch(wire.key_text(seen), deadline, inline)
        # Not once the caller gave up (no request that would outlast it); but near the
        # deadline too: a key ahead that went unseen would have the wait report the
        # session as held when it was this waiter's turn.
        if watch.revision <= looked_at or (cancel is not None and cancel.is_set()):
            return watch
        try:
            r = self._cluster.txn([], [wire.key_range(wire.key_text(seen))], [], deadline)
        except StoreUnavailableError:
            return watch  # the watch's own checks remain
        except BaseException:
            watch.stop()
            raise
        now = wire.kvs(r.get("responses", [{}])[0])
        if not now or now[0].get("create_revision") != seen.get("create_revision"):
            watch.fire()
        return watch

    def _look_again(self, look: list[dict[str, Any]], deadline: float | None, start: float,
                    cancel: threading.Event | None,
                    failed: StoreUnavailableError | None = None) -> dict[str, Any]:
        """The waiter's look at the queue, tried again while etcd cannot be reached but
        the waiter's lease may still be alive (``failed``: how the last try failed).
        A restarted etcd restores leases and keys, so a waiter rides out a restart as a
        holder does; past its deadline the wait ran out, and once its lease may have
        expired etcd counts as unavailable."""
        while True:
            if failed is None:
                try:
                    return self._cluster.txn([], look, [], deadline)
                except StoreUnavailableError as e:
                    failed = e
            self._ran_out(deadline, start, failed)
            failed = None
            assert self._lease is not None
            if not self._lease.alive():
                raise StoreUnavailableError(self.url.display, self._lease.lost)
            if cancel is not None and cancel.is_set():
                import asyncio

                raise asyncio.CancelledError()
            pause = _etcdcluster.RETRY_PAUSE
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)

    def _ran_out(self, deadline: float | None, start: float,
                 failed: StoreUnavailableError) -> None:
        """A request cut short by the caller's deadline (it ``failed``): the wait ran out,
        which is `SessionContendedError`, not etcd failing, unless the one etcd endpoint
        did not answer at all: then that is what is known (the owner's record, asked for
        the message, would wait as long again; with several endpoints, the next may)."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            if _etcdcluster.NO_ANSWER in failed.why and len(self.url.endpoints) == 1:
                raise failed from None
            raise self._contended(self._owner_kvs(deadline), waited=now - start) from None

    def _contended(self, owner: list[dict[str, Any]], waited: float | None = None
                   ) -> SessionContendedError:
        """The session is held: by the run of the owner key (the first of ``owner``), or,
        when its record is released, by what that `fencelock run`'s command left running
        (its keeper keeps the key); or, with no record, by the key (`_recordless`)."""
        record = self._last(owner)
        if record is not None and record.state is State.RELEASED:
            return SessionContendedError(self.session, None, waited=waited,
                                         backend=self.url.text, last=record)
        held_by = _recordless(owner, self.url.etcdctl) if owner and record is None else None
        return SessionContendedError(self.session, record, waited=waited,
                                     backend=self.url.text, held_by=held_by)

    def _owner_kvs(self, deadline: float | None) -> list[dict[str, Any]]:
        """The owner key (with its record), for the message of a wait that ran out: a
        request like any near the caller's deadline (bounded by the minimum past it).
        When etcd does not answer it, `StoreUnavailableError`: that, not a holder, is
        what is known."""
        r = self._cluster.call("/kv/range", wire.key_range(self.lock_name + "/", prefix=True,
                                                   first=True)["request_range"], deadline)
        kvs: list[dict[str, Any]] = r.get("kvs", [])
        return kvs

    def _abandon(self) -> None:
        """Take our key out of the queue (a failed or given-up acquire). A first record
        that may have been written is taken back too: the session's last record is again
        what it was before (unless someone wrote another since), as if this acquire had
        never happened; otherwise the session would read as stale, its run never ran."""
        my, lease, token = self._my_key, self._lease, self._token
        before, wrote = self._before, self._wrote
        self._my_key, self._token, self._before, self._wrote = "", 0, None, None
        if not my or lease is None:
            return
        c = self._cluster
        last_key = self.last_key  # this run's: a later acquire may take the key anew

        def take_back() -> None:
            # One request's time in all, the check for a lost quorum that follows an
            # unanswered request included (a caller whose wait ran out waits for this).
            deadline = time.monotonic() + wire.REQUEST_TIMEOUT
            if wrote is not None and token:
                undo = wire.put(last_key, before) if before is not None else wire.delete(last_key)
                r = c.txn([wire.created(my, token), wire.holds(last_key, wrote)],
                          [undo, wire.delete(my)], None, deadline)
                if r.get("succeeded"):
                    return
            c.txn([], [wire.delete(my)], None, deadline)

        try:
            take_back()
        except StoreUnavailableError:
            # etcd is away (a restart, say): take the key out once it answers, keeping
            # it claimed until then. Revoking the lease would lose this process's other
            # holders, which ride out a restart shorter than their lease.
            c.take_back_later(lease, my, take_back)
            return
        except BaseException:
            c.unclaim(my)
            raise
        c.unclaim(my)

    # -- while held --------------------------------------------------------------

    def check(self) -> None:
        lease = self._lease
        if not self._my_key or lease is None:
            raise NotHeldError(f"{self.session}: this SessionLock does not hold the session")
        if self._lost or not lease.alive():
            self._told = True  # the caller has heard of the loss
            raise HolderLostError(self.session, self._lost or lease.lost)

    def lease_left(self, deadline: float | None) -> float | None:
        """The whole seconds etcd says this holder's lease has left (0: its last second),
        asked of etcd rather than counted (this process's clock cannot tell a pause from
        an expiry); None when the lease or the holder's key is gone.
        `StoreUnavailableError` without an answer."""
        lease = self._lease
        if not self._my_key or lease is None or self._lost:
            return None
        return _etcdcluster.lease_left(self._cluster, lease.id, self._my_key, deadline)

    def lost_within(self, timeout: float) -> str:
        """Why this holder counts itself lost, as soon as it does within ``timeout``
        seconds; empty if it does not. Woken when its lease is found lost, and when the
        time the lease is known to live runs out (no request needed for that)."""
        lease = self._lease
        if not self._my_key or lease is None:
            return ""
        end = time.monotonic() + timeout
        while not (self._lost or not lease.alive()):
            left = end - time.monotonic()
            if left <= 0:
                return ""
            margin = lease.confirmed_until - lease.safety() - _etcdcluster.lease_clock()
            lease.gone.wait(min(left, max(margin, 0.0) + 0.001))
        return self._lost or lease.lost

    def _key_gone_with_lease(self, lease: _etcdcluster.Lease) -> bool:
        """Our key is gone: whether the lease went with it (then every holder of this
        process is lost), or only the key was deleted (by hand, say), and only this
        holder is. When etcd cannot say, the lease counts as gone."""
        try:
            r = self._cluster.call("/kv/lease/timetolive", {"ID": lease.id})
            # The last second counts as gone too (it may be expired, not yet revoked):
            # our key is gone already, and a lease kept in error would keep holders
            # counting on it; one lost in error costs a new acquire.
            gone = _etcdcluster.seconds_left(r) <= 0
        except StoreUnavailableError:
            gone = True
        if gone:
            lease.lost = lease.lost or "its etcd lease expired"
        return gone

    def _value(self, record: bytes) -> bytes:
        """The record as stored: with the holder's lease and the store's name (refused
        where no reader could read it)."""
        value = record[:-1] + self._suffix if record.endswith(b"}") else record
        if len(value) > MAX_RECORD:
            raise own_record_too_long(self.name, len(value), MAX_RECORD)
        return value

    def _ride_out(self, lease: _etcdcluster.Lease, attempt: Callable[[], _T]) -> _T:
        """``attempt()``, asked again while etcd cannot be reached but ``lease`` may still
        be alive: a holder rides out an etcd restart shorter than its lease, in every
        request it makes, as its keeper does. Once the lease may have expired, the last
        `StoreUnavailableError` stands."""
        start = time.monotonic()
        noted = False
        while True:
            try:
                return attempt()
            except StoreUnavailableError as e:
                # Not an error that names its fix (etcd out of space, authentication),
                # nor past the lease's time to live: an etcd that keeps the lease alive
                # but refuses every write would hold the caller for good.
                tried = time.monotonic() - start
                if e.fix is not None or not lease.alive() or tried >= lease.ttl:
                    raise
                left = lease.confirmed_until - lease.safety() - _etcdcluster.lease_clock()
                if not noted and left > 0:
                    noted = True
                    _etcdcluster.note_outage(e, min(left, lease.ttl - tried))
                time.sleep(max(0.0, min(_etcdcluster.RETRY_PAUSE, left)))

    def write(self, record: bytes, *, ride_out: bool = True) -> None:
        self.check()
        lease = self._lease
        assert lease is not None
        value = self._wrote = self._value(record)
        encoded = wire.Encoded(wire.b64(value))
        # Not riding out: one short request (an append's record update must not hold
        # the append up for a whole request timeout while etcd hangs).
        deadline = None if ride_out else time.monotonic() + _etcdcluster.MIN_REQUEST_TIMEOUT

        def put() -> dict[str, Any]:
            return self._cluster.txn(
                [wire.created(self._my_key, self._token)],
                [wire.put(self._my_key, encoded, lease.id), wire.put(self.last_key, encoded)],
                deadline=deadline,
            )

        try:
            r = self._ride_out(lease, put) if ride_out else put()
        except StoreUnavailableError:
            # etcd was away past the lease, or this process was paused past it with
            # the request under way: the holder is lost, not only the store away.
            if not lease.alive():
                raise HolderLostError(self.session, lease.lost) from None
            raise
        if not r.get("succeeded"):
            self._lost = "its key in etcd is gone: deleted, or etcd lost its data"
            self._key_gone_with_lease(lease)
            self._told = True
            raise HolderLostError(self.session, self._lost)

    def holding(self) -> bool:
        return bool(self._my_key)

    def release(self, record: bytes | None) -> None:
        if record is None:  # never delivered (a failed or cancelled acquire): undo it
            self._abandon()
            return
        my, lease, token = self._my_key, self._lease, self._token
        self._my_key, self._token, self._before, self._wrote = "", 0, None, None
        if not my or lease is None:
            return
        value = self._value(record)
        ops = [wire.put(self.last_key, value), wire.delete(my)]
        queued = False
        try:
            # On a failed compare, the last record: a retried release finds its own there.
            r = self._ride_out(lease, lambda: self._cluster.txn(
                [wire.created(my, token)], ops, [wire.key_range(self.last_key)]))
        except StoreUnavailableError as e:
            # The key must not stay behind under a lease this process keeps alive.
            self._cluster.drop(lease, "a release could not be stored")
            raise StoreUnavailableError(
                e.endpoint, f"{e.why}; the release was not stored",
                f"once its lease ends the session reads as stale, and the next run takes "
                f"it over (or, once etcd answers, clear it: "
                f"{clear_command(self.url, self.session).replace(' --force', '')})",
            ) from None
        except BaseException:
            # An interrupt (KeyboardInterrupt, a signal handler's exception): the key
            # would stay under a lease this process keeps alive, the session held by
            # nobody. The lease's keeper makes the release (it keeps the key claimed).
            c = self._cluster

            def release_later() -> None:
                c.txn([wire.created(my, token)], ops)

            c.take_back_later(lease, my, release_later)
            queued = True
            raise
        finally:
            if not queued:
                self._cluster.unclaim(my)
        # A failed compare: our key was gone. Not a loss to report when the caller heard
        # of it already, when the last record is the one this release wrote (an earlier
        # try of it that etcd applied), or when the lease lives (an earlier try deleted
        # the key, and a waiter has written since; or a hand deleted it).
        if not r.get("succeeded") and not self._told and not wire.holds_value(r, value) \
                and self._key_gone_with_lease(lease):
            raise HolderLostError(
                self.session, "its key in etcd was gone at release: its lease ended while "
                "it held the session")

    # -- from outside ------------------------------------------------------------

    def wait_free(self, timeout: float | None, *, ride_out: bool = True) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        c = self._cluster
        while True:
            # Rides out a restart as waiting runs do (see `through_outage`).
            watch = _etcdcluster.through_outage(
                lambda: self._watch_holder(deadline), c.ttl, deadline,
            ) if ride_out else self._watch_holder(deadline)
            if watch is None:
                return True
            gone = watch.wake
            try:
                remaining = c.ttl / 3
                if deadline is not None:
                    remaining = min(remaining, deadline - time.monotonic())
                gone.wait(max(remaining, 0.0))
                if not gone.is_set() and deadline is not None and time.monotonic() >= deadline:
                    return False
            finally:
                watch.stop()

    def _watch_holder(self, deadline: float | None) -> _etcdwatch.Watch | None:
        """A watch for the deletion of the newest key in the queue; None when empty."""
        r = self._cluster.txn(
            [], [wire.key_range(self.lock_name + "/", prefix=True, last=True)], [], deadline)
        kvs = wire.kvs(r.get("responses", [{}])[0])
        if not kvs:
            return None
        return self._watch_for_deletion(kvs[0], int(r["header"]["revision"]), deadline, None,
                                        inline=False)

    def revision(self) -> int:
        """etcd's revision now (one request; a restart is ridden out as a probe's is)."""
        r = self._cluster.call(
            "/kv/range", {**wire.key_range(self.last_key)["request_range"], "count_only": True},
            None)
        return int(r["header"]["revision"])

    def owner_lease_left(self, deadline: float | None = None) -> tuple[float | None, int]:
        """The seconds the lease of the session's owner key has left (as etcd counts
        them, whole seconds), None when no key owns the session or its lease is gone;
        and etcd's raft term (a restart begins a new one, and gives every lease its
        whole TTL again)."""
        r = self._cluster.txn(
            [], [wire.key_range(self.lock_name + "/", prefix=True, first=True)], [], deadline)
        term = int(r.get("header", {}).get("raft_term", 0))
        kvs = wire.kvs(r.get("responses", [{}])[0])
        lease = kvs[0].get("lease") if kvs else None
        if not lease:
            return None, term
        left = _etcdcluster.seconds_left(
            self._cluster.call("/kv/lease/timetolive", {"ID": int(lease)}, deadline))
        return (None if left < 0 else float(left)), term

    def probe(self, stuck_after: float, deadline: float | None = None) -> HolderStatus:
        def look() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
            r = self._cluster.txn([], [wire.key_range(self.lock_name + "/", prefix=True,
                                                      first=True),
                                       wire.key_range(self.last_key)], [], deadline)
            self.probed_revision = int(r.get("header", {}).get("revision", 0))
            responses = r.get("responses", [{}, {}])
            return (wire.kvs(responses[0]), wire.kvs(responses[1]),
                    max(0, wire.count(responses[0]) - 1))

        def reread() -> HolderInfo | None:
            """The record read again, where the first look found it (`_probe._fence_ok`)."""
            again, last_again, _ = look()
            try:
                if owner:
                    return _decode(wire.raw(again), self.name) if again else None
                return _decode(wire.raw(last_again), self.last_name) if last_again else None
            except CorruptRecordError:
                return None

        owner, last, waiters = look()
        return session_status(self.session, self.name, owner=owner, last=last, waiters=waiters,
                       stuck_after=stuck_after, last_where=self.last_name,
                       command=clear_command(self.url, self.session),
                       etcdctl=self.url.etcdctl, reread=reread)

    def clear(self, remove: bool, force: bool) -> HolderStatus:
        from fencelock._probe import ProbeState, dropped_part, stale_record

        found = self.probe(0.0)
        if found.state is ProbeState.LIVE:
            raise found._contended(backend=self.url.text)
        if found.state is ProbeState.FREE and (not remove or found.record is None):
            # Nothing to clear, or (no record) nothing to remove: said as sidecars say it.
            return found if found.record is None else replace(found, reason="was free")
        self.acquire(True, time.monotonic() + wire.REQUEST_TIMEOUT * 2, None, None)
        my, token = self._my_key, self._token
        aside = None
        try:
            r = self._cluster.txn([], [wire.key_range(self.last_key)], [])
            kvs = wire.kvs(r.get("responses", [{}])[0])
            value = wire.raw(kvs) or b""
            ops = [wire.delete(my)]
            fix = clear_command(self.url, self.session)
            try:
                old = _decode(value, self.last_name, fix)
            except CorruptRecordError:
                if not force:
                    raise  # kept as it is; the lock is given back below
                old = None
            again = None  # a stale record marked released
            moved = "corrupt record"
            part = ""
            done = "was free"  # said as sidecars say it, with why etcd found it stale:
            if old is not None and old.state is State.HELD:
                part = dropped_part(old, self.session)  # while the lock keeps others out
                again = _record.released_again(old)
                done = "; ".join(filter(None, (f"cleared {stale_record(old)}", found.reason)))
                if again is None:  # too large to mark released: kept (also by --remove,
                    # as the sidecar store keeps it), or set aside with --force
                    if not force:  # set aside as a corrupt one is
                        raise RecordTooLargeError(self.last_name, fix, replace(
                            found, reason=f"{found.reason or ''}{part}") if part else found)
                    old, moved = None, _record.TOO_LARGE
            if old is None and value:  # corrupt, or too large to mark released
                # Set aside, never deleted: a key nobody can guess, created only if new.
                aside = (f"{self.url.prefix}/corrupt/{self.key}/"
                         f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(8).hex()}")
                ops[:0] = [wire.put(aside, value), wire.delete(self.last_key)]
            if aside is None and remove:
                ops.insert(0, wire.delete(self.last_key))
            elif again is not None:
                ops.insert(0, wire.put(self.last_key, again[0]))
            compare = [wire.created(my, token)]
            if aside is not None:
                compare.append(wire.created(aside, 0))
            r = self._cluster.txn(compare, ops, [wire.delete(my)])
        except BaseException:
            # The key must not stay queued under a lease this process keeps alive.
            self._abandon()
            raise
        self._cluster.unclaim(my)
        self._my_key, self._token = "", 0
        if aside is not None:
            if not r.get("succeeded"):  # the lock is ours, so the new name was taken
                raise CorruptRecordError(self.last_name, "its set-aside name was taken; "
                                         "try again", fix)
            where = f"{self.url.display}/{aside}"
            return replace(found, reason=f"{moved} moved to {where}{part}", set_aside=where)
        return replace(found, reason=done + part + ("; record removed" if remove else ""),
                       removed=remove)




def _owner_of(owner: list[dict[str, Any]]) -> str:
    """The owner key's name and create revision: one acquisition's, whatever its value."""
    return f"{owner[0].get('key', '')}@{owner[0].get('create_revision', '')}"


def _recordless(owner: list[dict[str, Any]], etcdctl: str) -> str:
    """Who holds a session whose owner key holds no fencelock record, in words."""
    if owner[0].get("lease"):  # (etcd's JSON leaves out a lease of 0)
        return _WITHOUT_RECORD
    key = wire.key_text(owner[0])
    return (f"the key {key}, which has no lease and never expires (put by hand, or by a "
            f"client that takes no lease); if no client holds it, delete it: {etcdctl} del "
            f"{shell_word(key)}")


def session_status(session: str, where: str, *, owner: list[dict[str, Any]],
            last: list[dict[str, Any]], waiters: int, stuck_after: float,
            last_where: str, command: str, etcdctl: str, fence: bool = True,
            reread: Callable[[], HolderInfo | None] | None = None) -> HolderStatus:
    """A session's state from its owner key (the first in the queue, if any) and its
    last record; ``fence``: whether ``session`` is its file on this host, and
    ``reread`` (see `fencelock._probe._status`)."""
    from fencelock import _probe
    from fencelock._probe import HolderStatus as holder_status
    from fencelock._probe import ProbeState as states

    now = time.time()
    try:
        if owner:
            # The owner key alone makes the session live: a value that is no fencelock
            # record (empty, or another client's) is a holder without a record.
            try:
                record = _decode(wire.raw(owner), where)
            except CorruptRecordError:
                record = None
            if record is None:
                who = _recordless(owner, etcdctl)
                status: HolderStatus = holder_status(
                    session, where, states.LIVE, reason="held by " + who, _held_by=who,
                    _owner=_owner_of(owner))
            elif record.state is State.RELEASED:
                # Only `fencelock run` leaves a released record in a live owner key: its
                # keeper keeps the key for what the command left running.
                status = holder_status(session, where, states.LIVE, record=record,
                                       reason="held by " + describe_leftovers(record),
                                       left_by_run=True, _owner=_owner_of(owner))
            else:
                status = replace(_probe._status(session, where, states.LIVE, record,
                                                stuck_after=stuck_after, now=now, fence=fence,
                                                reread=reread),
                                 _owner=_owner_of(owner))
        else:
            record = _decode(wire.raw(last), last_where, command)
            if record is None:
                status = holder_status(session, where, states.FREE, reason="no record")
            else:
                state = states.STALE if record.state is State.HELD else states.FREE
                status = _probe._status(session, where, state, record,
                                        stuck_after=stuck_after, now=now, fence=fence,
                                        reread=reread)
                if state is states.STALE:
                    status = replace(status, reason="no owner key: its lease expired while it "
                                     "held the session (the owner died, was paused or lost "
                                     "etcd)")
    except CorruptRecordError as e:
        return holder_status(session, where, states.UNREADABLE, reason=str(e))
    return replace(status, waiters=waiters)
