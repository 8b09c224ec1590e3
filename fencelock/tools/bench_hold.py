"""The benchmark behind ``bin/fencelock-bench-hold``: what `fencelock hold` costs.

One fenced, fsynced `append` through a ``fencelock hold`` child (a request line out,
an answer line back) against the same `SessionLock.append` called directly; plus an
``info`` round trip (the pipe and the JSON alone, no write) and the start of a
``hold`` (spawn to its ``held`` line), which a caller that spawns one per turn pays.
Uses only the public API and the command line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import click

from fencelock import SessionLock
from fencelock.tools._command import run_command


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_us": statistics.median(ordered) * 1e6,
        "p90_us": ordered[int(len(ordered) * 0.9) - 1 if len(ordered) >= 10 else -1] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
    }


def _timed(n: int, step: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        step(i)
        out.append(time.perf_counter() - t0)
    return out


def _spawn(session: Path) -> tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "bench"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    return proc, proc.stdin, proc.stdout


def _line(stdout: IO[bytes]) -> dict[str, Any]:
    """The next line ``fencelock hold`` wrote; a clear error when it wrote none (it
    could not start, or ended: its own message is on stderr above)."""
    line = stdout.readline()
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise click.ClickException(
            "fencelock hold gave no answer" + (f": {line!r}" if line else " (it ended)")
            + f"; check that {sys.executable} -m fencelock runs") from None
    return answer


def _ask(stdin: IO[bytes], stdout: IO[bytes], request: bytes) -> dict[str, Any]:
    stdin.write(request)
    stdin.flush()
    answer = _line(stdout)
    if not answer.get("ok"):
        raise click.ClickException(f"fencelock hold refused a request: {answer}")
    return answer


def measure(directory: Path, n: int, starts: int) -> dict[str, dict[str, float]]:
    entry = {"role": "assistant", "content": "x" * 200}
    request = json.dumps({"op": "append", "entry": entry}).encode() + b"\n"
    results: dict[str, dict[str, float]] = {}

    direct = directory / "direct.jsonl"
    with SessionLock(direct, "bench") as lock:
        lock.append(entry)  # creates the file: not a steady-state append
        results["append direct (SessionLock.append)"] = _stats(
            _timed(n, lambda i: lock.append(entry))
        )

    held = directory / "hold.jsonl"
    proc, stdin, stdout = _spawn(held)
    try:
        _line(stdout)  # the held line
        _ask(stdin, stdout, request)
        results["append through hold"] = _stats(
            _timed(n, lambda i: _ask(stdin, stdout, request))
        )
        info = b'{"op": "info"}\n'
        results["info through hold (no write)"] = _stats(
            _timed(n, lambda i: _ask(stdin, stdout, info))
        )
        _ask(stdin, stdout, b'{"op": "release"}\n')
    finally:
        stdin.close()
        proc.wait()
        stdout.close()

    def start(i: int) -> None:
        p, to_hold, from_hold = _spawn(directory / "start.jsonl")
        _line(from_hold)
        to_hold.close()
        p.wait()
        from_hold.close()

    results["hold start (spawn to held line)"] = _stats(_timed(starts, start))
    return results


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Round-trip cost of fencelock hold against SessionLock called directly.",
)
@click.option("-n", "appends", type=int, default=2000, show_default=True,
              help="appends per row")
@click.option("--starts", type=int, default=20, show_default=True, help="hold starts to time")
@click.option("--dir", "directory", type=click.Path(path_type=Path),
              help="where the sessions go (default: a temp dir)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def command(appends: int, starts: int, directory: Path | None, as_json: bool) -> int:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        results = measure(Path(tmp), appends, starts)
        fs = os.statvfs(tmp)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return 0
    base = results["append direct (SessionLock.append)"]["median_us"]
    click.echo(f"{'row':40} {'median':>10} {'p90':>10} {'x direct':>9}")
    for name, row in results.items():
        ratio = row["median_us"] / base
        click.echo(f"{name:40} {row['median_us']:8.1f}us {row['p90_us']:8.1f}us {ratio:8.2f}x")
    click.echo(f"(n={appends} appends of a 220-byte entry, each fsynced; "
               f"block size {fs.f_bsize})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fencelock-bench-hold``: parse ``argv`` (default: the command line), run, exit code."""
    return run_command(command, "fencelock-bench-hold", argv)
