"""Checking a session transcript: torn lines, and fencing tokens that went backwards
or were used by two runs.

A stamped line whose token is lower than an earlier line's was written by a run that
had already lost the session (a lock lost on NFS, a record force-cleared while its
owner still ran): exactly the write a fencing token exists to expose.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from fencelock import _sidecar
from fencelock._errors import (
    FenceLockError,
    OutsideRootError,
    SidecarAccessError,
    StoreUnavailableError,
)
from fencelock._json import loads
from fencelock._jsoncheck import JsonStream, is_json
from fencelock._record import MAX_TOKEN
from fencelock._tokens import STAMP_KEY, TAIL, stamp_of, trailing_stamp

_JSON_SPACE = b" \t\r\n"
"""What JSON counts as white space: a line of nothing else holds no entry."""


@dataclass(frozen=True, slots=True)
class Problem:
    line: int
    """1-based line number."""
    kind: str
    """``"torn"`` (not one JSON value, or no final line break), ``"token-backwards"``,
    ``"token-repeated"`` (one token stamped by two runs), ``"token-out-of-range"`` (a
    stamp above the largest token, 2**63 - 1, that no run was ever given),
    ``"stamp-malformed"`` (the reserved key holding something other than a stamp), or
    ``"stopped"`` (too many problems to go on)."""
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify` found in a session file: its lines, stamps and problems."""

    session: str
    lines: int = 0
    stamped: int = 0
    max_token: int = 0
    problems: list[Problem] = field(default_factory=list)
    exists: bool = True
    """False for a session file not created yet (its directory exists): no lines."""
    unchecked: list[int] = field(default_factory=list)
    """Lines not parsed (no problem by that alone), their stamp read from their end:
    longer than `MAX_LINE`, nested deeper than Python's parser goes, or taking more
    memory to parse than there is."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _run_of(entry: object) -> object:
    stamp = entry.get(STAMP_KEY) if isinstance(entry, dict) else None
    return stamp.get("run_id") if isinstance(stamp, dict) else None


_NO_STAMP = object()
"""`_check`'s last stamp's run before any stamp was read."""


_UNTERMINATED = "last line has no line break"

_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
"""A byte no JSON text holds: a control character other than JSON's whitespace is
neither whitespace between tokens nor allowed unescaped in a string (a run of NUL
bytes is what a crash leaves where a file's last blocks were allocated but never
written). An over-long line, not parsed, is still searched for one."""

_NOT_CONTROL = bytes(b for b in range(256) if not _CONTROL.match(bytes([b])))


def _control_at(data: bytes) -> int:
    """Where the first `_CONTROL` byte of ``data`` is, -1 if none (deleting every other
    byte tells whether there is one ten times faster than the expression's search)."""
    if not data.translate(None, _NOT_CONTROL):
        return -1
    found = _CONTROL.search(data)
    return -1 if found is None else found.start()

MAX_LINE = 64 * 1024 * 1024
"""A longer line is not parsed (nor held in memory): its stamp is read from its end."""
MAX_PROBLEMS = 10_000
"""After this many problems the check stops (the report says where)."""


def _int(text: str) -> int:
    """A JSON integer; one too long to be a token stays out of range without being
    converted (Python refuses integers of over 4300 digits)."""
    if len(text) <= 20:
        return int(text)
    return -1 if text.startswith("-") else MAX_TOKEN + 1


def verify(path: _sidecar.AnyPath, *, backend: str | None = None) -> VerifyReport:
    """Read the session line by line and report what is wrong with it. ``path`` is the
    session file or its sidecar.

    A session file that does not exist yet, in a directory that does, has no lines. A
    last line without its line break is torn unless a live holder may still be
    writing it: the holder as the store ``backend`` names it (as for `probe`) says. A
    store that cannot be asked then (etcd away, a session outside its ``root=``) raises
    its error when that line is the only problem: whether it is torn cannot be told.
    With other problems, the report has them, and the last line's problem says that
    it may be a live holder's append.
    """
    from fencelock._backend import selected

    selected(backend)  # ValueError for a bad URL, whatever the file holds
    session, _ = _sidecar.paths(path)  # a sidecar's path names its session, as elsewhere
    torn_at = -1
    for _ in range(_LOOKS):
        report, tail = _look(session)
        if tail < 0:
            return report
        try:
            in_flight = _in_flight(session, tail, backend)
        except (StoreUnavailableError, OutsideRootError) as e:
            if len(report.problems) < 2:
                raise  # the last line is all there is to tell, and it cannot be told
            # Other lines are wrong whatever the store says: report them, and the last
            # line as what it may be.
            last = report.problems[-1]
            undecided = replace(last, detail=f"{last.detail}, unless a live holder is still "
                                f"writing it (the holder store cannot be asked: {e})")
            return replace(report, problems=[*report.problems[:-1], undecided])
        if in_flight:
            # A live holder's append under way, not a crash's leftover: not (yet) a problem.
            return replace(report, lines=report.lines - 1, problems=report.problems[:-1])
        # The holder was asked after the file was read: its append may have ended, and
        # its record moved past the line, meanwhile. Torn is a line read again still
        # without its break; one that has ended (or is no longer last) was not.
        if tail == torn_at:
            break
        torn_at = tail
    return report


def _look(session: str) -> tuple[VerifyReport, int]:
    """`_check` of the session file as it is now (a report that it does not exist, in
    a directory that does, and -1)."""
    try:  # through `map`: kept as it returns (`_sidecar.open_regular`)
        (fd, _), = map(_sidecar.open_regular, (session,), (os.O_RDONLY,))
    except FileNotFoundError as e:
        if os.path.isdir(os.path.dirname(session)):
            return VerifyReport(session, exists=False), -1
        raise _unreadable(session, e) from None
    except OSError as e:
        raise _unreadable(session, e) from None
    try:
        # The builtin `open`, not `os.fdopen` (Python code, where an interrupt could
        # land before the file owns the descriptor): the file owns it as it is made.
        with open(fd, "rb") as f:
            return _check(session, f)
    except OSError as e:
        raise _unreadable(session, e) from None


_LOOKS = 3
"""How many times `verify` reads a session whose last line it finds torn: the last
look's report stands."""


def _in_flight(session: str, start: int, backend: str | None) -> bool:
    """Whether a last line that starts at ``start`` may be an append a live holder is
    making: it starts where the holder's record says the session ended (its fence
    point) or later. A torn line from before the holder came starts earlier."""
    from fencelock._probe import ProbeState, probe

    try:
        st = probe(session, backend=backend)
    except (StoreUnavailableError, OutsideRootError):
        raise  # the store cannot say: neither torn nor in flight can be told
    except (FenceLockError, OSError):
        return False
    if st.state is not ProbeState.LIVE or st.record is None:
        return False
    fp = st.record.fingerprint
    return start >= (0 if fp is None else fp.size)


def _unreadable(session: str, e: OSError) -> SidecarAccessError:
    return _sidecar.unreadable_session(session, e, "verify needs to read the session file")


def _check(session: str, f: BinaryIO) -> tuple[VerifyReport, int]:
    """The report, and where its last line starts when that line has no line break
    (-1 otherwise)."""
    problems: list[Problem] = []
    unchecked: list[int] = []
    best = 0
    best_run: object = _NO_STAMP
    run: object
    stamped = 0
    number = 0
    tail = -1
    offset = 0  # where the next line starts (counted: tell() would cost a syscall a line)
    while len(problems) < MAX_PROBLEMS:
        start = offset
        try:
            raw = f.readline(MAX_LINE)
        except MemoryError:  # a line too long for the memory there is: read as one
            f.seek(start)    # longer than MAX_LINE is, a step at a time
            raw = f.read(60)
            f.seek(start)  # the whole line is read below: none of it read yet
            first, last, over, control, read = raw, b"", True, -1, 0
            stream = JsonStream()
        else:
            if not raw:
                break
            offset += len(raw)
            over = not raw.endswith(b"\n") and len(raw) >= MAX_LINE
            if over:
                # Its first bytes (for a message) and its last (for a stamp) kept, the
                # rest let go before the rest of the line is read.
                control, read = _control_at(raw), len(raw)
                stream = JsonStream()
                view = memoryview(raw)
                for at in range(0, read, _REST_STEP):  # a step at a time: one in memory
                    stream.feed(view[at:at + _REST_STEP])
                view.release()
                first, last, raw = raw[:60], raw[-TAIL:], b""
        number += 1
        if over or not raw.endswith(b"\n"):
            if not over:  # the last line, with no line break
                problems.append(Problem(number, "torn", f"{_UNTERMINATED}: {raw[:60]!r}"))
                tail = start
                break
            try:
                end = _rest_of_line(f, last, control, read, stream)
            except MemoryError:
                raise _no_memory(session, number) from None
            raw = first
            offset += end.length
            if not end.ended:  # the last line, with no line break
                problems.append(Problem(number, "torn", f"{_UNTERMINATED}: {raw[:60]!r}"))
                tail = start
                break
            if end.control >= 0:
                problems.append(Problem(number, "torn", (
                    f"not JSON: a control character at byte {end.control:,} of a line of "
                    f"{read + end.length:,} bytes: {raw[:60]!r}")))
                continue
            if stream.end() is False:
                problems.append(Problem(number, "torn", (
                    f"not JSON (a line of {read + end.length:,} bytes, checked as it was "
                    f"read): {raw[:60]!r}")))
                continue
            unchecked.append(number)  # too long to parse: its stamp, from its end
            found = trailing_stamp(end.last)
            if found is None:
                continue
            token, run = found
        elif not raw.strip(_JSON_SPACE):
            continue  # a blank line: no entry, which readers of sessions pass over
        else:
            try:
                # JSON as any reader takes it: no NaN, no Infinity (Python's own).
                # Decoded first: given bytes, json also takes UTF-16, a BOM and UTF-8
                # spelling lone surrogates, which strict readers refuse.
                entry = loads(raw.decode("utf-8"), parse_int=_int)
            except (ValueError, RecursionError) as e:
                if isinstance(e, ValueError) or is_json(raw) is False:
                    problems.append(Problem(number, "torn", f"not JSON: {raw[:60]!r}"))
                    continue
                unchecked.append(number)  # nested deeper than Python's parser goes (JSON,
                # or not known here: `_jsoncheck.RELIABLE`):
                found = trailing_stamp(raw)  # read as an over-long line is
                if found is None:
                    continue
                token, run = found
            except MemoryError:  # its values take more memory than there is
                unchecked.append(number)  # read as an over-long line is
                found = trailing_stamp(raw)
                if found is None:
                    continue
                token, run = found
            else:
                stamp, run = stamp_of(entry), _run_of(entry)
                if stamp is None or not (isinstance(run, str) and run):
                    if isinstance(entry, dict) and STAMP_KEY in entry:  # the key, misused
                        problems.append(Problem(
                            number, "stamp-malformed",
                            f"{STAMP_KEY!r} is not a stamp fencelock writes (a token >= 0 "
                            f"and a run_id): {raw[:60]!r}"))
                    continue
                token = stamp
        stamped += 1
        if token > MAX_TOKEN:  # not a token any run was given: it sets no order
            problems.append(Problem(
                number, "token-out-of-range",
                f"stamped token above the largest token ({MAX_TOKEN}): {raw[:60]!r}"))
            continue
        if token < best:
            problems.append(
                Problem(number, "token-backwards", f"token {token} after token {best}")
            )
        elif token == best and run != best_run and best_run is not _NO_STAMP:
            problems.append(Problem(
                number, "token-repeated",
                f"token {token} stamped by two runs ({best_run!r} and {run!r})",
            ))
        if token >= best:
            best, best_run = token, run
    else:
        if f.read(1):
            problems.append(
                Problem(number, "stopped", f"{MAX_PROBLEMS} problems; not read further")
            )
    return VerifyReport(session, number, stamped, best, problems, unchecked=unchecked), tail


@dataclass(frozen=True, slots=True)
class _End:
    length: int
    """Bytes read past those read before (the first `MAX_LINE`, or none)."""
    ended: bool
    """Whether the line ends with a line break (else the file ended first)."""
    last: bytes
    """The line's last `TAIL` bytes."""
    control: int
    """Where in the line its first byte no JSON text holds is (`_CONTROL`), -1 if none."""


_REST_STEP = 1024 * 1024
"""How much of a line past its first `MAX_LINE` bytes is read at a time."""


def _no_memory(session: str, number: int) -> FenceLockError:
    return FenceLockError(
        f"{session}: line {number}: not enough memory to read it (verify reads a line "
        f"up to {MAX_LINE // (1024 * 1024)} MiB at a time); raise the process's memory "
        f"limit and verify again")


def _rest_of_line(
    f: BinaryIO, head: bytes, control: int = -1, read: int = 0,
    stream: JsonStream | None = None,
) -> _End:
    """Read on to the end of a line longer than `MAX_LINE` whose first ``read`` bytes
    were read already (the last `TAIL` of them in ``head``; ``control``, where in them a
    byte no JSON holds is, or -1), keeping only its last `TAIL` bytes, and feeding what
    it reads to ``stream``."""
    last, length = head[-TAIL:], 0
    while more := f.readline(_REST_STEP):
        if stream is not None:
            stream.feed(more)
        if control < 0 and (at := _control_at(more)) >= 0:
            control = read + length + at
        length += len(more)
        last = (last + more)[-TAIL:]
        if more.endswith(b"\n"):
            return _End(length, True, last, control)
    return _End(length, False, last, control)
