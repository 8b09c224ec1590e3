"""``python signalled_hold.py SIGNUM [NTH] hold ...``: the fencelock command line, sending
itself signal SIGNUM once, in the middle of the NTH fenced append (default: the first):
after the line is written and fsynced, before the append has moved the fence point or
answered. With ``FENCELOCK_TEST_SIGNAL_AT=answer``, as the NTH append's answer (or
release's, with ``FENCELOCK_TEST_SIGNAL_OP=release``) is being encoded instead: the
request done, its answer not yet written; with ``written``, as the write of that answer
returns (the answer's bytes in stdout, the count not yet taken in). With
``FENCELOCK_TEST_ANSWER_WAIT`` set, the answer owed after such a signal waits that many
seconds for room in stdout. With ``FENCELOCK_TEST_THEN_SIGNAL=N``, signal N follows
SIGNUM at once (two stop signals as one moment). With
``FENCELOCK_TEST_SIGNAL_AT_SHUTDOWN=N``, signal N comes once the command has returned,
as the interpreter shuts down."""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

from fencelock import _fence, _hold, _platform
from fencelock._entry import main

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike, ReadableBuffer


signum = int(sys.argv.pop(1))
nth = int(sys.argv.pop(1)) if sys.argv[1].isdigit() else 1
real = _fence._fsync


def _signal() -> None:
    os.kill(os.getpid(), signum)
    if "FENCELOCK_TEST_THEN_SIGNAL" in os.environ:
        os.kill(os.getpid(), int(os.environ["FENCELOCK_TEST_THEN_SIGNAL"]))


seen = 0


def fsync(fd: FileDescriptorLike) -> None:
    global seen
    real(fd)
    seen += 1
    if seen == nth:
        _signal()  # its handler runs as soon as this call returns


def encode(answer: dict[str, object]) -> bytes:
    global seen
    if answer.get("op") == os.environ.get("FENCELOCK_TEST_SIGNAL_OP", "append"):
        seen += 1
        if seen == nth:
            _signal()
    return real_encode(answer)


def write(fd: int, data: ReadableBuffer) -> int:
    global seen
    count = real_write(fd, data)
    op = os.environ.get("FENCELOCK_TEST_SIGNAL_OP", "append")
    if fd == 1 and f'"op": "{op}"'.encode() in bytes(data):
        seen += 1
        if seen == nth:
            _signal()  # its handler runs as this call returns
    return count


real_encode = _hold._encode
real_write = os.write
if os.environ.get("FENCELOCK_TEST_SIGNAL_AT") == "answer":
    _hold._encode = encode
elif os.environ.get("FENCELOCK_TEST_SIGNAL_AT") == "written":
    os.write = write
else:
    _fence._fsync = fsync
if "FENCELOCK_TEST_ANSWER_WAIT" in os.environ:
    _hold._LAST_ANSWER_WAIT = float(os.environ["FENCELOCK_TEST_ANSWER_WAIT"])
try:
    main(prog_name="fencelock")
finally:
    if "FENCELOCK_TEST_SIGNAL_AT_SHUTDOWN" in os.environ:
        # What the interpreter does as it shuts down: each signal with a Python handler
        # gets its default action back. Then a stop signal comes.
        for sig in _platform.stop_signals():
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), int(os.environ["FENCELOCK_TEST_SIGNAL_AT_SHUTDOWN"]))
