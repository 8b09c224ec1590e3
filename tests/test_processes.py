"""SessionLock across real processes: exclusion, crashes, takeover, hand-off, races."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import marks
import pytest
from conftest import SpawnHolder, hammer, record_of, wait_for_blocked_waiter
from marks import needs_proc_locks

from fencelock import (
    HolderInfo,
    ProbeState,
    SessionContendedError,
    SessionLock,
    State,
    clear,
    probe,
)
from fencelock._identity import ME
from fencelock._sidecar_holder import HAND_OVER_AFTER

HERE = Path(__file__).parent


def test_processes_hammering_one_session_never_overlap(session: Path, tmp_path: Path) -> None:
    log, counter = tmp_path / "log", tmp_path / "counter"
    workers, turns = 4, 150
    lines = hammer(session, log, counter, workers, turns)
    assert len(lines) == 2 * workers * turns
    assert counter.read_text() == str(workers * turns)
    final = probe(session)
    assert final.state == ProbeState.FREE and final.token == workers * turns


def test_killed_holder_is_stale_then_taken_over_with_previous(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="session:agent:main:heartbeat")
    token = h.acquire()
    assert probe(session).state == ProbeState.LIVE
    h.kill(signal.SIGKILL)
    status = probe(session)
    assert status.state == ProbeState.STALE
    assert status.owner_alive is False and status.record is not None
    assert status.record.pid == h.pid and "died" in status.reason
    with SessionLock(session, lane="channel") as lock:
        info = lock.info
        assert info is not None and info.token == token + 1
        assert info.previous is not None
        assert (info.previous.pid, info.previous.token) == (h.pid, token)
        assert info.previous.lane == "session:agent:main:heartbeat"


def test_waiter_in_another_process_gets_the_lock_on_release(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    with SessionLock(session, lane="first"):
        waiter = spawn_holder(session, lane="second")
        waiter.send("acquire")
        wait_for_blocked_waiter(session)
        assert record_of(session).lane == "first"
    assert waiter.read() == "acquired 2"
    assert record_of(session).lane == "second"


def test_a_release_after_a_long_hold_lets_a_waiter_on_its_cpu_have_the_lock_first(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Linux may wake a blocked waiter on the releaser's own CPU, and leave it there
    until the releaser blocks or its time slice ends. A release that ends a hold of
    `HAND_OVER_AFTER` or more yields the CPU right after unlocking, so the waiter has
    taken the lock and answered before release() returns. Both processes run on one
    CPU under SCHED_FIFO at one priority, which makes the order certain either way (and
    keeps other processes out): a woken task of equal priority never preempts the
    running one, and sched_yield(2) puts the caller behind it."""
    marks.require("linux", "root")  # root: real-time scheduling
    mine = os.sched_getaffinity(0)
    cpu, fifo = {min(mine)}, os.sched_param(1)
    os.sched_setaffinity(0, cpu)
    try:
        lock = SessionLock(session, lane="first")
        acquired_at = lock.acquire().acquired_at
        waiter = spawn_holder(session, lane="second")
        os.sched_setaffinity(waiter.pid, cpu)
        os.sched_setscheduler(waiter.pid, os.SCHED_FIFO, fifo)
        assert waiter.proc.stdout is not None
        answers = waiter.proc.stdout.fileno()
        waiter.send("acquire")
        wait_for_blocked_waiter(session, proc=waiter.proc)
        assert time.time() - acquired_at >= HAND_OVER_AFTER  # starting it took longer
        os.sched_setscheduler(0, os.SCHED_FIFO, fifo)
        try:
            lock.release()
            answered = select.select([answers], [], [], 0)[0]
        finally:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    finally:
        os.sched_setaffinity(0, mine)
    assert answered, "the waiter had not taken the lock when release() returned"
    assert waiter.read() == "acquired 2"


def test_clear_never_touches_a_live_holder(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="direct")
    h.acquire()
    before = Path(str(session) + ".holder").read_bytes()
    with pytest.raises(SessionContendedError):
        clear(session)
    with pytest.raises(SessionContendedError):
        clear(session, remove=True)
    assert Path(str(session) + ".holder").read_bytes() == before


@pytest.mark.parametrize(("call", "owner"), [
    ("clear", "dead"), ("recover", "dead"), ("clear", "alive, not holding"),
])
def test_a_probe_s_moment_does_not_make_a_stale_session_look_live(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, call: str, owner: str
) -> None:
    """A probe holds a shared test lock for a moment; clear() and recover() must wait
    that moment out on a stale record instead of calling it a live holder, even when
    the record's owner process still runs: the lock decides, not the PID."""
    import threading

    from fencelock import _sidecar_holder, recover

    if owner == "dead":
        dead = spawn_holder(session, lane="dead")
        dead.acquire()
        dead.kill()
    else:  # this process, which no longer holds the lock
        with SessionLock(session, lane="gone"):
            pass
        sidecar = Path(str(session) + ".holder")
        obj, _ = json.JSONDecoder().raw_decode(sidecar.read_text())
        obj.update(state="held")
        sidecar.write_text(json.dumps(obj))
    code = (
        "import fcntl, sys\n"
        "f = open(sys.argv[1], 'rb')\n"
        "fcntl.flock(f, fcntl.LOCK_SH)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    prober = subprocess.Popen([sys.executable, "-c", code, str(session) + ".holder"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert prober.stdout is not None and prober.stdin is not None
    assert prober.stdout.readline() == "locked\n"
    monkeypatch.setattr(_sidecar_holder, "FAIL_GRACE", 60.0)  # timing cannot decide this test
    polling = threading.Event()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        polling.set()
        real_sleep(seconds)

    # The first sleep is clear's grace poll (the look again of a contention error at a
    # record that names no live run, `_sidecar_holder.contended`, sleeps only after it)
    monkeypatch.setattr(time, "sleep", sleep)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(clear(session).state if call == "clear" else
                           recover(session, wait=0).action)
        except BaseException as e:
            outcome.append(e)
        finally:
            polling.set()  # finished without waiting: nothing more to wait for

    t = threading.Thread(target=run)
    t.start()
    try:
        assert polling.wait(60), "clear neither waited nor finished"
    finally:
        prober.stdin.write("go\n")
        prober.stdin.close()
        prober.wait()
        prober.stdout.close()
        t.join(60)
    assert outcome == [ProbeState.STALE if call == "clear" else "refire"]
    assert probe(session).state == ProbeState.FREE


EX_LOCKER = (
    "import fcntl, sys\n"
    "f = open(sys.argv[1], 'rb')\n"
    "fcntl.flock(f, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
)


@needs_proc_locks
@pytest.mark.parametrize("owner", ["dead", "alive"])
@pytest.mark.parametrize("call", ["acquire", "try", "clear"])
def test_fail_fast_grace_only_when_the_record_s_owner_is_gone(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, owner: str, call: str
) -> None:
    """The lock is taken but its record is a `held` one: if the record's owner is dead,
    the lock's taker is an acquirer about to replace that stale record, and a fail-fast
    acquirer (or a try, ``timeout=0``, or clear) gives it the grace and gets the session
    once it lets go; if the owner lives, that is a live holder: contended at once,
    naming it."""
    import threading

    from fencelock import _sidecar_holder

    if owner == "dead":
        dead = spawn_holder(session, lane="dead")
        token = dead.acquire()
        dead.kill()
        named = dead.pid
    else:  # this process, which no longer holds the lock but is alive
        with SessionLock(session, lane="gone") as gone:
            assert gone.info is not None
            token = gone.info.token
        sidecar = Path(str(session) + ".holder")
        obj, _ = json.JSONDecoder().raw_decode(sidecar.read_text())
        obj.update(state="held")
        sidecar.write_text(json.dumps(obj))
        named = ME.pid
    assert probe(session).state == ProbeState.STALE
    locker = subprocess.Popen([sys.executable, "-c", EX_LOCKER, str(session) + ".holder"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdin is not None
    assert locker.stdout.readline() == "locked\n"
    monkeypatch.setattr(_sidecar_holder, "FAIL_GRACE", 60.0)  # timing cannot decide this test
    outcome: list[object] = []
    done = threading.Event()
    polling = threading.Event()
    if call == "clear":  # clear polls through its grace instead of blocking
        real_sleep = time.sleep

        def sleep(seconds: float) -> None:
            polling.set()
            real_sleep(seconds)

        monkeypatch.setattr(time, "sleep", sleep)

    def acquire() -> None:
        lock = SessionLock(session, lane="fail-fast", on_contention="fail")
        try:
            if call == "clear":
                outcome.append(clear(session))
            elif call == "try":
                lock = SessionLock(session, lane="try")
                outcome.append(lock.acquire(timeout=0))
                lock.release()
            else:
                outcome.append(lock.acquire())
                lock.release()
        except BaseException as e:
            outcome.append(e)
        finally:
            done.set()
            polling.set()

    t = threading.Thread(target=acquire)
    t.start()
    try:
        if call == "clear":
            assert polling.wait(60)
            waited = not done.is_set()
        else:
            waited = wait_for_blocked_waiter(session, unless=done)
    finally:
        locker.stdin.close()  # the stand-in acquirer lets go
        locker.wait()
        locker.stdout.close()
        t.join(60)
    if owner == "dead":
        assert waited, f"gave up at once on a dead owner's record: {outcome}"
        (info,) = outcome
        if call == "clear":
            assert getattr(info, "state", None) == ProbeState.STALE
            assert probe(session).state == ProbeState.FREE
        else:
            assert isinstance(info, HolderInfo) and info.token == token + 1
            assert info.previous is not None and info.previous.pid == named
    else:
        assert not waited, "waited out a grace for a record whose owner lives"
        (err,) = outcome
        assert isinstance(err, SessionContendedError)
        assert err.holder is not None and err.holder.pid == named


def test_clear_then_token_continues(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session)
    token = h.acquire()
    h.kill()
    found = clear(session)
    assert found.state == ProbeState.STALE and "cleared" in found.reason
    after = probe(session)
    assert after.state == ProbeState.FREE and after.record is not None
    assert after.record.state is State.RELEASED
    with SessionLock(session) as last:
        assert last.info is not None and last.info.token == token + 1


def test_stale_record_from_another_host_is_not_said_to_have_died(session: Path) -> None:
    with SessionLock(session):
        pass
    sidecar = Path(str(session) + ".holder")
    obj, _ = json.JSONDecoder().raw_decode(sidecar.read_text())
    obj.update(state="held", host="elsewhere.example", pid=4242)
    sidecar.write_text(json.dumps(obj))
    status = probe(session)
    assert status.state == ProbeState.STALE and status.owner_alive is None
    assert "died" not in status.reason and "cannot be checked" in status.reason


def test_record_naming_a_reused_pid_is_stale(session: Path) -> None:
    # A crashed holder's record whose pid now belongs to an unrelated live process.
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE)
    try:
        with SessionLock(session):
            pass
        sidecar = Path(str(session) + ".holder")
        obj, _ = json.JSONDecoder().raw_decode(sidecar.read_text())
        _, boot, ns = ME.start.split("@")
        obj.update(state="held", pid=bystander.pid, process_start=f"1@{boot}@{ns}")
        sidecar.write_text(json.dumps(obj))
        status = probe(session)
        assert status.state == ProbeState.STALE and status.owner_alive is False
        assert bystander.poll() is None  # nothing signalled it
    finally:
        assert bystander.stdin is not None
        bystander.stdin.close()
        bystander.wait()


def test_zombie_owner_is_stale(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="heartbeat")
    h.acquire()
    h.send("exit")  # leaves without releasing; the test does not reap it yet
    os.waitid(os.P_PID, h.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie
    status = probe(session)
    assert status.state == ProbeState.STALE and status.owner_alive is False


def test_sidecar_removed_and_recreated_while_waiting(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The unlink-and-recreate race: a waiter that wakes on a deleted inode retries."""
    sidecar = Path(str(session) + ".holder")
    first = SessionLock(session, lane="first")
    first.acquire()
    old_inode = sidecar.stat().st_ino
    waiter = spawn_holder(session, lane="waiter")
    waiter.send("acquire")
    wait_for_blocked_waiter(session, old_inode)
    os.unlink(sidecar)  # as `clear --remove` does, under the lock
    newcomer = spawn_holder(session, lane="newcomer")
    new_token = newcomer.acquire()  # creates and locks a new sidecar
    new_inode = sidecar.stat().st_ino
    assert new_inode != old_inode
    first.release()  # the waiter wakes holding the deleted inode
    wait_for_blocked_waiter(session, new_inode)  # ...notices, and waits on the new one
    assert record_of(session).lane == "newcomer"
    assert newcomer.call("release") == "released"
    assert waiter.read() == f"acquired {new_token + 1}"


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_waiting_until_free_follows_a_sidecar_made_anew(
    session: Path, spawn_holder: SpawnHolder, timeout: float | None
) -> None:
    """wait/recover wait on a shared lock: waking on a removed inode is not "free" while
    a new sidecar at the path is held."""
    import threading

    from fencelock import _wait

    sidecar = Path(str(session) + ".holder")
    first = spawn_holder(session, lane="first")
    first.acquire()
    old_inode = sidecar.stat().st_ino
    result: list[bool] = []
    waiting = threading.Thread(
        target=lambda: result.append(_wait.wait_until_unlocked(str(sidecar), timeout))
    )
    waiting.start()
    wait_for_blocked_waiter(session, old_inode)
    os.unlink(sidecar)
    newcomer = spawn_holder(session, lane="newcomer")
    newcomer.acquire()
    new_inode = sidecar.stat().st_ino
    assert first.call("release") == "released"
    wait_for_blocked_waiter(session, new_inode)  # it moved on to the new sidecar
    assert result == []
    assert newcomer.call("release") == "released"
    waiting.join(60)
    assert result == [True]


def test_timed_waits_on_a_long_held_session_share_one_blocked_thread(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    import threading

    h = spawn_holder(session, lane="long-run")
    h.acquire()
    before = threading.active_count()
    for _ in range(5):
        with pytest.raises(SessionContendedError):
            SessionLock(session, timeout=0.02).acquire()
    assert threading.active_count() <= before + 1  # one helper, adopted by each wait
    assert h.call("release") == "released"
    with SessionLock(session, timeout=30) as lock:
        assert lock.info is not None and lock.info.token == 2


def test_other_runs_keep_waiting_through_the_prompt_window(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="heartbeat")
    h.acquire()
    assert h.call("append " + json.dumps({"role": "user"})) == "ok"
    assert h.call("prompt") == "ok"  # the model call: the holder stays held
    status = probe(session)
    assert status.state == ProbeState.LIVE and status.record is not None
    assert status.record.phase == "prompt"
    with pytest.raises(SessionContendedError) as err:
        SessionLock(session, lane="channel", on_contention="fail").acquire()
    assert err.value.holder is not None and err.value.holder.phase == "prompt"
    waiter = spawn_holder(session, lane="channel")
    waiter.send("acquire")
    wait_for_blocked_waiter(session)
    assert h.call("endprompt") == "ok"  # no foreign write: the fence holds
    assert h.call("append " + json.dumps({"role": "assistant"})) == "ok"
    assert h.call("release") == "released"
    assert waiter.read() == "acquired 2"
    assert [json.loads(x)["role"] for x in session.read_text().splitlines()] == [
        "user", "assistant",
    ]
