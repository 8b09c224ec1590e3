"""The ``fencelock`` command line: a thin click layer over the library.

Each command parses its arguments, calls the library and formats what it returns. Exit
codes: 0 fine, 1 an error (a path that cannot be read, a corrupt record, a bad
config), 2 usage, 3 stale holders found, 4 a live holder in the way, 5 a session
with problems; ``run`` passes its command's own code through.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from fencelock import __version__, _platform
from fencelock._ages import human_age
from fencelock._constants import (
    DEFAULT_STUCK_AFTER,
    EXIT_CLOSED_PIPE,
    EXIT_CONTENDED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_PROBLEMS,
    EXIT_STALE,
    EXIT_USAGE,
    NO_WORKING_DIRECTORY,
    SIDECAR_SUFFIX,
)
from fencelock._output import (
    CliError,
    ContendedCliError,
    OutputError,
    PathDisplay,
    StatusTable,
    answer_goes_to_stdout,
    clean,
    echo_json,
    error_line,
    held_record,
    holder_text,
    is_sidecar,
    json_element,
    library_errors,
    os_message,
    out,
    out_bytes,
    plain_warnings,
    plural,
    shorten,
    standard_streams,
    status_json,
    stream_json_array,
    stream_status_json,
)

# Startup time matters for a command line: the library and the heavier standard modules
# are imported inside the commands that use them, so `--version` and `--help` load none
# of the library and `status` loads only what probing needs. (`_constants` and
# `_output` import nothing of the library.)
if TYPE_CHECKING:
    from fencelock._probe import HolderStatus
    from fencelock._record import HolderInfo


def _is_directory_to_scan(path: str) -> bool:
    """A directory whose sessions to scan. A symlink named like a session or sidecar
    is not followed into a directory: another user may have planted it (`*.jsonl` in a
    shared directory expands to it), and it is reported as the session path it names."""
    if not _is_dir(path) or is_sidecar(path):
        return False
    return not (path.rstrip("/").endswith(".jsonl") and os.path.islink(path.rstrip("/")))


def _is_dir(path: str) -> bool:
    """`os.path.isdir`, also for a relative path in a working directory this user may
    not search (``.`` itself needs that): looked at from the root, where only the
    directories above it must be searchable, so that ``status`` there says it cannot
    list the directory instead of taking it for a session file."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except PermissionError:
        if os.path.isabs(path) or ".." in path.split(os.sep):
            return False  # ('..' after a symlink is not what a lexical join makes of it)
        try:
            return os.path.isdir(os.path.normpath(os.path.join(os.getcwd(), path)))
        except OSError:
            return False
    except (OSError, ValueError):
        return False


def _no_directory(path: str) -> str | None:
    """The error for a session path whose directory does not exist, else None.

    Every command refuses such a path the same way. (A missing session file in an
    existing directory is a session no run has started yet: free and empty.)
    """
    from fencelock._errors import FenceLockError
    from fencelock._sidecar import names_a_directory, normal

    named = names_a_directory(path)  # "DIR/" names the directory itself
    try:
        directory = normal(path) if named else os.path.dirname(normal(path))
    except FileNotFoundError:  # a relative path, and the working directory was removed
        return f"{path}: No such file or directory; {NO_WORKING_DIRECTORY}"
    except FenceLockError as e:  # a `..` through another user's symlink, say
        return str(e)
    try:
        os.stat(directory)
    except (FileNotFoundError, NotADirectoryError) as e:
        what = "does not exist" if isinstance(e, FileNotFoundError) else "is not a directory"
        its = "directory" if named else "its directory"
        if named and os.path.isdir(os.path.dirname(directory)):
            # "sessions/x.jsonl/": the '/' may be the mistake, not a missing directory.
            return (f"{path}: {its} {directory} {what}; check the path (without the "
                    "trailing '/' it names a session file), or create the directory")
        if path.startswith("~"):  # from a unit file or a config, where no shell expands it
            return (f"{path}: {its} {directory} {what}; '~' is the shell's to expand: "
                    f"give the home directory's path")
        return f"{path}: {its} {directory} {what}; check the path, or create it"
    except OSError:
        return None  # there may be something; let the library name the cause
    return None


def _one_session(path: str, command: str) -> None:
    """Refuse, in one line, a path that cannot name one session for ``command``."""
    problem = _no_directory(path)
    if problem is not None:
        raise CliError(problem)
    if _is_directory_to_scan(path):
        from fencelock._errors import shell_word

        raise CliError(
            f"{path}: is a directory; {command} takes one session file "
            f"(fencelock status {shell_word(path)} lists the sessions in it)"
        )


# -- the group ------------------------------------------------------------------------

_TABLE_CHUNK = 1000
"""Lines of `status`'s table printed at a time."""

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


class _Group(click.Group):
    """The command group, with two last guards: an error writing output that no command
    turned into a message (``--help`` or ``--version`` into a full disk: click itself
    handles only a closed pipe) is one line on stderr and exit 1, not a traceback; and
    a Ctrl-C that no command turned into its signal's exit (one that lands before
    ``run`` or ``hold`` set their handlers, say) ends it quietly with 130, as one does
    while the command loads (`fencelock._entry`), not click's "Aborted!" and 1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # No command given: the help, on stderr, and exit 2 (a usage error), whichever
        # click runs it (before 8.2, click printed it on stdout and exited 0).
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), err=True, color=ctx.color)
            ctx.exit(EXIT_USAGE)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as e:
            if e.option_name.startswith("--"):
                raise
            raise click.NoSuchOption(  # "-d" of "-dash.jsonl", say
                e.option_name, e.message.rstrip(".") + " (a path that starts with '-' is "
                "written ./-NAME)", e.possibilities, e.ctx) from None
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # Standard output's reader left (`| head`): end quietly, with what a shell
            # shows for a command SIGPIPE ended, not click's 1 (which `status` gives a
            # path it cannot read). What is still buffered goes nowhere.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            sys.exit(EXIT_CLOSED_PIPE)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standard_streams()
        try:
            return super().main(*args, **kwargs)
        except RuntimeError as e:
            if "can't start new thread" not in str(e):
                raise
            from fencelock._errors import NO_THREAD

            click.echo(f"Error: cannot start a thread: the system refused {NO_THREAD}",
                       err=True)
            sys.exit(EXIT_ERROR)
        except OSError as e:
            message = os_message(e)
            if _raised_by_echo(e):
                message = (f"cannot write its output: {e.strerror or e}; check where "
                           "standard output goes (a full disk or a closed device)")
            click.echo(f"Error: {clean(message)}", err=True)
            sys.exit(EXIT_ERROR)


def _raised_by_echo(e: BaseException) -> bool:
    """Whether ``e`` came from click printing (its help or version text)."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "echo" and code.co_filename.endswith(("click/utils.py",
                                                                "click\\utils.py")):
            return True
        tb = tb.tb_next
    return False


@click.group(
    cls=_Group,
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
    plain_warnings()


class _PathArgument(click.Path):
    """A path argument: the empty string (an unset shell variable, ``"$S"``) is a usage
    error, not the working directory."""

    def __init__(self) -> None:
        super().__init__(readable=False)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if value == "":
            self.fail("an empty path names nothing (is a shell variable unset?)", param, ctx)
        return super().convert(value, param, ctx)


PATH = _PathArgument()


_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0))
"""Units a duration may be given in (``90s``, ``10m``, ``1.5h``), longest suffix first."""


class _Seconds(click.ParamType):  # type: ignore[type-arg]
    """A number of seconds >= 0, or a duration with a unit (`_UNITS`: ``10m``); "inf"
    means no limit. NaN is a usage error. With ``least``, a value other than 0 must be
    at least that."""

    name = "seconds"

    def __init__(self, least: float = 0.0) -> None:
        self.least = least

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        given = str(value).strip()
        if given.endswith("M") and given[-2:-1].isdigit():
            self.fail(f"{value!r} is ambiguous (M is months in some tools): give minutes "
                      f"as {given[:-1]}m", param, ctx)
        text, scale = given.lower(), 1.0
        for unit, size in _UNITS:
            if text.endswith(unit) and text[:-len(unit)][-1:].isdigit():
                text, scale = text[:-len(unit)], size
                break
        try:
            seconds = float(text) * scale
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds (or a duration such as 90s, "
                      f"10m, 1.5h)", param, ctx)
        exact = _exact_sign(text) if seconds == 0 else 0  # 1e-400 is 0.0 as a float
        if math.isnan(seconds) or seconds < 0 or exact < 0:
            self.fail(f"{value!r} is not a number of seconds >= 0", param, ctx)
        if (seconds > 0 or exact > 0) and seconds < self.least:
            self.fail(f"{value!r} is under {self.least} s: give 0 (never) or at least "
                      f"{self.least} (each beat writes the record)", param, ctx)
        return seconds


def _exact_sign(text: str) -> int:
    """-1, 0 or 1: the sign of the number ``text`` spells, which float() read as 0.0 (it
    may be too small for a float: a value asked for as above 0 stays above it)."""
    import decimal  # (only here: the command's start does without it)

    try:
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return 0
    return (exact > 0) - (exact < 0)


SECONDS = _Seconds()
HEARTBEAT = _Seconds(least=0.01)
"""A heartbeat interval: a shorter one than 10 ms only keeps a CPU and the disk busy."""


class _Mode(click.ParamType):  # type: ignore[type-arg]
    """Permission bits in octal, as chmod(1) takes them: 660, 0660 or 0o660."""

    name = "mode"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        text = str(value).lower().removeprefix("0o")
        if not text or not text.isascii() or not text.isdigit() or "8" in text or "9" in text:
            self.fail(f"{value!r} is not an octal mode such as 600 or 660", param, ctx)
        from fencelock._lock import _check_mode  # the library's rule, not a copy of it

        mode = int(text, 8)
        try:
            _check_mode(mode)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return mode


MODE = _Mode()


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
        help="Holder store: etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=S&root=DIR] "
        "(etcds:// for HTTPS, with ca=, cert=, key= file paths), or local for sidecars "
        "(default: $FENCELOCK_BACKEND, else local).",
    )(f)


def _uses_store(backend: str | None) -> bool:
    from fencelock._backend import selected

    return selected(backend) is not None


# -- status ---------------------------------------------------------------------------


@main.command(short_help="Show who holds each session (default: in .).")
@click.argument("paths", nargs=-1, type=PATH)
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
    processes wait behind each.

    Exit 0 when nothing is stale, 3 when a stale holder (owner died mid-run) is
    found, 1 when a path cannot be read (this wins over 3).

    JSON objects carry: session, sidecar, state (free, live, stale, unreadable),
    pid, host, lane, run_id, token, phase, acquired_at, heartbeat_at, age,
    heartbeat_age (seconds), stuck, owner_alive, command_pid (the command of a
    `fencelock run` holder), fence_ok, reason (pid to heartbeat_age are the record's:
    the last run's unless a run holds the session now), held_by (the pid holding it
    now, or null), lock_owners (for a holder outside fencelock: pid, command, shared),
    waiters (processes queued behind the holder, etcd store), moved_to (the fresh
    session a recover moved the conversation to, or null; STATE "... (moved)").

    \b
    Example:
      fencelock status sessions/ --stuck-after 300
      fencelock status --json sessions/4f1c.jsonl | jq '.[].state'
    """
    answer_goes_to_stdout("status")
    from fencelock._errors import (
        OutsideRootError,
        SidecarAccessError,
        StoreUnavailableError,
        UnsafePathError,
    )
    from fencelock._probe import ProbeState, probe, scan

    failed = False

    store = _uses_store(backend)

    def cannot_list(path: str, why: str) -> Iterator[HolderStatus]:
        """A path that cannot be listed or named: with --json an unreadable row (it
        names every path), otherwise a line on stderr."""
        nonlocal failed
        if as_json:
            yield _unreadable(path, backend, why)
        else:
            error_line(why)
            failed = True

    def found() -> Iterator[HolderStatus]:
        nonlocal failed
        if store and not paths:
            from fencelock import _backend, _probe

            url = _backend.selected(backend)
            assert url is not None
            with library_errors():
                try:
                    yield from _probe.list_store(url, stuck_after)
                except StoreUnavailableError as e:  # nothing to list: said; an empty list
                    error_line(str(e))
                    failed = True
        for path in paths or (() if store else (".",)):
            # A path that cannot be listed or named is reported, and the others are
            # still listed (inside library_errors, which would end the command).
            with library_errors():
                if _is_directory_to_scan(path):
                    try:
                        yield from scan(path, stuck_after=stuck_after, backend=backend)
                    except (SidecarAccessError, OutsideRootError) as e:
                        yield from cannot_list(path, str(e))
                    except StoreUnavailableError as e:
                        yield from cannot_list(path, f"{path}: {e}")
                    continue
                problem = _no_directory(path)
                if problem is not None and as_json:  # a row: --json names every path
                    yield _unreadable(path, backend, problem)
                    continue
                if problem is not None:
                    error_line(problem)
                    failed = True
                    continue
                try:
                    found_status = probe(path, stuck_after=stuck_after, backend=backend)
                except OutsideRootError as e:
                    yield from cannot_list(path, str(e))
                    continue
                except StoreUnavailableError as e:  # cannot be probed: an unreadable row
                    found_status = _unprobed(path, backend, str(e))
                except UnsafePathError as e:  # a path that names a directory ("DIR/")
                    found_status = _unreadable(path, backend, str(e))
                yield found_status

    if as_json:
        # Streamed, one object at a time: a directory of 100,000 sessions must not be
        # held in memory. The text is what json.dumps(rows, indent=2) would print.
        def said(rows: Iterator[HolderStatus]) -> Iterator[HolderStatus]:
            for st in rows:  # an unreadable row is an error: on stderr too, as in text
                if st.state is ProbeState.UNREADABLE:
                    error_line(st.reason)
                yield st

        stale, unreadable = stream_status_json(said(found()))
        if failed or unreadable:
            sys.exit(EXIT_ERROR)
        if stale:
            sys.exit(EXIT_STALE)
        return
    # The table is aligned, so it is printed once every row is in (StatusTable keeps
    # them), each row's ages as of when it was found.
    table = StatusTable(waiters=store)
    stale, reasons = False, []
    for st in found():
        table.add(st, time.time())
        if st.state is ProbeState.UNREADABLE:
            reasons.append(st.reason)
        stale = stale or st.state is ProbeState.STALE
    if table.count:
        try:
            lines = table.lines()
            while chunk := list(itertools.islice(lines, _TABLE_CHUNK)):
                out("\n".join(chunk))
        finally:
            table.close()
    elif not failed:
        out("no sessions found")
    for reason in reasons:
        error_line(reason)
    if failed or reasons:
        sys.exit(EXIT_ERROR)
    if stale:
        sys.exit(EXIT_STALE)


def _unprobed(path: str, backend: str | None, why: str) -> HolderStatus:
    """The status row of a session its holder store (etcd) could not be asked about."""
    return _unreadable(path, backend, f"{_named(path)[0]}: {why}")


def _unreadable(path: str, backend: str | None, reason: str) -> HolderStatus:
    """An unreadable status row for ``path``, saying ``reason``."""
    from fencelock._probe import HolderStatus, ProbeState

    session, sidecar = _named(path)
    return HolderStatus(session, sidecar and _holder_at(session, sidecar, backend),
                        ProbeState.UNREADABLE, reason=reason)


def _store_url(backend: str | None) -> str | None:
    """The holder store's URL as the commands this one suggests must give it: from
    ``--backend`` or ``$FENCELOCK_BACKEND`` (None for sidecars), as the library's own
    errors say it."""
    from fencelock._backend import selected

    url = selected(backend)
    return None if url is None else str(url.text)


def _holder_at(session: str, sidecar: str, backend: str | None) -> str:
    """Where ``session``'s holder lives: its sidecar, or its key in the store (etcd)."""
    from fencelock._errors import FenceLockError
    from fencelock._store import open_store

    try:
        store = open_store(backend, session) if _uses_store(backend) else None
    except FenceLockError:  # no key for it (outside the backend's root)
        return sidecar
    return sidecar if store is None else store.name


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
        refusal: str = "",
    ) -> None:
        self.session = session
        self.sidecar = sidecar
        self.found = found
        self.record = record
        self.cleared = False
        self.removed = False
        self.kept = False
        """Found free or cleared, but the sidecar `--remove` was to delete stays (``error``
        says why)."""
        self.set_aside: str | None = None
        self.refused = refused
        self.error = error
        self.reason = reason
        self.refusal = refusal
        """Refused: the error line that says so."""

    def to_json(self) -> dict[str, Any]:
        rec = self.record
        return {
            "session": self.session,
            "sidecar": self.sidecar or None,  # none for a directory's row
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


def _named(path: str) -> tuple[str, str]:
    """(session, sidecar) of ``path`` for a report: absolute, unless the working
    directory is gone (then as given; the command itself reports the path). A path
    that names a directory ("DIR/", or one there) has no sidecar: ""."""
    from fencelock import _sidecar
    from fencelock._errors import SidecarAccessError, UnsafePathError

    slash = _sidecar.names_a_directory(path)
    if slash or os.path.isdir(path):
        try:
            whole = os.path.abspath(path)
        except OSError:  # no working directory
            return path, ""
        return (whole + os.sep if slash else whole), ""
    try:
        return _sidecar.paths(path)
    except (SidecarAccessError, UnsafePathError):
        return _sidecar._paths(path)  # the same split, of the path as given



def _clear_one(path: str, remove: bool, force: bool, backend: str | None = None) -> _ClearOutcome:
    from fencelock._errors import (
        FenceLockError,
        HeldByOwnRunError,
        RecordTooLargeError,
        SessionContendedError,
        SidecarAccessError,
        session_lead,
    )
    from fencelock._probe import ProbeState, clear

    try:
        st = clear(path, remove=remove, force=force, backend=backend)
    except SessionContendedError as e:
        from fencelock._errors import describe_holder, session_command

        session, store = e.session, _store_url(backend)
        if isinstance(e, HeldByOwnRunError):  # waiting, or recover's fresh session, is no fix
            refusal = f"{session}: not cleared: {str(e).removeprefix(session + ': ')}"
        else:
            refusal = (
                f"{session}: not cleared: held by "
                f"{describe_holder(e.holder, e.lock_owners, e.last, e.held_by)}; a live holder "
                f"is never cleared: wait for it ({session_command(session, store, 'wait')}), "
                f"or start a fresh session ({session_command(session, store)})")
        return _ClearOutcome(
            session, _holder_at(session, session + SIDECAR_SUFFIX, backend), "live", e.holder,
            refused=True, reason=str(e), refusal=refusal,
        )
    except (FenceLockError, OSError) as e:
        message = os_message(e) if isinstance(e, OSError) else str(e)
        if isinstance(e, RecordTooLargeError) and e.status is not None:  # found, kept
            stale = e.status
            return _ClearOutcome(stale.session, stale.sidecar, str(stale.state),
                                 stale.record, error=message, reason=message)
        found = e.status if isinstance(e, SidecarAccessError) else None
        if found is not None:  # cleared (or found free), but the sidecar stays
            kept = _ClearOutcome(found.session, found.sidecar, str(found.state), found.record,
                                 error=message, reason=f"{found.reason}; the sidecar stays")
            kept.cleared = found.state is ProbeState.STALE
            kept.kept = True
            return kept
        session, sidecar = _named(path)
        message = session_lead(session, e) + message
        return _ClearOutcome(session, sidecar and _holder_at(session, sidecar, backend),
                             "unreadable", error=message, reason=message)
    done = _ClearOutcome(st.session, st.sidecar, str(st.state), st.record, reason=st.reason)
    done.cleared = st.state is ProbeState.STALE and st.set_aside is None  # (not moved)
    done.removed = st.removed
    done.set_aside = st.set_aside
    return done


class _DirSummary:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.live = 0
        self.cleared = 0
        self.removed = 0
        self.kept = 0
        """Sidecars of sessions found free or cleared that could not be removed."""
        self.set_aside = 0
        """Records `--force` moved aside (corrupt, or too large to write back)."""
        self.failed = 0

    def text(self, remove: bool) -> str:
        """The directory's line: what its sessions' lines said, counted."""
        text = (f"{clean(self.directory)}: cleared {self.cleared} stale, left {self.live} "
                f"live alone")
        if remove:
            text += f", removed {plural(self.removed, 'sidecar')}"
        if self.set_aside:
            text += f", set {plural(self.set_aside, 'record')} aside"
        if self.kept:  # (each said on stderr)
            text += f"; {plural(self.kept, 'sidecar')} could not be removed"
        if self.failed:
            text += f"; {self.failed} could not be cleared"
        return text


def _clear_directory(
    summary: _DirSummary, remove: bool, force: bool, backend: str | None = None
) -> Iterator[_ClearOutcome]:
    """The outcome of each session in the directory as it is cleared (counted in
    ``summary``), so that each is said as it happens: a large directory takes a while,
    and an interrupt must not hide what was done before it."""
    from fencelock._probe import ProbeState, scan

    store = _uses_store(backend)
    for st in scan(summary.directory, backend=backend):
        if st.state is ProbeState.LIVE:
            summary.live += 1
            yield _ClearOutcome(st.session, st.sidecar, "live", st.record,
                                reason="live: left alone")
            continue
        if st.state is ProbeState.FREE and (
            not remove or (not store and not os.path.lexists(st.sidecar))
        ):
            continue
        outcome = _clear_one(st.session if store else st.sidecar, remove, force, backend)
        if outcome.refused:
            # Taken by a new run since the scan: it is live, not stale, so left alone.
            summary.live += 1
            continue
        summary.cleared += outcome.cleared
        summary.removed += outcome.removed
        summary.kept += outcome.kept
        summary.set_aside += outcome.set_aside is not None
        summary.failed += outcome.error is not None and not outcome.kept
        yield outcome


@main.command(name="clear", short_help="Clear stale holder records; never live ones.")
@click.argument("paths", nargs=-1, required=True, type=PATH)
@click.option(
    "--remove", is_flag=True, help="Also delete the sidecars of free and cleared sessions."
)
@click.option(
    "--force", is_flag=True,
    help="Set a corrupt record aside as <sidecar>.corrupt-<time>-<random>, and a stale one "
         "too large to write back released.",
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
    sidecar, a stale record too large to write back, missing directory; a missing
    session with no sidecar has nothing to clear: exit 0); 1 wins over 4.

    JSON objects carry: session, sidecar, found (the state found), pid, lane,
    token, cleared, removed, set_aside, refused, error, reason.

    \b
    Example:
      fencelock clear sessions/4f1c.jsonl
      fencelock clear --remove sessions/
    """
    answer_goes_to_stdout("clear")
    show = PathDisplay()
    refused = failed = False
    printing = True  # until stdout goes away (`| head`): the clearing goes on

    def said(item: _ClearOutcome | _DirSummary) -> _ClearOutcome | _DirSummary:
        nonlocal refused, failed
        if isinstance(item, _DirSummary):
            if printing and not as_json:  # last: what the directory's lines said, counted
                out(item.text(remove))
            return item
        refused |= item.refused
        if item.error is not None:
            failed = True
            error_line(item.error)
        elif item.refused:
            error_line(item.refusal)
        elif printing and not as_json:
            out(f"{show(item.session)}: {clean(item.reason)}")
        return item

    def outcomes() -> Iterator[_ClearOutcome | _DirSummary]:
        for path in paths:
            yield from _clear_path(path, remove, force, backend)

    done = outcomes()
    try:
        if as_json:  # streamed: a directory of 100,000 sessions is not held in memory
            stream_json_array(json_element(item.to_json()) for item in map(said, done)
                              if isinstance(item, _ClearOutcome))
        else:
            for item in done:
                said(item)
    except (OSError, OutputError):
        # stdout failed or was closed: what is left is still cleared (it was before
        # each outcome was said as it came), unsaid, and the failure decides the exit.
        printing = False
        for item in done:
            said(item)
        raise
    if failed:
        sys.exit(EXIT_ERROR)
    if refused:
        sys.exit(EXIT_CONTENDED)


def _clear_path(
    path: str, remove: bool, force: bool, backend: str | None
) -> Iterator[_ClearOutcome | _DirSummary]:
    """What `clear` did to ``path``, outcome by outcome as each is done; for a
    directory, its count last."""
    from fencelock._errors import OutsideRootError, SidecarAccessError

    if not _is_directory_to_scan(path):
        from fencelock._backend import selected

        problem = _no_directory(path)
        if problem is None:
            yield _clear_one(path, remove, force, backend)
            return
        session, sidecar = _named(path)
        refused = _ClearOutcome(session, sidecar, None, error=problem, reason=problem)
        # A holder store may keep a record for a session whose directory has gone:
        # `status` lists it, and it is cleared. (With nothing there, it is refused.)
        outcome = _clear_one(path, remove, force, backend) if selected(backend) else refused
        yield refused if outcome.error is not None else outcome
        return
    summary = _DirSummary(path)
    with library_errors():
        try:
            yield from _clear_directory(summary, remove, force, backend)
        except (SidecarAccessError, OutsideRootError) as e:
            # This directory only: the other paths are still cleared (and --json names
            # it, as it names every path).
            session, sidecar = _named(path)
            yield _ClearOutcome(session, sidecar, None, error=str(e), reason=str(e))
            return
    yield summary


# -- run --------------------------------------------------------------------------------


def _lane_text(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A lane as UTF-8 text: under a locale Python reads arguments in as ASCII (its
    locale coercion turned off), a lane's UTF-8 bytes arrive as escapes of single bytes;
    read them again as UTF-8 (bytes that are not UTF-8 stay escaped: the lock refuses
    them by name). A lane the locale read in whole (Latin-1's, say) stays as it is."""
    if not any("\udc80" <= c <= "\udcff" for c in value):
        return value
    # The bytes as given (os.fsencode's reading back), read as UTF-8.
    raw = value.encode(sys.getfilesystemencoding(), "surrogateescape")
    return raw.decode("utf-8", "surrogateescape")


def _holding_options(heartbeat_help: str) -> Callable[[Any], Any]:
    """The options of the commands that hold a session: ``run`` and ``hold``."""

    def apply(f: Any) -> Any:
        for option in reversed((
            click.argument("session", type=PATH),
            click.option("--lane", required=True, callback=_lane_text,
                         help="The lane name recorded in the holder record."),
            click.option("--no-wait", "-n", is_flag=True,
                         help="Exit 4 at once if the session is held."),
            click.option("--timeout", "-w", type=SECONDS, metavar="SECONDS",
                         help="Give up (exit 4) after waiting this long for the holder."),
            click.option("--heartbeat", type=HEARTBEAT, default=60.0, show_default=True,
                         metavar="SECONDS", help=heartbeat_help),
            click.option("--mode", type=MODE, default="600", show_default=True,
                         help="Permission bits of the sidecar and session files it makes "
                              "(660 where a group shares the sessions directory)."),
            _backend_option,
        )):
            f = option(f)
        return f

    return apply


class _CommandLine(click.Command):
    """A command whose last argument is a command line to start (``run``): as flock(1)
    does, fencelock reads its own options only up to that command's first word, and
    every word from there on is the command's, options included."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _mark_command_start(self.get_params(ctx), args, ctx))


def _mark_command_start(
    params: list[click.Parameter], args: list[str], ctx: click.Context
) -> list[str]:
    """``args`` with ``--`` put before the word that starts the command (the one after
    the positional arguments before it), unless a ``--`` comes first. A ``--`` before
    the positional arguments is a usage error: their words would be taken from the
    command (``run --lane x -- ./job.sh`` would hold a session named ./job.sh and run
    nothing of the job)."""
    takes_value = {
        name: not (p.is_flag or p.count)
        for p in params if isinstance(p, click.Option)
        for name in (*p.opts, *p.secondary_opts)
    }
    before = sum(1 for p in params if isinstance(p, click.Argument) and p.nargs == 1)
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            if before:
                names = [p.human_readable_name for p in params
                         if isinstance(p, click.Argument) and p.nargs == 1]
                raise click.UsageError(
                    f"Missing argument {names[-before]!r}: give it before the command "
                    f"(everything after '--' is the command's; a path that starts with "
                    f"'-' is written ./-NAME)", ctx)
            break
        if word.startswith("--"):
            if takes_value.get(word) and "=" not in word:
                i += 1  # its value
        elif word.startswith("-") and word != "-":
            for j, letter in enumerate(word[1:], start=2):  # -nw 5, -w5
                if takes_value.get("-" + letter):
                    i += j == len(word)  # the value is the next word unless attached
                    break
        elif before:
            before -= 1
        else:
            return [*args[:i - 1], "--", *args[i - 1:]]
    return args


@main.command(cls=_CommandLine, short_help="Hold SESSION while COMMAND runs, like flock(1).")
@_holding_options("Refresh the record's heartbeat this often while COMMAND runs; 0 never.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    session: str,
    lane: str,
    no_wait: bool,
    timeout: float | None,
    heartbeat: float,
    mode: int,
    backend: str | None,
    command: tuple[str, ...],
) -> None:
    """Hold SESSION while COMMAND runs, like flock(1). fencelock's options go before
    COMMAND; every word from COMMAND on is COMMAND's (`--` before it is optional).

    Exits with COMMAND's exit code (128+N when it was killed by signal N, 126 when
    it cannot be executed, 127 when it was not found), or 4 when the session is held
    by a live run (with --no-wait,
    or after --timeout); the holder is named on stderr. COMMAND gets
    FENCELOCK_SESSION, FENCELOCK_LANE, FENCELOCK_TOKEN, FENCELOCK_RUN_ID and
    FENCELOCK_FD in its environment. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2
    and SIGALRM are passed on to COMMAND's process (Ctrl-C on a terminal already
    reaches it; one sent to the whole process group by anything else reaches it
    twice); one that comes before COMMAND
    starts stops the run (128+N). As with flock(1), COMMAND inherits the lock's
    descriptor (FENCELOCK_FD): the session stays held while COMMAND, or anything it
    left running with that descriptor, lives, even if fencelock itself is killed.
    When COMMAND ends the record says released, and the session is free once nothing
    holds the descriptor any more.

    \b
    Example:
      fencelock run sessions/4f1c.jsonl --lane cron:nightly --timeout 30 -- ./job.sh
    """
    from fencelock._lock import SessionLock
    from fencelock._supervisor import supervise

    _one_session(session, "run")
    if not command[0]:
        raise click.BadParameter("is empty: no command has that name", param_hint="'COMMAND'")
    try:
        with library_errors():
            lock = SessionLock(
                session, lane, on_contention="fail" if no_wait else "wait", timeout=timeout,
                backend=backend, mode=mode,
            )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--lane'") from None
    code = supervise(lock, command, heartbeat)
    sys.exit(code)


# -- hold -------------------------------------------------------------------------------


@main.command(short_help="Hold SESSION for another process, over JSON lines.")
@_holding_options("Refresh the record's heartbeat when no request wrote it for this long; 0 never.")
@click.option("--fence", type=click.Choice(["auto", "stat", "content"]), default="auto",
              show_default=True,
              help="How appends tell a foreign write (The fence in docs/DESIGN.md of "
                   "fencelock's source distribution): content "
                   "where the session gets hard-link backups or chmods before a run's first "
                   "line.")
def hold(
    session: str,
    lane: str,
    no_wait: bool,
    timeout: float | None,
    heartbeat: float,
    mode: int,
    backend: str | None,
    fence: str,
) -> None:
    """Hold SESSION for the process at the other end of stdin and stdout.

    Prints {"ok": true, "event": "held", "record": {...}} once held, then answers each
    JSON request line on stdin ({"op": "append", "entry": {...}}, "prompt_begin",
    "prompt_end", "touch", "verify", "info", "superseded", "release") with one JSON
    line. Release, or end of stdin, releases the session and exits 0. Contended
    (--no-wait, past --timeout, or stdin ended while it waited): {"ok": false,
    "error": "SessionContendedError", ...} and exit 4; a session it cannot take (a bad
    sidecar, etcd away): the error line and exit 1. docs/PROTOCOL.md in fencelock's
    source distribution has the whole protocol.

    \b
    Example:
      coproc HOLD { fencelock hold sessions/4f1c.jsonl --lane cron:nightly; }
    """
    from fencelock._errors import HoldArgumentError
    from fencelock._hold import main as hold_main

    try:
        code = hold_main(
            session, lane, no_wait=no_wait, timeout=timeout, heartbeat=heartbeat,
            backend=backend, mode=mode, fence=fence,
        )
    except HoldArgumentError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.option}'") from None
    sys.exit(code)


# -- wait -------------------------------------------------------------------------------


def _progress(session: str, since: float, show: PathDisplay, backend: str | None) -> str:
    import shutil

    from fencelock._errors import StoreUnavailableError
    from fencelock._probe import probe

    try:
        st = probe(session, backend=backend)
    except StoreUnavailableError:  # etcd away: the wait rides that out, and so does this
        now = "etcd not answering"
    else:
        rec = held_record(st)
        who = (clean(holder_text(st)) if rec is None
               else f"pid {rec.pid} (lane {clean(repr(rec.lane))})")
        held = "" if rec is None else f" for {human_age(time.time() - rec.acquired_at)}"
        now = f"held by {who}{held}"
    waited = human_age(time.monotonic() - since)
    # Who and how long come first: a long path is what gets cut at the terminal's edge.
    line = f"{now}; waited {waited} for {show(session)}"
    width = shutil.get_terminal_size().columns - 1
    return shorten(line, max(width, 20))


def _wait_with_progress(
    session: str, wait_free: Any, timeout: float | None, backend: str | None
) -> bool:
    """Wait in a helper thread (one, however long it takes) and redraw a status line."""
    import threading
    import warnings

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

    shown = warnings.showwarning

    def on_a_line_of_its_own(*args: Any, **kwargs: Any) -> None:
        click.echo("\r\x1b[K", nl=False, err=True)  # over the progress line, not after it
        shown(*args, **kwargs)

    warnings.showwarning = on_a_line_of_its_own  # (the waiting thread's notes too)
    threading.Thread(target=waiter, name="fencelock-wait", daemon=True).start()
    start = time.monotonic()
    show = PathDisplay()
    try:
        while not done.wait(1.0):
            click.echo("\r\x1b[K" + _progress(session, start, show, backend), nl=False,
                       err=True)
    finally:
        warnings.showwarning = shown
        click.echo("\r\x1b[K", nl=False, err=True)
    if failure:
        raise failure[0]
    return result[0]


@main.command(short_help="Wait until SESSION has no live holder.")
@click.argument("session", type=PATH)
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
    --timeout passes first, naming the holder, 1 when it cannot be looked at (an
    unreadable or corrupt sidecar, a missing directory). On a terminal a progress line shows
    who holds it and for how long. A process outside fencelock that holds the
    sidecar's lock, even a shared one (flock -s), is a live holder too.

    \b
    Example:
      fencelock wait sessions/4f1c.jsonl --timeout 120 && ./reply.sh
    """
    import signal
    from functools import partial

    from fencelock._errors import StoreUnavailableError, session_command
    from fencelock._probe import ProbeState, probe
    from fencelock._signals import PromptHandlers
    from fencelock._store import open_store
    from fencelock._wait import wait_until_unlocked

    _one_session(session, "wait")
    named, sidecar = _named(session)
    with library_errors(named):
        store = open_store(backend, named)
        deadline = None if timeout is None else time.monotonic() + timeout

        def look() -> HolderStatus:
            # A store's requests within the wait's deadline (each gets at least 0.5 s).
            return store.probe(DEFAULT_STUCK_AFTER, deadline) if store is not None else \
                probe(session, backend=backend)

        try:
            st: HolderStatus | None = look()
        except StoreUnavailableError:
            if store is None:
                raise
            st = None  # etcd restarting, say: the wait below rides that out or says so
        if st is not None and st.state is ProbeState.UNREADABLE:
            raise CliError(st.reason)
        if st is not None and st.state is not ProbeState.LIVE:
            return
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        wait_free = store.wait_free if store is not None else partial(
            wait_until_unlocked, sidecar)
        # Ctrl-C stops the wait even when the kernel hands SIGINT to the waiting thread.
        handlers = PromptHandlers(signal.default_int_handler, [signal.SIGINT])
        try:
            if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
                # A line redrawn in place, which a terminal that moves no cursor cannot.
                free = _wait_with_progress(named, wait_free, remaining, backend)
            else:
                free = wait_free(remaining)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        finally:
            handlers.close()
        if not free:
            try:
                holder = holder_text(look())
            except StoreUnavailableError:
                holder = "a live holder (etcd did not say which in time)"
            raise ContendedCliError(
                f"{named}: after {timeout:g}s, still held by {holder}; wait longer "
                f"(--timeout), or start a fresh session "
                f"({session_command(named, _store_url(backend))})"
            )


# -- recover ----------------------------------------------------------------------------


@main.command(name="recover", short_help="Print the session to use after a stuck run.")
@click.argument("session", type=PATH)
@click.option(
    "--wait",
    "wait_s",
    type=SECONDS,
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for a live holder to let go (on etcd, one without a record "
         "gets up to the URL's TTL and a margin more: see recover in docs/API.md of "
         "fencelock's source distribution).",
)
@click.option("--no-fresh", is_flag=True, help="Exit 4 instead of starting a fresh session.")
@click.option("--no-carry", is_flag=True,
              help="Start a fresh session empty, not carrying the old transcript's lines.")
@click.option("--lane", default="recovery", show_default=True, callback=_lane_text,
              help="Lane of a fresh session.")
@click.option("--json", "as_json", is_flag=True, help="Print what was decided as JSON.")
@_backend_option
def recover_command(
    session: str, wait_s: float, no_fresh: bool, no_carry: bool, lane: str, as_json: bool,
    backend: str | None,
) -> None:
    """The safe stuck-session recovery step: never re-fire on a session a run still
    holds. Prints the session to use, as an absolute path: SESSION itself when it is
    free (a stale record is cleared), or a fresh session beside it carrying the old
    transcript's complete lines. Exit 0, 4 when still held and --no-fresh, 1 on any other failure.

    The fresh session is named after the stuck run, so every recover of that run
    answers the same one, copied once, also once that run has ended: SESSION is
    marked moved, and runs of it are refused with the fresh session's name (where
    its filesystem keeps no extended attributes, only until another run takes
    SESSION). The fresh session gets its name only once the copy is whole.
    A recover that meets another's copy under way waits for it (up to 5 minutes,
    beyond --wait), and makes it itself if that copy fails.

    A session file that does not exist yet (its directory does) is free: it is
    printed as it is (refire).

    JSON: action (refire or fresh), session, original, waited, carried_lines,
    holder (what was found: an object of the same shape as status --json gives).
    Still held with --no-fresh, or any other failure: action and session null, and
    error says why (holder is the session as it is then; null when the failure came
    before recover read it, such as a bad path).

    \b
    Example:
      next=$(fencelock recover sessions/4f1c.jsonl --wait 10)
    """
    answer_goes_to_stdout("recover")
    import signal

    from fencelock._errors import FenceLockError, HeldByOwnRunError, SessionContendedError
    from fencelock._lock import SessionLock
    from fencelock._probe import probe
    from fencelock._recovery import recover
    from fencelock._signals import PromptHandlers, Seen, Stopped

    def failed(error: str, looked: bool = False) -> None:
        """``looked``: recover read the holder before it failed; name it again."""
        if as_json:  # the same shape, for a caller that parses stdout
            holder = None
            if looked:
                with contextlib.suppress(FenceLockError, OSError):
                    holder = status_json(probe(session, backend=backend), time.time())
            echo_json({"action": None, "session": None, "original": _named(session)[0],
                       "waited": None, "carried_lines": 0, "error": error, "holder": holder})

    try:
        _one_session(session, "recover")
    except CliError as e:
        failed(e.message)
        raise
    try:
        SessionLock.check_lane(lane)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--lane'") from None
    seen = Seen()
    # A signal while waiting or copying stops recover cleanly: a fresh session it was
    # making is removed (nobody was given its name), and the signal is seen at once.
    # Once recover has decided, the decision is printed whatever comes.
    handlers: PromptHandlers | None = None
    try:
        handlers = PromptHandlers(seen.stop, _platform.stop_signals())
        with library_errors(_named(session)[0]):
            try:
                r = recover(session, wait=wait_s, fresh=not no_fresh, lane=lane,
                            carry=not no_carry, backend=backend)
                seen.settled = True
            except SessionContendedError as e:
                # Still held with --no-fresh: the advice is not recover (this command).
                message = str(e) if isinstance(e, HeldByOwnRunError) else (
                    f"{e.situation()}; wait longer (--wait), or recover without "
                    "--no-fresh to start a fresh session")
                if as_json:  # say so on stdout too
                    echo_json({
                        "action": None, "session": None, "original": e.session,
                        "waited": None if e.waited is None else round(e.waited, 3),
                        "carried_lines": 0, "error": message,
                        "holder": status_json(probe(e.session, backend=backend), time.time()),
                    })
                raise ContendedCliError(message) from None
            except (FenceLockError, OSError) as e:
                failed(os_message(e) if isinstance(e, OSError) else str(e), looked=True)
                raise
    except Stopped as e:
        seen.settled = True
        name = signal.Signals(e.signum).name
        # A fresh session named after the stuck run may be whole by now: the next
        # recover answers it. Nothing else was changed.
        # (The holder it waited for named, as for any failure after recover read it.)
        failed(f"interrupted by {name}; recover again for the session to use", looked=True)
        error_line(f"{session}: recover interrupted by {name}; recover again for the "
                   "session to use")
        sys.exit(128 + e.signum)
    finally:
        seen.settled = True  # an attribute store: no handler runs before it
        if handlers is not None:
            handlers.close()
    try:
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
            echo_json(obj)
        elif sys.stdout.isatty():
            out(clean(r.session))
        else:
            # The real bytes for `next=$(fencelock recover S)`: escaping would name a
            # path that does not exist.
            out_bytes(os.fsencode(r.session) + b"\n")
    except OutputError as e:
        # The decision is made (perhaps a fresh session created): it must reach the
        # caller somehow.
        raise OutputError(f"{e.message}; the session to use is {r.session}") from None


# -- verify -----------------------------------------------------------------------------


@main.command(name="verify", short_help="Check SESSION for torn lines and bad tokens.")
@click.argument("session", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_backend_option
def verify_command(session: str, as_json: bool, backend: str | None) -> None:
    """Check SESSION's lines: torn lines (not JSON, or no final line break where no
    live holder may still be writing) and fencing tokens that went backwards (a write
    by a run that had lost the session), were stamped by two runs, or lie above the
    largest token, and the reserved _fencelock key holding no stamp.
    Exit 0 clean, 5 problems found, 1 unreadable (or, for a last line without its line
    break, a holder store that cannot be asked whether a live holder is writing it,
    when no other line has a problem).

    A session file that does not exist yet (its directory does) has no lines: it is
    clean, and the report says it does not exist.

    A line over 64 MiB, one whose values take more memory to parse than there is,
    or one nested deeper than Python parses, is not parsed (no problem by that
    alone): its stamp is read from its end, and the report lists it as unchecked.

    JSON: session, exists, lines, stamped, max_token, ok, problems (line, kind,
    detail), unchecked (line numbers), error (null, or why it could not be read: the
    counts are then null).

    \b
    Example:
      fencelock verify sessions/4f1c.jsonl
    """
    answer_goes_to_stdout("verify")
    from fencelock._errors import FenceLockError
    from fencelock._verify import MAX_LINE, verify

    def failed(error: str) -> None:
        if as_json:  # the same shape, for a caller that parses stdout
            echo_json({"session": _named(session)[0], "exists": None, "lines": None,
                       "stamped": None, "max_token": None, "ok": False, "problems": [],
                       "unchecked": [], "error": error})

    try:
        _one_session(session, "verify")
    except CliError as e:
        failed(e.message)
        raise
    with library_errors(_named(session)[0]):
        try:
            report = verify(session, backend=backend)
        except (FenceLockError, OSError) as e:
            failed(os_message(e) if isinstance(e, OSError) else str(e))
            raise
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
            "unchecked": report.unchecked,
            "error": None,
        }
        echo_json(obj)
    else:
        # As given (relative stays relative), but the session's name for its sidecar's.
        name = clean(session[: -len(SIDECAR_SUFFIX)] if is_sidecar(session) else session)
        for p in report.problems:
            out(f"{name}:{p.line}: {p.kind}: {clean(p.detail)}")
        for n in report.unchecked:
            out(f"{name}:{n}: note: not parsed (over {MAX_LINE >> 20} MiB, too large to "
                "parse in the memory there is, or nested too deeply); its stamp was read "
                "from its end")
        verdict = "ok" if report.ok else plural(len(report.problems), "problem")
        missing = "" if report.exists else "no such file yet, "
        unparsed = f", {len(report.unchecked)} not parsed" if report.unchecked else ""
        out(
            f"{name}: {missing}{plural(report.lines, 'line')}, {report.stamped} stamped, "
            f"max token {report.max_token}{unparsed}: {verdict}"
        )
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


# -- check-config -----------------------------------------------------------------------


@main.command(name="check-config", short_help="Warn about heartbeats that share sessions.")
@click.argument("file", type=PATH)
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings.")
def check_config(file: str, strict: bool) -> None:
    """Warn for each agent whose heartbeat is not `isolatedSession: true` in a
    gateway config (JSON or JSON5): its heartbeat lane then shares the session file
    with the channel and direct lanes. Heartbeats merge over agents.defaults.heartbeat;
    disabled heartbeats are not warned about. Agents are read from agents.entries
    (newer gateways) or agents.list. As in the gateway, once any agent has a
    heartbeat block of its own that leaves it an interval, agents without one run no
    heartbeat (the explicit-only rule): a notice names each agent the defaults would
    otherwise reach.
    Exit 0 (1 with --strict and warnings), 1 for an unreadable or malformed file.

    \b
    Example:
      fencelock check-config ~/.openclaw/openclaw.json --strict
    """
    answer_goes_to_stdout("check-config")
    from fencelock._config import JSON5_FRAMES, review_file

    # A JSON5 config nests as deep as a plain JSON one (the json5 parser takes some 25
    # frames a level): the command parses one file, in one thread.
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(before * JSON5_FRAMES)
    try:
        with library_errors():
            report = review_file(file)
    finally:
        sys.setrecursionlimit(before)
    warnings = report.warnings
    name = clean(file)
    for w in warnings:
        out(f"{name}: warning: {clean(w.message)}")
    for n in report.notices:
        out(f"{name}: notice: {clean(n.message)}")
    if not warnings:
        out(f"{name}: ok: every agent heartbeat is isolated or off")
    elif strict:
        raise CliError(f"{file}: {plural(len(warnings), 'warning')} and --strict")
