"""Fencing tokens: the reserved stamp key, and the floor a new sidecar starts above.

Tokens live in the record. A session whose sidecar was removed keeps its last token
in places a new sidecar consults: the ``user.fencelock.token`` extended attribute that
`clear(remove=True)` sets on the session file before unlinking the sidecar, the stamps
of the session's last lines (``append(..., stamp=True)``), and the corrupt records
`clear(force=True)` set aside as ``<sidecar>.corrupt-*``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

from fencelock import _sidecar
from fencelock._errors import FenceLockError

STAMP_KEY = "_fencelock"
"""Reserved key of a stamped line: ``{"_fencelock": {"token": N, "run_id": "..."}}``."""

XATTR = "user.fencelock.token"
_TAIL = 64 * 1024


def stamp_of(entry: object) -> int | None:
    """The token stamped into a parsed line, or None when it carries none."""
    if not isinstance(entry, dict):
        return None
    stamp: Any = entry.get(STAMP_KEY)
    if isinstance(stamp, dict):
        token = stamp.get("token")
        if type(token) is int and token >= 0:
            return token
    return None


def _last_stamped(session: str) -> int:
    try:
        fd, st = _sidecar.open_regular(session, os.O_RDONLY)
    except (OSError, FenceLockError):
        return 0  # no session, or nothing fencelock would read
    try:
        tail = os.pread(fd, _TAIL, max(0, st.st_size - _TAIL))
    except OSError:
        return 0
    finally:
        os.close(fd)
    best = 0
    for line in tail.split(b"\n"):
        if STAMP_KEY.encode() not in line:
            continue
        try:
            token = stamp_of(json.loads(line))
        except (ValueError, RecursionError):
            continue
        if token is not None:
            best = max(best, token)
    return best


def floor(session: str) -> int:
    """The largest token a session is known to have used without its record."""
    saved = 0
    if hasattr(os, "getxattr"):
        try:
            saved = int(os.getxattr(session, XATTR))
        except (OSError, ValueError):
            saved = 0
    return max(saved, _last_stamped(session), _set_aside_tokens(session))


_TOKEN_TEXT = re.compile(rb'"token"\s*:\s*(\d{1,19})')


def _set_aside_tokens(session: str) -> int:
    """The largest token legible in corrupt records that `clear --force` set aside."""
    best = 0
    for path in glob.glob(glob.escape(session) + ".holder.corrupt-*"):
        try:
            fd, _ = _sidecar.open_regular(path, os.O_RDONLY)
        except (OSError, FenceLockError):
            continue
        try:
            head = os.pread(fd, _TAIL, 0)
        except OSError:
            head = b""
        finally:
            os.close(fd)
        best = max([best, *(int(m) for m in _TOKEN_TEXT.findall(head))])
    return best


def save(session: str, token: int) -> bool:
    """Keep ``token`` on the session file before its sidecar goes. False if unsupported."""
    if not hasattr(os, "setxattr"):
        return False
    try:
        os.setxattr(session, XATTR, str(token).encode())
    except OSError:
        return False
    return True
