"""``python stuck_line_hold.py TRIGGER hold ...``: the fencelock command line, where a
fenced append's fsync fails with EIO once the file TRIGGER exists (it is removed then),
and the cut that would take the line back out fails too (a filesystem turned read-only
by the I/O error): the line stays in the session, and the answer says ``"stored": null``."""

from __future__ import annotations

import errno
import os
import sys
from typing import TYPE_CHECKING

from fencelock import _fence
from fencelock._entry import main

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

trigger = sys.argv.pop(1)
real = _fence._fsync


def cannot_cut(fd: int, length: int) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def fsync(fd: FileDescriptorLike) -> None:
    if os.path.exists(trigger):
        os.unlink(trigger)
        os.ftruncate = cannot_cut
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    real(fd)


_fence._fsync = fsync
main(prog_name="fencelock")
