"""fencelock-repro: the original report's race with real processes, old protocol vs fencelock."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from marks import needs_xattr

from fencelock import SessionLock, is_coordination_error, probe, recover
from fencelock.tools.repro import (
    DELIVERIES,
    Config,
    FenceLockRun,
    Lane,
    LaneClass,
    Ledger,
    Mode,
    ModeReport,
    OldRun,
    OldTakeoverError,
    Report,
    RunResult,
    Step,
    Takeover,
    Turn,
    _append_line,
    _delivered_in,
    _entry,
    _intruder,
    _percentiles,
    _replies_in,
    _summarise,
    format_report,
    gateway,
    main,
    run,
    run_turn,
)

if TYPE_CHECKING:
    from fencelock._etcdserver import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bin" / "fencelock-repro"
MODE_KEYS = {"turns", "takeovers", "dropped_replies", "by_lane", "answered", "wait_ms"}


def _assert_clean_and_reproduced(modes: dict[str, dict[str, Any]]) -> None:
    base, fl = modes["baseline"], modes["fencelock"]
    assert fl["takeovers"] == 0, fl
    assert fl["dropped_replies"] == 0, fl
    assert fl["answered"] == fl["turns"] > 0, fl
    assert fl["errors"] == [], fl
    assert sum(fl["by_lane"].values()) == 0
    assert base["takeovers"] > 0, base
    assert base["dropped_replies"] > 0, base  # counted from the files, never drawn
    assert base["turns"] == fl["turns"]  # the same seeded schedule in both modes
    assert sum(base["by_lane"].values()) == base["takeovers"]
    assert base["dropped_replies"] == base["turns"] - base["answered"]
    assert fl["duplicate_replies"] == 0, fl  # no turn answered twice


def _answered_on_disk(root: Path, config: Config) -> int:
    """Recount a finished mode's answered turns from its files, independently."""
    replies: set[str] = set()
    for session in (root / "sessions").glob("*.jsonl"):
        for line in session.read_text().splitlines():
            e = json.loads(line)
            if e["role"] == "assistant" and e["run"] != "mirror":
                replies.add(e["turn"])
    delivered = {json.loads(line)["turn"] for record in (root / "gateway").glob("*/" + DELIVERIES)
                 for line in record.read_text().splitlines()}
    turns = [t for lane in gateway(config, str(root / "sessions")) for t in lane.turns]
    return sum(1 for t in turns if t.id in replies and (not t.delivers or t.id in delivered))


def test_both_modes_through_the_module_api(tmp_path: Path) -> None:
    config = Config.tiny(seed=7)
    report = run(config, directory=str(tmp_path), parallel=True)
    assert report.problems() == []
    _assert_clean_and_reproduced(report.to_json()["modes"])
    fl = report.modes[Mode.FENCELOCK]
    assert fl.wait_ms["n"] >= fl.runs  # every run and mirror copy waited (maybe 0 s)
    # fencelock kept session files valid JSONL, one entry per line.
    for session in (tmp_path / "fencelock" / "sessions").glob("*.jsonl"):
        for line in session.read_text().splitlines():
            json.loads(line)
    # Both modes' answers are what the files hold, nothing drawn or merely reported.
    for mode, figures in report.modes.items():
        assert figures.answered == _answered_on_disk(tmp_path / str(mode), config), mode


def test_command_line_json_and_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "3", "--agents", "2", "--duration", "4",
         "--json", "--check", "--parallel", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data["modes"]) == {"baseline", "fencelock"}
    for mode in data["modes"].values():
        assert set(mode) >= MODE_KEYS
        assert set(mode["by_lane"]) >= {c.value for c in LaneClass}
        assert set(mode["wait_ms"]) >= {"p50", "p90", "p99"}
    _assert_clean_and_reproduced(data["modes"])


def _fencelock_on_etcd(tmp_path: Path, *store: str) -> dict[str, Any]:
    """The fencelock mode's quick run with ``store`` (``--backend URL`` or ``--etcd``): its
    JSON, checked clean, and its runs seen holding through etcd: no sidecar was made."""
    root = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", "fencelock", "--quick", "--json", *store,
         "--dir", str(root)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    fl = data["modes"]["fencelock"]
    assert fl["takeovers"] == fl["dropped_replies"] == fl["duplicate_replies"] == 0, fl
    assert fl["answered"] == fl["turns"] > 0 and fl["errors"] == [], fl
    assert list(root.rglob("*.jsonl")) and not list(root.rglob("*.holder")), \
        sorted(p.name for p in root.rglob("*"))
    return data


def test_fencelock_mode_holds_its_sessions_in_etcd_with_backend(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    url = etcd_server.url(f"repro-{uuid.uuid4().hex[:8]}")
    data = _fencelock_on_etcd(tmp_path, "--backend", url)
    assert data["config"]["backend"] == url
    # Each session that had a run has its last record there.
    sessions = (tmp_path / "run" / "fencelock" / "sessions").glob("*.jsonl")
    records = [probe(s, backend=url).record for s in sessions]
    assert records and all(r is not None and r.extra.get("store") == "etcd"
                           for r in records), records


def test_fencelock_mode_on_a_throwaway_etcd(tmp_path: Path) -> None:
    data = _fencelock_on_etcd(tmp_path, "--etcd")
    assert data["config"]["backend"].startswith("etcd://127.0.0.1:"), data["config"]
    assert data["config"]["backend"].endswith("/fencelock-repro"), data["config"]


@contextlib.contextmanager
def _taking_turns(tmp_path: Path, *args: str, modes: tuple[str, ...] = ("*",)
                  ) -> Iterator[subprocess.Popen[str]]:
    """The reproduction with ``args`` (in a session of its own, its stderr piped), once
    its lanes are taking turns (a session file is there, for each of ``modes``)."""
    import time

    out = tmp_path / "run"
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--dir", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        start_new_session=True,
    ) as proc:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while not all(list(out.glob(f"{mode}/sessions/*.jsonl")) for mode in modes):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        yield proc


def test_ctrl_c_ends_the_reproduction_with_one_line_and_exit_130(tmp_path: Path) -> None:
    """Ctrl-C reaches every lane's worker: the parent says "Aborted!" once and exits 130.
    No worker prints a traceback (each printed its KeyboardInterrupt's: 11 of them),
    and none keeps the parent waiting (a worker ended by the signal's default action
    while it waited on the run's stop event would leave the parent's ``stop.set()``
    waiting for it for good)."""
    import signal

    with _taking_turns(tmp_path, "--quick", "--seed", "7") as proc:
        assert proc.stderr is not None
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, err
    assert "Aborted!" in err and "Traceback" not in err, err


def _proc_file(pid: int, name: str) -> str:
    """``/proc/PID/NAME``; empty once the process is gone (as it may be at any time)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def _descendants(pid: int) -> set[int]:
    """The processes under ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_file(int(entry), "stat").rpartition(")")[2].split()
            if len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stopped_reproduction_on_a_throwaway_etcd_leaves_nothing_running(
    tmp_path: Path, signame: str
) -> None:
    """Ctrl-C at the terminal (SIGINT to the group), or SIGTERM or SIGHUP to the
    reproduction alone: it stops its workers and its throwaway etcd and exits with one
    line. A Ctrl-C stopped etcd too (it shared the group), and the workers then rode
    that outage out (9 s, 52 lines of warnings and tracebacks); SIGTERM or SIGHUP ended
    the reproduction alone, and left etcd, the fork server and the workers running."""
    import signal

    sig = getattr(signal, signame)
    with _taking_turns(tmp_path, "--quick", "--etcd", "--mode", "fencelock") as proc:
        assert proc.stderr is not None
        under = _descendants(proc.pid)  # etcd, the fork server, the workers
        assert len(under) >= 3, under
        # etcd is out of the group a Ctrl-C reaches, so that the workers can let go
        # through it; the reproduction stops it once they have.
        etcd = [p for p in under if _proc_file(p, "comm").strip() == "etcd"]
        assert len(etcd) == 1, etcd
        assert os.getpgid(etcd[0]) != os.getpgid(proc.pid), etcd
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 128 + sig, err
    said = "Aborted!" if sig == signal.SIGINT else f"fencelock-repro: stopped by {signame}"
    assert err.strip().splitlines() == [said], err
    _all_end(under)


def test_a_worker_interrupted_inside_a_callback_prints_no_traceback() -> None:
    """A reproduction worker's SIGINT (a Ctrl-C, or the stop the reproduction sends)
    that lands inside a callback Python cannot raise from (an import's module-lock
    callback) printed "Exception ignored ... KeyboardInterrupt" after the
    reproduction's one line; a worker drops that one (the stop ends it), and says any
    other exception such a callback raises."""
    code = (
        "import sys, weakref\n"
        "import fencelock.tools._quiet_interrupts\n"
        "class A: pass\n"
        "def interrupted(ref): raise KeyboardInterrupt\n"
        "def failed(ref): raise ValueError('a callback failed')\n"
        "a, b = A(), A()\n"
        "refs = weakref.ref(a, interrupted), weakref.ref(b, failed)\n"
        "del a\n"
        "print('went on', flush=True)\n"
        "del b\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == "went on\n", out
    assert "KeyboardInterrupt" not in out.stderr, out.stderr
    assert "ValueError: a callback failed" in out.stderr, out.stderr


def _all_end(pids: set[int]) -> None:
    """Wait until every process of ``pids`` is gone (or a zombie); fail after 30 s."""
    import time

    deadline = time.monotonic() + 30  # the fork server ends once it sees its parent gone
    while left := [p for p in pids if _proc_file(p, "stat").rpartition(")")[2].split()[:1]
                   not in ([], ["Z"])]:
        assert time.monotonic() < deadline, left
        time.sleep(0.01)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_a_stop_signal_ends_both_modes_workers_when_they_run_in_parallel(
    tmp_path: Path
) -> None:
    """With --parallel both modes' workers run at once: SIGTERM to the reproduction
    stops every one of them (and the fork servers), and it exits 143 with one line."""
    import signal

    with _taking_turns(tmp_path, "--quick", "--parallel",
                       modes=("baseline", "fencelock")) as proc:
        assert proc.stderr is not None
        under = _descendants(proc.pid)
        assert len(under) >= 2 * 2 * 7, under  # a worker per lane of 2 agents, each mode
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["fencelock-repro: stopped by SIGTERM"], err
    _all_end(under)


def test_a_store_that_cannot_be_reached_is_said_before_any_run(tmp_path: Path) -> None:
    """A `--backend` etcd that refuses connections: one line and exit 2 before the
    baseline runs (every fencelock worker failed on it, with a traceback each, after
    the baseline's whole run)."""
    import socket

    with socket.socket() as refusing:  # bound, not listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        url = f"etcd://127.0.0.1:{refusing.getsockname()[1]}/x"
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", "--backend", url, "--dir",
             str(tmp_path / "run")],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc  # could not run: not --check's failure (1)
    assert proc.stderr.splitlines() == [
        f"fencelock-repro: {url.rsplit('/', 1)[0]}: the etcd holder store is unavailable "
        f"(connection refused); check that etcd runs there, and that --backend / "
        f"FENCELOCK_BACKEND names it"], proc.stderr
    assert not (tmp_path / "run").exists()  # no mode ran


def test_a_dir_that_is_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(afile)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"fencelock-repro: {afile}/baseline: cannot be used (Not a "
                                   f"directory); give a new or empty directory")


_EXTRAS_ONLY = ("portalocker", "filelock", "tooz", "etcd3gw")
"""Packages that come with fencelock's extras, not with ``pip install fencelock``."""

_BLOCK_EXTRAS = f"""
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {_EXTRAS_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (an extra)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def test_runs_on_the_runtime_dependencies_alone(tmp_path: Path) -> None:
    """The README's quick start runs the reproduction after a plain ``pip install .``:
    no process of it (the command, its fork server, its workers) may import a package
    that only an extra brings."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_EXTRAS)
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = subprocess.run([sys.executable, "-c", "import portalocker"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert "an extra" in check.stderr  # the block is in force in every child interpreter
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--agents", "1", "--duration", "1", "--parallel",
         "--json", "--dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "an extra" not in proc.stderr
    assert set(json.loads(proc.stdout)["modes"]) == {"baseline", "fencelock"}


def test_schedule_is_deterministic_per_seed(tmp_path: Path) -> None:
    one = gateway(Config.quick(seed=5), str(tmp_path))
    assert one == gateway(Config.quick(seed=5), str(tmp_path))
    assert one != gateway(Config.quick(seed=6), str(tmp_path))
    classes = {lane.lane_class for lane in one}
    assert classes == set(LaneClass)
    # heartbeat, channel, direct, cron, recovery and mirror share each agent's main session
    by_agent: dict[str, set[str]] = {}
    for lane in one:
        if lane.main:
            by_agent.setdefault(lane.agent, set()).add(lane.session)
    assert all(len(s) == 1 for s in by_agent.values()) and len(by_agent) == 2


def test_old_protocol_throws_a_coordination_error_naming_the_intruder(tmp_path: Path) -> None:
    session = str(tmp_path / "s.jsonl")
    victim = Lane("a1/heartbeat", "a1", LaneClass.HEARTBEAT, "hb", session, True)
    mirror = Lane("a1/mirror", "a1", LaneClass.MIRROR, "mirror", session, True)
    old = OldRun(session, victim)
    old.acquire()
    try:
        old.append(_entry(victim, "t", old.key, "user", "hi"))
        with pytest.raises(OldTakeoverError) as caught, old.prompt_window():
            _append_line(session, _entry(mirror, "t0", "m", "assistant", "copy"))
    finally:
        old.release()
    assert is_coordination_error(caught.value)
    expected = caught.value.expected
    assert expected is not None
    assert _intruder(session, expected[2]) is LaneClass.MIRROR


def _turn(turn_id: str, delivers: bool = True, steps: tuple[Step, ...] = ()) -> Turn:
    return Turn(turn_id, 0.0, steps or (Step(0.0),), delivers, 0.1)


def test_a_reply_counts_only_when_the_files_hold_it(tmp_path: Path) -> None:
    """Answered means: the run's reply line is in a session file and, for a reply that
    goes to a user, in the delivery record; what the runs report decides nothing."""
    sessions, state = tmp_path / "sessions", tmp_path / "gateway"
    session = str(sessions / "main.jsonl")
    turns = (_turn("ok"), _turn("silent", delivers=False), _turn("undelivered"),
             _turn("taken-over"), _turn("claimed"), _turn("mirrored-only"))
    lane = Lane("a1/channel", "a1", LaneClass.CHANNEL, "ch", session, True, turns=turns)
    mirror = Lane("a1/mirror", "a1", LaneClass.MIRROR, "mirror", session, True)
    ledger = Ledger(str(state), "a1")
    sessions.mkdir(exist_ok=True)
    Path(ledger.dir).mkdir(parents=True)
    for t in ("ok", "silent", "undelivered"):
        _append_line(session, _entry(lane, t, "r-" + t, "assistant", f"reply to {t}"))
    _append_line(session, _entry(mirror, "mirrored-only", "mirror", "assistant",
                                 "reply to mirrored-only"))  # a copy is not the reply
    for t in ("ok", "taken-over", "claimed", "mirrored-only", "ok"):  # "ok" twice
        ledger.deliver(t, "r-" + t, f"reply to {t}")
    takeover = Takeover(session, LaneClass.CHANNEL, LaneClass.MIRROR)
    runs = [RunResult(t.id, LaneClass.CHANNEL, session, False, (), t.id != "taken-over",
                      takeover if t.id == "taken-over" else None) for t in turns]
    assert _replies_in(str(sessions)) == {"ok", "silent", "undelivered"}
    assert set(_delivered_in(str(state))) == {"ok", "taken-over", "claimed", "mirrored-only"}
    report = _summarise(Mode.FENCELOCK, [lane, mirror], runs, 1.0,
                        _replies_in(str(sessions)), _delivered_in(str(state)))
    assert (report.turns, report.answered, report.dropped_replies) == (6, 2, 4)
    assert report.duplicate_replies == 1
    assert report.takeovers == 1
    missing = [e for e in report.errors if "no session file holds it" in e]
    assert sorted(e.split(":")[0] for e in missing) == ["claimed", "mirrored-only"]


def test_fencelock_runs_hold_the_prompt_window_around_every_model_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each model call (a provider error's fallback included) is made inside the
    holder's prompt window: the record says "prompt" while it runs."""
    phases: list[str] = []

    class Watched(FenceLockRun):
        def prompt_window(self) -> contextlib.AbstractContextManager[object]:
            window = super().prompt_window()

            @contextlib.contextmanager
            def watched() -> Iterator[object]:
                with window as entered:
                    record = probe(self.session).record
                    phases.append("?" if record is None else str(record.phase))
                    yield entered

            return watched()

    monkeypatch.setattr("fencelock.tools.repro.FenceLockRun", Watched)
    session = tmp_path / "sessions" / "s.jsonl"
    turn = _turn("t", steps=(Step(0.0, provider_error=True), Step(0.0)))
    lane = Lane("a1/heartbeat", "a1", LaneClass.HEARTBEAT, "hb", str(session), True,
                turns=(turn,))
    ledger = Ledger(str(tmp_path / "gateway"), "a1")
    Path(ledger.dir).mkdir(parents=True)
    result = run_turn(Mode.FENCELOCK, lane, turn, ledger)
    assert result.answered and result.error is None and result.fallbacks == 1
    assert phases == ["prompt", "prompt", "prompt"]
    assert _replies_in(str(session.parent)) == {"t"}
    assert set(_delivered_in(str(tmp_path / "gateway"))) == {"t"}


def test_an_unlocked_write_in_the_prompt_window_drops_the_reply(tmp_path: Path) -> None:
    """What a delivery mirror writing without the lock does to a fencelock run: the run
    throws, writes no reply, and the count from the files says so."""
    sessions = tmp_path / "sessions"
    session = str(sessions / "s.jsonl")
    turn = _turn("t", steps=(Step(0.0),))
    lane = Lane("a1/heartbeat", "a1", LaneClass.HEARTBEAT, "hb", session, True,
                turns=(turn,))
    mirror = Lane("a1/mirror", "a1", LaneClass.MIRROR, "mirror", session, True)

    class Intruded(FenceLockRun):
        def prompt_window(self) -> contextlib.AbstractContextManager[object]:
            window = super().prompt_window()

            @contextlib.contextmanager
            def intruded() -> Iterator[object]:
                with window as entered:
                    _append_line(session, _entry(mirror, "t0", "mirror", "assistant", "x"))
                    yield entered

            return intruded()

    ledger = Ledger(str(tmp_path / "gateway"), "a1")
    Path(ledger.dir).mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fencelock.tools.repro.FenceLockRun", Intruded)
        result = run_turn(Mode.FENCELOCK, lane, turn, ledger)
    assert not result.answered and result.takeover is not None
    assert result.takeover.intruder is LaneClass.MIRROR
    report = _summarise(Mode.FENCELOCK, [lane], [result], 1.0,
                        _replies_in(str(sessions)), _delivered_in(str(tmp_path / "gateway")))
    assert (report.takeovers, report.dropped_replies) == (1, 1)
    assert any("takeover" in p for p in Report(Config.tiny(), {Mode.FENCELOCK: report})
               .problems())


@needs_xattr
def test_a_run_in_a_moved_session_goes_on_in_the_fresh_one_and_is_counted(
    tmp_path: Path
) -> None:
    """A lane's run takes a session a recover moved (the stuck run's conversation went
    to a fresh session): its first write is refused, and it runs its whole turn in the
    fresh session, counted in the report's "runs that followed a move"."""
    sessions = tmp_path / "sessions"
    session = sessions / "s.jsonl"
    sessions.mkdir(exist_ok=True)
    session.write_text('{"role": "user"}\n')
    with SessionLock(session, lane="stuck"):
        fresh = recover(session, wait=0).session
    turn = _turn("t", steps=(Step(0.0),))
    lane = Lane("a1/cron", "a1", LaneClass.CRON, "cron", str(session), True, turns=(turn,))
    ledger = Ledger(str(tmp_path / "gateway"), "a1")
    Path(ledger.dir).mkdir(parents=True)
    result = run_turn(Mode.FENCELOCK, lane, turn, ledger)
    assert result.answered and result.moved == 1 and result.error is None, result
    assert session.read_text() == '{"role": "user"}\n'  # nothing more in the old one
    assert [json.loads(x)["role"] for x in Path(fresh).read_text().splitlines()] == [
        "user", "user", "assistant"]
    report = _summarise(Mode.FENCELOCK, [lane], [result], 1.0,
                        _replies_in(str(sessions)), _delivered_in(str(tmp_path / "gateway")))
    assert (report.moves_followed, report.answered) == (1, 1), report
    shown = format_report(Report(Config.tiny(), {Mode.FENCELOCK: report}))
    assert re.search(r"^runs that followed a move +1$", shown, re.M), shown


def _mode(mode: Mode, takeovers: int, dropped: int, twice: int = 0) -> ModeReport:
    return ModeReport(mode, 10, 10 - dropped, dropped, twice, takeovers, 10, 5, {}, {},
                      _percentiles([]), {}, 0, 0, 2, 0, 0, [], 1.0)


@pytest.mark.parametrize(
    ("base", "fl", "ok"),
    [((3, 1), (0, 0), True), ((0, 0), (0, 0), False), ((3, 0), (0, 0), False),
     ((3, 1), (1, 0), False), ((3, 1), (0, 1), False), ((3, 1), (0, 0, 1), False),
     ((3, 1), None, False), (None, (0, 0), False)],
)
def test_check_conditions(
    base: tuple[int, ...] | None,
    fl: tuple[int, ...] | None,
    ok: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--check passes only when fencelock took no turn over, dropped no reply and sent
    none twice, and the baseline took turns over and dropped replies; a mode left out
    (--mode) is a failure, not a pass."""
    modes = {m: _mode(m, *figures) for m, figures in
             ((Mode.BASELINE, base), (Mode.FENCELOCK, fl)) if figures is not None}
    report = Report(Config.tiny(), modes)
    assert (report.problems() == []) is ok
    monkeypatch.setattr("fencelock.tools.repro.run", lambda *a, **k: report)
    assert main(["--quick", "--check"]) == (0 if ok else 1)
    out = capsys.readouterr()
    assert all(str(m) in out.out for m in modes)
    assert ("check failed" in out.err) is not ok


def test_percentiles_are_nearest_rank_in_ms() -> None:
    p = _percentiles([i / 1000 for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"], p["n"]) == (50, 90, 99, 100, 100)
    assert _percentiles([])["p99"] == 0.0


def test_a_run_and_its_recovery_never_both_answer(tmp_path: Path) -> None:
    """Recovery's abort and the run's claim of its reply: the first decides. An aborted
    run stops as its model stream ends and answers nothing; a run that claimed its
    reply first is not aborted (recovery must not re-fire it)."""
    ledger = Ledger(str(tmp_path / "gateway"), "a1")
    Path(ledger.dir).mkdir(parents=True)
    assert ledger.claim("r1") and not ledger.abort("r1") and not ledger.aborted("r1")
    assert ledger.abort("r2") and ledger.abort("r2") and not ledger.claim("r2")
    assert ledger.aborted("r2")
    session = tmp_path / "sessions" / "s.jsonl"
    turn = _turn("t", steps=(Step(0.0), Step(0.0)))
    lane = Lane("a1/cron", "a1", LaneClass.CRON, "cron", str(session), True, turns=(turn,))

    class AbortedInItsStream(FenceLockRun):
        def prompt_window(self) -> contextlib.AbstractContextManager[object]:
            ledger.abort(self.key)  # recovery, while the model call runs
            return super().prompt_window()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fencelock.tools.repro.FenceLockRun", AbortedInItsStream)
        result = run_turn(Mode.FENCELOCK, lane, turn, ledger)
    assert not result.answered and result.superseded and result.takeover is None
    assert _replies_in(str(session.parent)) == set()
    assert not _delivered_in(str(tmp_path / "gateway"))
    assert [json.loads(x)["role"] for x in session.read_text().splitlines()] == ["user"]
