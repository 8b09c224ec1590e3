"""docs/examples/hold-turn.mjs, run by a real ``node`` against real sessions.

Node is required in CI (``marks.require("node")``): there a missing ``node`` fails
these tests rather than skipping them, so the example cannot rot unseen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import marks
import pytest
from conftest import SpawnHolder, paused_recover, wait_for_blocked_waiter

from fencelock import probe, scan

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "hold-turn.mjs"


@pytest.fixture(scope="module")
def node() -> str:
    marks.require("node")
    found = shutil.which("node")
    assert found is not None
    return found


@pytest.fixture
def fencelock_bin(tmp_path: Path) -> str:
    """A ``fencelock`` that runs this checkout with this interpreter."""
    script = tmp_path / "fencelock"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fencelock "$@"\n')
    script.chmod(0o755)
    return str(script)


class Turns:
    """A running hold-turn.mjs; its stdout lines are its steps."""

    def __init__(self, node: str, fencelock: str, session: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [node, str(EXAMPLE), str(session), "--fencelock", fencelock, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )

    def _stream(self, name: str) -> IO[str]:
        stream: IO[str] | None = getattr(self.proc, name)
        assert stream is not None
        return stream

    def expect(self, prefix: str) -> str:
        line = self._stream("stdout").readline().strip()
        assert line.startswith(prefix), (line, self.proc.poll(), self.stderr())
        return line

    def go(self) -> None:
        """Let one gated model call return."""
        stdin = self._stream("stdin")
        stdin.write("go\n")
        stdin.flush()

    def stderr(self) -> str:
        return "" if self.proc.poll() is None else self._stream("stderr").read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for name in ("stdin", "stdout", "stderr"):
            stream = getattr(self.proc, name)
            if stream is not None:
                stream.close()


class StartTurns(Protocol):
    """The ``turns`` fixture: starts hold-turn.mjs on a session, closed at the end."""

    def __call__(self, session: Path, *args: str) -> Turns: ...


@pytest.fixture
def turns(node: str, fencelock_bin: str) -> Iterator[StartTurns]:
    started: list[Turns] = []

    def start(session: Path, *args: str) -> Turns:
        t = Turns(node, fencelock_bin, session, *args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def entries(session: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in session.read_text().splitlines()]


def test_a_turn_writes_message_and_reply_and_releases(session: Path, turns: StartTurns) -> None:
    t = turns(session, "--turns", "2", "--writer", "A", "--model-ms", "1")
    assert t.proc.wait(timeout=120) == 0, t.stderr()
    assert [(e["role"], e["turn"]) for e in entries(session)] == [
        ("user", 1), ("assistant", 1), ("user", 2), ("assistant", 2)
    ]
    status = probe(session)
    assert status.state == "free" and status.record is not None
    assert status.record.token == 2 and status.record.state == "released"


def test_node_killed_mid_turn_frees_the_session(session: Path, turns: StartTurns) -> None:
    t = turns(session, "--gate", "--writer", "A")
    hold_pid = int(t.expect("hold pid=").split("=")[1])
    t.expect("held")
    t.expect("prompt")  # in the prompt window, the model call never returns
    assert probe(session).state == "live"
    t.proc.send_signal(signal.SIGKILL)
    t.proc.wait()
    # hold reads end of file, ends the window and releases: free, not stale.
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", "wait", str(session), "--timeout", "60"],
        check=False, capture_output=True,
    )
    assert out.returncode == 0
    status = probe(session)
    assert status.state == "free", status
    assert status.record is not None and status.record.pid == hold_pid
    assert status.record.state == "released" and status.record.phase == "write"
    assert [e["role"] for e in entries(session)] == ["user"]


def test_two_node_runs_never_interleave(session: Path, turns: StartTurns) -> None:
    a = turns(session, "--gate", "--writer", "A")
    a.expect("hold pid=")
    a.expect("held")
    a.expect("prompt")  # A holds the session and is in its model call
    b = turns(session, "--gate", "--writer", "B")
    b.expect("hold pid=")
    wait_for_blocked_waiter(session)  # B's hold waits for the lock A's hold has
    a.go()
    a.expect("done turn=1")
    b.expect("held")
    b.expect("prompt")
    b.go()
    b.expect("done turn=1")
    assert a.proc.wait(timeout=60) == 0 and b.proc.wait(timeout=60) == 0
    assert [(e["writer"], e["role"]) for e in entries(session)] == [
        ("A", "user"), ("A", "assistant"), ("B", "user"), ("B", "assistant")
    ]


def test_many_turns_from_two_processes_stay_in_pairs(session: Path, turns: StartTurns) -> None:
    runs = [turns(session, "--turns", "5", "--writer", w, "--model-ms", "2") for w in "AB"]
    for r in runs:
        assert r.proc.wait(timeout=120) == 0, r.stderr()
    got = entries(session)
    assert len(got) == 20
    for user, reply in zip(got[::2], got[1::2], strict=True):
        assert (user["role"], reply["role"]) == ("user", "assistant")
        assert (user["writer"], user["turn"]) == (reply["writer"], reply["turn"])


def test_takeover_keeps_the_reply_aside_and_exits_3(session: Path, turns: StartTurns) -> None:
    t = turns(session, "--gate", "--writer", "A", "--message", "ping")
    t.expect("hold pid=")
    t.expect("held")
    t.expect("prompt")
    with open(session, "a") as f:  # a writer that ignores the protocol
        f.write('{"role": "mirror"}\n')
    t.go()
    assert t.proc.wait(timeout=60) == 3
    err = t.stderr()
    assert "SessionTakeoverError" in err and "undelivered" in err
    assert [e["role"] for e in entries(session)] == ["user", "mirror"]
    kept = entries(Path(str(session) + ".undelivered"))
    assert kept == [{
        "role": "assistant", "content": "echo: ping", "writer": "A", "turn": 1,
        "undelivered": "SessionTakeoverError",
    }]
    assert probe(session).state == "free"
    # The reply kept aside is no session of its own for `status DIR` and `scan()`.
    assert [s.session for s in scan(session.parent)] == [str(session)]


def test_a_turn_a_recover_moved_keeps_its_reply_out_of_the_old_session_and_exits_5(
    session: Path, turns: StartTurns
) -> None:
    """A recover in another process finds the turn still in its model call past its wait
    and moves the conversation to a fresh session, where its caller re-fires the turn.
    The example asks hold before appending its reply, and keeps the reply aside instead
    of answering the turn a second time."""
    t = turns(session, "--gate", "--writer", "A", "--message", "ping")
    t.expect("hold pid=")
    t.expect("held")
    t.expect("prompt")
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout)["session"]
    t.go()
    assert t.expect("superseded session=") == f"superseded session={fresh}"
    assert t.proc.wait(timeout=60) == 5
    assert "re-fired" in t.stderr()
    assert [e["role"] for e in entries(session)] == ["user"]
    assert [e["role"] for e in entries(Path(fresh))] == ["user"]  # carried, for the re-fire
    kept = entries(Path(str(session) + ".undelivered"))
    assert [(k["role"], k["undelivered"]) for k in kept] == [("assistant", "Superseded")]
    assert probe(session).state == "free"


def test_a_turn_on_a_session_a_recover_moved_follows_the_move(
    session: Path, turns: StartTurns, spawn_holder: SpawnHolder
) -> None:
    """A lane that takes the session after a recover moved it (queued behind the stuck
    run) has its first append refused, nothing written: it follows the move and does
    its turn in the fresh session, rather than exiting as if taken over (3) with its
    user's message in no session."""
    session.write_text('{"role": "user", "n": 0}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout)["session"]
    t = turns(session, "--writer", "B", "--message", "ping", "--model-ms", "1", "--turns", "2")
    t.expect("hold pid=")
    assert stuck.call("release") == "released"  # the queued lane gets the old session
    t.expect("held")
    assert t.expect("moved session=") == f"moved session={fresh}"
    assert t.proc.wait(timeout=120) == 0, t.stderr()
    assert [(e["role"], e.get("turn")) for e in entries(Path(fresh))] == [
        ("user", None), ("user", 1), ("assistant", 1), ("user", 2), ("assistant", 2)]
    assert entries(session) == [{"role": "user", "n": 0}]  # nothing written there
    assert not Path(str(session) + ".undelivered").exists()


def test_a_turn_whose_message_a_recover_carried_puts_its_reply_there(
    session: Path, turns: StartTurns, spawn_holder: SpawnHolder
) -> None:
    """A lane that took the session after the stuck run let go, while a recover copied
    it: its message went in before the move's mark, and the recover carried it to the
    fresh session. Nobody re-fires that turn, so its reply goes there too, after its
    message (it was kept aside, exit 5, as for the stuck run's turn)."""
    session.write_text('{"role": "user", "n": 0}\n')
    stuck = spawn_holder(session, lane="stuck")
    stuck.acquire()
    with paused_recover(session) as mover:
        t = turns(session, "--gate", "--writer", "B", "--message", "ping")
        t.expect("hold pid=")
        assert stuck.call("release") == "released"
        t.expect("held")
        t.expect("prompt")  # its message is in the old session, not marked yet
        fresh = mover.go()
        t.go()
        assert t.expect("moved session=") == f"moved session={fresh}"
        t.expect("done turn=1")
        assert t.proc.wait(timeout=60) == 0, t.stderr()
    assert [(e["role"], e.get("turn")) for e in entries(Path(fresh))] == [
        ("user", None), ("user", 1), ("assistant", 1)]
    assert not Path(str(session) + ".undelivered").exists()


def wrapped(tmp_path: Path, name: str, *args: Path) -> str:
    """A ``fencelock`` that runs the test script ``name`` (the command line with a fault
    made to order) with ``args`` before the command line's own."""
    script = tmp_path / f"fencelock-{Path(name).stem}"
    words = " ".join(f'"{a}"' for a in (sys.executable, Path(__file__).parent / name, *args))
    script.write_text(f'#!/bin/sh\nexec {words} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_a_takeover_after_the_reply_went_in_keeps_no_second_copy(
    session: Path, node: str, tmp_path: Path
) -> None:
    """A takeover found by the reply's own append, after its line was written (another
    writer appended meanwhile): the reply is in the session, and only there."""
    trigger = tmp_path / "intrude-now"
    t = Turns(node, wrapped(tmp_path, "intruding_hold.py", trigger, session), session,
              "--gate", "--writer", "A", "--message", "ping")
    try:
        t.expect("hold pid=")
        t.expect("held")
        t.expect("prompt")
        trigger.touch()  # the reply's append will meet a writer outside the protocol
        t.go()
        assert t.proc.wait(timeout=60) == 3
        err = t.stderr()
        assert "SessionTakeoverError" in err and "in the session all the same" in err, err
    finally:
        t.close()
    assert not trigger.exists()
    assert [e["role"] for e in entries(session)] == ["user", "assistant", "intruder"]
    assert not Path(str(session) + ".undelivered").exists()
    assert probe(session).state == "free"


def test_a_reply_that_may_be_in_the_session_is_kept_with_a_warning_to_check(
    session: Path, node: str, tmp_path: Path
) -> None:
    """The reply's append failed and its line could not be taken back out (hold answers
    ``"stored": null``): the reply is kept aside, and the message says it may be in the
    session already and to check, not that it was not appended."""
    trigger = tmp_path / "fail-now"
    t = Turns(node, wrapped(tmp_path, "stuck_line_hold.py", trigger), session,
              "--gate", "--writer", "A", "--message", "ping")
    try:
        t.expect("hold pid=")
        t.expect("held")
        t.expect("prompt")
        trigger.touch()  # the reply's append fails, its line left in
        t.go()
        assert t.proc.wait(timeout=60) == 1
        err = t.stderr()
        assert "may or may not be in the session" in err and "check it" in err, err
        assert "was not appended" not in err, err
    finally:
        t.close()
    assert [e["role"] for e in entries(session)] == ["user", "assistant"]
    kept = entries(Path(str(session) + ".undelivered"))
    assert [k["undelivered"] for k in kept] == ["SessionWriteError"]


def test_contended_with_no_wait_exits_4(
    session: Path, turns: StartTurns, spawn_holder: SpawnHolder
) -> None:
    other = spawn_holder(session, lane="channel")
    other.acquire()
    t = turns(session, "--no-wait")
    assert t.proc.wait(timeout=60) == 4
    # hold names the holder on the stderr it shares with the program: said once.
    said = t.stderr().splitlines()
    assert len(said) == 1 and f"held by pid {other.pid}" in said[0], said
    assert not session.exists()


def test_hold_killed_in_the_model_call_keeps_the_reply_aside(
    session: Path, turns: StartTurns
) -> None:
    """hold gone before the reply's append (killed in the model call): the reply is kept
    in the undelivered file, never dropped, and the program exits 1, saying the reply is
    not in the session (it said to check whether it was: it had never been sent)."""
    t = turns(session, "--gate", "--writer", "A", "--message", "ping")
    hold_pid = int(t.expect("hold pid=").split("=")[1])
    t.expect("held")
    t.expect("prompt")
    os.kill(hold_pid, signal.SIGKILL)  # it runs no more code: the reply meets a dead hold
    t.go()
    assert t.proc.wait(timeout=60) == 1
    err = t.stderr()
    assert "ended before the reply was sent to it, so it is not in the session" in err, err
    assert "undelivered" in err and "check it" not in err, err
    assert [e["role"] for e in entries(session)] == ["user"]
    kept = entries(Path(str(session) + ".undelivered"))
    assert kept == [{
        "role": "assistant", "content": "echo: ping", "writer": "A", "turn": 1,
        "undelivered": "HoldEnded",
    }]


def test_an_answer_cut_short_keeps_the_reply_aside(
    session: Path, node: str, tmp_path: Path
) -> None:
    """hold stopped in the middle of the reply's answer (the caller sees half a line,
    no newline, then end of file): the example does not crash on the fragment; it keeps
    the reply aside as for a hold that ended before answering, and exits 1."""
    helper = Path(__file__).parent / "cutting_hold.py"
    script = tmp_path / "fencelock"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{helper}" "$@"\n')
    script.chmod(0o755)
    t = Turns(node, str(script), session, "--writer", "A", "--message", "ping")
    try:
        assert t.proc.wait(timeout=60) == 1
        err = t.stderr()
    finally:
        t.close()
    assert "SyntaxError" not in err and "undelivered" in err and "check it" in err, err
    kept = entries(Path(str(session) + ".undelivered"))
    assert [(e["content"], e["undelivered"]) for e in kept] == [("echo: ping", "HoldEnded")]


@pytest.mark.parametrize("args", [[], ["a.jsonl", "b.jsonl"], ["a.jsonl", "--bogus"]],
                         ids=["no-session", "two-sessions", "unknown-option"])
def test_a_usage_error_shows_the_usage(node: str, tmp_path: Path, args: list[str]) -> None:
    out = subprocess.run([node, str(EXAMPLE), *args], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 2, out
    first, usage = out.stderr.splitlines()
    assert first.startswith("hold-turn: ")
    assert usage.startswith("usage: node hold-turn.mjs SESSION [--lane L]")
    assert out.stdout == "" and os.listdir(tmp_path) == ["sessions"]
