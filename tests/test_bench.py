"""bin/fencelock-bench in its smallest mode: the JSON shape and the correctness checks.

Never asserts on timings: those belong to the machine, not to the code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import etcd_watchers, hammer
from marks import needs_linux

if TYPE_CHECKING:
    from fencelock._etcdserver import EtcdServer

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
                     "appends.fsync", "appends.nofsync", "scan.library", "cycle.reused.floor",
                     "cycle.fresh.floor", "appends.fsync.floor", "appends.nofsync.floor",
                     "cycle.reused.session", "cycle.reused.session.floor", "cycle.first.0",
                     "cycle.first.0.floor", "cycle.first.60", "cycle.first.60.floor",
                     "handoff.median.floor", "handoff.p99.floor", "handoff.median.timed",
                     "handoff.median.timed.floor", "handoff.p99.timed", "handoff.p99.timed.floor",
                     "etcd.cycle", "etcd.handoff.median", "etcd.handoff.p99",
                     "etcd.cycle.floor", "etcd.handoff.median.floor", "etcd.handoff.p99.floor"):
        assert expected in ids
    assert any(i.startswith("scaling.cycle.procs.") for i in ids)
    assert any(i.startswith("scaling.scan.sessions.") for i in ids)
    for row in report["rows"]:
        assert set(row) >= {"id", "section", "figure", "unit", "fencelock", "peers", "ratios"}
        assert set(row["ratios"]) == set(row["peers"])
        for value in (row["fencelock"], *row["peers"].values()):
            assert value is None or isinstance(value, (int, float))


def test_the_timed_hand_off_is_fencelock_with_a_timeout_against_the_polling_peers(
    report: dict[str, Any], tmp_path: Path,
) -> None:
    from fencelock.tools.peers import TIMED_WAIT, make_locker

    locker = make_locker("fencelock-timed", str(tmp_path / "s.jsonl"))
    assert locker.lock.timeout == TIMED_WAIT  # type: ignore[attr-defined]
    rows = {row["id"]: row for row in report["rows"]}
    timed, untimed = rows["handoff.median.timed"], rows["handoff.median"]
    assert timed["fencelock"] > 0 and timed["fencelock"] != untimed["fencelock"]
    # The peers' polled waits (the untimed row's polling figures), no kernel wait.
    assert timed["peers"]["filelock"] == untimed["peers"]["filelock"]
    assert timed["peers"]["raw"] is None
    assert rows["handoff.median.timed.floor"]["fencelock"] == \
        rows["handoff.median.floor"]["fencelock"]


def test_etcd_rows_compare_with_the_sidecar_tooz_and_etcdctl(report: dict[str, Any]) -> None:
    row = next(r for r in report["rows"] if r["id"] == "etcd.handoff.median")
    assert set(row["peers"]) == {"sidecar", "tooz", "etcdctl"}
    tooz = importlib.util.find_spec("tooz") is not None  # the bench extra
    for peer, value in {"fencelock": row["fencelock"], **row["peers"]}.items():
        assert isinstance(value, float) or (peer == "tooz" and not tooz and value is None)
    assert not any("etcd" in s for s in report["skipped"])


def test_the_etcd_floor_is_measured_beside_fencelock(report: dict[str, Any]) -> None:
    for row_id in ("etcd.cycle", "etcd.handoff.median", "etcd.handoff.p99"):
        row = next(r for r in report["rows"] if r["id"] == row_id)
        floor = next(r for r in report["rows"] if r["id"] == row_id + ".floor")
        assert isinstance(floor["fencelock"], float)
        assert floor["peers"] == row["peers"]
    goal = next(g for g in report["goals"] if g["id"] == "etcd.handoff.median")
    assert "etcd floor (bare HTTP)" in goal["value"]
    assert any(n.startswith("etcd write transaction") and "http.client" in n
               for n in report["notes"])


def _wait_for(what: str, ready: Callable[[], bool], unless: threading.Event | None = None,
              limit: float = 30.0) -> None:
    """Return once ``ready()``; fail if ``unless`` is set first. ``limit`` bounds a
    broken build; it is not a timing claim."""
    deadline = time.monotonic() + limit
    while not ready():
        assert unless is None or not unless.is_set(), f"finished before {what}"
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.002)


@pytest.fixture
def own_etcd(etcd_server: EtcdServer) -> Iterator[EtcdServer]:
    """An etcd of the test's own (after `etcd_server`, which checks etcd is there):
    no other test's watch counts among its watchers."""
    from fencelock._etcdserver import EtcdServer

    server = EtcdServer()
    server.start()
    yield server
    server.stop()


def test_the_etcd_floor_and_fencelock_exclude_each_other(
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    """The etcd floor rows are a lower bound only if FloorEtcdLock speaks the store's
    protocol: it must queue behind a fencelock holder and watch it, and get the session
    only when that holder releases; a fencelock waiter must wait for it in turn."""
    import fencelock
    from fencelock.tools.etcd_floor import FloorEtcdLock

    url = own_etcd.url("floor")
    session = tmp_path / "s.jsonl"
    floor = FloorEtcdLock(url, str(session))
    lock = fencelock.SessionLock(session, "fencelock", backend=url)
    try:
        for holder, waiter in ((lock, floor), (floor, lock), (lock, floor)):
            order: list[str] = []
            done = threading.Event()

            def wait(waiter: Any = waiter, order: list[str] = order,
                     done: threading.Event = done) -> None:
                try:
                    waiter.acquire()
                    order.append("waiter")
                finally:
                    done.set()

            _wait_for("closed the last round's watch", lambda: etcd_watchers(own_etcd) == 0)
            holder.acquire()
            held = fencelock.probe(session, backend=url).record
            assert held is not None and held.state == "held"
            t = threading.Thread(target=wait)
            t.start()
            # The waiter blocks in a watch on the holder's key; it must not finish first.
            _wait_for("watched the holder's key", lambda: etcd_watchers(own_etcd) == 1, done)
            status = fencelock.probe(session, backend=url)
            assert status.record is not None and status.record.token == held.token
            assert status.waiters == 1
            order.append("released")
            holder.release()
            t.join(60)
            assert order == ["released", "waiter"]
            now = fencelock.probe(session, backend=url)
            assert now.state == "live" and now.waiters == 0
            assert now.record is not None and now.record.token > held.token
            waiter.release()
        assert fencelock.probe(session, backend=url).state == "free"
    finally:
        floor.close()


def test_floor_and_fencelock_processes_hammering_etcd_never_overlap(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """Two FloorEtcdLock and two SessionLock processes take turns on one session: any
    overlap shows as an interleaved log or a lost increment."""
    url = etcd_server.url(f"floor-{uuid.uuid4().hex[:12]}", ttl=10)
    session, log, counter = tmp_path / "s.jsonl", tmp_path / "log", tmp_path / "counter"
    workers, turns = 4, 15
    lines = hammer(session, log, counter, workers, turns, args=lambda i: ["-", "0.002"],
                   env=lambda i: {"FENCELOCK_BACKEND": url,
                                  "FENCELOCK_HAMMER_FLOOR": "1" if i % 2 else ""})
    assert len(lines) == 2 * workers * turns
    assert counter.read_text() == str(workers * turns)


def test_no_line_lost_or_interleaved(report: dict[str, Any]) -> None:
    appends = report["checks"]["appends"]
    assert {a["peer"] for a in appends} >= {"fencelock", "raw", "floor"}
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


def test_the_proposed_goals_are_taken_against_the_floor_of_the_same_run(
    report: dict[str, Any],
) -> None:
    rows = {r["id"]: r for r in report["rows"]}
    goals = {g["id"]: g for g in report["goals"]}
    over = rows["handoff.median"]["fencelock"] - rows["handoff.median.floor"]["fencelock"]
    assert goals["handoff.floor"]["value"] == f"{over:+.3f} ms over the floor"
    turns = rows["appends.fsync"]["fencelock"] / rows["appends.fsync.floor"]["fencelock"]
    assert goals["appends.fsync.floor"]["value"] == f"{turns:.2f}x floor"


@pytest.mark.parametrize(("raw_empty", "raw_crowded", "said"), [
    (34.8, 36.4, False), (34.8, 320.3, True), (34.8, 12.0, True),
    # Both directories slowed alike (a run right after another one's mass removal):
    # steady growth, but a first acquire at 13x the bare syscalls' reused cycle.
    (152.0, 160.0, True),
])
def test_the_crowded_directory_goal_says_when_the_filesystem_moved(
    raw_empty: float, raw_crowded: float, said: bool,
) -> None:
    """Raw syscalls' own growth stands beside the goal, and a filesystem whose file
    creation itself moved (between the directories, or in both against its usual pace)
    is named as the cause, and the goal is then not judged: the figure measures the
    filesystem."""
    from fencelock.tools.bench import FULL, Report, Row, judge

    report = Report("full", {})
    report.rows = [
        Row("cycle.reused", "cycle", "acquire+release, one object reused", "us",
            fencelock=26.0, peers={"raw": 11.7}),
        Row("cycle.first.0", "cycle", "first acquire among 0 others", "us",
            fencelock=124.5, peers={"raw": raw_empty}),
        Row("cycle.first.100000", "cycle", "first acquire among 100,000 others", "us",
            fencelock=413.6, peers={"raw": raw_crowded}),
    ]
    judge(report, FULL)
    goal = next(g for g in report.goals if g.id == "cycle.first.crowd")
    assert goal.value.startswith(
        f"3.32x empty directory; bare syscalls {raw_crowded / raw_empty:.2f}x")
    assert ("not judged: the filesystem's own file creation was slowed" in goal.value) is said
    assert goal.met is (None if said else False)


def test_a_goal_missed_by_less_than_the_rounding_shows_the_third_decimal() -> None:
    """1.004x portalocker misses "at most 1.0x": the value must not read "1.00x"."""
    from fencelock.tools.bench import FULL, Report, Row, judge

    report = Report("full", {})
    report.rows = [
        Row("cycle.reused.session", "cycle", "acquire+release, session present", "us",
            fencelock=25.1, peers={"portalocker": 25.0}),  # 1.004x
        Row("cycle.reused.session.floor", "cycle", "floor", "us", fencelock=18.2, peers={}),
    ]
    judge(report, FULL)
    goals = {g.id: g for g in report.goals}
    assert goals["cycle.session.portalocker"].met is False
    assert goals["cycle.session.portalocker"].value.startswith("1.004x portalocker")
    assert goals["cycle.session.parity"].value.startswith("1.00x portalocker")  # met


def test_the_interleaving_check_catches_loss_and_tearing(tmp_path: Path) -> None:
    from fencelock.tools.bench import check_lines

    session = tmp_path / "s.jsonl"
    good = [json.dumps({"w": w, "seq": s}) for s in range(3) for w in range(2)]
    session.write_text("\n".join(good) + "\n")
    assert check_lines(str(session), 2, 3)["ok"]
    assert check_lines(str(session), 2, 3)["same_writer"] == 0  # strict alternation
    session.write_text("\n".join(sorted(good, key=lambda line: json.loads(line)["w"])) + "\n")
    assert check_lines(str(session), 2, 3)["same_writer"] == 4 / 5  # one switch in six
    torn = [*good[:2], '{"w": 0, "se{"w": 1, "seq": 1}', *good[4:]]
    session.write_text("\n".join(torn) + "\n")
    result = check_lines(str(session), 2, 3)
    assert not result["ok"]
    assert result["problems"]


def test_the_floor_does_protocol_v1_work(tmp_path: Path) -> None:
    """The floor row is a lower bound only if FloorLock really speaks protocol v1:
    fencelock must read its records, see it live while held, and continue its tokens."""
    import fencelock
    from fencelock._tokens import floor as token_floor
    from fencelock.tools.peers import FloorLock

    directory = tmp_path / "odd %d {0} name"  # no formatting may touch the path
    directory.mkdir()
    session = directory / "s.jsonl"
    floor = FloorLock(str(session), fsync=True)
    for turn in range(3):
        floor.acquire()
        status = fencelock.probe(session)
        assert status.state == "live"
        assert status.record is not None and status.record.token == turn + 1
        if turn == 0:
            assert status.record.fingerprint is None  # no session file yet
        else:
            assert status.fence_ok is True  # the record names the session as it is
        floor.append(json.dumps({"turn": turn}).encode() + b"\n")
        # The session the floor's append made carries the token mark (section 4).
        assert token_floor(str(session)) >= turn + 1
        status = fencelock.probe(session)
        assert status.record is not None and status.fence_ok is not False
        floor.release()
        status = fencelock.probe(session)
        assert status.state == "free" and status.fence_ok is True  # the last fence point
    with fencelock.SessionLock(session, lane="after") as lock:
        assert lock.info is not None and lock.info.token == 4
        lock.append({"turn": 3}, stamp=True)
    assert fencelock.verify(session).ok
    assert [json.loads(line)["turn"] for line in session.read_text().splitlines()] == [0, 1, 2, 3]
    # A sidecar with no record: the floor's next token is above the session's floor
    # (here the stamp of a line that a longer unstamped one follows), as fencelock's is.
    with open(session, "a") as f:
        f.write(json.dumps({"pad": "x" * 5000}) + "\n")
    (directory / "s.jsonl.holder").write_bytes(b"")
    os.removexattr(session, "user.fencelock.token")
    floor.acquire()
    status = fencelock.probe(session)
    assert status.record is not None and status.record.token == 5
    floor.release()


FLOOR_CHILD = """
import sys
from fencelock.tools.peers import FloorLock
floor = FloorLock(sys.argv[1], fsync=True)
floor.acquire()
print("held", flush=True)
sys.stdin.readline()
floor.append(b'{"by": "floor"}\\n')
floor.release()
"""


def test_the_floor_and_fencelock_exclude_each_other_and_continue_each_others_tokens(
    tmp_path: Path,
) -> None:
    """Both ways between processes: while a FloorLock holds, fencelock finds the session
    held (and names the floor's record), and the floor's token continues fencelock's;
    fencelock's next token continues the floor's."""
    import fencelock

    session = tmp_path / "s.jsonl"
    with fencelock.SessionLock(session, lane="first") as lock:
        lock.append({"by": "fencelock"}, stamp=True)
        assert lock.info is not None
        first = lock.info.token
    with subprocess.Popen([sys.executable, "-c", FLOOR_CHILD, str(session)], text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == "held\n"
        with pytest.raises(fencelock.SessionContendedError) as held:
            fencelock.SessionLock(session, lane="second", on_contention="fail").acquire()
        assert held.value.holder is not None and held.value.holder.token == first + 1
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    with fencelock.SessionLock(session, lane="third", on_contention="fail") as lock:
        assert lock.info is not None and lock.info.token == first + 2
        lock.append({"by": "fencelock"}, stamp=True)
    assert fencelock.verify(session).ok
    assert [json.loads(line)["by"] for line in session.read_text().splitlines()] == [
        "fencelock", "floor", "fencelock"]


def test_runs_without_the_bench_extra(tmp_path: Path) -> None:
    """Without the ``bench`` extra the peers' columns are empty and the report says
    which package is missing; fencelock's own figures are all there."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _NotInstalled(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('filelock', 'portalocker'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, _NotInstalled())\n"
    )
    where = tmp_path / "bench"
    where.mkdir()
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", "--quiet", "--only", "cycle",
         "--dir", str(where)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["machine"]["versions"]["portalocker"] == "not installed"
    assert data["machine"]["versions"]["filelock"] == "not installed"
    assert any(s.startswith("portalocker columns") for s in data["skipped"])
    assert any(s.startswith("filelock columns") for s in data["skipped"])
    row = next(r for r in data["rows"] if r["id"] == "cycle.reused")
    assert row["peers"]["portalocker"] is None and row["peers"]["filelock"] is None
    assert isinstance(row["fencelock"], float) and isinstance(row["peers"]["raw"], float)


@pytest.mark.parametrize("turns", [1, 3, 4, 20, 1000, 1001])
@pytest.mark.parametrize("peers", [3, 5])
def test_append_rounds_cover_every_turn_once_in_order(turns: int, peers: int) -> None:
    """As many rounds as peers (so that each peer runs once in each place of the
    rotating order), fewer only for fewer turns."""
    from fencelock.tools.bench import _append_rounds

    rounds = _append_rounds(turns, peers)
    assert len(rounds) == min(peers, turns)
    assert all(len(r) for r in rounds)
    assert [seq for r in rounds for seq in r] == list(range(turns))


def test_p99_is_the_nearest_rank() -> None:
    from fencelock.tools.handoff import p99

    assert p99(list(range(1, 201))) == 198  # of 200: the 198th, not the 199th
    assert p99(list(range(1, 101))) == 99
    assert p99([5.0, 1.0, 3.0]) == 5.0  # fewer than 100: the largest


def test_the_hold_benchmark_says_so_when_hold_gives_no_answer() -> None:
    import io

    import click

    from fencelock.tools.bench_hold import _line

    with pytest.raises(click.ClickException, match=r"gave no answer \(it ended\)"):
        _line(io.BytesIO(b""))
    with pytest.raises(click.ClickException, match="gave no answer: b'No module"):
        _line(io.BytesIO(b"No module named fencelock\n"))
    assert _line(io.BytesIO(b'{"ok": true}\n')) == {"ok": True}


def test_a_short_hold_is_not_judged(tmp_path: Path) -> None:
    import dataclasses

    from fencelock.tools.bench import SMOKE, run

    sizes = dataclasses.replace(SMOKE, judge=True, hold_before_release=0.002)
    report = run(sizes, ["cycle"], str(tmp_path), keep=False, quiet=True)
    assert any(n.startswith("goals not judged: --hold under 30 ms") for n in report.notes)
    assert report.goals and all(g.met is None for g in report.goals)


def test_the_cold_start_interpreter_imports_as_a_regular_install(tmp_path: Path) -> None:
    """The cold-start rows time the command as a regular install starts: fencelock and
    click from where this process has them, without an editable install's import
    finder, which costs every start of this environment's interpreter some
    milliseconds and would be timed in both columns."""
    import click

    import fencelock
    from fencelock.tools import bench as bench_module

    python = bench_module._plain_python(tmp_path)
    done = subprocess.run(
        [python, "-c", "import sys, fencelock, click; print(fencelock.__file__); "
         "print(click.__file__); print(any('__editable__' in m for m in sys.modules))"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split("\n")[:3] == [fencelock.__file__, click.__file__, "False"], \
        done.stderr


@pytest.mark.parametrize("args", [
    ["--dir", "{tmp}/missing"], ["--dir", "{tmp}/file"], ["--save", "{tmp}/missing/x.json"],
    ["--save", "{tmp}"],
], ids=["dir-missing", "dir-a-file", "save-no-directory", "save-a-directory"])
def test_a_bad_dir_or_save_path_is_refused_before_the_run(
    tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A --dir or --save that cannot be used is a usage error naming it, before minutes
    of measuring (a --save that failed after the run lost its figures)."""
    from fencelock.tools import bench as bench_module

    (tmp_path / "file").write_text("")
    argv = ["--only", "cold", "--quiet", *(a.format(tmp=tmp_path) for a in args)]
    assert bench_module.main(argv) == 2
    err = capsys.readouterr().err
    assert args[0] in err and "Traceback" not in err, err


@needs_linux
def test_a_dir_where_no_directory_can_be_made_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A --dir that passes the checks of its option but takes no new directory (/proc,
    even for root; a read-only or full filesystem) ended in a traceback."""
    from fencelock.tools import bench as bench_module

    assert bench_module.main(["--only", "cold", "--quiet", "--dir", "/proc"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "/proc: cannot make the run's directory there" in err, err


def test_ctrl_c_ends_the_benchmark_with_one_line_and_exit_130(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group, the forked workers of a hand-off too:
    the parent says "Aborted!" once and exits 130 (as a shell tells an interrupt from a
    failure), no worker prints a traceback, and the temporary directory goes."""
    import signal

    with subprocess.Popen(
        [sys.executable, str(ROOT / "bin" / "fencelock-bench"), "--quick", "--only",
         "handoff", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as proc:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # the kernel hand-offs' first batch has begun
            seen.append(line)
            if "hand-off: fencelock, raw" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, "".join(seen) + rest
    assert "Aborted!" in rest and "Traceback" not in rest, rest
    assert not list(tmp_path.glob("fencelock-bench-*"))
