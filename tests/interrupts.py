"""Raising an interrupt where a real signal's handler could raise one (tests only).

CPython runs a Python signal handler (Ctrl-C's, raising KeyboardInterrupt) only at some
points of the code: a function's start, right after a call returns, a loop's backward
jump. `interrupted_at` raises KeyboardInterrupt at one such point after another, so that
a test can walk every place a real interrupt could land in the code it names.
"""

from __future__ import annotations

import contextlib
import dis
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any


def signal_points(code: Any) -> frozenset[int]:
    """The offsets of ``code`` at which CPython runs a signal handler (whose exception,
    Ctrl-C's KeyboardInterrupt, then surfaces there): a function's start, right after a
    call returns, a loop's backward jump. Not between any two instructions: a ``with``
    block's end, for one, cannot be cut from the call to its ``__exit__``."""
    points = {0}
    after_call = False
    for instruction in dis.get_instructions(code):
        name = instruction.opname
        backward = name.startswith("JUMP_BACKWARD") and name != "JUMP_BACKWARD_NO_INTERRUPT"
        resumed = name == "RESUME" and (instruction.arg or 0) < 2  # 3.12+: after a yield too
        if after_call or backward or resumed:
            points.add(instruction.offset)
        after_call = name in ("CALL", "CALL_FUNCTION_EX", "CALL_KW")  # (CALL_KW: 3.13)
    return frozenset(points)


def interrupted_at(
    number: int, call: Callable[[], object], files: Iterable[str],
    expected: tuple[type[BaseException], ...] = (),
) -> tuple[bool, BaseException | None]:
    """Run ``call`` with an interrupt (KeyboardInterrupt) raised at the ``number``-th
    point where a signal handler could run (`signal_points`) in the code of ``files``,
    by this thread: whether it fired (``number`` is past the last point when not), and
    what ``call`` raised: the interrupt, or one of ``expected``."""
    files = frozenset(files)
    seen = [0]
    fired: list[bool] = []
    points: dict[Any, frozenset[int]] = {}

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename not in files:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and not fired:
            if code not in points:
                points[code] = signal_points(code)
            if frame.f_lasti in points[code]:
                if seen[0] == number:
                    fired.append(True)
                    raise KeyboardInterrupt
                seen[0] += 1
        return tracer

    outcome: BaseException | None = None
    _prime()
    sys.settrace(tracer)
    try:
        call()
    except BaseException as error:
        outcome = error
    finally:
        sys.settrace(None)
    assert (outcome is None or isinstance(outcome, expected)
            or (fired and type(outcome) is KeyboardInterrupt)), (number, outcome)
    return bool(fired), outcome


def _prime() -> None:
    """One throwaway trace with opcode events: CPython 3.12.1 gives none to a tracer
    that turns them on in a frame's ``call`` event until an earlier one did (gh-114480),
    and the first walk of a process then found no point at all."""
    def opcodes(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return opcodes

    sys.settrace(opcodes)
    try:
        (lambda: None)()
    finally:
        sys.settrace(None)


def fds_naming(suffix: str) -> list[str]:
    """This process's descriptors whose target path ends with ``suffix``."""
    names = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            if os.readlink(f"/proc/self/fd/{name}").endswith(suffix):
                names.append(name)
    return names
