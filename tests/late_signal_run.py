"""``python late_signal_run.py run ...``: the fencelock command line, which is sent SIGTERM
just as `fencelock run` has put its signal handlers away, its command ended and the
session released (as the group-wide copy of a `timeout(1)` lands as the command ends)."""

from __future__ import annotations

import os
import signal

from fencelock import _supervisor
from fencelock._entry import main

_restore = _supervisor.SignalForwarder.restore


def _restore_then_signalled(self: _supervisor.SignalForwarder) -> None:
    _restore(self)
    os.kill(os.getpid(), signal.SIGTERM)


_supervisor.SignalForwarder.restore = _restore_then_signalled  # type: ignore[method-assign]
main()
