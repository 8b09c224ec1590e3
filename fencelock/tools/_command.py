"""How the tools run their click commands: the command's return value is the exit code."""

from __future__ import annotations

from collections.abc import Sequence

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
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return code if isinstance(code, int) else 0
