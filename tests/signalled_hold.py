"""``python signalled_hold.py SIGNUM hold ...``: the fencelock command line, sending
itself signal SIGNUM once, in the middle of the first fenced append: after the line is
written and fsynced, before the append has moved the fence point or answered."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from fencelock import _fence
from fencelock._entry import main

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

signum = int(sys.argv.pop(1))
real = _fence._fsync
sent = False


def fsync(fd: FileDescriptorLike) -> None:
    global sent
    real(fd)
    if not sent:
        sent = True
        os.kill(os.getpid(), signum)  # its handler runs as soon as this call returns


_fence._fsync = fsync
main(prog_name="fencelock")
