"""`fencelock hold`: the JSON line protocol, driven over real pipes against real locks."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from conftest import (
    SpawnHolder,
    json_depth_limit,
    reap,
    record_of,
    thread_in_syscall,
    wait_for_blocked_waiter,
)
from marks import needs_linux, needs_posix, needs_proc

from fencelock import SessionLock, probe
from fencelock._hold import MAX_REQUEST


class Hold:
    """A ``fencelock hold`` child; requests go to its stdin, answers come from stdout."""

    def __init__(
        self, session: Path, *args: str, lane: str = "test", python: tuple[str, ...] = ()
    ) -> None:
        """``python``: how the child runs fencelock (default ``-m fencelock``)."""
        self.proc = subprocess.Popen(
            [sys.executable, *(python or ("-m", "fencelock")), "hold", str(session),
             "--lane", lane, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, request: dict[str, Any]) -> None:
        self.send_raw(json.dumps(request).encode() + b"\n")

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"hold ended: {self.proc.wait()} {self.stderr()}"
        assert line.startswith((b'{"ok": true', b'{"ok": false')), line
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send({"op": op, **fields})
        return self.read()

    def held(self) -> dict[str, Any]:
        answer = self.read()
        assert answer["ok"] and answer["event"] == "held", answer
        return answer

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self) -> int:
        self.close_stdin()
        return self.proc.wait(timeout=60)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


class StartHold(Protocol):
    """The ``start_hold`` fixture: starts a `Hold`, killed when the test ends."""

    def __call__(self, session: Path, *args: str, lane: str = ...) -> Hold: ...


@pytest.fixture
def start_hold() -> Iterator[StartHold]:
    started: list[Hold] = []

    def start(session: Path, *args: str, lane: str = "test") -> Hold:
        h = Hold(session, *args, lane=lane)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


def lines(session: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in session.read_text().splitlines()]


def test_a_whole_turn_is_written_and_released(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session, lane="node:main")
    held = h.held()["record"]
    assert held["state"] == "held" and held["lane"] == "node:main" and held["token"] == 1
    assert held["pid"] == h.proc.pid
    assert probe(session).state == "live"
    assert h.call("append", entry={"role": "user", "content": "hi"}) == {
        "ok": True, "op": "append"
    }
    assert h.call("prompt_begin")["ok"]
    assert record_of(session).phase == "prompt"
    assert h.call("touch")["ok"]
    assert h.call("prompt_end")["ok"]
    assert h.call("append", entry='{"role":"assistant","content":"hello"}')["ok"]
    info = h.call("info")["record"]
    assert info["phase"] == "write" and info["fingerprint"]["size"] == session.stat().st_size
    assert h.call("verify")["fingerprint"] == info["fingerprint"]
    assert h.call("release") == {"ok": True, "op": "release"}
    assert h.proc.wait(timeout=60) == 0
    assert lines(session) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    ]
    status = probe(session)
    assert status.state == "free" and status.record is not None
    assert status.record.state == "released"


def test_superseded_names_the_fresh_session_a_recover_moved_the_turn_to(
    session: Path, start_hold: StartHold
) -> None:
    """A caller in a long model call learns, before it appends its reply, that a recover
    found it still holding the session and moved the conversation on."""
    h = start_hold(session, lane="slow")
    h.held()
    assert h.call("append", entry={"role": "user", "content": "hi"})["ok"]
    assert h.call("superseded") == {"ok": True, "op": "superseded", "session": None}
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "recover", str(session), "--wait", "0", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout)["session"]
    assert fresh != str(session)
    assert h.call("superseded") == {"ok": True, "op": "superseded", "session": fresh}
    assert h.call("release")["ok"] and h.proc.wait(timeout=60) == 0


def test_id_is_echoed_in_answers_good_and_bad(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    assert h.call("touch", id="a-1") == {"ok": True, "op": "touch", "id": "a-1"}
    bad = h.call("fly", id=7)
    assert bad["error"] == "BadRequestError" and bad["id"] == 7


def test_stamped_append_carries_the_holder_token(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    token = h.held()["record"]["token"]
    assert h.call("append", entry={"a": 1}, stamp=True)["ok"]
    assert lines(session)[0]["_fencelock"]["token"] == token


def test_end_of_stdin_releases_and_exits_0(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    assert h.call("prompt_begin")["ok"]  # even inside the prompt window
    assert h.wait() == 0
    status = probe(session)
    assert status.state == "free" and status.record is not None
    assert status.record.state == "released"


def test_hold_killed_frees_the_session_and_the_caller_reads_eof(
    session: Path, start_hold: StartHold
) -> None:
    h = start_hold(session)
    h.held()
    h.proc.kill()
    h.proc.wait()
    assert h.proc.stdout is not None and h.proc.stdout.read() == b""
    assert probe(session).state == "stale"  # the kernel dropped the lock
    with SessionLock(session, "next", on_contention="fail") as lock:
        assert lock.info is not None and lock.info.previous is not None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_releases_cleanly(session: Path, start_hold: StartHold, signum: int) -> None:
    h = start_hold(session)
    h.held()
    h.proc.send_signal(signum)
    assert h.proc.wait(timeout=60) == 128 + signum
    assert probe(session).state == "free"
    assert "Traceback" not in h.stderr()


SIGNAL_IN_THE_RELEASE = """
import os, signal, sys
from fencelock import _cli, _sidecar_holder
real = _sidecar_holder.SidecarHolder.release
def release(self, lock):
    os.kill(os.getpid(), signal.SIGTERM)  # lands in the release, as a late kill can
    real(self, lock)
_sidecar_holder.SidecarHolder.release = release
_cli.main(sys.argv[1:], prog_name="fencelock")
"""


def test_a_stop_signal_during_a_requested_release_leaves_it_released(session: Path) -> None:
    h = Hold(session, lane="x", python=("-c", SIGNAL_IN_THE_RELEASE))
    try:
        h.held()
        assert h.call("release")["ok"]
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert probe(session).state == "free"  # released, not stale
    finally:
        h.kill()


def test_sigterm_while_waiting_stops_cleanly_without_holding(
    session: Path, start_hold: StartHold, spawn_holder: SpawnHolder
) -> None:
    other = spawn_holder(session, lane="channel")
    token = other.acquire()
    h = start_hold(session)
    wait_for_blocked_waiter(session)
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in h.stderr()
    assert h.proc.stdout is not None and h.proc.stdout.read() == b""
    assert other.call("release") == "released"
    record = probe(session).record
    assert record is not None and record.token == token


SIGNAL_IN_A_CALLBACK = """
import asyncio, os, signal, sys
from fencelock._cli import main

class Loop(asyncio.SelectorEventLoop):
    # The event loop that waits for the session sends the signal from inside one of its
    # callbacks: the handler runs there, as a signal that lands while the loop runs
    # any callback (the lock's delivery, a wake-up) does.
    def __init__(self):
        super().__init__()
        self.call_soon(os.kill, os.getpid(), int(sys.argv[1]))

class Policy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = Loop

asyncio.set_event_loop_policy(Policy())
main(sys.argv[2:], prog_name="fencelock")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_that_lands_in_an_event_loop_callback_still_stops_the_wait(
    session: Path, spawn_holder: SpawnHolder, signum: int
) -> None:
    """asyncio catches and logs an exception raised in a callback: a stop signal whose
    handler raised there was swallowed, and hold went on waiting, then held the session
    as if nothing had come."""
    other = spawn_holder(session, lane="channel")
    token = other.acquire()
    proc = subprocess.Popen(  # stdin stays open: the caller is still there
        [sys.executable, "-c", SIGNAL_IN_A_CALLBACK, str(signum), "hold", str(session),
         "--lane", "stopped"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.wait(timeout=30)  # a bound for a broken build (communicate would close stdin)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 128 + signum, err
    assert out == b"" and err == b""
    assert other.call("release") == "released"
    record = probe(session).record
    assert record is not None and record.token == token and record.lane == "channel"


@pytest.mark.parametrize("how", [["--no-wait"], ["--timeout", "0.2"]])
def test_contended_answers_with_the_holder_and_exits_4(
    session: Path, start_hold: StartHold, spawn_holder: SpawnHolder, how: list[str]
) -> None:
    other = spawn_holder(session, lane="channel")
    other.acquire()
    h = start_hold(session, *how)
    answer = h.read()
    assert answer["ok"] is False and answer["error"] == "SessionContendedError"
    assert answer["holder"]["pid"] == other.pid and answer["holder"]["lane"] == "channel"
    assert str(session) in answer["message"]
    assert h.proc.wait(timeout=60) == 4
    assert "Traceback" not in h.stderr()
    assert probe(session).state == "live"


@needs_posix
def test_hold_under_its_own_run_answers_with_the_documented_name(session: Path) -> None:
    """A hold inside the `fencelock run` that holds the session is refused at once, under
    the name callers match on (the refusal's own class is not exported)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "outer", "--",
         sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "inner"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode == 4, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False and answer["error"] == "SessionContendedError", answer
    assert "runs under" in answer["message"] and answer["holder"]["lane"] == "outer"
    assert b"Traceback" not in proc.stderr


BAD_LINES = [
    (b"not json", "not JSON"),
    (b"", "request line is empty"),
    (b" \t\r", "request line is empty"),
    (b'\xef\xbb\xbf{"op": "info"}', "byte order mark"),
    (b'{"op": "append", "entry": "two', "a line break inside a string goes as \\n"),
    (b'{"op": "append", "entry": "a\rb"}', "a control character inside a string goes escaped"),
    (b'null', "not a JSON object but null"),
    (b'{"op": null}', "unknown op null;"),
    (b'{"op": "append", "entry": null}', "not null"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"entry": {}}', 'no "op"'),
    (b'{"op": "fly"}', "unknown op"),
    (b'{"op": ["info"]}', "unknown op"),
    (b'{"op": {"release": 1}}', "unknown op"),
    (b'{"op": "append"}', 'needs "entry"'),
    (b'{"op": "append", "entry": [1]}', "must be a JSON object"),
    (b'{"op": "append", "entry": 5}', "must be a JSON object"),
    (b'{"op": "append", "entry": "two\\nlines"}', "one line"),
    (b'{"op": "append", "entry": {"x": NaN}}', "not JSON"),
    (b'{"op": "append", "entry": {"x": "\\ud800"}}', "lone surrogate"),
    (b'{"op": "append", "entry": "{\\"x\\": \\"\\\\ud800\\"}"}', "lone surrogate"),
    (b'{"op": "append", "entry": {}, "stamp": "yes"}', '"stamp" must be true, false or null'),
    (b'{"op": "append", "entry": {"x": "caf\xe9"}}', "not UTF-8"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"op": "prompt_end"}', "without prompt_begin"),
    # A number past a double's range would be echoed as Infinity, which is not JSON.
    (b'{"op": "touch", "id": 1e400}', "out of range"),
    (b'{"op": "append", "entry": {"x": -1e400}}', "out of range"),
    (b'{"op": "append", "entry": "{\\"x\\": 1e400}"}', "out of range"),
    (b'{"op": "append", "entry": {"x": 1' + b"0" * 400 + b"}}", "out of range"),
    (b'{"op": "append", "entry": "{\\"x\\": -1' + b"0" * 400 + b'}"}', "out of range"),
    (b'{"op": "append", "entry": "hello"}', "one line of JSON"),
    (b'{"op": "append", "entry": "[1]", "stamp": true}', "needs an entry that is a JSON"),
    (b'{"op": "append", "entry": {"_fencelock": {"token": 9}}}', '"stamp": true'),
    (b'{"op": "append", "entry": "{\\"_fencelock\\": 1}"}', '"stamp": true'),
    (b'{"op": "touch", "id": ' + b"9" * 5000 + b"}", "integer of over"),
    (b'{"op": "append", "entry": "{\\"n\\": ' + b"9" * 5000 + b'}"}', "integer of over"),
    # Which value counts is a guess: refused, not read last-wins.
    (b'{"op": "info", "op": "release"}', 'the key "op" appears twice'),
    (b'{"op": "append", "entry": {"a": 1, "b": {"a": 2, "a": 3}}}', 'the key "a" appears twice'),
]


@pytest.mark.parametrize(("line", "why"), BAD_LINES)
def test_a_bad_request_is_answered_and_changes_nothing(
    session: Path, start_hold: StartHold, line: bytes, why: str
) -> None:
    h = start_hold(session)
    h.held()
    assert h.call("append", entry={"n": 1})["ok"]
    before = session.read_bytes()
    record = h.call("info")["record"]
    h.send_raw(line + b"\n")
    answer = h.read()
    assert answer["ok"] is False and answer["error"] == "BadRequestError", answer
    assert why in answer["message"] and "sys." not in answer["message"]
    assert session.read_bytes() == before
    after = h.call("info")["record"]
    assert (after["phase"], after["fingerprint"]) == (record["phase"], record["fingerprint"])
    assert h.call("append", entry={"n": 2})["ok"]  # still serving, still holding
    assert h.wait() == 0
    assert lines(session) == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("kind", ["string", "object"])
def test_an_entry_at_the_parser_s_depth_limit_is_a_bad_request(
    session: Path, start_hold: StartHold, kind: str
) -> None:
    """Python's JSON parser refuses nesting past a depth that depends on the stack it
    runs on. Around that depth, every entry, a string or an object, is either appended
    or answered with `BadRequestError` (nothing written): never another error, whichever
    check meets it (an object one level short of the limit passed the parser and failed
    the entry's own check, one level deeper in the stack, ending hold with a traceback)."""
    limit = json_depth_limit()  # in this process: hold's stack differs a little
    h = start_hold(session)
    h.held()
    answers = set()
    for depth in range(limit * 85 // 100, limit + 1):
        nested = b"[" * depth + b"]" * depth
        h.send_raw(b'{"op": "append", "entry": %s}\n' % (
            b'"' + nested + b'"' if kind == "string" else b'{"a": ' + nested + b"}"))
        answer = h.read()
        answers.add("ok" if answer["ok"] else answer["error"])
        if not answer["ok"]:
            assert "nested too deeply" in answer["message"], answer
    assert answers == {"ok", "BadRequestError"}  # the range spans the limit
    assert h.wait() == 0
    start = b"[[" if kind == "string" else b'{"a":[['
    assert all(line.startswith(start) for line in session.read_bytes().splitlines())


def test_a_request_refused_for_a_repeated_key_is_answered_with_its_id(
    session: Path, start_hold: StartHold
) -> None:
    """It is JSON: its id is echoed as any refused request's is, unless the id is the
    key given twice (then which one is the guess); a long key is quoted shortened."""
    h = start_hold(session)
    h.held()
    for line, echoed in [(b'{"op": "info", "id": 7, "x": {"a": 1, "a": 2}}', 7),
                         (b'{"id": {"k": [1, {}]}, "op": "info", "op": "release"}',
                          {"k": [1, {}]}),
                         (b'{"op": "info", "id": 7, "id": 8}', None),
                         # not JSON on other counts too: refused, no id read (it crashed)
                         (b'{"op": "info", "id": 3, "a": 1, "a": 2} x', None),
                         (b'{"op": "info", "id": 3, "a": NaN, "a": 2}', None)]:
        h.send_raw(line + b"\n")
        answer = h.read()
        assert answer["error"] == "BadRequestError" and answer.get("id") == echoed, answer
    key = "k" * 100_000
    h.send_raw(json.dumps({"op": "info", "id": 1}).encode()[:-1] +
               f', "{key}": 1, "{key}": 2}}\n'.encode())
    answer = h.read()
    assert answer["id"] == 1 and len(answer["message"]) < 1000, answer["message"][:200]
    assert h.wait() == 0


def test_an_entry_sent_as_text_keeps_its_repeated_keys(
    session: Path, start_hold: StartHold
) -> None:
    """The way the refusal of a repeated key points to: a one-line string is written
    as it is, both keys kept."""
    h = start_hold(session)
    h.held()
    assert h.call("append", entry='{"a":1,"a":2}')["ok"]
    assert h.wait() == 0
    assert session.read_bytes() == b'{"a":1,"a":2}\n'


def test_a_null_stamp_is_the_holder_s_default(session: Path, start_hold: StartHold) -> None:
    """`"stamp": null` (what a client sends for a field it has no value for) stamps as
    the holder does by default: not at all for `hold`."""
    h = start_hold(session)
    h.held()
    assert h.call("append", entry={"n": 1}, stamp=None)["ok"]
    assert h.wait() == 0
    assert lines(session) == [{"n": 1}]


def test_prompt_begin_twice_is_refused(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    assert h.call("prompt_begin")["ok"]
    assert h.call("prompt_begin")["error"] == "BadRequestError"
    assert h.call("prompt_end")["ok"]


def test_a_line_over_the_bound_is_dropped_whole(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    # A 10 MB append whose newline comes last: none of it may reach the session.
    big = b'{"op": "append", "entry": {"x": "' + b"a" * (10 * 1024 * 1024) + b'"}}'
    assert len(big) > MAX_REQUEST
    h.send_raw(big + b"\n" + b'{"op": "info", "id": 2}\n')
    answer = h.read()
    assert answer["error"] == "BadRequestError" and str(MAX_REQUEST) in answer["message"]
    assert "nothing was written: keep content that large in a file" in answer["message"]
    assert str(len(big)) in answer["message"]
    assert h.read()["id"] == 2
    assert not session.exists()
    # One byte over the bound, newline in the same read: dropped too.
    h.send_raw(b" " * (MAX_REQUEST + 1) + b"\n")
    assert h.read()["error"] == "BadRequestError"
    # Just under the bound is a request like any other.
    pad = MAX_REQUEST - len(b'{"op": "append", "entry": {"x": ""}}')  # exactly the bound
    h.send_raw(b'{"op": "append", "entry": {"x": "' + b"b" * pad + b'"}}\n')
    assert h.read()["ok"]
    assert h.wait() == 0
    assert len(lines(session)[0]["x"]) == pad


def test_the_reader_bounds_lines_at_the_limit() -> None:
    from fencelock._hold import _Inbox, _Line, _TooLong

    r, w = os.pipe()
    os.write(w, b"0123456789\n01234567890\n" + b"x" * 25 + b"\n\nlast")
    os.close(w)
    inbox = _Inbox(r, limit=10)
    inbox.start()
    got = []
    while (item := inbox.items.get(timeout=60)) is not None:
        got.append(item)
    os.close(r)
    assert got == [_Line(b"0123456789"), _TooLong(11), _TooLong(25), _Line(b""), _Line(b"last")]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@needs_proc
def test_an_endless_line_is_not_kept_in_memory(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    assert h.call("info")["ok"]
    before = _peak_rss_kib(h.proc.pid)
    chunk = b"y" * (1024 * 1024)
    for _ in range(200):  # 200 MiB without a newline
        h.send_raw(chunk)
    h.send_raw(b'\n{"op": "info", "id": "after"}\n')
    assert h.read()["error"] == "BadRequestError"
    assert h.read()["id"] == "after"
    # What is read past the bound is dropped: the peak grows by about the bound only.
    assert _peak_rss_kib(h.proc.pid) - before < 3 * MAX_REQUEST // 1024
    assert h.wait() == 0


def test_over_the_bound_at_end_of_file_is_answered(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    h.send_raw(b"x" * (MAX_REQUEST + 10))
    h.close_stdin()
    assert h.read()["error"] == "BadRequestError"
    assert h.proc.wait(timeout=60) == 0


def test_a_last_request_without_newline_is_served(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    h.send_raw(b'{"op": "append", "entry": {"last": true}}')
    h.close_stdin()
    assert h.read()["ok"]
    assert h.proc.wait(timeout=60) == 0
    assert lines(session) == [{"last": True}]


def test_requests_sent_while_waiting_are_answered_after_held(
    session: Path, start_hold: StartHold, spawn_holder: SpawnHolder
) -> None:
    other = spawn_holder(session, lane="channel")
    other.acquire()
    assert other.call('append {"who": "other"}') == "ok"
    h = start_hold(session)
    h.send({"op": "append", "entry": {"who": "hold"}, "id": 1})
    wait_for_blocked_waiter(session)  # hold is waiting for the lock, request queued
    assert lines(session) == [{"who": "other"}]
    assert other.call("release") == "released"
    assert h.held()["record"]["token"] == 2
    assert h.read() == {"ok": True, "op": "append", "id": 1}
    assert h.wait() == 0
    assert lines(session) == [{"who": "other"}, {"who": "hold"}]


def test_caller_gone_while_waiting_stops_the_wait(
    session: Path, start_hold: StartHold, spawn_holder: SpawnHolder
) -> None:
    other = spawn_holder(session, lane="channel")
    token = other.acquire()
    h = start_hold(session)
    wait_for_blocked_waiter(session)
    # stdin closed with nothing asked: it stops waiting, and says what it found, as a
    # --no-wait try does (it exited 0, which a script read as held).
    assert h.wait() == 4
    assert h.proc.stdout is not None
    answer = json.loads(h.proc.stdout.read())
    assert (answer["ok"], answer["error"]) == (False, "SessionContendedError"), answer
    assert answer["holder"]["pid"] == other.pid
    assert other.call("release") == "released"
    record = probe(session).record
    assert record is not None and record.token == token  # hold never took it


@needs_posix
@pytest.mark.parametrize("stdin", ["left open", "closed"])
def test_a_caller_gone_after_asking_stops_the_wait_too(
    session: Path, start_hold: StartHold, spawn_holder: SpawnHolder, stdin: str
) -> None:
    """A caller that sent a request, then died while hold waited (Node's process.exit):
    its end of stdout is closed, so no answer can reach anyone, and the wait ends, as
    for a closed stdout (exit 0, nothing held). It waited for good, then took the
    session for nobody, and named the dead caller's lane as its last run."""
    other = spawn_holder(session, lane="channel")
    token = other.acquire()
    h = start_hold(session, lane="dead")
    h.send({"op": "append", "entry": {"who": "hold"}})
    wait_for_blocked_waiter(session)
    assert h.proc.stdout is not None
    h.proc.stdout.close()
    if stdin == "closed":
        h.close_stdin()
    assert h.proc.wait(timeout=30) == 0
    assert h.stderr() == ""
    assert other.call("release") == "released"
    record = probe(session).record
    assert record is not None and (record.token, record.lane) == (token, "channel")


@needs_posix
def test_a_caller_gone_is_heard_on_a_socket_that_is_stdin_too(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """One socket for stdin and stdout (socat ``EXEC:``, inetd): the caller's request
    wakes the watch on stdout as data to read, not a hang-up. The caller then dies while
    hold waits: its hang-up is still heard, and the wait ends."""
    other = spawn_holder(session, lane="channel")
    token = other.acquire()
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "dead"],
                stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE)
        try:
            # More than hold reads ahead: requests left in the socket keep it readable.
            ours.sendall(b'{"op": "info"}\n' * 7_000)  # (less than the socket holds)
            wait_for_blocked_waiter(session)
        except BaseException:
            reap(proc)
            raise
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
    assert other.call("release") == "released"
    record = probe(session).record
    assert record is not None and (record.token, record.lane) == (token, "channel")


@needs_proc
def test_a_caller_that_left_answers_unread_on_a_socket_is_a_caller_gone(session: Path) -> None:
    """Node's ``stdio: "pipe"`` is a socket pair: a caller that dies while hold waits to
    write answers it never read makes that write fail with ECONNRESET, not EPIPE. A
    caller gone all the same: release, exit 0, nothing on stderr (a line there went to
    the gateway's log)."""
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
                stdin=subprocess.PIPE, stdout=theirs.fileno(), stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            # More answers than the socket holds, none read: hold blocks writing one.
            proc.stdin.write(b'{"op": "info"}\n' * 2000)
            proc.stdin.flush()
            thread_in_syscall(proc.pid, "write", main=True)
        except BaseException:
            reap(proc)
            raise
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    proc.stdin.close()
    proc.stderr.close()
    assert probe(session).state == "free"


def test_closed_stdout_releases_and_exits_cleanly(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    assert h.proc.stdout is not None
    h.proc.stdout.close()
    h.send({"op": "append", "entry": {"n": 1}})  # done, but its answer hits EPIPE
    assert h.proc.wait(timeout=60) == 0
    assert "Traceback" not in h.stderr()
    assert probe(session).state == "free"
    assert lines(session) == [{"n": 1}]


def test_a_non_blocking_stdin_is_waited_on_not_taken_for_its_end(session: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)  # as a caller may leave it (the flag is shared)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
        stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(read_end)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "held"
        os.write(write_end, b'{"op": "info", "id": 1}\n')
        answer = proc.stdout.readline()
        assert answer and json.loads(answer)["id"] == 1, proc.stderr.read() if \
            proc.stderr else ""
        os.close(write_end)
        write_end = -1
        assert proc.wait(timeout=60) == 0
    finally:
        if write_end >= 0:
            os.close(write_end)
        reap(proc)
    assert probe(session).state == "free"


@needs_linux
def test_stdout_that_fails_otherwise_is_said_and_exits_1(session: Path) -> None:
    """Only a caller that closed its end (EPIPE) is a quiet exit 0: a full disk behind
    stdout is said on stderr, and the session is still released."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
            input=b'{"op": "append", "entry": {"n": 1}}\n', stdout=full,
            stderr=subprocess.PIPE, timeout=60, check=False,
        )
    assert proc.returncode == 1
    assert b"cannot write its answers to stdout" in proc.stderr
    assert b"Traceback" not in proc.stderr
    assert probe(session).state == "free"


@needs_proc
def test_a_non_blocking_stdout_that_fills_up_is_waited_for(session: Path) -> None:
    """A caller (Node does this) may leave the answer pipe non-blocking: a full pipe
    is waited on, not taken for a caller that left."""
    import fcntl
    import termios

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    count = 300
    requests = b"".join(b'{"op": "info", "id": %d}\n' % i for i in range(count))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
        stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    try:
        assert proc.stdin is not None
        proc.stdin.write(requests)
        proc.stdin.close()
        # Read nothing until the pipe is full (more answers are due than it holds) and
        # hold sleeps waiting for room, or has exited (as it did, taking EAGAIN for a
        # caller that left).
        deadline = time.monotonic() + 60
        buffered = bytearray(4)
        while time.monotonic() < deadline and proc.poll() is None:
            fcntl.ioctl(read_end, termios.FIONREAD, buffered)
            if int.from_bytes(buffered, sys.byteorder) >= 50_000 and "poll" in Path(
                    f"/proc/{proc.pid}/wchan").read_text():
                break
            time.sleep(0.005)  # polling the pipe's fill level; the deadline bounds it
        with os.fdopen(read_end, "rb") as answers:
            got = [json.loads(line) for line in answers]
        assert proc.wait(timeout=60) == 0
    finally:
        reap(proc)
    assert [a.get("id") for a in got[1:]] == list(range(count))  # after "held"


@pytest.mark.parametrize("closed", [["stdin"], ["stdin", "stdout"], ["stdout"]])
def test_hold_started_with_a_standard_stream_closed_neither_hangs_nor_crashes(
    session: Path, closed: list[str]
) -> None:
    """`hold <&-` used to read its own signal pipe (which took descriptor 0) and keep
    the session for good; `>&-` crashed at exit."""
    command = f'exec {sys.executable} -m fencelock hold "$1" --lane x'
    redirects = {"stdin": " <&-", "stdout": " >&-"}
    script = command + "".join(redirects[name] for name in closed)
    proc = subprocess.run(
        ["sh", "-c", script, "sh", str(session)], input=b"" if "stdin" not in closed
        else None, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert probe(session).state == "free"


def test_takeover_in_the_prompt_window_is_answered(session: Path, start_hold: StartHold) -> None:
    h = start_hold(session)
    h.held()
    assert h.call("append", entry={"role": "user"})["ok"]
    assert h.call("prompt_begin")["ok"]
    with open(session, "a") as f:  # a writer outside the protocol
        f.write('{"role": "intruder"}\n')
    answer = h.call("prompt_end")
    assert answer["ok"] is False and answer["error"] == "SessionTakeoverError"
    assert answer["expected"]["size"] < answer["actual"]["size"]
    assert h.call("append", entry={"role": "assistant"})["error"] == "SessionTakeoverError"
    assert h.call("verify")["error"] == "SessionTakeoverError"
    assert h.call("release")["ok"]
    assert h.proc.wait(timeout=60) == 0
    assert lines(session) == [{"role": "user"}, {"role": "intruder"}]


def test_a_takeover_found_after_the_line_was_written_says_it_is_stored(
    session: Path, tmp_path: Path
) -> None:
    """A caller told of a takeover keeps its reply elsewhere; when the append had already
    written the line, the answer says so (``stored``), or the reply would be twice."""
    trigger = tmp_path / "intrude-now"
    intruding = Path(__file__).parent / "intruding_hold.py"
    h = Hold(session, python=(str(intruding), str(trigger), str(session)))
    try:
        h.held()
        assert h.call("append", entry={"role": "user"})["ok"]
        trigger.touch()
        answer = h.call("append", entry={"role": "assistant"})
        assert not trigger.exists()
        assert answer["ok"] is False and answer["error"] == "SessionTakeoverError", answer
        assert answer["stored"] is True and "in the file all the same" in answer["message"]
        answer = h.call("append", entry={"role": "assistant", "again": True})
        assert answer["error"] == "SessionTakeoverError" and answer["stored"] is False
        assert h.call("release")["ok"]
        assert h.proc.wait(timeout=60) == 0
    finally:
        h.kill()
    assert lines(session) == [{"role": "user"}, {"role": "assistant"}, {"role": "intruder"}]


def test_heartbeat_refreshes_the_record_between_requests(
    session: Path, start_hold: StartHold
) -> None:
    h = start_hold(session, "--heartbeat", "0.01")
    first = h.held()["record"]["heartbeat_at"]
    deadline = time.monotonic() + 60  # a bound for a broken build, not a timing claim
    while record_of(session).heartbeat_at == first:
        assert time.monotonic() < deadline, "the heartbeat was never refreshed"
        os.sched_yield()
    assert h.wait() == 0


@pytest.mark.parametrize("op", ["verify", "info", "nonsense"])
def test_requests_that_write_no_heartbeat_do_not_put_it_off(
    session: Path, start_hold: StartHold, op: str
) -> None:
    """A caller that polls (`verify`, `info`) through a long model call is still
    refreshed: only a request that writes the heartbeat puts off hold's own."""
    h = start_hold(session, "--heartbeat", "0.05")
    first = h.held()["record"]["heartbeat_at"]
    deadline = time.monotonic() + 60  # a bound for a broken build, not a timing claim
    while record_of(session).heartbeat_at == first:
        assert time.monotonic() < deadline, "the heartbeat was never refreshed"
        h.call(op)
    assert h.wait() == 0


def test_bad_lane_is_a_usage_error(session: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x" * 5000],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    assert out.returncode == 2 and "--lane" in out.stderr and "Traceback" not in out.stderr


def test_backend_is_passed_to_session_lock_or_refused_cleanly(session: Path) -> None:
    import inspect

    out = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x",
         "--backend", "local"],
        input=b'{"op": "release"}\n', capture_output=True, check=False,
    )
    if "backend" in inspect.signature(SessionLock).parameters:
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(b'{"ok": true, "event": "held"')
    else:
        assert out.returncode == 2 and b"--backend" in out.stderr
        assert b"Traceback" not in out.stderr
        assert not Path(str(session) + ".holder").exists()


def test_unsafe_sidecar_is_an_error_line_and_exit_1(session: Path, start_hold: StartHold) -> None:
    os.mkfifo(str(session) + ".holder")
    h = start_hold(session)  # stdin stays open: the answer is not raced by end of file
    answer = h.read()
    assert answer["ok"] is False and answer["error"] == "UnsafeSidecarError"
    assert h.proc.wait(timeout=60) == 1
    stderr = h.stderr()
    assert "FIFO" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("case", ["missing directory", "session is a directory",
                                  "corrupt record"])
def test_a_session_that_cannot_be_held_is_reported_even_with_stdin_already_ended(
    session: Path, case: str
) -> None:
    """A caller that sends nothing and closes stdin at once still hears why the session
    cannot be held, with exit 1, every time: the end of stdin used to race the failing
    acquire, and won about half the time (exit 0, nothing said)."""
    if case == "missing directory":
        session = session.parent / "nowhere" / session.name
        error = "SidecarAccessError"
    elif case == "session is a directory":
        session.mkdir()
        error = "UnsafePathError"
    else:
        Path(str(session) + ".holder").write_text("{not a record")
        error = "CorruptRecordError"
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (done.stdout, done.stderr)
        answer = json.loads(done.stdout)
        assert answer["ok"] is False and answer["error"] == error, answer
        assert "Traceback" not in done.stderr


@needs_posix
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
@pytest.mark.parametrize("at", [
    "append's fsync", "append's answer", "release's answer", "append's answer written",
    "release's answer written",
])
def test_a_stop_signal_during_an_append_is_answered_first(
    session: Path, sig: str, at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop signal that lands while an append writes its line, or once it (or the
    release) is done, as its answer is about to be written or as the write of it
    returns, ends hold only once the answer is out, once, and the record has its fence
    point: the caller knows the line is in (and would otherwise send it again), and the
    session reads free and unchanged by anyone else, not a foreign write."""
    signum = int(getattr(signal, sig))
    if "answer" in at:
        monkeypatch.setenv("FENCELOCK_TEST_SIGNAL_AT", at.rpartition(" ")[2])
        monkeypatch.setenv("FENCELOCK_TEST_SIGNAL_OP", at.partition("'")[0])
    helper = Path(__file__).parent / "signalled_hold.py"
    h = Hold(session, python=(str(helper), str(signum)))
    try:
        h.held()
        assert h.call("append", entry={"role": "user"}, id=1) == {
            "ok": True, "op": "append", "id": 1
        }
        if at.startswith("release's"):
            assert h.call("release") == {"ok": True, "op": "release"}
        assert h.proc.wait(timeout=60) == 128 + signum, h.stderr()
        assert h.proc.stdout is not None
        assert h.proc.stdout.read() == b""  # no answer sent twice
    finally:
        h.kill()
    assert lines(session) == [{"role": "user"}]
    status = probe(session)
    assert status.state == "free" and status.fence_ok is True, status
    assert status.record is not None and status.record.fingerprint is not None
    assert status.record.fingerprint.size == session.stat().st_size


@needs_linux
def test_a_stop_signal_while_an_answer_waits_for_room_ends_hold(session: Path) -> None:
    """A caller that stopped reading (hold's stdout full) does not keep hold from
    stopping: a stop signal while an answer waits for room releases and exits 128+N."""
    h = Hold(session)
    try:
        h.held()
        assert h.proc.stdout is not None
        fcntl.fcntl(h.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        h.send_raw(b'{"op": "append", "entry": {}}\n' * 200)  # 200 answers do not fit
        # Waiting for room for an answer (poll(2), which glibc may make as ppoll).
        thread_in_syscall(h.proc.pid, "poll", main=True, alias="ppoll")
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        h.kill()
    assert probe(session).state == "free"


def _fill_the_pipe(h: Hold) -> str:
    """Shrink hold's stdout pipe to one page and have an answer fill it to the byte (the
    request's "id", echoed, pads it): the next answer finds no room. Returns that id."""
    assert h.proc.stdout is not None
    h.send({"op": "nope"})
    size = len(h.proc.stdout.readline())
    fcntl.fcntl(h.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    pad = "x" * (4096 - size - len(', "id": ""'))
    h.send({"op": "nope", "id": pad})
    return pad


@needs_linux
def test_a_stop_signal_while_the_release_s_answer_waits_for_room_ends_hold(
    session: Path
) -> None:
    """The release is done, and its answer finds stdout full (the caller stopped
    reading): a stop signal then ends hold after a moment's wait for room, as for any
    other answer, instead of leaving it blocked until SIGKILL."""
    h = Hold(session)
    try:
        h.held()
        _fill_the_pipe(h)
        h.send({"op": "release"})
        # The release's answer waits for room.
        thread_in_syscall(h.proc.pid, "poll", main=True, alias="ppoll")
        assert probe(session).state == "free"
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        h.kill()


def _owing_an_answer_with_no_room(session: Path) -> Hold:
    """A hold that SIGTERM reaches during the second of three appends, whose answer
    then finds no room: a pipe of one page polls full (no room) once the first answer
    is in it, the caller reading none."""
    helper = Path(__file__).parent / "signalled_hold.py"
    session.write_text("{}\n")  # an append to it makes one fsync (creating it, two)
    h = Hold(session, python=(str(helper), str(int(signal.SIGTERM)), "2"))
    try:
        h.held()
        assert h.proc.stdout is not None
        fcntl.fcntl(h.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        h.send_raw(b'{"op": "append", "entry": {}}\n' * 3)
    except BaseException:
        h.kill()
        raise
    return h


def _released_with_three_lines(session: Path) -> None:
    assert len(lines(session)) == 3
    status = probe(session)
    assert status.state == "free" and status.fence_ok is True, status


@needs_linux
def test_an_answer_owed_after_a_stop_signal_waits_for_room_only_a_while(session: Path) -> None:
    """A stop signal during an append whose answer then finds stdout full: hold waits a
    moment for room, then releases and exits 128+N without it. The line is in the
    session and the record has its fence point."""
    h = _owing_an_answer_with_no_room(session)
    try:
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert h.proc.stdout is not None
        assert h.proc.stdout.read() == b'{"ok": true, "op": "append"}\n'
    finally:
        h.kill()
    _released_with_three_lines(session)


@needs_linux
def test_a_second_stop_signal_ends_the_wait_for_room_for_an_owed_answer(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However long the answer owed after a stop signal may wait for room (here an
    hour), a second stop signal ends hold at once: the caller's supervisor never needs
    SIGKILL, which would leave the session stale. The exit code is the first signal's."""
    monkeypatch.setenv("FENCELOCK_TEST_ANSWER_WAIT", "3600")
    h = _owing_an_answer_with_no_room(session)
    try:
        # The owed answer waits for room (poll(2), which glibc may make as ppoll).
        thread_in_syscall(h.proc.pid, "poll", main=True, alias="ppoll")
        h.proc.send_signal(signal.SIGINT)
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        h.kill()
    _released_with_three_lines(session)


@needs_posix
@pytest.mark.parametrize("then", ["a second signal at once", "a signal at shutdown"])
def test_a_later_stop_signal_neither_drops_the_owed_answer_nor_changes_the_exit_code(
    session: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """SIGTERM during an append, then another stop signal: at once (both during the
    append), or once hold has released and returned, as the interpreter shuts down and
    puts default actions back where Python had handlers. A second signal ends the wait
    for room for an owed answer, not the answer: where stdout has room it goes out
    whole. And hold exits 128+SIGTERM, not killed by the later one (status -N)."""
    if then == "a second signal at once":
        monkeypatch.setenv("FENCELOCK_TEST_THEN_SIGNAL", str(int(signal.SIGHUP)))
    else:
        monkeypatch.setenv("FENCELOCK_TEST_SIGNAL_AT_SHUTDOWN", str(int(signal.SIGINT)))
    helper = Path(__file__).parent / "signalled_hold.py"
    h = Hold(session, python=(str(helper), str(int(signal.SIGTERM))))
    try:
        h.held()
        assert h.call("append", entry={"role": "user"}, id=1) == {
            "ok": True, "op": "append", "id": 1
        }
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM, h.stderr()
    finally:
        h.kill()
    assert lines(session) == [{"role": "user"}]
    assert probe(session).state == "free"


@needs_linux
def test_a_stop_signal_while_an_owed_answer_waits_for_room_still_lets_it_out(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append's answer waits for room in stdout (the caller reads slowly) when the
    first stop signal comes: the answer still gets the wait for room an owed answer has
    (here an hour), and goes out once the caller reads; then hold releases and exits
    128+N."""
    monkeypatch.setenv("FENCELOCK_TEST_ANSWER_WAIT", "3600")
    helper = Path(__file__).parent / "signalled_hold.py"
    h = Hold(session, python=(str(helper), str(int(signal.SIGTERM)), "99"))  # never
    try:
        h.held()
        pad = _fill_the_pipe(h)
        h.send({"op": "append", "entry": {"role": "user"}, "id": 2})
        thread_in_syscall(h.proc.pid, "poll", main=True, alias="ppoll")
        h.proc.send_signal(signal.SIGTERM)
        assert h.read()["id"] == pad
        assert h.read() == {"ok": True, "op": "append", "id": 2}
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        h.kill()
    assert lines(session) == [{"role": "user"}]
    assert probe(session).state == "free"


@needs_posix
def test_a_stop_signal_during_an_append_whose_caller_is_gone_still_exits_128_plus_n(
    session: Path
) -> None:
    """The answer owed after a stop signal cannot be written (the caller closed its
    end): hold still releases and exits with the signal's code, not 0."""
    helper = Path(__file__).parent / "signalled_hold.py"
    h = Hold(session, python=(str(helper), str(int(signal.SIGTERM))))
    try:
        h.held()
        assert h.proc.stdout is not None
        h.proc.stdout.close()  # the caller stops reading before the answer comes
        h.send_raw(b'{"op": "append", "entry": {}}\n')
        assert h.proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        h.kill()
    assert len(lines(session)) == 1
    assert probe(session).state == "free"


@needs_posix
def test_hold_s_error_lines_escape_a_file_name_s_control_characters_and_bytes(
    tmp_path: Path
) -> None:
    """A session path with a newline, an escape sequence and a byte that is not UTF-8:
    `hold`'s error on stderr is one line, with each such character or byte shown as
    ``\\xNN``, as every other command shows it; nothing reaches the terminal raw."""
    missing = os.fsencode(tmp_path) + b"/no\nd\x1b[2J\xff/x.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", os.fsdecode(missing), "--lane", "x"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert done.returncode == 1, done
    err = done.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("fencelock hold: "), err
    assert "no\\x0ad\\x1b[2J\\xff/x.jsonl" in err, err
    assert "\x1b" not in err


@pytest.mark.parametrize("filters", ["error", "error:::fencelock._hold", "error:/"])
def test_warnings_are_lines_on_stderr_even_where_the_environment_makes_them_errors(
    session: Path, filters: str
) -> None:
    """`PYTHONWARNINGS=error` (for every warning, or for a module or a message) turns no
    warning of `hold` into a traceback: the append that cut a torn tail is answered,
    and the warning is one line on stderr."""
    session.write_bytes(b'{"a":1}\n{"b":')
    requests = b'{"op":"append","entry":{"x":1}}\n{"op":"release"}\n'
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "L"],
        input=requests, capture_output=True, timeout=60,
        env={**os.environ, "PYTHONWARNINGS": filters},
    )
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a.get("op", a.get("event")) for a in answers] == ["held", "append", "release"]
    assert all(a["ok"] for a in answers)
    assert done.returncode == 0
    err = done.stderr.decode()
    assert "Traceback" not in err and "Warning: " in err and "torn" in err
    assert lines(session) == [{"a": 1}, {"x": 1}]


def test_warnings_the_environment_ignores_stay_ignored(session: Path) -> None:
    """Only an "error" filter is overridden: `PYTHONWARNINGS=ignore` silences them."""
    session.write_bytes(b'{"a":1}\n{"b":')
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "L"],
        input=b'{"op":"append","entry":{"x":1}}\n', capture_output=True, timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    assert lines(session) == [{"a": 1}, {"x": 1}]


@pytest.mark.parametrize("filters", ["", "ignore", "ignore:::fencelock._hold"])
def test_an_answer_carries_the_warnings_its_request_gave(session: Path, filters: str) -> None:
    """The caller learns from the answer itself that its append moved a torn last line
    aside, whatever the warning filters of hold's environment say (they decide stderr
    alone, a filter that names the module too); an answer to a request that gave none
    has no ``warnings``."""
    session.write_bytes(b'{"a":1}\n{"b":')
    requests = (b'{"op":"append","entry":{"x":1},"id":1}\n'
                b'{"op":"append","entry":{"x":2},"id":2}\n{"op":"release"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "L"],
        input=requests, capture_output=True, timeout=60,
        env={**os.environ, "PYTHONWARNINGS": filters},
    )
    assert done.returncode == 0, done.stderr
    held, first, second, released = (json.loads(line) for line in done.stdout.splitlines())
    torn = f"{session}: its last line was torn (5 bytes without a line break"
    assert held["event"] == "held" and "warnings" not in held, held
    assert first["ok"] and first["id"] == 1, first
    assert [w.startswith(torn) and w.endswith(f"moved it to {session}.torn")
            for w in first["warnings"]] == [True], first
    assert "warnings" not in second and "warnings" not in released
    assert (b"Warning: " + torn.encode() in done.stderr) is (filters == ""), done.stderr
    assert lines(session) == [{"a": 1}, {"x": 1}, {"x": 2}]


@needs_posix
def test_every_request_is_answered_when_holds_descriptors_are_numbered_past_1024(
    tmp_path: Path,
) -> None:
    """A parent that leaks descriptors into hold leaves its own (the wake-up pipe an
    answer to a request that writes waits with) numbered past 1024, which select(2)
    refuses: every request is answered all the same, and the exit is 0. (With select,
    the append's line went in and its answer never came: a traceback, exit 1.)"""
    import resource

    session = tmp_path / "s.jsonl"

    def crowded() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1200 if hard == resource.RLIM_INFINITY else min(hard, 1200)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
        null = os.open(os.devnull, os.O_RDONLY)
        os.set_inheritable(null, True)
        for fd in range(3, 1100):
            if fd != null:
                os.dup2(null, fd)  # inheritable, and kept: ``close_fds=False``

    ops = ["append", "prompt_begin", "prompt_end", "touch", "info", "release"]
    requests = [{"op": op, "id": n, **({"entry": {"a": 1}} if op == "append" else {})}
                for n, op in enumerate(ops)]
    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
        input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True,
        text=True, timeout=60, check=False, preexec_fn=crowded, close_fds=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert answers[0]["event"] == "held"
    assert [(a["ok"], a["op"], a["id"]) for a in answers[1:]] == [
        (True, op, n) for n, op in enumerate(ops)]
    assert lines(session) == [{"a": 1}]
    assert probe(session).state == "free"


@needs_posix
def test_an_append_whose_line_went_in_is_answered_at_every_descriptor_limit(
    tmp_path: Path,
) -> None:
    """At every limit on open descriptors (`ulimit -n`), an append whose line reached
    the session gets its answer (ok, or an error saying the line is stored): the pipe
    an owed answer waits with was made after the write, and its EMFILE went out in
    place of the answer, leaving the caller with a line it was never told of."""
    import resource

    for limit in range(5, 12):
        session = tmp_path / f"{limit}.jsonl"

        def few(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x"],
            input='{"op":"append","entry":{"a":1}}\n{"op":"release"}\n',
            capture_output=True, text=True, timeout=60, check=False, preexec_fn=few,
        )
        assert "Traceback" not in done.stderr, (limit, done.stderr)
        for said in (done.stderr, done.stdout):  # the limit and its fix, not a bare file
            if "Too many open files" in said:
                assert "raise the limit (ulimit -n)" in said, (limit, said)
        if session.exists() and session.read_bytes() == b'{"a":1}\n':
            answers = [json.loads(line) for line in done.stdout.splitlines()]
            told = [a for a in answers if a.get("op") == "append"
                    or (a.get("stored") in (True, None) and "error" in a)]
            assert told, (limit, done.stdout, done.stderr)


@pytest.mark.parametrize("fence", ["stat", "content"])
def test_hold_fence_picks_how_appends_tell_a_foreign_write(
    session: Path, tmp_path: Path, start_hold: StartHold, fence: str
) -> None:
    """A session chmodded (or given a hard-link backup) before the caller's first line:
    the stat fence cannot tell that from a write whose mtime was put back, and the
    append is refused; a caller that knows its sessions get those picks the content
    fence (`--fence content`), as a library caller passes ``fence="content"``."""
    session.write_text('{"a":0}\n')
    h = start_hold(session, "--fence", fence)
    assert h.held()["record"]["fence"] == fence
    while True:  # ctime comes from a coarse clock: let it tick past the session's
        (tmp_path / "clock").write_bytes(b"x")
        if (tmp_path / "clock").stat().st_ctime_ns > session.stat().st_ctime_ns:
            break
    session.chmod(0o640)
    answer = h.call("append", entry={"a": 1})
    if fence == "stat":
        assert answer["ok"] is False and answer["error"] == "SessionTakeoverError", answer
    else:
        assert answer["ok"] is True, answer
    assert h.call("release")["ok"] is True
    assert h.wait() == 0
