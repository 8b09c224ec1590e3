"""bin/fencelock-repro: the seed's race with real processes, old protocol vs fencelock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fencelock import is_coordination_error
from fencelock._repro import (
    Config,
    Lane,
    LaneClass,
    Mode,
    ModeReport,
    OldRun,
    OldTakeoverError,
    Report,
    _append_line,
    _entry,
    _intruder,
    _percentiles,
    gateway,
    main,
    run,
)

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
    assert base["turns"] == fl["turns"]  # the same seeded schedule in both modes
    assert sum(base["by_lane"].values()) == base["takeovers"]
    assert base["dropped_replies"] == base["turns"] - base["answered"]


def test_both_modes_through_the_module_api(tmp_path: Path) -> None:
    report = run(Config.tiny(seed=7), directory=str(tmp_path), parallel=True)
    assert report.problems() == []
    _assert_clean_and_reproduced(report.to_json()["modes"])
    fl = report.modes[Mode.FENCELOCK]
    assert fl.wait_ms["n"] >= fl.runs  # every run and mirror copy waited (maybe 0 s)
    # fencelock kept session files valid JSONL, one entry per line.
    for session in (tmp_path / "fencelock" / "sessions").glob("*.jsonl"):
        for line in session.read_text().splitlines():
            json.loads(line)


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


def _mode(mode: Mode, takeovers: int, dropped: int) -> ModeReport:
    return ModeReport(mode, 10, 10 - dropped, dropped, takeovers, 10, 5, {}, {},
                      _percentiles([]), {}, 0, 2, 0, 0, [], 1.0)


@pytest.mark.parametrize(
    ("base", "fl", "ok"),
    [((3, 1), (0, 0), True), ((0, 0), (0, 0), False), ((3, 0), (1, 0), False),
     ((3, 0), (0, 1), False)],
)
def test_check_conditions(
    base: tuple[int, int],
    fl: tuple[int, int],
    ok: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = Report(Config.tiny(), {Mode.BASELINE: _mode(Mode.BASELINE, *base),
                                    Mode.FENCELOCK: _mode(Mode.FENCELOCK, *fl)})
    assert (report.problems() == []) is ok
    monkeypatch.setattr("fencelock._repro.run", lambda *a, **k: report)
    assert main(["--quick", "--check"]) == (0 if ok else 1)
    out = capsys.readouterr()
    assert "baseline" in out.out and "fencelock" in out.out
    assert ("check failed" in out.err) is not ok


def test_percentiles_are_nearest_rank_in_ms() -> None:
    p = _percentiles([i / 1000 for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"], p["n"]) == (50, 90, 99, 100, 100)
    assert _percentiles([])["p99"] == 0.0
