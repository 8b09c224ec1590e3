"""One SessionLock, two stores: every test body here runs on the sidecar store and on
etcd (the `store` fixture), with real processes where it says so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import marks
import pytest
from conftest import (
    KILLED_ON_NAMING,
    SpawnHolder,
    hammer,
    interrupted_on_entry,
    record_of,
    wait_for_no_owner,
)
from privdrop import mount_overlay, mount_tmpfs, umount

from fencelock import (
    Action,
    ProbeState,
    SessionContendedError,
    SessionLock,
    SessionTakeoverError,
    SidecarAccessError,
    clear,
    probe,
    recover,
    scan,
    verify,
)

pytestmark = pytest.mark.usefixtures("store")


def test_fail_and_timeout_across_processes_name_the_live_holder(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="cron")
    h.acquire()
    with pytest.raises(SessionContendedError) as err:
        SessionLock(session, on_contention="fail").acquire()
    assert err.value.holder is not None
    assert (err.value.holder.pid, err.value.holder.lane) == (h.pid, "cron")
    with pytest.raises(SessionContendedError) as timed:
        SessionLock(session, timeout=0.2).acquire()
    assert timed.value.holder is not None and timed.value.holder.pid == h.pid
    assert err.value.waited is None  # a fail-fast refusal waited for nothing
    assert timed.value.waited is not None and timed.value.waited >= 0.2
    assert probe(session).state == ProbeState.LIVE


def test_waiter_in_another_process_gets_the_session_on_release(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    first = SessionLock(session, "first")
    token = first.acquire().token
    waiter = spawn_holder(session, lane="second")
    waiter.send("acquire")  # blocks until we release
    first.release()
    reply = waiter.read()
    assert reply.startswith("acquired")
    assert int(reply.split()[1]) > token


def test_reentrant_object_and_contending_second_object(session: Path) -> None:
    lock = SessionLock(session, "a")
    with lock:
        with lock:
            assert lock.held
        assert lock.held
        with pytest.raises(SessionContendedError):
            SessionLock(session, "b", on_contention="fail").acquire()
    assert not lock.held
    assert probe(session).state == ProbeState.FREE


def test_another_thread_waits_until_release(session: Path) -> None:
    order: list[str] = []
    lock = SessionLock(session, "a")
    lock.acquire()
    started = threading.Event()

    def other() -> None:
        started.set()
        with SessionLock(session, "b"):
            order.append("b")

    t = threading.Thread(target=other)
    t.start()
    started.wait()
    order.append("a")
    lock.release()
    t.join(60)
    assert order == ["a", "b"]


def test_async_tasks_contend_and_a_cancelled_waiter_leaves_nothing(session: Path) -> None:
    async def main() -> None:
        async with SessionLock(session, "a") as a:
            other = asyncio.create_task(SessionLock(session, "b").acquire_async())
            await asyncio.sleep(0)  # let it start waiting
            assert not other.done()
            other.cancel()
            with pytest.raises(asyncio.CancelledError):
                await other
            assert a.held
        async with SessionLock(session, "c", timeout=60) as c:
            assert c.held

    asyncio.run(main())
    assert probe(session).state == ProbeState.FREE


def test_append_prompt_window_and_fence(session: Path) -> None:
    with SessionLock(session, "a", stamp=True) as lock:
        lock.append({"role": "user", "content": "hi"})
        with lock.prompt_window():
            assert record_of(session).phase == "prompt"
        lock.append({"role": "assistant", "content": "hello"})
        with pytest.raises(SessionTakeoverError), lock.prompt_window(), open(session, "a") as f:
            f.write('{"role": "intruder"}\n')  # a writer outside the run
    lines = [json.loads(x) for x in session.read_text().splitlines()]
    assert [x["role"] for x in lines] == ["user", "assistant", "intruder"]
    assert verify(session).ok


def test_a_release_inside_the_prompt_window_ends_the_window_too(session: Path) -> None:
    lock = SessionLock(session, "a")
    lock.acquire()
    lock.append({"role": "user"})
    with lock.prompt_window():
        lock.release()
        assert record_of(session).phase == "write"  # a released record has no window
        with SessionLock(session, "b") as next_run:
            next_run.append({"role": "next run"})
    # The window's end found the next run's line: not a takeover of a run that was over.
    assert [json.loads(x)["role"] for x in session.read_text().splitlines()] == [
        "user", "next run"]
    assert record_of(session).state == "released"


def test_a_nested_prompt_window_leaves_the_outer_one_open(session: Path) -> None:
    with SessionLock(session, "a") as lock:
        with lock.prompt_window():
            with lock.prompt_window():
                pass
            assert record_of(session).phase == "prompt"  # the outer window is still open
        assert record_of(session).phase == "write"


def test_tokens_grow_with_every_acquisition(session: Path) -> None:
    tokens = []
    for _ in range(3):
        with SessionLock(session, "a") as lock:
            assert lock.info is not None
            tokens.append(lock.info.token)
    assert tokens == sorted(set(tokens))


def test_killed_holder_is_stale_then_taken_over_with_previous(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="heartbeat")
    token = h.acquire()
    assert probe(session).state == ProbeState.LIVE
    h.kill(signal.SIGKILL)
    # (etcd: live until the lease expires) the dead pid holds nothing: not named
    meanwhile = probe(session)
    assert meanwhile.held_by is None
    if meanwhile.state == ProbeState.LIVE:
        assert meanwhile.reason.endswith("is gone; the store keeps the lock until its "
                                         "lease expires"), meanwhile.reason
    wait_for_no_owner(session)
    status = probe(session)
    assert status.state == ProbeState.STALE
    assert status.record is not None and status.record.pid == h.pid
    assert [s.state for s in scan(session.parent)] == [ProbeState.STALE]
    with SessionLock(session, lane="channel") as lock:
        info = lock.info
        assert info is not None and info.token > token
        assert info.previous is not None
        assert (info.previous.pid, info.previous.token, info.previous.lane) == (
            h.pid, token, "heartbeat")


def test_clear_refuses_live_and_clears_stale(session: Path, spawn_holder: SpawnHolder) -> None:
    """Also: both stores say alike what `clear` did (etcd said "released" for a free
    session, where sidecars say "was free")."""
    h = spawn_holder(session, lane="x")
    h.acquire()
    with pytest.raises(SessionContendedError):
        clear(session)
    h.kill(signal.SIGKILL)
    wait_for_no_owner(session)
    assert probe(session).state == ProbeState.STALE
    done = clear(session)
    assert done.reason.startswith(f"cleared the stale record of pid {h.pid} (lane 'x')"), done
    assert probe(session).state == ProbeState.FREE
    assert clear(session).reason == "was free"
    with SessionLock(session, "y") as lock:
        assert lock.info is not None and lock.info.previous is None
    done = clear(session, remove=True)
    assert done.reason.startswith("was free; ") and done.reason.endswith(" removed"), done


def test_recover_refires_a_stale_session_and_escalates_past_a_live_one(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    h.call('append {"role": "user", "content": "q"}')
    fresh = recover(session, wait=0.1)
    assert fresh.action == Action.FRESH and fresh.session != str(session)
    assert probe(fresh.session).state == ProbeState.FREE
    h.kill(signal.SIGKILL)
    wait_for_no_owner(session)
    # That run's conversation went on in the fresh session: a late recover answers it.
    again = recover(session, wait=0.1)
    assert again.action == Action.FRESH and again.session == fresh.session
    # The fresh session dropped, the old one is used again; a run of it that dies with
    # no recover made for it: its stale session is re-fired.
    os.unlink(fresh.session)
    other = spawn_holder(session, lane="died")
    other.acquire()
    other.kill(signal.SIGKILL)
    wait_for_no_owner(session)
    assert probe(session).state == ProbeState.STALE
    last = recover(session, wait=0.1)
    assert last.action == Action.REFIRE and last.session == str(session)
    assert probe(session).state == ProbeState.FREE


@pytest.mark.parametrize("patience", [None, 0.03], ids=["waiting", "giving-up"])
def test_processes_hammering_one_session_never_overlap(
    session: Path, tmp_path: Path, patience: float | None
) -> None:
    """With ``patience``, some waits run out and leave the queue mid-way: a waiter
    behind one that gave up must still wait for the holder, not take over."""
    log, counter = tmp_path / "log", tmp_path / "counter"
    workers, turns = 4, 25
    # Impatient workers hold for a while, so others queue (and give up) behind them.
    extra = [] if patience is None else [str(patience), "0.01"]
    lines = hammer(session, log, counter, workers, turns,
                   args=lambda i: extra if i % 2 else ["-", "0.01"] if extra else [])
    held = len(lines) // 2
    assert (held == workers * turns) if patience is None else (held >= workers // 2 * turns)
    assert counter.read_text() == str(held)
    assert probe(session).state == ProbeState.FREE


def test_hold_coprocess_turn_and_a_second_hold_is_refused(
    session: Path, store: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_hold import Hold

    backend = store or "local"
    monkeypatch.delenv("FENCELOCK_BACKEND", raising=False)  # only --backend names it
    h = Hold(session, "--backend", backend, lane="node:main")
    try:
        held = h.held()["record"]
        assert held["state"] == "held" and held["lane"] == "node:main"
        assert probe(session, backend=backend).state == ProbeState.LIVE
        sidecar = probe(session, backend="local").state  # where the holder is, not only is
        assert sidecar == (ProbeState.FREE if store else ProbeState.LIVE)
        assert h.call("append", entry={"role": "user", "content": "hi"})["ok"]
        assert h.call("prompt_begin")["ok"]
        status = probe(session, backend=backend)
        assert status.record is not None and status.record.phase == "prompt"
        assert h.call("prompt_end")["ok"]
        second = Hold(session, "--no-wait", "--backend", backend, lane="second")
        try:
            answer = second.read()
            assert answer["ok"] is False and answer["error"] == "SessionContendedError"
            assert answer["holder"]["lane"] == "node:main"
            assert second.proc.wait(timeout=60) == 4
        finally:
            second.kill()
        assert h.call("release")["ok"]
        assert h.proc.wait(timeout=60) == 0
    finally:
        h.kill()
    assert [json.loads(x) for x in session.read_text().splitlines()] == [
        {"role": "user", "content": "hi"}
    ]
    status = probe(session, backend=backend)
    assert status.state == ProbeState.FREE and status.record is not None
    assert status.record.state == "released"


@pytest.mark.parametrize("before", ["none", "released"])
def test_an_acquire_cancelled_as_it_gets_the_session_leaves_the_record_as_it_was(
    session: Path, before: str
) -> None:
    """The caller gave up (its cancellation event is set) just as the store gave the
    session to it: the acquire takes its record back, so the session reads as before,
    not as stale (a run that never ran did not die mid-run)."""
    if before == "released":
        with SessionLock(session, "earlier"):
            pass
    was = probe(session)
    lock = SessionLock(session, "cancelled")
    gave_up = threading.Event()
    gave_up.set()  # set before the store's lock is taken: the check after it sees it
    with pytest.raises(asyncio.CancelledError):
        lock._acquire(threading.get_ident(), None, gave_up)
    assert not lock.held
    now = probe(session)
    assert now.state == ProbeState.FREE, now
    assert (now.record is None) == (was.record is None), now
    if was.record is not None and now.record is not None:
        assert (now.record.lane, now.record.state, now.record.token) == (
            "earlier", "released", was.record.token)
    with SessionLock(session, "next", on_contention="fail") as after:
        assert after.info is not None and after.info.previous is None


def test_a_session_whose_name_is_not_utf8_is_held_probed_and_scanned(session: Path) -> None:
    import os

    odd = session.with_name(os.fsdecode(b"caf\xe9-4f1c.jsonl"))  # Latin-1, as files come
    with SessionLock(odd, "odd") as lock:
        lock.append({"n": 1})
        assert probe(odd).state == ProbeState.LIVE
        rows = [(s.session, s.state) for s in scan(odd.parent)]
        assert rows == [(str(odd), ProbeState.LIVE)], rows
    assert probe(odd).state == ProbeState.FREE
    assert [s.session for s in scan(odd.parent)] == [str(odd)]


def test_a_release_as_an_append_ends_leaves_the_record_released(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that lands while an append finishes, in the appending thread itself (a
    signal handler's; one from another thread waits for the append): the append's
    record update then finds the run released and writes nothing. It raised
    NotHeldError, as if the line (which is in) had not been appended."""
    import warnings

    from fencelock import _fence, _sidecar_holder

    monkeypatch.setattr(_sidecar_holder, "RECORD_LAG", 0.0)  # every append writes it
    lock = SessionLock(session, "a")
    real = _fence.append

    def append_then_released(*args: Any, **kw: Any) -> Any:
        done = real(*args, **kw)  # the line is in; the record update comes next
        lock.release()
        return done

    lock.acquire()
    monkeypatch.setattr(_fence, "append", append_then_released)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lock.append({"n": 1})
    assert not lock.held
    status = probe(session)
    assert status.state == "free" and status.record is not None
    assert status.record.state == "released", status
    assert [json.loads(x) for x in session.read_text().splitlines()] == [{"n": 1}]


def _release_interrupted_at(lock: SessionLock, function: Any) -> None:
    with interrupted_on_entry(function) as raised, pytest.raises(KeyboardInterrupt):
        lock.release()
    assert raised  # the interrupt landed where the test says


def test_an_interrupt_as_the_store_s_release_begins_still_lets_the_session_go(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """KeyboardInterrupt (or a signal handler's exception) landing as the store's
    release is entered, before it let go: the release must let go all the same, or
    the session stays taken by an object that no longer holds it until the process
    exits."""
    lock = SessionLock(session, "interrupted")
    lock.acquire()
    _release_interrupted_at(lock, type(lock._store).release)
    assert not lock.held
    other = spawn_holder(session, lane="next", on_contention="fail")
    other.acquire()


def test_an_interrupt_as_the_run_ends_still_frees_its_slot_in_the_process(
    session: Path
) -> None:
    """The same at the end of the release, where the run's slot in this process is
    freed: left taken, no object of this process could take the session again."""
    lock = SessionLock(session, "interrupted")
    lock.acquire()
    _release_interrupted_at(lock, SessionLock._run_ended)
    with SessionLock(session, "again", on_contention="fail") as again:
        assert again.held


@pytest.mark.parametrize("options", ["", "metacopy=on"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_session_file_an_image_shipped_takes_appends_on_overlayfs(
    tmp_path: Path, options: str, marked: bool
) -> None:
    """A session file only in an overlayfs lower layer (a container image shipped it)
    is copied up by the first open for writing, which moves its ctime (with
    ``metacopy=on`` its mtime too). The acquire copies it up before it takes the fence
    point: the first append was refused as a takeover, the run's reply undelivered.
    ``marked``: the image holds the sidecar and the token mark (fencelock ran at build
    time), so the acquire does not set the mark, which copies the file up (without
    ``metacopy``) as a side effect."""
    marks.require("linux", "root", "mount")
    base = tmp_path / "base"
    base.mkdir()
    why = mount_tmpfs(base, "8m")
    if why:
        marks.unavailable("mount", why, fix="run the suite where root may mount")
    try:
        lower = base / "lower"
        lower.mkdir()
        with SessionLock(lower / "s.jsonl", lane="image") as lock:  # the image's layer
            lock.append({"n": 0})
        if not marked:
            (lower / "s.jsonl.holder").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                os.removexattr(lower / "s.jsonl", "user.fencelock.token")
        made = mount_overlay(base, options)
        if isinstance(made, str):
            marks.unavailable("mount", made, fix="a kernel with overlayfs (and metacopy)")
        merged = made[1]
        session = merged / "s.jsonl"
        try:
            with SessionLock(session, lane="container") as lock:
                lock.append({"n": 1})
                lock.append({"n": 2})
            assert [json.loads(line)["n"] for line in session.read_bytes().splitlines()] == [
                0, 1, 2]
            assert verify(session).ok
            assert (lower / "s.jsonl").read_bytes().count(b"\n") == 1  # the layer as shipped
        finally:
            umount(merged)
    finally:
        umount(base)


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_a_session_in_no_directory_is_refused_alike(tmp_path: Path, store: str | None,
                                                    where: str) -> None:
    """One rule in both stores for a session whose directory is missing or is a file:
    `SidecarAccessError` saying what to do from acquire, recover, clear and verify,
    `unreadable` from probe, and nothing made (a store's probe, clear and recover said
    free, free and re-fire, and its acquire raised a plain `FenceLockError`)."""
    if where == "missing":
        session, said = tmp_path / "nowhere" / "deeper" / "s.jsonl", "does not exist"
    else:
        (tmp_path / "nowhere").write_text("")
        session, said = tmp_path / "nowhere" / "s.jsonl", "is not a directory"
    with pytest.raises(SidecarAccessError) as exc:
        SessionLock(session, "a").acquire()
    assert str(session) in str(exc.value) and said in str(exc.value)
    status = probe(session)
    assert status.state == "unreadable" and str(session) in status.reason
    # Each says what to do about it, where the library reads as where it writes.
    assert status.reason.endswith(f"{said}; check the path"), status.reason
    assert (status.sidecar == f"{session}.holder") == (store is None)  # else its key
    for call in (lambda: recover(session, wait=0), lambda: verify(session),
                 lambda: clear(session)):  # (clear: nothing is cleared by making it)
        with pytest.raises(SidecarAccessError, match=f"{said}; check the path"):
            call()
    if where == "missing":
        assert not (tmp_path / "nowhere").exists()
    else:
        assert (tmp_path / "nowhere").read_text() == ""


def test_a_recover_waiting_for_a_fresh_session_a_run_took_at_once_answers_it(
    session: Path, store: str | None, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recover killed just after naming the fresh session leaves its lock to a run of
    that session at once: on etcd its lock stays until its lease runs out and then goes
    straight to the run queued behind it; with sidecars a run that comes first takes it
    as the recover dies. A recover waiting for that copy never sees the lock free. It
    looks whether the session is named as it waits, and answers it (it waited until the
    run let go, up to 5 minutes)."""
    from fencelock import _recovery, _successors

    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    stuck = probe(session).record
    assert stuck is not None
    successor = _successors.of_run(str(session), stuck.run_id, stuck.token)
    killed = subprocess.run([sys.executable, "-c", KILLED_ON_NAMING, str(session)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL and os.path.exists(successor), killed.stderr
    h.call("release")
    later = spawn_holder(Path(successor), lane="next")
    later.send("acquire")  # etcd: queued behind the killed recover's lease
    if store is None:
        later.read()  # the sidecar's lock went with the recover: the run holds it now
    published = _recovery._published
    looks: list[str] = []

    def not_yet_at_first(fresh: str, old: str) -> bool:  # as if named just after
        looks.append(fresh)
        return len(looks) > 1 and published(fresh, old)

    monkeypatch.setattr(_recovery, "_published", not_yet_at_first)
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(recover(session, wait=0)), daemon=True)
    waiter.start()
    waiter.join(60)  # (the run of the fresh session holds it until the end of the test)
    assert not waiter.is_alive(), "still waiting for the lock of a session already named"
    assert (answers[0].action, answers[0].session) == (Action.FRESH, successor)
    if store is not None:
        later.read()  # its acquire's answer
    later.call("release")
