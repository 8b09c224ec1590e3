"""How the tools run their click commands: the command's return value is the exit code."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

import click


def run_command(command: click.Command, prog_name: str, argv: Sequence[str] | None) -> int:
    """Run ``command`` on ``argv`` (None: the process's arguments) and return its exit
    code, instead of exiting, so the tools stay callable from tests; usage errors are
    reported as click reports them, exit 2."""
    try:
        code = command.main(args=None if argv is None else list(argv), prog_name=prog_name,
                            standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:  # --help
        return e.exit_code
    except click.Abort:  # Ctrl-C: told apart from a failure, as the shell's 128 + SIGINT
        click.echo("Aborted!", err=True)
        return 130
    return code if isinstance(code, int) else 0


def quietly(target: Callable[..., object], *args: Any) -> None:
    """A tool's forked worker (started with `start_worker`): run ``target(*args)``. Ctrl-C
    reaches the whole process group, and the parent reports it once ("Aborted!"): a
    worker takes the signal's default action, ending at once with no traceback."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    target(*args)


def start_worker(proc: Any) -> None:
    """Start a `quietly` worker with Ctrl-C held back until it has made the signal end
    it: arriving in between, it would raise in the child's bootstrap (a traceback)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
