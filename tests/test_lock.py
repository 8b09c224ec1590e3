"""SessionLock in one process: life cycle, record, reentrancy, threads, fork."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from conftest import SpawnHolder
from interrupts import fds_naming
from marks import needs_posix, needs_proc

import fencelock
from fencelock import (
    CoordinationError,
    FenceLockError,
    HolderInfo,
    NotHeldError,
    Phase,
    ProbeState,
    SessionContendedError,
    SessionLock,
    SessionTakeoverError,
    State,
    _sidecar_holder,
    _wait,
    is_coordination_error,
    probe,
)


def read_record(session: Path) -> dict[str, object]:
    raw = Path(str(session) + ".holder").read_bytes()
    obj, _ = json.JSONDecoder().raw_decode(raw.decode())
    assert isinstance(obj, dict)
    return obj


def test_acquire_writes_the_record_and_release_keeps_the_sidecar(session: Path) -> None:
    lock = SessionLock(session, lane="heartbeat")
    info = lock.acquire()
    rec = read_record(session)
    assert rec["state"] == "held" and rec["lane"] == "heartbeat" and rec["pid"] == os.getpid()
    assert rec["token"] == info.token == 1 and rec["run_id"] == info.run_id
    assert rec["session"] == str(session) and rec["fingerprint"] is None
    assert rec["phase"] == "write" and rec["version"] == 1
    assert lock.held and lock.info == info
    lock.release()
    assert not lock.held and lock.info is None
    assert read_record(session)["state"] == "released"
    assert Path(str(session) + ".holder").exists()


def test_acquire_returns_the_record_on_disk_as_a_new_frozen_object_each_run(
    session: Path,
) -> None:
    session.write_text('{"role":"user"}\n')
    lock = SessionLock(session, lane="cron")
    first = lock.acquire()
    assert type(first) is HolderInfo and first == probe(session).record
    lock.release()
    kept = dataclasses.replace(first)
    second = lock.acquire()
    assert type(second) is HolderInfo and second == probe(session).record
    assert second is not first and second.token == first.token + 1
    assert first == kept  # an earlier run's info never changes
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.token = 0  # type: ignore[misc]
    lock.release()


def test_each_acquire_records_the_session_as_it_is_then(session: Path) -> None:
    session.write_text('{"role":"user"}\n')
    lock = SessionLock(session)
    with lock:
        pass
    with open(session, "a") as f:  # a line written between two runs
        f.write('{"role":"assistant"}\n')
    st = os.lstat(session)
    info = lock.acquire()
    assert info.fingerprint is not None
    assert (info.fingerprint.ino, info.fingerprint.size, info.fingerprint.mtime_ns) == (
        st.st_ino, st.st_size, st.st_mtime_ns)
    assert probe(session).fence_ok
    lock.release()


def test_sidecar_is_created_0600(session: Path) -> None:
    old = os.umask(0)
    try:
        with SessionLock(session):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(str(session) + ".holder").st_mode)
    assert mode == 0o600


def test_tokens_increase_by_one_per_acquisition(session: Path) -> None:
    lock = SessionLock(session)
    tokens = []
    for _ in range(3):
        tokens.append(lock.acquire().token)
        lock.release()
    assert tokens == [1, 2, 3]
    with SessionLock(session) as last:
        assert last.info is not None and last.info.token == 4


@pytest.mark.parametrize("since", ["taken by another holder", "its end torn", "rewritten"])
def test_an_object_reads_its_sidecar_again_after_its_own_release(
    session: Path, since: str
) -> None:
    """An acquire takes the token from what it reads, not from what the same object
    left there: the record may have changed since, in a way that keeps its length."""
    lock = SessionLock(session, lane="a")
    for _ in range(2):
        with lock:
            pass
    sidecar = Path(str(session) + ".holder")
    if since == "taken by another holder":
        with SessionLock(session, lane="b"):
            pass
        assert lock.acquire().token == 4
        lock.release()
        return
    left = sidecar.read_bytes()
    if since == "its end torn":  # what a crash can leave: NULs in place of the last bytes
        changed = left[:-12] + b"\0" * 12
    else:  # another writer's record of the same length, with a larger token
        changed = left.replace(b'"token":2 ', b'"token":70', 1)
    assert len(changed) == len(left) and changed != left
    sidecar.write_bytes(changed)
    if since == "its end torn":
        with pytest.raises(fencelock.CorruptRecordError):
            lock.acquire()
        assert sidecar.read_bytes() == changed
    else:
        assert lock.acquire().token == 71
        lock.release()


def test_with_gives_the_lock_itself(session: Path) -> None:
    lock = SessionLock(session)
    with lock as entered:
        assert entered is lock and lock.held


def test_same_object_is_reentrant(session: Path) -> None:
    lock = SessionLock(session)
    with lock:
        token = lock.info.token if lock.info else None
        with lock:
            assert lock.info is not None and lock.info.token == token
        assert lock.held and probe(session).state == "live"
    assert not lock.held and probe(session).state == "free"


def test_second_object_in_same_process_contends(session: Path) -> None:
    with SessionLock(session, lane="heartbeat"):
        other = SessionLock(session, lane="channel", on_contention="fail")
        with pytest.raises(SessionContendedError) as err:
            other.acquire()
        assert err.value.holder is not None and err.value.holder.lane == "heartbeat"
        assert err.value.session == str(session)
        with pytest.raises(SessionContendedError):
            SessionLock(session, timeout=0.05).acquire()


def test_another_thread_waits_until_release(session: Path) -> None:
    first = SessionLock(session, lane="a")
    first.acquire()
    started, got = threading.Event(), threading.Event()
    tokens: list[int] = []

    def second() -> None:
        started.set()
        with SessionLock(session, lane="b") as lock:
            assert lock.info is not None
            tokens.append(lock.info.token)
            got.set()

    t = threading.Thread(target=second)
    t.start()
    started.wait()
    assert not got.is_set()
    first.release()
    t.join(timeout=30)
    assert got.is_set() and tokens == [2]


def test_same_object_from_another_thread_is_not_reentrant(session: Path) -> None:
    lock = SessionLock(session, on_contention="fail")
    lock.acquire()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            lock.acquire()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    lock.release()
    assert len(errors) == 1 and isinstance(errors[0], SessionContendedError)


def test_a_later_thread_with_a_finished_threads_id_is_not_reentrant(session: Path) -> None:
    """A thread takes the session and ends, leaving the run to another thread to
    release (any thread of the process may). A later thread that the system gives the
    same thread id must contend like any other, not re-enter the finished one's hold."""
    lock = SessionLock(session, on_contention="fail")
    first: list[int] = []

    def take() -> None:
        first.append(threading.get_ident())
        lock.acquire()

    t = threading.Thread(target=take)
    t.start()
    t.join()
    outcome: list[object] = []

    def again(started: threading.Barrier) -> None:
        # Every thread of the round lives until all have started, so that the round
        # takes as many stacks as it has threads, the finished thread's among them
        # even where another thread of this process has finished since.
        started.wait()
        if threading.get_ident() != first[0]:
            return
        try:
            outcome.append(lock.acquire())
        except BaseException as e:
            outcome.append(e)

    # The C library hands a finished thread's id (its stack) to a thread made later.
    try:
        for size in (1, 2, 4, 8, 16, 32, 64) * 3:
            started = threading.Barrier(size)
            round_ = [threading.Thread(target=again, args=(started,)) for _ in range(size)]
            for t in round_:
                t.start()
            for t in round_:
                t.join()
            if outcome:
                break
        assert outcome, "no later thread got the finished thread's id"
        assert isinstance(outcome[0], SessionContendedError), outcome
        assert lock._count == 1
    finally:
        lock.release()
    assert not lock.held


def test_release_without_acquire_raises(session: Path) -> None:
    with pytest.raises(NotHeldError):
        SessionLock(session).release()


def test_forked_child_neither_holds_nor_releases(session: Path) -> None:
    lock = SessionLock(session, lane="parent")
    lock.acquire()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what it sees, then leave without cleanup
        try:
            held = lock.held
            lock.release()  # must be a no-op
            try:
                SessionLock(session, on_contention="fail").acquire()
                contended = False
            except SessionContendedError:
                contended = True
            os.write(write_end, json.dumps([held, contended]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        held, contended = json.loads(f.read())
    os.waitpid(pid, 0)
    assert held is False and contended is True
    assert lock.held and probe(session).state == "live"
    lock.release()
    assert probe(session).state == "free"


def test_exception_hierarchy_and_wrapped_detection(session: Path) -> None:
    assert issubclass(SessionContendedError, CoordinationError)
    assert issubclass(SessionTakeoverError, CoordinationError)
    assert issubclass(CoordinationError, FenceLockError)
    err = SessionContendedError(str(session), None)
    assert is_coordination_error(err)
    try:
        try:
            raise err
        except SessionContendedError as inner:
            raise RuntimeError("model fallback failed") from inner
    except RuntimeError as outer:
        assert is_coordination_error(outer)
    try:
        try:
            raise SessionTakeoverError(str(session), None, None)
        except SessionTakeoverError:
            raise ValueError("while handling")  # noqa: B904 - implicit context on purpose
    except ValueError as ctx:
        assert is_coordination_error(ctx)
    # `raise ... from saved` outside the handler: only __cause__ links them.
    saved = SessionTakeoverError(str(session), None, None)
    try:
        raise RuntimeError("all models failed") from saved
    except RuntimeError as caused:
        assert caused.__cause__ is saved and caused.__context__ is None
        assert is_coordination_error(caused)
    # Raised with another cause while handling one: the context still counts.
    try:
        try:
            raise err
        except SessionContendedError:
            raise RuntimeError("fallback failed") from TimeoutError()
    except RuntimeError as both:
        assert isinstance(both.__cause__, TimeoutError) and both.__context__ is err
        assert is_coordination_error(both)
    assert not is_coordination_error(ValueError("provider 500"))
    assert not is_coordination_error(None)
    assert not is_coordination_error("SessionTakeoverError")  # type: ignore[arg-type]
    assert is_coordination_error(ExceptionGroup("g", [ValueError(), err]))


def test_contended_error_names_the_holder(session: Path) -> None:
    holder = SessionLock(session, lane="session:agent:main:heartbeat")
    with holder, pytest.raises(SessionContendedError) as err:
        SessionLock(session, on_contention="fail").acquire()
    text = str(err.value)
    assert str(session) in text and f"pid {os.getpid()}" in text and "heartbeat" in text
    # A busy run is waited for; a fresh session is for one that never ends.
    assert "; its run began 0s ago and is alive: wait for it (a longer time limit), or, " \
        f"should it never end, start a fresh session (fencelock recover {session})" in text


def test_bad_arguments_are_refused(session: Path) -> None:
    with pytest.raises(ValueError):
        SessionLock(session, on_contention="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SessionLock(session, timeout=-1)


def test_released_record_probes_free_and_held_record_of_dead_owner_is_stale(session: Path) -> None:
    with SessionLock(session):
        pass
    status = probe(session)
    assert status.state == ProbeState.FREE and status.record is not None
    assert status.record.state is State.RELEASED


def test_a_lane_too_long_for_the_record_is_refused_up_front(session: Path) -> None:
    with pytest.raises(ValueError, match="lane"):
        SessionLock(session, lane="x" * 5000)


def test_heartbeats_from_another_thread_never_outlive_release(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lock_a = SessionLock(a, lane="A")
    stop = threading.Event()
    errors: list[BaseException] = []

    def heartbeat() -> None:
        while not stop.is_set():
            try:
                lock_a.touch()
            except NotHeldError:
                pass
            except BaseException as e:  # anything else is the bug
                errors.append(e)

    t = threading.Thread(target=heartbeat)
    t.start()
    try:
        for _ in range(300):
            lock_a.acquire()
            lock_a.release()
            with SessionLock(b, lane="B"):  # reuses the descriptor number A just closed
                pass
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert probe(b).lane == "B" and probe(a).lane == "A"
    # No heartbeat landed after the last release: A's record reads released.
    last = probe(a)
    assert last.state is ProbeState.FREE and last.record is not None
    assert last.record.state is State.RELEASED


class _IoWithAHook:
    """A lock object's ``_io`` (a real `threading.Lock` inside) whose ``locked()`` first
    runs ``hook``: what `SessionLock.release` does between counting itself no longer
    held and looking at ``_io``, another thread or an interrupt can do at just that
    moment."""

    def __init__(self, real: Any, hook: Any) -> None:
        self.real, self.hook = real, hook

    def locked(self) -> bool:
        self.hook()
        return bool(self.real.locked())

    def __enter__(self) -> bool:
        return bool(self.real.__enter__())

    def __exit__(self, *exc: object) -> None:
        self.real.__exit__(*exc)


def test_a_heartbeat_that_comes_as_release_begins_writes_nothing(session: Path) -> None:
    """A release that finds ``_io`` free does not take it: a heartbeat from another
    thread that gets ``_io`` once the release began must not write the record (it could
    land after the "released" one, or through the closed descriptor). The heartbeat is
    `touch`'s write step: its check that the lock is held passed before the release."""
    lock = SessionLock(session, lane="A")
    lock.acquire()
    before = probe(session).record
    outcome: list[str] = []

    def heartbeat() -> None:
        try:
            lock._heartbeat_at += 1.0
            lock._write_record()
            outcome.append("wrote")
        except NotHeldError:
            outcome.append("not held")

    def run_heartbeat() -> None:
        t = threading.Thread(target=heartbeat)
        t.start()
        t.join()

    lock._io = _IoWithAHook(lock._io, run_heartbeat)  # type: ignore[assignment]
    lock.release()
    assert outcome == ["not held"]
    after = probe(session)
    assert after.state is ProbeState.FREE and after.record is not None and before is not None
    assert after.record.state is State.RELEASED
    assert after.record.heartbeat_at == before.heartbeat_at


def test_a_release_waits_for_a_record_write_under_way(session: Path) -> None:
    """While another thread writes the record (holding ``_io``), release waits for it
    before it marks the record released and unlocks."""
    import inspect
    import sys
    import time

    lock = SessionLock(session, lane="A")
    lock.acquire()
    source, first = inspect.getsourcelines(SessionLock.release)
    waits_at = {first + i for i, text in enumerate(source) if "with self._io:" in text}
    with lock._io:  # a record write under way
        releaser = threading.Thread(target=lock.release)
        releaser.start()
        give_up = time.monotonic() + 30
        while True:  # polled: no event says that a thread waits on a lock
            frame = sys._current_frames().get(releaser.ident or 0)
            if frame is not None and frame.f_code is SessionLock.release.__code__ \
                    and frame.f_lineno in waits_at:
                break
            assert releaser.is_alive() and time.monotonic() < give_up, \
                "release() never waited for the write under way"
            time.sleep(0.001)
        assert probe(session).state is ProbeState.LIVE
    releaser.join(30)
    assert not releaser.is_alive()
    assert probe(session).record.state is State.RELEASED  # type: ignore[union-attr]


def _appends_held_up(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make every append wait, before its fence check, until the second event is set;
    the first is set as one begins to wait."""
    from fencelock import _fence

    writing, go = threading.Event(), threading.Event()
    real = _fence.append

    def held_up(*args: Any, **kw: Any) -> Any:
        writing.set()
        go.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(_fence, "append", held_up)
    return writing, go


def test_a_release_from_another_thread_waits_for_an_append_under_way(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any thread may release: one that does while another thread's append is writing
    waits for that append, so the line is never written after the release (into the
    next run's session, where its fence would take it for a foreign write)."""
    import sys
    import time


    lock = SessionLock(session, lane="A")
    lock.acquire()
    order: list[str] = []
    writing, go = _appends_held_up(monkeypatch)

    def append() -> None:
        lock.append({"n": 1})
        order.append("appended")

    def release() -> None:
        lock.release()
        order.append("released")

    appender = threading.Thread(target=append)
    appender.start()
    try:
        assert writing.wait(30)
        releaser = threading.Thread(target=release)
        releaser.start()
        give_up = time.monotonic() + 30
        while True:  # polled: no event says that a thread waits on a lock
            frame = sys._current_frames().get(releaser.ident or 0)
            if frame is not None and frame.f_code is SessionLock._await_append.__code__:
                break
            assert releaser.is_alive() and time.monotonic() < give_up, \
                "release() did not wait for the append under way"
            time.sleep(0.001)
    finally:
        go.set()
    appender.join(30)
    releaser.join(30)
    assert order == ["appended", "released"]
    status = probe(session)
    assert status.state is ProbeState.FREE and status.record is not None
    assert status.record.state is State.RELEASED
    assert status.record.fingerprint == _fingerprint_of(session)  # the line, then release
    assert [json.loads(x) for x in session.read_text().splitlines()] == [{"n": 1}]


def test_ctrl_c_while_a_release_waits_for_an_append_still_releases_after_it(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the main thread while its `release()` waits for another thread's
    append: the release still waits for that append to end, then lets go, then the
    KeyboardInterrupt goes on. Released at once, the line would land after the release
    (outside the run, a takeover for the next run to see)."""
    import signal


    session.write_text('{"n":0}\n')
    lock = SessionLock(session, lane="A")
    lock.acquire()
    writing, go = _appends_held_up(monkeypatch)
    interrupted = threading.Event()
    failed: list[BaseException] = []

    def append() -> None:
        try:
            lock.append({"n": 1})
        except BaseException as e:
            failed.append(e)

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    main = threading.get_ident()

    def interrupt_the_wait() -> None:
        give_up = time.monotonic() + 30
        while True:  # polled: no event says that a thread waits on a lock
            frame = sys._current_frames().get(main)
            if frame is not None and frame.f_code is SessionLock._await_append.__code__:
                break
            if time.monotonic() > give_up:
                go.set()
                return
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGINT)
        interrupted.wait(30)
        go.set()  # the append goes on only once the interrupt has landed

    old = signal.signal(signal.SIGINT, on_sigint)
    appender = threading.Thread(target=append)
    appender.start()
    helper = threading.Thread(target=interrupt_the_wait)
    try:
        assert writing.wait(30)
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            lock.release()
    finally:
        go.set()
        signal.signal(signal.SIGINT, old)
        appender.join(30)
        helper.join(30)
    assert interrupted.is_set(), "release() did not wait for the append under way"
    assert not failed and not lock.held
    status = probe(session)
    assert status.record is not None and status.record.state == "released"
    assert status.fence_ok, status
    assert status.record.fingerprint is not None
    assert status.record.fingerprint.size == session.stat().st_size
    assert session.read_text().count("\n") == 2


def _fingerprint_of(session: Path) -> Any:
    from fencelock import _fingerprint

    return _fingerprint.take(str(session), _fingerprint.FenceMode.STAT)


def test_an_interrupt_as_release_looks_at_io_still_releases(session: Path) -> None:
    """A KeyboardInterrupt (or a signal handler's exception) that lands while release
    decides whether to take ``_io`` leaves the session released, not locked by a lock
    object that no longer counts itself as holding it."""
    lock = SessionLock(session, lane="A")
    lock.acquire()

    def interrupt() -> None:
        raise KeyboardInterrupt

    lock._io = _IoWithAHook(lock._io, interrupt)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        lock.release()
    assert not lock.held
    status = probe(session)
    assert status.state is ProbeState.FREE and status.record is not None
    assert status.record.state is State.RELEASED
    with SessionLock(session, lane="B", timeout=0):
        assert probe(session).lane == "B"


@pytest.mark.parametrize("where", ["the inode check", "the record read"])
def test_an_interrupt_just_after_the_lock_is_taken_leaves_it_not_taken(
    session: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A KeyboardInterrupt that lands once the sidecar is locked, before the record is
    written (the inode re-check, the read of the old record), leaves the session free:
    it left the descriptor open and locked, and the session live for good."""
    from fencelock import _platform, _sidecar

    target, name = (_sidecar, "at_path") if where == "the inode check" else (
        _platform, "pread")  # the old record's: the first read of an acquire
    real = getattr(target, name)
    calls: list[tuple[Any, ...]] = []

    def interrupted(*args: Any) -> Any:
        if not calls:
            calls.append(args)
            raise KeyboardInterrupt
        return real(*args)

    lock = SessionLock(session, lane="A")
    monkeypatch.setattr(target, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    monkeypatch.undo()
    assert calls and not lock.held
    assert probe(session).state is ProbeState.FREE
    with SessionLock(session, lane="B", on_contention="fail"):
        pass
    with lock:  # the object itself takes it again
        assert lock.held


def test_a_refused_acquire_by_another_owner_of_the_object_leaves_the_holder_alone(
    session: Path,
) -> None:
    """One object, two owners: the holder's thread, and another thread whose acquire is
    refused (timeout 0), then times out. Its failure freed the holder's in-process slot,
    and a later attempt wrote over the holder's descriptor: the release failed (EBADF)
    and the lock leaked, refusing every later run of the process."""
    lock = SessionLock(session, lane="A")
    lock.acquire()
    errors: list[BaseException] = []

    def other_owner() -> None:
        for timeout in (0, 0.2):
            try:
                lock.acquire(timeout=timeout)
            except SessionContendedError as e:
                errors.append(e)

    t = threading.Thread(target=other_owner)
    t.start()
    t.join(60)
    assert len(errors) == 2 and lock.held
    with pytest.raises(SessionContendedError):  # still this process's: contended here too
        SessionLock(session, lane="B", on_contention="fail").acquire()
    lock.release()
    assert probe(session).state is ProbeState.FREE
    with SessionLock(session, lane="C", on_contention="fail") as again:
        assert again.held


@pytest.mark.timeout(300)
@pytest.mark.parametrize("wait", ["acquire", "wait_until_unlocked"])
@pytest.mark.parametrize("held", ["held", "adopting", "free"])
def test_an_interrupt_at_any_point_of_a_timed_wait_leaves_no_lock_behind(
    session: Path, spawn_holder: SpawnHolder, wait: str, held: str
) -> None:
    """A timed wait for a session another process holds (its helper thread blocked in
    the kernel; ``adopting``: after an earlier wait that timed out, whose helper it takes
    over), or for a free one; an interrupt (a signal handler's exception) lands at one
    point of the wait's code (and the acquire's) after another, the time limit passing
    meanwhile. Once the holder lets go, nothing of this process keeps the lock. An
    interrupt as the wait gave up (just after it let go of its claim), or as it took
    over the earlier helper, left that helper neither given up nor anyone's, and it took
    the lock for good, so that the session read as held until the process ended; one
    just as `wait_until_unlocked` got a free session's lock kept it (shared). Nor is a
    descriptor left open: one landing as a wait that took over the earlier helper closed
    its own descriptor left that open."""
    from interrupts import interrupted_at

    from fencelock import _forkguard, _lock, _registry, _sidecar_holder, _wait

    holder = spawn_holder(session, lane="holder")
    sidecar = str(session) + ".holder"
    made: list[SessionLock] = []
    if wait == "acquire":
        def timed_wait(limit: float = 0.02) -> object:
            made.append(SessionLock(session, "waiter", timeout=limit))
            made[-1].acquire()
            made[-1].release()  # (a free session's)
            return None
    else:
        def timed_wait(limit: float = 0.02) -> object:
            return _wait.wait_until_unlocked(sidecar, limit)
    holder.acquire()  # (the sidecar made)
    assert holder.call("release") == "released"
    walked = (_wait.__file__, _sidecar_holder.__file__, _lock.__file__, _registry.__file__)
    tracked = set(_forkguard._open)
    number = 0
    while True:
        if held != "free":
            holder.acquire()
        if held == "adopting":  # one that times out: its helper stays blocked, taken over
            # A helper whose thread had not begun by the time limit is closed, not left
            # blocked (a loaded host): the wait is made again with a longer limit.
            for limit in (0.02, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0):
                with contextlib.suppress(SessionContendedError):
                    assert timed_wait(limit) is False  # (wait_until_unlocked's timeout)
                if _wait.abandoned_waits():
                    break
            assert _wait.abandoned_waits()
        fired, _ = interrupted_at(number, timed_wait, walked, expected=(SessionContendedError,))
        if held != "free":
            assert holder.call("release") == "released"
        for lock in made:  # an interrupt as a release was entered: released again (docs/API.md)
            while lock.held:
                lock.release()
        made.clear()
        deadline = time.monotonic() + 30
        while _wait.abandoned_waits():  # its helper drops the lock it gets at once
            assert time.monotonic() < deadline, f"a helper never let go (point {number})"
            time.sleep(0.001)
        with SessionLock(session, "after", on_contention="fail"):
            pass  # (SessionContendedError: a helper of this process took it for nobody)
        if not fired:
            break
        number += 1
    assert number > 10  # the wait's code was walked
    # No descriptor left open either: not one that took over an earlier wait's helper
    # (which closes its own), nor one an interrupt as a close began would have kept.
    assert set(_forkguard._open) == tracked


@needs_proc  # lists descriptors from /proc/self/fd
@pytest.mark.parametrize("start", ["new session", "session exists", "sidecar exists",
                                   "torn last line"])
def test_an_interrupt_at_any_point_of_a_run_leaks_no_descriptor(tmp_path: Path, start: str) -> None:
    """A run (acquire, one append, release; on a session whose torn last line the
    append sets aside, too) with an interrupt (a signal handler's exception) landing at
    one point where a handler can run after another, in the code that opens, checks and
    closes the sidecar, the session file and its ``.torn``: once the object is released,
    no descriptor of any is left open. A signal that came during an open's system call
    is handled just as the call returns, before its result is kept: that point left the
    descriptor open for the life of the process (and on 3.12 and 3.13 so did the
    ``break`` out of the sidecar's open loop, a backward jump there)."""
    from interrupts import interrupted_at

    from fencelock import (
        _fence,
        _fingerprint,
        _forkguard,
        _lock,
        _platform,
        _sidecar,
        _sidecar_holder,
        _tokens,
    )

    walked = (_sidecar.__file__, _sidecar_holder.__file__, _lock.__file__, _fence.__file__,
              _fingerprint.__file__, _tokens.__file__, _forkguard.__file__, _platform.__file__)
    number = 0
    while True:
        session = tmp_path / str(number) / "s.jsonl"
        session.parent.mkdir()
        if start != "new session":
            session.write_text('{"n":0}\n' + ('{"torn' if start == "torn last line" else ""))
        if start == "sidecar exists":
            with SessionLock(session, "before"):
                pass
        lock = SessionLock(session, "walked")

        def run(lock: SessionLock = lock) -> None:
            with warnings.catch_warnings():  # the torn line's: said once it is set aside
                warnings.simplefilter("ignore", fencelock.FenceLockWarning)
                with lock:
                    lock.append({"n": 1})

        fired, _ = interrupted_at(number, run, walked, expected=(FenceLockError,))
        while lock.held:  # an interrupt as a release was entered: released again (docs/API.md)
            lock.release()
        for name in ("s.jsonl", "s.jsonl.holder", "s.jsonl.torn"):
            assert fds_naming(f"/{number}/{name}") == [], (number, name)
        if not fired:
            break
        number += 1
    assert number > 50  # the run's code was walked


@needs_proc  # lists descriptors from /proc/self/fd
def test_an_interrupt_at_any_point_of_verify_leaks_no_descriptor(tmp_path: Path) -> None:
    """`verify()` with an interrupt landing at one point where a signal handler can run
    after another: the session file's descriptor is closed every time. `os.fdopen` is
    Python code: one landing in it, before the file owned the descriptor, left it open."""
    import gc

    from interrupts import interrupted_at

    from fencelock import _sidecar, _verify, verify

    session = tmp_path / "s.jsonl"
    with SessionLock(session, "before") as lock:
        lock.append({"n": 0})
    walked = (_verify.__file__, _sidecar.__file__, os.fdopen.__code__.co_filename)
    number = 0
    with warnings.catch_warnings():  # a file an interrupt's traceback kept: closed as it
        warnings.simplefilter("ignore", ResourceWarning)  # goes, which Python notes
        while interrupted_at(number, lambda: verify(session), walked,
                             expected=(FenceLockError,))[0]:
            gc.collect()
            assert fds_naming("/s.jsonl") == [], number
            number += 1
    assert number > 10


@needs_posix  # setitimer
def test_a_second_interrupt_as_a_timed_wait_s_cleanup_begins_leaves_no_lock_behind(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A timed wait for a session another process holds: a signal's handler raises in
    the wait (its helper thread blocked in the kernel), and a second interrupt lands as
    the cleanup that gives the helper up is entered. The helper was never given up:
    once the holder let go it took the lock for nobody, and the session read as held
    until the process ended."""
    from fencelock import _wait

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    lock = SessionLock(session, "waiter", timeout=30)
    raised: list[str] = []

    def second(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is _wait.abandon.__code__ and not raised[1:]:
            raised.append("abandon")
            raise KeyboardInterrupt

    def first(signum: int, frame: Any) -> None:
        if frame is None or frame.f_code is not _wait._Done.wait.__code__:
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # not waiting yet: once more
            return
        raised.append("wait")
        sys.settrace(second)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGALRM, first)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        sys.settrace(None)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert raised == ["wait", "abandon"] and not lock.held
    assert holder.call("release") == "released"
    deadline = time.monotonic() + 30
    while _wait.abandoned_waits():  # a helper given up drops the lock it gets at once
        assert time.monotonic() < deadline, "the helper was never given up"
        time.sleep(0.001)
    with SessionLock(session, "after", on_contention="fail"):
        pass  # (SessionContendedError: the helper took it for nobody)


def test_fork_during_a_timed_wait_leaves_no_orphan_lock(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A child forked while a helper thread waits must not keep that helper's lock."""
    import time

    from conftest import wait_for_blocked_waiter

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    outcome: list[str] = []

    def waiter() -> None:
        try:
            SessionLock(session, lane="waiter", timeout=0.3).acquire()
            outcome.append("acquired")
        except SessionContendedError:
            outcome.append("timed out")

    t = threading.Thread(target=waiter)
    t.start()
    wait_for_blocked_waiter(session)  # the helper thread is blocked in flock
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a long-lived worker that knows nothing of sessions
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        t.join(timeout=30)
        assert outcome == ["timed out"]  # the helper stays blocked, abandoned
        assert holder.call("release") == "released"
        # The abandoned helper now gets the lock and drops it at once.
        deadline = time.monotonic() + 30
        while _wait._pending and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not _wait._pending
        # With the child still alive, the session is free: it holds no copy of the lock.
        assert probe(session).state == ProbeState.FREE
        with SessionLock(session, on_contention="fail"):
            pass
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)


def _fork_and_list_sidecar_fds(sidecar: Path) -> tuple[int, list[str], int]:
    """Fork a worker that knows nothing of sessions; it reports which of its inherited
    descriptors name ``sidecar``, then stays alive until the returned pipe closes."""
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            os.close(hold_w)
            os.write(report_w, json.dumps(fds_naming(os.path.realpath(sidecar))).encode())
            os.close(report_w)
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(hold_r)
    with os.fdopen(report_r) as f:
        inherited = json.loads(f.read())
    return pid, inherited, hold_w


@pytest.mark.parametrize("how", ["SessionLock wait", "wait_until_unlocked"])
def test_fork_during_an_untimed_wait_leaves_the_child_no_descriptor(
    session: Path, spawn_holder: SpawnHolder, how: str
) -> None:
    """A wait with no timeout blocks in flock in the calling thread. A child forked
    meanwhile must not inherit that descriptor: once the wait succeeds, the child's copy
    would share the lock and keep it alive after the parent dies."""
    from conftest import wait_for_blocked_waiter

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    sidecar = Path(str(session) + ".holder")
    done = threading.Event()

    def waiter() -> None:
        if how == "SessionLock wait":
            with SessionLock(session, lane="waiter"):
                pass
        else:
            assert _wait.wait_until_unlocked(str(sidecar), None)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    pid, inherited, hold_w = -1, None, -1
    try:
        wait_for_blocked_waiter(session)  # this thread is blocked in flock now
        pid, inherited, hold_w = _fork_and_list_sidecar_fds(sidecar)
    finally:
        assert holder.call("release") == "released"
        t.join(timeout=30)
        if hold_w >= 0:
            os.close(hold_w)
        if pid > 0:
            os.waitpid(pid, 0)
    assert done.is_set()
    assert inherited == []


def test_forks_amid_busy_threads_never_inherit_a_sidecar_descriptor(tmp_path: Path) -> None:
    """Threads take, wait for, probe and release sessions while the main thread forks
    over and over: no child may ever hold a sidecar descriptor, whatever instant of an
    open, a lock, a hand-over or a close the fork lands in."""
    import warnings

    sessions = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(n: int) -> None:
        session = sessions[n % 2]
        lock = SessionLock(session, lane=f"t{n}", timeout=0.01 if n == 2 else None)
        try:
            while not stop.is_set():
                try:
                    with lock:
                        probe(sessions[(n + 1) % 2])
                except SessionContendedError:
                    pass  # the timed waiter lost a round: go on
                _wait.wait_until_unlocked(str(session) + ".holder", 0.001 if n == 3 else None)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    leaks = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            for _ in range(150):
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.write(write_end, str(len(fds_naming(".holder"))).encode())
                    os._exit(0)
                os.close(write_end)
                with os.fdopen(read_end) as f:
                    leaks.append(int(f.read()))
                os.waitpid(pid, 0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert sum(leaks) == 0, f"children that inherited sidecar descriptors: {leaks}"


def test_a_timeout_of_zero_tries_once_and_leaves_no_helper_thread(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """``acquire(timeout=0)`` against a held session is one try: it raises at once and
    starts no helper thread to wait in the kernel (a timed wait leaves one blocked until
    the holder lets go)."""
    other = spawn_holder(session, lane="busy")
    other.acquire()
    before = set(threading.enumerate())
    with pytest.raises(SessionContendedError):
        SessionLock(session, "try").acquire(timeout=0)
    assert set(threading.enumerate()) - before == set()
    assert other.call("release") == "released"
    with SessionLock(session, "after") as lock:  # and nothing of the try holds it
        assert lock.info is not None


def test_a_try_names_the_live_holder_it_found_not_what_a_second_read_finds(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``acquire(timeout=0)`` names the holder by the live record it read when it found
    the lock taken. Read again, the record may be that run's own released one: a lane
    that takes the session again right after releasing it has the lock before it writes
    its new record (here the holder rewrites its record's head to released, keeping the
    lock, just before any second read)."""
    other = spawn_holder(session, lane="looping")
    other.acquire()
    real = _sidecar_holder.read_quietly

    def read_between_runs(sidecar: str) -> HolderInfo | None:
        assert other.call("head released") == "ok"
        return real(sidecar)

    monkeypatch.setattr(_sidecar_holder, "read_quietly", read_between_runs)
    with pytest.raises(SessionContendedError) as e:
        SessionLock(session, "try").acquire(timeout=0)
    assert e.value.holder is not None, str(e.value)
    assert (e.value.holder.pid, e.value.holder.lane) == (other.pid, "looping")


def test_contention_looks_again_at_a_released_record_under_a_taken_lock(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wait that ends without the session, finding its lock taken over a released
    record, looks again for a moment before naming the lock's holder as a process
    outside fencelock: most often a run has just taken it and is writing its record
    (here the holder's record says released until the error has read it once)."""
    other = spawn_holder(session, lane="starting")
    other.acquire()
    assert other.call("head released") == "ok"
    real = _sidecar_holder.read_quietly
    reads: list[HolderInfo | None] = []

    def read_then_write(sidecar: str) -> HolderInfo | None:
        found = real(sidecar)
        reads.append(found)
        if len(reads) == 1:
            assert other.call("head held") == "ok"
        return found

    monkeypatch.setattr(_sidecar_holder, "read_quietly", read_then_write)
    with pytest.raises(SessionContendedError) as e:
        SessionLock(session, "wait").acquire(timeout=0.2)
    assert reads[0] is not None and reads[0].state is State.RELEASED
    assert e.value.holder is not None, str(e.value)
    assert (e.value.holder.pid, e.value.holder.lane) == (other.pid, "starting")


# A KeyboardInterrupt (or a SIGTERM handler's exception) handled at the first moment it
# can be after one of fencelock's internal locks was granted. CPython runs a pending
# signal handler right after a call returns, but not between a ``with`` statement's
# ``__enter__`` and its block: an explicit ``x.acquire()`` before ``try`` would leave
# ``x`` held for good. The lock is held by another thread until the main thread is
# blocked on it (seen in its frame); that thread then makes the signal pending (sent
# to itself, so the main thread's wait is not cut short) and lets go.
_INTERRUPT_AFTER_GRANT = """
import os, signal, sys, threading, time
from fencelock import SessionLock, _forkguard, _registry, _sidecar_holder

case, session = sys.argv[1], sys.argv[2]
lock = SessionLock(session)
if case == "io":
    target, action, code = lock._io, lock.acquire, _sidecar_holder.SidecarHolder.acquire
else:
    lock.acquire()
    target, action, code = (_registry._mu, lock.release, _registry.free) if case == "mu" \\
        else (_forkguard.guard, lock.release, _forkguard.close)
main = threading.get_ident()

def interrupt_once_granted(ready):
    with target:
        ready.set()
        # The main thread's innermost frame is the function that takes the lock: it waits
        # for this thread there. (Polled: no event says that a thread waits on a lock.)
        give_up = time.monotonic() + 30
        while sys._current_frames()[main].f_code is not code.__code__:
            if time.monotonic() > give_up:
                print("the main thread never waited in", code.__qualname__, flush=True)
                os._exit(1)
            time.sleep(0.001)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

ready = threading.Event()
helper = threading.Thread(target=interrupt_once_granted, args=(ready,))
helper.start()
ready.wait()
try:
    action()
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
helper.join()
leaks = []
if lock._io.locked():
    leaks.append("_io")
if _registry.busy():
    leaks.append("_registry._mu")
if _forkguard.guard._is_owned():
    leaks.append("_forkguard.guard")
print("held:", ",".join(leaks) or "nothing", flush=True)
os._exit(0)  # at exit, a lock left held would hang the interpreter's own clean-up
"""


@pytest.mark.parametrize("case", ["io", "mu", "guard"])
def test_an_interrupt_just_as_an_internal_lock_is_granted_leaves_it_free(
    session: Path, case: str
) -> None:
    import subprocess
    import sys

    session.write_text("")
    out = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_AFTER_GRANT, case, str(session)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["interrupted", "held: nothing"], out.stdout + out.stderr


def test_a_record_built_as_the_holder_changes_it_is_not_kept(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another thread (an in-process contender naming the holder) builds lock.info just
    # as the holder's thread enters the prompt window: the record it built is already
    # old, and must not be what lock.info says for the rest of the window.
    from fencelock import _record

    lock = SessionLock(session, "holder")
    with lock:
        real = _record.completed
        calls = 0

        def meanwhile(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            info = real(*args, **kwargs)
            if calls == 1:  # the holder's thread runs here: the window begins
                lock._rewrite(_phase=Phase.PROMPT, _heartbeat_at=time.time())
            return info

        lock._info = None
        monkeypatch.setattr(_record, "completed", meanwhile)
        assert lock.info is not None  # built with the old phase
        monkeypatch.setattr(_record, "completed", real)
        assert lock.info is not None and lock.info.phase is Phase.PROMPT


_HANDLER_DURING_CHECK = r"""
import os, signal, sys, time
from fencelock import SessionLock, SessionTakeoverError, _fence, _lock
case, session = sys.argv[1], sys.argv[2]
lock = SessionLock(session, "main")
lock.acquire()
lock.append({"n": 0})
if case == "release-during-check":
    _lock._GIL = False  # as on a free-threaded build, where release always waits for appends
    check = _fence.check
    _fence.check = lambda *a, **k: (time.sleep(0.1), check(*a, **k))[1]  # a slow stat
    signal.signal(signal.SIGALRM, lambda *a: lock.release())
    signal.setitimer(signal.ITIMER_REAL, 0.02)
    lock.verify_fence()
    assert not lock.held
else:  # check-during-append: a handler's own fence check while this thread appends
    fsync = _fence._fsync
    _fence._fsync = lambda fd: (time.sleep(0.1), fsync(fd))[1]  # a busy disk
    seen = []
    def check(*a):
        try:
            lock.verify_fence()
        except SessionTakeoverError:
            pass  # this thread's line is half counted: the handler cannot wait for itself
        seen.append(1)
    signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 0.02)
    lock.append({"n": 1})
    assert seen
print("done")
"""


@pytest.mark.parametrize("case", ["release-during-check", "check-during-append"])
def test_a_signal_handler_of_the_checking_thread_does_not_wait_for_itself(
    session: Path, case: str
) -> None:
    # A fence check waits for appends of other threads; a signal handler that runs in
    # the middle of this thread's check or append must not wait for it.
    out = subprocess.run([sys.executable, "-c", _HANDLER_DURING_CHECK, case, str(session)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "done", out


def test_an_append_landing_while_a_touch_writes_the_record_is_not_lost_at_release(
    session: Path
) -> None:
    """A heartbeat thread's `touch()` encodes the record, and an append from another
    thread moves the fence point before that record is written: the record just
    written is behind the session, so the release must write the last fence point
    (not flip the state in place), or the released record reads as a takeover."""
    session.write_text('{"n":0}\n')
    lock = SessionLock(session, "raced")
    lock.acquire()
    encode = lock._encode
    appended: list[bool] = []

    def encode_then_append(state: State = State.HELD) -> bytes:
        data = encode(state)  # the touch's record, with the fence point as it was
        if not appended:
            appended.append(True)
            lock.append({"n": 1})  # another thread's append, in that gap
        return data

    lock._encode = encode_then_append  # type: ignore[method-assign]
    lock.touch()
    del lock._encode
    lock.release()
    assert appended
    status = probe(session)
    assert status.record is not None and status.record.state == "released"
    assert status.fence_ok, status


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_proc  # lists descriptors from /proc/self/fd
def test_an_interrupt_while_the_sidecar_is_checked_leaks_no_descriptor(session: Path) -> None:
    """KeyboardInterrupt (or a signal handler's exception) landing between the
    sidecar's open and its tracking: the descriptor is closed, not leaked (with the
    lock it may carry later, and into forked children)."""
    from conftest import interrupted_on_entry

    from fencelock import _forkguard

    lock = SessionLock(session, "interrupted")
    before = _open_fds()
    with interrupted_on_entry(_forkguard.track) as raised, pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert raised and not lock.held
    assert _open_fds() == before
    with lock:
        pass


def _interrupt_a_contended_acquire(session: Path, spawn_holder: SpawnHolder,
                                   function: Callable[..., Any], **kwargs: Any) -> SessionLock:
    """Interrupt (KeyboardInterrupt, as a signal handler raises) an acquire of
    ``session``, held by another process, as it enters ``function``; the lock object."""
    from conftest import interrupted_on_entry

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    lock = SessionLock(session, "interrupted", **kwargs)
    with interrupted_on_entry(function) as raised, pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert raised and not lock.held
    assert holder.call("release") == "released"
    return lock


@pytest.mark.parametrize("where", [
    "the slot's cleanup is entered", "the descriptor's cleanup is entered",
    "the slot is freed", "the waiter is woken"])
def test_an_interrupt_in_a_failed_acquire_s_cleanup_frees_its_slot(
    session: Path, spawn_holder: SpawnHolder, where: str
) -> None:
    """A fail-fast acquire meets a holder in another process; an interrupt lands in its
    cleanup: as a cleanup (`_cleanup.to_the_end`) is entered, the lock object's (the
    in-process slot) or the store's (the descriptor), or as the slot is freed. The slot
    was left taken: every later acquire of the session in this process was refused as
    held (one that waits for good waited for good); one as the store's cleanup was
    entered left the sidecar's descriptor open."""
    from fencelock import _cleanup, _registry

    if where.endswith("is entered"):
        caller = "_acquire" if where.startswith("the slot's") else "acquire"
        raised: list[bool] = []

        def tracer(frame: Any, event: str, arg: Any) -> None:
            if (not raised and event == "call" and frame.f_code is _cleanup.to_the_end.__code__
                    and frame.f_back.f_code.co_name == caller):
                raised.append(True)
                raise KeyboardInterrupt

        holder = spawn_holder(session, lane="holder")
        holder.acquire()
        lock = SessionLock(session, "interrupted", on_contention="fail")
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                lock.acquire()
        finally:
            sys.settrace(None)
        assert raised and not lock.held
        assert holder.call("release") == "released"
    else:
        step = _registry.free if where == "the slot is freed" else _registry.wake
        lock = _interrupt_a_contended_acquire(session, spawn_holder, step,
                                              on_contention="fail")
    assert lock._key not in _registry._held
    if os.path.isdir("/proc/self/fd"):
        assert fds_naming(f"{session}.holder") == []
    with SessionLock(session, "next", timeout=30):
        pass


def _interrupt_at_opcode(code: Any, offset: int) -> Callable[..., Any]:
    """A tracer that raises KeyboardInterrupt once, before the instruction at
    ``offset`` of ``code`` runs (a signal handler can raise at far fewer points)."""
    fired: list[bool] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and frame.f_lasti == offset and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return tracer

    return tracer


def test_a_cleanup_runs_every_step_whatever_instruction_an_interrupt_lands_at() -> None:
    """`_cleanup.to_the_end` gives back what a failed acquire took (its slot, its
    descriptor): an interrupt landing at any instruction inside its ``try`` (between
    steps too) cuts no step out; the interrupt is raised once every step has run."""
    import dis
    import inspect

    from fencelock import _cleanup

    code = _cleanup.to_the_end.__code__
    lines, first_line = inspect.getsourcelines(_cleanup.to_the_end)
    try_line = first_line + next(i for i, text in enumerate(lines) if text.strip() == "try:")
    offsets = [i.offset for i in dis.get_instructions(code)
               if i.positions is not None and (i.positions.lineno or 0) > try_line]
    assert len(offsets) > 10
    for offset in offsets:
        done: list[str] = []
        sys.settrace(_interrupt_at_opcode(code, offset))
        try:
            with contextlib.suppress(KeyboardInterrupt):
                _cleanup.to_the_end(*(functools.partial(done.append, name)
                                      for name in ("slot", "record", "descriptor")))
        finally:
            sys.settrace(None)
        assert sorted(set(done)) == ["descriptor", "record", "slot"], (offset, done)
        assert done[0] == "slot" and done[-1] == "descriptor", (offset, done)


def test_two_interrupts_in_a_release_leave_the_slot_with_the_owner_it_went_to(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release's cleanup frees the run's in-process slot again after an interrupt cut
    it short. Run again, it freed the slot it had just handed to another thread waiting
    on the same lock object: that thread, no longer in line, was never woken (the
    session free, it waited for good)."""
    from fencelock import _lock, _registry

    lock, other = SessionLock(session, "a"), SessionLock(session, "c")
    lock.acquire()
    key = lock._key
    got: list[str] = []

    def take(which: SessionLock, name: str) -> None:
        with which:
            got.append(name)

    waiters = []
    for which, name in ((lock, "same object"), (other, "other object")):
        waiters.append(threading.Thread(target=take, args=(which, name), daemon=True))
        waiters[-1].start()
        deadline = time.monotonic() + 30
        while len(_registry._lines.get(key, ())) < len(waiters):
            assert time.monotonic() < deadline
            time.sleep(0.001)
    hits: list[str] = []

    def interrupted_once(function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, with an interrupt landing as it is entered the first time."""
        def entered(*args: Any) -> Any:
            if function.__name__ not in hits:
                hits.append(function.__name__)
                raise KeyboardInterrupt
            return function(*args)
        return entered

    # As the run's end begins, then as the cleanup that frees its slot wakes the waiters.
    monkeypatch.setattr(_lock.SessionLock, "_run_ended",
                        interrupted_once(_lock.SessionLock._run_ended))
    monkeypatch.setattr(_registry, "wake", interrupted_once(_registry.wake))
    with pytest.raises(KeyboardInterrupt):
        lock.release()
    assert hits == ["_run_ended", "wake"]
    for waiter in waiters:
        waiter.join(30)
    assert sorted(got) == ["other object", "same object"]


@contextlib.contextmanager
def _interrupted_entering(*functions: Callable[..., Any]) -> Iterator[list[bool]]:
    """KeyboardInterrupt raised as whichever of the Python ``functions`` is entered
    first in this thread, once (as a signal handler raises there); yields a list that
    holds True once it was."""
    codes = {function.__code__ for function in functions}
    raised: list[bool] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes and not raised:
            raised.append(True)
            raise KeyboardInterrupt

    sys.settrace(tracer)
    try:
        yield raised
    finally:
        sys.settrace(None)


@needs_proc  # lists descriptors from /proc/self/fd
def test_an_interrupt_as_a_release_closes_the_sidecar_leaks_no_descriptor(session: Path) -> None:
    """The release has unlocked; an interrupt lands as it closes the descriptor. It was
    left open (and tracked, so forks closed it again): one descriptor per such Ctrl-C."""
    from fencelock import _forkguard

    lock = SessionLock(session, "closing")
    before = dict(_forkguard._open)  # (the worker's other tests leave none held: conftest)
    lock.acquire()
    with _interrupted_entering(_forkguard.close) as raised, pytest.raises(KeyboardInterrupt):
        lock.release()
    assert raised and not lock.held
    assert fds_naming(f"{session}.holder") == [] and _forkguard._open == before
    with SessionLock(session, "next", on_contention="fail"):
        pass


def test_a_failed_acquire_s_close_cut_short_is_run_again(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A fail-fast acquire meets a holder in another process; as its cleanup closes the
    sidecar's descriptor, an interrupt lands. The cleanup ran the close again, but the
    descriptor was forgotten by then: it stayed open (locked, where the acquire had got
    as far as the lock)."""
    from fencelock import _forkguard

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    with _interrupted_entering(_forkguard.close, _forkguard.close_if_still) as raised, \
            pytest.raises(KeyboardInterrupt):
        SessionLock(session, "failing", on_contention="fail").acquire()
    assert raised and fds_naming(f"{session}.holder") == []


def test_an_interrupt_as_a_prompt_window_s_start_is_written_leaves_no_prompt_record(
    session: Path,
) -> None:
    """The window's start wrote the prompt phase; an interrupt lands just after, so the
    window never opens and the run stays in the write phase. The record kept saying
    prompt (where its fingerprint is exact) through the run's next appends."""
    from conftest import interrupted_on_entry

    with SessionLock(session, "model") as lock:
        lock.append({"n": 1})
        with interrupted_on_entry(time.monotonic, at_return=True) as raised, \
                pytest.raises(KeyboardInterrupt), lock.prompt_window():
            pass
        assert raised and lock._phase == "write"
        lock.append({"n": 2})
        assert _sidecar_record(session)["phase"] == "write"
    assert (_sidecar_record(session)["state"], _sidecar_record(session)["phase"]) == (
        "released", "write")


def test_a_record_written_as_a_window_ends_elsewhere_is_written_again(session: Path) -> None:
    """Another thread's record write (a heartbeat) encodes the prompt phase; the window
    ends meanwhile in the holder's thread, whose own write an interrupt cuts off. The
    heartbeat's write counted as saying the write phase: the release then patched the
    record in place, leaving it released in the prompt phase."""
    from fencelock._record import Phase

    lock = SessionLock(session, "model")
    lock.acquire()
    with lock.prompt_window():
        encode = lock._encode

        def encoded_as_the_window_ends(*args: Any) -> bytes:
            data = encode(*args)
            lock._phase, lock._phase_said = Phase.WRITE, False  # the holder's thread
            return data

        lock._encode = encoded_as_the_window_ends  # type: ignore[method-assign,assignment]
        lock.touch()
        lock._encode = encode  # type: ignore[method-assign]
        assert _sidecar_record(session)["phase"] == "prompt"
        lock.release()
    assert (_sidecar_record(session)["state"], _sidecar_record(session)["phase"]) == (
        "released", "write")


def test_a_close_run_again_never_closes_another_open_s_descriptor(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release's close fails after closing (EIO, as NFS may say); meanwhile another
    lock of this process opened its sidecar under the same descriptor number. Running
    the close again (as after an interrupt) closed that one: its session's lock dropped
    while it still held it."""
    import types

    from fencelock import _forkguard

    first, second = SessionLock(session, "first"), SessionLock(session.with_name("b.jsonl"))
    first.acquire()
    failing: list[int] = [first._store._fd]  # type: ignore[attr-defined]

    def close(fd: int) -> None:
        os.close(fd)
        if fd in failing:
            failing.clear()
            raise OSError(errno.EIO, "Input/output error")

    again = _forkguard.close_if_still

    def meanwhile_then_again(fd: int, opened: object) -> None:
        second.acquire()  # another thread's open gets the number just freed
        assert second._store._fd == fd  # type: ignore[attr-defined]
        again(fd, opened)

    monkeypatch.setattr(_forkguard, "os", types.SimpleNamespace(close=close))
    monkeypatch.setattr(_forkguard, "close_if_still", meanwhile_then_again)
    with pytest.raises(OSError):
        first.release()
    monkeypatch.undo()
    assert second.held
    fd = os.open(f"{session.with_name('b.jsonl')}.holder", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # its lock is still there
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    second.release()


def test_an_interrupt_as_a_failed_append_is_taken_back_keeps_the_fence_point(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append's fsync fails (EIO); as its line is cut off again, an interrupt lands.
    The cut moved the session's stat, and the run's fence point stayed before it: the
    run's next append was refused as a takeover by someone else."""
    from conftest import interrupted_on_entry

    from fencelock import _fence

    with SessionLock(session, "failing") as lock:
        lock.append({"n": 1})
        real = _fence._fsync
        calls: list[int] = []

        def fsync_failing_once(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
            real(fd)

        monkeypatch.setattr(_fence, "_fsync", fsync_failing_once)
        with interrupted_on_entry(os.ftruncate, at_return=True) as raised, \
                pytest.raises(KeyboardInterrupt):
            lock.append({"n": 2})
        assert raised
        lock.append({"n": 3})
    assert [json.loads(line)["n"] for line in session.read_bytes().splitlines()] == [1, 3]
    assert fencelock.verify(session).ok and probe(session).fence_ok


def _sidecar_record(session: Path) -> dict[str, Any]:
    """The record in ``session``'s sidecar file as it is on disk (`probe` in the
    holding process gives the holder's own, built from memory)."""
    record: dict[str, Any] = json.loads(Path(f"{session}.holder").read_bytes())
    return record


@pytest.mark.parametrize("then", ["append", "release"])
@pytest.mark.parametrize("where", ["the window ends", "its end is written"])
def test_an_interrupt_as_a_prompt_window_ends_leaves_the_write_phase(
    session: Path, where: str, then: str
) -> None:
    """An interrupt lands as the prompt window ends. The run stayed in the prompt phase
    for the rest of its life: every later window counted as nested and never wrote the
    write phase, and status showed the run in a model call. Or the sidecar's record
    kept saying prompt (where its fingerprint is exact) after the run's next appends,
    or after its release."""
    from conftest import interrupted_on_entry, on_return

    from fencelock import _sidecar

    def interrupt() -> None:
        raise KeyboardInterrupt

    held: Any = SessionLock.held  # a property: its getter is entered
    hook = (interrupted_on_entry(held.fget) if where == "the window ends"
            else on_return(_sidecar.write_bytes, interrupt))
    lock = SessionLock(session, "model")
    with lock:
        lock.append({"n": 1})
        with contextlib.ExitStack() as stack, pytest.raises(KeyboardInterrupt), \
                lock.prompt_window():
            raised = stack.enter_context(hook)  # from here: the window's end
        assert raised and lock._phase == "write"
        if then == "release":
            lock.release()
            assert (_sidecar_record(session)["state"], _sidecar_record(session)["phase"]) \
                == ("released", "write")
            lock.acquire()
        lock.append({"n": 2})
        assert _sidecar_record(session)["phase"] == "write"
        with lock.prompt_window():
            assert _sidecar_record(session)["phase"] == "prompt"
        assert _sidecar_record(session)["phase"] == "write"
    status = probe(session)
    assert status.record is not None and status.record.phase == "write" and status.fence_ok


@needs_proc  # lists descriptors from /proc/self/fd
@pytest.mark.parametrize("where", ["its waiter is made", "its record is taken back"])
def test_an_interrupt_in_a_contended_acquire_leaks_no_descriptor(
    session: Path, spawn_holder: SpawnHolder, where: str
) -> None:
    """A timed acquire meets a holder in another process; an interrupt lands as the
    helper that waits in the kernel is made (the descriptor was between the acquire and
    the helper, owned by neither), or in the cleanup of the failed acquire (which then
    skipped closing it)."""
    from fencelock import _sidecar_holder, _wait

    if where == "its waiter is made":
        _interrupt_a_contended_acquire(session, spawn_holder, _wait.Waiter.__init__,
                                       timeout=5)
    else:
        _interrupt_a_contended_acquire(session, spawn_holder,
                                       _sidecar_holder.SidecarHolder._unwrite_record,
                                       on_contention="fail")
    assert fds_naming(f"{session}.holder") == []
    with SessionLock(session, "next", timeout=30):
        pass


@needs_proc  # lists descriptors from /proc/self/fd
def test_an_interrupt_while_a_session_file_is_checked_leaks_no_descriptor(session: Path) -> None:
    from conftest import interrupted_on_entry

    from fencelock import _sidecar

    session.write_text("{}\n")
    before = _open_fds()
    with interrupted_on_entry(os.fstat) as raised, pytest.raises(KeyboardInterrupt):
        _sidecar.open_regular(str(session), os.O_RDONLY)
    assert raised
    assert _open_fds() == before


@pytest.mark.parametrize(("how", "where"), [
    ("with", "the store's acquire returns"), ("with", "the count is set"),
    ("acquire()", "the store's acquire returns"), ("acquire()", "the count is set"),
    ("acquire()", "the record is built"), ("reentrant acquire()", "the count is set"),
])
def test_an_interrupt_as_an_acquire_returns_gives_the_session_back(
    session: Path, how: str, where: str
) -> None:
    """KeyboardInterrupt (or a signal handler's exception) landing once the session is
    taken but before `acquire()` or ``with`` hands it to the caller: the caller never
    learns it holds it, and ``with`` never runs its exit. What that acquire took is
    given back: the session is free again (or, reentrant, held once, as before)."""
    from conftest import interrupted_on_entry, on_return

    from fencelock._sidecar_holder import SidecarHolder

    def interrupt() -> None:
        raise KeyboardInterrupt

    lock = SessionLock(session, "interrupted")
    if how == "reentrant acquire()":
        lock.acquire()
    makers: dict[str, Callable[[], AbstractContextManager[list[bool]]]] = {
        "the store's acquire returns": lambda: on_return(SidecarHolder.acquire, interrupt),
        "the count is set": lambda: on_return(SessionLock._enter, interrupt),
        "the record is built": lambda: interrupted_on_entry(SessionLock._completed_info),
    }
    with makers[where]() as raised, pytest.raises(KeyboardInterrupt):
        if how == "with":
            with lock:
                pytest.fail("the body ran")
        else:
            lock.acquire()
    assert raised
    if how == "reentrant acquire()":
        assert lock.held and lock._count == 1  # the first acquire's, still held
        lock.release()
    assert not lock.held
    assert probe(session).state == ProbeState.FREE
    with SessionLock(session, "next", on_contention="fail"):
        pass


def test_a_second_interrupt_as_an_interrupted_acquire_gives_the_session_back_frees_it(
    session: Path,
) -> None:
    """An interrupt once the session is taken but before `acquire()` hands it over, and
    a second as the giving back is entered: it was never given back, and the session
    stayed held by an object its caller never learnt of, until the process ended."""
    from conftest import on_return

    lock = SessionLock(session, "interrupted")
    raised: list[str] = []

    def second(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is SessionLock._give_back.__code__ \
                and not raised[1:]:
            raised.append("given back")
            raise KeyboardInterrupt

    def first() -> None:
        raised.append("taken")
        sys.setprofile(second)
        raise KeyboardInterrupt

    try:
        with on_return(SessionLock._enter, first), pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        sys.setprofile(None)
    assert raised == ["taken", "given back"]
    assert not lock.held
    with SessionLock(session, "next", on_contention="fail"):
        pass


@pytest.mark.parametrize("where", ["the in-place flip", "the whole record"])
def test_an_interrupt_as_release_writes_the_record_still_leaves_it_released(
    session: Path, where: str
) -> None:
    """KeyboardInterrupt (or a signal handler's exception) landing as `release()`
    writes "released": the lock is let go all the same, and the record must say so, or
    the session reads as stale (a run that died) while its process lives on, and no
    second `release()` can mend it."""
    from conftest import interrupted_on_entry

    from fencelock import _platform

    lock = SessionLock(session, "interrupted")
    lock.acquire()
    if where == "the whole record":
        lock.append({"n": 1})  # the record lags the append: release writes all of it
        target: Any = SessionLock._encode
    else:
        target = _platform.pwrite  # a held record flipped to "released" in place
    with interrupted_on_entry(target) as raised, pytest.raises(KeyboardInterrupt):
        lock.release()
    assert raised and not lock.held
    status = probe(session)
    assert status.state == ProbeState.FREE, status
    assert status.record is not None and status.record.state == "released"
    if where == "the whole record":
        assert status.fence_ok  # the record's fingerprint is the append's
    with SessionLock(session, "next", on_contention="fail"):
        pass


@pytest.mark.parametrize("gil", [True, False])
def test_a_signal_handler_that_releases_in_the_middle_of_an_append_releases_after_it(
    session: Path, monkeypatch: pytest.MonkeyPatch, gil: bool
) -> None:
    """A handler (SIGTERM, say) of the appending thread calls ``release()`` between the
    append's fence check and its write: the handler cannot wait for the append it
    interrupted, so the release is done as the append ends. Released first, the line
    would land after the release, outside the run, and the released record would not
    carry it (a takeover for the next run to see)."""
    from conftest import on_entry

    from fencelock import _fence, _lock

    monkeypatch.setattr(_lock, "_GIL", gil)  # False: as on a free-threaded build
    session.write_text('{"n":0}\n')
    lock = SessionLock(session, "handler")
    lock.acquire()
    held_during: list[bool] = []

    def handler() -> None:
        lock.release()
        held_during.append(lock.held)

    with on_entry(_fence._write_all, handler) as ran:
        lock.append({"n": 1})
    assert ran and held_during == [True] and not lock.held
    status = probe(session)
    assert status.record is not None and status.record.state == "released"
    assert status.fence_ok, status
    assert status.record.fingerprint is not None
    assert status.record.fingerprint.size == session.stat().st_size
    with SessionLock(session, "next", on_contention="fail"):
        pass


def test_a_signal_handler_that_releases_in_the_middle_of_a_fence_check_releases(
    session: Path
) -> None:
    """The same in the middle of `verify_fence`: the release is done as the check
    ends, never left undone."""
    from conftest import on_entry

    from fencelock import _fence

    session.write_text('{"n":0}\n')
    lock = SessionLock(session, "handler")
    lock.acquire()
    with on_entry(_fence.check, lock.release) as ran:
        lock.verify_fence()
    assert ran and not lock.held
    with SessionLock(session, "next", on_contention="fail"):
        pass


RECORD_WRITE_SIGNALLED = """
import os, signal, sys
from fencelock import FenceLockError, SessionLock, _platform, probe
session, during, act = sys.argv[1:]
lock = SessionLock(session, "handler")
def on_usr1(signum, frame):
    lock.release() if act == "release" else lock.touch()
signal.signal(signal.SIGUSR1, on_usr1)
lock.acquire()
real = _platform.pwrite
def pwrite(fd, data, offset):  # the signal comes in the middle of the record write
    _platform.pwrite = real
    os.kill(os.getpid(), signal.SIGUSR1)
    return real(fd, data, offset)
try:
    if during == "touch":
        _platform.pwrite = pwrite
        lock.touch()
    elif during == "prompt":
        _platform.pwrite = pwrite
        with lock.prompt_window():
            pass
    else:  # an append in the prompt window writes the record
        with lock.prompt_window():
            _platform.pwrite = pwrite
            lock.append({"n": 1})
        if lock.held:
            lock.append({"n": 2})
except FenceLockError as e:
    print("failed:", type(e).__name__, e)
print(lock.held, probe(session).state)
"""
"""``python -c RECORD_WRITE_SIGNALLED SESSION touch|prompt|append release|touch``: a
SIGUSR1 handler that releases (or writes the record: a heartbeat) lands in the middle
of a record write (for ``append``, one an append in the prompt window makes)."""


@pytest.mark.parametrize("during", ["touch", "prompt", "append"])
def test_a_signal_handler_that_releases_in_the_middle_of_a_record_write_releases_after_it(
    session: Path, during: str
) -> None:
    """A handler (SIGTERM's clean shutdown, say) of the thread that is writing the
    record (a heartbeat, a prompt window's begin, an append's record) calls
    ``release()``: the release cannot take the lock object's own mutex, which its
    thread holds (it waited for itself: the process hung with the session held), so it
    is done as the write (or the append) ends. A handler that writes the record itself
    there (a heartbeat on a timer) leaves it to the next write: no wait for its own
    thread, and no error in the write or append it interrupted."""
    done = subprocess.run([sys.executable, "-c", RECORD_WRITE_SIGNALLED, str(session),
                           during, "release"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False free"], done.stdout
    record = probe(session).record
    assert record is not None and record.state == "released"
    with SessionLock(session, "next", on_contention="fail"):
        pass
    done = subprocess.run([sys.executable, "-c", RECORD_WRITE_SIGNALLED, str(session),
                           during, "touch"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True live"], done.stdout  # exited holding it


def test_a_dotdot_after_a_symlinked_directory_names_the_file_the_system_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`link/../s.jsonl` with `link -> real/sub` is `real/s.jsonl` to the system (and to
    the gateway that writes it): the session, its sidecar and its fence are that file's.
    (The path was collapsed as text, to `s.jsonl` beside `link`: another sidecar, which a
    holder that opened the path as given did not contend with.)"""
    import fcntl

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to("real/sub")
    monkeypatch.chdir(tmp_path)
    lock = SessionLock("link/../s.jsonl", lane="dotdot")
    assert lock.session == str(tmp_path / "real" / "s.jsonl")
    with lock:
        lock.append({"n": 1})
        fd = os.open("link/../s.jsonl.holder", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the one fencelock holds
        finally:
            os.close(fd)
    assert (tmp_path / "real" / "s.jsonl").read_text() == '{"n":1}\n'
    assert not (tmp_path / "s.jsonl").exists()
    assert SessionLock(f"{tmp_path}/link/../s.jsonl", lane="x").session == lock.session
    assert SessionLock(f"{tmp_path}/./real//sub/../s.jsonl", lane="x").session == lock.session
    # Through a directory that does not exist the path is left as it is: its open
    # fails as the system's does, rather than naming a file beside it.
    (tmp_path / "real" / "file").write_text("")
    for through in ("missing", "real/file"):  # ENOENT, ENOTDIR
        lost = SessionLock(f"{tmp_path}/{through}/../lost.jsonl", lane="x")
        assert lost.session == f"{tmp_path}/{through}/../lost.jsonl"
        with pytest.raises(FenceLockError):
            lost.acquire()
    assert not (tmp_path / "lost.jsonl.holder").exists()
    assert not (tmp_path / "real" / "lost.jsonl.holder").exists()


def test_a_probe_is_not_fooled_by_the_holder_s_own_append_in_the_prompt_window(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe reads the record, then takes the session's fingerprint: the holder's own
    append in the prompt window may land in between (its record follows the line at
    once). The record read again says so: no false "moved"."""
    from fencelock import _fingerprint

    holder = spawn_holder(session, lane="in-the-window")
    holder.acquire()
    assert holder.call('append {"n": 0}') == "ok"
    assert holder.call("prompt") == "ok"
    take = _fingerprint.take
    appended: list[str] = []

    def holder_appends_first(*args: Any) -> Any:
        if not appended:
            appended.append(holder.call('append {"n": 1}'))
        return take(*args)

    monkeypatch.setattr(_fingerprint, "take", holder_appends_first)
    status = probe(session)
    assert appended == ["ok"]
    assert status.state == ProbeState.LIVE and status.fence_ok is True, status


def test_a_probe_still_reads_a_write_in_the_prompt_window_as_moved(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The record read again is the same when someone else wrote: still "moved"."""
    holder = spawn_holder(session, lane="in-the-window")
    holder.acquire()
    assert holder.call('append {"n": 0}') == "ok"
    assert holder.call("prompt") == "ok"
    with session.open("a") as f:
        f.write('{"role": "intruder"}\n')
    status = probe(session)
    assert status.state == ProbeState.LIVE and status.fence_ok is False, status


APPENDED_INSIDE_AN_APPEND = """
import sys
from fencelock import FenceLockError, SessionLock, _fence
lock = SessionLock(sys.argv[1], "handler")
lock.acquire()
said = []
def handler(frame, event, arg):  # where a signal handler of this thread would run
    if event == "call" and frame.f_code is _fence._write_all.__code__ and not said:
        said.append("ran")
        try:
            lock.append({"n": "from the handler"})
        except FenceLockError as e:
            said.append(str(e))
sys.settrace(handler)
lock.append({"n": 1})
sys.settrace(None)
lock.release()
print(said[1] if len(said) > 1 else said)
"""


def test_an_append_by_a_signal_handler_in_the_middle_of_its_threads_append_is_refused(
    session: Path,
) -> None:
    """A handler that appends while its thread is appending: it cannot wait for the
    append it interrupted (its thread waited for itself, for good): refused, nothing
    written, and the interrupted append goes on."""
    done = subprocess.run([sys.executable, "-c", APPENDED_INSIDE_AN_APPEND, str(session)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "an append of this thread is under way" in done.stdout, done.stdout
    assert [json.loads(x) for x in session.read_text().splitlines()] == [{"n": 1}]
