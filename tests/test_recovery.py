"""Safe stuck-session recovery with real processes: never re-fire on a live holder."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    KILLED_MID_COPY,
    KILLED_ON_NAMING,
    Holder,
    SpawnForeignHolder,
    SpawnHolder,
    paused_recover,
    reap,
    wait_for_blocked_waiter,
)
from marks import needs_flock, needs_proc, needs_root, needs_xattr

from fencelock import (
    STAMP_KEY,
    Action,
    CorruptRecordError,
    FenceLockError,
    FenceLockWarning,
    NotHeldError,
    ProbeState,
    Recovery,
    SessionContendedError,
    SessionLock,
    SessionMovedError,
    SessionTakeoverError,
    SessionWriteError,
    UnsafePathError,
    UnsafeSidecarError,
    _recovery,
    _tokens,
    _wait,
    clear,
    fresh_session,
    probe,
    recover,
    scan,
    verify,
)
from fencelock._record import MAX_TOKEN


def test_free_session_refires(session: Path) -> None:
    result = recover(session, wait=0)
    assert result.action is Action.REFIRE and result.session == str(session)
    assert result.holder.state == ProbeState.FREE


def test_stale_session_is_cleared_then_refires(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="heartbeat")
    h.acquire()
    h.kill()
    result = recover(session, wait=0)
    assert result.action is Action.REFIRE and result.holder.state == ProbeState.STALE
    assert probe(session).state == ProbeState.FREE


def test_live_holder_that_releases_within_the_wait_refires(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="channel")
    h.acquire()
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(recover(session, wait=60)))
    t.start()
    wait_for_blocked_waiter(session)  # the recovery waits, seen in /proc/locks; let go
    assert h.call("release") == "released"
    t.join(timeout=60)
    [result] = outcome
    assert result.action is Action.REFIRE and result.session == str(session)
    assert result.holder.state == ProbeState.LIVE and result.holder.lane == "channel"
    assert 0 < result.waited < 60


def test_live_past_the_wait_escalates_to_a_fresh_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="cron")
    h.acquire()
    for n in range(3):
        h.call("append " + json.dumps({"n": n}))
    with open(session, "ab") as f:
        f.write(b'{"n": "torn')  # an unfinished line stays behind
    before = session.read_bytes()
    sidecar_before = Path(str(session) + ".holder").read_bytes()
    result = recover(session, wait=0.2)
    assert result.action is Action.FRESH and result.session != str(session)
    new = Path(result.session)
    assert new.parent == session.parent and new.suffix == ".jsonl"
    assert [json.loads(x) for x in new.read_text().splitlines()] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert result.carried_lines == 3 and result.waited >= 0.2
    assert session.read_bytes() == before  # the old session is untouched
    assert Path(str(session) + ".holder").read_bytes() == sidecar_before
    fresh_record = probe(new).record
    assert fresh_record is not None and fresh_record.origin == str(session)
    assert probe(session).state == ProbeState.LIVE  # its run goes on undisturbed


@pytest.mark.parametrize("fresh", [True, False])
def test_a_stuck_run_that_hands_over_to_a_queued_run_during_the_wait_gets_a_refire(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    """The stuck run lets go while recover waits, and a run queued behind it takes the
    session at once, so the lock is never seen free: the stuck run is gone all the same.
    Its turn is re-fired (queued behind the new run, as any run is), not moved to a
    fresh session away from a run in progress; nor is that run reported as the holder
    that would not let go."""
    from fencelock import _wait

    session.write_text('{"n": 1}\n')
    stuck, queued = spawn_holder(session, lane="stuck"), spawn_holder(session, lane="queued")
    stuck.acquire()
    queued.send("acquire")
    wait_for_blocked_waiter(session)
    real = _wait.wait_until_unlocked

    def hand_over_first(sidecar: str, limit: float | None) -> bool:
        assert stuck.call("release") == "released"  # the queued run takes it at once
        assert queued.read().startswith("acquired")
        return real(sidecar, limit)  # held all along by the queued run: times out

    monkeypatch.setattr(_wait, "wait_until_unlocked", hand_over_first)
    before = set(session.parent.iterdir())
    result = recover(session, wait=0.05, fresh=fresh)
    assert (result.action, result.session) == (Action.REFIRE, str(session))
    assert result.holder.lane == "stuck"
    assert set(session.parent.iterdir()) == before  # no fresh session, no sidecar of one
    assert probe(session).record.lane == "queued"  # type: ignore[union-attr]


def test_recovers_that_found_one_stuck_run_answer_alike_when_a_queued_run_takes_over(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Two recovers find the same run stuck: one with no wait starts the fresh session;
    the other waits, and the stuck run then hands the session to a run queued behind
    it, so its lock is never seen free. The waiting recover ends as the stuck run goes
    (it waited out its whole limit before), and answers the fresh session the first
    made for that run (it re-fired the old one: the conversation split in two)."""
    session.write_text('{"n": 1}\n')
    stuck, queued = spawn_holder(session, lane="stuck"), spawn_holder(session, lane="queued")
    stuck.acquire()
    queued.send("acquire")
    wait_for_blocked_waiter(session, proc=queued.proc)
    late = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "recover", "--wait", "60", "--json",
         str(session)], stdout=subprocess.PIPE, text=True)
    try:
        wait_for_blocked_waiter(session, proc=late)  # it found the run stuck, and waits
        first = recover(session, wait=0)
        assert first.action == Action.FRESH, first
        assert stuck.call("release") == "released"
        assert queued.read().startswith("acquired")  # at once: the lock never free
        out, _ = late.communicate(timeout=60)
    finally:
        reap(late)
    answer = json.loads(out)
    assert (answer["action"], answer["session"]) == ("fresh", first.session), answer
    assert answer["waited"] < 60, answer  # the stuck run's going ended it, not the limit
    assert probe(session).record.lane == "queued"  # type: ignore[union-attr]


@pytest.mark.parametrize("fresh", [False, True])
def test_a_session_unreadable_after_the_wait_is_never_taken_for_let_go(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    """After the wait, the session is looked at again (and once more under the fresh
    session's lock); a look that cannot read it (out of descriptors, an unsafe sidecar,
    a corrupt record) says nothing of the stuck run: recover must not re-fire on a
    session its run may still hold, but report it held or start the fresh session."""
    from fencelock import _wait

    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    sidecar = Path(str(session) + ".holder")
    moved = sidecar.with_name("moved.holder")

    def timed_out_and_unreadable(path: str, limit: float | None) -> bool:
        if not moved.exists():  # (the first of the wait's steps)
            sidecar.rename(moved)  # the run holds it on; what is at the path is unreadable
            os.mkfifo(sidecar)
        return False  # the wait ran out

    monkeypatch.setattr(_wait, "wait_until_unlocked", timed_out_and_unreadable)
    try:
        if fresh:
            assert recover(session, wait=0.05).action is Action.FRESH
        else:
            with pytest.raises(SessionContendedError):
                recover(session, wait=0.05, fresh=False)
    finally:
        sidecar.unlink()
        moved.rename(sidecar)
    assert probe(session).record.lane == "stuck"  # type: ignore[union-attr]


def test_recovers_of_one_stuck_run_agree_on_one_fresh_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Two gateways' recovery lanes, at once or one after the other, must not split a
    stuck session in two: the fresh session is named after the stuck run, so a second
    recover answers the first one's (whoever takes it waits for the copy under its
    lock). Once another run of the old session is stuck, its recover answers that
    fresh session too (the old session is marked moved), where it started a third."""
    h = spawn_holder(session, lane="cron")
    h.acquire()
    h.call("append " + json.dumps({"n": 1}))
    command = [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0",
               "--json"]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    said = [json.loads(p.communicate(timeout=60)[0]) for p in both]
    assert [p.returncode for p in both] == [0, 0], said
    answers = [obj["session"] for obj in said]
    assert answers[0] == answers[1] != str(session), said
    again = recover(session, wait=0)
    assert again.session == answers[0] and again.carried_lines == 0
    fresh = [p for p in session.parent.iterdir()
             if p.suffix == ".jsonl" and p != session]
    assert [str(p) for p in fresh] == [answers[0]]  # one copy, not two
    assert [json.loads(x) for x in Path(answers[0]).read_text().splitlines()] == [{"n": 1}]
    assert h.call("release") == "released"
    # The stuck run ended after its conversation moved on: a recover of it (a lane that
    # was late, or came back) still answers the fresh session, not the old one.
    late = recover(session, wait=0)
    assert (late.action, late.session, late.carried_lines) == ("fresh", answers[0], 0)
    h.acquire()  # another run, stuck in turn
    assert recover(session, wait=0).session == answers[0]


@needs_proc
def test_a_run_whose_command_left_processes_holding_gets_one_fresh_session(
    session: Path, tmp_path: Path
) -> None:
    """`fencelock run` whose command left a process behind: the session stays held by
    it after the run released its record. Every recover, while it holds and after it is
    gone, answers one fresh session named after that run (they made a new random one
    each, and once it was gone answered the old session: three places for one
    conversation)."""
    session.write_text('{"n": 1}\n')
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    reader = shlex.join([sys.executable, "-c", f"open({str(gate)!r}).read()"])
    leftover = f"exec 0<&- 1>&- 2>&-; ({reader} &)"
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "cron", "--",
         "sh", "-c", leftover], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        assert probe(session).state == "live"
        first, second = recover(session, wait=0), recover(session, wait=0)
        assert first.action == second.action == "fresh"
        assert first.session == second.session != str(session)
    finally:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO if the leftover is gone
        os.write(fd, b"go")  # lets it end
        os.close(fd)
    assert _wait.wait_until_unlocked(str(session) + ".holder", 60)  # takes no token
    third = recover(session, wait=0)
    assert (third.action, third.session, third.carried_lines) == ("fresh", first.session, 0)
    fresh = [p for p in session.parent.iterdir() if p.suffix == ".jsonl" and p != session]
    assert [str(p) for p in fresh] == [first.session]


def test_a_stuck_run_that_died_after_its_recover_is_still_answered_by_its_fresh_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The stuck run is killed once a recover has answered its fresh session: another
    recover finds the session stale, and answers the same fresh session."""
    h = spawn_holder(session, lane="cron")
    h.acquire()
    h.call("append " + json.dumps({"n": 1}))
    first = recover(session, wait=0)
    assert first.action == "fresh"
    h.kill()
    assert probe(session).state == "stale"
    late = recover(session, wait=0)
    assert (late.action, late.session, late.carried_lines) == ("fresh", first.session, 0)


def _stuck_with_three_lines(session: Path, spawn_holder: SpawnHolder) -> str:
    """Hold ``session`` in another process with three lines in it: the fresh session a
    recover of that stuck run makes."""
    return _stuck_run(session, spawn_holder)[1]


def _stuck_run(session: Path, spawn_holder: SpawnHolder) -> tuple[Holder, str]:
    """`_stuck_with_three_lines`, with the holder."""
    from fencelock._recovery import _successor

    h = spawn_holder(session, lane="cron")
    h.acquire()
    for n in range(3):
        h.call("append " + json.dumps({"n": n}))
    successor = _successor(str(session), probe(session).record)
    assert successor is not None
    return h, successor


def _recover_json(session: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0",
               "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _carried_whole(successor: str) -> None:
    lines = [json.loads(x) for x in Path(successor).read_text().splitlines()]
    assert lines == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert not os.path.lexists(successor + ".part")


def _answers_a_whole_copy(proc: subprocess.Popen[str], successor: str) -> None:
    """``proc`` (`_recover_json`) made ``successor`` and answers it, carried whole."""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    said = json.loads(out)
    assert said["session"] == successor and said["carried_lines"] == 3, said
    _carried_whole(successor)


PAUSED_RECOVER = """
import json, sys
from fencelock import _recovery, recover
scan = _recovery._scan
def paused(*args):
    print("reading the old transcript", flush=True)
    sys.stdin.readline()
    return scan(*args)
_recovery._scan = paused
r = recover(sys.argv[1], wait=0)
print(json.dumps({"session": r.session, "carried_lines": r.carried_lines}))
"""


def test_a_recover_killed_as_it_named_the_fresh_session_leaves_its_tokens_above_the_lines(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The fresh session's first token is above every token stamped in the lines it
    carries (docs/PROTOCOL.md 4), also when the recover that made it was killed just
    after naming it: its record already says so, and the next run continues from it.
    (The record used to get that token only after the copy was named, so the next run
    repeated a carried line's token.) The stamps here sit behind a torn tail longer
    than an acquire looks back, so the stuck run's own token is below them."""
    stamped = "".join(
        json.dumps({"n": n, "_fencelock": {"token": 3, "run_id": "seed-run"}}) + "\n"
        for n in range(20))
    session.write_text(stamped + '{"torn": "' + "t" * 200_000)
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    stuck = probe(session).record
    assert stuck is not None and stuck.token < 3  # the precondition: below the stamps
    killed = subprocess.run([sys.executable, "-c", KILLED_ON_NAMING, str(session)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = recover(session, wait=0)
    assert again.action is Action.FRESH and again.carried_lines == 0  # named, whole
    assert Path(again.session).read_text() == stamped
    with SessionLock(again.session, lane="next") as lock:
        info = lock.info
        assert info is not None and info.token > 3


def test_a_fresh_session_named_as_a_recover_looked_is_answered_not_cleared(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recover that finds the stuck run gone looks for its fresh session, then probes
    it: one named in between (its maker killed just after naming it) is the answer, as
    every later recover's; it is not taken for an unfinished copy and cleared."""
    h, successor = _stuck_run(session, spawn_holder)
    killed = subprocess.run([sys.executable, "-c", KILLED_ON_NAMING, str(session)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.exists(successor)
    h.call("release")
    _named_after_the_first_look(monkeypatch)
    again = recover(session, wait=0)
    assert (again.action, again.session) == (Action.FRESH, successor)
    assert os.path.exists(successor + ".holder")


def _named_after_the_first_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recover's first look for the stuck run's fresh session finds it not named yet
    (as one that looked just before another recover named it); later looks see it as
    it is."""
    published = _recovery._published
    looks: list[str] = []

    def named_after_the_first_look(fresh: str, old: str) -> bool:
        looks.append(fresh)
        return len(looks) > 1 and published(fresh, old)

    monkeypatch.setattr(_recovery, "_published", named_after_the_first_look)


KILLED_COPYING = """
import os, signal, sys
from fencelock import _recovery, recover
chunks = _recovery._chunks
def killed(*args):
    for chunk in chunks(*args):
        yield chunk
        os.kill(os.getpid(), signal.SIGKILL)  # a chunk into the part: killed copying
_recovery._chunks = killed
recover(sys.argv[1], wait=0)
"""


@pytest.mark.parametrize("after", ["refire", "in flight"])
def test_a_recover_after_the_stuck_run_ended_removes_what_a_killed_recover_left(
    session: Path, spawn_holder: SpawnHolder, store: str | None, after: str
) -> None:
    """A recover killed while it copied leaves the fresh session's stale record and its
    part; once the stuck run has ended, no recover makes that session. The recover that
    then re-fires the turn removes them, so nothing is left that `status` lists as a
    stale session with no file (they used to stay, the part as large as the copy). So
    does one in flight, that found the run stuck and reaches the fresh session's lock
    only after the run ended: it removes the part with the record that led to it."""
    h, successor = _stuck_run(session, spawn_holder)
    stuck = probe(session).record
    assert stuck is not None
    killed = subprocess.run([sys.executable, "-c", KILLED_COPYING, str(session)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.exists(successor + ".part") and not os.path.lexists(successor)
    h.call("release")
    if after == "in flight":
        with pytest.raises(_recovery._RunEnded):  # decided "fresh" while the run held
            _recovery._start_fresh(str(session), "recovery", True, stuck.token, store, 0.0,
                                   successor, stuck)
        assert not os.path.lexists(successor + ".part")
    again = recover(session, wait=0)
    assert (again.action, again.session) == (Action.REFIRE, str(session))
    assert not os.path.lexists(successor + ".part")
    if store is None:
        assert not os.path.lexists(successor + ".holder")
    left = probe(successor)
    assert left.state == ProbeState.FREE and left.record is None, left


@pytest.mark.parametrize("look", ["made", "failed"])
def test_a_recover_whose_stuck_run_ends_as_it_begins_the_fresh_session_leaves_none(
    session: Path, spawn_holder: SpawnHolder, store: str | None,
    monkeypatch: pytest.MonkeyPatch, look: str
) -> None:
    """The stuck run lets go just as a recover takes the fresh session's lock: the
    recover re-fires, and nothing of the fresh session stays, in either store (on etcd
    its released record stayed, listed as a session with no file). Where the look at
    what stays fails, the recover re-fires all the same (it is a clean-up)."""
    from fencelock import _probe

    h, successor = _stuck_run(session, spawn_holder)
    still_holds = _recovery._still_holds
    real_probe = _probe.probe

    def ended_just_now(*args: Any) -> bool:
        h.call("release")
        return still_holds(*args)

    looks: list[str] = []

    def failing(path: Any, **kwargs: Any) -> Any:
        if look == "failed" and str(path) == successor and not looks:
            looks.append(successor)  # the clean-up's look, the first at that name
            raise OSError(errno.EIO, "Input/output error", successor)
        return real_probe(path, **kwargs)

    monkeypatch.setattr(_recovery, "_still_holds", ended_just_now)
    monkeypatch.setattr(_probe, "probe", failing)
    again = recover(session, wait=0)
    monkeypatch.setattr(_probe, "probe", real_probe)
    assert (again.action, again.session) == (Action.REFIRE, str(session))
    if look == "failed":
        assert looks  # (what stays, a released record on etcd, is left for `clear`)
        return
    left = probe(successor)
    assert left.state == ProbeState.FREE and left.record is None, left
    assert not os.path.lexists(successor) and not os.path.lexists(successor + ".holder")


def test_a_recover_after_the_stuck_run_ended_removes_an_empty_fresh_sidecar(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A recover killed after it made the fresh session's sidecar and before its first
    record leaves it empty: once the stuck run has ended, the recover that re-fires the
    turn removes it too (`status` listed it as a session)."""
    h, successor = _stuck_run(session, spawn_holder)
    Path(successor + ".holder").write_bytes(b"")  # as that recover left it
    h.call("release")
    again = recover(session, wait=0)
    assert (again.action, again.session) == (Action.REFIRE, str(session))
    assert not os.path.lexists(successor + ".holder")


def test_a_recover_while_another_copies_answers_that_copy_once_the_stuck_run_is_gone(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A recover makes the fresh session of a stuck run, and the run dies while that
    recover reads the old transcript. A recover arriving then finds the session stale:
    it answers the fresh session being made (once it is whole), never the old one, or
    two lanes would go on in two files."""
    h, successor = _stuck_run(session, spawn_holder)
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RECOVER, str(session)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    second = None
    try:
        assert first.stdin is not None and first.stdout is not None
        assert first.stdout.readline() == "reading the old transcript\n"
        h.kill()
        assert probe(session).state == "stale"
        second = _recover_json(session)
        assert wait_for_blocked_waiter(successor, proc=second)  # waits for that copy
        first.stdin.write("\n")
        first.stdin.flush()
        out, _ = first.communicate(timeout=60)
        assert first.returncode == 0
        assert json.loads(out) == {"session": successor, "carried_lines": 3}
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        said = json.loads(out)
        assert (said["action"], said["session"], said["carried_lines"]) == (
            "fresh", successor, 0), said
    finally:
        reap(first)
        if second is not None:
            reap(second)
    _carried_whole(successor)


def test_a_recover_waits_for_another_s_copy_and_makes_it_if_that_one_failed(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A recover that finds another recover of the same stuck run still copying must
    not answer yet: if that copy fails, its recover removes what it made, and a caller
    told the name would start the fresh session empty. It waits, and makes it."""
    from fencelock._recovery import _remove_fresh

    successor = _stuck_with_three_lines(session, spawn_holder)
    # The other recover, one line into its copy (made under a name of its own).
    other = SessionLock(successor, "recovery", on_contention="fail", origin=str(session))
    other.acquire()
    Path(successor + ".part").write_text('{"n": 0}\n')
    proc = _recover_json(session)
    try:
        assert wait_for_blocked_waiter(successor, proc=proc)  # waits for that copy
        _remove_fresh(successor)  # the other recover failed: it removes what it made
        other.release()
    except BaseException:
        reap(proc)
        raise
    _answers_a_whole_copy(proc, successor)


@pytest.mark.parametrize("left", ["died-mid-copy", "empty-sidecar"])
def test_a_recover_makes_whole_what_a_failed_one_left(
    session: Path, spawn_holder: SpawnHolder, left: str
) -> None:
    """What a recover that died mid-copy (SIGKILL: its record stale, part of the copy
    on disk) or failed to write its first record (a full disk: an empty sidecar) left
    is never answered as the fresh session: the next recover makes it whole."""
    successor = _stuck_with_three_lines(session, spawn_holder)
    if left == "died-mid-copy":
        copier = spawn_holder(successor, lane="recovery")
        copier.acquire()
        Path(successor + ".part").write_text('{"n": 0}\n')
        copier.kill()
    else:
        Path(successor + ".holder").touch()
    _answers_a_whole_copy(_recover_json(session), successor)
    assert probe(successor).state == ProbeState.FREE


def test_a_part_left_beside_a_made_fresh_session_is_removed(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A recover that died between naming the fresh session and removing its part left
    a second name of the whole copy: the next recover removes it, and answers the
    fresh session as made."""
    successor = _stuck_with_three_lines(session, spawn_holder)
    first = recover(session, wait=0)
    assert first.session == successor and first.carried_lines == 3
    os.link(successor, successor + ".part")  # as the died recover left it
    again = recover(session, wait=0)
    assert again.session == successor and again.carried_lines == 0
    _carried_whole(successor)


def test_a_session_whose_name_is_not_utf8_gets_its_fresh_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A file name need not be UTF-8: the fresh session's name comes from its bytes."""
    odd = session.parent / os.fsdecode(b"caf\xff.jsonl")
    h = spawn_holder(odd, lane="cron")
    h.acquire()
    h.call("append " + json.dumps({"n": 1}))
    result = recover(odd, wait=0)
    assert result.action is Action.FRESH and result.carried_lines == 1
    assert recover(odd, wait=0).session == result.session  # the same one, made once


def test_a_symlink_at_the_fresh_session_s_name_is_refused(
    session: Path, spawn_holder: SpawnHolder, tmp_path: Path
) -> None:
    """The fresh session's name follows from the stuck run's record: something planted
    there is not a copy recover made, and is neither answered nor followed."""
    successor = _stuck_with_three_lines(session, spawn_holder)
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    os.symlink(target, successor)
    with pytest.raises(UnsafePathError) as err:
        recover(session, wait=0)
    assert successor in str(err.value)
    assert target.read_text() == "keep\n" and os.path.islink(successor)


def test_a_fresh_session_continues_the_old_one_s_tokens(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Stamped lines carried into the fresh session keep their tokens; the fresh
    session's runs must stamp above them, or verify() calls it tokens going backwards."""
    from fencelock import verify

    for n in range(4):
        with SessionLock(session, stamp=True) as lock:
            lock.append({"n": n})
    h = spawn_holder(session, lane="stuck")
    live_token = h.acquire()
    result = recover(session, wait=0)
    assert result.action is Action.FRESH and result.carried_lines == 4
    new = Path(result.session)
    with SessionLock(new, stamp=True) as lock:
        assert lock.info is not None and lock.info.token > live_token
        lock.append({"n": "after"})
    assert verify(new).ok, verify(new).problems


def test_no_fresh_raises_contended(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="direct")
    h.acquire()
    with pytest.raises(SessionContendedError) as err:
        recover(session, wait=0.05, fresh=False)
    assert err.value.holder is not None and err.value.holder.pid == h.pid


def test_stuck_holder_is_reported_stuck_and_never_refired(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="heartbeat")
    h.acquire()
    result = recover(session, wait=0, stuck_after=0.0)  # every heartbeat is "old"
    assert result.holder.stuck and result.holder.state == ProbeState.LIVE
    assert result.action is Action.FRESH
    assert probe(session).state == ProbeState.LIVE


def test_in_process_run_is_asked_to_abort_before_the_wait(
    session: Path, store: str | None
) -> None:
    lock = SessionLock(session, lane="stuck-run")  # in the store under test
    lock.acquire()
    aborted = threading.Event()

    def abort() -> None:
        aborted.set()
        lock.release()

    lock.on_abort(abort)
    result = recover(session, wait=30)
    assert aborted.is_set()
    assert result.action is Action.REFIRE and result.holder.lane == "stuck-run"


def test_an_asyncio_run_is_asked_to_abort_in_its_own_loop(
    session: Path, store: str | None
) -> None:
    """A run an asyncio task holds, and a recover in a worker thread (as an asyncio
    gateway runs it, `asyncio.to_thread`): the callback is called in the task's loop,
    so `on_abort(stop.set)` with an `asyncio.Event` stops the run at once and the turn
    is re-fired in the same session. (Called from the recover's thread, that ``set``
    did not wake the loop: the recover waited its whole wait and moved the run.)"""
    import asyncio

    async def gateway() -> tuple[Recovery, bool]:
        stop = asyncio.Event()
        lock = SessionLock(session, lane="stuck-run")  # in the store under test
        held = asyncio.Event()

        async def run() -> bool:
            async with lock:
                lock.on_abort(stop.set)
                held.set()
                await stop.wait()
                return True

        task = asyncio.create_task(run())
        await held.wait()
        found = await asyncio.to_thread(recover, session, wait=20)
        return found, await task

    found, stopped = asyncio.run(gateway())
    assert stopped and found.action is Action.REFIRE, found
    assert found.session == str(session) and found.waited < 20, found


def test_an_asyncio_run_whose_loop_is_blocked_is_still_asked_to_abort(
    session: Path, store: str | None
) -> None:
    """The run's task blocks its loop (a stuck run may: a synchronous call on the loop)
    and its callback is thread-safe (a `threading.Event`): the loop cannot call it, so
    the recover does, and the run stops at once (it waited its whole wait, then moved
    it). A callback that raises is reported to the recover's caller, in its thread:
    under an `error` filter, the recover raises it, after every callback ran."""
    import asyncio

    def gateway(callback: Callable[[threading.Event], Callable[[], object]]) -> Recovery:
        unblock = threading.Event()
        found: list[Recovery] = []

        async def run() -> None:
            async with SessionLock(session, lane="stuck-run") as lock:
                lock.on_abort(callback(unblock))
                lock.on_abort(unblock.set)
                worker = threading.Thread(
                    target=lambda: found.append(recover(session, wait=20)))
                worker.start()
                unblock.wait(60)  # the loop blocked until the abort comes
            await asyncio.to_thread(worker.join)

        asyncio.run(run())
        return found[0]

    found = gateway(lambda unblock: unblock.set)
    assert found.action is Action.REFIRE and found.waited < 20, found

    def broken(unblock: threading.Event) -> Callable[[], object]:
        def callback() -> None:
            raise RuntimeError("gone")
        return callback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = gateway(broken)
    assert found.action is Action.REFIRE, found
    said = [w for w in caught if w.category is FenceLockWarning]
    assert len(said) == 1 and "RuntimeError: gone" in str(said[0].message), said
    assert said[0].filename == __file__, said  # the recover's caller, not the loop


@needs_xattr
@pytest.mark.parametrize("wrote", [True, False], ids=["after-an-append", "before-any"])
def test_a_run_learns_that_a_recover_in_another_process_moved_its_conversation(
    session: Path, store: str | None, wrote: bool
) -> None:
    """A recover in another process finds the run still holding the session past its
    wait and moves the conversation to a fresh session, where the turn is re-fired. The
    run is not stopped (it may only have been slow): `superseded` tells it so, and its
    next append there is refused (`SessionMovedError`, naming the fresh session), where
    its line was written into a session nobody reads any more. So is a later run's
    (one queued behind it, a cron lane): the recover's mark on the old session tells
    every run and every recover where the conversation went (a later run wrote there,
    and a later recover answered re-fire of the old session); once the fresh session is
    deleted, the old one is used again."""
    session.write_text('{"n": 1}\n')
    lock = SessionLock(session, lane="slow-run")  # in the store under test
    lock.acquire()
    if wrote:
        lock.append({"n": 2})
    before = session.read_bytes()
    assert lock.superseded() is None  # nothing moved it yet
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    moved = json.loads(done.stdout)
    assert moved["action"] == "fresh"
    fresh = moved["session"]
    assert lock.superseded() == fresh
    assert lock.held  # still the run's: only told
    with pytest.raises(SessionMovedError) as refused:
        lock.append({"n": "the slow reply"})
    assert refused.value.moved_to == fresh and not refused.value.stored, refused.value
    assert isinstance(refused.value, SessionTakeoverError)  # handled as gateways do those
    lock.release()
    with pytest.raises(NotHeldError):
        lock.superseded()
    again = SessionLock(session, lane="next-run")
    with again:  # a run after it: the conversation is elsewhere
        assert again.superseded() == fresh
        with pytest.raises(SessionMovedError,
                           match=f"Do this turn in {re.escape(fresh)} instead") as later_run:
            again.append({"n": "cron"})
        assert later_run.value.later
    assert session.read_bytes() == before  # nothing written after the move
    later = recover(session, wait=0)
    assert (later.action, later.session) == (Action.FRESH, fresh), later
    os.unlink(fresh)  # the operator drops the fresh session: the old one goes on
    with SessionLock(session, lane="after") as after:
        assert after.superseded() is None
        after.append({"n": 3})
    assert recover(session, wait=0).action is Action.REFIRE


@needs_xattr
def test_a_recover_of_a_run_that_had_written_nothing_marks_the_old_session_all_the_same(
    session: Path, store: str | None
) -> None:
    """The stuck run had appended nothing, so the old session has no file yet (a
    `fencelock run` whose command had not written, a gateway still in its first model
    call): the recover makes it, empty, to carry its mark (a mark needs a file), so the
    stuck run's late reply is refused rather than written into a session nobody reads,
    as is a later run's, and a later recover answers the fresh session."""
    with SessionLock(session, lane="slow-run") as lock:
        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0",
             "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        fresh = json.loads(done.stdout)["session"]
        assert lock.superseded() == fresh
        with pytest.raises(SessionMovedError) as refused:
            lock.append({"n": "the slow reply"})
        assert refused.value.moved_to == fresh and not refused.value.stored
    assert session.read_bytes() == b"" and oct(session.stat().st_mode & 0o777) == "0o600"
    with SessionLock(session, lane="next-run") as again, \
            pytest.raises(SessionMovedError):
        again.append({"n": "cron"})
    assert session.read_bytes() == b""
    later = recover(session, wait=0)
    assert (later.action, later.session) == (Action.FRESH, fresh), later


@needs_xattr
def test_a_stuck_runs_first_append_that_makes_the_file_as_a_recover_moves_it_is_refused(
    session: Path,
) -> None:
    """The stuck run's first append creates the old session's file just as a recover
    moving the run comes to make it for its mark: the recover opens the run's file and
    marks it, and the append, which looks at the mark under the file's own lock as an
    append to an existing file does, writes nothing there (`SessionMovedError`) instead
    of leaving its line in a session nobody reads."""
    from conftest import on_entry

    from fencelock import _tokens

    moved: list[str] = []

    def recover_now() -> None:  # right after the append's O_EXCL create
        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0",
             "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        moved.append(json.loads(done.stdout)["session"])

    with SessionLock(session, lane="slow-run") as lock:
        with on_entry(_tokens.reserve, recover_now) as ran, \
                pytest.raises(SessionMovedError) as refused:
            lock.append({"n": "the late reply"})
        assert ran and refused.value.moved_to == moved[0] and not refused.value.stored
    assert session.read_bytes() == b""


@needs_xattr
def test_a_recover_that_only_answers_a_move_makes_no_old_session_file(session: Path) -> None:
    """Only the recover that moves a stuck run makes the old session's file (to carry
    its mark); one that answers the move afterwards (here with ``--no-fresh``, the old
    file deleted by its owner since) makes none."""
    with SessionLock(session, lane="slow-run"):
        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0",
             "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        fresh = json.loads(done.stdout)["session"]
    session.unlink()
    done = subprocess.run([sys.executable, "-m", "fencelock", "recover", "--no-fresh",
                           str(session)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fresh
    assert not session.exists()


@needs_xattr
def test_run_and_hold_write_nothing_into_a_moved_session(
    session: Path, store: str | None
) -> None:
    """`fencelock run` does not start its command in a session a recover moved (exit 1,
    naming the fresh session: it started it, with a warning about a torn line), and
    says so where the move came while its command ran (its writes are not fenced);
    `fencelock hold` answers an append there `SessionMovedError` with `moved_to`."""
    session.write_text('{"n": 1}\n')
    with SessionLock(session, lane="stuck") as lock:
        fresh = recover(session, wait=0).session
        assert lock.superseded() == fresh
    cmd = [sys.executable, "-m", "fencelock"]
    ran = subprocess.run([*cmd, "run", str(session), "--lane", "cron", "--", sys.executable,
                          "-c", "print('started')"], capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 1 and "started" not in ran.stdout, ran
    assert ran.stderr.startswith(f"Error: {session}: a recover moved its conversation to "
                                 f"{fresh}"), ran.stderr
    # A command that runs as the move comes: what it writes then is not in the fresh
    # session, and `run` says so (it said nothing).
    fresh_path = Path(fresh)
    fresh_path.unlink()  # (the old session is used again)
    gate = session.parent / "gate"
    os.mkfifo(gate)
    writer = subprocess.Popen(
        [*cmd, "run", str(session), "--lane", "slow", "--", sys.executable, "-c",
         f"open({str(gate)!r}).read(); open({str(session)!r}, 'a').write('{{\"late\": 1}}\\n')"],
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (st := probe(session)).state != ProbeState.LIVE or st.record is None \
            or st.record.lane != "slow":  # (until the run holds it, its command started)
        assert time.monotonic() < deadline and writer.poll() is None, st
        time.sleep(0.01)
    fresh = recover(session, wait=0).session
    with open(gate, "w") as g:
        g.write("go")
    _, said = writer.communicate(timeout=120)
    assert writer.returncode == 0, said
    assert said.startswith(f"Warning: {session}: a recover moved its conversation to "
                           f"{fresh} while the command ran"), said
    held = subprocess.run([*cmd, "hold", str(session), "--lane", "node"],
                          input='{"op": "append", "entry": {"n": 2}, "id": 1}\n',
                          capture_output=True, text=True, timeout=120)
    answers = [json.loads(line) for line in held.stdout.splitlines()]
    assert answers[1]["error"] == "SessionMovedError", answers
    assert answers[1]["moved_to"] == fresh and answers[1]["stored"] is False, answers
    assert session.read_text() == '{"n": 1}\n{"late": 1}\n'


@needs_xattr
def test_a_move_marked_while_an_append_goes_in_is_said_by_that_append(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recover that could not have the session file's lock (an append held it past
    `MARK_WAIT`: a run stopped in its write) marks the session without it, between the
    append's fence check and its fsync: the fence point the append takes has the mark's
    ctime in it, so no later check would see it (the run wrote on into the old
    session). The append says the move, its line stored; every later write is
    refused."""
    from fencelock import _fence, _moved

    session.write_text('{"n": 1}\n')
    fresh = Path(fresh_session(session))
    fresh.write_text('{"n": 1}\n')  # as a recover's copy
    real = _fence._fsync

    def marking(fd: int) -> None:
        real(fd)
        _moved.mark(str(session), str(fresh))

    with SessionLock(session, lane="slow-run") as lock:
        lock.append({"n": 2})
        monkeypatch.setattr(_fence, "_fsync", marking)
        with pytest.raises(SessionMovedError) as told:
            lock.append({"n": 3})
        monkeypatch.setattr(_fence, "_fsync", real)
        assert told.value.stored and told.value.moved_to == str(fresh), told.value
        for write in (lambda: lock.append({"n": 4}), lock.verify_fence):
            with pytest.raises(SessionMovedError):
                write()
    assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2, 3]


@needs_xattr
def test_lines_a_recover_could_not_carry_are_named_with_the_command_that_carries_them(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fresh session is made, the old one marked, and the line the stuck run wrote
    meanwhile cannot be written to the fresh session (a full disk): the recover still
    answers the fresh session, and its warning names the lines left behind and the
    command that carries them; the fresh session stays whole."""
    from fencelock import _fence

    session.write_text('{"n": 1}\n')
    real_publish, real_write = _fence.publish, _fence._write_all

    def full(fd: int, data: bytes, path: str, what: str = "write") -> None:
        if path != str(session):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data, path, what)

    with SessionLock(session, lane="slow-run") as lock:
        def publish(*args: Any, **kwargs: Any) -> None:
            lock.append({"n": "late"})
            real_publish(*args, **kwargs)
            monkeypatch.setattr(_fence, "_write_all", full)  # the disk fills up

        monkeypatch.setattr(_fence, "publish", publish)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moved = recover(session, wait=0)
        monkeypatch.setattr(_fence, "_write_all", real_write)
    assert moved.action is Action.FRESH, moved
    said = [str(w.message) for w in caught if w.category is FenceLockWarning]
    assert len(said) == 1 and "the 1 line " in said[0] and "No space" in said[0], said
    command = said[0].split("append them by hand: ")[1].split(")")[0]
    fresh = Path(moved.session)
    assert [json.loads(x)["n"] for x in fresh.read_text().splitlines()] == [1]
    subprocess.run(["sh", "-c", command], check=True, timeout=60)
    assert fresh.read_text() == session.read_text()  # carried by the command said


@needs_xattr
def test_a_recover_marks_the_session_only_between_two_appends(
    session: Path, store: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stuck run has looked for the mark and is about to write its line as the
    recover, its copy made, comes to mark the old session. Had the mark gone on then,
    the line would have gone into the old session after the recover read its end: in
    no fresh session, and its writer told nothing. An append holds the session file's
    own lock shared from its look until its line is in, and the recover takes it
    exclusively to mark and read the end: the mark waits for the append (here it had
    not come 2 s later), whose line is carried; the run's next append is refused."""
    from fencelock import _fence, _moved, _platform

    session.write_text('{"n": 1}\n')
    real_write, real_lock, real_mark = _fence._write_all, _platform.lock_session, _moved.mark
    locking, marked = threading.Event(), threading.Event()
    found: list[Recovery] = []
    paused: list[bool] = []

    def lock_session(fd: int, shared: bool, limit: float) -> int:
        if not shared:
            locking.set()  # the recover, copy made, comes to mark the session
        return real_lock(fd, shared, limit)

    def mark(old: str, fresh: str, fd: int = -1) -> None:
        real_mark(old, fresh, fd)
        marked.set()

    def write_all(fd: int, data: bytes, path: str, what: str = "write") -> None:
        if path == str(session) and not paused:
            paused.append(True)  # looked for the mark, line not written yet
            worker.start()
            assert locking.wait(60)
            assert not marked.wait(2), "marked while an append was under way"
        real_write(fd, data, path, what)

    worker = threading.Thread(target=lambda: found.append(recover(session, wait=0)))
    monkeypatch.setattr(_platform, "lock_session", lock_session)
    monkeypatch.setattr(_moved, "mark", mark)
    with SessionLock(session, lane="slow-run") as lock:
        lock.append({"n": 2})
        monkeypatch.setattr(_fence, "_write_all", write_all)
        lock.append({"n": 3})  # in before the mark: not refused
        worker.join(60)
        assert found and found[0].action is Action.FRESH, found
        with pytest.raises(SessionMovedError) as refused:
            lock.append({"n": 4})
        assert not refused.value.stored and refused.value.moved_to == found[0].session
    fresh = Path(found[0].session).read_text()
    assert [json.loads(x)["n"] for x in fresh.splitlines()] == [1, 2, 3]
    assert session.read_text() == fresh


@needs_xattr
def test_an_append_held_up_by_a_lock_on_the_session_file_itself_says_so(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process outside fencelock holds flock(2) on the session file itself (not its
    sidecar): an append waits for it (`SESSION_LOCK_WAIT`, shortened here), then fails
    with an error naming the lock and lslocks, writing nothing; where a recover marked
    the session meanwhile, it says the move instead."""
    from fencelock import _fence, _moved

    session.write_text('{"n": 1}\n')
    monkeypatch.setattr(_fence, "SESSION_LOCK_WAIT", 0.3)
    outsider = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(session)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert outsider.stdout is not None and outsider.stdout.readline() == "locked\n"
        with SessionLock(session, lane="run") as lock:
            with pytest.raises(SessionWriteError, match=r"held locked \(flock\) for over "
                               r"0\.3 s .*lslocks names the process") as failed:
                lock.append({"n": 2})
            assert failed.value.stored is False
            fresh = session.parent / "fresh.jsonl"
            fresh.write_text('{"n": 1}\n')
            _moved.mark(str(session), str(fresh))  # as a recover that could not wait
            with pytest.raises(SessionMovedError) as moved:
                lock.append({"n": 2})
            assert moved.value.moved_to == str(fresh) and not moved.value.stored
    finally:
        outsider.communicate(timeout=60)
    assert session.read_text() == '{"n": 1}\n'


class _Stopped(BaseException):
    """An interrupt (SIGTERM's handler raising) landing where a test puts it."""


@needs_xattr
def test_a_recover_stopped_before_it_marks_the_old_session_leaves_no_fresh_session(
    session: Path, store: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recover waits for the old session file's own lock (an append under way holds
    it) to mark the session, and is stopped there. Had it named the fresh session
    first, the next recover would answer that copy unmarked, without the reply the
    stuck run then appended (told stored): the reply would be in the old session only.
    The lock is taken before the copy gets its name, so nothing is left, and the next
    recover makes the copy, reply and all."""
    from fencelock import _platform

    session.write_text('{"n": 1}\n')
    real_lock = _platform.lock_session

    def stopped_while_waiting(fd: int, shared: bool, limit: float) -> int:
        if not shared:
            raise _Stopped
        return real_lock(fd, shared, limit)

    with SessionLock(session, lane="slow-run") as lock:
        monkeypatch.setattr(_platform, "lock_session", stopped_while_waiting)
        with pytest.raises(_Stopped):
            recover(session, wait=0)
        monkeypatch.setattr(_platform, "lock_session", real_lock)
        left = [p.name for p in session.parent.iterdir() if p.suffix != ".holder"]
        assert left == [session.name], left  # no fresh session, named or in part
        lock.append({"n": "late"})  # the slow reply, not refused: nothing marked
        moved = recover(session, wait=0)
    assert moved.action is Action.FRESH, moved
    lines = [json.loads(x)["n"] for x in Path(moved.session).read_text().splitlines()]
    assert lines == [1, "late"]


KILLED_BEFORE_CARRYING = """
import os, signal, sys
from fencelock import SessionLock, _fence, _recovery, recover
session, point = sys.argv[1:]
stuck = SessionLock(session, lane="slow-run", stamp=True)
stuck.acquire()
stuck.append({"n": 2})
publish = _fence.publish
def late_line_then_named(*args, **kwargs):
    stuck.append({"n": "late"})  # the copy's end was read already
    publish(*args, **kwargs)
    if point == "named":
        os.kill(os.getpid(), signal.SIGKILL)  # named; the old session not marked yet
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # marked, the late line read, not carried
_fence.publish = late_line_then_named
_recovery._carry_tail = killed
recover(session, wait=0)
"""
"""A recover, its stuck run in the same process, killed (SIGKILL) once the fresh session
is named (``named``) or once the old one is marked (``marked``), before it carried the
line the stuck run appended while it copied: ``python -c KILLED_BEFORE_CARRYING SESSION
POINT``."""


@needs_xattr
@pytest.mark.parametrize("point", ["named", "marked"])
def test_the_next_recover_carries_what_a_killed_recover_left_behind(
    session: Path, point: str
) -> None:
    """A recover killed (SIGKILL: nothing of it runs after) between naming the fresh
    session and carrying the lines the old session gained while it copied left those
    lines in the old session alone, which nobody reads once it is marked: the next
    recover, answering that fresh session, carried nothing. It now finishes the move:
    where the fresh session is still the copy (the old session's first bytes, nothing
    appended since), the old session's lines past it go there, under both locks."""
    from fencelock import _moved

    session.write_text('{"n": 1}\n')
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_CARRYING, str(session),
                             point], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fresh = [p for p in session.parent.glob("*.jsonl") if p != session]
    assert len(fresh) == 1, fresh
    ns = [json.loads(x)["n"] for x in fresh[0].read_text().splitlines()]
    assert ns == [1, 2], ns  # the precondition: the late line not carried
    assert (_moved.target(str(session)) is not None) == (point == "marked")
    again = recover(session, wait=0)
    assert (again.action, again.session) == (Action.FRESH, str(fresh[0])), again
    ns = [json.loads(x)["n"] for x in fresh[0].read_text().splitlines()]
    assert ns == [1, 2, "late"], ns
    assert _moved.target(str(session)) == str(fresh[0])
    assert recover(session, wait=0).session == str(fresh[0])  # once: nothing carried twice
    with SessionLock(fresh[0], lane="next", stamp=True) as lock:
        lock.append({"n": 3})
    ns = [json.loads(x)["n"] for x in fresh[0].read_text().splitlines()]
    assert ns == [1, 2, "late", 3], ns
    assert recover(session, wait=0).session == str(fresh[0])  # appended to: not a copy now
    report = verify(fresh[0])
    assert report.ok and report.stamped == 3, report.problems
    assert fresh[0].read_text().count('"late"') == 1


@needs_xattr
@pytest.mark.parametrize("after", ["started empty", "cut by its gateway"])
def test_a_recover_answering_a_finished_move_carries_nothing(
    session: Path, spawn_holder: SpawnHolder, after: str
) -> None:
    """Only a recover killed before it carried leaves lines for the next one to carry
    (its fresh session's record stale, begun from the old session). A finished move is
    answered as it is, even where the fresh session looks like a bare copy of the old
    one's start: one started empty (``--no-carry``) whose first line a run wrote as the
    old session's began, or one whose gateway cut its last turn off. (Carried by a
    byte comparison alone, the old conversation went into both.)"""
    session.write_text('{"n": 1}\n{"n": 2}\n{"n": "stuck turn"}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    moved = recover(session, wait=0, carry=after != "started empty")
    fresh = Path(moved.session)
    with SessionLock(fresh, lane="main"):
        if after == "started empty":
            with fresh.open("a") as f:
                f.write('{"n": 1}\n')  # as the old session's first line
        else:
            os.truncate(fresh, len('{"n": 1}\n{"n": 2}\n'))  # the stuck turn dropped
    kept = fresh.read_text()
    assert recover(session, wait=0, lane="other").session == str(fresh)
    assert fresh.read_text() == kept
    h.call("release")


@needs_xattr
@needs_flock
def test_a_recover_of_a_marked_session_answers_at_once(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The stuck run stopped inside an append holds the old session file's own lock
    (shared): the recover that moves it waits for that (10 s, with a warning). Every
    later recover of the marked session answers at once, with no warning: it takes
    neither lock unless the fresh session's maker was killed before it carried."""
    import fcntl

    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    moved = recover(session, wait=0)  # (moved before anything holds the file)
    fd = os.open(session, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as an append stopped in its write holds it
        for _ in range(2):
            again = recover(session, wait=0)  # a wait warns: an error here
            assert (again.action, again.session) == (Action.FRESH, moved.session)
    finally:
        os.close(fd)
        h.call("release")


@needs_xattr
@needs_flock
def test_a_recover_finishing_a_killed_ones_move_warns_at_its_caller(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recover that finishes a move another recover was killed in (just after
    naming the fresh session), with the old session file held locked by an append that
    stopped in its write, warns that it marked without that lock; the warning is said
    at the line that called `recover`, as every warning of recover's. (It named a
    frame of pytest's: the step that warns is reached along several paths, and a fixed
    stack level fitted one.)"""
    import fcntl

    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    killed = subprocess.run([sys.executable, "-c", KILLED_ON_NAMING, str(session)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    monkeypatch.setattr(_recovery, "MARK_WAIT", 0.05)
    fd = os.open(session, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as an append stopped in its write holds it
        with pytest.warns(FenceLockWarning, match="marked moved without waiting") as said:
            moved = recover(session, wait=0)
    finally:
        os.close(fd)
        h.call("release")
    assert moved.action is Action.FRESH
    assert [w.filename for w in said] == [__file__], [(w.filename, w.lineno) for w in said]


KILLED_AFTER_NAMING_WITH_A_LATE_LINE = """
import os, signal, sys
from fencelock import _fence, recover
session = sys.argv[1]
publish = _fence.publish
def late_line_then_named(*args, **kwargs):
    with open(session, "a") as f:
        f.write('{"n": "late"}\\n')  # the stuck run's late reply, as the copy was made
    publish(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # named; not marked, nothing carried
_fence.publish = late_line_then_named
recover(session, wait=0)
"""


def _ns(path: Path | str) -> list[Any]:
    return [json.loads(x)["n"] for x in Path(path).read_text().splitlines()]


@needs_xattr
def test_a_recover_that_meets_a_killed_makers_copy_as_it_begins_finishes_it(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recover looks for the stuck run's fresh session before another names it and is
    killed (SIGKILL) before carrying; it then takes that session's lock to make it, finds
    it made, and answers it. Taking its lock took over the dead maker's record, the only
    evidence that the move was never finished: the late line stayed in the old session
    for good. It is finished there, while the lock is held."""
    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_NAMING_WITH_A_LATE_LINE,
                             str(session)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fresh = next(p for p in session.parent.glob("*.jsonl") if p != session)
    assert _ns(fresh) == [1]  # the precondition: named, nothing carried
    _named_after_the_first_look(monkeypatch)
    answer = recover(session, wait=0)
    monkeypatch.undo()
    h.call("release")
    assert (answer.action, answer.session) == (Action.FRESH, str(fresh))
    assert _ns(fresh) == [1, "late"]


def _killed_on_naming(session: Path, stuck: Holder) -> Path:
    """A recover of ``stuck``'s run, in a process of its own, SIGKILLed just after it
    named the fresh session (before it marked ``session``): that fresh session."""
    from fencelock import _moved, _successors

    run = probe(session).record
    assert run is not None and run.lane == "stuck", run
    killed = subprocess.run([sys.executable, "-c", KILLED_ON_NAMING, str(session)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fresh = Path(_successors.of_run(str(session), run.run_id, run.token))
    assert _ns(fresh) == [1], _ns(fresh)  # the precondition: named, as a bare copy,
    assert _moved.target(str(session)) is None  # and the old session not marked
    return fresh


@needs_xattr
def test_a_run_queued_behind_the_stuck_one_finishes_a_move_its_killed_recover_left(
    session: Path, store: str | None, spawn_holder: SpawnHolder
) -> None:
    """A recover SIGKILLed after it named the stuck run's fresh session, before it marked
    the old one, left the stuck run's record as the only trace of the move. The run
    queued behind the stuck one took the old session as it let go, wrote over that
    record, and appended its turn there, told stored; the stuck run's own caller,
    told the fresh session (`superseded`), re-fired its turn there: the conversation
    split in two, acknowledged lines stranded in each (a later recover answered the
    old session, the fresh one lacking the stuck run's late reply and the queued
    turn). The queued run's acquire now finishes the move before it takes the session:
    the mark set, the late reply carried; its appends are refused, naming the fresh
    session, and every later recover answers it. (With etcd, the queued run asks once
    the stuck one has let go: a sidecar's waiter is seen in /proc/locks.)"""
    session.write_text('{"n": 1}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    queued = spawn_holder(session, lane="queued")
    if store is None:
        queued.send("acquire")
        wait_for_blocked_waiter(session, proc=queued.proc)  # queued behind the stuck run
    fresh = _killed_on_naming(session, stuck)
    if store is None:  # what tells the queued run to look: the recover's moving bit
        assert _moving(session)
    acked = []
    assert stuck.call('append {"n": "late"}') == "ok"  # not marked: told stored
    acked.append("late")
    assert stuck.call("release") == "released"
    if store is not None:
        queued.send("acquire")
    assert queued.read().startswith("acquired")
    refused = []
    for n in ("q0", "q1"):
        reply = queued.call(f'append {{"n": "{n}"}}')
        if reply == "ok":
            acked.append(n)
        else:
            refused.append(reply)
    assert queued.call("release") == "released"
    with SessionLock(fresh, lane="refired") as lock:  # the stuck run's turn, re-fired
        lock.append({"n": "reply"})
        acked.append("reply")
    answer = recover(session, wait=0)
    stranded = [n for n in acked if n not in _ns(answer.session)]
    assert (answer.action, answer.session, stranded) == (Action.FRESH, str(fresh), [])
    assert _ns(fresh) == [1, "late", "reply"]
    assert len(refused) == 2 and all(
        r.startswith("error SessionMovedError") and str(fresh) in r for r in refused), refused
    assert _ns(session) == [1, "late"]  # nothing written there after the move
    assert verify(fresh).ok
    assert store is not None or not _moving(session)  # cleared once the move is finished


@needs_xattr
def test_a_move_is_said_to_the_moved_run_and_to_a_later_one_each_as_it_is(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The run a recover moved is told its turn is answered again in the fresh session;
    a run that took the session after the move (queued behind it) is told that nothing
    of its own was written and to do its turn there: told the first, a gateway would
    drop a turn nobody answers."""
    session.write_text('{"n": 1}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    fresh = recover(session, wait=0).session
    moved = stuck.call('append {"n": "late"}')
    assert moved.startswith("error SessionMovedError"), moved
    assert "where its last turn is answered again" in moved, moved
    assert stuck.call("release") == "released"
    with SessionLock(session, lane="queued") as lock:
        with pytest.raises(SessionMovedError) as later:
            lock.append({"n": "q"})
        assert later.value.later and later.value.moved_to == fresh
        assert later.value.actual is not None  # the file is there: no "no file"
        assert "before this run took the session; nothing of this run's was written" \
            in str(later.value)
        with pytest.raises(SessionMovedError) as again, lock.prompt_window():
            pass
        assert again.value.later
    assert _ns(session) == [1]


@needs_xattr
def test_a_run_whose_lines_went_in_before_the_move_is_told_they_were_carried(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A run that took the session after the stuck run let go, while the recover copied,
    wrote a line there before the move's mark: the recover carries it to the fresh
    session. Told "nothing of this run's was written here" (``later``), its caller
    would write that line again in the fresh session; it is told its lines were carried
    (``carried``), and to write the rest of its turn there."""
    session.write_text('{"n": 1}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    with paused_recover(session) as mover:
        assert stuck.call("release") == "released"
        with SessionLock(session, lane="between") as lock:
            lock.append({"n": "user"})  # not marked yet: in, and carried
            fresh = mover.go()
            with pytest.raises(SessionMovedError) as moved:
                lock.append({"n": "reply"})
    assert moved.value.carried and not moved.value.later, moved.value
    assert "Write the rest of its turn in" in str(moved.value)
    assert _ns(Path(fresh)) == [1, "user"]


ORIGIN_OF_ITS_OWN = """
import os, signal, sys
from fencelock import SessionLock
lock = SessionLock(sys.argv[1], lane="mine", origin=sys.argv[2])
lock.acquire()
lock.append({"n": "made"})
os.kill(os.getpid(), signal.SIGKILL)
"""
"""A run of a session made with an ``origin`` of the caller's own, killed holding it:
``python -c ORIGIN_OF_ITS_OWN SESSION ORIGIN``."""


@needs_xattr
def test_a_stale_record_with_an_origin_of_the_caller_s_own_moves_nothing(
    session: Path, tmp_path: Path
) -> None:
    """``origin`` is the caller's to give (a session branched from another). A run of
    such a session that died leaves a stale record naming its origin, which is no
    unfinished move of a recover's: the next run neither marks the origin moved (its
    later runs were refused) nor carries its lines."""
    session.write_text('{"n": 1}\n')
    branch = session.with_name("branch.jsonl")
    died = subprocess.run([sys.executable, "-c", ORIGIN_OF_ITS_OWN, str(branch), str(session)],
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    with SessionLock(session, lane="later") as lock:
        lock.append({"n": 2})  # the origin goes on: the branch took nothing from it
    with SessionLock(branch, lane="next") as lock:  # takes over the stale record
        assert lock.info is not None and lock.info.previous is not None
        lock.append({"n": "branch"})
    from fencelock import _moved

    assert _moved.target(str(session)) is None
    assert _ns(branch) == ["made", "branch"]
    with SessionLock(session, lane="after") as lock:
        lock.append({"n": 3})
    assert _ns(session) == [1, 2, 3]


@needs_xattr
def test_an_async_acquire_leaves_a_move_to_finish_to_its_thread(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The first run of a fresh session whose recover was killed finishes the move, which
    waits for the old session's own lock (an append of the stuck run holds it while its
    line goes in). `acquire_async` first tries on the event loop, for a free session:
    the wait stalled the loop (up to 10 s); it now leaves that to its thread, and the
    loop goes on."""
    import asyncio
    import fcntl

    session.write_text('{"n": 1}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    fresh = _killed_on_naming(session, stuck)
    appending = os.open(session, os.O_RDONLY)
    fcntl.flock(appending, fcntl.LOCK_SH)  # as an append does while its line goes in
    ticked = threading.Event()
    try:
        async def main() -> bool:
            async def tick() -> None:
                for _ in range(5):
                    await asyncio.sleep(0.01)
                ticked.set()

            ticking = asyncio.ensure_future(tick())
            lock = SessionLock(fresh, lane="refired")
            taking = asyncio.ensure_future(lock.acquire_async())
            await asyncio.sleep(0)  # the acquire's first try, on the loop
            went_on = await asyncio.get_running_loop().run_in_executor(
                None, ticked.wait, 30)
            fcntl.flock(appending, fcntl.LOCK_UN)  # the append's line is in
            await taking
            await ticking
            lock.release()
            return went_on

        assert asyncio.run(main()), "the event loop stalled while the move was finished"
    finally:
        os.close(appending)
    from fencelock import _moved

    assert _moved.target(str(session)) == str(fresh)


def _moving(session: Path) -> bool:
    """Whether the session's sidecar has the bit a recover sets while it moves the run."""
    from fencelock import _sidecar

    return bool(os.stat(f"{session}.holder").st_mode & _sidecar.MOVING)


@needs_xattr
@pytest.mark.parametrize("ends", ["marked", "failed before naming"])
def test_a_recover_that_moves_a_run_leaves_its_moving_bit_set_only_while_it_moves(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, ends: str
) -> None:
    """The sidecar's moving bit (which makes the next acquire look for an unfinished
    move) is set from before the fresh session is named until the old session is
    marked, and cleared where the recover fails before naming it: later acquires do
    not pay for the look, and the sidecar keeps its own mode."""
    from fencelock import _fence

    session.write_text('{"n": 1}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    seen = []
    publish = _fence.publish

    def watched(*args: Any, **kwargs: Any) -> None:
        before_name = kwargs["before_name"]

        def then_look() -> None:
            before_name()
            seen.append(_moving(session))
            if ends != "marked":
                raise OSError(errno.ENOSPC, "no space left on device")

        kwargs["before_name"] = then_look
        publish(*args, **kwargs)

    monkeypatch.setattr(_fence, "publish", watched)
    if ends == "marked":
        assert recover(session, wait=0).action is Action.FRESH
    else:
        with pytest.raises((FenceLockError, OSError)):
            recover(session, wait=0)
    assert seen == [True]
    assert not _moving(session)
    assert stat.S_IMODE(os.stat(f"{session}.holder").st_mode) == 0o600


@needs_xattr
def test_the_first_run_of_a_fresh_session_finishes_the_move_its_killed_recover_left(
    session: Path, store: str | None, spawn_holder: SpawnHolder
) -> None:
    """The stuck run's caller, told the fresh session (`superseded`) just after a recover
    named it and was SIGKILLed, re-fires its turn there: its acquire took over the
    dead recover's stale record, the trace of the unfinished move, and wrote its own.
    The old session stayed unmarked, its late reply in it alone, and the stuck run and
    every run queued behind it went on writing there. The fresh session's first run
    now finishes the move as its acquire ends (its record naming the old session as
    its origin until then): the mark set, the late reply carried before its own."""
    session.write_text('{"n": 1}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    fresh = _killed_on_naming(session, stuck)
    assert stuck.call('append {"n": "late"}') == "ok"  # not marked yet: told stored
    with SessionLock(fresh, lane="refired") as lock:
        assert lock.info is not None and lock.info.origin is None
        on_disk = probe(fresh).record
        assert on_disk is not None and on_disk.origin is None  # said only while finishing
        assert _ns(fresh) == [1, "late"]
        lock.append({"n": "reply"})
        moved = stuck.call('append {"n": "later"}')
        assert moved.startswith("error SessionMovedError") and str(fresh) in moved, moved
    assert stuck.call("release") == "released"
    answer = recover(session, wait=0)
    assert (answer.action, answer.session) == (Action.FRESH, str(fresh))
    assert _ns(fresh) == [1, "late", "reply"]
    assert _ns(session) == [1, "late"]


@needs_xattr
@pytest.mark.parametrize("fails", ["the directory's fsync", "the fresh session's stat"])
def test_a_recover_that_fails_once_the_copy_is_named_still_carries(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """Once the copy is named, a failure that is not an interrupt ends the recover with
    its warning that finishing failed (the copy is the session to use): the old
    session's late line is carried all the same, and counted. (A failing stat of the
    copy skipped the carry, and its clean release left no recover to finish it.)"""
    from fencelock import _fence, _fingerprint

    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    publish, take = _fence.publish, _fingerprint.take

    def late_line_then_published(*args: Any, **kwargs: Any) -> None:
        assert h.call('append {"n": "late"}') == "ok"  # the stuck run's late reply
        publish(*args, **kwargs)

    def dir_fsync_fails(directory: str) -> None:
        raise SessionWriteError(directory, OSError(errno.EIO, "Input/output error"),
                                "fsync of the directory", stored=True)

    def stat_fails_once(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith(".jsonl") and path != str(session) and not failed:
            failed.append(path)
            raise OSError(errno.ESTALE, "Stale file handle")
        return take(path, *args, **kwargs)

    failed: list[str] = []
    monkeypatch.setattr(_fence, "publish", late_line_then_published)
    if fails == "the directory's fsync":
        monkeypatch.setattr(_fence, "_fsync_dir", dir_fsync_fails)
    else:
        monkeypatch.setattr(_fingerprint, "take", stat_fails_once)
    with pytest.warns(FenceLockWarning, match="finishing it failed"):
        moved = recover(session, wait=0)
    monkeypatch.undo()
    h.call("release")
    assert _ns(moved.session) == [1, "late"]
    assert moved.carried_lines == 2, moved


@needs_xattr
def test_status_and_probe_show_where_a_moved_conversation_went(
    session: Path, store: str | None
) -> None:
    """An operator looking at the old session learns that runs there are refused, and
    where the conversation is: `probe`/`scan` give `moved_to`, `status` shows it in
    its STATE cell and its JSON; once the fresh session is deleted, nothing."""
    session.write_text('{"n": 1}\n')
    with SessionLock(session, lane="stuck"):
        assert probe(session).moved_to is None
        fresh = recover(session, wait=0).session
        assert probe(session).moved_to == fresh
    rows = {row.session: row for row in scan(session.parent)}
    assert rows[str(session)].moved_to == fresh and rows[fresh].moved_to is None, rows
    cmd = [sys.executable, "-m", "fencelock", "status"]
    shown = subprocess.run([*cmd, str(session)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    state = shown.stdout.splitlines()[1].split("  ")[1]
    assert state in ("free (moved)", "stale (moved)"), shown.stdout
    listed = subprocess.run([*cmd, "--json", str(session.parent)], capture_output=True,
                            text=True, timeout=60)
    assert {row["session"]: row["moved_to"] for row in json.loads(listed.stdout)} == {
        str(session): fresh, fresh: None}, listed.stdout
    os.unlink(fresh)
    assert probe(session).moved_to is None


@needs_xattr
@pytest.mark.parametrize("writer", ["stuck", "queued"])
def test_a_line_appended_while_the_recover_copies_goes_to_the_fresh_session(
    session: Path, store: str | None, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """A line goes into the old session after the recover has read where the old
    transcript ends, before the copy is named and the old session marked: the stuck
    run's late reply, or the line of a run queued behind it that took the session as it
    let go. Its writer is told nothing then (no mark yet), so the line must not stay
    behind in the old session only: the recover reads the old session's end again once
    its mark is set and carries it; the writer's next append is refused."""
    from fencelock import _fence

    session.write_text('{"n": 1}\n')
    real = _fence.publish
    late: list[SessionLock] = []
    lock = SessionLock(session, lane="slow-run", stamp=True)
    lock.acquire()
    lock.append({"n": 2})
    if writer == "queued" and store is None:
        # The session's token mark at the stuck run's token (as at the end of a block
        # of reserved tokens): the queued runs' tokens go past every token the copy
        # knew of, and the fresh session's run must go above their stamps.
        os.setxattr(session, _tokens.XATTR, str(lock._token).encode(),
                    follow_symlinks=False)

    def publish_after_late_lines(*args: Any, **kwargs: Any) -> None:
        if writer == "stuck":
            lock.append({"n": "late"})  # the copy's end was read already
            lock.append({"n": "later"})
            late.append(lock)
        else:
            lock.release()
            for n in ("late", "later"):
                queued = SessionLock(session, lane=f"cron-{n}", stamp=True)
                queued.acquire(timeout=30)
                queued.append({"n": n})
                late.append(queued)
                if n == "late":
                    queued.release()
        real(*args, **kwargs)

    monkeypatch.setattr(_fence, "publish", publish_after_late_lines)
    moved = recover(session, wait=0)
    monkeypatch.setattr(_fence, "publish", real)
    assert moved.action is Action.FRESH and moved.carried_lines == 4, moved
    with pytest.raises(SessionMovedError) as refused:
        late[-1].append({"n": "after the move"})
    assert refused.value.moved_to == moved.session and not refused.value.stored
    late[-1].release()
    carried = Path(moved.session).read_text().splitlines()
    assert [json.loads(x)["n"] for x in carried] == [1, 2, "late", "later"]
    assert session.read_text().splitlines() == carried
    for _ in range(2):
        with SessionLock(moved.session, lane="re-fired", stamp=True) as refired:
            refired.append({"n": 3})  # its token above every carried line's stamp
    report = verify(moved.session)
    assert report.ok and report.stamped == 5, report.problems


@needs_xattr
@pytest.mark.parametrize("late", ["stuck run", "queued run"])
def test_an_interrupt_as_a_recover_marks_and_carries_leaves_no_line_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: str
) -> None:
    """A recover interrupted (Ctrl-C, a SIGTERM handler's exception) at any point of its
    code where a signal handler can run: where it has marked the old session moved, the
    fresh session has every line of the old one, the stuck run's late reply, written
    while the copy was made, included. An interrupt between the mark and the carry left
    that reply in the old session only, which nobody reads once it is marked. Nor is
    the old session left open (its descriptor would keep the exclusive lock that holds
    up every append to it), and the next recover answers with every line too. The
    ``queued run``'s late line is stamped above the fresh session's token, which the
    carry raises first (an interrupt right after that left a fence point the carry,
    run again, took for a foreign write)."""
    from interrupts import fds_naming, interrupted_at

    from fencelock import _fence, _moved

    real = _fence.publish
    number = marked_and_fired = 0
    while True:
        session = tmp_path / f"walk-{number}" / "s.jsonl"
        session.parent.mkdir()
        session.write_text('{"n": 1}\n')
        stuck = SessionLock(session, lane="slow-run")
        stuck.acquire()
        stuck.append({"n": 2})

        def publish_after_late_line(*args: Any, lock: SessionLock = stuck,
                                    old: Path = session, **kwargs: Any) -> None:
            if late == "stuck run":
                lock.append({"n": "late"})  # the copy's end was read already
            else:  # a run queued behind it, its token far above (as after a reservation)
                with old.open("a") as f:
                    f.write(json.dumps({"n": "late", STAMP_KEY: {
                        "token": 10_000, "run_id": "queued"}}) + "\n")
            real(*args, **kwargs)

        monkeypatch.setattr(_fence, "publish", publish_after_late_line)
        try:
            fired, _ = interrupted_at(number, functools.partial(recover, session, wait=0),
                                      [_recovery.__file__, _fence.__file__, _moved.__file__])
        finally:
            monkeypatch.setattr(_fence, "publish", real)
            stuck.release()
        assert not fds_naming(f"/{session.parent.name}/s.jsonl"), number
        fresh = _moved.target(str(session))
        if fresh is not None:
            lines = [json.loads(x)["n"] for x in Path(fresh).read_text().splitlines()]
            assert lines == [1, 2, "late"], (number, lines)
            marked_and_fired += fired
        answer = recover(session, wait=0)
        if answer.session != str(session):  # (interrupted before naming: made again now)
            lines = [json.loads(x)["n"] for x in Path(answer.session).read_text().splitlines()]
            assert lines == [1, 2, "late"], (number, lines)
        if not fired:
            break
        number += 1
    assert fresh is not None and marked_and_fired > 5  # the points after the mark walked


@needs_xattr
def test_a_content_fenced_run_learns_of_the_move_at_its_next_write(session: Path) -> None:
    """The content fence sees no ctime, which the mark moves: its run looks at the
    mark at every append and fence check (it appended after the move)."""
    session.write_text('{"n": 1}\n')
    with SessionLock(session, lane="slow-run", fence="content") as lock:
        lock.append({"n": 2})
        moved = recover(session, wait=0)
        assert moved.action is Action.FRESH
        for write in (lambda: lock.append({"n": 3}), lock.verify_fence):
            with pytest.raises(SessionMovedError) as told:
                write()
            assert told.value.moved_to == moved.session
    assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2]


@needs_xattr
def test_a_mark_naming_no_other_session_is_no_move(session: Path) -> None:
    """A mark is a recover's only where it names another session file beside this one:
    one naming the session itself (every run refused, for good), its sidecar, or a
    file that is not a session, set by whoever may write the file, is ignored."""
    from fencelock import _moved

    session.write_text('{"n": 1}\n')
    with SessionLock(session, lane="first"):
        pass
    (session.parent / "notes.txt").write_text("x\n")
    for name in (session.name, session.name + ".holder", "notes.txt", "../x.jsonl"):
        os.setxattr(session, _moved.XATTR, name.encode())
        with SessionLock(session, lane="next") as lock:
            assert lock.superseded() is None, name
            lock.append({"n": name})
    assert recover(session, wait=0).action is Action.REFIRE


@needs_xattr
def test_a_run_moved_during_its_model_call_is_told_as_its_prompt_window_ends(
    session: Path, store: str | None
) -> None:
    """The move comes while the run waits for its model (the prompt window): the
    window's end says so (`SessionMovedError`, naming the fresh session), as it says a
    foreign write, and the run's reply goes nowhere it would be lost."""
    session.write_text('{"n": 1}\n')
    with SessionLock(session, lane="slow-run") as lock:
        with pytest.raises(SessionMovedError) as told, lock.prompt_window():
            moved = recover(session, wait=0)
        assert moved.action is Action.FRESH
        assert told.value.moved_to == moved.session == lock.superseded(), told.value
    assert session.read_text() == '{"n": 1}\n'


def _full_disk_once_named() -> Callable[[SessionLock], None]:
    """`SessionLock._write_record` failing with ENOSPC for recover's lock on a fresh
    session once the copy has its name (a full disk at the record's write after it);
    as it is for every other lock."""
    from fencelock import _lock

    real = _lock.SessionLock._write_record

    def full_disk(self: SessionLock) -> None:
        if self._sole_name and os.path.lexists(self.session):  # the fresh one, named
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    return full_disk


@pytest.mark.parametrize("fault", ["record", "directory fsync"])
def test_a_fresh_session_made_whole_is_answered_though_finishing_it_failed(
    session: Path, spawn_holder: SpawnHolder, store: str | None, fault: str
) -> None:
    """Once the copy has its name, the fresh session is the one every later recover of the
    stuck run answers, and the one `superseded` tells that run: a recover that fails
    after that (the directory's fsync, the record's write on a full disk) answers it
    too, with a warning, rather than fail, so that its caller re-fires the turn there
    (it used to fail, and a run that asked dropped its reply while nobody re-fired the
    turn)."""
    from fencelock import _fence, _lock, _successors

    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")  # in the store under test
    h.acquire()
    stuck = probe(session).record
    assert stuck is not None
    def directory_fsync(directory: str) -> None:
        raise SessionWriteError(directory, OSError(errno.EIO, "Input/output error"),
                                "fsync of the directory", stored=True)

    with pytest.MonkeyPatch.context() as m:
        if fault == "record":
            m.setattr(_lock.SessionLock, "_write_record", _full_disk_once_named())
        else:
            m.setattr(_fence, "_fsync_dir", directory_fsync)
        with pytest.warns(FenceLockWarning, match="the fresh session is made"):
            result = recover(session, wait=0)
    assert result.action is Action.FRESH and result.carried_lines == 1
    assert result.session == _successors.of_run(str(session), stuck.run_id, stuck.token)
    assert Path(result.session).read_text() == '{"n": 1}\n'
    again = recover(session, wait=0)
    assert (again.action, again.session, again.carried_lines) == (Action.FRESH, result.session, 0)
    assert probe(result.session).state == ProbeState.FREE


def test_a_fresh_session_whose_warning_is_raised_is_not_left_behind_unnamed(
    tmp_path: Path, foreign_holder: SpawnForeignHolder
) -> None:
    """With warnings as errors (``-W error``), the warning of a fresh session made whole
    whose finishing failed is raised, and the recover fails: a fresh session named after
    no stuck run (its holder is outside fencelock: no record) would then be a copy of the
    conversation that nobody knows of. It is removed; the old session stays as it was."""
    from fencelock import _lock

    session = tmp_path / "s.jsonl"
    session.write_text('{"n": 1}\n')
    foreign_holder(str(session) + ".holder")  # flock(1): a holder with no record
    with pytest.MonkeyPatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("error", FenceLockWarning)
        m.setattr(_lock.SessionLock, "_write_record", _full_disk_once_named())
        with pytest.raises(FenceLockWarning, match="the fresh session is made"):
            recover(session, wait=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "s.jsonl", "s.jsonl.holder"]
    assert session.read_text() == '{"n": 1}\n'


@pytest.mark.parametrize("planted", [False, pytest.param(True, marks=needs_root)])
def test_a_file_at_the_fresh_session_s_name_that_no_recover_made_is_no_move(
    tmp_path: Path, planted: bool
) -> None:
    """`superseded` answers only a fresh session as a recover makes it: not a directory
    at that name, nor another user's file in a directory anyone can write to (made in
    advance to make the run drop its reply). A file of the run's own user is one."""
    from fencelock import _successors

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    session = shared / "s.jsonl"
    lock = SessionLock(session, lane="run")
    with lock:
        info = lock.info
        assert info is not None
        fresh = Path(_successors.of_run(str(session), info.run_id, info.token))
        fresh.mkdir()
        assert lock.superseded() is None
        fresh.rmdir()
        fresh.write_text("")
        if planted:
            os.chown(fresh, 65534, 65534)
            assert lock.superseded() is None
        else:
            assert lock.superseded() == str(fresh)


def test_nothing_signals_the_holder(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session)
    h.acquire()
    recover(session, wait=0.05)
    assert h.proc.poll() is None and h.call("touch") == "ok"


def test_fresh_session_is_a_new_uuid_beside_the_old_one(session: Path) -> None:
    new = fresh_session(session)
    assert os.path.dirname(new) == str(session.parent) and new.endswith(".jsonl")
    assert not os.path.exists(new) and new != fresh_session(session)


LOW_MEMORY_RECOVER = """
import json, resource, sys, uuid
from fencelock import recover
session, headroom = sys.argv[1], int(sys.argv[2])
with open("/proc/self/status") as f:
    used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + headroom, used + headroom))
r = recover(session, wait=0)
print(json.dumps({"action": str(r.action), "session": r.session, "lines": r.carried_lines,
                  "limit": used + headroom}))
"""


@needs_proc
def test_a_stuck_run_that_lets_go_as_its_fresh_session_is_begun_gets_a_refire(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recover that waited out the stuck run, then saw it let go just before it began
    the fresh session: a recover coming after that finds the run gone and no fresh
    session begun, and re-fires; so this one must re-fire too, or the conversation goes
    on in two places. The decision is taken again under the fresh session's lock."""
    session.write_text('{"n": 1}\n')
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    real = _tokens.last_stamped
    held = [True]

    def let_go_first(path: str) -> int:
        if held[0] and path == str(session):
            held[0] = False
            assert h.call("release") == "released"  # the stuck run ends right here
        return real(path)

    monkeypatch.setattr(_tokens, "last_stamped", let_go_first)
    before = set(session.parent.iterdir())
    first = recover(session, wait=0)
    monkeypatch.undo()
    later = recover(session, wait=0)
    assert (first.action, first.session) == (Action.REFIRE, str(session))
    assert (later.action, later.session) == (Action.REFIRE, str(session))
    assert set(session.parent.iterdir()) == before  # no fresh session, no sidecar of one


@needs_xattr
def test_a_fresh_session_s_tokens_start_above_the_old_session_s_mark(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The old session's token floor (its mark, kept by a sidecar removed before) binds
    the fresh session that carries its lines, as it would bind the old session's next
    run."""
    session.write_text('{"n": 1}\n')
    holder = spawn_holder(session, lane="stuck")
    holder.acquire()
    os.setxattr(session, "user.fencelock.token", b"5000")
    fresh = recover(session, wait=0)
    assert fresh.action is Action.FRESH
    with SessionLock(fresh.session, "next") as lock:
        assert lock.info is not None and lock.info.token > 5000


@pytest.mark.parametrize("stamp", ["past the limit", "at the limit, far from the end"])
def test_a_carried_stamp_at_or_past_the_token_limit_never_makes_a_corrupt_record(
    session: Path, spawn_holder: SpawnHolder, stamp: str
) -> None:
    """A stamp past 2**63-1 was never issued: it sets no floor for the fresh session's
    token (it made a record no reader takes). One at the limit leaves no token above
    it: recover says so and makes nothing."""
    token = MAX_TOKEN + 1 if stamp == "past the limit" else MAX_TOKEN
    lines = [json.dumps({"n": 0, STAMP_KEY: {"token": token, "run_id": "x"}})]
    lines += [json.dumps({"n": i, "pad": "p" * 1000}) for i in range(1, 100)]  # 100 KB on
    session.write_text("\n".join(lines) + "\n")
    holder = spawn_holder(session, lane="stuck")
    holder.acquire()
    before = set(session.parent.iterdir())
    if stamp == "past the limit":
        fresh = recover(session, wait=0)
        assert fresh.action is Action.FRESH and fresh.carried_lines == 100
        assert probe(fresh.session).state == "free"  # its record reads
        with SessionLock(fresh.session, "next") as lock:
            assert lock.info is not None and lock.info.token < MAX_TOKEN
    else:
        with pytest.raises(FenceLockError, match="largest token"):
            recover(session, wait=0)
        assert set(session.parent.iterdir()) == before  # nothing made


def test_carrying_a_session_larger_than_memory_to_a_fresh_one(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """recover copies the old transcript in bounded chunks: a process whose address
    space cannot hold the session still carries all of it, stamps included."""
    line = b'{"role":"user","content":"' + b"x" * 1000 + b'"}\n'
    long_stamped = (b'{"content":"' + b"y" * (3 << 20) + b'","_fencelock":{"token":70000,'
                    b'"run_id":"r-70000"}}\n')  # longer than a chunk, stamped at its end
    with open(session, "wb") as f:
        for n in range(64):
            f.write(line * 1024)  # 64 MiB in all
            if n == 20:
                f.write(long_stamped)
        f.write(b'{"tail":1,"_fencelock":{"token":500,"run_id":"r-500"}}\n')
        f.write(b'{"torn')  # an unfinished line stays behind
    size = session.stat().st_size
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    headroom = 32 << 20
    done = subprocess.run([sys.executable, "-c", LOW_MEMORY_RECOVER, str(session), str(headroom)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["limit"] < size  # the process could not have held the session whole
    assert result["action"] == "fresh" and result["lines"] == 64 * 1024 + 2
    new = Path(result["session"])
    assert new.stat().st_size == size - len(b'{"torn')
    with open(session, "rb") as old, open(new, "rb") as copy:
        while block := copy.read(1 << 20):
            assert old.read(len(block)) == block
    record = probe(new).record
    assert record is not None and record.token == 70001  # above the stamp in the middle
    assert probe(session).state == ProbeState.LIVE


@pytest.mark.parametrize("kind", ["corrupt", "symlink", "fifo"])
def test_an_unreadable_session_raises_the_error_of_its_kind(session: Path, kind: str) -> None:
    """recover raises what SessionLock would (CorruptRecordError, UnsafeSidecarError),
    not a bare FenceLockError a caller cannot tell apart, and touches nothing."""
    sidecar = Path(str(session) + ".holder")
    victim = session.parent / "victim"
    victim.write_bytes(b"keep")
    if kind == "corrupt":
        sidecar.write_bytes(b"{not a record")
    elif kind == "symlink":
        sidecar.symlink_to(victim)
    else:
        os.mkfifo(sidecar)
    before = sorted((p.name, os.lstat(p).st_mtime_ns) for p in session.parent.iterdir())
    expected = CorruptRecordError if kind == "corrupt" else UnsafeSidecarError
    with pytest.raises(expected) as exc:
        recover(session, wait=0)
    assert str(exc.value).startswith(f"{sidecar}: ")
    with pytest.raises(expected):
        SessionLock(session, "a", on_contention="fail").acquire()
    assert sorted((p.name, os.lstat(p).st_mtime_ns) for p in session.parent.iterdir()) == before
    assert victim.read_bytes() == b"keep"


def test_a_late_recover_never_refires_past_a_fresh_session_still_being_made(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last run has ended, and a recover of it is still making its fresh session
    past the wait for it (held here by another process): a late recover says so, as one
    that meets it while the run is live does, instead of answering the old session."""
    from fencelock import _recovery
    from fencelock._recovery import _successor

    with SessionLock(session, "stuck-then-done") as lock:
        lock.append({"n": 1})
    successor = _successor(str(session), probe(session).record)
    assert successor is not None
    maker = spawn_holder(Path(successor), lane="making")
    maker.acquire()
    monkeypatch.setattr(_recovery, "SUCCESSOR_WAIT", 0.2)
    with pytest.raises(FenceLockError, match="another recover has been making"):
        recover(session, wait=0)
    assert maker.call("release") == "released"


def test_lines_rewritten_while_recover_copies_them_make_no_fresh_session(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer outside the protocol rewrites the old transcript in place between the
    scan of its lines (their count, their highest stamp) and the copy: the copy would
    mix both versions, with stamps the scan never saw. Recover refuses, and leaves
    nothing of the fresh session behind."""
    session.write_bytes(b'{"role":"user","content":"hi"}\n' * 4)
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    scan = _recovery._scan

    def scan_then_rewrite(fd: int, name: str, end: int) -> tuple[int, int, bytes]:
        found = scan(fd, name, end)
        with open(session, "r+b") as f:  # same size, other lines, a higher stamp
            f.write(b'{"_fencelock":{"token":900000,"run_id":"x"},"c":1}\n'.ljust(end - 1)
                    + b"\n")
        return found

    monkeypatch.setattr(_recovery, "_scan", scan_then_rewrite)
    with pytest.raises(FenceLockError, match="rewritten while recover copied it"):
        recover(session, wait=0)
    leftovers = sorted(p.name for p in session.parent.iterdir())
    assert leftovers == [session.name, session.name + ".holder"], leftovers


def test_a_stamp_spelled_with_an_escape_counts_for_the_token_floor(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A stamp whose key is written with a JSON escape is a stamp to every parser, and to
    verify: a first acquire, and a fresh session carrying the line, go above it."""
    session.write_bytes(b'{"\\u005ffencelock":{"token":50000,"run_id":"a"}}\n')
    with SessionLock(session) as lock:  # no sidecar yet: the floor comes from the lines
        assert lock.info is not None and lock.info.token > 50000
    Path(str(session) + ".holder").unlink()
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    result = recover(session, wait=0)
    assert result.action is Action.FRESH and result.carried_lines == 1
    fresh = probe(result.session).record
    assert fresh is not None and fresh.token > 50000


LOCK_WHEN_TOLD = """
import fcntl, os, sys
sys.stdin.readline()
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_recover_that_saw_the_run_let_go_answers_its_fresh_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Recovers wait on a stuck run that another recover has already moved to a fresh
    session; the run's process dies. A recover whose wait saw the lock let go, and whose
    next look meets the lock taken for an instant (another recover's test of it, or its
    clear of the stale record) while the dead run's record still names it and its
    process is still exiting, answers that fresh session too: it re-fired the old
    session, splitting the conversation in two. (Where the old session carries no mark,
    as on a filesystem without extended attributes: a mark is answered at once.)"""
    from fencelock import _moved, _wait

    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    first = recover(session, wait=0)
    assert first.action is Action.FRESH
    with contextlib.suppress(OSError):  # (none where the filesystem keeps none)
        os.removexattr(session, _moved.XATTR)
    sidecar = str(session) + ".holder"
    locker = subprocess.Popen([sys.executable, "-c", LOCK_WHEN_TOLD, sidecar],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert locker.stdin is not None and locker.stdout is not None
    waited = _wait.wait_until_unlocked.__code__

    def lock_as_the_wait_returns(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is waited and arg:
            assert locker.stdin is not None and locker.stdout is not None
            locker.stdin.write("lock\n")
            locker.stdin.flush()
            assert locker.stdout.readline() == "locked\n"

    def drop_once_waited() -> None:
        assert wait_for_blocked_waiter(session)
        assert stuck.call("drop") == "dropped"

    dropper = threading.Thread(target=drop_once_waited)
    dropper.start()
    sys.setprofile(lock_as_the_wait_returns)
    try:
        again = recover(session, wait=60)
    finally:
        sys.setprofile(None)
        dropper.join()
        locker.stdin.close()
        locker.wait()
        locker.stdout.close()
    assert (again.action, again.session) == (Action.FRESH, first.session)


def _scan_line_by_line(data: bytes) -> tuple[int, int]:
    """What `_recovery._scan` must find: each whole line's token, a line longer than
    `_LONG_LINE` read from its end."""
    whole = data.split(b"\n")[:-1]
    return len(whole), max([
        _tokens.trailing_token(line) if len(line) > _recovery._LONG_LINE
        else _tokens.line_token(line) for line in whole
    ], default=0)


@pytest.mark.parametrize("seed", range(30))
def test_recover_s_scan_finds_each_line_s_token_whatever_the_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """The scan of the transcript recover carries reads it a chunk at a time and hands
    the chunk's short lines to `_tokens.largest_token` together: line counts and the
    highest token must be those of a scan line by line, wherever the chunks end and
    whatever the lines hold (long lines, odd stamps, no newline at the end)."""
    import hashlib
    import random

    rng = random.Random(seed)
    monkeypatch.setattr(_recovery, "CARRY_CHUNK", rng.choice([7, 64, 300, 4096]))
    monkeypatch.setattr(_recovery, "_LONG_LINE", rng.choice([20, 200, 5000]))
    lines = []
    for n in range(rng.randrange(0, 40)):
        pick = rng.random()
        text = "x" * rng.choice([0, 5, 100, 400])
        stamp = {"token": rng.randrange(1, 500), "run_id": f"r{n}"}
        if pick < 0.6:
            lines.append(json.dumps({"t": text, STAMP_KEY: stamp}, separators=(",", ":")))
        elif pick < 0.7:  # the largest stamp nested: the line counts for its own
            lines.append(json.dumps({"copy": {STAMP_KEY: {"token": 999, "run_id": "c"}},
                                     STAMP_KEY: stamp}, separators=(",", ":")))
        elif pick < 0.8:  # not JSON: read from its end
            lines.append('{"cut' + json.dumps({STAMP_KEY: stamp}, separators=(",", ":")))
        elif pick < 0.9:  # the key spelled with an escape: a long line's end shows none
            lines.append(f'{{"t":"{text}","\\u005ffencelock":'
                         f'{{"token":{1000 + n},"run_id":"e"}}}}')
        else:
            lines.append(json.dumps({"t": text}))
    data = "\n".join(lines).encode() + rng.choice([b"", b"\n", b'{"torn":'])
    path = tmp_path / "s.jsonl"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = _recovery._scan(fd, str(path), len(data))
    finally:
        os.close(fd)
    assert found[:2] == _scan_line_by_line(data)
    assert found[2] == hashlib.blake2b(data, digest_size=16).digest()


def test_clear_removes_the_copy_a_recover_killed_mid_copy_left(session: Path) -> None:
    """A recover killed while it copied left its fresh session's `.part` and a stale
    record; once its stuck run has ended, no recover comes back for that name. `clear`
    of the fresh session removes the part with the record, saying so; a `.part` beside
    a session that is no recover's fresh one is not clear's to touch."""
    session.write_text('{"role": "user", "content": "hi"}\n')
    fresh = fresh_session(session)
    done = subprocess.run([sys.executable, "-c", KILLED_MID_COPY, fresh, str(session)],
                          timeout=60)
    assert done.returncode == -9 and os.path.exists(fresh + ".part")
    found = clear(fresh)
    assert found.state == ProbeState.STALE, found
    assert f"removed {fresh}.part" in found.reason, found.reason
    assert not os.path.lexists(fresh + ".part")
    assert probe(fresh).state == ProbeState.FREE
    ours = Path(str(session) + ".part")
    ours.write_text("someone's own file\n")
    with SessionLock(session, lane="run"):
        pass
    assert "removed" not in clear(session).reason and ours.exists()
    # Nor beside a session with no file whose run, one with an origin, ended well.
    other = session.with_name("other.jsonl")
    with SessionLock(other, lane="run", origin=str(session)):
        pass
    theirs = Path(str(other) + ".part")
    theirs.write_text("someone's own file\n")
    assert "removed" not in clear(other).reason and theirs.exists()
