"""The ``fencelock`` command's entry point (the installed script, ``python -m
fencelock``, ``bin/fencelock``).

Loading the command line takes a while (click, the output layer). A Ctrl-C, or a
parent's SIGINT, that lands in that time finds nothing held yet: it ends the command
quietly with 130 (128 + SIGINT), as such a signal ends a command that has started,
instead of printing an import traceback.
"""

from __future__ import annotations

import sys
from typing import Any


def main(**kwargs: Any) -> Any:
    """Load the command line and run it; ``kwargs`` go to click (``prog_name``)."""
    try:
        from fencelock._cli import main as command
    except KeyboardInterrupt:
        sys.exit(130)
    return command(**kwargs)
