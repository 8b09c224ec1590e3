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

    click.echo(json.dumps(obj, indent=2))


def _error_line(message: str) -> None:
    click.echo(f"Error: {clean(message)}", err=True)


def _holder_text(holder: HolderInfo | None) -> str:
    if holder is None:
        return "a live holder whose record could not be read"
    return f"pid {holder.pid} on {holder.host} (lane {holder.lane!r}, token {holder.token})"


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
        "fence_ok": st.fence_ok,
        "reason": st.reason,
        "waiters": st.waiters,
    }


_STATE_COLOURS = {"live": "green", "stale": "red", "unreadable": "magenta"}
_HEADER = ("SESSION", "STATE", "PID", "HOST", "LANE", "AGE", "HEARTBEAT", "TOKEN", "FENCE")


def _status_cells(st: HolderStatus, now: float, show: _PathDisplay) -> list[str]:
    from fencelock._probe import ProbeState

    rec = st.record
    state = "live (stuck)" if st.stuck else str(st.state)
    if rec is None:
        return [show(st.session), state, "-", "-", "-", "-", "-", "-", "-"]
    # A released record describes a past run: its ages would read as if it still ran.
    past = st.state is ProbeState.FREE
    # After a clean release anyone may write the session, so a moved fence means nothing.
    fence = "-" if past else {True: "ok", False: "moved", None: "-"}[st.fence_ok]
    return [
        show(st.session),
        state,
        str(rec.pid),
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


def _missing(st: HolderStatus) -> bool:
    """Neither the session file nor its sidecar exists: most likely a mistyped path."""
    from fencelock._probe import ProbeState

    return st.state is ProbeState.FREE and st.record is None and _nothing_at(st.session)


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


@main.command()
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
    or a directory of sessions (default: the current directory). With an etcd
    backend and no PATH: every holder under its prefix, and how many wait behind it.

    Exit 0 when nothing is stale, 3 when a stale holder (owner died mid-run) is
    found, 1 when a path cannot be read (this wins over 3).

    JSON objects carry: session, sidecar, state (free, live, stale, unreadable),
    pid, host, lane, run_id, token, phase, acquired_at, heartbeat_at, age,
    heartbeat_age (seconds), stuck, owner_alive, fence_ok, reason.

    \b
    Example:
      fencelock status sessions/ --stuck-after 300
      fencelock status --json sessions/4f1c.jsonl | jq '.[].state'
    """
    from fencelock._errors import SidecarAccessError
    from fencelock._probe import ProbeState, probe, scan

    rows: list[HolderStatus] = []
    failed = False
    store = _uses_store(backend)
    if store and not paths:
        from fencelock import _backend, _etcd

        url = _backend.selected(backend)
        assert url is not None
        with _library_errors():
            rows.extend(_etcd.list_holders(url, stuck_after))
    for path in paths or (() if store else (".",)):
        if _is_directory_to_scan(path):
            try:
                with _library_errors():
                    rows.extend(scan(path, stuck_after=stuck_after, backend=backend))
            except SidecarAccessError as e:
                _error_line(f"{path}: cannot list it: {e.cause.strerror or type(e.cause).__name__}")
                failed = True
            continue
        with _library_errors():
            st = probe(path, stuck_after=stuck_after, backend=backend)
        if _missing(st):
            _error_line(f"{path}: no such session file or sidecar")
            failed = True
            continue
        rows.append(st)
    now = time.time()
    if as_json:
        _echo_json([status_json(st, now) for st in rows])
    elif rows:
        click.echo(status_table(rows, now, waiters=store))
    elif not failed:
        click.echo("no sessions found")
    for st in rows:
        if st.state is ProbeState.UNREADABLE:
            failed = True
            if not as_json:
                _error_line(st.reason)
    if failed:
        sys.exit(EXIT_ERROR)
    if any(st.state is ProbeState.STALE for st in rows):
        sys.exit(EXIT_STALE)


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
        session = e.session
        return _ClearOutcome(
            session, session + _SIDECAR_SUFFIX, "live", e.holder, refused=True, reason=str(e)
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


@main.command(name="clear")
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@click.option(
    "--remove", is_flag=True, help="Also delete the sidecars of free and cleared sessions."
)
@click.option(
    "--force", is_flag=True, help="Set a corrupt record aside as <sidecar>.corrupt-<time>."
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
                click.echo(text + (f", removed {gone} sidecars" if remove else ""))
        else:
            if _nothing_at(path) and not _uses_store(backend):
                from fencelock._sidecar import paths as _paths

                message = f"{path}: no such session file or sidecar"
                session, sidecar = _paths(path)
                outcomes = [_ClearOutcome(session, sidecar, None, error=message, reason=message)]
            else:
                outcomes = [_clear_one(path, remove, force, backend)]
        for out in outcomes:
            report.append(out)
            refused |= out.refused
            if out.error is not None:
                failed = True
                _error_line(out.error)
            elif out.refused:
                _error_line(f"{out.session}: not cleared: held by {_holder_text(out.record)}")
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


class _SignalForwarder:
    """Passes SIGINT, SIGTERM and SIGHUP on to the command, so the hold outlives it."""

    def __init__(self) -> None:
        import signal

        self.proc: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []
        self.sigint = signal.SIGINT
        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in forwarded}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None:
            self.pending.append(signum)
            return
        # Ctrl-C goes to the whole foreground process group, the command included;
        # a second copy could interrupt the command's own clean-up.
        if signum == self.sigint and _in_terminal_foreground():
            return
        self.proc.send_signal(signum)

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        for sig in self.pending:
            proc.send_signal(sig)

    def restore(self) -> None:
        import signal

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


def _spawn(command: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    import subprocess

    name = command[0]
    try:
        # Like flock(1), the command inherits the caller's open descriptors (`3<file`);
        # fencelock's own, the sidecar's included, are close-on-exec, so the command
        # can never hold or drop the lock itself.
        return subprocess.Popen(list(command), env=env, close_fds=False)
    except FileNotFoundError:
        raise CommandNotFoundError(f"{name}: command not found") from None
    except PermissionError:
        raise CommandNotExecutableError(f"{name}: permission denied") from None
    except OSError as e:
        raise CommandNotExecutableError(f"{name}: cannot run it: {e.strerror}") from None


def _run_held(
    lock: SessionLock,
    info: HolderInfo,
    command: Sequence[str],
    beat: float,
    forwarder: _SignalForwarder,
) -> int:
    env = dict(os.environ)
    env.update(
        FENCELOCK_SESSION=lock.session,
        FENCELOCK_LANE=lock.lane,
        FENCELOCK_TOKEN=str(info.token),
        FENCELOCK_RUN_ID=info.run_id,
    )
    if forwarder.pending:
        return 128 + forwarder.pending[0]
    proc = _spawn(command, env)
    forwarder.attach(proc)
    heartbeat = _Heartbeat(lock, beat)
    try:
        code = proc.wait()
    finally:
        heartbeat.close()
    return 128 - code if code < 0 else code


@main.command()
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
    FENCELOCK_SESSION, FENCELOCK_LANE, FENCELOCK_TOKEN and FENCELOCK_RUN_ID in its
    environment. SIGINT, SIGTERM and SIGHUP are passed on to COMMAND (Ctrl-C on a
    terminal already reaches it), and the session is released once COMMAND ends.

    \b
    Example:
      fencelock run sessions/4f1c.jsonl --lane cron:nightly --timeout 30 -- ./job.sh
    """
    from fencelock._errors import FenceLockError
    from fencelock._lock import SessionLock

    try:
        lock = SessionLock(
            session, lane, on_contention="fail" if no_wait else "wait", timeout=timeout,
            backend=backend,
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--lane'") from None
    try:
        with _library_errors():
            info = lock.acquire()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    try:
        # Installed only now: while waiting for the lock, Ctrl-C must stop the wait.
        forwarder = _SignalForwarder()
        try:
            code = _run_held(lock, info, command, heartbeat, forwarder)
        finally:
            try:
                lock.release()
            except (FenceLockError, OSError) as e:
                _error_line(f"{lock.session}: release: {e}")
            # Kept until after the release, so a late SIGTERM cannot leave a stale record.
            forwarder.restore()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


# -- wait -------------------------------------------------------------------------------


def _progress(session: str, since: float, show: _PathDisplay, backend: str | None) -> str:
    import shutil

    from fencelock._probe import probe

    st = probe(session, backend=backend)
    rec = st.record
    who = "a holder" if rec is None else f"pid {rec.pid} (lane {clean(repr(rec.lane))})"
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


@main.command()
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
    who holds it and for how long.

    \b
    Example:
      fencelock wait sessions/4f1c.jsonl --timeout 120 && ./reply.sh
    """
    from functools import partial

    from fencelock._probe import ProbeState, probe
    from fencelock._store import open_store
    from fencelock._wait import wait_until_unlocked

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
            holder = probe(session, backend=backend).record
            raise ContendedCliError(
                f"{st.session}: still held by {_holder_text(holder)} after {timeout:g}s"
            )


# -- recover ----------------------------------------------------------------------------


@main.command(name="recover")
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

    JSON: action (refire or fresh), session, original, waited, carried_lines,
    holder (a status object). Still held with --no-fresh: action and session null,
    error, and holder as the live record.

    \b
    Example:
      next=$(fencelock recover sessions/4f1c.jsonl --wait 10)
    """
    from fencelock._errors import SessionContendedError
    from fencelock._recovery import recover

    with _library_errors():
        try:
            r = recover(session, wait=wait_s, fresh=not no_fresh, lane=lane, backend=backend)
        except SessionContendedError as e:
            if as_json:  # still held with --no-fresh: say so on stdout too
                _echo_json({
                    "action": None, "session": None, "original": e.session,
                    "waited": None if e.waited is None else round(e.waited, 3),
                    "carried_lines": 0, "error": str(e),
                    "holder": None if e.holder is None else e.holder.to_json(),
                })
            raise
    if as_json:
        obj = {
            "action": str(r.action),
            "session": r.session,
            "original": r.holder.session,
            "waited": round(r.waited, 3),
            "carried_lines": r.carried_lines,
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


@main.command(name="verify")
@click.argument("session", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(session: str, as_json: bool) -> None:
    """Check SESSION's lines: torn lines (not JSON, or no final line break) and
    fencing tokens that went backwards (a write by a run that had lost the session) or
    were stamped by two runs.
    Exit 0 clean, 5 problems found, 1 unreadable.

    JSON: session, lines, stamped, max_token, ok, problems (line, kind, detail).

    \b
    Example:
      fencelock verify sessions/4f1c.jsonl
    """
    from fencelock._verify import verify

    with _library_errors():
        report = verify(session)
    if as_json:
        obj = {
            "session": report.session,
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
        verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{name}: {report.lines} lines, {report.stamped} stamped, "
            f"max token {report.max_token}: {verdict}"
        )
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


# -- check-config -----------------------------------------------------------------------


@main.command(name="check-config")
@click.argument("file", type=click.Path(readable=False))
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings.")
def check_config(file: str, strict: bool) -> None:
    """Warn for each agent whose heartbeat is not `isolatedSession: true` in a
    gateway config (JSON or JSON5): its heartbeat lane then shares the session file
    with the channel and direct lanes. Each agent's heartbeat inherits
    agents.defaults.heartbeat; disabled heartbeats are not warned about.
    Exit 0 (1 with --strict and warnings), 1 for an unreadable or malformed file.

    \b
    Example:
      fencelock check-config ~/.openclaw/openclaw.json --strict
    """
    from fencelock._config import check_file

    with _library_errors():
        warnings = check_file(file)
    name = clean(file)
    for w in warnings:
        click.echo(f"{name}: warning: {clean(w.message)}")
    if not warnings:
        click.echo(f"{name}: ok: every agent heartbeat is isolated or off")
    elif strict:
        raise CliError(f"{file}: {len(warnings)} warning(s) and --strict")
