"""Cleanup that an interrupt cannot cut short.

CPython raises KeyboardInterrupt, or a signal handler's exception, between bytecodes:
also inside the ``except`` block that gives back what a failed acquire took. A slot of
the in-process registry left taken there would keep every later acquire of the process
out of the session for good, and a descriptor left open would leak (with any lock it
carries). `to_the_end` runs such steps again when one is cut short, then raises the
first interrupt. An interrupt can still land as `to_the_end` is entered (a function's
start is a point where a signal handler runs): its callers call it inside a ``try``
whose handler calls it once more. Python offers no way to close every point: a second
interrupt can land as that second call is entered, or right after it caught a first.

A cleanup in a ``finally`` also keeps the protected block's last call inside the
``try``: ``result = call()`` there, and ``return result`` after it. CPython counts an
interrupt right after a call returns as the call's (inside the ``try``), but the tests
that walk every such point raise it at the next instruction, which after ``return
call()`` is the ``finally``'s first, outside any handler of its own.
"""

from __future__ import annotations

from collections.abc import Callable

_TRIES = 8
"""How many interrupts one call may take before it gives up (a step that keeps failing
for another reason must not loop for good)."""


def to_the_end(*steps: Callable[[], object]) -> None:
    """Run ``steps`` in order (each safe to run again after being cut short), each to
    its end, again when an exception cuts it short; then raise the first such
    exception. Everything between two steps happens inside the ``try``."""
    first: BaseException | None = None
    done = tries = 0
    while tries < _TRIES:
        try:
            # The test in the body, not in a ``while`` header: from 3.12 the compiler
            # repeats a header's test after the body and jumps back from outside the
            # ``try``, where 3.13 runs a signal handler and its exception escapes.
            while True:
                if done >= len(steps):
                    break
                steps[done]()
                done += 1
            break
        except BaseException as e:  # an interrupt, landing in a step
            first = first or e
            tries += 1
    if first is not None:
        raise first
