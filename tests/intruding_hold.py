"""``python intruding_hold.py TRIGGER SESSION hold ...``: the fencelock command line, with a
writer outside the protocol that appends one line to SESSION between a fenced append's
write and its check, once, when the file TRIGGER exists (it is removed then)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from fencelock import _fence
from fencelock._entry import main

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

trigger, session = sys.argv.pop(1), sys.argv.pop(1)
real = _fence._fsync


def fsync(fd: FileDescriptorLike) -> None:
    if os.path.exists(trigger):
        os.unlink(trigger)
        with open(session, "ab") as f:
            f.write(b'{"role": "intruder"}\n')
    real(fd)


_fence._fsync = fsync
main(prog_name="fencelock")
