"""Torture: kill chaos, stopped and zombie holders, inherited descriptors.

Everything here uses real processes and real OS locks. The kill-chaos run is bounded
and seeded in CI (about 10 s); a person can soak it for longer with

    FENCELOCK_SOAK=300 python -m pytest -m torture -k chaos -s

(FENCELOCK_SOAK is the run's length in seconds; FENCELOCK_SOAK_SEED picks the seed;
the figures are printed at the end, and the test fails on any invariant violation).
"""

from __future__ import annotations

import json
import os
import random
import select
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import SpawnHolder
from marks import needs, needs_sigkill, needs_waitid

from fencelock import (
    FenceLockWarning,
    SessionContendedError,
    SessionLock,
    clear,
    probe,
    recover,
    verify,
)

pytestmark = pytest.mark.torture

HERE = Path(__file__).parent
LINUX = sys.platform.startswith("linux")
SOAK = float(os.environ.get("FENCELOCK_SOAK", "0") or 0)


# -- kill chaos ---------------------------------------------------------------------


@dataclass
class _Writer:
    proc: subprocess.Popen[bytes]
    index: int
    buf: bytes = b""
    killed: bool = False
    exited: bool = False
    current: str | None = None  # run id of a turn in progress (acq seen, done not seen)

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class _Acq:
    token: int
    run_id: str
    pid: int
    prev_pid: int | None
    prev_token: int | None
    prev_run: str | None


@dataclass
class ChaosResult:
    turns_completed: int = 0
    turns_cut: int = 0
    writers_started: int = 0
    kills: int = 0
    kills_of_holders: int = 0
    stale_takeovers: int = 0
    acked_lines: int = 0
    lines_in_file: int = 0
    torn_repaired: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"turns={self.turns_completed} cut_turns={self.turns_cut} "
            f"writers={self.writers_started} kills={self.kills} "
            f"kills_of_holders={self.kills_of_holders} stale_takeovers={self.stale_takeovers} "
            f"acked_lines={self.acked_lines} lines={self.lines_in_file} "
            f"torn_repaired={self.torn_repaired} violations={len(self.violations)}"
        )


class _Chaos:
    def __init__(self, session: Path, seed: int, writers: int, max_prompt: float) -> None:
        self.session = session
        self.rng = random.Random(seed)
        self.seed = seed
        self.n_writers = writers
        self.max_prompt = max_prompt
        self.min_done = 8  # finished turns, and writers killed, before the run may end
        self.min_kills = 10
        self.stopfile = session.parent / "chaos.stop"
        self.sel = selectors.DefaultSelector()
        self.writers: list[_Writer] = []
        self.acqs: list[_Acq] = []
        self.acked: set[tuple[str, int]] = set()
        self.run_pid: dict[str, int] = {}
        self.released: set[str] = set()  # "rel" seen: the record may say released
        self.done: set[str] = set()
        self.cut_runs: set[str] = set()  # killed mid-turn before "rel"
        self.killed_pids: set[int] = set()
        self.errors: list[str] = []
        self.kills_of_holders = 0

    # process handling

    def spawn(self) -> None:
        index = len(self.writers)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "chaos_writer.py"), str(self.session), str(index),
             str(self.seed * 1000 + index), str(self.stopfile), str(self.max_prompt)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        w = _Writer(proc, index)
        self.writers.append(w)
        self.sel.register(proc.stdout, selectors.EVENT_READ, w)

    def _read(self, w: _Writer) -> bool:
        """Read what ``w`` wrote; False at end of file."""
        assert w.proc.stdout is not None
        while True:
            try:
                chunk = os.read(w.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                return True
            if not chunk:
                self.sel.unregister(w.proc.stdout)
                w.proc.stdout.close()
                return False
            w.buf += chunk
            *lines, w.buf = w.buf.split(b"\n")
            for line in lines:
                self._event(w, line.decode())

    def _event(self, w: _Writer, line: str) -> None:
        kind, _, rest = line.partition(" ")
        args = rest.split(" ")
        if kind == "acq":
            token, run_id, ppid, ptoken, prun = args
            self.acqs.append(_Acq(int(token), run_id, w.pid,
                                  None if ppid == "-" else int(ppid),
                                  None if ptoken == "-" else int(ptoken),
                                  None if prun == "-" else prun))
            self.run_pid[run_id] = w.pid
            w.current = run_id
        elif kind == "ack":
            self.acked.add((args[0], int(args[1])))
        elif kind == "rel":
            self.released.add(args[0])
        elif kind == "done":
            self.done.add(args[0])
            w.current = None
        elif kind == "err":
            self.errors.append(f"writer {w.index} pid {w.pid}: {rest}")
        elif kind != "ready":
            self.errors.append(f"writer {w.index}: unexpected report {line!r}")

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for key, _ in self.sel.select(left):
                self._read(key.data)

    def kill(self, w: _Writer) -> None:
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        w.killed = True
        self.killed_pids.add(w.pid)
        if w.proc.stdout is not None and not w.proc.stdout.closed:
            while self._read(w):  # the dead writer's last reports are still in the pipe
                pass
        if w.current is not None:
            self.kills_of_holders += 1
            if w.current not in self.released:
                self.cut_runs.add(w.current)

    def alive(self) -> list[_Writer]:
        return [w for w in self.writers if not w.killed and not w.exited]

    # the run

    def run(self, duration: float) -> ChaosResult:
        try:
            for _ in range(self.n_writers):
                self.spawn()
            # Run at least `duration`, and on past it (up to four times as long) until
            # enough turns have finished and enough writers died, so a slow, loaded
            # machine still exercises what the test claims to.
            start = time.monotonic()
            end, limit = start + duration, start + 4 * duration
            while time.monotonic() < end or (
                time.monotonic() < limit
                and (len(self.done) < self.min_done or len(self.killed_pids) < self.min_kills)
            ):
                self.pump(self.rng.uniform(0.03, 0.3))
                alive = self.alive()
                holders = [w for w in alive if w.current is not None]
                victim = (self.rng.choice(holders) if holders and self.rng.random() < 0.7
                          else self.rng.choice(alive))
                self.kill(victim)
                self.spawn()
            self.stopfile.touch()
            deadline = time.monotonic() + 60
            while self.alive() and time.monotonic() < deadline:
                self.pump(0.1)
                for w in self.alive():
                    if w.proc.poll() is not None:
                        if w.proc.stdout is not None and not w.proc.stdout.closed:
                            while self._read(w):
                                pass
                        w.exited = True
                        if w.proc.returncode != 0:
                            self.errors.append(f"writer {w.index} exited {w.proc.returncode}")
            for w in self.alive():
                self.errors.append(f"writer {w.index} did not stop")
        finally:
            for w in self.writers:
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
                if w.proc.stdout is not None and not w.proc.stdout.closed:
                    w.proc.stdout.close()
            self.sel.close()
        return self.check()

    # the invariants

    def check(self) -> ChaosResult:
        res = ChaosResult(writers_started=len(self.writers), kills=len(self.killed_pids),
                          kills_of_holders=self.kills_of_holders)
        v = res.violations
        v.extend(f"a writer saw an error: {e}" for e in self.errors)

        # Before anyone repairs it: a torn line may only be the last one.
        before = verify(self.session)
        torn_tail = False
        for p in before.problems:
            if p.kind != "torn" or p.line != before.lines:
                v.append(f"before repair: line {p.line}: {p.kind} {p.detail}")
            else:
                torn_tail = True

        # The state left behind: a killed holder's record is stale, its owner dead.
        last = max(self.acqs, key=lambda a: a.token) if self.acqs else None
        status = probe(self.session)
        if status.state == "stale":
            assert status.record is not None
            if status.record.pid not in self.killed_pids:
                v.append(f"stale record of pid {status.record.pid}, which was not killed")
            if status.owner_alive is not False:
                v.append(f"stale record's owner_alive is {status.owner_alive}, not False")
        elif status.state != "free":
            v.append(f"after the run the session is {status.state}: {status.reason}")
        elif last is not None and last.run_id in self.cut_runs:
            v.append(f"run {last.run_id} was killed mid-turn but the record is free")

        # The driver takes the session last, so every cut turn has a successor.
        final = SessionLock(self.session, "driver", stamp=True)
        info = final.acquire()
        try:
            prev = info.previous
            self.acqs.append(_Acq(info.token, info.run_id, os.getpid(),
                                  prev.pid if prev else None, prev.token if prev else None,
                                  prev.run_id if prev else None))
            # The driver's append cuts a torn tail aside, and must say so; else no warning.
            with (pytest.warns(FenceLockWarning, match="torn") if torn_tail
                  else nullcontext()):
                final.append({"final": True})
        finally:
            final.release()

        tokens = [a.token for a in self.acqs]
        if len(set(tokens)) != len(tokens):
            v.append("two acquisitions got the same token")
        taken_over = set()
        for a in self.acqs:
            if a.prev_pid is None:
                continue
            res.stale_takeovers += 1
            taken_over.add(a.prev_run)
            if a.prev_pid not in self.killed_pids:
                v.append(f"token {a.token} took over pid {a.prev_pid}, which was not killed")
            if a.prev_token is None or not a.prev_token < a.token:
                v.append(f"token {a.token} took over token {a.prev_token}: not larger")
            if a.prev_run in self.done:
                v.append(f"token {a.token} took over run {a.prev_run}, which had released")
        # A writer killed after acquire() returned but before its "acq" report was
        # written took over its predecessor unseen, and its successor names a run the
        # driver never heard of: each such takeover hides at most one cut run's.
        unseen = sum(1 for a in self.acqs
                     if a.prev_run is not None and a.prev_run not in self.run_pid)
        hidden = sorted(run for run in self.cut_runs if run not in taken_over)
        if len(hidden) > unseen:
            v.extend(f"run {run} (pid {self.run_pid[run]}) was killed holding the session, "
                     f"but no later holder reported it stale ({unseen} unseen takeovers)"
                     for run in hidden)

        # The transcript.
        after = verify(self.session)
        v.extend(f"after repair: line {p.line}: {p.kind} {p.detail}" for p in after.problems)
        lines = []
        for number, raw in enumerate(self.session.read_bytes().splitlines()[:-1], 1):
            try:  # the last line is the driver's own
                entry = json.loads(raw)
                entry["run"], entry["part"], entry["pid"], entry["_fencelock"]["token"]
            except (ValueError, TypeError, KeyError):
                v.append(f"line {number} is not one writer's line: {raw[:40]!r}")
                continue
            lines.append(entry)
        res.lines_in_file = len(lines)
        res.acked_lines = len(self.acked)
        seen: dict[tuple[str, int], int] = {}
        for i, e in enumerate(lines):
            key = (e["run"], e["part"])
            if key in seen:
                v.append(f"line {i + 1} duplicates line {seen[key] + 1}")
            seen[key] = i
            if key not in self.acked and e["pid"] not in self.killed_pids:
                v.append(f"line {i + 1} was written but never acknowledged by a live writer")
            token = e["_fencelock"]["token"]
            own = [a.token for a in self.acqs if a.run_id == e["run"]]
            if own and own[0] != token:
                v.append(f"line {i + 1} stamped token {token}, its run had {own[0]}")
        for key in self.acked - seen.keys():
            v.append(f"acknowledged line {key} is missing from the session")
        for i, e in enumerate(lines):
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            prv = lines[i - 1] if i > 0 else None
            if e["part"] == 1:
                if nxt is not None and nxt["run"] == e["run"]:
                    res.turns_completed += 1
                else:
                    res.turns_cut += 1
                    if e["pid"] not in self.killed_pids:
                        v.append(f"line {i + 1}: turn {e['run']} interleaved or cut, "
                                 "and its writer was not killed")
            elif prv is None or prv["run"] != e["run"] or prv["part"] != 1:
                v.append(f"line {i + 1}: second half of {e['run']} not next to its first")

        torn = self.session.with_name(self.session.name + ".torn")
        fragments = torn.read_bytes().splitlines() if torn.exists() else []
        res.torn_repaired = len(fragments)
        for frag in fragments:
            if not frag.startswith(b'{"w":'):
                v.append(f"a torn fragment is not the start of a line: {frag[:40]!r}")
        if len(fragments) > len(self.killed_pids):
            v.append(f"{len(fragments)} torn fragments from {len(self.killed_pids)} kills")
        return res


def run_chaos(session: Path, *, seconds: float, seed: int, writers: int = 4,
              max_prompt: float = 0.03) -> ChaosResult:
    return _Chaos(session, seed, writers, max_prompt).run(seconds)


@needs_sigkill
@pytest.mark.timeout(SOAK + 120)  # a soak runs as long as asked; the default covers the rest
def test_kill_chaos_keeps_every_invariant(session: Path) -> None:
    seconds = SOAK or 8.0
    seed = int(os.environ.get("FENCELOCK_SOAK_SEED", "7"))
    result = run_chaos(session, seconds=seconds, seed=seed, writers=6 if SOAK else 4)
    print(f"\nkill chaos ({seconds:.0f}s, seed {seed}): {result.summary()}")
    assert result.violations == [], "\n".join(result.violations[:30])
    # The run must have exercised what it claims to test.
    assert result.kills >= 10
    assert result.turns_completed >= 5
    assert result.stale_takeovers >= 1
    assert result.acked_lines >= 10


# -- stop and pause -----------------------------------------------------------------


@needs_waitid
def test_stopped_holder_stays_live_and_is_never_cleared(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="stopped")
    token = h.acquire()
    assert h.call("append " + json.dumps({"n": 1})) == "ok"
    assert h.call("prompt") == "ok"
    sidecar = Path(str(session) + ".holder")
    before = (sidecar.read_bytes(), session.read_bytes())
    h.kill(signal.SIGSTOP)
    try:
        os.waitid(os.P_PID, h.pid, os.WSTOPPED | os.WNOWAIT)  # returns once it is stopped
        status = probe(session)
        assert status.state == "live"
        assert status.owner_alive is True
        assert status.record is not None and status.record.token == token
        with pytest.raises(SessionContendedError) as exc:
            clear(session)
        assert exc.value.holder is not None and exc.value.holder.pid == h.pid
        with pytest.raises(SessionContendedError):
            clear(session, remove=True, force=True)
        with pytest.raises(SessionContendedError):
            recover(session, wait=0.2, fresh=False)
        with pytest.raises(SessionContendedError):
            SessionLock(session, "other", on_contention="fail").acquire()
        assert (sidecar.read_bytes(), session.read_bytes()) == before
    finally:
        h.kill(signal.SIGCONT)
    assert h.call("endprompt") == "ok"
    assert h.call("release") == "released"
    assert probe(session).state == "free"


def _wait_for_state(pid: int, want: str, timeout: float = 10.0) -> None:
    """Poll /proc/<pid>/stat until the process is in state ``want`` (e.g. T, Z)."""
    if not LINUX:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(f"/proc/{pid}/stat").read_text()
        if text[text.rfind(")") + 2] == want:
            return
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} never reached state {want}")


_HOLD_THEN_EXIT = textwrap.dedent("""
    import sys
    from fencelock import SessionLock
    lock = SessionLock(sys.argv[1], "zombie")
    info = lock.acquire()
    print(info.token, flush=True)
    # exits holding the session: the kernel drops the lock, the record says held
""")


@needs_waitid
def test_zombie_owner_is_stale(session: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _HOLD_THEN_EXIT, str(session)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        token = int(child.stdout.readline())
        # Wait until it has exited, but do not reap it: it stays a zombie.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        if LINUX:
            _wait_for_state(child.pid, "Z")
        status = probe(session)
        assert status.state == "stale"
        assert status.owner_alive is False
        assert status.record is not None
        assert (status.record.pid, status.record.token) == (child.pid, token)
        with SessionLock(session, "next") as lock:
            info = lock.info
            assert info is not None and info.previous is not None
            assert (info.previous.pid, info.previous.token) == (child.pid, token)
            assert info.token > token
    finally:
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# A holder that hands its sidecar descriptor to a child, then waits to be killed. With
# "spawn" the child gets the descriptor through subprocess pass_fds (an exec'd child,
# like a CLI tool started by the run); with "fork" it is a plain os.fork() child.
_HOLD_AND_FORK = textwrap.dedent("""
    import os, subprocess, sys
    from fencelock import SessionLock
    session, how = sys.argv[1], sys.argv[2]
    lock = SessionLock(session, "parent")
    lock.acquire()
    sidecar = session + ".holder"
    fds = [int(n) for n in os.listdir("/proc/self/fd")
           if os.path.realpath(f"/proc/self/fd/{n}") == os.path.realpath(sidecar)]
    if how == "spawn":
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import os, sys; print(os.getpid(), flush=True); sys.stdin.read()"],
            pass_fds=fds, stdout=subprocess.PIPE, text=True)
        child_pid = int(child.stdout.readline())
        kept = fds
    else:
        r, w = os.pipe()
        child_pid = os.fork()
        if child_pid == 0:
            # What the child still has open onto the sidecar after fencelock's at-fork hook.
            kept = [int(n) for n in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{n}") == os.path.realpath(sidecar)]
            os.write(w, (repr(kept) + "\\n").encode())
            sys.stdin.read()  # lives until the test closes its stdin
            os._exit(0)
        kept = eval(os.read(r, 1000).decode())
    print(child_pid, repr(kept), flush=True)
    sys.stdin.read()
""")


@contextmanager
def _parent_with_child(
    session: Path, how: str
) -> Iterator[tuple[subprocess.Popen[str], int, list[int]]]:
    parent = subprocess.Popen([sys.executable, "-c", _HOLD_AND_FORK, str(session), how],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        pid_text, _, kept = line.partition(" ")
        child_pid = int(pid_text)
        yield parent, child_pid, json.loads(kept.replace("'", '"') or "[]")
    finally:
        parent.kill()
        parent.wait()
        if child_pid:
            with suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)  # the test's own grandchild
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()


@needs("proc", "pidfd")  # finds the descriptor through /proc
def test_inherited_descriptor_keeps_the_session_live(session: Path) -> None:
    with _parent_with_child(session, "spawn") as (parent, child_pid, fds):
        assert fds, "the holder had no descriptor onto its sidecar"
        parent.kill()
        parent.wait()
        # The owner is dead, but the child shares its open file description: the
        # kernel still holds the lock, and the lock alone decides.
        status = probe(session)
        assert status.state == "live"
        assert status.record is not None and status.record.pid == parent.pid
        assert status.owner_alive is False
        with pytest.raises(SessionContendedError):
            clear(session)
        os.kill(child_pid, signal.SIGKILL)
        _wait_gone(child_pid)
        assert probe(session).state == "stale"


@needs("fork", "proc")
def test_plain_fork_child_does_not_keep_the_session(session: Path) -> None:
    with _parent_with_child(session, "fork") as (parent, child_pid, kept):
        assert kept == [], f"the forked child still has sidecar descriptors {kept}"
        parent.kill()
        parent.wait()
        assert Path(f"/proc/{child_pid}").exists()  # the child outlives its parent
        status = probe(session)
        assert status.state == "stale"
        assert status.record is not None and status.record.pid == parent.pid
        assert status.owner_alive is False


def _wait_gone(pid: int, limit: float = 60.0) -> None:
    """Return once ``pid`` has exited (its descriptors, the lock's included, closed)."""
    try:
        exited = os.pidfd_open(pid)  # readable once the process has exited
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([exited], [], [], limit)
        assert ready, f"pid {pid} did not exit"
    finally:
        os.close(exited)


def test_killed_holder_is_stale_and_taken_over_with_a_larger_token(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="doomed")
    token = h.acquire()
    assert h.call("append " + json.dumps({"n": 1})) == "ok"
    h.kill()
    status = probe(session)
    assert status.state == "stale"
    assert status.owner_alive is False
    assert status.record is not None and status.record.pid == h.pid
    nxt = spawn_holder(session, lane="next")
    assert nxt.acquire() == token + 1
    status = probe(session)
    assert status.state == "live"
    assert status.record is not None and status.record.previous is not None
    assert (status.record.previous.pid, status.record.previous.token) == (h.pid, token)
    assert status.record.previous.lane == "doomed"
    assert nxt.call("release") == "released"
