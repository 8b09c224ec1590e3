"""Fencing tokens: the reserved stamp key, and the floor a new sidecar starts above.

Tokens live in the record. So that they never go back when a sidecar is removed (by
`clear(remove=True)`, by hand, or set aside as corrupt) while its session file
remains, the session file carries a mark in its ``user.fencelock.token`` extended
attribute: no token above the mark has been issued. Holders read it at each acquire
and raise it `RESERVE` tokens at a time, so it costs one write per `RESERVE`
acquisitions, and a new sidecar starts above it. A copy of the session file made
without its extended attributes (``cp``, a rewrite through a temporary file) starts
without a mark. Where extended attributes are not supported, a new sidecar also
starts above the stamps in the session's last lines (``append(..., stamp=True)``)
and the tokens legible in corrupt records that `clear(force=True)` set aside as
``<sidecar>.corrupt-*``.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
from typing import Any

from fencelock import _sidecar
from fencelock._errors import FenceLockError
from fencelock._record import MAX_TOKEN

STAMP_KEY = "_fencelock"
"""Reserved key of a stamped line: ``{"_fencelock": {"token": N, "run_id": "..."}}``."""

XATTR = "user.fencelock.token"
RESERVE = 100
"""How many tokens a holder reserves on the session file at a time."""
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


def _read_mark(target: str | int) -> int:
    """The mark saved on a session file (path or descriptor); 0 when there is none.
    Raises OSError when the filesystem has no extended attributes."""
    try:
        if isinstance(target, int):
            raw = os.getxattr(target, XATTR)
        else:
            raw = os.getxattr(target, XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return 0
        raise
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


def _write_mark(target: str | int, mark: int) -> None:
    if isinstance(target, int):
        os.setxattr(target, XATTR, str(mark).encode())
    else:
        os.setxattr(target, XATTR, str(mark).encode(), follow_symlinks=False)


def _cover(target: str | int, token: int, new_mark: int) -> bool | None:
    """Raise the session file's mark to ``new_mark`` unless it already covers ``token``.
    True if it wrote, False if there was no need, None where it cannot be done
    (extended attributes unsupported or not permitted)."""
    if not hasattr(os, "setxattr"):
        return None
    try:
        if _read_mark(target) >= token:
            return False
        _write_mark(target, new_mark)
    except OSError:
        return None
    return True


def reserve(target: str | int, token: int) -> bool:
    """Make sure the session file's mark covers ``token``, raising it by `RESERVE` when
    it does not. Call while holding the session. True when it wrote (which moves the
    file's ctime: take the fingerprint after). Quietly does nothing where extended
    attributes are unsupported or not permitted.

    The mark is read every time (a read leaves ctime alone): a cached copy could
    belong to a removed file whose inode number a new session file now has."""
    return _cover(target, token, min(token + RESERVE - 1, MAX_TOKEN)) is True


def floor(session: str) -> int:
    """The largest token a session may have issued that its sidecar no longer shows."""
    saved = 0
    if hasattr(os, "getxattr"):
        try:
            saved = _read_mark(session)
        except OSError:
            saved = 0
    best = max(saved, _last_stamped(session), _set_aside_tokens(session))
    if best >= MAX_TOKEN:
        raise FenceLockError(
            f"{session}: its fencing tokens are at their limit ({best}); remove the "
            f"{XATTR} attribute and the sidecar's .corrupt-* copies if that is not true"
        )
    return best


_TOKEN_TEXT = re.compile(rb'"token"\s*:\s*(\d{1,19})')


def _set_aside_tokens(session: str) -> int:
    """The largest token legible in corrupt records that `clear --force` set aside."""
    best = 0
    for path in glob.glob(glob.escape(session) + ".holder.corrupt-*"):
        try:
            fd, st = _sidecar.open_regular(path, os.O_RDONLY)
        except (OSError, FenceLockError):
            continue
        try:
            # Not one another user planted to push the tokens to their limit.
            _sidecar.refuse_planted(path, st)
            head = os.pread(fd, _TAIL, 0)
        except FenceLockError:
            head = b""
        except OSError:
            head = b""
        finally:
            os.close(fd)
        # Numbers past the limit were never issued: they are part of the corruption.
        best = max([best, *(t for m in _TOKEN_TEXT.findall(head) if (t := int(m)) <= MAX_TOKEN)])
    return best


def save(session: str, token: int) -> bool:
    """Make sure the session file's mark covers ``token`` before its sidecar goes
    (never lowering it). False where that cannot be done."""
    return _cover(session, token, token) is not None
