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

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


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


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", text, re.M)}


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_names_a_file_and_heading_that_exist(doc: Path) -> None:
    """The README and the docs it points to link to each other: each relative link names
    a file that exists, and each anchor one of that file's headings."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # not in code blocks
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists() or (
            anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text())
        ):
            broken.append(link)
    assert broken == []
