"""bin/fencelock-bench in its smallest mode: the JSON shape and the correctness checks.

Never asserts on timings: those belong to the machine, not to the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bin" / "fencelock-bench"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    where = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", "--quiet", "--dir", str(where)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data: dict[str, Any] = json.loads(proc.stdout)
    assert list(where.iterdir()) == []  # the temporary files are gone
    return data


def test_machine_is_described(report: dict[str, Any]) -> None:
    m = report["machine"]
    for key in ("cpu", "cores", "kernel", "python", "filesystem", "versions"):
        assert key in m
    assert report["mode"] == "smoke"


def test_rows_have_the_documented_shape(report: dict[str, Any]) -> None:
    ids = {row["id"] for row in report["rows"]}
    for expected in ("cycle.reused", "cycle.fresh", "handoff.median", "handoff.p99",
                     "appends.fsync", "appends.nofsync", "scan.library"):
        assert expected in ids
    assert any(i.startswith("scaling.cycle.procs.") for i in ids)
    assert any(i.startswith("scaling.scan.sessions.") for i in ids)
    for row in report["rows"]:
        assert set(row) >= {"id", "section", "figure", "unit", "fencelock", "peers", "ratios"}
        assert set(row["ratios"]) == set(row["peers"])
        for value in (row["fencelock"], *row["peers"].values()):
            assert value is None or isinstance(value, (int, float))


def test_no_line_lost_or_interleaved(report: dict[str, Any]) -> None:
    appends = report["checks"]["appends"]
    assert {a["peer"] for a in appends} >= {"fencelock", "raw"}
    for a in appends:
        assert a["ok"], a
        assert a["lines"] == a["expected"]


def test_scan_sees_every_state(report: dict[str, Any]) -> None:
    scan = report["checks"]["scan"]
    assert scan["ok"], scan
    assert report["ok"] is True


def test_goals_are_not_judged_in_smoke_mode(report: dict[str, Any]) -> None:
    assert report["goals"]
    assert all(g["met"] is None for g in report["goals"])


def test_the_interleaving_check_catches_loss_and_tearing(tmp_path: Path) -> None:
    from fencelock._bench import check_lines

    session = tmp_path / "s.jsonl"
    good = [json.dumps({"w": w, "seq": s}) for s in range(3) for w in range(2)]
    session.write_text("\n".join(good) + "\n")
    assert check_lines(str(session), 2, 3)["ok"]
    torn = [*good[:2], '{"w": 0, "se{"w": 1, "seq": 1}', *good[4:]]
    session.write_text("\n".join(torn) + "\n")
    result = check_lines(str(session), 2, 3)
    assert not result["ok"]
    assert result["problems"]
