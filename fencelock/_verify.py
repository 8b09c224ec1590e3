"""Checking a session transcript: torn lines, and fencing tokens that went backwards
or were used by two runs.

A stamped line whose token is lower than an earlier line's was written by a run that
had already lost the session (a lock lost on NFS, a record force-cleared while its
owner still ran): exactly the write a fencing token exists to expose.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from fencelock import _sidecar
from fencelock._errors import SidecarAccessError
from fencelock._tokens import STAMP_KEY, stamp_of


@dataclass(frozen=True, slots=True)
class Problem:
    line: int
    """1-based line number."""
    kind: str
    """``"torn"`` (not one JSON value, or no final line break), ``"token-backwards"``, or
    ``"token-repeated"`` (one token stamped by two runs)."""
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    session: str
    lines: int = 0
    stamped: int = 0
    max_token: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _run_of(entry: object) -> object:
    stamp = entry.get(STAMP_KEY) if isinstance(entry, dict) else None
    return stamp.get("run_id") if isinstance(stamp, dict) else None


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Read the whole session and report what is wrong with it."""
    session = os.path.abspath(os.fspath(path))
    try:
        fd, _ = _sidecar.open_regular(session, os.O_RDONLY)
    except OSError as e:
        raise SidecarAccessError(session, e, "verify needs to read the session file") from None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SidecarAccessError(session, e, "verify needs to read the session file") from None
    problems: list[Problem] = []
    best = 0
    best_run: object = None
    stamped = 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a line break
    for number, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            problems.append(Problem(number, "torn", f"not JSON: {raw[:60]!r}"))
            continue
        token = stamp_of(entry)
        if token is None:
            continue
        stamped += 1
        run = _run_of(entry)
        if token < best:
            problems.append(
                Problem(number, "token-backwards", f"token {token} after token {best}")
            )
        elif token == best and run != best_run:
            problems.append(Problem(
                number, "token-repeated",
                f"token {token} stamped by two runs ({best_run!r} and {run!r})",
            ))
        if token >= best:
            best, best_run = token, run
    if tail:
        problems.append(
            Problem(len(lines) + 1, "torn", f"last line has no line break: {tail[:60]!r}")
        )
    return VerifyReport(session, len(lines) + (1 if tail else 0), stamped, best, problems)
