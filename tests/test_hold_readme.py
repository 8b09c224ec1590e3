"""The README's `coproc` example for `fencelock hold`, run exactly as it is written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import marks
from conftest import SpawnHolder

from fencelock import probe

README = Path(__file__).parent.parent / "README.md"


def snippet() -> str:
    text = README.read_text()
    m = re.search(
        r"<!-- hold-coproc:begin -->\n```bash\n(.*?)```\n<!-- hold-coproc:end -->", text, re.S
    )
    assert m is not None, "README lost its hold-coproc example"
    return m.group(1)


def run_snippet(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    marks.require("bash")
    bash = shutil.which("bash")
    assert bash is not None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "fencelock"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fencelock "$@"\n')
    wrapper.chmod(0o755)
    script = tmp_path / "nightly.sh"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [bash, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )


def test_readme_coproc_example_appends_and_releases(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "4f1c2a9e.jsonl"
    out = run_snippet(tmp_path, snippet())
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert [json.loads(line) for line in session.read_text().splitlines()] == [
        {"role": "system", "content": "nightly summary"}
    ]
    status = probe(session)
    assert status.state == "free" and status.record is not None
    assert status.record.lane == "cron:nightly" and status.record.state == "released"


def test_readme_coproc_example_stops_when_held(tmp_path: Path, spawn_holder: SpawnHolder) -> None:
    session = tmp_path / "sessions" / "4f1c2a9e.jsonl"
    other = spawn_holder(session, lane="channel")
    other.acquire()
    text = snippet()
    assert "--timeout 30" in text
    # The same script with --no-wait, so the contended path needs no 30 s wait.
    out = run_snippet(tmp_path, text.replace("--timeout 30", "--no-wait"))
    assert out.returncode == 4, out.stderr
    assert "not held" in out.stderr
    assert not session.exists()


def test_readme_coproc_example_exits_with_hold_s_code_when_it_cannot_hold(
    tmp_path: Path
) -> None:
    """hold ends before its first answer (here: the session's path is a directory):
    the script says so, with hold's own message, and exits with hold's code (1), not
    as if another run held the session (4)."""
    session = tmp_path / "sessions" / "4f1c2a9e.jsonl"
    session.mkdir(parents=True)
    out = run_snippet(tmp_path, snippet())
    assert out.returncode == 1, out.stderr
    assert "not held: " in out.stderr, out.stderr
    assert "a directory" in out.stderr and "Bad file descriptor" not in out.stderr, out.stderr
    assert session.is_dir() and not list(session.iterdir())


def test_readme_coproc_example_exits_with_hold_s_code_when_hold_ended_before_the_copy(
    tmp_path: Path, spawn_holder: SpawnHolder
) -> None:
    """hold ends before the script copies its pipes (bash has closed HOLD's own): the
    script still says "not held" and exits with hold's code, here 4 (held by another
    run, --no-wait), with no error of bash's about the copy. The script is made to wait
    until bash has disposed of the coprocess, not for a time."""
    session = tmp_path / "sessions" / "4f1c2a9e.jsonl"
    other = spawn_holder(session, lane="channel")
    other.acquire()
    text = snippet().replace("--timeout 30", "--no-wait")
    marker = "hold_pid=$HOLD_PID\n"
    assert marker in text
    text = text.replace(marker, marker + 'while [[ -n ${HOLD[1]-} ]]; do :; done\n')
    out = run_snippet(tmp_path, text)
    assert out.returncode == 4, out.stderr
    assert "held by" in out.stderr or "SessionContendedError" in out.stderr, out.stderr
    assert "not held: " in out.stderr and "Bad file descriptor" not in out.stderr, out.stderr
