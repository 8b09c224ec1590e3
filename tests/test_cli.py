"""The ``fencelock`` command line, through CliRunner and through the installed command.

Holders are real processes with real OS locks (the ``spawn_holder`` fixture); a stale
record is a holder killed with SIGKILL while it held the session.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import marks
import pytest
from click.testing import CliRunner, Result
from conftest import (
    SpawnHolder,
    interrupt_waiter,
    reap,
    tgkill,
    thread_in_syscall,
    wait_for_blocked_waiter,
)
from marks import (
    needs_flock,
    needs_pidfd,
    needs_proc,
    needs_proc_locks,
    needs_root,
    needs_tgkill,
)

from fencelock import (
    FenceLockError,
    ProbeState,
    SessionContendedError,
    SessionLock,
    _sidecar,
    clear,
    fresh_session,
    probe,
    recover,
    scan,
    verify,
)
from fencelock._ages import human_age
from fencelock._cli import main
from fencelock._output import clean
from fencelock._record import decode

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["status", "clear", "run", "hold", "wait", "recover", "verify", "check-config"]
STATUS_KEYS = {
    "session", "sidecar", "state", "pid", "host", "lane", "run_id", "token", "stuck",
    "owner_alive", "fence_ok", "reason", "age", "heartbeat_age", "phase", "held_by",
    "lock_owners",
}  # fmt: skip


def _fencelock() -> list[str]:
    here = os.path.dirname(sys.executable)
    exe = shutil.which("fencelock", path=here + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "fencelock"]


FENCELOCK = _fencelock()


def cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """The installed command in a real process."""
    kw.setdefault("timeout", 60)
    return subprocess.run([*FENCELOCK, *args], capture_output=True, text=True, check=False, **kw)


def invoke(*args: str, color: bool = False) -> Result:
    return CliRunner().invoke(main, list(args), color=color)


def no_traceback(stderr: str, max_lines: int = 2) -> None:
    assert "Traceback" not in stderr
    assert 1 <= len(stderr.strip().splitlines()) <= max_lines, stderr


def make_stale(spawn_holder: SpawnHolder, session: Path, lane: str = "dead") -> int:
    h = spawn_holder(session, lane=lane)
    h.acquire()
    h.kill()
    return int(h.pid)


def rows(result: Result | subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


# -- entry points, help, completion -----------------------------------------------------


def test_version_everywhere() -> None:
    assert invoke("--version").stdout.strip() == "fencelock, version 0.1.0"
    for command in (
        FENCELOCK,
        [sys.executable, "-m", "fencelock"],
        [sys.executable, str(REPO / "bin" / "fencelock")],
    ):
        out = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, check=False, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "fencelock, version 0.1.0"


def test_bin_script_runs_the_checkout_and_is_executable() -> None:
    script = REPO / "bin" / "fencelock"
    assert os.access(script, os.X_OK)
    out = subprocess.run(
        [sys.executable, str(script), "status", "--help"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "Example" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert f"fencelock {command}" in result.stdout.split("Example:")[1]


def test_main_help_documents_exit_codes_and_completion() -> None:
    out = invoke("--help").stdout
    assert "_FENCELOCK_COMPLETE=bash_source fencelock" in out
    assert "zsh_source" in out and "fish_source" in out
    assert "Exit codes" in out
    for command in COMMANDS:
        assert command in out


def test_no_command_is_a_usage_error_that_prints_the_help_on_stderr() -> None:
    """Whichever click is installed: before 8.2, click printed the help on stdout and
    exited 0, so a script's mistake (an unset variable for the command) went unseen."""
    out, help = (subprocess.run([sys.executable, "-m", "fencelock", *args],
                                capture_output=True, text=True, check=False, timeout=60)
                 for args in ([], ["--help"]))
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith("Usage: fencelock [OPTIONS] COMMAND [ARGS]...")
    assert out.stderr == help.stdout, out.stderr


def test_no_command_is_a_usage_error_with_click_before_8_2_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test extra's click (8.2 on) does this itself: a group's parse made as click
    8.1 made it (the help on stdout, exit 0) shows that fencelock's own rule applies."""
    import click

    given = click.Group.parse_args

    def as_click_8_1(self: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit()
        return given(self, ctx, args)

    monkeypatch.setattr(click.Group, "parse_args", as_click_8_1)
    result = invoke()
    assert result.exit_code == 2 and result.stdout == "", result
    assert result.stderr.startswith("Usage: "), result.stderr


def test_shell_completion_script_and_completions() -> None:
    script = cli(env={**os.environ, "_FENCELOCK_COMPLETE": "bash_source"})
    assert script.returncode == 0
    assert "_fencelock_completion" in script.stdout
    words = cli(
        env={
            **os.environ,
            "_FENCELOCK_COMPLETE": "bash_complete",
            "COMP_WORDS": "fencelock ch",
            "COMP_CWORD": "1",
        }
    )
    assert "check-config" in words.stdout
    assert "status" not in words.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["run", "s.jsonl", "--", "true"],  # --lane missing
        ["run", "s.jsonl", "--lane", "x"],  # no command
        ["status", "--stuck-after", "-1", "."],
        ["wait", "s.jsonl", "--timeout", "soon"],
        ["frobnicate"],
        ["clear"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output


def test_cli_module_import_stays_light() -> None:
    code = "import sys, fencelock._cli; print(sorted(m for m in ('json5',) if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


_INTERRUPTED_WHILE_LOADING = """
import signal, sys

class InterruptOnClick:
    # A real SIGINT, raised while the command line is still being imported.
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptOnClick())
sys.argv = ["fencelock", "hold", sys.argv[1], "--lane", "a"]
from fencelock._entry import main
main()
"""


def test_an_interrupt_while_the_command_loads_ends_it_quietly(session: Path) -> None:
    """A parent that stops `fencelock hold` (or a user who presses Ctrl-C) while it is
    still importing gets exit 130 and no traceback: nothing was held yet."""
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED_WHILE_LOADING, str(session)],
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (130, "", "")
    assert not Path(str(session) + ".holder").exists()


_INTERRUPTED_BEFORE_RUN_HANDLES_SIGNALS = """
import signal, sys
from fencelock import _lock
real = _lock.SessionLock.__init__
def init(self, *args, **kw):
    signal.raise_signal(signal.SIGINT)  # Ctrl-C, before run has its handlers
    real(self, *args, **kw)
_lock.SessionLock.__init__ = init
sys.argv = ["fencelock", "run", sys.argv[1], "--lane", "a", "--", "true"]
from fencelock._entry import main
main()
"""


def test_an_interrupt_after_the_command_loaded_and_before_its_handlers_ends_it_quietly(
    session: Path,
) -> None:
    """Between loading and ``run`` setting its signal handlers, a Ctrl-C ended it with
    click's "Aborted!" and exit 1: now with 130 and nothing said, as before loading."""
    out = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_BEFORE_RUN_HANDLES_SIGNALS, str(session)],
        capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (130, "", ""), out.stderr
    assert not Path(str(session) + ".holder").exists()


def test_cli_startup_imports_only_what_the_command_needs() -> None:
    """`--version` loads none of the library; `status` loads the probing chain only (not
    the lock's code, which `clear` imports when it runs)."""
    code = (
        "import sys\n"
        "from fencelock._cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], prog_name='fencelock')\n"
        "except SystemExit:\n"
        "    pass\n"
        "mods = ('fencelock._lock', 'fencelock._fence', 'fencelock._probe', 'fencelock._recovery',"
        " 'fencelock._verify',"
        " 'fencelock._config', 'fencelock._supervisor', 'subprocess', 'signal', 'shutil', 'json',"
        " 'dataclasses')\n"
        "print(' '.join(m for m in mods if m in sys.modules), file=sys.stderr)\n"
    )

    def loaded(*args: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
        )
        return set(out.stderr.split())

    assert loaded("--version") == set()
    assert not {m for m in loaded("--help") if m.startswith("fencelock.")}  # click needs shutil
    status = loaded("status", "--stuck-after", "5", "no-such-session.jsonl")
    assert "fencelock._probe" in status
    # Probing needs neither the lock's code nor the fence's (clear imports them).
    assert not status & {"fencelock._lock", "fencelock._fence", "fencelock._recovery",
                         "fencelock._verify", "fencelock._config", "fencelock._supervisor"}
    assert not status & {"subprocess", "shutil"}


def test_helpers() -> None:
    assert [human_age(s) for s in (None, -0.5, 5, 187, 7500, 3 * 86400 + 4 * 3600)] == [
        "-", "0s", "5s", "3m07s", "2h05m", "3d04h",
    ]  # fmt: skip
    # A time from a clock ahead of this one is shown so, not as 0s.
    assert [human_age(s) for s in (-3, -1796.8)] == ["-3s", "-29m56s"]
    # A time edited by hand into a record (1e30, 0: 1970) is no column of 300 digits.
    assert [human_age(s) for s in (1e308, -1e30, 99 * 365.25 * 86400)] == [
        ">100y", "->100y", "36159d18h"]
    assert clean("plain lane") == "plain lane"
    assert clean("a\x1b[2Jb\x07\n\u202e\udcff") == "a\\x1b[2Jb\\x07\\x0a\\u202e\\xff"
    assert clean("\ud800") == "\\ud800"  # a lone surrogate that is no escaped byte


# -- status -----------------------------------------------------------------------------


def test_status_free_session_without_sidecar(session: Path) -> None:
    session.write_text("{}\n")
    result = invoke("status", "--json", str(session))
    assert result.exit_code == 0
    (row,) = rows(result)
    assert row["state"] == "free" and row["pid"] is None


def test_status_of_a_directory_prints_every_row_once_across_its_printed_pieces(
    tmp_path: Path,
) -> None:
    """The table is printed a thousand lines at a time: every session's row comes once,
    in order, aligned with the header, with no line lost or blank between pieces."""
    names = [f"{i:05d}-{'x' * (i % 7)}.jsonl" for i in range(2503)]
    for name in names:
        (tmp_path / name).touch()
    done = cli("status", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("SESSION ") and len(lines) == 1 + len(names)
    assert [line.split()[0].rsplit("/", 1)[-1] for line in lines[1:]] == names
    state_at = lines[0].index("STATE")
    assert all(line[state_at:].startswith("free") for line in lines[1:])


def test_status_live_holder_table_and_json(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="session:agent:main:telegram:channel:42")
    token = h.acquire()
    out = cli("status", str(session))
    assert out.returncode == 0, out.stderr
    header, line = out.stdout.splitlines()
    assert header.split() == [
        "SESSION", "STATE", "PID", "HOST", "LANE", "AGE", "HEARTBEAT", "TOKEN", "FENCE",
    ]  # fmt: skip
    cells = line.split()
    assert cells[1:3] == ["live", str(h.pid)]
    assert cells[4] == "session:agent:main:telegram:channel:42"
    assert cells[7:] == [str(token), "ok"]
    assert "\x1b[" not in out.stdout  # no colour off a terminal
    (row,) = rows(cli("status", "--json", str(session) + ".holder"))
    assert row.keys() >= STATUS_KEYS
    assert row["state"] == "live" and row["pid"] == h.pid and row["token"] == token
    assert row["owner_alive"] is True and row["stuck"] is False and row["phase"] == "write"
    assert row["session"] == str(session) and row["sidecar"] == str(session) + ".holder"
    assert 0 <= row["age"] < 60


def test_status_colour_only_on_request_of_a_terminal(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    spawn_holder(session).acquire()
    coloured = invoke("status", str(session), color=True).stdout
    plain = invoke("status", str(session)).stdout
    assert click_style_green("live") in coloured
    assert "\x1b[" not in plain


@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1"}, {"TERM": "dumb"}, {"NO_COLOR": ""}],
                         ids=["terminal", "no-color", "dumb-terminal", "no-color-empty"])
def test_status_on_a_terminal_is_coloured_unless_asked_not_to_be(
    session: Path, spawn_holder: SpawnHolder, env: dict[str, str]
) -> None:
    """On a terminal the table is coloured, except under NO_COLOR set to anything but
    the empty string (no-color.org), or on a terminal that shows none (TERM=dumb)."""
    spawn_holder(session).acquire()
    master, slave = pty.openpty()
    try:
        environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
        proc = subprocess.Popen([*FENCELOCK, "status", str(session)], stdout=slave,
                                env={**environ, "TERM": "xterm", **env})
        os.close(slave)
        assert proc.wait(timeout=60) == 0
        shown = b""
        while select.select([master], [], [], 0)[0]:  # all it wrote, now it has exited
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed, all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    coloured = env in ({}, {"NO_COLOR": ""})
    assert (click_style_green("live").encode() in shown) is coloured, shown
    assert (b"\x1b[" in shown) is coloured, shown


def click_style_green(text: str) -> str:
    import click

    return click.style(text, fg="green").split(text)[0]


def test_status_stale_exits_3(session: Path, spawn_holder: SpawnHolder) -> None:
    pid = make_stale(spawn_holder, session, lane="heartbeat")
    out = cli("status", "--json", str(session))
    assert out.returncode == 3
    (row,) = rows(out)
    assert row["state"] == "stale" and row["pid"] == pid and row["lane"] == "heartbeat"
    assert row["owner_alive"] is False
    assert f"pid {pid} died" in row["reason"]
    table = cli("status", str(session))
    assert table.returncode == 3 and " stale " in table.stdout


def test_status_stuck_after(session: Path, spawn_holder: SpawnHolder) -> None:
    spawn_holder(session).acquire()
    assert rows(invoke("status", "--json", str(session)))[0]["stuck"] is False
    result = invoke("status", "--json", "--stuck-after", "0", str(session))
    assert result.exit_code == 0
    assert rows(result)[0]["stuck"] is True
    assert "live (stuck)" in invoke("status", "--stuck-after", "0", str(session)).stdout


def test_status_directory(session: Path, spawn_holder: SpawnHolder) -> None:
    d = session.parent
    live, stale, free = d / "live.jsonl", d / "stale.jsonl", d / "free.jsonl"
    spawn_holder(live, lane="l").acquire()
    make_stale(spawn_holder, stale)
    with SessionLock(free, "f") as lock:
        lock.append({"n": 1})
    (d / "orphan.jsonl").write_text("")
    out = cli("status", "--json", str(d))
    assert out.returncode == 3
    states = {Path(r["session"]).name: r["state"] for r in rows(out)}
    assert states == {
        "free.jsonl": "free", "live.jsonl": "live", "orphan.jsonl": "free", "stale.jsonl": "stale",
    }  # fmt: skip
    table = invoke("status", str(d))
    assert table.exit_code == 3
    assert len(table.stdout.splitlines()) == 5


def test_status_json_is_streamed_in_the_documented_layout(session: Path) -> None:
    """The array is printed row by row; its text is json.dumps(rows, indent=2)'s, for
    rows of plain values and for rows that need the general encoder (a name that is not
    ASCII, a record field that is not)."""
    d = session.parent
    assert cli("status", "--json", str(d)).stdout == "[]\n"
    names = ("a.jsonl", "b\u00e9.jsonl", "c.jsonl", "d.jsonl")
    for name in names:
        with SessionLock(d / name, "l\u00e9" if name == "d.jsonl" else "l") as lock:
            lock.append({"n": name})
    out = cli("status", "--json", str(d))
    assert out.returncode == 0
    assert out.stdout == json.dumps(json.loads(out.stdout), indent=2) + "\n"
    assert [Path(r["session"]).name for r in rows(out)] == list(names)
    assert [r["lane"] for r in rows(out)] == ["l", "l", "l", "l\u00e9"]


def test_status_missing_directory_exits_1(tmp_path: Path, session: Path) -> None:
    session.write_text("")
    out = cli("status", str(session), str(tmp_path / "nope" / "x.jsonl"))
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    assert f"its directory {tmp_path / 'nope'} does not exist" in out.stderr
    assert " free " in out.stdout and "x.jsonl" not in out.stdout  # one error line
    # --json has a row for every path given: the missing one reads unreadable, and why.
    out = cli("status", "--json", str(session), str(tmp_path / "nope" / "x.jsonl"))
    assert out.returncode == 1
    free, missing = rows(out)
    assert free["state"] == "free" and missing["state"] == "unreadable"
    assert missing["session"] == str(tmp_path / "nope" / "x.jsonl")
    assert f"its directory {tmp_path / 'nope'} does not exist" in missing["reason"]


@pytest.mark.parametrize("command", ["status", "clear"])
def test_a_json_row_of_a_directory_names_no_sidecar(tmp_path: Path, command: str) -> None:
    """--json's row for a directory it could not list (missing, given as "DIR/") has no
    sidecar, not ``DIR.holder`` or ``DIR/.holder`` (another session's sidecar, and no
    session's), and its absolute path, as every other row has."""
    out = subprocess.run([*FENCELOCK, command, "--json", "nope/"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    [row] = json.loads(out.stdout)
    assert row["session"] == f"{tmp_path / 'nope'}/" and row["sidecar"] is None, row


@pytest.mark.parametrize("command", ["status", "verify", "wait"])
def test_a_tilde_no_shell_expanded_is_named_in_the_error(tmp_path: Path, command: str) -> None:
    """``~/sessions/s.jsonl`` from a unit file or a config reaches fencelock as it is:
    the error says that '~' is the shell's to expand, not only that the directory
    is missing."""
    out = cli(command, "~/sessions/s.jsonl", cwd=tmp_path)
    assert out.returncode == 1, out
    no_traceback(out.stderr, 1)
    assert f"its directory {tmp_path / '~' / 'sessions'} does not exist; '~' is the " \
        "shell's to expand: give the home directory's path" in out.stderr
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("command", ["status", "clear", "clear --remove", "run", "wait",
                                     "recover", "verify", "hold"])
@pytest.mark.parametrize("exists", [True, False], ids=["dir exists", "no dir"])
def test_a_path_ending_in_a_slash_is_never_a_session_beside_it(
    tmp_path: Path, command: str, exists: bool
) -> None:
    """``x/`` names the directory x: no command takes it as the session ``x`` (``run``
    made ``x.holder`` in the working directory), and nothing is created; the commands
    that take a directory (``status``, ``clear``) take it as one."""
    if exists:
        (tmp_path / "x").mkdir()
    words = command.split()
    extra = {"run": ["--lane", "l", "--", "true"], "hold": ["--lane", "l"]}.get(words[0], [])
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", *words, "x/", *extra], cwd=tmp_path,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if command == "status" and exists:
        assert out.returncode == 0 and "no sessions found" in out.stdout  # DIR/ is listed
    elif words[0] == "clear" and exists:
        assert out.returncode == 0 and "cleared 0 stale" in out.stdout  # DIR/'s stale ones
    else:
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "x/" in out.stderr and "Traceback" not in out.stderr
        if not exists:  # "sessions/x.jsonl/" with no such file: the '/' may be the slip
            assert "without the trailing '/'" in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["verify", "wait", "recover"])
def test_a_session_file_typed_with_a_slash_is_not_for_removing(
    tmp_path: Path, command: str
) -> None:
    # The file is the user's session: the trailing '/' is the mistake, not the file.
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n')
    out = cli(command, str(tmp_path / "x.jsonl") + "/")
    assert out.returncode == 1, out
    assert "without the trailing '/'" in out.stderr and "remove" not in out.stderr, out.stderr
    assert (tmp_path / "x.jsonl").read_text() == '{"a": 1}\n'


def test_a_reader_that_stops_reading_ends_the_listing_with_141_not_1(tmp_path: Path) -> None:
    """`status --json DIR | head`: the reader leaves mid-listing. The command ends
    quietly with 141, what a shell shows for a command SIGPIPE ended; not 1, which
    `status` gives a path it cannot read (and a `set -o pipefail` script would take
    for one)."""
    for i in range(400):  # a listing far larger than a pipe holds
        (tmp_path / f"{i:04d}.jsonl").write_text("{}\n")
    with subprocess.Popen([*FENCELOCK, "status", "--json", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(10).startswith(b"[")
        proc.stdout.close()
        assert proc.wait(timeout=60) == 141
        assert proc.stderr.read() == b""


@pytest.mark.parametrize("args", [["status"], ["clear", "--json"]], ids=["table", "clear-json"])
def test_a_reader_that_leaves_during_one_large_write_ends_it_with_141_not_0(
    tmp_path: Path, args: list[str]
) -> None:
    """Output printed in one piece larger than a pipe holds (the status table, `clear
    --json`), whose reader leaves after its first bytes: the command ends with 141 as
    for a streamed listing. (The pipe took part of the write and the rest was dropped
    without an error: the command ended 0, the output cut short.)"""
    for i in range(3000):  # a table of some 200 KB
        (tmp_path / f"{i:04d}.jsonl").write_text("{}\n")
    paths = [str(tmp_path)] if args == ["status"] else sorted(
        str(p) for p in tmp_path.iterdir())
    with subprocess.Popen([*FENCELOCK, *args, *paths],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(10)  # the one write is under way
        proc.stdout.close()
        assert proc.wait(timeout=60) == 141
        assert proc.stderr.read() == b""


def test_status_missing_session_file_is_free(tmp_path: Path) -> None:
    """A session no run has started yet, in a directory that exists, is free."""
    out = cli("status", str(tmp_path / "sessions" / "new.jsonl"))
    assert out.returncode == 0, out.stderr
    assert "free (no file)" in out.stdout
    (row,) = rows(cli("status", "--json", str(tmp_path / "sessions" / "new.jsonl")))
    assert row["state"] == "free" and row["reason"] == "no session file or sidecar yet"


def test_status_unreadable_sidecar_exits_1_and_wins_over_stale(
    session: Path, spawn_holder: SpawnHolder, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_text("x")
    link = session.parent / "link.jsonl.holder"
    link.symlink_to(target)
    make_stale(spawn_holder, session)
    out = cli("status", str(session.parent))
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    assert "link.jsonl.holder: is a symlink" in out.stderr
    assert os.path.islink(link) and target.read_text() == "x"
    assert {r["state"] for r in rows(cli("status", "--json", str(session.parent)))} == {
        "stale", "unreadable",
    }  # fmt: skip


def _as_unprivileged() -> list[str]:
    """A prefix that runs a command without root's power to read anything."""
    if os.geteuid() != 0:
        return []
    marks.require("setpriv")
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    reach = subprocess.run([*prefix, *FENCELOCK, "--version"], capture_output=True, timeout=60)
    if reach.returncode != 0:
        marks.unavailable("setpriv", "an unprivileged user cannot run this installation (a "
                          "private directory on the way to it)",
                          fix="install it where every user can read it: the venv, and for an "
                              "editable install (pip install -e) the checkout too")
    return prefix


@contextlib.contextmanager
def _private_directory(mode: int, *files: str) -> Iterator[Path]:
    """A directory holding empty ``files``, with ``mode`` (0o700 again after, for its
    removal), in one an unprivileged user can reach (not under tmp_path, whose parents
    may be private)."""
    with tempfile.TemporaryDirectory(prefix="fencelock-perm-") as top:
        os.chmod(top, 0o755)
        private = Path(top) / "private"
        private.mkdir()
        for name in files:
            (private / name).write_text("")
        try:
            private.chmod(mode)
            yield private
        finally:
            private.chmod(0o700)


@needs_root  # to drop to another user (root writes any file)
@pytest.mark.parametrize(("torn", "readable"), [(False, True), (True, True), (False, False)])
def test_a_run_that_may_only_read_its_session_warns_only_of_a_torn_line(
    torn: bool, readable: bool
) -> None:
    """`fencelock run` for a reader (the session is another user's, 0644): nothing to
    move aside where the last line is whole, so nothing to say; a torn one is said as
    such, not as an entry to append again. Nor is anything said of one this user can
    neither write nor read (0600): no torn line is known there."""
    prefix = _as_unprivileged()
    with _private_directory(0o755) as sessions:
        os.chown(sessions, 65534, 65534)
        session = sessions / "s.jsonl"
        session.write_bytes(b'{"a": 1}\n' + (b'{"b": 2, "ha' if torn else b""))
        session.chmod(0o644 if readable else 0o600)
        out = subprocess.run(
            [*prefix, *FENCELOCK, "run", str(session), "--lane", "reader", "--", "true"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        if torn:
            assert out.stderr == (
                f"Warning: {session}: its last line is torn and could not be moved aside "
                f"(open failed: Permission denied); a line the command appends would join "
                f"it\n")
        else:
            assert out.stderr == ""


def _run_appending(
    session: Path, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`fencelock run` of a command that appends a line with `>>`, as a shell does."""
    return subprocess.run(
        [*prefix, *FENCELOCK, "run", str(session), "--lane", "writer", "--", "sh", "-c",
         'echo \'{"cmd": 1}\' >> "$FENCELOCK_SESSION"'],
        capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def _a_users_session(content: bytes) -> Iterator[tuple[Path, Path, list[str]]]:
    """A session holding ``content`` and its sidecar, both 0600, in a directory of mode
    0755, all of one user's (nobody's where this is root), and the prefix that runs a
    command as that user (`_as_unprivileged`)."""
    prefix = _as_unprivileged() if os.geteuid() == 0 else []
    with _private_directory(0o755, "s.jsonl.holder") as sessions:
        session = sessions / "s.jsonl"
        session.write_bytes(content)
        for path in (session, sessions / "s.jsonl.holder"):
            if prefix:
                os.chown(path, 65534, 65534)
            path.chmod(0o600)
        yield sessions, session, prefix


def test_a_run_whose_torn_line_cannot_be_moved_aside_does_not_start_its_command() -> None:
    """The session (this user's, writable) ends in a torn line, and its directory takes
    no new files (no `S.torn`): the command, which could append, is not started (its
    line would join the torn one), as an append of the library's own is refused. The
    message names the file that failed and the fix; the session and its torn line are
    left as they were, and the session is free again. (As root, as another user: root
    creates files anywhere.)"""
    with _a_users_session(b'{"a": 1}\n{"b": 2, "ha') as (sessions, session, prefix):
        sessions.chmod(0o555)
        out = _run_appending(session, prefix)
        assert out.returncode == 1, out
        no_traceback(out.stderr, 1)
        assert "its last line is torn and could not be moved aside, so the command was not " \
            "started" in out.stderr
        assert f"{session}.torn: create (keeping the torn last line aside) failed: " \
            f"Permission denied (this user cannot create files in {sessions}" in out.stderr
        assert session.read_bytes() == b'{"a": 1}\n{"b": 2, "ha'
        assert probe(session).state == "free"


@pytest.mark.parametrize("content", [b'{"a": 1}\n{"b": 2, "ha', b'{"a": 1}\n'])
def test_a_run_whose_session_can_be_written_but_not_read_does_not_start_its_command(
    content: bytes,
) -> None:
    """A session this user may write but not read (mode 0200): its tail cannot be
    checked for a torn line, which the command's first line would join, so the command
    is not started, as an append of the library's own is refused; the message says
    what to chmod. Nothing is written. (As root, as another user: root reads anything.)"""
    with _a_users_session(content) as (_, session, prefix):
        session.chmod(0o200)
        out = _run_appending(session, prefix)
        assert out.returncode == 1, out
        no_traceback(out.stderr, 1)
        assert "its last line could not be checked for a torn line, so the command was " \
            "not started" in out.stderr, out.stderr
        assert f"chmod u+r {session}" in out.stderr
        session.chmod(0o600)
        assert session.read_bytes() == content
        assert not Path(f"{session}.torn").exists() and probe(session).state == "free"


@marks.needs_posix  # a FIFO and a symlink
@pytest.mark.parametrize("aside", ["a directory", "a symlink", "a FIFO"])
def test_a_run_whose_torn_line_meets_a_non_regular_aside_file_does_not_start_its_command(
    session: Path, aside: str
) -> None:
    """The session ends in a torn line and `S.torn` is not a regular file (fencelock
    neither follows nor writes it): the command is not started, as where `S.torn` cannot
    be created, and the message names `S.torn` and the fix; nothing is written."""
    torn = Path(f"{session}.torn")
    if aside == "a directory":
        torn.mkdir()
    elif aside == "a symlink":
        torn.symlink_to("elsewhere")
    else:
        os.mkfifo(torn)
    session.write_bytes(b'{"a": 1}\n{"b": 2, "ha')
    out = _run_appending(session)
    assert out.returncode == 1, out
    no_traceback(out.stderr, 1)
    assert "its last line is torn and could not be moved aside, so the command was not " \
        "started" in out.stderr
    assert f"{torn}: is {aside}" in out.stderr and "Remove or rename it" in out.stderr
    assert session.read_bytes() == b'{"a": 1}\n{"b": 2, "ha'
    assert os.path.lexists(torn) and not torn.is_file()
    assert probe(session).state == "free"


@needs_root
@marks.needs_linux
def test_a_run_whose_torn_line_cannot_be_cut_names_the_attribute(session: Path) -> None:
    """An append-only session (chattr +a): the torn part is copied aside but cannot be
    cut, and the refusal says which attribute to clear, not to make room."""
    from conftest import append_only

    session.write_bytes(b'{"a": 1}\n{"b": 2, "ha')
    with append_only(session):
        out = _run_appending(session)
    assert out.returncode == 1, out
    assert "so the command was not started" in out.stderr
    assert "cutting its torn last line" in out.stderr and "chattr -i or -a" in out.stderr
    assert "make room" not in out.stderr
    assert session.read_bytes() == b'{"a": 1}\n{"b": 2, "ha'


@pytest.mark.parametrize("command", ["status", "clear", "verify", "check-config"])
def test_permission_denied_exits_1_not_2(command: str) -> None:
    prefix = _as_unprivileged()
    with _private_directory(0, "a.jsonl") as private:
        out = subprocess.run(
            [*prefix, *FENCELOCK, command, str(private)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    no_traceback(out.stderr, 1)
    assert f"{private}: " in out.stderr
    # verify takes a session file: naming a directory is the clearer cause to report
    expected = "is a directory" if command == "verify" else "Permission denied"
    assert expected in out.stderr


@pytest.mark.parametrize("args", [["status"], ["status", "."], ["clear", "."]],
                         ids=["status", "status-dot", "clear-dot"])
def test_a_working_directory_it_cannot_search_is_a_directory_it_cannot_list(
    args: list[str],
) -> None:
    """Run in a working directory this user may not search (``.`` needs that), the
    directory is still a directory: the error says it cannot be listed, not that it
    is "a directory, not a regular file" with a fix that fails the same way."""
    prefix = _as_unprivileged()
    with _private_directory(0o700, "a.jsonl") as private:  # root's: not the user's
        out = subprocess.run([*prefix, *FENCELOCK, *args], cwd=private,
                             capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 1, out.stderr
    no_traceback(out.stderr, 1)
    assert f"{private}: Permission denied; scan needs a directory" in out.stderr, out.stderr


@pytest.mark.parametrize("command", ["status", "clear"])
def test_json_has_a_row_for_a_directory_it_cannot_list(command: str) -> None:
    """``--json`` names every path it was given: a directory the user cannot enter gets
    an unreadable row (``status``) or an object with its error (``clear``), as a
    missing directory does, not only a line on stderr."""
    prefix = _as_unprivileged()
    with _private_directory(0) as private:
        out = subprocess.run([*prefix, *FENCELOCK, command, "--json", str(private)],
                             capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 1, out.stderr
    no_traceback(out.stderr, 1)
    (row,) = json.loads(out.stdout)
    assert row["session"] == str(private) and "Permission denied" in row["reason"], row
    if command == "status":
        assert row["state"] == "unreadable", row
    else:  # nothing found there, as for a missing path
        assert row["found"] is None and row["error"] == row["reason"], row


@pytest.mark.parametrize("directory", [False, True], ids=["session", "directory"])
def test_status_json_has_a_row_for_a_path_outside_the_backend_s_root(
    session: Path, directory: bool
) -> None:
    """A path outside the etcd backend's root= cannot be named in the store: ``status
    --json`` gives it an unreadable row saying so (as ``clear --json`` does), where it
    printed ``[]``. (Known before any request to etcd: none needs to run.)"""
    session.write_text("")
    path = str(session.parent if directory else session)
    out = cli("status", "--json", "--backend", "etcd://127.0.0.1:1/p?root=/srv/elsewhere",
              path)
    assert out.returncode == 1, out.stderr
    no_traceback(out.stderr, 1)
    (row,) = json.loads(out.stdout)
    assert row["state"] == "unreadable" and "not under the backend's root" in row["reason"]


def test_status_corrupt_record(session: Path) -> None:
    Path(str(session) + ".holder").write_bytes(b'{"version": 1, "state": ')
    for json_flag in ([], ["--json"]):  # with --json, exit 1 was all stderr said
        out = cli("status", *json_flag, str(session))
        assert out.returncode == 1
        no_traceback(out.stderr, 1)
        assert "corrupt" in out.stderr and "--force" in out.stderr
        assert f"{session}.holder" in out.stderr


def test_status_unlistable_directory_exits_1(tmp_path: Path) -> None:
    fifo = tmp_path / "sessions" / "x.jsonl.holder"
    os.mkfifo(fifo)  # a planted FIFO must not hang the listing
    out = cli("status", str(fifo))
    assert out.returncode == 1
    assert "FIFO" in out.stderr or "fifo" in out.stderr.lower()


def test_status_escapes_control_characters(session: Path, spawn_holder: SpawnHolder) -> None:
    evil = "x\x1b]0;pwned\x07\x1b[2Jy"
    spawn_holder(session, lane=evil).acquire()
    result = invoke("status", str(session), color=True)
    assert result.exit_code == 0
    for raw in ("\x1b]0", "\x07", "\x1b[2J"):
        assert raw not in result.stdout
    assert "x\\x1b]0;pwned\\x07\\x1b[2Jy" in result.stdout
    assert rows(invoke("status", "--json", str(session)))[0]["lane"] == evil
    missing = invoke("status", str(session.parent / "a\x1b[2Jb" / "x.jsonl"))
    assert missing.exit_code == 1
    assert "\x1b" not in missing.stderr and "a\\x1b[2Jb" in missing.stderr


def test_status_lists_a_directory_of_10000_sessions(session: Path) -> None:
    """Every row listed and every stale one counted; the time it takes is the
    benchmark's business (bin/fencelock-bench, "scan"), not the test suite's."""
    with SessionLock(session, "bulk") as lock:
        lock.append({"n": 1})
    record = json.loads(Path(str(session) + ".holder").read_bytes())
    d = session.parent
    for i in range(10_000):
        name = d / f"{i:08d}-0000-4000-8000-000000000000.jsonl"
        held = i % 100 == 0
        data = dict(record, session=str(name), state="held" if held else "released")
        Path(str(name) + ".holder").write_text(json.dumps(data))
    out = cli("status", str(d))
    assert out.returncode == 3  # 100 stale ones
    assert len(out.stdout.splitlines()) == 1 + 10_001
    assert sum(" stale " in line for line in out.stdout.splitlines()) == 100


# -- clear ------------------------------------------------------------------------------


def test_clear_stale(session: Path, spawn_holder: SpawnHolder) -> None:
    pid = make_stale(spawn_holder, session, lane="cron")
    out = cli("clear", str(session))
    assert out.returncode == 0, out.stderr
    assert f"cleared the stale record of pid {pid} (lane 'cron')" in out.stdout
    assert probe(session).state == "free"
    assert os.path.exists(str(session) + ".holder")


def test_clear_refuses_live_holder(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="busy")
    h.acquire()
    out = cli("clear", "--remove", str(session))
    assert out.returncode == 4
    no_traceback(out.stderr, 1)
    assert f"pid {h.pid}" in out.stderr and "lane 'busy'" in out.stderr
    assert f"start a fresh session (fencelock recover {session})" in out.stderr  # the way on
    assert probe(session).state == "live"
    # The other way on, as a command that runs as written once the holder lets go.
    assert f"wait for it (fencelock wait {session})" in out.stderr
    assert h.call("release") == "released"
    assert cli("wait", str(session)).returncode == 0


def test_clear_json_and_remove(session: Path, spawn_holder: SpawnHolder) -> None:
    pid = make_stale(spawn_holder, session)
    result = invoke("clear", "--remove", "--json", str(session))
    assert result.exit_code == 0
    (obj,) = json.loads(result.stdout)
    assert obj["found"] == "stale" and obj["pid"] == pid
    assert obj["cleared"] is True and obj["removed"] is True and obj["refused"] is False
    assert not os.path.lexists(str(session) + ".holder")


def test_clear_remove_sidecar_of_a_gone_session(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session)
    h.acquire()
    h.call("release")
    assert not session.exists()  # nothing was appended: only the sidecar exists
    out = cli("clear", "--remove", "--json", str(session) + ".holder")
    assert out.returncode == 0
    (obj,) = json.loads(out.stdout)
    assert obj["found"] == "free" and obj["removed"] is True and obj["cleared"] is False
    assert not os.path.lexists(str(session) + ".holder")


def test_clear_corrupt_needs_force(session: Path) -> None:
    sidecar = Path(str(session) + ".holder")
    sidecar.write_bytes(b"garbage")
    out = cli("clear", str(session))
    assert out.returncode == 1
    no_traceback(out.stderr)
    assert "corrupt" in out.stderr and "--force" in out.stderr
    assert sidecar.read_bytes() == b"garbage"
    forced = cli("clear", "--force", "--json", str(session))
    assert forced.returncode == 0, forced.stderr
    (obj,) = json.loads(forced.stdout)
    assert obj["set_aside"] and Path(obj["set_aside"]).read_bytes() == b"garbage"
    assert not sidecar.exists()


def test_clear_unsafe_sidecar_untouched(session: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    Path(str(session) + ".holder").symlink_to(target)
    out = cli("clear", "--remove", "--force", str(session))
    assert out.returncode == 1
    no_traceback(out.stderr)
    assert "symlink" in out.stderr
    assert os.path.islink(str(session) + ".holder") and target.read_text() == "keep"


def test_clear_missing_path_exits_1(tmp_path: Path) -> None:
    out = cli("clear", str(tmp_path / "no" / "such.jsonl"))
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    assert "such.jsonl" in out.stderr


def test_clear_directory(session: Path, spawn_holder: SpawnHolder) -> None:
    d = session.parent
    stale, live, free = d / "stale.jsonl", d / "live.jsonl", d / "free.jsonl"
    make_stale(spawn_holder, stale)
    h = spawn_holder(live, lane="busy")
    h.acquire()
    with SessionLock(free, "f"):
        pass
    out = cli("clear", str(d))
    assert out.returncode == 0, out.stderr
    # Each session's line as it is done, the directory's count last (a large directory
    # takes a while, and an interrupt must not hide what was done before it).
    assert out.stdout.splitlines() == [
        f"{live}: live: left alone",
        f"{stale}: cleared the stale record of pid {probe(stale).pid} (lane 'dead')",
        f"{d}: cleared 1 stale, left 1 live alone",
    ], out.stdout
    assert probe(stale).state == "free" and probe(live).state == "live"
    assert os.path.exists(str(free) + ".holder")
    removed = cli("clear", "--remove", "--json", str(d))
    assert removed.returncode == 0, removed.stderr
    done = {Path(o["session"]).name: o["removed"] for o in json.loads(removed.stdout)}
    assert done == {"free.jsonl": True, "stale.jsonl": True, "live.jsonl": False}
    left = [o for o in json.loads(removed.stdout) if o["found"] == "live"]
    assert [Path(o["session"]).name for o in left] == ["live.jsonl"]
    assert not os.path.lexists(str(stale) + ".holder")
    assert not os.path.lexists(str(free) + ".holder")
    assert probe(live).state == "live"
    assert h.call("release") == "released"


def test_clear_directory_clears_every_stale_session_when_stdout_goes_away(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """`clear DIR | head -1`: the reader leaves after the first line, and the rest is
    still cleared (it was before each outcome was said as it came); the closed pipe
    decides the exit, 141, as for any command whose reader left."""
    stale = [session.parent / f"s{i}.jsonl" for i in range(3)]
    for path in stale:
        make_stale(spawn_holder, path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first line already fails
    try:
        out = subprocess.run([*FENCELOCK, "clear", str(session.parent)], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert out.returncode == 141, out.stderr
    assert out.stderr == ""
    assert [probe(path).state for path in stale] == ["free"] * 3


def test_a_json_array_cut_short_is_printed_whole(capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupt (or an error) while `status --json` or `clear --json` is still making
    its rows: what came is printed as a whole array, never one without its `]`."""
    from fencelock._output import json_element, stream_json_array

    def rows() -> Iterator[str]:
        for n in range(300):  # past one flush of 256
            yield json_element({"n": n})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_json_array(rows())
    assert json.loads(capsys.readouterr().out) == [{"n": n} for n in range(300)]


def test_clear_directory_with_corrupt_sidecar_exits_1(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    make_stale(spawn_holder, session)
    Path(str(session.parent / "bad.jsonl") + ".holder").write_bytes(b"[")
    out = cli("clear", str(session.parent))
    assert out.returncode == 1
    assert "bad.jsonl.holder: holder record is corrupt" in out.stderr
    assert probe(session).state == "free"  # the stale one was still cleared
    assert out.stdout.splitlines()[-1] == \
        f"{session.parent}: cleared 1 stale, left 0 live alone; 1 could not be cleared"


# -- run --------------------------------------------------------------------------------

REPORT = """
import json, os, sys, fencelock
st = fencelock.probe(os.environ["FENCELOCK_SESSION"])
env = {k: v for k, v in os.environ.items() if k.startswith("FENCELOCK_")}
print(json.dumps({"state": str(st.state), "pid": st.pid, "lane": st.lane, "token": st.token,
                  "run_id": st.record.run_id, "ppid": os.getppid(), "env": env,
                  "lock_fd": os.readlink(f"/proc/self/fd/{env['FENCELOCK_FD']}")}))
sys.exit(int(sys.argv[1]))
"""


def test_run_holds_session_passes_env_and_exit_code(session: Path) -> None:
    out = cli(
        "run", str(session), "--lane", "cron:nightly", "--", sys.executable, "-c", REPORT, "7"
    )
    assert out.returncode == 7, out.stderr
    seen = json.loads(out.stdout)
    assert seen["state"] == "live" and seen["lane"] == "cron:nightly"
    assert seen["pid"] == seen["ppid"]  # fencelock itself holds it
    assert seen["env"] == {
        "FENCELOCK_SESSION": str(session),
        "FENCELOCK_LANE": "cron:nightly",
        "FENCELOCK_TOKEN": str(seen["token"]),
        "FENCELOCK_RUN_ID": seen["run_id"],
        "FENCELOCK_FD": seen["env"]["FENCELOCK_FD"],
    }
    assert seen["lock_fd"] == str(session) + ".holder"  # the lock, shared as with flock(1)
    after = probe(session)
    assert after.state == "free" and after.record is not None
    assert after.record.state == "released" and after.record.token == seen["token"]


APPEND = 'printf \'{"role":"cron"}\\n\' >> "$FENCELOCK_SESSION"'


@pytest.mark.parametrize("existed", [True, False], ids=["session-existed", "command-made-it"])
def test_run_leaves_the_session_its_command_wrote_as_the_released_fence_point(
    session: Path, existed: bool
) -> None:
    """The command's writes are the run's own: the released record's fingerprint is the
    session as the run left it (exact, as in any released record), so that a probe
    reports the fence intact, and a later write by anyone else as moved."""
    if existed:
        session.write_text('{"role":"user"}\n')
    out = cli("run", str(session), "--lane", "cron", "--", "sh", "-c", APPEND)
    assert out.returncode == 0, out.stderr
    status = probe(session)
    assert status.state == "free" and status.record is not None, status
    assert status.record.state == "released"
    assert status.record.fingerprint is not None
    assert status.record.fingerprint.size == session.stat().st_size
    assert status.fence_ok is True, status
    with open(session, "a") as f:  # a write outside the protocol, after the run
        f.write('{"role":"intruder"}\n')
    assert probe(session).fence_ok is False


@pytest.mark.parametrize("torn_aside", ["free", "blocked"])
def test_run_moves_a_torn_last_line_aside_before_its_command_appends(
    session: Path, spawn_holder: SpawnHolder, torn_aside: str
) -> None:
    """A writer that died mid-append left half a line. A run's first `append` moves it
    to `.torn`; a `fencelock run` command makes no `append`, so its first line was glued
    to the fragment. The run moves it aside before the command starts, and says so; where
    it cannot (`.torn` a directory), the command is not started: its line would join it."""
    h = spawn_holder(session, lane="dies")
    h.acquire()
    with open(session, "ab") as f:
        f.write(b'{"n": 1}\n{"n": 2, "ha')  # then the writer is killed
    h.kill()
    torn = Path(f"{session}.torn")
    if torn_aside == "blocked":
        torn.mkdir()  # no file can be made there
    out = cli("run", str(session), "--lane", "cron", "--", "sh", "-c", APPEND)
    assert out.returncode == (0 if torn_aside == "free" else 1), out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    lines = session.read_bytes().split(b"\n")
    if torn_aside == "free":
        assert "its last line was torn (12 bytes" in out.stderr, out.stderr
        assert torn.read_bytes() == b'{"n": 2, "ha\n'
        assert [json.loads(line) for line in lines[:-1]] == [{"n": 1}, {"role": "cron"}]
        assert lines[-1] == b""  # the command's line is whole, on a line of its own
        assert probe(session).fence_ok is True
    else:
        assert "so the command was not started" in out.stderr, out.stderr
        assert lines == [b'{"n": 1}', b'{"n": 2, "ha']  # the command never ran


def test_run_whose_command_left_no_readable_session_still_releases(
    session: Path, tmp_path: Path
) -> None:
    """A command that put a symlink where the session was: the run still releases
    (the record keeps the fence point it had) and exits with the command's code."""
    session.write_text('{"role":"user"}\n')
    swap = f'rm "$FENCELOCK_SESSION" && ln -s {tmp_path / "elsewhere"} "$FENCELOCK_SESSION"'
    out = cli("run", str(session), "--lane", "cron", "--", "sh", "-c", swap)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    record = decode(Path(f"{session}.holder").read_bytes())  # probe refuses the symlink
    assert record is not None and record.state == "released"
    assert record.fingerprint is not None and record.fingerprint.size == 16


ARGV = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['FENCELOCK_LANE']]))"


@pytest.mark.parametrize("options", [
    ["--lane", "mine"], ["--lane=mine", "-w", "5"], ["-n", "--lane", "mine"],
    ["--lane", "mine", "--"],
], ids=["lane", "attached-value", "flag-first", "with-dashes"])
def test_run_reads_its_options_only_up_to_the_command(session: Path, options: list[str]) -> None:
    """As with flock(1), every word from COMMAND's first on is COMMAND's: its options are
    passed to it, never taken by fencelock (`-n` would turn a wait into exit 4, `--lane`
    would rename the run, `--help` would print fencelock's help). `--` stays optional."""
    words = ["-n", "--lane", "other", "--help", "-w", "0", "--", "x"]
    out = cli("run", str(session), *options, sys.executable, "-c", ARGV, *words)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [words, "mine"]


@pytest.mark.parametrize("words", [
    ["--lane", "cron", "--", "./job.sh", "echo", "hello"],
    ["--lane", "cron", "--timeout", "30", "--", "sh", "-c", "echo job ran"],
    ["--", "s.jsonl", "./job.sh"],
], ids=["script", "shell", "session-after-dashes"])
def test_run_with_no_session_before_the_command_is_a_usage_error(
    tmp_path: Path, words: list[str]
) -> None:
    """SESSION forgotten: the command's first word would be taken for it, a sidecar
    made beside it, and the rest run as the command (``echo hello`` in place of the
    job, exit 0). The contract's form is ``run SESSION --lane L -- CMD...``."""
    job = tmp_path / "job.sh"
    job.write_text("#!/bin/sh\necho job\n")
    job.chmod(0o755)
    out = cli("run", *words, cwd=tmp_path)
    assert out.returncode == 2, out
    assert "Missing argument 'SESSION': give it before the command" in out.stderr
    assert "a path that starts with '-' is written ./-NAME" in out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["job.sh", "sessions"]


@needs_proc_locks
def test_run_waits_for_the_holder(session: Path, spawn_holder: SpawnHolder, tmp_path: Path) -> None:
    h = spawn_holder(session, lane="first")
    token = h.acquire()
    ran = tmp_path / "ran"
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "second", "--", sys.executable, "-c",
         f"open({str(ran)!r}, 'w').close()\n{REPORT}", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_blocked_waiter(session, proc=proc)  # waiting in the kernel for the holder ...
    assert not ran.exists()  # ... and CMD has not started
    assert probe(session).pid == h.pid
    assert h.call("release") == "released"
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert ran.exists()
    seen = json.loads(stdout)
    assert seen["lane"] == "second" and seen["token"] == token + 1


@pytest.mark.parametrize("how", [["--no-wait"], ["-n"], ["--timeout", "0.2"]])
def test_run_contended_exits_4(
    session: Path, spawn_holder: SpawnHolder, tmp_path: Path, how: list[str]
) -> None:
    h = spawn_holder(session, lane="holder-lane")
    h.acquire()
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    out = cli("run", str(session), "--lane", "x", *how, "--", *cmd)
    assert out.returncode == 4
    no_traceback(out.stderr, 1)
    assert f"pid {h.pid}" in out.stderr and "lane 'holder-lane'" in out.stderr
    assert not marker.exists()
    assert probe(session).pid == h.pid


def test_run_command_not_found_exits_127(session: Path) -> None:
    out = cli("run", str(session), "--lane", "x", "--", "fencelock-no-such-command-xyz")
    assert out.returncode == 127
    no_traceback(out.stderr, 1)
    assert "fencelock-no-such-command-xyz: command not found" in out.stderr
    assert probe(session).state == "free"


def test_run_not_executable_exits_126(session: Path, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = invoke("run", str(session), "--lane", "x", "--", str(script))
    assert result.exit_code == 126
    assert "permission denied" in result.stderr


def test_run_says_why_a_command_that_exists_cannot_run(session: Path, tmp_path: Path) -> None:
    """A script whose #! interpreter is missing fails with ENOENT, and a directory with
    EACCES: neither is 'command not found' or a bare 'permission denied'."""
    script = tmp_path / "fencelock-test-bad-interpreter"
    script.write_text("#!/nonexistent/interpreter\necho hi\n")
    script.chmod(0o755)
    out = cli("run", str(session), "--lane", "x", "--", str(script))
    assert out.returncode == 127
    no_traceback(out.stderr, 1)
    assert f"its interpreter was not found (check the #! line of {script})" in out.stderr
    on_path = cli("run", str(session), "--lane", "x", "--", script.name,
                  env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert on_path.returncode == 127 and "its interpreter was not found" in on_path.stderr
    out = cli("run", str(session), "--lane", "x", "--", str(tmp_path))
    assert out.returncode == 126
    assert f"{tmp_path}: is a directory" in out.stderr
    assert probe(session).state == "free"


def test_run_takes_a_script_without_a_shebang_and_names_like_a_shell(
    session: Path, tmp_path: Path
) -> None:
    """As execvp(3), shells and so flock(1) do: a script with no #! line runs under
    /bin/sh; a name that only directories on PATH have is not found; an empty name is
    a usage error."""
    script = tmp_path / "no-shebang"
    script.write_text('echo "ran with $*"; exit 3\n')
    script.chmod(0o755)
    out = cli("run", str(session), "--lane", "x", "--", str(script), "a", "b")
    assert (out.returncode, out.stdout) == (3, "ran with a b\n"), out.stderr
    (tmp_path / "bin" / "adir").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = cli("run", str(session), "--lane", "x", "--", "adir", env=env)
    assert out.returncode == 127 and "adir: command not found" in out.stderr
    # A directory of that name earlier on PATH does not hide the script further on.
    (tmp_path / "bin" / "no-shebang").mkdir()
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{tmp_path}{os.pathsep}{os.environ['PATH']}"
    out = cli("run", str(session), "--lane", "x", "--", "no-shebang", "c", env=env)
    assert (out.returncode, out.stdout) == (3, "ran with c\n"), out.stderr
    out = cli("run", str(session), "--lane", "x", "--", "")
    assert out.returncode == 2 and "COMMAND" in out.stderr
    assert probe(session).state == "free"


def test_run_killed_by_signal_exits_128_plus_n(session: Path) -> None:
    out = cli("run", str(session), "--lane", "x", "--", "sh", "-c", "kill -KILL $$")
    assert out.returncode == 128 + signal.SIGKILL
    assert probe(session).state == "free"


@needs_proc_locks
@pytest.mark.parametrize(
    ("sig", "how"),
    [(signal.SIGINT, []), (signal.SIGTERM, []), (signal.SIGHUP, ["--timeout", "300"])],
)
def test_run_interrupted_while_waiting_exits_128_plus_n(
    session: Path, spawn_holder: SpawnHolder, sig: int, how: list[str]
) -> None:
    h = spawn_holder(session, lane="first")
    h.acquire()
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "second", *how, "--", "true"],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _, err = interrupt_waiter(session, proc, sig)
    assert proc.returncode == 128 + sig  # 130 for Ctrl-C
    assert "Traceback" not in err
    assert probe(session).pid == h.pid
    assert h.call("release") == "released"
    assert probe(session).state == "free"


@needs_proc_locks
@needs_tgkill
@pytest.mark.parametrize(("command", "sig"), [
    ("run", signal.SIGTERM), ("hold", signal.SIGTERM), ("wait", signal.SIGINT),
])
def test_a_signal_taken_by_the_waiting_thread_stops_the_wait_at_once(
    session: Path, spawn_holder: SpawnHolder, command: str, sig: int
) -> None:
    """The kernel may hand a signal sent to the process to any of its threads, and a
    signal lands on the main thread just before it blocks as well as inside the call.
    Python runs the handler in the main thread only: without a nudge, the signal would
    wait for the main thread's wait to end (here 300 s). Sending it to the thread that
    sleeps in flock makes the miss certain, so the test fails without the relay."""
    h = spawn_holder(session, lane="first")
    h.acquire()
    args = {"run": ["--lane", "second", "--timeout", "300", "--", "true"],
            "hold": ["--lane", "second", "--timeout", "300"], "wait": ["--timeout", "300"]}
    proc = subprocess.Popen(
        [*FENCELOCK, command, str(session), *args[command]],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_blocked_waiter(session, proc=proc)
        tgkill(proc.pid, thread_in_syscall(proc.pid, "flock"), sig)
        assert proc.wait(timeout=60) == 128 + sig  # stdin stays open meanwhile
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        reap(proc)
    assert probe(session).pid == h.pid
    assert h.call("release") == "released"


WAITS_FOR_SIGTERM = """
import signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print("ready", flush=True)
while True:
    signal.pause()
"""


@needs_tgkill
def test_a_signal_taken_by_the_heartbeat_thread_reaches_the_command(session: Path) -> None:
    """While the command runs, the main thread sleeps in waitpid and the heartbeat
    thread in a timed wait: a SIGTERM the kernel gives the heartbeat thread must still
    be passed on to the command, not kept until the command ends by itself."""
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "x", "--heartbeat", "300", "--",
         sys.executable, "-c", WAITS_FOR_SIGTERM],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        target = thread_in_syscall(proc.pid, "futex")
        tgkill(proc.pid, target, signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"SIGTERM to thread {target} was not passed on; threads now: "
                f"{_threads_of(proc.pid)}"
            ) from None
        assert code == 7  # the command's own exit code, passed on
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        reap(proc)
    assert probe(session).state == "free"


def _threads_of(pid: int) -> dict[str, str]:
    """Each thread of ``pid``: its name, the system call it sleeps in, and its signal
    state (for a failure message)."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            base = f"/proc/{pid}/task/{tid}"
            status = dict(line.split(":\t", 1) for line in Path(f"{base}/status")
                          .read_text().splitlines() if ":\t" in line)
            threads[tid] = (
                f"{Path(f'{base}/comm').read_text().strip()} syscall "
                f"{Path(f'{base}/syscall').read_text().split()[0]} pending "
                f"{status.get('SigPnd', '?')} blocked {status.get('SigBlk', '?')}"
            )
        except OSError as e:
            threads[tid] = str(e)
    return threads


HEARTBEAT_SEEN = """
import os, sys, time, fencelock
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    rec = fencelock.probe(os.environ["FENCELOCK_SESSION"]).record
    if rec.heartbeat_at > rec.acquired_at:
        sys.exit(0)
    time.sleep(0.02)  # polling the record, not synchronising: the deadline bounds it
sys.exit(9)
"""


def test_run_refreshes_the_heartbeat(session: Path) -> None:
    out = cli(
        "run", str(session), "--lane", "x", "--heartbeat", "0.05", "--",
        sys.executable, "-c", HEARTBEAT_SEEN,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


FD_LISTING = """
import json, os
def links(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out
print(json.dumps({"mine": links("self"), "parent": links(os.getppid())}))
"""


def _check_fd_listing(seen: dict[str, list[str]], session: Path) -> None:
    sidecar = str(session) + ".holder"
    assert sidecar in seen["parent"]  # fencelock holds it open: the listing works
    assert seen["mine"]  # and the command's own listing is not empty
    # The command shares the lock's descriptor (as with flock(1)) and no other sidecar's.
    assert [p for p in seen["mine"] if p.endswith(".holder")] == [sidecar]


def test_run_command_shares_only_the_lock_s_descriptor(session: Path) -> None:
    out = cli("run", str(session), "--lane", "x", "--", sys.executable, "-c", FD_LISTING)
    assert out.returncode == 0, out.stderr
    _check_fd_listing(json.loads(out.stdout), session)


def test_run_in_process_does_not_leak_descriptors(session: Path, tmp_path: Path) -> None:
    # In-process the test runner has many descriptors open; none may reach the command,
    # not even another held session's.
    result_file = tmp_path / "fds.json"
    script = FD_LISTING.replace("print(", f"open({str(result_file)!r}, 'w').write(")
    with SessionLock(session.parent / "other.jsonl", "other"):
        result = invoke("run", str(session), "--lane", "x", "--", sys.executable, "-c", script)
    assert result.exit_code == 0, result.output
    _check_fd_listing(json.loads(result_file.read_text()), session)


SIGNALLED = """
import signal, sys
def on(sig, frame):
    print("got", sig, flush=True)
    sys.stdin.readline()
    sys.exit(40 + sig)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
          signal.SIGUSR2, signal.SIGALRM):
    signal.signal(s, on)
print("ready", flush=True)
while True:
    signal.pause()
"""


# Every signal whose default action would end `fencelock run` holding the session.
RUN_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
               signal.SIGUSR2, signal.SIGALRM]


@pytest.mark.parametrize("sig", RUN_SIGNALS)
def test_run_forwards_signals_and_releases_after(session: Path, sig: int) -> None:
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "sig", "--", sys.executable, "-c", SIGNALLED],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # no controlling terminal: every signal is forwarded
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        assert proc.stdout.readline() == f"got {int(sig)}\n"
        assert probe(session).state == "live"  # still held while the command cleans up
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 40 + sig
    finally:
        # The command is in run's new session: where run did not pass the signal on, it
        # outlives run with the pipes open, and communicate() would never return.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert probe(session).state == "free"


@pytest.mark.parametrize("ascii_stderr", [False, True])
def test_exit_codes_hold_when_stderr_cannot_be_written(
    session: Path, spawn_holder: SpawnHolder, ascii_stderr: bool
) -> None:
    """A script branches on 4 (contended) or 127 (not found) whether or not the message
    could be shown: a full disk or a closed pipe on stderr does not turn them into 1."""
    h = spawn_holder(session, lane="holder")
    h.acquire()
    # An ASCII stderr too: click then wraps the stream's buffer in a writer of its own.
    env = {**os.environ, "PYTHONIOENCODING": "ascii"} if ascii_stderr else None
    with open("/dev/full", "w") as full:
        def code(*args: str) -> int:
            return subprocess.run([*FENCELOCK, *args], stderr=full, stdout=subprocess.DEVNULL,
                                  timeout=60, env=env).returncode

        assert code("run", str(session), "--lane", "t", "--no-wait", "--", "true") == 4
        assert code("wait", str(session), "--timeout", "0") == 4
        assert code("clear", str(session)) == 4
        other = str(session.with_name("other.jsonl"))
        assert code("run", other, "--lane", "t", "--", "no-such-command-zz") == 127


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "ascii:surrogateescape"])
def test_a_name_the_terminal_cannot_show_is_escaped_not_a_traceback(
    tmp_path: Path, encoding: str
) -> None:
    """Standard output in an encoding that lacks a character of a session's name (an
    ASCII or Latin-1 terminal): the name is shown escaped, the command does its job."""
    session = tmp_path / "caf\u00e9\u0301.jsonl"  # é, then a combining accent
    session.write_text('{"n":0}\n')
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    for args in (("status", str(tmp_path)), ("verify", str(session)), ("clear", str(session))):
        done = cli(*args, env=env, encoding=encoding.split(":")[0])
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
        assert "\\u0301" in done.stdout, (args, done.stdout)


def test_a_sidecar_of_no_session_has_a_row_a_script_can_split(tmp_path: Path) -> None:
    """A stray ``.holder`` in the working directory: its row's SESSION cell is ``./``,
    not empty, so that splitting the row on blanks still gives the state second."""
    (tmp_path / ".holder").touch()
    (tmp_path / "a.jsonl").touch()
    done = cli("status", ".", cwd=tmp_path)
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["./", "unreadable"], ["a.jsonl", "free"]], done.stdout


_UNDER_A_LIMIT = """
import importlib, os, pkgutil, resource, sys
import fencelock
for m in pkgutil.iter_modules(fencelock.__path__):  # loaded before the limit is set
    if m.name.startswith("_") and m.name != "__main__":
        importlib.import_module("fencelock." + m.name)
from fencelock._entry import main
{limit}
sys.argv = ["fencelock", *sys.argv[1:]]
main(prog_name="fencelock")
"""
"""The command line, with every fencelock module loaded, run once ``limit`` is set."""

_NO_THREADS = _UNDER_A_LIMIT.format(limit="""
resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))  # no second thread, no child
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # root is not held to the limit
""")


@marks.needs_root
@pytest.mark.parametrize("command", ["run", "hold"])
def test_no_thread_to_be_had_is_one_line_naming_the_limit(command: str) -> None:
    """`run` and `hold` start threads (signal relays, the stdin reader): where the
    user's limit on processes and threads (`ulimit -u`) leaves none, one line says so
    and what to raise, not a traceback; nothing is left held."""
    from privdrop import open_directory

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        args = ["--", "true"] if command == "run" else []
        done = subprocess.run(
            [sys.executable, "-c", _NO_THREADS, command, str(session), "--lane", "x", *args],
            input='{"op":"release"}\n', capture_output=True, text=True, timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "ulimit -u" in done.stderr, done.stderr
        assert probe(session).state == "free"


_LITTLE_MEMORY = _UNDER_A_LIMIT.format(limit="""
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
# Room for one thread's stack (8 MiB), not two: `run`'s first thread starts, a later
# one cannot.
resource.setrlimit(resource.RLIMIT_AS, (size + (12 << 20), resource.RLIM_INFINITY))
""")


@needs_proc
def test_a_thread_run_cannot_start_stops_it_before_its_command_runs(tmp_path: Path) -> None:
    """Memory for one more thread but not two: `run` fails, saying why, and its command
    never ran (the heartbeat's thread was started after the command: `run` exited 1
    while the command ran on, holding the session, its exit code lost)."""
    session, marker = tmp_path / "s.jsonl", tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-c", _LITTLE_MEMORY, "run", str(session), "--lane", "x", "--",
         "sh", "-c", 'touch "$0"', str(marker)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1 and "cannot start a thread" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert cli("wait", str(session), "--timeout", "30").returncode == 0  # nothing holds it
    assert not marker.exists()


def test_a_stop_signal_as_run_ends_leaves_the_command_s_exit_code(session: Path) -> None:
    """A SIGTERM that reaches `fencelock run` once its command has ended and the
    session is released (the group-wide copy of a `timeout(1)`, landing late on a busy
    host) must not end it with 143: its code is the command's from then on (before,
    the handlers put back were the defaults, and the signal killed it)."""
    here = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, str(here / "late_signal_run.py"), "run", str(session), "--lane",
         "x", "--", "sh", "-c", "exit 7"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 7, (done.returncode, done.stderr)
    assert probe(session).state == ProbeState.FREE


AFTER_A_RUN = """
import subprocess, sys
from fencelock._entry import main
try:
    main(args=["run", sys.argv[1], "--lane", "x", "--", "true"])
except SystemExit as e:
    assert e.code == 0, e.code
print(subprocess.run(["grep", "SigIgn", "/proc/self/status"], capture_output=True,
                     text=True).stdout.split()[1])
"""


@needs_proc
def test_a_program_started_after_run_does_not_inherit_its_stop_signals_ignored(
    session: Path
) -> None:
    """What keeps a late signal from changing `run`'s exit code is a handler that does
    nothing, not SIG_IGN: a program the process starts afterwards (a caller that goes
    on after the command line) would inherit that, and could not be stopped."""
    done = subprocess.run([sys.executable, "-c", AFTER_A_RUN, str(session)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    ignored = int(done.stdout.strip(), 16)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        assert not ignored & (1 << (sig - 1)), done.stdout


IGNORED_THEN_WAIT = """
import sys
print(open("/proc/self/status").read().split("SigIgn:")[1].split()[0], flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_a_signal_the_caller_ignores_stays_ignored_for_run_and_its_command(
    session: Path, sig: int
) -> None:
    """``nohup fencelock run ...``: as with flock(1), a signal ignored when run starts
    neither stops it nor reaches the command, which starts with it ignored too."""
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "nohup", "--", sys.executable, "-c",
         IGNORED_THEN_WAIT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ignored = int(proc.stdout.readline(), 16)
        assert ignored & (1 << (sig - 1)), f"{ignored:x}"  # the command ignores it too
        proc.send_signal(sig)  # discarded by the kernel: ignored where it is sent
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert probe(session).state == "free"


# -- wait -------------------------------------------------------------------------------
# -- wait -------------------------------------------------------------------------------


def test_wait_free_and_stale_exit_0(session: Path, spawn_holder: SpawnHolder) -> None:
    assert cli("wait", str(session)).returncode == 0
    make_stale(spawn_holder, session)
    assert invoke("wait", "--timeout", "0", str(session)).exit_code == 0


def test_wait_timeout_exits_4_naming_holder(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="slow")
    h.acquire()
    out = cli("wait", str(session), "--timeout", "0.2")
    assert out.returncode == 4
    no_traceback(out.stderr, 1)
    assert f"pid {h.pid}" in out.stderr and "lane 'slow'" in out.stderr and "0.2s" in out.stderr
    assert "wait longer (--timeout)" in out.stderr
    assert f"start a fresh session (fencelock recover {session})" in out.stderr


@pytest.mark.parametrize("held", [True, False], ids=["gave up", "free"])
def test_a_command_that_gave_up_a_wait_ends_without_a_slow_shutdown(
    session: Path, spawn_holder: SpawnHolder, tmp_path: Path, held: bool
) -> None:
    """`wait --timeout` that gives up leaves its helper blocked in flock: were the
    holder to let go while the interpreter shuts down, the helper would get the lock
    and keep it (no thread runs then) until the process was gone, and other commands
    would read it as a holder outside fencelock. So such a command ends at once, its
    answer out, skipping the interpreter's shutdown (here: an atexit hook, which does
    not run); one that did not give up a wait shuts down as usual."""
    if held:
        spawn_holder(session, lane="slow").acquire()
    marker = tmp_path / "shut down"
    script = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
        "from fencelock._entry import main\n"
        f"sys.argv = ['fencelock', 'wait', {str(session)!r}, '--timeout', '0.2']\n"
        "main(prog_name='fencelock')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == (4 if held else 0), out.stderr
    if held:
        assert "after 0.2s, still held by " in out.stderr
        assert "wait longer (--timeout)" in out.stderr
    assert marker.exists() is not held


@needs_proc_locks
@pytest.mark.parametrize("timeout", [[], ["--timeout", "600"]])
def test_wait_returns_when_released(
    session: Path, spawn_holder: SpawnHolder, timeout: list[str]
) -> None:
    h = spawn_holder(session)
    h.acquire()
    proc = subprocess.Popen([*FENCELOCK, "wait", str(session), *timeout],
                            stderr=subprocess.PIPE, text=True)
    wait_for_blocked_waiter(session, proc=proc)  # it waits for the holder, in the kernel
    assert proc.poll() is None
    assert probe(session).pid == h.pid
    assert h.call("release") == "released"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == ""  # no progress line off a terminal


def _read_until(fd: int, needle: bytes, limit: float = 30) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, data
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, data
            data += chunk
    return data


def test_wait_progress_line_on_a_terminal(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="slow-lane")
    h.acquire()
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*FENCELOCK, "wait", str(session)], stderr=slave)
        os.close(slave)
        shown = _read_until(master, b"waited").decode()
        assert f"pid {h.pid}" in shown and "lane 'slow-lane'" in shown
        assert "for" in shown and "waited" in shown and "\r" in shown
        assert h.call("release") == "released"
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(master)


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}],
                         ids=["no-color", "dumb-terminal"])
def test_wait_progress_line_without_colour_or_cursor(
    session: Path, spawn_holder: SpawnHolder, env: dict[str, str]
) -> None:
    """NO_COLOR takes colour away, not the line's redrawing in place (a line left
    uncleared shows the old text after a shorter one); a terminal that moves no cursor
    (TERM=dumb) gets no progress line, only the outcome."""
    h = spawn_holder(session, lane="slow-lane")
    h.acquire()
    master, slave = pty.openpty()
    try:
        environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
        proc = subprocess.Popen([*FENCELOCK, "wait", "--timeout", "1.5", str(session)],
                                stderr=slave, env={**environ, "TERM": "xterm", **env})
        os.close(slave)
        shown = _read_until(master, b"wait longer")
        assert proc.wait(timeout=60) == 4
    finally:
        os.close(master)
    if "TERM" in env:
        assert b"\r" not in shown.replace(b"\r\n", b"") and b"waited" not in shown, shown
    else:
        assert b"\r\x1b[K" in shown and b"waited" in shown, shown


_OWN_GROUP_COMMAND = """
import os, signal, sys
os.setpgid(0, 0)  # as timeout(1) and setsid(1) do: out of the terminal's foreground group
got = []
signal.signal(signal.SIGINT, lambda *_: got.append(1))
print("ready", os.getpid(), "!", flush=True)
while not got:
    signal.pause()
print("got SIGINT", flush=True)
"""


def test_ctrl_c_reaches_a_command_that_left_the_foreground_group(session: Path) -> None:
    """Ctrl-C on run's terminal: a command in a process group of its own (``timeout``,
    ``setsid``) never gets the terminal's SIGINT, so run passes it on (it skips only a
    command that the terminal reached itself); otherwise the run cannot be stopped from
    its terminal and holds the session."""
    pid, master = pty.fork()
    if pid == 0:  # the child: a session of its own, the pty its controlling terminal
        os.execv(sys.executable, [sys.executable, "-m", "fencelock", "run", str(session),
                                  "--lane", "x", "--", sys.executable, "-c",
                                  _OWN_GROUP_COMMAND])
    command = 0
    try:
        command = int(_read_until(master, b"!").split(b"ready ")[1].split()[0])
        os.write(master, b"\x03")  # Ctrl-C
        shown = _read_until(master, b"got SIGINT")
        assert b"got SIGINT" in shown
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for leftover in (command, pid):  # the command first: in a group of its own
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                if leftover:
                    os.kill(leftover, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(master)
    assert probe(session).state == ProbeState.FREE


_NESTED: dict[str, list[str] | None] = {
    "run": ["run", "{S}", "--lane", "inner", "--", "true"],
    "wait": ["wait", "{S}"],
    "recover": ["recover", "--wait", "600", "{S}"],
    "clear": ["clear", "{S}"],  # whose advice, to wait or recover, would be refused so
    "library": None,  # SessionLock(S).acquire() in a Python command
}


@pytest.mark.parametrize("inner", sorted(_NESTED))
def test_taking_the_session_again_under_its_own_run_is_refused_not_a_hang(
    session: Path, inner: str
) -> None:
    """A command of ``fencelock run S`` (or anything it starts) holds S through the
    descriptor it inherited: taking S again from there would wait for itself for ever.
    It is refused at once (exit 4, SessionContendedError), naming the run; another
    session is taken as usual."""
    other = session.parent / "other.jsonl"
    for target, refused in ((session, True), (other, False)):
        command = _NESTED[inner]
        if command is None:
            nested = [sys.executable, "-c",
                      "import sys, fencelock\n"
                      "try:\n"
                      "    fencelock.SessionLock(sys.argv[1], 'inner').acquire()\n"
                      "except fencelock.SessionContendedError as e:\n"
                      "    print(e, file=sys.stderr); sys.exit(4)\n", str(target)]
        else:
            nested = [*FENCELOCK, *(a.replace("{S}", str(target)) for a in command)]
        proc = subprocess.Popen([*FENCELOCK, "run", str(session), "--lane", "outer", "--",
                                 *nested], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=60)
        finally:  # a hang: the nested command too, which waits for itself for ever
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        if refused:
            assert proc.returncode == 4, err
            assert "held by the fencelock run this process runs under" in err
            assert "FENCELOCK_FD" in err and "Traceback" not in err
        else:
            assert proc.returncode == 0, err
    assert probe(session).state == ProbeState.FREE


@needs_proc_locks
@pytest.mark.parametrize("stale", ["fencelock's own descriptor", "another run's id",
                                   "its own open, the run live"])
def test_a_stale_fencelock_fd_does_not_refuse_a_wait(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, stale: str
) -> None:
    """A process that outlived its run keeps FENCELOCK_FD and FENCELOCK_RUN_ID in its
    environment after closing the descriptor; the number then names something else of
    its own, perhaps on the same sidecar. Its waits go on as any: only the run's own
    descriptor, with the record naming that run, proves it waits for itself."""
    holder = spawn_holder(session, lane="other")
    holder.acquire()
    sidecar = str(session) + ".holder"
    record = probe(session).record
    assert record is not None
    with contextlib.ExitStack() as stack:
        if stale == "fencelock's own descriptor":  # a tracked one: a wait's, say
            fd, _ = _sidecar.open_checked(sidecar, create=False)
            stack.callback(_sidecar.close, fd)
            monkeypatch.setenv("FENCELOCK_RUN_ID", record.run_id)
        else:  # the program's own open of the sidecar: it carries no lock
            fd = os.open(sidecar, os.O_RDONLY)
            stack.callback(os.close, fd)
            monkeypatch.setenv("FENCELOCK_RUN_ID", "0123456789ab-7" if stale ==
                               "another run's id" else record.run_id)
        monkeypatch.setenv("FENCELOCK_FD", str(fd))
        outcome: list[Any] = []
        t = threading.Thread(target=lambda: outcome.append(recover(session, wait=60,
                                                                   fresh=False)))
        t.start()
        wait_for_blocked_waiter(session)  # waiting, not refused
        assert holder.call("release") == "released"
        t.join(60)
    [done] = outcome
    assert done.action == "refire"


@pytest.mark.parametrize("value", ["7" * 5000, "\u0663", "-3", "abc"])
def test_a_malformed_fencelock_fd_is_ignored(
    session: Path, spawn_holder: SpawnHolder, value: str
) -> None:
    """FENCELOCK_FD is read only as a descriptor number: anything else (past Python's
    integer-string limit, non-ASCII digits, a sign) is ignored, and the wait goes on."""
    holder = spawn_holder(session, lane="other")
    holder.acquire()
    out = subprocess.run([*FENCELOCK, "wait", str(session), "--timeout", "0.2"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FENCELOCK_FD": value})
    assert out.returncode == 4 and "after 0.2s, still held by pid " in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@needs_proc
@pytest.mark.parametrize("caller", [None, "C", "POSIX"])
def test_the_command_gets_the_caller_s_lc_ctype_not_python_s_coerced_one(
    session: Path, caller: str | None
) -> None:
    """Under a C locale (cron, ``env -i``) Python's interpreter sets LC_CTYPE=C.UTF-8
    in its own environment (PEP 538); the command must get the caller's, or byte-wise
    text tools change their results under it."""
    env = {"PATH": os.environ["PATH"]}
    if "PYTHONPATH" in os.environ:  # the tree under test, where it is not installed
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if caller is not None:
        env["LC_CTYPE"] = caller
    out = subprocess.run(
        [*FENCELOCK, "run", str(session), "--lane", "x", "--", "sh", "-c",
         'printf "%s\\n" "${LC_CTYPE-<unset>}"'],  # not Python: it would coerce its own
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (caller or "<unset>")


@pytest.mark.parametrize("command", ["run", "recover"])
def test_a_utf8_lane_under_an_ascii_locale_is_the_lane(session: Path, command: str) -> None:
    """With Python's locale coercion and UTF-8 mode off under the C locale, arguments
    are read in as ASCII with their other bytes escaped: a lane given in UTF-8 is still
    that lane (in the record, and in the command's FENCELOCK_LANE), not refused as
    "not valid UTF-8", and no traceback where the environment is encoded."""
    lane = "lan\u00e9\u2192y"
    env = {**os.environ, "LC_ALL": "POSIX", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    if command == "recover":
        session.write_text("")
        holder = subprocess.Popen([*FENCELOCK, "run", str(session), "--lane", "busy", "--",
                                   "sh", "-c", "echo held; read line"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"held\n"
        out = subprocess.run([*FENCELOCK, "recover", str(session), "--wait", "0",
                              "--lane", lane, "--json"], capture_output=True, env=env,
                             timeout=60)
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
        assert out.returncode == 0, out.stderr
        fresh = json.loads(out.stdout)["session"]
        made = probe(fresh).record
        assert made is not None and made.lane == lane
        return
    out = subprocess.run([*FENCELOCK, "run", str(session), "--lane", lane, "--", "sh", "-c",
                          'printf "%s" "$FENCELOCK_LANE"'], capture_output=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == lane.encode()
    record = probe(session).record
    assert record is not None and record.lane == lane


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "utf-8"])
def test_a_lane_a_non_utf8_locale_read_whole_stays_as_it_is(
    monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    """Only a lane that arrived as escaped bytes (an ASCII locale's reading of UTF-8) is
    read again as UTF-8; one a Latin-1 locale read in whole ("lan\u00e9") is the lane."""
    import click

    from fencelock._cli import _lane_text

    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: encoding)
    ctx = click.Context(main)
    param = click.Option(["--lane"])
    given = "lan\u00e9".encode().decode(encoding, "surrogateescape")  # as Python reads it
    assert _lane_text(ctx, param, given) == (
        "lan\u00c3\u00a9" if encoding == "latin-1" else "lan\u00e9")  # Latin-1: its letters
    assert _lane_text(ctx, param, "lan\u00e9") == "lan\u00e9"  # read whole: the lane
    assert _lane_text(ctx, param, "lan\udce9") == "lan\udce9"  # not UTF-8: refused later


def test_wait_unreadable_exits_1(session: Path) -> None:
    os.mkdir(str(session) + ".holder")
    out = cli("wait", str(session))
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    assert "directory" in out.stderr


# -- recover ----------------------------------------------------------------------------


def test_recover_free_and_stale_refire(session: Path, spawn_holder: SpawnHolder) -> None:
    session.write_text("{}\n")
    out = cli("recover", str(session))
    assert out.returncode == 0 and out.stdout.strip() == str(session)
    make_stale(spawn_holder, session)
    result = invoke("recover", "--json", str(session))
    assert result.exit_code == 0
    obj = json.loads(result.stdout)
    assert obj["action"] == "refire" and obj["session"] == str(session)
    assert obj["holder"]["state"] == "stale"
    assert probe(session).state == "free"


def test_recover_live_goes_fresh_or_exits_4(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    h.call('append {"role": "user"}')
    refused = cli("recover", "--wait", "0", "--no-fresh", str(session))
    assert refused.returncode == 4
    assert f"pid {h.pid}" in refused.stderr
    # The way on is recover without --no-fresh, not the command just given.
    assert "without --no-fresh" in refused.stderr and "(fencelock recover" not in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    out = cli("recover", "--wait", "0", "--json", str(session))
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert obj["action"] == "fresh" and obj["original"] == str(session)
    assert obj["session"] != str(session) and obj["carried_lines"] == 1
    assert Path(obj["session"]).read_text().count("\n") == 1
    assert probe(session).pid == h.pid  # the live run was not disturbed


# -- verify -----------------------------------------------------------------------------


def test_verify_clean_session(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session)
    h.acquire()
    h.call('append {"n": 1}')
    h.call('append {"n": 2}')
    out = cli("verify", str(session))
    assert out.returncode == 0, out.stdout
    assert out.stdout.strip().endswith(": ok")


def test_verify_problems_exit_5(session: Path) -> None:
    session.write_text(
        '{"_fencelock": {"token": 5, "run_id": "a"}}\n'
        '{"_fencelock": {"token": 3, "run_id": "b"}}\n'
        "not json\n"
        '{"torn": '
    )
    out = cli("verify", str(session))
    assert out.returncode == 5
    assert f"{session}:2: token-backwards: token 3 after token 5" in out.stdout
    result = invoke("verify", "--json", str(session))
    assert result.exit_code == 5
    obj = json.loads(result.stdout)
    assert obj["ok"] is False and obj["max_token"] == 5 and obj["stamped"] == 2
    assert [(p["line"], p["kind"]) for p in obj["problems"]] == [
        (2, "token-backwards"), (3, "torn"), (4, "torn"),
    ]  # fmt: skip


def test_verify_passes_over_blank_lines(session: Path) -> None:
    """A blank line holds no entry (readers of session files pass over it): no torn
    line, as a line that is not JSON is."""
    session.write_bytes(b'{"a": 1}\n\n  \t\r\n{"b": 2}\n\n')
    out = cli("verify", str(session))
    assert out.returncode == 0 and out.stdout.endswith(": ok\n"), out.stdout
    session.write_bytes(b'{"a": 1}\n.\n')
    assert cli("verify", str(session)).returncode == 5  # one character is not blank


def test_verify_missing_directory_exits_1(tmp_path: Path) -> None:
    out = cli("verify", str(tmp_path / "nope" / "x.jsonl"))
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    assert str(tmp_path / "nope") in out.stderr and "does not exist" in out.stderr


@pytest.mark.parametrize("kind", ["missing-directory", "directory"])
def test_verify_json_that_cannot_read_says_why_on_stdout(tmp_path: Path, kind: str) -> None:
    """A caller parsing stdout gets the report's shape with the error, not nothing."""
    target = tmp_path / "nope" / "x.jsonl" if kind == "missing-directory" else tmp_path
    out = cli("verify", "--json", str(target))
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    said = json.loads(out.stdout)
    assert said["ok"] is False and said["lines"] is None and said["session"] == str(target)
    assert said["error"] and str(target if kind == "directory" else target.parent) in \
        said["error"]


def test_verify_missing_session_file_is_clean_and_says_so(session: Path) -> None:
    out = cli("verify", str(session))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{session}: no such file yet, 0 lines, 0 stamped, max token 0: ok"
    obj = json.loads(cli("verify", "--json", str(session)).stdout)
    assert obj["exists"] is False and obj["ok"] is True and obj["lines"] == 0


# -- no tracebacks for expected failures --------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda s: ["status", str(s.parent / "missing" / "x.jsonl")],
        lambda s: ["clear", str(s.parent / "missing" / "x.jsonl")],
        lambda s: ["run", str(s.parent / "missing" / "x.jsonl"), "--lane", "x", "--", "true"],
        lambda s: ["wait", str(s.parent / "missing" / "x.jsonl")],
        lambda s: ["recover", str(s.parent / "missing" / "x.jsonl")],
        lambda s: ["verify", str(s.parent)],
        lambda s: ["check-config", str(s.parent)],
    ],
)
def test_expected_failures_are_short_and_exit_1(
    session: Path, make: Callable[[Path], list[str]]
) -> None:
    out = cli(*make(session))
    assert out.returncode == 1, (out.stdout, out.stderr)
    no_traceback(out.stderr)
    assert str(session.parent) in out.stderr


# -- seconds: NaN refused, infinity means no limit ------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["wait", "S", "--timeout", "nan"],
        ["run", "S", "--lane", "x", "--timeout", "nan", "--", "true"],
        ["run", "S", "--lane", "x", "--heartbeat", "NaN", "--", "true"],
        ["recover", "S", "--wait", "nan"],
        ["status", "S", "--stuck-after", "nan"],
        ["wait", "S", "--timeout", "-1"],
        ["wait", "S", "--timeout", "10x"],
        ["status", "S", "--stuck-after", "-1m"],
        ["run", "S", "--lane", "x", "--heartbeat", "-1e-400", "--", "true"],
    ],
)
def test_nan_or_negative_seconds_are_usage_errors(session: Path, args: list[str]) -> None:
    result = invoke(*[str(session) if a == "S" else a for a in args])
    assert result.exit_code == 2, result.output
    assert "not a number of seconds" in result.output


def test_seconds_may_be_given_with_a_unit(session: Path, spawn_holder: SpawnHolder) -> None:
    """`--stuck-after 10m`, `--timeout 250ms`: a duration as people write one."""
    from fencelock._cli import SECONDS

    assert [SECONDS.convert(v, None, None) for v in ("90s", "10m", "1.5h", "250ms", "1d")] \
        == [90.0, 600.0, 5400.0, 0.25, 86400.0]
    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    fresh = rows(cli("status", "--json", "--stuck-after", "10m", str(session)))
    assert fresh[0]["state"] == "live" and fresh[0]["stuck"] is False, fresh
    assert cli("wait", str(session), "--timeout", "250ms").returncode == 4
    # A capital M is minutes to some, months to others (systemd): refused, not guessed.
    ambiguous = invoke("wait", str(session), "--timeout", "10M")
    assert ambiguous.exit_code == 2, ambiguous.output
    assert "'10M' is ambiguous (M is months in some tools): give minutes as 10m" \
        in ambiguous.output
    assert SECONDS.convert("250MS", None, None) == 0.25  # (no M alone: as before)


@pytest.mark.parametrize("command", [["run", "S", "--lane", "x", "--", "true"],
                                     ["hold", "S", "--lane", "x"]])
@pytest.mark.parametrize("beat", ["1e-6", "0.009", "1e-400", "\uff11e-400", "1e-400ms"])
def test_a_heartbeat_under_10_ms_is_a_usage_error(session: Path, command: list[str],
                                                   beat: str) -> None:
    """Each beat writes the record: --heartbeat 1e-6 kept a CPU busy writing it. 1e-400,
    0.0 as a float, is refused too, not taken for 0 (never)."""
    args = [str(session) if a == "S" else a for a in command]
    result = invoke(*args[:4], "--heartbeat", beat, *args[4:])
    assert result.exit_code == 2, result.output
    assert f"'{beat}' is under 0.01 s: give 0 (never) or at least 0.01" in result.output
    assert not session.exists() and not Path(f"{session}.holder").exists()


def test_infinite_seconds_mean_no_limit(session: Path, spawn_holder: SpawnHolder) -> None:
    """--timeout inf waits for the holder like no --timeout (it used to overflow), and
    --heartbeat inf never beats."""
    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "next", "--timeout", "inf",
         "--heartbeat", "inf", "--", sys.executable, "-c", "print('ran')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for_blocked_waiter(session)
    assert holder.call("release") == "released"
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (0, "ran"), err
    assert cli("wait", str(session), "--timeout", "inf").returncode == 0
    recovered = cli("recover", str(session), "--wait", "inf")
    assert recovered.returncode == 0 and recovered.stdout.strip() == str(session)


def test_the_library_takes_the_same_seconds(session: Path) -> None:
    from fencelock import _wait

    with pytest.raises(ValueError, match="timeout"):
        SessionLock(session, timeout=float("nan"))
    assert SessionLock(session, timeout=float("inf")).timeout is None
    assert _wait.limit(1e308) is None and _wait.limit(2.5) == 2.5
    # An integer past a float's range is no limit, not an OverflowError; a string or
    # a bool is refused naming the parameter, not by a math function's message.
    assert SessionLock(session, timeout=10**400).timeout is None
    assert SessionLock(session, timeout=Decimal("1.5")).timeout == 1.5  # type: ignore[arg-type]
    assert SessionLock(session, timeout=Fraction(3, 2)).timeout == 1.5  # type: ignore[arg-type]
    for wrong in ("5", True):
        with pytest.raises(TypeError, match="timeout must be None or a number of seconds"):
            SessionLock(session, timeout=wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NUL byte"):
        SessionLock(str(session) + "\0x")
    # An empty path (an unset variable) names nothing, as the command line says, and
    # is not taken for the working directory (fresh_session named a file in its parent).
    for call in (SessionLock, probe, lambda p: list(scan(p)), fresh_session, clear, recover,
                 verify):
        for empty in ("", b""):
            with pytest.raises(ValueError, match="an empty path names nothing"):
                call(empty)
    with pytest.raises(ValueError, match="lane is empty"):
        recover(session, lane="", wait=30)  # refused before any wait
    assert recover(session, lane="", wait=0, fresh=False).action == "refire"  # no fresh one


@pytest.mark.parametrize("wrong", [-1, float("nan"), None, "600", True])
def test_the_library_checks_stuck_after_as_the_cli_does(
    session: Path, spawn_holder: SpawnHolder, wrong: object
) -> None:
    """``stuck_after`` is checked up front, as ``--stuck-after`` is: not only once a
    live holder's heartbeat is compared with it (a free session passed any value), and
    a negative one does not make every live holder stuck."""
    holder = spawn_holder(session, lane="live")
    holder.acquire()
    kind = ValueError if isinstance(wrong, float | int) and not isinstance(wrong, bool) \
        else TypeError
    for call in (lambda: probe(session, stuck_after=wrong),  # type: ignore[arg-type]
                 lambda: list(scan(session.parent, stuck_after=wrong)),  # type: ignore[arg-type]
                 lambda: recover(session, wait=0, stuck_after=wrong)):  # type: ignore[arg-type]
        with pytest.raises(kind, match="stuck_after must be a number"):
            call()
    assert holder.call("release") == "released"
    assert probe(session, stuck_after=float("inf")).state == ProbeState.FREE


def test_recover_prints_the_real_path_for_command_substitution(tmp_path: Path) -> None:
    """`next=$(fencelock recover S)` must name a file that exists, whatever bytes its
    name has: the path is written raw when stdout is not a terminal."""
    directory = tmp_path / "tab\there"
    directory.mkdir()
    session = os.path.join(os.fsencode(directory), b"a\xffb.jsonl")
    with open(session, "wb") as f:
        f.write(b'{"n":1}\n')
    proc = subprocess.run([*FENCELOCK, "recover", session], capture_output=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == session + b"\n"


def test_run_passes_the_callers_descriptors_like_flock(session: Path, tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("through fd 3\n")
    proc = subprocess.run(
        ["sh", "-c", f'exec 3<"{data}"; exec "$@"', "sh", *FENCELOCK, "run", str(session),
         "--lane", "x", "--", "sh", "-c", "cat <&3; ls -l /proc/self/fd"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("through fd 3\n")
    assert proc.stdout.count(".holder") == 1  # and the lock's own, as with flock(1)


def test_scan_reports_a_directory_named_like_a_session_as_unreadable(tmp_path: Path) -> None:
    (tmp_path / "real.jsonl").write_text('{"n":1}\n')
    (tmp_path / "odd.jsonl").mkdir()
    result = cli("status", "--json", str(tmp_path))
    assert result.returncode == 1
    by_name = {Path(r["session"]).name: r for r in rows(result)}
    assert by_name["real.jsonl"]["state"] == "free"
    assert by_name["odd.jsonl"]["state"] == "unreadable"
    reason = by_name["odd.jsonl"]["reason"]
    assert str(tmp_path / "odd.jsonl") in reason and "directory" in reason


def test_the_copy_command_for_a_hard_linked_marker_works_when_pasted(tmp_path: Path) -> None:
    """`clear --remove`'s fix for a hard-linked removed-token marker, as printed, run in
    bash, in a directory whose name holds a line break (printed escaped): it gives the
    marker a file of its own, and the removal then goes through."""
    from fencelock._tokens import REMOVED_MARKER

    sessions = tmp_path / "new\nline"
    sessions.mkdir()
    other = tmp_path / "secret"
    other.write_bytes(b"not a token\n")
    os.link(other, sessions / REMOVED_MARKER)
    session = sessions / "s.jsonl"
    with SessionLock(session) as lock:
        lock.append({"n": 1})
    out = cli("clear", "--remove", str(session))
    assert out.returncode == 0 and "sidecar kept" in out.stdout, out
    fix = out.stdout[out.stdout.index("(cp -p") + 1:out.stdout.index("), and try")]
    subprocess.run(["bash", "-c", fix], check=True, timeout=60)
    assert other.read_bytes() == b"not a token\n"
    again = cli("clear", "--remove", str(session))
    assert again.returncode == 0 and "sidecar removed" in again.stdout, again


def test_scan_passes_over_a_symlink_alias_of_a_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """``latest.jsonl -> <uuid>.jsonl``: an alias with no sidecar of its own is not a
    session (no run holds a symlink), so it neither gets a row nor turns a stale
    session's exit 3 into 1. One with a sidecar beside it keeps its row (see below)."""
    make_stale(spawn_holder, session)
    (session.parent / "latest.jsonl").symlink_to(session.name)
    (session.parent / "gone.jsonl").symlink_to("nowhere.jsonl")
    result = cli("status", "--json", str(session.parent))
    assert result.returncode == 3, result.stderr
    assert [Path(r["session"]).name for r in rows(result)] == [session.name]
    assert cli("status", str(session.parent / "latest.jsonl")).returncode == 1  # named


def test_scan_checks_the_sessions_it_infers_from_sidecar_names(tmp_path: Path) -> None:
    """A sidecar beside a symlink (of any name), or one named only ".holder": scan and
    probe agree that no run can use it, as for a ``*.jsonl`` entry."""
    (tmp_path / "target").write_text("")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "target")
    (tmp_path / "notes.txt.holder").write_text("")
    (tmp_path / ".holder").write_text("")
    (tmp_path / "..holder").write_text("")
    result = cli("status", "--json", str(tmp_path))
    assert result.returncode == 1
    by_name = {r["sidecar"].rsplit("/", 1)[-1]: r for r in rows(result)}
    assert by_name["notes.txt.holder"]["state"] == "unreadable"
    assert "a symlink" in by_name["notes.txt.holder"]["reason"]
    assert probe(tmp_path / "notes.txt").state == "unreadable"
    for stray in (".holder", "..holder"):
        assert by_name[stray]["state"] == "unreadable"
        assert "a sidecar of no session" in by_name[stray]["reason"]


@pytest.mark.parametrize("command", [["clear", "DIR"], ["clear", "DIR/.holder"],
                                     ["status", "DIR/.holder"], ["wait", "DIR/.holder"],
                                     ["run", "DIR/.holder", "--lane", "x", "--", "true"],
                                     ["recover", "DIR/.holder"]])
def test_a_sidecar_named_only_holder_is_named_with_its_fix(
    tmp_path: Path, command: list[str]
) -> None:
    """Every command, and clear of its directory, names the file (not its directory,
    nor a trailing '/' nobody typed) and says to remove it; it is left as it is."""
    stray = tmp_path / ".holder"
    stray.write_text("")
    before = sorted(os.listdir(tmp_path))
    result = cli(*(a.replace("DIR", str(tmp_path)) for a in command))
    assert result.returncode == 1, result.stderr
    assert f"{stray}: is a sidecar of no session" in result.stderr, result.stderr
    assert "Remove it" in result.stderr and "trailing" not in result.stderr
    assert "Traceback" not in result.stderr
    assert stray.read_text() == "" and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("command", [
    ["run", "S.holder.holder", "--lane", "x", "--", "sh", "-c",
     'echo \'{"cmd": 1}\' >> "$FENCELOCK_SESSION"'],
    ["hold", "S.holder.holder", "--lane", "x"], ["recover", "S.holder.holder"],
    ["clear", "S.holder.holder"], ["status", "S.holder.holder"]])
def test_a_path_naming_a_sidecars_sidecar_is_refused(session: Path, command: list[str]) -> None:
    """``S.holder.holder`` would make the sidecar ``S.holder`` a session: a run would
    lock a sidecar of its own beside it and append to the record's file. Every command
    refuses it, naming it and the session's path, and writes nothing; a directory's
    status gives such a file an unreadable row that says the same."""
    with SessionLock(session, "before") as lock:
        lock.append({"a": 1})
    sidecar = Path(f"{session}.holder")
    before, listing = sidecar.read_bytes(), sorted(os.listdir(session.parent))
    argv = [a.replace("S", str(session)) if a.startswith("S.") else a for a in command]
    result = cli(*argv, input='{"op":"append","entry":{"b":2}}\n{"op":"release"}\n')
    assert result.returncode == 1, (result.stdout, result.stderr)
    said = result.stdout + result.stderr
    assert f"{sidecar}.holder: is the sidecar of a sidecar" in said, said
    assert f"Give the session file's path ({session})" in said
    assert "Traceback" not in result.stderr
    assert sidecar.read_bytes() == before and sorted(os.listdir(session.parent)) == listing
    Path(f"{sidecar}.holder").write_text("")  # left by an older version, say
    result = cli("status", "--json", str(session.parent))
    by_name = {Path(r["session"]).name: r for r in rows(result)}
    assert by_name[sidecar.name]["state"] == "unreadable"
    assert "the sidecar of a sidecar" in by_name[sidecar.name]["reason"]
    assert by_name[session.name]["state"] == "free"


def test_clear_json_lists_a_missing_path_too(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "x.jsonl"
    result = cli("clear", "--json", str(missing))
    assert result.returncode == 1
    [row] = rows(result)
    assert row["session"] == str(missing) and row["error"] and row["found"] is None


def test_recover_no_fresh_json_says_still_held_on_stdout(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    holder = spawn_holder(session, lane="busy")
    holder.acquire()
    out = cli("recover", str(session), "--no-fresh", "--wait", "0", "--json")
    assert out.returncode == 4
    obj = json.loads(out.stdout)
    assert obj["action"] is None and obj["session"] is None
    assert obj["original"] == str(session) and obj["holder"]["lane"] == "busy"
    assert "busy" in out.stderr
    assert "without --no-fresh" in obj["error"] and obj["error"] in out.stderr


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_recover_json_prints_json_for_a_path_it_refuses(session: Path, where: str) -> None:
    path = session.parent if where == "a directory" else session.parent / "gone" / "a.jsonl"
    out = cli("recover", str(path), "--json")
    assert out.returncode == 1
    obj = json.loads(out.stdout)  # the promised shape, whatever the failure
    assert obj["action"] is None and obj["session"] is None and obj["error"]
    assert out.stderr.startswith("Error:")


@needs_proc_locks
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_recover_stopped_while_waiting_exits_128_plus_n_and_makes_nothing(
    session: Path, spawn_holder: SpawnHolder, sig: int
) -> None:
    holder = spawn_holder(session, lane="busy")
    holder.acquire()
    before = sorted(p.name for p in session.parent.iterdir())
    proc = subprocess.Popen(
        [*FENCELOCK, "recover", str(session), "--wait", "300", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    out, err = interrupt_waiter(session, proc, sig)
    assert proc.returncode == 128 + sig  # 130 for Ctrl-C, as fencelock wait
    answer = json.loads(out)
    assert answer["error"].startswith("interrupted by")
    assert answer["holder"] is not None and answer["holder"]["lane"] == "busy"  # waited for
    assert "Traceback" not in err and "Aborted" not in err
    assert sorted(p.name for p in session.parent.iterdir()) == before
    assert holder.call("release") == "released"


# -- JSON for any file name; lanes are UTF-8 ------------------------------------------------


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)
    elif isinstance(obj, str):
        yield obj


def _strict_json(stdout: bytes) -> Any:
    """Parse as a strict reader would: UTF-8, and no string that is not Unicode."""
    obj = json.loads(stdout.decode("utf-8", "strict"))
    for text in _strings(obj):
        text.encode("utf-8", "strict")  # a lone surrogate (\udcff) raises here
    return obj


def test_json_is_strict_utf8_for_a_name_that_is_not(tmp_path: Path) -> None:
    directory = os.fsencode(tmp_path / "sessions")
    session = os.path.join(directory, b"caf\xe9-\xff.jsonl")
    with SessionLock(os.fsdecode(session), "a") as lock:
        lock.append({"n": 1})

    def run(*args: bytes | str) -> Any:
        proc = subprocess.run([*FENCELOCK, *args], capture_output=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return _strict_json(proc.stdout)

    (row,) = run("status", "--json", directory)
    assert row["session"] == os.fsdecode(directory) + "/caf\\xe9-\\xff.jsonl"
    assert base64.b64decode(row["session_b64"]) == session
    assert base64.b64decode(row["sidecar_b64"]) == session + b".holder"
    assert "lane_b64" not in row and "reason_b64" not in row  # valid text stays as it is
    (cleared,) = run("clear", "--json", session)
    assert base64.b64decode(cleared["session_b64"]) == session
    recovered = run("recover", "--json", session)
    assert base64.b64decode(recovered["session_b64"]) == session
    assert base64.b64decode(recovered["holder"]["session_b64"]) == session
    report = run("verify", "--json", session)
    assert base64.b64decode(report["session_b64"]) == session and report["lines"] == 1


def test_json_keeps_valid_utf8_names_as_they_are(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "café-🙂.jsonl"
    session.write_text("")
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["session"] == str(session) and "session_b64" not in row


def test_a_lane_that_is_not_utf8_is_refused(session: Path) -> None:
    with pytest.raises(ValueError, match="not valid UTF-8"):
        SessionLock(session, "lane-\udcff")
    for args in (
        [b"run", os.fsencode(session), b"--lane", b"lane-\xff", b"--", b"true"],
        [b"recover", os.fsencode(session), b"--lane", b"lane-\xff"],
    ):
        proc = subprocess.run([*FENCELOCK, *args], capture_output=True, timeout=60,
                              check=False)
        assert proc.returncode == 2, proc.stderr
        assert b"lane-\\xff" in proc.stderr and b"not valid UTF-8" in proc.stderr
    assert not os.path.lexists(str(session) + ".holder")  # nothing written


@pytest.mark.parametrize("lane", ["", "   "], ids=["empty", "blank"])
def test_an_empty_lane_is_refused(session: Path, lane: str) -> None:
    with pytest.raises(ValueError, match="lane is empty"):
        SessionLock(session, lane)
    for args in (["run", str(session), "--lane", lane, "--", "true"],
                 ["recover", str(session), "--lane", lane],
                 ["hold", str(session), "--lane", lane]):
        proc = subprocess.run([*FENCELOCK, *args], capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        assert "lane is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.lexists(str(session) + ".holder")  # nothing written


# -- messages a new user reads ----------------------------------------------------------------


def test_verify_counts_in_proper_english(session: Path) -> None:
    session.write_text('{"n": 1}\n{"torn\n')
    out = cli("verify", str(session))
    assert out.returncode == 5
    assert out.stdout.splitlines()[-1] == (
        f"{session}: 2 lines, 0 stamped, max token 0: 1 problem"
    )
    session.write_text('{"n": 1}\n')
    assert cli("verify", str(session)).stdout.strip().endswith(": 1 line, 0 stamped, "
                                                                "max token 0: ok")


def test_help_summaries_are_whole_sentences() -> None:
    out = cli("--help").stdout
    listed = out.split("Commands:")[1].split("Exit codes")[0]
    lines = [line.strip() for line in listed.splitlines() if line.strip()]
    assert len(lines) == len(COMMANDS)
    for line in lines:
        assert not line.endswith("...") and line.endswith("."), line


@pytest.mark.parametrize("command", ["wait", "recover", "verify", "run"])
def test_a_directory_given_for_one_session_points_to_status(
    session: Path, command: str
) -> None:
    args = [command, str(session.parent)]
    if command == "run":
        args += ["--lane", "x", "--", "true"]
    out = cli(*args)
    assert out.returncode == 1 and out.stdout == ""
    no_traceback(out.stderr, 1)
    assert f"fencelock status {session.parent}" in out.stderr
    assert "rename or remove" not in out.stderr


def test_status_help_says_it_scans_only_the_current_directory() -> None:
    assert "only it, not the directories below" in " ".join(cli("status", "--help").stdout.split())


def test_a_free_row_names_the_last_run_as_last(session: Path, spawn_holder: SpawnHolder) -> None:
    h = spawn_holder(session, lane="before")
    h.acquire()
    assert h.call("release") == "released"
    out = cli("status", str(session))
    cells = out.stdout.splitlines()[1].split()
    assert cells[1:4] == ["free", "last", str(h.pid)]
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["pid"] == h.pid and row["held_by"] is None
    h.acquire()
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["held_by"] == h.pid
    assert cli("status", str(session)).stdout.splitlines()[1].split()[1:3] == ["live", str(h.pid)]


def test_recover_json_holder_has_one_shape(session: Path, spawn_holder: SpawnHolder) -> None:
    session.write_text("")
    done = json.loads(cli("recover", "--json", str(session)).stdout)
    h = spawn_holder(session, lane="busy")
    h.acquire()
    held = cli("recover", "--json", "--no-fresh", "--wait", "0", str(session))
    assert held.returncode == 4
    refused = json.loads(held.stdout)
    assert done["holder"].keys() == refused["holder"].keys() >= STATUS_KEYS
    assert done.keys() == refused.keys()
    assert refused["holder"]["state"] == "live" and refused["holder"]["lane"] == "busy"


# -- one rule for a path that does not exist ---------------------------------------------------

EVERY_COMMAND = [
    ["status", "S"], ["clear", "S"], ["run", "S", "--lane", "x", "--", "true"], ["wait", "S"],
    ["recover", "S"], ["verify", "S"],
]  # fmt: skip


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: a[0])
def test_a_missing_directory_is_one_error_line_for_every_command(
    tmp_path: Path, args: list[str]
) -> None:
    missing = tmp_path / "nowhere" / "x.jsonl"
    out = cli(*[str(missing) if a == "S" else a for a in args])
    assert (out.returncode, out.stdout) == (1, ""), out.stderr
    no_traceback(out.stderr, 1)
    assert f"{missing}: its directory {tmp_path / 'nowhere'} does not exist" in out.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: a[0])
def test_a_missing_session_file_is_a_free_empty_session_for_every_command(
    session: Path, args: list[str]
) -> None:
    out = cli(*[str(session) if a == "S" else a for a in args])
    assert out.returncode == 0 and out.stderr == "", out.stderr
    if args[0] in ("status", "clear", "verify"):
        said = ("free (no file)", "no session file or sidecar yet", "no such file yet")
        assert any(words in out.stdout for words in said), out.stdout
    if args[0] == "recover":
        assert out.stdout.strip() == str(session)
def _make_unusable_session(session: Path, kind: str) -> None:
    if kind == "directory":
        session.mkdir()
    elif kind == "fifo":
        os.mkfifo(session)
    elif kind == "symlink":
        target = session.parent / "target.jsonl"
        target.write_text('{"n":1}\n')
        session.symlink_to(target)
    else:
        session.symlink_to(session.parent / "nowhere.jsonl")


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink", "dangling-symlink"])
def test_run_on_an_unusable_session_path_creates_nothing(session: Path, kind: str) -> None:
    _make_unusable_session(session, kind)
    before = sorted(p.name for p in session.parent.iterdir())
    out = cli("run", str(session), "--lane", "a", "--", "true")
    assert out.returncode == 1
    no_traceback(out.stderr, 1)
    refusal = "is a directory" if kind == "directory" else "not a regular file"
    assert str(session) in out.stderr and refusal in out.stderr
    with pytest.raises(FenceLockError):
        SessionLock(session, "a").acquire()
    assert sorted(p.name for p in session.parent.iterdir()) == before  # no .holder left
    status = probe(session)
    assert status.state == "unreadable" and "no run can use it" in status.reason


# -- run: the command holds the session with fencelock, as with flock(1) ---------------

NAMED_THEN_WAIT = """
import os, sys, time, fencelock
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # polling the record for the wrapper's naming write
    rec = fencelock.probe(os.environ["FENCELOCK_SESSION"]).record
    if rec is not None and rec.command is not None:
        break
    time.sleep(0.005)
print(os.getpid(), flush=True)
sys.stdin.readline()
"""

PID_THEN_WAIT = """
import os, sys
print(os.getpid(), flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def _run_piped(session: Path, *command: str) -> Iterator[subprocess.Popen[str]]:
    """`fencelock run SESSION --lane a -- COMMAND...`, its stdin and stdout piped; killed
    if still running when the block ends."""
    proc = subprocess.Popen(
        [*FENCELOCK, "run", str(session), "--lane", "a", "--", *command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        with contextlib.suppress(OSError):  # (a pipe nobody reads any more)
            proc.stdin.close()


def _run_python(session: Path, script: str) -> contextlib.AbstractContextManager[
        subprocess.Popen[str]]:
    """`_run_piped` with ``python -c SCRIPT``."""
    return _run_piped(session, sys.executable, "-c", script)


def _let_exit(proc: subprocess.Popen[str], pidfd: int) -> None:
    """Give the command (through the run's stdin) the line it waits for, and return once
    it is gone (its descriptors, the lock's included, closed)."""
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.close()
    ready, _, _ = select.select([pidfd], [], [], 60)
    assert ready, "the process did not exit"
    os.close(pidfd)


@needs_pidfd
def test_killing_the_run_wrapper_never_frees_a_session_its_command_holds(session: Path) -> None:
    with _run_python(session, NAMED_THEN_WAIT) as proc:
        assert proc.stdout is not None
        command_pid = int(proc.stdout.readline())
        pidfd = os.pidfd_open(command_pid)
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        st = probe(session)
        assert st.state == "live" and st.owner_alive is True, st
        assert st.pid == proc.pid and f"pid {command_pid}" in st.reason
        row = rows(cli("status", "--json", str(session)))[0]
        assert row["state"] == "live" and row["command_pid"] == command_pid
        assert st.held_by == row["held_by"] == command_pid  # the pid holding it now
        out = cli("run", str(session), "--lane", "b", "--no-wait", "--", "true")
        assert out.returncode == 4, out.stderr
        assert f"pid {command_pid}" in out.stderr
        with pytest.raises(SessionContendedError):
            SessionLock(session, "c", on_contention="fail").acquire()
        _let_exit(proc, pidfd)  # the command's stdin too: let it finish
    st = probe(session)
    assert st.state == "stale" and st.owner_alive is False, st
    out = cli("run", str(session), "--lane", "b", "--no-wait", "--", "true")
    assert out.returncode == 0, out.stderr
    after = probe(session)
    assert after.state == "free" and after.record is not None
    assert after.record.previous is not None and after.record.previous.pid == proc.pid


LEAVES_A_CHILD = NAMED_THEN_WAIT.replace("print(os.getpid(), flush=True)", """
import signal
child = os.fork()
if child == 0:
    signal.pause()  # keeps every descriptor, the lock's too, until killed
    os._exit(0)
print(os.getpid(), child, flush=True)""")


@needs_pidfd
@pytest.mark.parametrize("reaped", [True, False])
def test_held_by_names_no_process_that_is_gone(session: Path, reaped: bool) -> None:
    """The run's wrapper is killed, then its command exits, leaving a child of its own
    that keeps the lock's descriptor: the session is live, but neither the run nor its
    command holds it any more, and neither is named as the holder. Also while the
    killed wrapper is not yet reaped (a zombie, which the lock list still names, its
    command name still readable): every recover answers the one fresh session."""
    with _run_python(session, LEAVES_A_CHILD) as proc, contextlib.ExitStack() as later:
        assert proc.stdout is not None
        command_pid, child = map(int, proc.stdout.readline().split())
        later.callback(os.kill, child, signal.SIGKILL)
        pidfd = os.pidfd_open(command_pid)
        wrapper = os.pidfd_open(proc.pid)
        later.callback(os.close, wrapper)
        proc.kill()
        if reaped:
            proc.wait(timeout=60)
        else:  # exited, not waited for
            assert select.select([wrapper], [], [], 60)[0]
        _let_exit(proc, pidfd)  # the command's stdin: let it exit
        if not reaped:
            fresh = {cli("recover", "--wait", "0", str(session)).stdout for _ in range(2)}
            assert len(fresh) == 1 and str(session) not in fresh, fresh
        st = probe(session)
        assert st.state == "live" and st.held_by is None, st
        assert f"held by pid {command_pid}" not in st.reason
        assert "left running" in st.reason, st.reason
        assert rows(cli("status", "--json", str(session)))[0]["held_by"] is None
        # Nor do the contention errors name either as the holder.
        for args in (("run", "--no-wait", "--lane", "b", "--", "true"),
                     ("wait", "--timeout", "0.1"), ("clear",)):
            out = cli(*args[:1], str(session), *args[1:])
            assert out.returncode == 4, out.stderr
            assert "left running" in out.stderr and f"pid {command_pid}" not in out.stderr, \
                out.stderr


@needs_pidfd
@needs_flock
@needs_proc_locks
def test_a_killed_runs_record_does_not_hide_the_process_that_locks_the_session_now(
    session: Path,
) -> None:
    """A `fencelock run` killed with its command leaves its record "held"; then
    flock(1) takes the sidecar's lock. The session is held by flock, which the system
    lists: named as a holder outside fencelock, not as what the dead run left running."""
    with _run_python(session, NAMED_THEN_WAIT) as proc:
        assert proc.stdout is not None
        command_pid = int(proc.stdout.readline())
        pidfd = os.pidfd_open(command_pid)
        proc.kill()
        os.kill(command_pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], 60)[0], "the command did not exit"
        os.close(pidfd)
        proc.wait(timeout=60)
    assert probe(session).state == "stale"
    flock = subprocess.Popen(["flock", f"{session}.holder", "-c", "echo locked; read x"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flock.stdout is not None and flock.stdout.readline() == "locked\n"
        st = probe(session)
        assert st.state == "live" and not st.left_by_run, st
        assert st.reason == f"held by pid {flock.pid} (flock), not a fencelock holder"
        assert rows(cli("status", "--json", str(session)))[0]["held_by"] == flock.pid
        for args in (("run", "--no-wait", "--lane", "b", "--", "true"), ("clear",)):
            out = cli(*args[:1], str(session), *args[1:])
            assert out.returncode == 4 and f"pid {flock.pid} (flock)" in out.stderr, \
                out.stderr
    finally:
        flock.communicate("\n", timeout=60)


@needs_pidfd
def test_what_the_command_left_running_keeps_the_session_until_it_exits(session: Path) -> None:
    # A non-interactive shell gives a background job /dev/null as stdin unless told.
    script = 'exec 9<&0; "$0" -c "$1" <&9 9<&- & exit 7'
    with _run_piped(session, "sh", "-c", script, sys.executable, PID_THEN_WAIT) as proc:
        assert proc.stdout is not None
        background = int(proc.stdout.readline())
        pidfd = os.pidfd_open(background)
        assert proc.wait(timeout=60) == 7  # fencelock ends with its command
        st = probe(session)
        token = st.token
        assert st.state == "live" and st.record is not None
        assert st.record.state == "released"  # the run is over; its descriptor lives on
        out = cli("run", str(session), "--lane", "b", "--no-wait", "--", "true")
        assert out.returncode == 4, out.stderr
        if st.lock_owners is not None:  # where the system names the lock's taker
            # Named as what that run left running, never as a holder outside fencelock.
            left = (f"processes that the command of fencelock run pid {st.record.pid} "
                    f"(lane 'a', token {token}) left running after that run ended")
            assert left in out.stderr and "not a fencelock holder" not in out.stderr
            assert left in cli("clear", str(session)).stderr
            assert st.reason == f"held by {left}" and st.left_by_run
            row = cli("status", str(session)).stdout
            assert f"(left by fencelock run pid {st.record.pid}, lane a)" in row
        _let_exit(proc, pidfd)
    st = probe(session)
    assert st.state == "free", st
    out = cli("run", str(session), "--lane", "b", "--no-wait", "--", "true")
    assert out.returncode == 0, out.stderr
    after = probe(session).record
    assert after is not None and after.token == (token or 0) + 1 and after.previous is None


# A `fencelock run` that stops just after the acquire (the real one) and waits for a
# line on stdin: the window in which a signal once killed it with the default action.
PAUSED_AFTER_ACQUIRE = """
import sys
from fencelock import _cli, _lock
real = _lock.SessionLock.acquire
def acquire(self, **kw):
    info = real(self, **kw)
    print("acquired", flush=True)
    sys.stdin.readline()
    return info
_lock.SessionLock.acquire = acquire
_cli.main(sys.argv[1:], prog_name="fencelock")
"""


@pytest.mark.parametrize("sig", RUN_SIGNALS)
def test_a_signal_just_after_the_acquire_releases_instead_of_leaving_it_stale(
    session: Path, tmp_path: Path, sig: int
) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_AFTER_ACQUIRE, "run", str(session), "--lane", "a", "--",
         sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "acquired\n"
    assert probe(session).state == "live"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert not marker.exists()  # the command never started
    st = probe(session)
    assert st.state == "free" and st.record is not None and st.record.state == "released"


def test_run_command_starts_with_no_signal_blocked(session: Path) -> None:
    out = cli("run", str(session), "--lane", "a", "--", "grep", "^SigBlk:", "/proc/self/status")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[1], 16) == 0


# The same, paused inside the acquire: its record is written, but it does not count as
# held yet (the last instants in which an interrupt could once leave a stale record).
PAUSED_AFTER_THE_RECORD = """
import sys
from fencelock import _cli, _sidecar_holder
real = _sidecar_holder.SidecarHolder._write_new_record
def write_new_record(self, *args):
    real(self, *args)
    print("written", flush=True)
    sys.stdin.readline()
_sidecar_holder.SidecarHolder._write_new_record = write_new_record
_cli.main(sys.argv[1:], prog_name="fencelock")
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_a_signal_once_the_record_is_written_never_leaves_it_stale(
    session: Path, tmp_path: Path, sig: int
) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_AFTER_THE_RECORD, "run", str(session), "--lane", "a",
         "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "written\n"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert not marker.exists()
    st = probe(session)
    assert st.state == "free" and st.record is not None and st.record.state == "released"


@pytest.mark.parametrize("args", [["run", "S", "--lane", "a", "--", "true"], ["clear", "S"],
                                  ["hold", "S", "--lane", "a"]], ids=lambda a: a[0])
def test_a_fencelock_warning_is_one_plain_line(tmp_path: Path, args: list[str]) -> None:
    """A FenceLockWarning (here: a world-writable sessions directory) is one line on
    stderr that names the directory and the fix, not Python's warning with a source
    file, line number and a line of fencelock's code."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, no sticky bit
    session = shared / "s.jsonl"
    out = cli(*[str(session) if a == "S" else a for a in args], input='{"op":"release"}\n')
    assert out.returncode == 0, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"Warning: {shared}: ") and "chmod o-w" in line, line
    assert ".py:" not in out.stderr and "FenceLockWarning" not in out.stderr


def test_an_error_names_a_non_utf8_path_by_its_bytes(tmp_path: Path) -> None:
    """A name that is not UTF-8 is shown with its bytes as \\xNN (as --json shows it),
    not as the lone surrogates Python decodes it to (\\udcff), which name no file."""
    missing = os.fsencode(tmp_path) + b"/caf\xff/s.jsonl"
    done = subprocess.run([*FENCELOCK, "verify", missing], capture_output=True, timeout=60)
    assert done.returncode == 1
    line = done.stderr.decode("ascii")  # escaped: plain ASCII
    assert f"{tmp_path}/caf\\xff/s.jsonl: its directory" in line and "udcff" not in line


@pytest.mark.parametrize("command", ["status", "clear"])
def test_a_directory_that_cannot_be_listed_does_not_stop_the_other_paths(
    command: str,
) -> None:
    prefix = _as_unprivileged()
    with tempfile.TemporaryDirectory(prefix="fencelock-perm-") as top:
        os.chmod(top, 0o755)
        private, open_ = Path(top) / "private", Path(top) / "open"
        for d in (private, open_):
            d.mkdir()
            (d / "a.jsonl").write_text("")
        open_.chmod(0o1777)  # writable for the user clear runs as, and sticky
        private.chmod(0)
        try:
            out = subprocess.run(
                [*prefix, *FENCELOCK, command, str(private), str(open_ / "a.jsonl")],
                capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
        finally:
            private.chmod(0o700)
    assert out.returncode == 1, out.stderr
    no_traceback(out.stderr, 1)
    assert f"{private}: Permission denied" in out.stderr
    assert "a.jsonl" in out.stdout, out.stdout  # the other path was still looked at


# -- output that cannot be written, a working directory that is gone ------------------


@marks.needs_linux  # /dev/full: every write fails with ENOSPC
@pytest.mark.parametrize("args", [
    ["--version"], ["--help"], ["status", "--help"], ["status"], ["status", "--json"],
    ["status", "{s}"], ["clear", "{s}"], ["clear", "--json", "{s}"], ["verify", "{s}"],
    ["verify", "--json", "{s}"], ["check-config", "{c}"],
], ids=lambda a: " ".join(a))
def test_output_that_cannot_be_written_is_one_error_line_not_a_traceback(
    session: Path, args: list[str]
) -> None:
    """A full disk behind standard output (click handles only a closed pipe): one line
    on stderr that says the output could not be written, and exit 1."""
    session.write_text('{"role":"user"}\n')
    config = session.parent / "openclaw.json"
    config.write_text('{"agents": {}}')
    argv = [a.format(s=session, c=config) for a in args]
    with open("/dev/full", "w") as full:
        done = subprocess.run([*FENCELOCK, *argv], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60, cwd=session.parent, check=False)
    assert done.returncode == 1, done.stderr
    no_traceback(done.stderr, max_lines=1)
    assert "cannot write its output: No space left on device" in done.stderr


@marks.needs_linux
def test_recover_that_cannot_print_its_fresh_session_names_it_on_stderr(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """recover decided (and made a fresh session beside a live holder's): when stdout
    cannot take the answer, stderr carries it."""
    session.write_text('{"role":"user"}\n')
    spawn_holder(session, lane="busy").acquire()
    with open("/dev/full", "w") as full:
        done = subprocess.run([*FENCELOCK, "recover", "--wait", "0", str(session)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    assert done.returncode == 1
    no_traceback(done.stderr, max_lines=1)
    fresh = done.stderr.strip().split("; the session to use is ", 1)[1]
    assert fresh != str(session) and Path(fresh).parent == session.parent
    assert Path(fresh).read_text() == session.read_text()


@pytest.mark.parametrize("args", [
    ["status", "s.jsonl"], ["status"], ["clear", "s.jsonl"], ["clear", "--json", "s.jsonl"],
    ["wait", "s.jsonl"], ["recover", "s.jsonl"], ["verify", "s.jsonl"],
    ["run", "--lane", "x", "s.jsonl", "--", "true"],
], ids=lambda a: " ".join(a))
def test_a_relative_path_in_a_removed_working_directory_is_named_with_the_fix(
    tmp_path: Path, args: list[str]
) -> None:
    """The shell's directory was removed after it entered it: a relative path cannot
    be made absolute. One line naming the path and what to do, never a traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, sys; from fencelock._cli import main; os.chdir(sys.argv[1]); "
            "os.rmdir(sys.argv[1]); main(sys.argv[2:], prog_name='fencelock')")
    done = subprocess.run([sys.executable, "-c", code, str(gone), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert "the working directory no longer exists" in line
    assert ("s.jsonl: " in line) if "s.jsonl" in args else (".: " in line)
    if "--json" in args:
        (row,) = json.loads(done.stdout)
        assert row["session"] == "s.jsonl" and "no longer exists" in row["error"]


def test_the_library_names_a_relative_path_in_a_removed_working_directory(
    tmp_path: Path
) -> None:
    code = """
import os, sys
from fencelock import FenceLockError, SessionLock, probe, scan, verify
os.chdir(sys.argv[1]); os.rmdir(sys.argv[1])
for call in (lambda: SessionLock("s.jsonl"), lambda: probe("s.jsonl"),
             lambda: list(scan(".")), lambda: verify("s.jsonl")):
    try:
        call()
    except FenceLockError as e:
        print(type(e).__name__, e)
"""
    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run([sys.executable, "-c", code, str(gone)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout
    for line in lines:
        assert line.startswith("SidecarAccessError ") and "no longer exists" in line


@pytest.mark.parametrize("args", [
    ["status", ""], ["clear", "--remove", ""], ["wait", ""], ["recover", ""], ["verify", ""],
    ["run", "--lane", "x", "", "--", "true"], ["hold", "--lane", "x", ""],
    ["check-config", ""],
], ids=lambda a: " ".join(a))
def test_an_empty_path_is_a_usage_error_not_the_working_directory(
    tmp_path: Path, args: list[str]
) -> None:
    """``fencelock clear --remove "$S"`` with S unset: the empty path named the working
    directory, whose sidecar beside it (``../DIR.holder``) clear would then remove."""
    work = tmp_path / "sess"
    work.mkdir()
    sidecar = tmp_path / "sess.holder"
    sidecar.write_text("")
    done = cli(*args, cwd=work)
    assert done.returncode == 2, done.stderr
    assert "an empty path names nothing" in done.stderr and "Traceback" not in done.stderr
    assert sidecar.exists()


def test_verify_given_a_sidecar_checks_its_session(session: Path) -> None:
    """As every other command does, verify takes a sidecar's path for its session's."""
    session.write_text('{"_fencelock": {"token": 5, "run_id": "a"}}\n'
                       '{"_fencelock": {"token": 3, "run_id": "b"}}\n')
    with SessionLock(session, "x"):
        pass
    sidecar = f"{session}.holder"
    out = cli("verify", sidecar)
    assert out.returncode == 5, out.stderr
    assert f"{session}:2: token-backwards: token 3 after token 5" in out.stdout
    assert out.stdout.splitlines()[-1].startswith(f"{session}: 2 lines, 2 stamped")
    report = json.loads(cli("verify", "--json", sidecar).stdout)
    assert report["session"] == str(session) and report["max_token"] == 5


@pytest.mark.parametrize("command", [["recover", "--wait", "0"], ["status"], ["verify"],
                                     ["clear"]], ids=lambda c: c[0])
def test_a_command_whose_answer_goes_to_stdout_refuses_a_closed_stdout(
    session: Path, spawn_holder: SpawnHolder, command: list[str]
) -> None:
    """Started with stdout closed (>&-), a command would print its answer nowhere and
    exit 0: recover would make a fresh session nobody learns the name of. It says so
    on stderr, exits 1, and does nothing."""
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    h.call("append " + json.dumps({"n": 1}))
    before = sorted(p.name for p in session.parent.iterdir())
    script = f'exec {sys.executable} -m fencelock "$@" >&-'
    proc = subprocess.run(["sh", "-c", script, "sh", *command, str(session)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "standard output is closed" in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in session.parent.iterdir()) == before  # nothing made


def table_rows(directory: Path, spawn_holder: SpawnHolder) -> list[Any]:
    """Status rows of a directory with released sessions (one named in bytes that are
    not UTF-8), a free one and a stale one."""
    from fencelock import scan

    for name in [*(f"s{i:02d}.jsonl" for i in range(8)), "caf\udcff.jsonl"]:
        with SessionLock(directory / name, lane=f"lane-{name[:3]}"):
            pass
    (directory / "new.jsonl.holder").touch()
    make_stale(spawn_holder, directory / "stale.jsonl")
    return list(scan(directory))


def table_lines(rows: list[Any], now: float, spill_after: int | None) -> tuple[list[str], Any]:
    """The lines of a status table of ``rows``, colours on; and the table."""
    from fencelock._output import StatusTable

    table = StatusTable()
    if spill_after is not None:
        table.SPILL_AFTER = spill_after
    for st in rows:
        table.add(st, now)
    try:
        return list(table.lines()), table
    finally:
        table.close()


@pytest.mark.parametrize("spill_after", [1, 3, 4])
def test_a_long_status_table_keeps_its_rows_in_a_temporary_file(
    tmp_path: Path, spawn_holder: SpawnHolder, spill_after: int
) -> None:
    """Past `StatusTable.SPILL_AFTER` rows the text table keeps them in a temporary file
    (memory stays flat for 100,000 sessions), and prints the same lines in the same
    order: a name that is not UTF-8, the stale row's colour and a last part batch."""
    rows = table_rows(tmp_path, spawn_holder)
    now = time.time()
    whole, _ = table_lines(rows, now, None)
    lines, table = table_lines(rows, now, spill_after)
    assert lines == whole and len(lines) == len(rows) + 1 == 12
    assert table._spilled and len(table.rows) < spill_after
    assert "\x1b[" in "".join(lines) and "caf\\xff.jsonl" in "".join(lines)


def test_a_status_table_with_no_temporary_file_keeps_its_rows(
    tmp_path: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = table_rows(tmp_path, spawn_holder)
    now = time.time()
    whole, _ = table_lines(rows, now, None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such directory"))
    lines, table = table_lines(rows, now, 3)
    assert lines == whole and not table._spilled and len(table.rows) == len(rows)


def test_status_of_a_directory_past_the_table_s_memory_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fencelock._output import StatusTable

    for i in range(7):
        with SessionLock(tmp_path / f"s{i}.jsonl"):
            pass
    whole = invoke("status", str(tmp_path))
    monkeypatch.setattr(StatusTable, "SPILL_AFTER", 2)
    made = []
    real = tempfile.TemporaryFile

    def temporary_file(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    spilled = invoke("status", str(tmp_path))
    assert (spilled.exit_code, spilled.stdout) == (whole.exit_code, whole.stdout) == (
        0, whole.stdout)
    assert len(whole.stdout.splitlines()) == 8
    assert len(made) == 1 and made[0].closed  # and closed once printed


# Names and the columns a terminal gives them: wide characters take two; a combining
# accent, a Thai or Devanagari vowel sign, a variation selector, an enclosing mark and
# Hangul vowel and final jamo take none.
NAME_COLUMNS = {
    "caf\u00e9-\u65e5\u672c": 9, "e\u0301t\u00e9": 3, "\U0001f600x": 3,
    "\u0e01\u0e34\u0e19": 2, "\u0915\u0941\u091b": 2, "a\ufe0fb1\u20dd": 3,
    "\u1100\u1161\u11a8": 2,
}


def test_status_table_lines_up_names_by_the_columns_they_take(tmp_path: Path) -> None:
    """The STATE column starts in the same terminal column on every row, whatever
    columns the names before it take."""
    for stem in (*NAME_COLUMNS, "plain"):
        with SessionLock(tmp_path / f"{stem}.jsonl"):
            pass
    out = invoke("status", str(tmp_path))
    assert out.exit_code == 0, out.output
    header, *rows = out.stdout.splitlines()
    state_at = header.index("STATE")
    seen = set()
    for line in rows:
        stem = next(s for s in (*NAME_COLUMNS, "plain") if line.startswith(
            f"{tmp_path}/{s}.jsonl "))
        shown = f"{tmp_path}/{stem}.jsonl"
        gap = len(line[len(shown):]) - len(line[len(shown):].lstrip(" "))
        columns = len(f"{tmp_path}/.jsonl") + NAME_COLUMNS.get(stem, len(stem)) + gap
        assert columns == state_at, (stem, line)
        seen.add(stem)
    assert seen == {*NAME_COLUMNS, "plain"}


def test_a_row_for_what_a_run_left_running_escapes_the_record_s_host(session: Path) -> None:
    """The status row of a session held by what a `fencelock run` command left running
    shows the ended run's host escaped, as every other row does (it went out raw: a
    record's host could clear the screen or split the row)."""
    from dataclasses import replace

    import click

    from fencelock import HolderStatus, ProbeState, SessionLock
    from fencelock._output import StatusTable
    from fencelock._record import RELEASED

    with SessionLock(session, lane="a") as lock:
        info = lock.info
    assert info is not None
    ended = replace(info, state=RELEASED, host="v\x1b[2J\x1b[31mEVIL\nm")
    row = HolderStatus(str(session), str(session) + ".holder", ProbeState.LIVE,
                       record=ended, left_by_run=True)
    status = StatusTable()
    status.add(row, time.time())
    table = click.unstyle("\n".join(status.lines()))  # its own styles off
    assert "\x1b" not in table and "\nm " not in table
    assert "v\\x1b[2J" in table and "left by fencelock run" in table


def test_run_and_hold_make_their_files_with_the_mode_given(tmp_path: Path) -> None:
    ran, held = tmp_path / "r.jsonl", tmp_path / "h.jsonl"
    assert cli("run", "--mode", "660", str(ran), "--lane", "x", "--", "true").returncode == 0
    done = subprocess.run(
        [*FENCELOCK, "hold", "--mode", "0o660", str(held), "--lane", "x"],
        input='{"op": "append", "entry": {"x": 1}}\n{"op": "release"}\n',
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    made = [f"{ran}.holder", str(held), f"{held}.holder"]
    assert {p: stat.S_IMODE(os.stat(p).st_mode) for p in made} == {p: 0o660 for p in made}
    for bad in ("644x", "400", "1777", ""):
        refused = cli("run", "--mode", bad, str(ran), "--lane", "x", "--", "true")
        assert refused.returncode == 2 and "'--mode'" in refused.stderr, refused.stderr
    # Others' bits let any user lock the sidecar and keep every run out: said once.
    wide = cli("run", "--mode", "644", str(tmp_path / "w.jsonl"), "--lane", "x", "--", "true")
    assert wide.returncode == 0 and wide.stderr.count("made with mode 0o644, which lets every "
                                                      "user") == 1, wide.stderr
    assert cli("run", "--mode", "660", str(ran), "--lane", "x", "--", "true").stderr == ""


@pytest.mark.parametrize("command", [["hold", "-dash.jsonl", "--lane", "x"],
                                     ["status", "-dash.jsonl"], ["clear", "-q"]])
def test_an_unknown_short_option_says_how_to_write_a_path_that_starts_with_a_dash(
    command: list[str],
) -> None:
    """``-dash.jsonl`` reads as options to click (``-d`` first): the usage error says
    how to name such a file, as `run`'s does; an unknown long option keeps click's
    suggestion alone."""
    result = invoke(*command)
    assert result.exit_code == 2
    assert "(a path that starts with '-' is written ./-NAME)" in result.output, result.output
    result = invoke("status", "--jsn", "x")
    assert result.exit_code == 2 and "Did you mean '--json'?" in result.output
    assert "./-NAME" not in result.output
