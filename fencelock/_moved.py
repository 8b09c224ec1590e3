"""The mark a `recover` leaves on a session whose conversation it moved to a fresh
session (PROTOCOL.md, 5.1): the extended attribute `XATTR` on the old session file,
holding the fresh session's file name (it is always beside the old one).

The mark is what tells every later run of the old session, and every later recover,
where the conversation went: `SessionLock.superseded` answers it, a run's appends to
the old session are refused (`SessionMovedError`), and a recover answers the fresh
session at once. Setting it moves the old session's ctime, so the stuck run itself
fails its next stat fence check there too (a takeover error, said as the move). Where
the filesystem keeps no extended attributes, no mark is left, and a move is known only
to the recovers that find the stuck run's fresh session by its name."""

from __future__ import annotations

import contextlib
import os
import stat

from fencelock import _sidecar
from fencelock._constants import SESSION_SUFFIX
from fencelock._errors import PlantedFileError

XATTR = "user.fencelock.moved"
"""The extended attribute on an old session naming its fresh session (a file name)."""
CAN_MARK = hasattr(os, "listxattr")
"""Whether this platform can set and read the mark (Python has extended attributes on
Linux only)."""


def mark(session: str, fresh: str, fd: int = -1) -> None:
    """Leave the mark on ``session`` (the file open as ``fd``, where given) naming
    ``fresh`` (beside it). Nothing where the filesystem or this user cannot set it (or
    the platform: Python has extended attributes on Linux only): the move stands all
    the same."""
    if not CAN_MARK:
        return
    name = os.fsencode(os.path.basename(fresh))
    with contextlib.suppress(OSError):
        if fd >= 0:
            os.setxattr(fd, XATTR, name)
        else:
            os.setxattr(session, XATTR, name, follow_symlinks=False)


def target(session: str) -> str | None:
    """The fresh session the mark on ``session`` names, where that is a regular file
    beside it that no other user planted; None otherwise (no mark, a filesystem without
    extended attributes, a fresh session deleted since: the conversation goes on in the
    old one). One `listxattr` where there is no mark (cheaper than a `getxattr` that
    fails: every append asks)."""
    if not CAN_MARK:
        return None
    try:
        if XATTR not in os.listxattr(session, follow_symlinks=False):
            return None
        name = os.getxattr(session, XATTR, follow_symlinks=False)
    except OSError:
        return None
    if (b"/" in name or b"\0" in name or not name.endswith(SESSION_SUFFIX.encode())
            or name == os.fsencode(os.path.basename(session))):
        return None  # not a name a recover writes: a session's beside it, not this one
    fresh = os.path.join(os.path.dirname(session), os.fsdecode(name))
    try:
        st = os.lstat(fresh)
        if not stat.S_ISREG(st.st_mode):
            return None
        _sidecar.refuse_planted(fresh, st)
    except (OSError, PlantedFileError):
        return None
    return fresh
