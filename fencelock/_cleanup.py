"""Cleanup that an interrupt cannot cut short.

CPython raises KeyboardInterrupt, or a signal handler's exception, between bytecodes:
also inside the ``except`` block that gives back what a failed acquire took. A slot of
the in-process registry left taken there would keep every later acquire of the process
out of the session for good, and a descriptor left open would leak (with any lock it
carries). `to_the_end` runs such steps again when one is cut short, then raises the
first interrupt. (One point is left: an interrupt landing as `to_the_end` itself is
entered. Python offers no way to close it; the window is one bytecode instead of every
call the steps make.)
"""

from __future__ import annotations

from collections.abc import Callable

_TRIES = 8
"""How many interrupts one step may take before it is given up (a step that keeps
failing for another reason must not loop for good)."""


def to_the_end(*steps: Callable[[], object]) -> None:
    """Run each of ``steps`` (each safe to run again after being cut short) to its end,
    again when an exception cuts it short; then raise the first such exception."""
    first: BaseException | None = None
    for step in steps:
        for _ in range(_TRIES):
            try:
                step()
                break
            except BaseException as e:  # an interrupt, landing in the step
                first = first or e
    if first is not None:
        raise first
