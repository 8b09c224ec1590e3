"""``python paused_run.py run ...``: the fencelock command line, which stops itself
(SIGSTOP, as Ctrl-Z or a VM pause would) just as `fencelock run` names its command in the
run's record, and goes on where it was once continued (SIGCONT)."""

from __future__ import annotations

import os
import signal

from fencelock._entry import main
from fencelock._lock import SessionLock

_name_command = SessionLock._name_command


def _paused_first(self: SessionLock, pid: int) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)
    _name_command(self, pid)


SessionLock._name_command = _paused_first  # type: ignore[method-assign]
main()
