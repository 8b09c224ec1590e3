"""What the ``fencelock`` command line prints: escaping, JSON-safe encoding, the status
table and the streamed ``status --json`` array, and the expected errors (one escaped
line on stderr, a documented exit code, no traceback).

Imported at startup: it loads click and nothing of the library until a function needs it.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any, TextIO

import click

from fencelock import _platform
from fencelock._ages import human_age
from fencelock._constants import (
    COMMAND_NAME,
    EXIT_CONTENDED,
    EXIT_ERROR,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    SIDECAR_SUFFIX,
)

if TYPE_CHECKING:
    from fencelock._probe import HolderStatus
    from fencelock._record import HolderInfo


_closed: set[str] = set()
"""The standard streams the command was started without (`standard_streams`)."""


def standard_streams() -> None:
    """Give a command started with stdin, stdout or stderr closed (``<&-``, ``>&-``)
    /dev/null there. Otherwise the next descriptor it opens (a pipe, a sidecar) takes
    that number and is read or written as the stream: ``hold`` with stdin closed would
    read its own signal pipe, and hold its session for good. (A command whose answer
    goes to stdout then refuses to start: `answer_goes_to_stdout`.)"""
    for fd, flags, name in ((0, os.O_RDONLY, "stdin"), (1, os.O_WRONLY, "stdout"),
                            (2, os.O_WRONLY, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            _closed.add(name)
        opened = os.open(os.devnull, flags)  # the lowest free number: this one
        if opened != fd:
            os.dup2(opened, fd)
            os.close(opened)
        os.set_inheritable(fd, True)  # a command that `run` starts gets it too
        if getattr(sys, name) is None:  # Python found it closed at startup
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False,  # noqa: SIM115
                                    errors="backslashreplace" if fd == 2 else "strict"))
    if sys.stderr is not None and not isinstance(sys.stderr, _BestEffort):
        sys.stderr = _BestEffort(sys.stderr)


class _BestEffort:
    """stderr, whose write errors (a full disk, a closed pipe) are dropped: a message
    that cannot be shown has nowhere else to go, and failing to show it must not turn
    the command's documented exit code (4 contended, 127 not found...) into 1."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":  # click would write to it directly, past this wrapper, when
            raise AttributeError(name)  # it finds the text stream's encoding wanting
        return getattr(self._stream, name)


def answer_goes_to_stdout(command: str) -> None:
    """Refuse to run ``command``, whose answer (a session to use, a report) goes to
    stdout, when it was started with stdout closed: the answer would be lost, and for
    ``recover`` the name of the fresh session it made."""
    if "stdout" in _closed:
        raise CliError(f"standard output is closed (>&-), and fencelock {command} prints "
                       "its answer there; give it somewhere to go (>/dev/null to discard "
                       "it)")


def clean(text: str) -> str:
    """``text`` with control characters escaped, so record text cannot drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # a byte of a name that is not UTF-8 (os.fsdecode's escape)
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


class CliError(click.ClickException):
    """An expected failure: one escaped line on stderr, exit 1, no traceback."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(clean(message))


class ContendedCliError(CliError):
    """A live holder is in the way."""

    exit_code = EXIT_CONTENDED


class CommandNotFoundError(CliError):
    exit_code = EXIT_NOT_FOUND


class CommandNotExecutableError(CliError):
    exit_code = EXIT_NOT_EXECUTABLE


def os_message(e: OSError) -> str:
    from fencelock._errors import LIMIT_FIXES

    reason = e.strerror or type(e).__name__
    fix = LIMIT_FIXES.get(e.errno or 0)
    if fix is not None:
        reason += f"; {fix}"
    if e.filename is None:
        return reason
    name = os.fsdecode(e.filename)
    if os.path.dirname(name) == os.path.dirname(__file__):  # a module loaded when needed
        return f"fencelock cannot load its module {name}: {reason}"
    return f"{name}: {reason}"


@contextmanager
def library_errors(session: str | None = None) -> Iterator[None]:
    """Turn the library's expected failures into click errors with the right exit code.
    ``session``: the one session the command is about, named before a message about the
    holder store (which names the store, not the session it was asked about)."""
    from fencelock._errors import FenceLockError, SessionContendedError, session_lead

    try:
        yield
    except SessionContendedError as e:
        raise ContendedCliError(str(e)) from None
    except FenceLockError as e:
        raise CliError((session_lead(session, e) if session else "") + str(e)) from None
    except OSError as e:
        raise CliError(os_message(e)) from None


def plain_warnings() -> None:
    """Print fencelock's own warnings (`FenceLockWarning`) as one plain line on stderr,
    ``Warning: <message>``, instead of Python's file, line number and source line, even
    where the environment asks for warnings to be errors."""
    import warnings

    from fencelock._errors import FenceLockWarning

    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if issubclass(category, FenceLockWarning):
            warning_line(str(message))
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    # Shown, never raised: a command's own warnings are notes (PYTHONWARNINGS=error in
    # the environment, for all warnings or for a module or message, would turn them into
    # tracebacks, in the middle of a request). A filter that ignores them all is left as
    # it is: the first that applies to every FenceLockWarning decides.
    for action, message, category, module, lineno in warnings.filters:
        if not issubclass(FenceLockWarning, category):
            continue
        if action == "error":
            warnings.simplefilter("default", FenceLockWarning)
            break
        if message is None and module is None and not lineno:
            break


class OutputError(CliError):
    """Standard output cannot be written (a full disk, say): one line on stderr, exit 1."""


def _output_failed(e: OSError) -> OutputError:
    return OutputError(f"cannot write its output: {e.strerror or type(e).__name__}; check "
                       "where standard output goes (a full disk or a closed device)")


def out(text: str = "", nl: bool = True) -> None:
    """Print ``text`` on standard output and flush, its styles stripped where it is not a
    terminal (as `click.echo` does). A write that fails raises `OutputError` instead of
    a traceback; a closed pipe (EPIPE: ``| head``) is left to the command group, which
    ends quietly with 141."""
    stream = sys.stdout
    if os.name == "nt" or getattr(stream, "buffer", None) is None:
        try:  # click's console handling (Windows), or a stream of text only
            click.echo(text, nl=nl)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise
            raise _output_failed(e) from None
        return
    if nl:
        text += "\n"
    # As click.echo decides (its test runner replaces this decision: look it up now).
    color = click.globals.resolve_color_default()
    decide = getattr(click.utils, "should_strip_ansi", None)
    if decide(stream, color) if decide is not None else not (
            stream.isatty() if color is None else color):
        text = click.unstyle(text)
    # A name the stream's encoding cannot show (``é`` on an ASCII or Latin-1 terminal)
    # is shown escaped, as standard error does, never a UnicodeEncodeError.
    # (Text here has no lone surrogates for ``surrogateescape`` to take: `clean` escapes
    # them. That handler, a C locale's, raises on anything else.)
    errors = stream.errors if stream.errors not in (
        None, "strict", "surrogateescape") else "backslashreplace"
    out_bytes(text.encode(stream.encoding, errors))


def out_bytes(data: bytes) -> None:
    """Write ``data`` on standard output as it is (a path that is not valid UTF-8, say),
    and flush. Every byte is written or an error raised: a pipe whose reader leaves in
    the middle of a write takes part of it and answers the rest with EPIPE (Python's
    buffered writer reports such a short write by its count alone, which a text stream
    drops: the rest of the output was lost, and the command ended 0)."""
    try:
        sys.stdout.flush()
        buffer = sys.stdout.buffer
        view = memoryview(data)
        while view:
            try:
                done = buffer.write(view)
            except BlockingIOError as e:  # the reader made the pipe non-blocking: wait
                done = e.characters_written
                _platform.wait_ready((), (buffer.fileno(),))
            view = view[done or 0:]
        buffer.flush()
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise
        raise _output_failed(e) from None


def echo_json(obj: Any) -> None:
    import json

    out(json.dumps(json_safe(obj), indent=2))


def _utf8(text: str) -> bytes | None:
    """``text`` as UTF-8 bytes, or None when it holds no lone surrogates (the common
    case, checked first in O(1) for ASCII)."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        try:  # a path's undecodable bytes, as os.fsdecode gives them
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate from a record's JSON escape
            return text.encode("utf-8", "surrogatepass")
    return None


def json_safe(obj: Any) -> Any:
    """``obj`` with every string valid Unicode, so that ``--json`` output is strict
    UTF-8 for any file name. A string that is not (a name with bytes that are not
    UTF-8) is given with each such byte written as ``\\xNN``, and its exact bytes, in
    base64, in an extra field named ``<field>_b64``."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if isinstance(key, str) and _utf8(key) is not None:
                key = _readable(key)
            if isinstance(value, str):
                raw = _utf8(value)
                if raw is not None:
                    import base64

                    out[key] = raw.decode("utf-8", "backslashreplace")
                    out[f"{key}_b64"] = base64.b64encode(raw).decode("ascii")
                    continue
            out[key] = json_safe(value) if isinstance(value, dict | list) else value
        return out
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, str):
        return _readable(obj)
    return obj


def _readable(text: str) -> str:
    raw = _utf8(text)
    return text if raw is None else raw.decode("utf-8", "backslashreplace")


def error_line(message: str) -> None:
    click.echo(f"Error: {clean(message)}", err=True)


def warning_line(message: str) -> None:
    """A note on stderr about something that did not fail: ``Warning: <message>``."""
    click.echo(f"Warning: {clean(message)}", err=True)


def holder_text(st: HolderStatus) -> str:
    """Who holds a live session: its record, or the lock's owners outside fencelock."""
    from fencelock._errors import describe_holder

    return describe_holder(held_record(st), st.lock_owners,
                           st.record if st.left_by_run else None, st._held_by or None)


def held_record(st: HolderStatus) -> HolderInfo | None:
    """The live holder's record (a released one, or a dead owner's, describes a past
    run): `HolderStatus._live_record`."""
    return st._live_record


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 line``, ``2 lines``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


class PathDisplay:
    """Paths under the working directory are shown relative to it, others absolute."""

    def __init__(self) -> None:
        try:
            self.prefix = os.getcwd() + os.sep
        except OSError:
            self.prefix = "\0"  # matches no path

    def __call__(self, path: str) -> str:
        shown = path[len(self.prefix) :] if path.startswith(self.prefix) else path
        return clean(shown or "./")  # the working directory itself ("<dir>/.holder")


_MAX_CELL = 48


def shorten(text: str, width: int = _MAX_CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def status_json(st: HolderStatus, now: float) -> dict[str, Any]:
    """The documented ``status --json`` object for one holder."""
    rec = st.record
    return {
        "session": st.session,
        "sidecar": st.sidecar or None,  # none for a directory's row (the command line's)
        "state": str(st.state),
        "pid": rec.pid if rec else None,
        "host": rec.host if rec else None,
        "lane": rec.lane if rec else None,
        "run_id": rec.run_id if rec else None,
        "token": rec.token if rec else None,
        "phase": str(rec.phase) if rec else None,
        "acquired_at": rec.acquired_at if rec else None,
        "heartbeat_at": rec.heartbeat_at if rec else None,
        "age": round(now - rec.acquired_at, 3) if rec else None,
        "heartbeat_age": round(now - rec.heartbeat_at, 3) if rec else None,
        "stuck": st.stuck if rec is not None else None,
        "owner_alive": st.owner_alive,
        "command_pid": _command_pid(rec),
        "fence_ok": st.fence_ok,
        "reason": st.reason,
        "held_by": st.held_by,
        "lock_owners": None if st.lock_owners is None else [
            {"pid": o.pid, "command": o.command, "shared": o.shared} for o in st.lock_owners
        ],
        "waiters": st.waiters,
        "moved_to": st.moved_to,
    }


def _command_pid(rec: HolderInfo | None) -> int | None:
    """The pid of the command a `fencelock run` holder started (it shares the lock)."""
    command = rec.command if rec is not None else None
    return command.pid if command is not None else None


_STATE_COLOURS = {"live": "green", "stale": "red", "unreadable": "magenta"}


_HEADER = ("SESSION", "STATE", "PID", "HOST", "LANE", "AGE", "HEARTBEAT", "TOKEN", "FENCE")


def _status_cells(st: HolderStatus, now: float, show: PathDisplay) -> list[str]:
    from fencelock._probe import ProbeState

    rec = st.record
    notes = ", ".join(note for note, said in (("stuck", st.stuck), ("moved", st.moved_to))
                      if said)
    state = f"{st.state} ({notes})" if notes else str(st.state)
    if st.state is ProbeState.LIVE and held_record(st) is None:
        run = rec if st.left_by_run else None
        if run is not None:  # processes a `fencelock run` command left running
            lane = f"(left by fencelock run pid {run.pid}, lane {run.lane})"
            return [show(st.session), state, "?", shorten(clean(run.host), 24),
                    shorten(clean(lane)), "-", "-",
                    str(run.token), "-"]
        # Held by a process outside fencelock: name it as lslocks(8) would.
        owners = st.lock_owners or ()
        pids = ",".join(str(o.pid) for o in owners if o.command is not None) or "?"
        what = ", ".join(sorted({o.command for o in owners if o.command is not None}))
        if any(o.command is None for o in owners):
            what = ", ".join(filter(None, [what, "inherited from pid " + ",".join(
                str(o.pid) for o in owners if o.command is None)]))
        if owners and all(o.shared for o in owners):
            what = ", ".join(filter(None, [what, "shared"]))
        if owners and all(o.command == COMMAND_NAME for o in owners):
            lane = f"(no record: {what})"  # the command's record was emptied or written over
        else:
            lane = f"(not fencelock: {what})" if what else "(not fencelock)"
        return [show(st.session), state, pids, "-", shorten(clean(lane)), "-", "-", "-", "-"]
    if rec is None:
        if st.state is ProbeState.FREE and _nothing_at(st.session):
            state = "free (no file)"
        return [show(st.session), state, "-", "-", "-", "-", "-", "-", "-"]
    # A released record describes a past run: its ages would read as if it still ran.
    past = st.state is ProbeState.FREE
    # After a clean release anyone may write the session, so a moved fence means nothing.
    fence = "-" if past else {True: "ok", False: "moved", None: "-"}[st.fence_ok]
    return [
        show(st.session),
        state,
        # A free session's record names the run that last held it, not an owner.
        f"last {rec.pid}" if past else str(rec.pid),
        shorten(clean(rec.host), 24),
        shorten(clean(rec.lane)),
        "-" if past else human_age(now - rec.acquired_at),
        "-" if past else human_age(now - rec.heartbeat_at),
        str(rec.token),
        fence,
    ]


def colour_wanted() -> bool:
    """False where the user asked for no colour (``NO_COLOR`` set and not empty, as
    no-color.org has it) or the terminal shows none (``TERM=dumb``)."""
    return not (os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb")


def _plain(text: str, **_: Any) -> str:
    return text


def cell_width(text: str) -> int:
    """The columns ``text`` (a cell, `clean` already: no control or format characters)
    takes on a terminal: two for a wide character (CJK, most emoji), none for a mark
    drawn on the one before it (a combining accent, Thai and Devanagari vowel signs, a
    variation selector) or a Hangul vowel or final consonant jamo; one for the rest."""
    if text.isascii():
        return len(text)
    import unicodedata  # only for a name that is not ASCII: not at startup

    width = 0
    for c in text:
        if "\u1160" <= c <= "\u11ff" or "\ud7b0" <= c <= "\ud7ff" or \
                unicodedata.category(c) in ("Mn", "Me"):
            continue
        width += 2 if unicodedata.east_asian_width(c) in "WF" else 1
    return width


def _pad(text: str, width: int) -> str:
    return text + " " * (width - cell_width(text))


class StatusTable:
    """An aligned table of status rows, the state column coloured (click.echo strips it
    off a terminal). ``waiters`` adds a WAITING column (processes queued behind each
    holder, etcd only).

    The widths are known only once every row is in, so rows are kept until then: each
    as one line of text (its cells are escaped, so they hold no control character to
    split on), at most `SPILL_AFTER` in memory, each full batch moved to a temporary
    file, so that listing a directory of 100,000 sessions or more takes flat memory.
    Where no temporary file can be made, or a batch cannot be written, the rest stay
    in memory."""

    SPILL_AFTER = 2000

    def __init__(self, *, waiters: bool = False) -> None:
        self.header: tuple[str, ...] = (
            (*_HEADER[:-1], "WAITING", _HEADER[-1]) if waiters else _HEADER)
        self.waiters = waiters
        self.widths = [len(h) for h in self.header]
        self.rows: list[str] = []
        self.count = 0
        self._spill: IO[bytes] | None = None
        self._spilled = 0
        """Bytes of whole batches in the temporary file."""
        self._show = PathDisplay()

    def add(self, st: HolderStatus, now: float) -> None:
        """Add ``st``'s row, its ages as of ``now``."""
        from fencelock._probe import ProbeState

        cells = _status_cells(st, now, self._show)
        if self.waiters:
            cells.insert(len(cells) - 1, str(st.waiters))
        widths = self.widths
        for i, cell in enumerate(cells):
            if (n := cell_width(cell)) > widths[i]:
                widths[i] = n
        colour = ("yellow" if st.stuck else _STATE_COLOURS.get(str(st.state))) or ""
        bold = "b" if st.state is ProbeState.STALE else ""
        self.rows.append(_ROW_SEP.join((*cells, colour, bold)))
        self.count += 1
        if len(self.rows) >= self.SPILL_AFTER:
            self._spill_rows()

    def _spill_rows(self) -> None:
        """Move the rows in memory to the end of the temporary file. On an error (no
        temporary file, a full disk) they stay, and so do all later ones: the file is
        read only as far as its last whole batch."""
        import tempfile  # only for a long table: not at startup

        data = "".join(row + "\n" for row in self.rows).encode("utf-8", "surrogatepass")
        try:
            if self._spill is None:
                # Open across calls (closed by `close`); removed from its directory already.
                self._spill = tempfile.TemporaryFile(buffering=0)  # noqa: SIM115
            view = memoryview(data)
            while view:
                view = view[self._spill.write(view) or 0:]
        except OSError:
            self.SPILL_AFTER = sys.maxsize
            return
        self._spilled += len(data)
        self.rows.clear()

    def lines(self) -> Iterator[str]:
        """The header, then a line per row; coloured unless asked not to be (off a
        terminal `out` takes colour off)."""
        widths, last = self.widths, len(self.header) - 1
        style = click.style if colour_wanted() else _plain
        yield style(
            "  ".join(h.ljust(widths[i]) if i < last else h for i, h in enumerate(self.header)),
            bold=True,
        )
        for row in self._rows():
            *cells, colour, bold = row.split(_ROW_SEP)
            parts = [_pad(c, widths[i]) if i < last else c for i, c in enumerate(cells)]
            if colour:
                parts[1] = style(parts[1], fg=colour, bold=bool(bold))
            yield "  ".join(parts)

    def _rows(self) -> Iterator[str]:
        """Every row, in the order added: the spilled ones first."""
        left = self._spilled
        if left:
            assert self._spill is not None
            try:
                self._spill.seek(0)
                for raw in open(self._spill.fileno(), "rb", closefd=False):  # noqa: SIM115
                    left -= len(raw)
                    if left < 0:
                        break
                    yield raw[:-1].decode("utf-8", "surrogatepass")
            except OSError as e:
                raise CliError(
                    f"the status rows kept in a temporary file cannot be read back "
                    f"({os_message(e)}); list with --json, which keeps none") from None
        yield from self.rows

    def close(self) -> None:
        """Drop the temporary file (it has no name: closing it frees its space)."""
        if self._spill is not None:
            self._spill.close()


_ROW_SEP = "\x1f"
"""Between a kept row's cells: a control character, so no escaped cell holds it."""


def stream_json_array(elements: Iterable[str]) -> None:
    """Print a JSON array as its elements come (each one's text as `json.dumps` with
    ``indent=2`` writes it inside an array: two spaces in), so that a long one is never
    held in memory; the text is that of ``json.dumps(array, indent=2)``."""
    chunks: list[str] = []
    count = 0
    writing = False
    try:
        for text in elements:
            chunks.append(("[\n  " if count == 0 else ",\n  ") + text)
            count += 1
            if len(chunks) >= 256:
                writing = True
                out("".join(chunks), nl=False)
                writing = False
                chunks.clear()
    except BaseException:
        # Cut short by an error or an interrupt while the elements were made: what came
        # is printed as a whole array, never a torn one (not when stdout itself failed).
        if not writing:
            with suppress(Exception):
                out("".join(chunks) + ("\n]" if count else "[]"))
        raise
    chunks.append("\n]" if count else "[]")
    out("".join(chunks))


def json_element(obj: Any) -> str:
    """``obj``'s text as an element of `stream_json_array`'s array."""
    text: str = _element_encoder().encode(json_safe(obj))
    return text.replace("\n", "\n  ")


@functools.cache
def _element_encoder() -> Any:
    import json

    return json.JSONEncoder(indent=2)  # one encoder: json.dumps makes one a call


def stream_status_json(rows: Iterator[HolderStatus]) -> tuple[bool, bool]:
    """Print ``status --json``'s array as the rows come; whether any was stale, and
    whether any was unreadable."""
    from fencelock._probe import ProbeState

    writers = _flat_writers()
    stale = unreadable = False

    def elements() -> Iterator[str]:
        nonlocal stale, unreadable
        for st in rows:
            stale = stale or st.state is ProbeState.STALE
            unreadable = unreadable or st.state is ProbeState.UNREADABLE
            row = status_json(st, time.time())
            yield _flat_row(row, writers) or json_element(row)

    stream_json_array(elements())
    return stale, unreadable


def _json_float(value: float) -> str | None:
    return repr(value) if math.isfinite(value) else None


_Writers = dict[type, Callable[[Any], str | None]]


def _flat_writers() -> _Writers:
    """How `json.dumps` writes each scalar a status row holds; None: not this way (a
    string that may need `json_safe`, a float that is not finite)."""
    from json.encoder import encode_basestring_ascii  # json is not loaded for --version

    return {
        type(None): lambda _: "null",
        bool: lambda value: "true" if value else "false",
        int: int.__repr__,
        float: _json_float,
        str: lambda text: encode_basestring_ascii(text) if text.isascii() else None,
    }


def _flat_row(row: dict[str, Any], writers: _Writers) -> str | None:
    """``row`` as an element of ``json.dumps([row], indent=2)`` (two spaces in), when
    every value is a scalar and every string is ASCII (the common row); otherwise None,
    for the general encoder. The same text, without the pure-Python indenting encoder."""
    parts = []
    for key, value in row.items():
        write = writers.get(type(value))
        text = write(value) if write is not None else None
        if text is None:
            return None
        parts.append(f'\n    "{key}": {text}')
    return "{" + ",".join(parts) + "\n  }" if parts else "{}"


def is_sidecar(path: str) -> bool:
    return path.endswith(SIDECAR_SUFFIX)


def _nothing_at(path: str) -> bool:
    """Neither the session file nor the sidecar ``path`` names exists (as opposed to
    cannot be looked at: a permission error is not a typo)."""
    if is_sidecar(path):
        pair = (path, path[: -len(SIDECAR_SUFFIX)])
    else:
        pair = (path, path + SIDECAR_SUFFIX)
    for p in pair:
        try:
            os.lstat(p)
        except FileNotFoundError:
            continue
        except OSError:
            return False  # there may be something; let the library name the cause
        return False
    return True
