"""The benchmark behind ``fencelock-bench``: fencelock against its peers.

Peers are raw ``flock(2)`` syscalls, ``filelock.FileLock`` and ``portalocker.Lock``
doing the same work. Figures: the uncontended cycle, hand-off latency to a waiter in
another process, contended appends, a probe scan, cold start of the command, and how
cycle and scan costs grow. Every ratio is fencelock's cost divided by the peer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import importlib.util
import itertools
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import click

import fencelock

# An internal the benchmark needs, imported deliberately: the no-fsync figure stubs the
# fence's fsync seam, which has no public knob. Everything else uses the public API.
from fencelock import _fence
from fencelock.tools import handoff
from fencelock.tools._command import quietly, run_command, start_worker
from fencelock.tools.peers import (
    APPEND_FLAGS,
    TIMED_WAIT,
    FloorLock,
    Locker,
    available,
    make_locker,
    record_bytes,
)

PEERS = ("raw", "filelock", "portalocker")
SECTIONS = ("cycle", "handoff", "appends", "scan", "cold", "scaling", "etcd")

_CTX = multiprocessing.get_context("fork")
_PAD = "x" * 60


# -- sizes ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """How much work each figure does; ``full`` is what the goals are judged on."""

    name: str
    cycles: int
    handoffs: int
    handoffs_polling: int
    writers: int
    turns: int
    scan_sessions: int
    scan_repeats: int
    cold_runs: int
    session_counts: tuple[int, ...]
    process_counts: tuple[int, ...]
    contended_cycles: int
    hold_before_release: float
    """How long the holder holds before releasing to the blocked waiter: as long as
    real waits last, since a waiter that slept longer wakes up slower."""
    judge: bool
    crowd: int
    """Sessions already in the directory for the crowded first-acquire figure."""


FULL = Sizes(
    name="full", cycles=5000, handoffs=200, handoffs_polling=50, writers=4, turns=1000,
    scan_sessions=10_000, scan_repeats=3, cold_runs=10, session_counts=(1, 100, 10_000),
    process_counts=(1, 2, 4, 8), contended_cycles=500, hold_before_release=0.03, judge=True,
    crowd=100_000,
)
QUICK = Sizes(
    name="quick", cycles=1000, handoffs=20, handoffs_polling=6, writers=4, turns=150,
    scan_sessions=2000, scan_repeats=2, cold_runs=3, session_counts=(1, 100, 2000),
    process_counts=(1, 2, 4), contended_cycles=150, hold_before_release=0.03, judge=False,
    crowd=2000,
)
SMOKE = Sizes(
    name="smoke", cycles=100, handoffs=5, handoffs_polling=3, writers=2, turns=20,
    scan_sessions=60, scan_repeats=1, cold_runs=1, session_counts=(1, 20),
    process_counts=(1, 2), contended_cycles=20, hold_before_release=0.002, judge=False,
    crowd=60,
)


# -- results -------------------------------------------------------------------------


@dataclass
class Row:
    """One figure: fencelock's value, each peer's, and the cost ratios."""

    id: str
    section: str
    figure: str
    unit: str
    _: KW_ONLY
    fencelock: float | None
    peers: dict[str, float | None]
    lower_is_better: bool = True
    note: str = ""
    ratios: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for peer, value in self.peers.items():
            f = self.fencelock
            if f is None or value is None or f <= 0 or value <= 0:
                self.ratios[peer] = None
            else:
                self.ratios[peer] = f / value if self.lower_is_better else value / f


@dataclass
class Goal:
    id: str
    text: str
    value: str
    met: bool | None


@dataclass
class Report:
    mode: str
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, row_id: str) -> Row | None:
        return next((r for r in self.rows if r.id == row_id), None)

    @property
    def ok(self) -> bool:
        return all(c.get("ok", True) for c in self._all_checks())

    def _all_checks(self) -> Iterator[dict[str, Any]]:
        for value in self.checks.values():
            if isinstance(value, list):
                yield from value
            elif isinstance(value, dict):
                yield value

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "machine": self.machine,
            "ratio": "fencelock cost / peer cost (below 1: fencelock is cheaper)",
            "rows": [asdict(r) for r in self.rows],
            "goals": [asdict(g) for g in self.goals],
            "checks": self.checks,
            "skipped": self.skipped,
            "notes": self.notes,
            "ok": self.ok,
        }


def _progress(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"  .. {text}", file=sys.stderr, flush=True)


# -- the machine ---------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fs_type(directory: str) -> str:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return "unknown"
    target = os.path.realpath(directory)
    best, best_type = -1, "unknown"
    for parts in mounts:
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > best:
            best, best_type = len(point), parts[2]
    return best_type


def machine(directory: str) -> dict[str, Any]:
    """What the figures were measured on."""
    versions = {"fencelock": fencelock.__version__}
    for peer in ("portalocker", "filelock"):
        versions[peer] = _version(peer) if available(peer) else "not installed"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": _python_build(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "temp_dir": directory,
        "filesystem": _fs_type(directory),
        "versions": versions,
    }


def _python_build() -> str:
    """The interpreter and how it was built: a build without profile-guided optimisation
    runs Python code slower against the same system calls, which moves every ratio
    against raw syscalls and the floor."""
    import sysconfig

    args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    pgo = "PGO" if "--enable-optimizations" in args else "no PGO"
    return (f"{platform.python_implementation()} {platform.python_version()} "
            f"({platform.python_build()[1]}, {pgo})")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _lock_path(base: Path, peer: str) -> str:
    d = base / peer
    d.mkdir(parents=True, exist_ok=True)
    if peer in ("fencelock", "floor"):
        return str(d / "s.jsonl")
    return _lock_file(d / "s.lock")


def _lock_file(path: Path) -> str:
    """A peer's lock file, made before it is timed: a lock file exists where a peer's
    users lock it (portalocker opens it "r+b", which does not create it)."""
    path.touch(mode=0o600, exist_ok=True)
    return str(path)


# -- 1. uncontended cycle ------------------------------------------------------------


def _time_per_call(fn: Callable[[], None], n: int, batches: int = 7) -> float:
    """Median over batches of the mean time per call, in microseconds."""
    for _ in range(max(20, n // 10)):
        fn()
    per = max(1, n // batches)
    means = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(per):
            fn()
        means.append((time.perf_counter_ns() - start) / per / 1000)
    return statistics.median(means)


def _time_side_by_side(
    fns: dict[str, Callable[[], None]], n: int, batches: int = 9
) -> dict[str, float]:
    """Like `_time_per_call` for several peers, their batches taken in turn: on a shared
    machine a burst of load then lands on every peer alike instead of on one of them."""
    for fn in fns.values():
        for _ in range(max(20, n // 10)):
            fn()
    per = max(1, n // batches)
    means: dict[str, list[float]] = {peer: [] for peer in fns}
    for _ in range(batches):
        for peer, fn in fns.items():
            start = time.perf_counter_ns()
            for _ in range(per):
                fn()
            means[peer].append((time.perf_counter_ns() - start) / per / 1000)
    return {peer: statistics.median(m) for peer, m in means.items()}


def _cycle_fn(peer: str, path: str, fresh: bool) -> Callable[[], None]:
    if fresh:

        def cycle() -> None:
            lock = make_locker(peer, path)
            lock.acquire()
            lock.release()

        return cycle
    lock = make_locker(peer, path)

    def reuse() -> None:
        lock.acquire()
        lock.release()

    return reuse


def bench_cycle(base: Path, sizes: Sizes, quiet: bool) -> list[Row]:
    rows = []
    for name, fresh, session in (("reused", False, False), ("fresh", True, False),
                                 ("reused.session", False, True)):
        values: dict[str, float | None] = {}
        fns = {}
        for peer in ("fencelock", *PEERS, "floor"):
            if not available(peer):
                values[peer] = None
                continue
            path = _lock_path(base / name, peer)
            if session and peer in ("fencelock", "floor"):
                _append_line(path, b'{"role":"user","content":"hi"}\n', fsync=False)
            fns[peer] = _cycle_fn(peer, path, fresh)
        _progress(quiet, f"cycle {name}: {', '.join(fns)} side by side")
        values.update(_time_side_by_side(fns, sizes.cycles))
        values = {peer: values[peer] for peer in ("fencelock", *PEERS, "floor")}
        kind = "fresh object each cycle" if fresh else "one object reused"
        if session:
            kind += ", session file present"
        row_id = f"cycle.{name}"
        floor = values.pop("floor")
        rows.append(Row(
            row_id, "cycle", f"uncontended acquire+release, {kind}", "us",
            fencelock=values.pop("fencelock"), peers=values,
            note="every peer builds a record in fencelock's layout at each acquire and writes it",
        ))
        rows.append(_floor_row(row_id, floor, values))
    rows += bench_first_acquire(base, sizes, quiet)
    return rows


def settle() -> None:
    """Write out every dirty page now (``sync``): a figure taken while the kernel
    flushes thousands of files the benchmark just made or removed would time the flush,
    on a disk the fsync rows and etcd share."""
    if hasattr(os, "sync"):
        os.sync()


def _crowd(directory: Path, n: int) -> None:
    """``n`` sessions with released records, made with bare syscalls (as fast as can be)."""
    directory.mkdir(parents=True)
    record = json.loads(record_bytes(str(directory / "x.jsonl")))
    record["state"] = "released"
    for i in range(n):
        session = str(directory / f"{i:08x}-0000-4000-8000-000000000000.jsonl")
        record["session"] = session
        held = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        for path, data in ((session, b'{"role":"user"}\n'), (session + ".holder", held)):
            fd = os.open(path, APPEND_FLAGS, 0o600)
            os.write(fd, data)
            os.close(fd)


def _first_cycle_fn(peer: str, directory: Path) -> Callable[[], None]:
    """A cycle on a session never seen before: a new name in ``directory`` each call."""
    names = (str(directory / f"new-{peer}-{i}.jsonl") for i in itertools.count())

    def cycle() -> None:
        lock = make_locker(peer, next(names))
        lock.acquire()
        lock.release()

    return cycle


def bench_first_acquire(base: Path, sizes: Sizes, quiet: bool) -> list[Row]:
    """A new session's first acquire+release in an empty directory and in a crowded one:
    its cost must not grow with the sessions beside it."""
    rows = []
    counts = (0, sizes.crowd)
    for n in counts:
        _progress(quiet, f"cycle first acquire among {n} sessions: making them")
        _crowd(base / f"first-{n}", n)
    settle()
    _progress(quiet, "cycle first acquire: fencelock, raw, floor, both directories side by side")
    peers = ("fencelock", "raw", "floor")
    timed = _time_side_by_side(
        {f"{peer}@{n}": _first_cycle_fn(peer, base / f"first-{n}")
         for n in counts for peer in peers},
        min(sizes.cycles, 2000),
    )
    for n in counts:
        values: dict[str, float | None] = {peer: timed[f"{peer}@{n}"] for peer in peers}
        row_id = f"cycle.first.{n}"
        floor = values.pop("floor")
        rows.append(Row(
            row_id, "cycle", f"first acquire+release of a new session among {n:,} others",
            "us", fencelock=values.pop("fencelock"), peers=values,
            note="a new session name each cycle (fresh object, new sidecar); both "
            "directories timed in alternating batches",
        ))
        rows.append(_floor_row(row_id, floor, values))
    # The crowd stays until the run ends: on ext4 without a journal, every file created
    # in the minutes after a mass removal passes over the freed inodes (the kernel's
    # ``recently_deleted`` check), which would slow every section after this one.
    return rows


def _floor_row(row_id: str, floor: float | None, peers: dict[str, float | None],
               lower_is_better: bool = True, unit: str | None = None) -> Row:
    """The same figure for `FloorLock`, in the fencelock column: the protocol's floor."""
    return Row(
        f"{row_id}.floor", row_id.split(".")[0], "  protocol v1 floor (bare syscalls, see notes)",
        unit or ("turns/s" if not lower_is_better else "us"), fencelock=floor, peers=dict(peers),
        lower_is_better=lower_is_better,
        note="not fencelock: only the syscalls protocol v1 requires, in flat code with a "
        "precomputed record and no error handling (FloorLock): a lower bound for a Python "
        "holder that opens the sidecar per acquire",
    )


# -- 2. hand-off latency -------------------------------------------------------------


def handoff_latencies(peer: str, path: str, rounds: int, hold: float) -> list[float]:
    """Milliseconds from the holder's release to the blocked waiter's acquire."""
    return handoff.latencies(functools.partial(make_locker, peer, path), rounds, hold)


def bench_handoff(base: Path, sizes: Sizes, quiet: bool) -> list[Row]:
    med: dict[str, float | None] = {}
    p99: dict[str, float | None] = {}
    counts = {}
    lats: dict[str, list[float]] = {}
    for peer in ("filelock", "portalocker"):  # polling: their poll interval dominates
        if not available(peer):
            continue
        _progress(quiet, f"hand-off: {peer} x{sizes.handoffs_polling}")
        lats[peer] = handoff_latencies(peer, _lock_path(base / "handoff", peer),
                                       sizes.handoffs_polling, sizes.hold_before_release)
    # Kernel waiters side by side, in chunks taken in turn (a burst of load on a shared
    # machine then lands on every peer alike).
    kernel = tuple(p for p in ("fencelock", "raw", "portalocker-blocking", "floor",
                               "fencelock-timed") if available(p))
    chunk = 20
    for done in range(0, sizes.handoffs, chunk):
        rounds = min(chunk, sizes.handoffs - done)
        _progress(quiet, f"hand-off: {', '.join(kernel)} x{done + rounds}/{sizes.handoffs}")
        for peer in kernel:
            lats.setdefault(peer, []).extend(handoff_latencies(
                peer, _lock_path(base / "handoff", peer), rounds, sizes.hold_before_release
            ))
    for peer in ("fencelock", "raw", "filelock", "portalocker", "portalocker-blocking",
                 "floor", "fencelock-timed"):
        lat = lats.get(peer)
        if not lat:
            med[peer] = p99[peer] = None
            continue
        med[peer], p99[peer], counts[peer] = statistics.median(lat), handoff.p99(lat), len(lat)
    floor_med, floor_p99 = med.pop("floor"), p99.pop("floor")
    pb_med, pb_p99 = med.pop("portalocker-blocking"), p99.pop("portalocker-blocking")
    f_med, f_p99 = med.pop("fencelock"), p99.pop("fencelock")
    t_med, t_p99 = med.pop("fencelock-timed"), p99.pop("fencelock-timed")
    how = ", ".join(f"{k} {v}" for k, v in counts.items())
    polled = ("" if med["portalocker"] is None else
              f"; portalocker with its default flags (polling): median "
              f"{med['portalocker']:.1f} ms, p99 {p99['portalocker']:.1f} ms")
    note = ("portalocker with flags=EXCLUSIVE (kernel wait, as fencelock); filelock polls "
            "every 0.05 s, portalocker's default flags every 0.25 s (check_interval)"
            f"{polled}; hand-offs: {how}; the holder holds "
            f"{sizes.hold_before_release * 1000:g} ms before each release")
    blocking = "" if pb_p99 is None else f"portalocker blocking p99 {pb_p99:.3f} ms"
    # A waiter with a time limit: the polling peers' waits (portalocker's timeout, which
    # its kernel wait cannot take; filelock's poll) against fencelock's timed wait.
    timed_note = ("fencelock with timeout= (its wait blocks in a helper thread, which then "
                  "wakes the caller); filelock and portalocker poll (portalocker's default "
                  "flags with its timeout); raw flock(2) cannot wait with a time limit; the "
                  "floor waits in the kernel with none")
    timed = []
    for stat, value, peers, floor in (("median", t_med, med, floor_med),
                                      ("p99", t_p99, p99, floor_p99)):
        polling = {"raw": None, "filelock": peers["filelock"],
                   "portalocker": peers["portalocker"]}
        timed += [
            Row(f"handoff.{stat}.timed", "handoff", f"hand-off to a waiter with a time "
                f"limit ({TIMED_WAIT:g} s), {stat}", "ms", fencelock=value, peers=polling,
                note=timed_note),
            _floor_row(f"handoff.{stat}.timed", floor, polling, unit="ms"),
        ]
    med["portalocker"], p99["portalocker"] = pb_med, pb_p99
    return [
        Row("handoff.median", "handoff", "hand-off to a blocked waiter, median", "ms",
            fencelock=f_med, peers=med, note=note),
        _floor_row("handoff.median", floor_med, med, unit="ms"),
        Row("handoff.p99", "handoff", "hand-off to a blocked waiter, p99", "ms",
            fencelock=f_p99, peers=p99, note=note),
        _floor_row("handoff.p99", floor_p99, p99, unit="ms"),
        Row("handoff.median.blocking", "handoff",
            "hand-off median vs portalocker flags=EXCLUSIVE (kernel wait)", "ms",
            fencelock=f_med, peers={"portalocker": pb_med}, note=blocking),
        *timed,
    ]


# -- 3. contended appends ------------------------------------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_workers(
    target: Callable[..., None], argsets: list[tuple[Any, ...]]
) -> tuple[float, float]:
    """Run one process per argset, started together.

    Returns the seconds until the last one finished and the CPU seconds they used
    (the CPU figure is steadier than wall time on a shared machine).
    """
    barrier = _CTX.Barrier(len(argsets) + 1)
    pipes = []
    procs = []
    for args in argsets:
        here, there = _CTX.Pipe(duplex=False)
        proc = _CTX.Process(target=quietly, args=(target, barrier, there, *args), daemon=True)
        start_worker(proc)
        there.close()
        pipes.append(here)
        procs.append(proc)
    barrier.wait()
    spans = []
    for here, proc in zip(pipes, procs, strict=True):
        try:
            spans.append(here.recv())
        except EOFError:
            raise RuntimeError(f"bench worker {proc.pid} died (exit {proc.exitcode})") from None
        proc.join()
    # Each worker times itself from the barrier: the parent may be scheduled late.
    elapsed = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    return float(elapsed), float(sum(cpu for _, _, cpu in spans))


def _append_worker(
    barrier: Barrier, conn: Connection, peer: str, session: str, lockpath: str, writer: int,
    seqs: range, fsync: bool,
) -> None:
    gc.collect()
    if peer == "fencelock":
        if not fsync:
            _fence._fsync = _no_fsync  # no public knob: see the notes
        lock = fencelock.SessionLock(session, lane=f"writer-{writer}")
        barrier.wait()
        start, cpu = time.monotonic(), _cpu()
        for seq in seqs:
            with lock:
                lock.append({"w": writer, "seq": seq, "pad": _PAD})
    else:
        # One turn: lock, encode and append the line (and for the floor, its record
        # work), unlock.
        if peer == "floor":
            floor = FloorLock(session, fsync=fsync)
            locker: Locker = floor
            write: Callable[[bytes], None] = floor.append
        else:
            locker = make_locker(peer, lockpath, record=False)
            write = functools.partial(_append_line, session, fsync=fsync)
        barrier.wait()
        start, cpu = time.monotonic(), _cpu()
        for seq in seqs:
            locker.acquire()
            try:
                # Encoded under the lock, as fencelock's append encodes its entry.
                write(json.dumps({"w": writer, "seq": seq, "pad": _PAD},
                                 separators=(",", ":")).encode() + b"\n")
            finally:
                locker.release()
    conn.send((start, time.monotonic(), _cpu() - cpu))
    conn.close()


def _append_line(session: str, line: bytes, fsync: bool) -> None:
    """What a peer does under its lock: one O_APPEND write of the line, then fsync."""
    fd = os.open(session, APPEND_FLAGS, 0o600)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _no_fsync(fd: object) -> None:
    return None


def check_lines(session: str, writers: int, turns: int) -> dict[str, Any]:
    """No line lost, none interleaved: every line parses, every writer's seqs are complete.

    Also how often a writer took the next turn itself (``same_writer``, the share of
    lines written by the writer of the line before): a lock that hands a released turn
    to a waiter scores low, one whose releaser takes it back before the woken waiter
    runs scores high (and starves the others)."""
    problems: list[str] = []
    last, again = None, 0
    seen: dict[int, list[int]] = {w: [] for w in range(writers)}
    count = 0
    with open(session, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        problems.append("the file does not end with a line break")
    for number, raw in enumerate(data.splitlines(), 1):
        count += 1
        try:
            entry = json.loads(raw)
            writer = int(entry["w"])
            seen[writer].append(int(entry["seq"]))
            again += writer == last
            last = writer
        except (ValueError, KeyError, TypeError):
            if len(problems) < 5:
                problems.append(f"line {number} is not one whole entry: {raw[:80]!r}")
    for w, seqs in seen.items():
        if seqs != list(range(turns)):
            problems.append(f"writer {w}: {len(seqs)} lines, sequence not 0..{turns - 1} in order")
    return {"lines": count, "expected": writers * turns, "ok": not problems and
            count == writers * turns, "problems": problems,
            "same_writer": again / (count - 1) if count > 1 else None}


def _append_rounds(turns: int, peers: int) -> list[range]:
    """``turns`` sequence numbers cut into ``peers`` consecutive runs (fewer when there
    are fewer turns). Each peer's turns are run in that many rounds, the peers taking
    their rounds in turn, in an order that rotates so that each peer runs once in each
    place: the disk's state drifts over a run (the journal, writeback of what earlier
    sections wrote), and one long stretch per peer would hand that drift to whichever
    peer ran last. Rounds after the first append to the session file left by the round
    before, as a gateway does."""
    count = max(1, min(peers, turns))
    cuts = [turns * i // count for i in range(count + 1)]
    return [range(a, b) for a, b in itertools.pairwise(cuts)]


def bench_appends(base: Path, sizes: Sizes, quiet: bool, report: Report) -> list[Row]:
    rows = []
    checks = []
    everyone = ("fencelock", "raw", "filelock", "portalocker-blocking", "floor")
    peers = [p for p in everyone if available(p)]
    rounds = _append_rounds(sizes.turns, len(peers))
    for fsync in (True, False):
        values: dict[str, float | None] = dict.fromkeys(everyone)
        cpu: dict[str, float | None] = dict.fromkeys(everyone)
        paths = {}
        for peer in peers:
            d = base / f"appends-{int(fsync)}" / peer
            d.mkdir(parents=True)
            paths[peer] = (str(d / "s.jsonl"), _lock_file(d / "s.lock"))
        elapsed = dict.fromkeys(peers, 0.0)
        used = dict.fromkeys(peers, 0.0)
        for number, seqs in enumerate(rounds):
            _progress(quiet, f"appends {'with' if fsync else 'without'} fsync: round "
                             f"{number + 1}/{len(rounds)}")
            for peer in peers[number % len(peers):] + peers[:number % len(peers)]:
                session, lockpath = paths[peer]
                took, cpu_s = _run_workers(_append_worker, [
                    (peer, session, lockpath, w, seqs, fsync) for w in range(sizes.writers)
                ])
                elapsed[peer] += took
                used[peer] += cpu_s
        for peer in peers:
            values[peer] = sizes.writers * sizes.turns / elapsed[peer]
            cpu[peer] = used[peer] / (sizes.writers * sizes.turns) * 1e6
            check = check_lines(paths[peer][0], sizes.writers, sizes.turns)
            checks.append({"peer": peer, "fsync": fsync, **check})
        values["portalocker"] = values.pop("portalocker-blocking")
        cpu["portalocker"] = cpu.pop("portalocker-blocking")
        floor, floor_cpu = values.pop("floor"), cpu.pop("floor")
        note = ("portalocker with flags=EXCLUSIVE (kernel wait); peers write no record; "
                f"each peer's turns in {len(rounds)} rounds, the peers' rounds taken in turn")
        if not fsync:
            note += ("; fencelock has no public no-fsync knob: measured with its internal "
                     "fsync seam (_fence._fsync) stubbed out")
        rows.append(Row(
            f"appends.{'fsync' if fsync else 'nofsync'}", "appends",
            f"{sizes.writers} procs x {sizes.turns} fenced appends, "
            f"{'with' if fsync else 'without'} fsync", "turns/s",
            fencelock=values.pop("fencelock"), peers=values, lower_is_better=False, note=note,
        ))
        rows.append(_floor_row(f"appends.{'fsync' if fsync else 'nofsync'}", floor, values,
                               lower_is_better=False))
        rows.append(Row(
            f"appends.{'fsync' if fsync else 'nofsync'}.cpu", "appends",
            "  same, CPU time per turn (user+sys, all writers)", "us",
            fencelock=cpu.pop("fencelock"), peers=cpu,
        ))
        rows.append(_floor_row(f"appends.{'fsync' if fsync else 'nofsync'}.cpu", floor_cpu, cpu))
    report.checks["appends"] = checks
    return rows


# -- 4. probe scan -------------------------------------------------------------------


def _make_stale(sessions: list[str]) -> None:
    for s in sessions:
        fencelock.SessionLock(s, lane="crashed").acquire()
    os._exit(0)  # die holding: the kernel drops the locks, the records say "held"


def _live_helper(sessions: list[str], conn: Connection) -> None:
    locks = [fencelock.SessionLock(s, lane="live") for s in sessions]
    for lock in locks:
        lock.acquire()
    conn.send("ready")
    with contextlib.suppress(EOFError):
        conn.recv()
    for lock in locks:
        lock.release()


@dataclass
class ScanDir:
    path: Path
    expected: dict[str, int]
    helper: Any = None
    conn: Connection | None = None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.send("exit")
            self.conn.close()
        if self.helper is not None:
            self.helper.join(10)
            if self.helper.is_alive():
                self.helper.kill()


def make_scan_dir(path: Path, n: int) -> ScanDir:
    """``n`` sessions with sidecars: free (empty), released, stale, and a few live."""
    path.mkdir(parents=True)
    sessions = [str(path / f"{i:08x}-0000-4000-8000-000000000000.jsonl") for i in range(n)]
    for s in sessions:
        fd = os.open(s, APPEND_FLAGS, 0o600)
        os.write(fd, b'{"role":"user","content":"hi"}\n')
        os.close(fd)
    live_n = min(8, n // 100)
    stale_n = n * 35 // 100
    free_n = n // 4
    live, rest = sessions[:live_n], sessions[live_n:]
    stale, rest = rest[:stale_n], rest[stale_n:]
    free, released = rest[:free_n], rest[free_n:]
    for s in free:
        os.close(os.open(s + ".holder", APPEND_FLAGS, 0o600))
    for s in released:
        lock = fencelock.SessionLock(s, lane="done")
        lock.acquire()
        lock.release()
        close = getattr(lock, "close", None)
        if close is not None:
            close()
    for i in range(0, len(stale), 2000):
        proc = _CTX.Process(target=quietly, args=(_make_stale, stale[i : i + 2000]))
        start_worker(proc)
        proc.join()
    settle()
    result = ScanDir(path, {"free": len(free) + len(released), "stale": len(stale),
                            "live": len(live)})
    if live:
        here, there = _CTX.Pipe()
        result.helper = _CTX.Process(target=quietly, args=(_live_helper, live, there),
                                     daemon=True)
        start_worker(result.helper)
        there.close()
        result.conn = here
        here.recv()
    return result


def raw_scan(directory: str) -> int:
    """The bare loop: list, then open, flock LOCK_SH|LOCK_NB, read, close each sidecar."""
    live = 0
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if e.name.endswith(".holder")]
    for name in names:
        fd = os.open(os.path.join(directory, name), flags)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1
            os.pread(fd, 65536, 0)
        finally:
            os.close(fd)
    return live


def _scan_list(directory: str) -> list[fencelock.HolderStatus]:
    return list(fencelock.scan(directory))


def _installed_env(base: Path) -> dict[str, str]:
    """The environment for timing the command as an installed copy runs: from bytecode
    (pip compiles it), for fencelock and what it imports alike. A private cache prefix
    does that (and keeps the checkout clean) even where PYTHONDONTWRITEBYTECODE is set,
    as on some CI machines; without it an editable checkout compiles every module at
    each start (about 0.1 s here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
    return env


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plain_python(base: Path) -> str:
    """An interpreter that imports fencelock and click as a regular install does: a
    throwaway virtual environment without pip whose one ``.pth`` file lists this
    environment's site-packages and the directory fencelock is imported from. Run from
    an editable checkout, this environment's own interpreter would start with the
    editable install's import finder (a ``.pth`` that imports pathlib, urllib and
    importlib at every start: about 10 ms here), timed in fencelock's column and in
    ``import click``'s alike, which flattered the ratio (``status FILE`` read 1.45-1.48x
    where this reads 1.53-1.55x, the code the same)."""
    target = base / "plain-venv"
    if target not in _PLAIN:
        builder = venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt")
        builder.create(target)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(target),
                                                         "platbase": str(target)}))
        site.mkdir(parents=True, exist_ok=True)
        python = str(builder.ensure_directories(target).env_exe)
        # Every directory this process imports from that the new interpreter does not
        # (a venv's own site-packages, the system's or the user's where this one sees
        # them), in its order, then fencelock's (an editable install's finder is no
        # path entry).
        own = set(subprocess.run([python, "-c", "import sys; print(*sys.path, sep='\\n')"],
                                 capture_output=True, text=True, check=True).stdout.split("\n"))
        paths = [p for p in sys.path if p and p not in own and os.path.isdir(p)]
        paths.append(str(Path(fencelock.__file__).parent.parent))
        (site / "fencelock-bench.pth").write_text("".join(f"{p}\n" for p in paths))
        _PLAIN[target] = python
    return _PLAIN[target]


_PLAIN: dict[Path, str] = {}


def _cli_command(python: str) -> list[str] | None:
    """What the installed ``fencelock`` command runs, with ``python``."""
    if importlib.util.find_spec("fencelock._cli") is None:
        return None
    return [python, "-c", "import sys; from fencelock._cli import main; sys.exit(main())"]


def bench_scan(base: Path, sizes: Sizes, quiet: bool, report: Report) -> list[Row]:
    n = sizes.scan_sessions
    _progress(quiet, f"scan: creating {n} sessions")
    sd = make_scan_dir(base / "scan", n)
    try:
        directory = str(sd.path)
        _progress(quiet, "scan: library, raw loop")
        found: list[fencelock.HolderStatus] = []

        def lib() -> None:
            found[:] = list(fencelock.scan(directory))

        lib_s = _median_seconds(lib, sizes.scan_repeats)
        raw_s = _median_seconds(lambda: raw_scan(directory), sizes.scan_repeats)
        states: dict[str, int] = {}
        for status in found:
            states[str(status.state)] = states.get(str(status.state), 0) + 1
        report.checks["scan"] = {"expected": sd.expected, "found": states,
                                 "ok": states == {k: v for k, v in sd.expected.items() if v}}
        rows = [Row("scan.library", "scan", f"scan of {n} sessions: list(fencelock.scan(dir))",
                    "s", fencelock=lib_s, peers={"raw": raw_s},
                    note="raw = scandir + open, flock LOCK_SH|LOCK_NB, pread, close; "
                    "no peer library has a scan")]
        cli = _cli_command(_plain_python(base))
        if cli is None:
            report.skipped.append("scan.cli: fencelock/_cli.py is not there yet")
            return rows
        _progress(quiet, "scan: fencelock status --json DIR")
        outcome: dict[str, Any] = {}
        env = _installed_env(base)

        def run_cli() -> None:
            proc = subprocess.run([*cli, "status", "--json", directory], capture_output=True,
                                  text=True, check=False, env=env)
            outcome["code"] = proc.returncode
            outcome["stdout"] = proc.stdout
            outcome["stderr"] = proc.stderr[-300:]

        run_cli()  # writes the bytecode cache
        cli_s = _median_seconds(run_cli, sizes.scan_repeats)
        try:
            listed = len(json.loads(outcome["stdout"]))
        except ValueError:
            listed = -1
        report.checks["scan_cli"] = {"exit_code": outcome["code"], "rows": listed,
                                     "expected_rows": n, "stderr": outcome["stderr"],
                                     "ok": outcome["code"] in (0, 3) and listed == n}
        if not report.checks["scan_cli"]["ok"]:  # a failed command's time says nothing
            report.skipped.append(f"scan.cli: fencelock status --json failed (exit "
                                  f"{outcome['code']}): {outcome['stderr']}")
            return rows
        rows.append(Row("scan.cli", "scan", f"scan of {n} sessions: fencelock status --json DIR",
                        "s", fencelock=cli_s, peers={},
                        note="includes interpreter start; bytecode cached"))
        return rows
    finally:
        sd.close()


# -- 5. cold start -------------------------------------------------------------------


def bench_cold(base: Path, sizes: Sizes, quiet: bool, report: Report) -> list[Row]:
    python = _plain_python(base)
    cli = _cli_command(python)
    if cli is None:
        report.skipped.append("cold start: fencelock/_cli.py is not there yet")
        return []
    session = base / "cold" / "s.jsonl"
    session.parent.mkdir(parents=True)
    lock = fencelock.SessionLock(session, lane="cold")
    lock.acquire()
    lock.release()
    commands = {
        "version": [*cli, "--version"],
        "status": [*cli, "status", str(session)],
        "click": [python, "-c", "import click"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    codes: dict[str, int] = {}
    env = _installed_env(base)
    _progress(quiet, f"cold start x{sizes.cold_runs}")
    for _ in range(sizes.cold_runs + 1):  # the first round warms the caches
        for name, argv in commands.items():
            start = time.perf_counter()
            codes[name] = subprocess.run(
                argv, capture_output=True, check=False, env=env
            ).returncode
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) * 1000 for k, v in times.items()}
    report.checks["cold"] = {"exit_codes": codes, "ok": not any(codes.values())}
    if any(codes.values()):  # the time of a command that failed says nothing
        report.skipped.append(f"cold start: commands failed in the benchmark's interpreter "
                              f"({python}): exit codes {codes}")
        return []
    note = ("raw = python -c 'import click' (same interpreter); bytecode cached for all; "
            "both as a regular install imports them (not through an editable install's "
            "finder: see _plain_python)")
    return [
        Row("cold.version", "cold", "cold start: fencelock --version", "ms",
            fencelock=med["version"], peers={"raw": med["click"]}, note=note),
        Row("cold.status", "cold", "cold start: fencelock status FILE", "ms",
            fencelock=med["status"], peers={"raw": med["click"]}, note=note),
    ]


# -- 6. scaling ----------------------------------------------------------------------


_WARM_CYCLES = 20
"""Untimed cycles a contending process makes before the timed ones (its first pay for
the lock object's first use, as a single process's warm-up does)."""


def _contended_worker(
    barrier: Barrier, conn: Connection, peer: str, path: str, cycles: int
) -> None:
    lock = make_locker(peer, path)
    for _ in range(_WARM_CYCLES):  # untimed: the first cycles of a process cost more
        lock.acquire()
        lock.release()
    barrier.wait()
    start, cpu = time.monotonic(), _cpu()
    for _ in range(cycles):
        lock.acquire()
        lock.release()
    conn.send((start, time.monotonic(), _cpu() - cpu))
    conn.close()


def bench_scaling(base: Path, sizes: Sizes, quiet: bool) -> list[Row]:
    rows = []
    for n in sizes.session_counts:
        _progress(quiet, f"scaling: {n} sessions")
        d = base / f"scale-{n}"
        values: dict[str, float | None] = {}
        for peer in ("fencelock", "raw"):
            (d / peer).mkdir(parents=True)
            locks = [make_locker(peer, str(d / peer / f"{i}.jsonl")) for i in range(n)]
            index = [0]

            def cycle(locks: list[Locker] = locks, index: list[int] = index) -> None:
                lock = locks[index[0] % len(locks)]
                index[0] += 1
                lock.acquire()
                lock.release()

            for _ in range(n):  # create every sidecar before timing
                cycle()
            values[peer] = _time_per_call(cycle, max(sizes.cycles, n))
            for lock in locks:
                close = getattr(getattr(lock, "lock", None), "close", None)
                if close is not None:
                    close()
        rows.append(Row(f"scaling.cycle.sessions.{n}", "scaling",
                        f"cycle, {n} sessions round-robin (one object each)", "us",
                        fencelock=values.pop("fencelock"), peers=values))
        sd = make_scan_dir(d / "scan", n)
        try:
            directory = str(sd.path)
            repeats = max(sizes.scan_repeats, 5 if n <= 100 else 1)
            lib_s = _median_seconds(functools.partial(_scan_list, directory), repeats)
            raw_s = _median_seconds(functools.partial(raw_scan, directory), repeats)
        finally:
            sd.close()
        rows.append(Row(f"scaling.scan.sessions.{n}", "scaling", f"scan, {n} sessions", "ms",
                        fencelock=lib_s * 1000, peers={"raw": raw_s * 1000}))
    for procs in sizes.process_counts:
        values = {}
        for peer in ("fencelock", "raw", "filelock", "portalocker-blocking"):
            if not available(peer):
                values[peer] = None
                continue
            _progress(quiet, f"scaling: {procs} contending processes, {peer}")
            path = _lock_path(base / f"contend-{procs}", peer)
            elapsed, _ = _run_workers(_contended_worker,
                                      [(peer, path, sizes.contended_cycles)] * procs)
            values[peer] = elapsed / (procs * sizes.contended_cycles) * 1e6
        values["portalocker"] = values.pop("portalocker-blocking")
        rows.append(Row(f"scaling.cycle.procs.{procs}", "scaling",
                        f"cycle, {procs} processes contending on one session", "us",
                        fencelock=values.pop("fencelock"), peers=values,
                        note="wall time / total cycles; portalocker with flags=EXCLUSIVE"))
    return rows


# -- 7. the etcd store ----------------------------------------------------------------


def bench_etcd(base: Path, sizes: Sizes, quiet: bool, report: Report) -> list[Row]:
    """fencelock's etcd store against its sidecar store, tooz and `etcdctl lock`."""
    from fencelock.tools import bench_etcd as _bench_etcd

    missing = _bench_etcd.available()
    if missing:
        report.skipped.append("etcd section: " + "; ".join(missing))
        return []
    cycles = max(20, sizes.cycles // 10)
    rounds = max(10, sizes.handoffs // 2)
    found, notes = _bench_etcd.bench(base, cycles, rounds, quiet, _progress,
                                     txns=min(50, cycles), hold=sizes.hold_before_release)
    report.notes += notes
    return [Row(r["id"], "etcd", r["figure"], r["unit"], fencelock=r["fencelock"],
                peers=r["peers"], note=r.get("note", "")) for r in found]


# -- goals ---------------------------------------------------------------------------


def judge(report: Report, sizes: Sizes) -> None:
    """The performance goals (docs/BENCHMARKS.md), judged on a full run only (quick
    figures are too noisy)."""

    def add(goal_id: str, text: str, value: float | None, limit: float | None,
            fmt: str, at_least: bool = False, judged: bool = True) -> None:
        if value is None or limit is None:
            report.goals.append(Goal(goal_id, text, "not measured", None))
            return
        met = value >= limit if at_least else value <= limit
        if not met and f"{value:.2f}" == f"{limit:.2f}":  # not "MISS: 1.00x" at 1.0
            fmt = fmt.replace("{value:.2f}", "{value:.3f}")
        report.goals.append(Goal(goal_id, text, fmt.format(value=value, limit=limit),
                                 met if sizes.judge and judged else None))

    for kind in ("reused", "fresh"):
        row = report.row(f"cycle.{kind}")
        if row is not None:
            add(f"cycle.{kind}.raw", f"cycle ({kind}) at most 3x the raw-syscall protocol",
                row.ratios.get("raw"), 3.0, "{value:.2f}x raw")
    row, floor = report.row("cycle.reused.session"), report.row("cycle.reused.session.floor")
    if row is not None and floor is not None and row.fencelock and floor.fencelock:
        add("cycle.session.floor", "cycle (session present) at most 1.5x the protocol floor",
            row.fencelock / floor.fencelock, 1.5, "{value:.2f}x floor")
        add("cycle.session.portalocker", "cycle (session present) at most 1.0x portalocker.Lock",
            row.ratios.get("portalocker"), 1.0,
            "{value:.2f}x portalocker" + _floor_text(report, row.id, "portalocker"))
        add("cycle.session.parity", "cycle (session present) at most 1.1x portalocker.Lock "
            "writing the same record (proposed)", row.ratios.get("portalocker"), 1.1,
            "{value:.2f}x portalocker")
    empty, crowd = report.row("cycle.first.0"), next(
        (r for r in report.rows if r.id.startswith("cycle.first.") and r.id != "cycle.first.0"
         and not r.id.endswith(".floor")), None)
    reused = report.row("cycle.reused")
    raw_cycle = None if reused is None else reused.peers.get("raw")
    if empty is not None and crowd is not None and empty.fencelock and crowd.fencelock:
        add("cycle.first.crowd", f"first acquire among {crowd.figure.rsplit(' among ', 1)[-1]} "
            "within 2x of an empty directory", crowd.fencelock / empty.fencelock, 2.0,
            "{value:.2f}x empty directory" + _filesystem_text(empty, crowd, raw_cycle),
            judged=_filesystem_steady(empty, crowd, raw_cycle))
    med, p99 = report.row("handoff.median"), report.row("handoff.p99")
    if med is not None and p99 is not None:
        add("handoff.median", "hand-off median under 1 ms", med.fencelock, 1.0,
            "{value:.3f} ms")
        add("handoff.p99", "hand-off p99 under 5 ms", p99.fencelock, 5.0, "{value:.3f} ms")
    blocking = report.row("handoff.median.blocking")
    if blocking is not None:
        add("handoff.blocking", "hand-off median at most 1.25x portalocker's kernel wait",
            blocking.ratios.get("portalocker"), 1.25,
            "{value:.2f}x portalocker" + _floor_text(report, "handoff.median", "portalocker"))
    floor = report.row("handoff.median.floor")
    if med is not None and med.fencelock and floor is not None and floor.fencelock:
        add("handoff.floor", "hand-off median at most the protocol floor + 0.1 ms (proposed)",
            med.fencelock - floor.fencelock, 0.1, "{value:+.3f} ms over the floor")
    row = report.row("appends.fsync")
    if row is not None:
        peer = row.peers.get("portalocker")
        floor = report.row("appends.fsync.floor")
        floor_text = "" if floor is None or floor.fencelock is None or not peer else (
            f"; protocol v1 floor {floor.fencelock / peer:.2f}x portalocker")
        add("appends.fsync", "contended fenced turns with fsync at least 1.0x portalocker's "
            "lock+append+fsync+unlock", None if not peer or row.fencelock is None
            else row.fencelock / peer, 1.0, "{value:.2f}x portalocker" + floor_text,
            at_least=True)
        if floor is not None and floor.fencelock and row.fencelock:
            add("appends.fsync.floor", "contended fenced turns with fsync at least 0.6x the "
                "protocol floor's (proposed)", row.fencelock / floor.fencelock, 0.6,
                "{value:.2f}x floor", at_least=True)
    row = report.row("etcd.handoff.median")
    if row is not None:
        floor = report.row("etcd.handoff.median.floor")
        floor_text = "" if floor is None or floor.fencelock is None else (
            f"; etcd floor (bare HTTP) {floor.fencelock:.2f} ms")
        add("etcd.handoff.median", "etcd store hand-off median at most 5 ms",
            row.fencelock, 5.0, "{value:.2f} ms" + floor_text)
    row = report.row("scan.library")
    if row is not None:
        add("scan.library", "scan through the library under 0.5 s", row.fencelock, 0.5,
            "{value:.3f} s")
    row = report.row("scan.cli")
    if row is not None:
        add("scan.cli", "scan through `fencelock status --json` about 1 s (<= 1.0 s)",
            row.fencelock, 1.0, "{value:.3f} s")
    for name, cmd in (("version", "--version"), ("status", "status FILE")):
        row = report.row(f"cold.{name}")
        if row is not None:
            add(f"cold.{name}", f"cold start of `fencelock {cmd}` within 1.5x `import click`",
                row.ratios.get("raw"), 1.5, "{value:.2f}x")


def _filesystem_steady(empty: Row, crowd: Row, raw_cycle: float | None) -> bool:
    """Whether the filesystem made files at its usual pace in both directories: the
    bare syscalls' first acquire grew at most 1.5x from the empty directory to the
    crowded one (or shrank at most as much), and in the empty one cost at most
    `_FRESH_FILE_BOUND` times their reused cycle (``raw_cycle``). Otherwise the crowded-directory
    figure measures the filesystem (on ext4 without a journal a new file passes over
    the inodes freed in the last minutes: a run right after another one's 200,000
    files made every first acquire 3-13x dearer), and the goal is not judged."""
    before, after = empty.peers.get("raw"), crowd.peers.get("raw")
    if not before or not after:
        return True
    if not 0.67 <= after / before <= 1.5:
        return False
    return raw_cycle is None or before <= _FRESH_FILE_BOUND * raw_cycle


_FRESH_FILE_BOUND = 8.0
"""A first acquire of bare syscalls (create, lock, write, unlock, close) against their
reused cycle (open, lock, write, unlock, close) when the filesystem makes files at its
usual pace: about 3.4x here (39.7 against 11.7 µs); 8x and over, it was slowed."""


def _filesystem_text(empty: Row, crowd: Row, raw_cycle: float | None) -> str:
    """The bare syscalls' own growth beside the crowded-directory goal: where creating
    a file grew as much, the filesystem was slow, not fencelock."""
    before, after = empty.peers.get("raw"), crowd.peers.get("raw")
    if not before or not after:
        return ""
    text = f"; bare syscalls {after / before:.2f}x"
    if not _filesystem_steady(empty, crowd, raw_cycle):
        text += (" (not judged: the filesystem's own file creation was slowed: on ext4 "
                 "without a journal a new file passes over the inodes freed in the last "
                 "minutes; rerun a few minutes after removing many files)")
    return text


def _floor_text(report: Report, row_id: str, peer: str) -> str:
    floor = report.row(f"{row_id}.floor")
    ratio = None if floor is None else floor.ratios.get(peer)
    return "" if ratio is None else f"; protocol v1 floor {ratio:.2f}x {peer}"


# -- output --------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2g}"


def render(report: Report) -> str:
    m = report.machine
    out = [
        f"fencelock-bench ({report.mode} mode)",
        f"machine: {m['cpu']}; {m['cores']} cores; {m['kernel']}; Python {m['python']}",
        f"temp dir: {m['temp_dir']} ({m['filesystem']}); load average at start "
        + " ".join(str(x) for x in m["load_average"]),
        "versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "ratio = fencelock cost / peer cost (below 1: fencelock is cheaper)",
        "",
    ]
    head = ["figure", "unit", "fencelock", *PEERS, *(f"x{p}" for p in PEERS)]
    table = [head]
    for r in report.rows:
        if r.section == "etcd":
            continue
        table.append([
            r.figure, r.unit, _fmt(r.fencelock), *(_fmt(r.peers.get(p)) for p in PEERS),
            *(_ratio(r.ratios.get(p)) for p in PEERS),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table if len(table) > 1 else []):  # no sidecar rows: no table
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out += _render_etcd(report.rows)
    if report.goals:
        out += ["", "goals:"]
        for g in report.goals:
            verdict = {True: "PASS", False: "MISS", None: "----"}[g.met]
            out.append(f"  {verdict}  {g.text}: {g.value}")
        if report.mode != "full":
            out.append(f"  (not judged in {report.mode} mode)")
    out += ["", "checks:"]
    for a in report.checks.get("appends", []):
        again = "" if a.get("same_writer") is None else (
            f"; {a['same_writer']:.0%} of turns taken again by the writer before")
        out.append(f"  appends {a['peer']:<20} fsync={a['fsync']!s:<5} lines {a['lines']}"
                   f"/{a['expected']}: {'ok' if a['ok'] else 'FAILED ' + '; '.join(a['problems'])}"
                   f"{again}")
    for key in ("scan", "scan_cli", "cold"):
        c = report.checks.get(key)
        if c is not None:
            detail = {k: v for k, v in c.items() if k not in ("ok", "stderr")}
            out.append(f"  {key}: {'ok' if c['ok'] else 'FAILED'} {detail}")
    notes = [f"{r.id}: {r.note}" for r in report.rows if r.note] + report.notes
    if notes:
        out += ["", "notes:", *(f"  {n}" for n in notes)]
    if report.skipped:
        out += ["", "skipped:", *(f"  {s}" for s in report.skipped)]
    return "\n".join(out)


def _render_etcd(rows: Sequence[Row]) -> list[str]:
    """The etcd rows in a table of their own: their peers are other etcd locks."""
    from fencelock.tools.bench_etcd import PEERS as ETCD_PEERS

    etcd = [r for r in rows if r.section == "etcd"]
    if not etcd:
        return []
    head = ["figure", "unit", "fencelock", *ETCD_PEERS, *(f"x{p}" for p in ETCD_PEERS)]
    table = [head]
    for r in etcd:
        table.append([r.figure, r.unit, _fmt(r.fencelock),
                      *(_fmt(r.peers.get(p)) for p in ETCD_PEERS),
                      *(_ratio(r.ratios.get(p)) for p in ETCD_PEERS)])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    out = [""]
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 0.01:
        return f"{value:.2f}"
    # Two significant digits below 0.01 (a timed wait against a poll), not "0.00", and
    # in plain digits (not "1e-05").
    return f"{float(f'{value:.2g}'):.12f}".rstrip("0").rstrip(".")


# -- main ----------------------------------------------------------------------------


def run(sizes: Sizes, sections: Sequence[str], directory: str | None, keep: bool,
        quiet: bool) -> Report:
    try:
        base = Path(tempfile.mkdtemp(prefix="fencelock-bench-", dir=directory))
    except OSError as e:
        where = directory or tempfile.gettempdir()
        raise click.ClickException(
            f"{where}: cannot make the run's directory there ({e.strerror or e}); give "
            f"--dir a directory on a disk this user can write to") from None
    report = Report(sizes.name, machine(str(base)))
    if sizes.judge and sizes.hold_before_release < FULL.hold_before_release:
        # A short hold flatters the hand-off: the waiter is still warm when woken.
        sizes = dataclasses.replace(sizes, judge=False)
        report.notes.append(f"goals not judged: --hold under {FULL.hold_before_release * 1000:g}"
                            " ms, shorter than a model call")
    if sizes.judge and report.machine["filesystem"] in ("tmpfs", "ramfs"):
        sizes = dataclasses.replace(sizes, judge=False)
        report.notes.append("goals not judged: the directory is in memory (fsync costs "
                            "nothing there); give --dir on a disk")
    for peer in ("filelock", "portalocker"):
        if not available(peer):
            report.skipped.append(f"{peer} columns: {peer} is not installed "
                                  "(pip install '.[bench]' in the checkout)")
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("cycle", lambda: bench_cycle(base / "cycle", sizes, quiet)),
        ("handoff", lambda: bench_handoff(base, sizes, quiet)),
        ("appends", lambda: bench_appends(base, sizes, quiet, report)),
        ("scan", lambda: bench_scan(base, sizes, quiet, report)),
        ("cold", lambda: bench_cold(base, sizes, quiet, report)),
        ("scaling", lambda: bench_scaling(base / "scaling", sizes, quiet)),
        ("etcd", lambda: bench_etcd(base / "etcd", sizes, quiet, report)),
    ]
    try:
        for name, step in steps:
            if name in sections:
                settle()  # what the last section wrote must not be flushed during this one
                report.rows += step()
    finally:
        if keep:
            report.notes.append(f"files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    judge(report, sizes)
    return report


def _sections(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    sections = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise click.BadParameter(f"unknown section(s): {', '.join(unknown)}")
    return sections


def _save_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--save FILE``, checked before the run: its directory must be there and writable."""
    if value is None:
        return None
    where = os.path.dirname(os.path.abspath(value))
    if os.path.isdir(value):
        raise click.BadParameter(f"{value} is a directory; give a file name")
    if not os.path.isdir(where):
        raise click.BadParameter(f"no directory {where} to write {value} in")
    if not os.access(where, os.W_OK) or (os.path.exists(value) and not os.access(value, os.W_OK)):
        raise click.BadParameter(f"{value} cannot be written by this user")
    return value


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Measure fencelock against raw flock, filelock and portalocker.",
)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@click.option("--quick", is_flag=True,
              help="small counts for CI (about a minute); goals not judged")
@click.option("--smoke", is_flag=True, hidden=True)
@click.option("--only", default=",".join(SECTIONS), callback=_sections,
              help=f"comma-separated sections to run (default: {','.join(SECTIONS)})")
@click.option("--dir", "directory", default=None,
              type=click.Path(exists=True, file_okay=False, writable=True),
              help="where to make the temporary directory (default: the system's)")
@click.option("--save", metavar="FILE", default=None, callback=_save_path,
              help="also write the JSON figures to FILE")
@click.option("--keep", is_flag=True, help="keep the temporary files")
@click.option("--quiet", is_flag=True, help="no progress on stderr")
@click.option("--hold", metavar="MS", type=float, default=None,
              help="how long the holder holds before each hand-off "
              "(default: 30 ms)")
def command(as_json: bool, quick: bool, smoke: bool, only: list[str], directory: str | None,
            save: str | None, keep: bool, quiet: bool, hold: float | None) -> int:
    sizes = SMOKE if smoke else QUICK if quick else FULL
    if hold is not None:
        if not hold >= 0:  # NaN too
            raise click.BadParameter("must be a number of milliseconds >= 0",
                                     param_hint="'--hold'")
        sizes = dataclasses.replace(sizes, hold_before_release=hold / 1000)
    started = time.monotonic()
    report = run(sizes, only, directory, keep, quiet)
    report.notes.append(f"run took {time.monotonic() - started:.1f} s")
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(render(report))
    if save:  # after printing: a run of minutes is not lost to a file that cannot be written
        try:
            Path(save).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as e:
            raise click.ClickException(f"--save {save}: {e.strerror or e}; the figures are "
                                       f"printed above") from None
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``fencelock-bench``: parse ``argv`` (default: the command line), run, exit code."""
    return run_command(command, "fencelock-bench", argv)
