"""The ``fencelock`` command line: a thin click layer over the library.

Each command parses its arguments, calls the library and formats what it returns. Exit
codes: 0 fine, 1 an error (a path that cannot be read, a corrupt record, a bad
config), 2 usage, 3 stale holders found, 4 a live holder in the way, 5 a session
with problems; ``run`` passes its command's own code through.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from fencelock import __version__

# Startup time matters for a command line: the library and the heavier standard modules
# are imported inside the commands that use them, so `--version` and `--help` load none
# of the library and `status` loads only what probing needs.
if TYPE_CHECKING:
    import subprocess
    from types import FrameType

    from fencelock import _etcdkeeper
    from fencelock._lock import SessionLock
    from fencelock._probe import HolderStatus
    from fencelock._record import HolderInfo

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STALE = 3
EXIT_CONTENDED = 4
EXIT_PROBLEMS = 5
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130  # 128 + SIGINT

_SIDECAR_SUFFIX = ".holder"
_MAX_CELL = 48
# fencelock._probe.DEFAULT_STUCK_AFTER, written out so building the command line does not
# import the library (tests/test_cli.py checks that the two agree).
DEFAULT_STUCK_AFTER = 600.0


# -- errors and escaping ----------------------------------------------------------


def clean(text: str) -> str:
    """``text`` with control characters escaped, so record text cannot drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
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


def _os_message(e: OSError) -> str:
    reason = e.strerror or type(e).__name__
    return f"{os.fsdecode(e.filename)}: {reason}" if e.filename is not None else reason


@contextmanager
def _library_errors() -> Iterator[None]:
    """Turn the library's expected failures into click errors with the right exit code."""
    from fencelock._errors import FenceLockError, SessionContendedError

    try:
        yield
    except SessionContendedError as e:
        raise ContendedCliError(str(e)) from None
    except FenceLockError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(_os_message(e)) from None


def _echo_json(obj: Any) -> None:
    import json

    click.echo(json.dumps(json_safe(obj), indent=2))


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


def _error_line(message: str) -> None:
    click.echo(f"Error: {clean(message)}", err=True)


def _holder_text(st: HolderStatus) -> str:
    """Who holds a live session: its record, or the lock's owners outside fencelock."""
    from fencelock._errors import describe_holder

    return describe_holder(_held_record(st), st.lock_owners)


def _held_record(st: HolderStatus) -> HolderInfo | None:
    """The record, if it says held (a released one describes a past run)."""
    rec = st.record
    return rec if rec is not None and str(rec.state) == "held" else None


def _plural(n: int, word: str, many: str | None = None) -> str:
    """``1 line``, ``2 lines``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


# -- formatting helpers -------------------------------------------------------------


def human_age(seconds: float | None) -> str:
    """A duration a person reads at a glance: ``42s``, ``3m07s``, ``2h05m``, ``3d04h``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


class _PathDisplay:
    """Paths under the working directory are shown relative to it, others absolute."""

    def __init__(self) -> None:
        try:
            self.prefix = os.getcwd() + os.sep
        except OSError:
            self.prefix = "\0"  # matches no path

    def __call__(self, path: str) -> str:
        shown = path[len(self.prefix) :] if path.startswith(self.prefix) else path
        return clean(shown)


def _shorten(text: str, width: int = _MAX_CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def status_json(st: HolderStatus, now: float) -> dict[str, Any]:
    """The documented ``status --json`` object for one holder."""
    rec = st.record
    return {
        "session": st.session,
        "sidecar": st.sidecar,
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
    }


def _command_pid(rec: HolderInfo | None) -> int | None:
    """The pid of the command a `fencelock run` holder started (it shares the lock)."""
    from fencelock._record import command_of

    command = command_of(rec) if rec is not None else None
    return command[0] if command is not None else None


_STATE_COLOURS = {"live": "green", "stale": "red", "unreadable": "magenta"}
_HEADER = ("SESSION", "STATE", "PID", "HOST", "LANE", "AGE", "HEARTBEAT", "TOKEN", "FENCE")


def _status_cells(st: HolderStatus, now: float, show: _PathDisplay) -> list[str]:
    from fencelock._probe import ProbeState

    rec = st.record
    state = "live (stuck)" if st.stuck else str(st.state)
    if st.state is ProbeState.LIVE and _held_record(st) is None:
        # Held by a process outside fencelock: name it as lslocks(8) would.
        owners = st.lock_owners or ()
        pids = ",".join(str(o.pid) for o in owners if o.command is not None) or "?"
        what = ", ".join(sorted({o.command for o in owners if o.command is not None}))
        if any(o.command is None for o in owners):
            what = ", ".join(filter(None, [what, "inherited from pid " + ",".join(
                str(o.pid) for o in owners if o.command is None)]))
        if owners and all(o.shared for o in owners):
            what = ", ".join(filter(None, [what, "shared"]))
        lane = f"(not fencelock: {what})" if what else "(not fencelock)"
        return [show(st.session), state, pids, "-", _shorten(clean(lane)), "-", "-", "-", "-"]
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
        _shorten(clean(rec.host), 24),
        _shorten(clean(rec.lane)),
        "-" if past else human_age(now - rec.acquired_at),
        "-" if past else human_age(now - rec.heartbeat_at),
        str(rec.token),
        fence,
    ]


def status_table(rows: Sequence[HolderStatus], now: float, *, waiters: bool = False) -> str:
    """An aligned table, the state column coloured (click.echo strips it off a terminal).
    ``waiters`` adds a WAITING column (runs queued behind each holder, etcd only)."""
    from fencelock._probe import ProbeState

    show = _PathDisplay()
    cells = [_status_cells(st, now, show) for st in rows]
    header: tuple[str, ...] = _HEADER
    if waiters:
        header = (*_HEADER[:-1], "WAITING", _HEADER[-1])
        cells = [[*row[:-1], str(st.waiters), row[-1]] for st, row in zip(rows, cells,
                                                                           strict=True)]
    widths = [len(h) for h in header]
    for row in cells:
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                widths[i] = len(cell)
    last = len(header) - 1
    lines = [
        click.style(
            "  ".join(h.ljust(widths[i]) if i < last else h for i, h in enumerate(header)),
            bold=True,
        )
    ]
    for st, row in zip(rows, cells, strict=True):
        parts = [c.ljust(widths[i]) if i < last else c for i, c in enumerate(row)]
        colour = "yellow" if st.stuck else _STATE_COLOURS.get(str(st.state))
        if colour:
            parts[1] = click.style(parts[1], fg=colour, bold=st.state is ProbeState.STALE)
        lines.append("  ".join(parts))
    return "\n".join(lines)


def _is_sidecar(path: str) -> bool:
    return path.endswith(_SIDECAR_SUFFIX)


def _is_directory_to_scan(path: str) -> bool:
    """A directory whose sessions to scan. A symlink named like a session or sidecar
    is not followed into a directory: another user may have planted it (`*.jsonl` in a
    shared directory expands to it), and it is reported as the session path it names."""
    if not os.path.isdir(path) or _is_sidecar(path):
        return False
    return not (path.rstrip("/").endswith(".jsonl") and os.path.islink(path.rstrip("/")))


def _nothing_at(path: str) -> bool:
    """Neither the session file nor the sidecar ``path`` names exists (as opposed to
    cannot be looked at: a permission error is not a typo)."""
    if _is_sidecar(path):
        pair = (path, path[: -len(_SIDECAR_SUFFIX)])
    else:
        pair = (path, path + _SIDECAR_SUFFIX)
    for p in pair:
        try:
            os.lstat(p)
        except FileNotFoundError:
            continue
        except OSError:
            return False  # there may be something; let the library name the cause
        return False
    return True


def _no_directory(path: str) -> str | None:
    """The error for a session path whose directory does not exist, else None.

    Every command refuses such a path the same way. (A missing session file in an
    existing directory is a session no run has started yet: free and empty.)
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except (FileNotFoundError, NotADirectoryError) as e:
        what = "does not exist" if isinstance(e, FileNotFoundError) else "is not a directory"
        return f"{path}: its directory {directory} {what}; check the path, or create it"
    except OSError:
        return None  # there may be something; let the library name the cause
    return None


def _one_session(path: str, command: str) -> None:
    """Refuse, in one line, a path that cannot name one session for ``command``."""
    problem = _no_directory(path)
    if problem is not None:
        raise CliError(problem)
    if _is_directory_to_scan(path):
        raise CliError(
            f"{path}: is a directory; {command} takes one session file "
            f"(fencelock status {path} lists the sessions in it)"
        )


# -- the group ------------------------------------------------------------------------

_MAIN_EPILOG = """\b
Exit codes: 0 fine, 1 error, 2 usage, 3 stale holders found (status),
4 a live holder in the way, 5 problems found (verify); run passes its
command's code through (126 not executable, 127 command not found,
128+N killed by signal N).

\b
Shell completion (add to your shell's startup file):
  bash: eval "$(_FENCELOCK_COMPLETE=bash_source fencelock)"
  zsh:  eval "$(_FENCELOCK_COMPLETE=zsh_source fencelock)"
  fish: _FENCELOCK_COMPLETE=fish_source fencelock | source
"""


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_MAIN_EPILOG,
)
@click.version_option(__version__, "-V", "--version", prog_name="fencelock")
def main() -> None:
    """Run-level holders for agent session files: see who holds what, clear stale
    holders, and run commands while holding a session.

    \b
    Example:
      fencelock status ~/.gateway/sessions
    """


class _Seconds(click.ParamType):  # type: ignore[type-arg]
    """A number of seconds >= 0; "inf" means no limit. NaN is a usage error."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if math.isnan(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a number of seconds >= 0", param, ctx)
        return seconds


SECONDS = _Seconds()


def _backend_option(f: Any) -> Any:
    """``--backend URL``: the holder store (default: $FENCELOCK_BACKEND, else sidecars)."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from fencelock._backend import ENV, selected

        try:
            selected(value)
        except ValueError as e:
            if value is None:
                raise click.UsageError(f"{ENV}: {e}") from None
            raise click.BadParameter(str(e)) from None
        return value

    return click.option(
        "--backend",
        metavar="URL",
        callback=check,
        help="Holder store: etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=S&root=DIR], or "
        "local for sidecars (default: $FENCELOCK_BACKEND, else local).",
    )(f)


def _uses_store(backend: str | None) -> bool:
    from fencelock._backend import selected

    return selected(backend) is not None


# -- status ---------------------------------------------------------------------------


@main.command(short_help="Show who holds each session (default: in .).")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per holder.")
@click.option(
    "--stuck-after",
    type=SECONDS,
    default=DEFAULT_STUCK_AFTER,
    show_default=True,
    metavar="SECONDS",
    help="Report a live holder as stuck when its heartbeat is older than this.",
)
@_backend_option
def status(
    paths: tuple[str, ...], as_json: bool, stuck_after: float, backend: str | None
) -> None:
    """Show the holder of each session. PATH is a session file, its .holder sidecar,
    or a directory of sessions. With no PATH, the current directory is scanned (only
    it, not the directories below it).

    A session file that does not exist yet, in a directory that does, is free (shown
    as "free (no file)"); a path whose directory does not exist is an error. A free
    session's PID column names the run that last held it ("last N"); a session held by
    a process outside fencelock (e.g. flock(1)) shows that process, as lslocks does.
    With an etcd backend and no PATH: every holder under its prefix, and how many
    runs wait behind each.

    Exit 0 when nothing is stale, 3 when a stale holder (owner died mid-run) is
    found, 1 when a path cannot be read (this wins over 3).

    JSON objects carry: session, sidecar, state (free, live, stale, unreadable),
    pid, host, lane, run_id, token, phase, acquired_at, heartbeat_at, age,
    heartbeat_age (seconds), stuck, owner_alive, fence_ok, reason (pid to
    heartbeat_age are the record's: the last run's unless a run holds the session
    now), held_by (the pid holding it now, or null), lock_owners (for a holder outside
    fencelock: pid, command, shared).

    \b
    Example:
      fencelock status sessions/ --stuck-after 300
      fencelock status --json sessions/4f1c.jsonl | jq '.[].state'
    """
    from fencelock._errors import SidecarAccessError
    from fencelock._probe import ProbeState, probe, scan

    failed = False

    store = _uses_store(backend)

    def found() -> Iterator[HolderStatus]:
        nonlocal failed
        if store and not paths:
            from fencelock import _backend, _etcd

            url = _backend.selected(backend)
            assert url is not None
            with _library_errors():
                yield from _etcd.list_holders(url, stuck_after)
        for path in paths or (() if store else (".",)):
            if _is_directory_to_scan(path):
                try:
                    with _library_errors():
                        yield from scan(path, stuck_after=stuck_after, backend=backend)
                except SidecarAccessError as e:
                    _error_line(
                        f"{path}: cannot list it: {e.cause.strerror or type(e.cause).__name__}"
                    )
                    failed = True
                continue
            problem = _no_directory(path)
            if problem is not None:
                _error_line(problem)
                failed = True
                continue
            with _library_errors():
                yield probe(path, stuck_after=stuck_after, backend=backend)

    if as_json:
        # Streamed, one object at a time: a directory of 100,000 sessions must not be
        # held in memory. The text is what json.dumps(rows, indent=2) would print.
        stale, unreadable = _stream_status_json(found())
        if failed or unreadable:
            sys.exit(EXIT_ERROR)
        if stale:
            sys.exit(EXIT_STALE)
        return
    rows = list(found())
    now = time.time()
    if rows:
        click.echo(status_table(rows, now, waiters=store))
    elif not failed:
        click.echo("no sessions found")
    for st in rows:
        if st.state is ProbeState.UNREADABLE:
            failed = True
            _error_line(st.reason)
    if failed:
        sys.exit(EXIT_ERROR)
    if any(st.state is ProbeState.STALE for st in rows):
        sys.exit(EXIT_STALE)


def _stream_status_json(rows: Iterator[HolderStatus]) -> tuple[bool, bool]:
    """Print ``status --json``'s array as the rows come; whether any was stale, and
    whether any was unreadable."""
    import json

    from fencelock._probe import ProbeState

    encode = json.JSONEncoder(indent=2).encode  # one encoder: json.dumps makes one a call
    out: list[str] = []
    stale = unreadable = False
    count = 0
    for st in rows:
        stale = stale or st.state is ProbeState.STALE
        unreadable = unreadable or st.state is ProbeState.UNREADABLE
        text = encode(json_safe(status_json(st, time.time()))).replace("\n", "\n  ")
        out.append(("[\n  " if count == 0 else ",\n  ") + text)
        count += 1
        if len(out) >= 256:
            click.echo("".join(out), nl=False)
            out.clear()
    out.append("\n]" if count else "[]")
    click.echo("".join(out))
    return stale, unreadable


# -- clear ------------------------------------------------------------------------------


class _ClearOutcome:
    """What clearing one path did. (A plain class: a dataclass costs startup time.)"""

    def __init__(
        self,
        session: str,
        sidecar: str,
        found: str | None = None,
        record: HolderInfo | None = None,
        *,
        refused: bool = False,
        error: str | None = None,
        reason: str = "",
        holder_text: str = "",
    ) -> None:
        self.session = session
        self.sidecar = sidecar
        self.found = found
        self.record = record
        self.cleared = False
        self.removed = False
        self.set_aside: str | None = None
        self.refused = refused
        self.error = error
        self.reason = reason
        self.holder_text = holder_text

    def to_json(self) -> dict[str, Any]:
        rec = self.record
        return {
            "session": self.session,
            "sidecar": self.sidecar,
            "found": self.found,
            "pid": rec.pid if rec else None,
            "lane": rec.lane if rec else None,
            "token": rec.token if rec else None,
            "cleared": self.cleared,
            "removed": self.removed,
            "set_aside": self.set_aside,
            "refused": self.refused,
            "error": self.error,
            "reason": self.reason,
        }




def _clear_one(path: str, remove: bool, force: bool, backend: str | None = None) -> _ClearOutcome:
    from fencelock._errors import FenceLockError, SessionContendedError
    from fencelock._probe import ProbeState, clear

    try:
        st = clear(path, remove=remove, force=force, backend=backend)
    except SessionContendedError as e:
        from fencelock._errors import describe_holder

        session = e.session
        return _ClearOutcome(
            session, session + _SIDECAR_SUFFIX, "live", e.holder, refused=True, reason=str(e),
            holder_text=describe_holder(e.holder, e.lock_owners),
        )
    except (FenceLockError, OSError) as e:
        from fencelock._sidecar import paths

        message = _os_message(e) if isinstance(e, OSError) else str(e)
        session, sidecar = paths(path)
        return _ClearOutcome(session, sidecar, "unreadable", error=message, reason=message)
    out = _ClearOutcome(st.session, st.sidecar, str(st.state), st.record, reason=st.reason)
    out.cleared = st.state is ProbeState.STALE
    out.removed = st.removed
    out.set_aside = st.set_aside
    return out


class _DirSummary:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.outcomes: list[_ClearOutcome] = []
        self.live = 0


def _clear_directory(
    directory: str, remove: bool, force: bool, backend: str | None = None
) -> _DirSummary:
    from fencelock._probe import ProbeState, scan

    summary = _DirSummary(directory)
    store = _uses_store(backend)
    for st in scan(directory, backend=backend):
        if st.state is ProbeState.LIVE:
            summary.live += 1
            summary.outcomes.append(
                _ClearOutcome(st.session, st.sidecar, "live", st.record, reason="live: left alone")
            )
            continue
        if st.state is ProbeState.FREE and (
            not remove or (not store and not os.path.lexists(st.sidecar))
        ):
            continue
        out = _clear_one(st.session if store else st.sidecar, remove, force, backend)
        if out.refused:
            # Taken by a new run since the scan: it is live, not stale, so left alone.
            summary.live += 1
            continue
        summary.outcomes.append(out)
    return summary


@main.command(name="clear", short_help="Clear stale holder records; never live ones.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@click.option(
    "--remove", is_flag=True, help="Also delete the sidecars of free and cleared sessions."
)
@click.option(
    "--force", is_flag=True, help="Set a corrupt record aside as <sidecar>.corrupt-<time>-<random>."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of what was done.")
@_backend_option
def clear_command(
    paths: tuple[str, ...], remove: bool, force: bool, as_json: bool, backend: str | None
) -> None:
    """Clear stale holder records (the owner died mid-run). Live holders are never
    touched: naming one exits 4. A directory clears every stale sidecar in it and
    leaves live ones alone. Everything happens under the sidecar's own lock.

    Exit 0 done, 4 a named session has a live holder, 1 an error (corrupt or unsafe
    sidecar, missing path); 1 wins over 4.

    JSON objects carry: session, sidecar, found (the state found), pid, lane,
    token, cleared, removed, set_aside, refused, error, reason.

    \b
    Example:
      fencelock clear sessions/4f1c.jsonl
      fencelock clear --remove sessions/
    """
    from fencelock._errors import SidecarAccessError

    show = _PathDisplay()
    report: list[_ClearOutcome] = []
    refused = failed = False
    for path in paths:
        if _is_directory_to_scan(path):
            try:
                with _library_errors():
                    summary = _clear_directory(path, remove, force, backend)
            except SidecarAccessError as e:
                _error_line(f"{path}: cannot list it: {e.cause.strerror or type(e.cause).__name__}")
                failed = True
                continue
            outcomes = summary.outcomes
            if not as_json:
                done = sum(o.cleared for o in outcomes)
                gone = sum(o.removed for o in outcomes)
                text = f"{clean(path)}: cleared {done} stale, left {summary.live} live alone"
                click.echo(text + (f", removed {_plural(gone, 'sidecar')}" if remove else ""))
        else:
            problem = _no_directory(path)
            if problem is not None:
                from fencelock._sidecar import paths as _paths

                session, sidecar = _paths(path)
                outcomes = [_ClearOutcome(session, sidecar, None, error=problem, reason=problem)]
            else:
                outcomes = [_clear_one(path, remove, force, backend)]
        for out in outcomes:
            report.append(out)
            refused |= out.refused
            if out.error is not None:
                failed = True
                _error_line(out.error)
            elif out.refused:
                _error_line(f"{out.session}: not cleared: held by {out.holder_text}")
            elif not as_json:
                click.echo(f"{show(out.session)}: {clean(out.reason)}")
    if as_json:
        _echo_json([o.to_json() for o in report])
    if failed:
        sys.exit(EXIT_ERROR)
    if refused:
        sys.exit(EXIT_CONTENDED)


# -- run --------------------------------------------------------------------------------


def _in_terminal_foreground() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP before ``run`` held the session: stop, as with Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalForwarder:
    """Owns SIGINT, SIGTERM and SIGHUP for the whole of ``run``, so that no signal ever
    kills it with the default action while it holds the session.

    Installed before the acquire. While waiting for the session a signal stops the
    wait (`_Stopped`, which unwinds the acquire). From `hold` on, a signal is kept
    until the command runs and is then passed on to it, so the hold outlives the
    command and the release always happens. Python runs these handlers in the main
    thread between bytecodes, so the command starts with the caller's signal mask.
    """

    def __init__(self) -> None:
        import signal

        self.proc: subprocess.Popen[bytes] | None = None
        self.holding = False
        self.pending: list[int] = []
        self.sigint = signal.SIGINT
        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in forwarded}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.holding:
            raise _Stopped(signum)
        if self.proc is None:
            self.pending.append(signum)
            return
        # Ctrl-C goes to the whole foreground process group, the command included;
        # a second copy could interrupt the command's own clean-up.
        if signum == self.sigint and _in_terminal_foreground():
            return
        self.proc.send_signal(signum)

    def hold(self) -> None:
        """The session is held: from now on signals wait for the command."""
        self.holding = True

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        for sig in self.pending:
            proc.send_signal(sig)

    def restore(self) -> None:
        import signal

        self.holding = True  # a signal between these calls must not raise any more
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Heartbeat:
    """Refreshes the record's heartbeat while the command runs, so it is not 'stuck'."""

    def __init__(self, lock: SessionLock, every: float) -> None:
        import threading

        self.lock = lock
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fencelock-heartbeat", daemon=True)
        if 0 < every < threading.TIMEOUT_MAX:  # 0 or inf: never
            self.thread.start()

    def _run(self) -> None:
        from fencelock._errors import FenceLockError

        while not self.stop.wait(self.every):
            try:
                self.lock.touch()
            except (FenceLockError, OSError) as e:
                _error_line(f"heartbeat not refreshed: {e}")

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _spawn(command: Sequence[str], env: dict[str, str], lock_fd: int) -> subprocess.Popen[bytes]:
    import subprocess

    name = command[0]
    # Like flock(1), the command inherits the caller's open descriptors (`3<file`) and
    # the lock's own: a flock lock belongs to the open file description, so the
    # session stays held while the command (or anything it leaves running with the
    # descriptor) lives, even if this process is killed. fencelock's other
    # descriptors are close-on-exec. Nothing else runs in this process meanwhile (the
    # heartbeat starts after), so no other child can inherit the lock by accident.
    if lock_fd >= 0:
        os.set_inheritable(lock_fd, True)
    try:
        return subprocess.Popen(list(command), env=env, close_fds=False)
    except FileNotFoundError:
        raise CommandNotFoundError(f"{name}: command not found") from None
    except PermissionError:
        raise CommandNotExecutableError(f"{name}: permission denied") from None
    except OSError as e:
        raise CommandNotExecutableError(f"{name}: cannot run it: {e.strerror}") from None
    finally:
        if lock_fd >= 0:
            os.set_inheritable(lock_fd, False)


def _run_held(
    lock: SessionLock,
    info: HolderInfo,
    command: Sequence[str],
    beat: float,
    forwarder: _SignalForwarder,
    keeper: _etcdkeeper.Keeper | None = None,
) -> int:
    from fencelock._errors import FenceLockError

    lock_fd = lock._shared_fd() if keeper is None else keeper.command_fd
    env = dict(os.environ)
    env.update(
        FENCELOCK_SESSION=lock.session,
        FENCELOCK_LANE=lock.lane,
        FENCELOCK_TOKEN=str(info.token),
        FENCELOCK_RUN_ID=info.run_id,
    )
    if lock_fd >= 0:  # a sidecar's lock; a store's holder (etcd) has no descriptor
        env["FENCELOCK_FD"] = str(lock_fd)
    if forwarder.pending:
        return 128 + forwarder.pending[0]
    proc = _spawn(command, env, lock_fd)
    forwarder.attach(proc)
    try:
        lock._name_command(proc.pid)
    except (FenceLockError, OSError) as e:
        _error_line(f"{lock.session}: the record does not name the command: {e}")
    heartbeat = _Heartbeat(lock, beat)
    try:
        code = proc.wait()
    finally:
        heartbeat.close()
    return 128 - code if code < 0 else code


@main.command(short_help="Hold SESSION while COMMAND runs, like flock(1).")
@click.argument("session", type=click.Path(readable=False))
@click.option("--lane", required=True, help="The lane name recorded in the holder record.")
@click.option("--no-wait", "-n", is_flag=True, help="Exit 4 at once if the session is held.")
@click.option(
    "--timeout",
    "-w",
    type=SECONDS,
    metavar="SECONDS",
    help="Give up (exit 4) after waiting this long for the holder.",
)
@click.option(
    "--heartbeat",
    type=SECONDS,
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh the record's heartbeat this often while COMMAND runs; 0 never.",
)
@_backend_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    session: str,
    lane: str,
    no_wait: bool,
    timeout: float | None,
    heartbeat: float,
    backend: str | None,
    command: tuple[str, ...],
) -> None:
    """Hold SESSION while COMMAND runs, like flock(1). Put `--` before COMMAND.

    Exits with COMMAND's exit code (128+N when it was killed by signal N, 126 when
    it cannot be executed, 127 when it was not found), or 4 when the session is held
    by a live run (with --no-wait,
    or after --timeout); the holder is named on stderr. COMMAND gets
    FENCELOCK_SESSION, FENCELOCK_LANE, FENCELOCK_TOKEN, FENCELOCK_RUN_ID and
    FENCELOCK_FD in its environment. SIGINT, SIGTERM and SIGHUP are passed on to
    COMMAND (Ctrl-C on a terminal already reaches it); one that comes before COMMAND
    starts stops the run (128+N). As with flock(1), COMMAND inherits the lock's
    descriptor (FENCELOCK_FD): the session stays held while COMMAND, or anything it
    left running with that descriptor, lives, even if fencelock itself is killed.
    When COMMAND ends the record says released, and the session is free once nothing
    holds the descriptor any more.

    \b
    Example:
      fencelock run sessions/4f1c.jsonl --lane cron:nightly --timeout 30 -- ./job.sh
    """
    from fencelock import _etcdkeeper
    from fencelock._errors import FenceLockError
    from fencelock._lock import SessionLock

    _one_session(session, "run")
    try:
        with _library_errors():
            lock = SessionLock(
                session, lane, on_contention="fail" if no_wait else "wait", timeout=timeout,
                backend=backend,
            )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--lane'") from None
    # Installed before the acquire: a signal that lands once the lock is taken must
    # never kill this process with the default action (that would leave a stale record).
    forwarder: _SignalForwarder | None = None
    keeper: _etcdkeeper.Keeper | None = None
    try:
        forwarder = _SignalForwarder()
        try:
            with _library_errors():
                info = lock.acquire()
            forwarder.hold()
            # A holder in etcd: a keeper process stands in for the shared descriptor.
            keeper = _etcdkeeper.start(lock)
            code = _run_held(lock, info, command, heartbeat, forwarder, keeper)
        finally:
            forwarder.hold()
            if keeper is not None and lock.held:
                try:
                    keeper.release(lock)
                except (FenceLockError, OSError) as e:
                    _error_line(f"{lock.session}: release: {e}")
            elif lock.held:
                try:
                    # Without unlocking: what the command left running keeps the session.
                    lock._release_shared()
                except (FenceLockError, OSError) as e:
                    _error_line(f"{lock.session}: release: {e}")
    except _Stopped as e:  # before the command started: nothing is held any more
        code = 128 + e.signum
    finally:
        # Kept until after the release, so a late SIGTERM cannot leave a stale record.
        if forwarder is not None:
            forwarder.restore()
    sys.exit(code)


# -- hold -------------------------------------------------------------------------------


@main.command(short_help="Hold SESSION for another process, over JSON lines.")
@click.argument("session", type=click.Path(readable=False))
@click.option("--lane", required=True, help="The lane name recorded in the holder record.")
@click.option("--no-wait", "-n", is_flag=True, help="Exit 4 at once if the session is held.")
@click.option(
    "--timeout",
    "-w",
    type=SECONDS,
    metavar="SECONDS",
    help="Give up (exit 4) after waiting this long for the holder.",
)
@click.option(
    "--heartbeat",
    type=SECONDS,
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh the record's heartbeat after this long without a request; 0 never.",
)
@click.option("--backend", metavar="URL", help="The holder store (etcd://...); default: sidecar.")
def hold(
    session: str,
    lane: str,
    no_wait: bool,
    timeout: float | None,
    heartbeat: float,
    backend: str | None,
) -> None:
    """Hold SESSION for the process at the other end of stdin and stdout.

    Prints {"ok": true, "event": "held", "record": {...}} once held, then answers each
    JSON request line on stdin ({"op": "append", "entry": {...}}, "prompt_begin",
    "prompt_end", "touch", "verify", "info", "release") with one JSON line. Release,
    or end of stdin, releases the session and exits 0. Contended (--no-wait, or past
    --timeout): {"ok": false, "error": "SessionContendedError", ...} and exit 4.
    docs/PROTOCOL.md has the whole protocol.

    \b
    Example:
      coproc HOLD { fencelock hold sessions/4f1c.jsonl --lane cron:nightly; }
    """
    from fencelock._hold import HoldArgumentError
    from fencelock._hold import main as hold_main

    try:
        code = hold_main(
            session, lane, no_wait=no_wait, timeout=timeout, heartbeat=heartbeat,
            backend=backend,
        )
    except HoldArgumentError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.option}'") from None
    sys.exit(code)


# -- wait -------------------------------------------------------------------------------


def _progress(session: str, since: float, show: _PathDisplay, backend: str | None) -> str:
    import shutil

    from fencelock._probe import probe

    st = probe(session, backend=backend)
    rec = _held_record(st)
    who = (clean(_holder_text(st)) if rec is None
           else f"pid {rec.pid} (lane {clean(repr(rec.lane))})")
    held = "" if rec is None else f" for {human_age(time.time() - rec.acquired_at)}"
    waited = human_age(time.monotonic() - since)
    # Who and how long come first: a long path is what gets cut at the terminal's edge.
    line = f"held by {who}{held}; waited {waited} for {show(session)}"
    width = shutil.get_terminal_size().columns - 1
    return _shorten(line, max(width, 20))


def _wait_with_progress(
    session: str, wait_free: Any, timeout: float | None, backend: str | None
) -> bool:
    """Wait in a helper thread (one, however long it takes) and redraw a status line."""
    import threading

    result: list[bool] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def waiter() -> None:
        try:
            result.append(wait_free(timeout))
        except BaseException as e:  # handed to the main thread
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=waiter, name="fencelock-wait", daemon=True).start()
    start = time.monotonic()
    show = _PathDisplay()
    try:
        while not done.wait(1.0):
            click.echo("\r\x1b[K" + _progress(session, start, show, backend), nl=False,
                       err=True)
    finally:
        click.echo("\r\x1b[K", nl=False, err=True)
    if failure:
        raise failure[0]
    return result[0]


@main.command(short_help="Wait until SESSION has no live holder.")
@click.argument("session", type=click.Path(readable=False))
@click.option(
    "--timeout",
    "-w",
    type=SECONDS,
    metavar="SECONDS",
    help="Give up (exit 4) after this long. Default: wait for ever.",
)
@_backend_option
def wait(session: str, timeout: float | None, backend: str | None) -> None:
    """Wait until SESSION has no live holder. Exit 0 when free (or stale), 4 when
    --timeout passes first, naming the holder. On a terminal a progress line shows
    who holds it and for how long. A process outside fencelock that holds the
    sidecar's lock, even a shared one (flock -s), is a live holder too.

    \b
    Example:
      fencelock wait sessions/4f1c.jsonl --timeout 120 && ./reply.sh
    """
    from functools import partial

    from fencelock._probe import ProbeState, probe
    from fencelock._store import open_store
    from fencelock._wait import wait_until_unlocked

    _one_session(session, "wait")
    with _library_errors():
        st = probe(session, backend=backend)
        if st.state is ProbeState.UNREADABLE:
            raise CliError(st.reason)
        if st.state is not ProbeState.LIVE:
            return
        store = open_store(backend, st.session)
        wait_free = store.wait_free if store is not None else partial(
            wait_until_unlocked, st.sidecar)
        try:
            if sys.stderr.isatty():
                free = _wait_with_progress(st.session, wait_free, timeout, backend)
            else:
                free = wait_free(timeout)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        if not free:
            holder = _holder_text(probe(session, backend=backend))
            raise ContendedCliError(f"{st.session}: still held by {holder} after {timeout:g}s")


# -- recover ----------------------------------------------------------------------------


@main.command(name="recover", short_help="Print the session to use after a stuck run.")
@click.argument("session", type=click.Path(readable=False))
@click.option(
    "--wait",
    "wait_s",
    type=SECONDS,
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for a live holder to let go.",
)
@click.option("--no-fresh", is_flag=True, help="Exit 4 instead of starting a fresh session.")
@click.option("--lane", default="recovery", show_default=True, help="Lane of a fresh session.")
@click.option("--json", "as_json", is_flag=True, help="Print what was decided as JSON.")
@_backend_option
def recover_command(
    session: str, wait_s: float, no_fresh: bool, lane: str, as_json: bool, backend: str | None
) -> None:
    """The safe stuck-session recovery step: never re-fire on a session a run still
    holds. Prints the session to use: SESSION itself when it is free (a stale record
    is cleared), or a fresh session beside it carrying the old transcript's complete
    lines. Exit 0, or 4 when still held and --no-fresh.

    A session file that does not exist yet (its directory does) is free: it is
    printed as it is (refire).

    JSON: action (refire or fresh), session, original, waited, carried_lines,
    holder (what was found: an object of the same shape as status --json gives).
    Still held with --no-fresh: action and session null, and error says why.

    \b
    Example:
      next=$(fencelock recover sessions/4f1c.jsonl --wait 10)
    """
    from fencelock._errors import SessionContendedError
    from fencelock._lock import SessionLock
    from fencelock._probe import probe
    from fencelock._recovery import recover

    _one_session(session, "recover")
    try:
        SessionLock.check_lane(lane)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--lane'") from None
    with _library_errors():
        try:
            r = recover(session, wait=wait_s, fresh=not no_fresh, lane=lane, backend=backend)
        except SessionContendedError as e:
            if as_json:  # still held with --no-fresh: say so on stdout too
                _echo_json({
                    "action": None, "session": None, "original": e.session,
                    "waited": None if e.waited is None else round(e.waited, 3),
                    "carried_lines": 0, "error": str(e),
                    "holder": status_json(probe(e.session), time.time()),
                })
            raise
    if as_json:
        obj = {
            "action": str(r.action),
            "session": r.session,
            "original": r.holder.session,
            "waited": round(r.waited, 3),
            "carried_lines": r.carried_lines,
            "error": None,
            "holder": status_json(r.holder, time.time()),
        }
        _echo_json(obj)
    elif sys.stdout.isatty():
        click.echo(clean(r.session))
    else:
        # The real bytes for `next=$(fencelock recover S)`: escaping would name a
        # path that does not exist.
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(r.session) + b"\n")
        sys.stdout.buffer.flush()


# -- verify -----------------------------------------------------------------------------


@main.command(name="verify", short_help="Check SESSION for torn lines and bad tokens.")
@click.argument("session", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(session: str, as_json: bool) -> None:
    """Check SESSION's lines: torn lines (not JSON, or no final line break) and
    fencing tokens that went backwards (a write by a run that had lost the session) or
    were stamped by two runs.
    Exit 0 clean, 5 problems found, 1 unreadable.

    A session file that does not exist yet (its directory does) has no lines: it is
    clean, and the report says it does not exist.

    JSON: session, exists, lines, stamped, max_token, ok, problems (line, kind,
    detail).

    \b
    Example:
      fencelock verify sessions/4f1c.jsonl
    """
    from fencelock._verify import verify

    _one_session(session, "verify")
    with _library_errors():
        report = verify(session)
    if as_json:
        obj = {
            "session": report.session,
            "exists": report.exists,
            "lines": report.lines,
            "stamped": report.stamped,
            "max_token": report.max_token,
            "ok": report.ok,
            "problems": [
                {"line": p.line, "kind": p.kind, "detail": p.detail} for p in report.problems
            ],
        }
        _echo_json(obj)
    else:
        name = clean(session)
        for p in report.problems:
            click.echo(f"{name}:{p.line}: {p.kind}: {clean(p.detail)}")
        verdict = "ok" if report.ok else _plural(len(report.problems), "problem")
        missing = "" if report.exists else "no such file yet, "
        click.echo(
            f"{name}: {missing}{_plural(report.lines, 'line')}, {report.stamped} stamped, "
            f"max token {report.max_token}: {verdict}"
        )
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


# -- check-config -----------------------------------------------------------------------


@main.command(name="check-config", short_help="Warn about heartbeats that share sessions.")
@click.argument("file", type=click.Path(readable=False))
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings.")
def check_config(file: str, strict: bool) -> None:
    """Warn for each agent whose heartbeat is not `isolatedSession: true` in a
    gateway config (JSON or JSON5): its heartbeat lane then shares the session file
    with the channel and direct lanes. Heartbeats merge over agents.defaults.heartbeat;
    disabled heartbeats are not warned about. As in the gateway, once any listed agent
    has a heartbeat block of its own, agents without one run no heartbeat (the
    explicit-only rule): a notice names each agent the defaults would otherwise reach.
    Exit 0 (1 with --strict and warnings), 1 for an unreadable or malformed file.

    \b
    Example:
      fencelock check-config ~/.openclaw/openclaw.json --strict
    """
    from fencelock._config import review_file

    with _library_errors():
        report = review_file(file)
    warnings = report.warnings
    name = clean(file)
    for w in warnings:
        click.echo(f"{name}: warning: {clean(w.message)}")
    for n in report.notices:
        click.echo(f"{name}: notice: {clean(n.message)}")
    if not warnings:
        click.echo(f"{name}: ok: every agent heartbeat is isolated or off")
    elif strict:
        raise CliError(f"{file}: {_plural(len(warnings), 'warning')} and --strict")
