"""The ``fencelock`` command's entry point (the installed script, ``python -m
fencelock``, ``bin/fencelock``).

Loading the command line takes a while (click, the output layer). A Ctrl-C, or a
parent's SIGINT, that lands in that time finds nothing held yet: it ends the command
quietly with 130 (128 + SIGINT), as such a signal ends a command that has started,
instead of printing an import traceback. A command that gave up a wait ends at once
once it has said what it has to say (see `_exit_now_if_a_wait_was_given_up`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

ENDS_PROCESS = False
"""True once `main` runs: the command ends this process (not so where the command line
is called in a process that goes on, as tests do with click's runner)."""


def main(**kwargs: Any) -> Any:
    """Load the command line and run it; ``kwargs`` go to click (``prog_name``)."""
    global ENDS_PROCESS
    ENDS_PROCESS = True  # (never put back: the process ends with the command)
    try:
        from fencelock._cli import main as command
    except KeyboardInterrupt:
        sys.exit(130)
    try:
        return command(**kwargs)
    except SystemExit as e:
        _exit_now_if_a_wait_was_given_up(e)
        raise


def _exit_now_if_a_wait_was_given_up(e: SystemExit) -> None:
    """End the process at once, its output flushed, when a wait that gave up (`wait
    --timeout`, `recover --wait`) left its helper thread blocked in the kernel. If the
    session comes free while the interpreter shuts down, the helper gets the lock and
    cannot let go (no thread runs any more by then) until the process is gone, which
    other commands would read as a holder outside fencelock. The kernel drops it with
    the process."""
    wait = sys.modules.get("fencelock._wait")
    if wait is None or not wait.abandoned_waits():
        return
    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    etcd = sys.modules.get("fencelock._etcdcluster")
    if etcd is not None:  # (what atexit would have done)
        etcd.revoke_leases()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
