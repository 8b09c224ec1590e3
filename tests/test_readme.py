"""The README's promises that code can check: its first example runs as written, and
its list of `HolderStatus` fields is the dataclass's."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from fencelock import HolderStatus

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_first_python_example_runs_in_an_empty_directory(tmp_path: Path) -> None:
    snippet = re.search(r"```python\n(.*?)```", README, re.S)
    assert snippet is not None
    program = "def call_model():\n    return 'hello'\n\n" + snippet.group(1)
    work = tmp_path / "empty"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", program], cwd=work, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len((work / "sessions" / "4f1c2a9e.jsonl").read_text().splitlines()) == 2


def test_the_readme_lists_every_holder_status_field() -> None:
    listed = re.search(r"`HolderStatus\(([^)]*)\)`", README)
    assert listed is not None
    names = [name.strip() for name in listed.group(1).split(",")]
    assert names == [f.name for f in dataclasses.fields(HolderStatus)
                     if not f.name.startswith("_")]
