"""The README's promises that code can check: its Python examples run as written, and
its list of `HolderStatus` fields is the dataclass's."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fencelock import HolderStatus

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("number", range(len(EXAMPLES)))
def test_every_python_example_runs_as_written_in_an_empty_directory(
    tmp_path: Path, number: int
) -> None:
    """Each runs as a user would paste it (the etcd one only makes its lock object)."""
    work = tmp_path / "empty"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", EXAMPLES[number]], cwd=work,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_first_python_example_writes_its_two_lines(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", EXAMPLES[0]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "sessions" / "4f1c2a9e.jsonl").read_text().splitlines()
    assert [json.loads(line)["role"] for line in lines] == ["user", "assistant"]
    assert len(EXAMPLES) >= 4


def test_the_readme_lists_every_holder_status_field() -> None:
    listed = re.search(r"`HolderStatus\(([^)]*)\)`", README)
    assert listed is not None
    names = [name.strip() for name in listed.group(1).split(",")]
    assert names == [f.name for f in dataclasses.fields(HolderStatus)
                     if not f.name.startswith("_")]
