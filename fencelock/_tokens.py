"""Fencing tokens: the reserved stamp key, and the floor a new sidecar starts above.

Tokens live in the record. So that they never go back when a sidecar is removed (by
`clear(remove=True)`, by hand, or set aside as corrupt) while its session file
remains, the session file carries a mark in its ``user.fencelock.token`` extended
attribute: no token above the mark has been issued. Holders read it at each acquire
and raise it `RESERVE` tokens at a time, so it costs one write per `RESERVE`
acquisitions, and a new sidecar starts above it. (A holder object skips the read
while the session file's stat is unchanged since its last read: see
``SidecarHolder._mark_fp`` in `fencelock._sidecar_holder`.) A copy of the session file made
without its extended attributes (``cp``, a rewrite through a temporary file) starts
without a mark. A new sidecar also starts above the stamps in the session's last
lines (``append(..., stamp=True)``).

When `clear(force=True)` sets a corrupt record aside as ``<sidecar>.corrupt-*``, the
token legible in it is raised into the session file's mark. Only where that cannot be
done (no session file yet, no extended attributes) does it leave the directory's
`SET_ASIDE_MARKER`, and only in a directory with that marker does a new sidecar search
the ``.corrupt-*`` copies: searching them at every new sidecar would read the whole
directory each time, which makes filling a directory with sessions quadratic.

`clear(remove=True)` also keeps the removed record's token in the directory's
`REMOVED_MARKER`, the largest so far: a new sidecar there starts above it too, so that
tokens do not go back where the session file loses its mark after the removal (written
anew and renamed over, as a compaction or ``sed -i`` does) or had none to keep it on.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import stat
import time
from typing import Any

from fencelock import _platform, _sidecar
from fencelock._errors import FenceLockError, attribute_fix, shell_word
from fencelock._record import MAX_TOKEN

STAMP_KEY = "_fencelock"
"""Reserved key of a stamped line: ``{"_fencelock": {"token": N, "run_id": "..."}}``."""

XATTR = "user.fencelock.token"
SET_ASIDE_MARKER = ".fencelock-set-aside"
"""A file in a sessions directory: the tokens of some set-aside record there are kept
only in its ``.corrupt-*`` copy, so new sidecars in that directory search the copies."""
REMOVED_MARKER = ".fencelock-removed"
"""A file in a sessions directory: the largest token of a record `clear(remove=True)`
removed there, in ASCII decimal. Written under its exclusive flock, read under a
shared one (or without, once `_MARKER_WAIT` has passed)."""
_MARKER_WAIT = 0.1
"""How long the marker's lock is waited for: a writer holds it for a moment, and one
stopped as it did (Ctrl-Z) must not hold up every new session of the directory."""
RESERVE = 10_000
"""How many tokens a holder reserves on the session file at a time."""

_WS = rb"[ \t\r\n]*"
"""JSON's whitespace (a regular expression's whitespace class also takes \\x0b and \\x0c)."""
_JSON_STRING_BODY = rb'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})+'
TRAILING_STAMP = re.compile(
    rb'"%s"%s:%s\{%s"token"%s:%s(\d{1,4300})%s,%s"run_id"%s:%s"(%s)"%s\}%s\}%s$' % (
        STAMP_KEY.encode(), _WS, _WS, _WS, _WS, _WS, _WS, _WS, _WS, _WS, _JSON_STRING_BODY,
        _WS, _WS, _WS)
)
"""The stamp `append(..., stamp=True)` puts at the end of a line (token, run id): how a
line too long to parse is read for its token (in its last `TAIL` bytes). Tokens of any
length Python converts (4,300 digits), so that one past the largest is seen as such."""
TAIL = 64 * 1024


def trailing_stamp(line: bytes) -> tuple[int, str] | None:
    """(token, run id) of the stamp at the end of a line read without parsing it (in
    its last `TAIL` bytes), if it has one. The token may lie above `MAX_TOKEN`."""
    m = TRAILING_STAMP.search(line[-TAIL:])
    if m is None:
        return None
    try:
        token = int(m[1])
    except ValueError:  # more digits than this interpreter converts (its own limit)
        return None
    run = m[2].decode("utf-8", "replace")
    if "\\" in run:  # a JSON string's escapes
        with contextlib.suppress(ValueError):
            run = json.loads(f'"{run}"')
    return token, run


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


def may_hold_stamp(line: bytes) -> bool:
    """Whether a line may carry a stamp, as a parse would find it: the key as written,
    or a JSON escape, which may spell it (``"\\u005ffencelock"``)."""
    return _STAMP_KEY_BYTES in line or b"\\u" in line


_STAMP_KEY_BYTES = STAMP_KEY.encode()


def last_stamped(session: str) -> int:
    """The largest token stamped into the session's last lines (0 for none)."""
    try:  # stored with no point for an interrupt between (`_sidecar.open_regular`)
        (fd, st), = map(_sidecar.open_regular, (session,), (os.O_RDONLY,))
    except (OSError, FenceLockError):
        return 0  # no session, or nothing fencelock would read
    try:
        tail = _platform.pread(fd, TAIL, max(0, st.st_size - TAIL))
    except OSError:
        return 0
    finally:
        os.close(fd)
    return largest_token(tail)


_STAMP_AS_WRITTEN = re.compile(
    rb'"%s":\{"token":(\d{1,4300}),"run_id":"[^"\\\x00-\x1f]*"\}' % STAMP_KEY.encode()
)
"""A stamp as fencelock writes it, its token in group 1: the key, then an object of
``token`` and a run id that needs no escaping (`_identity.RUN_IDS` makes only such ids),
and nothing else (so no second ``token``)."""
_KEY_ESCAPE = re.compile(rb"\\u00[56][0-9a-fA-F]")
"""A JSON escape of one of the key's characters (all in U+005F..U+006F): a parse may read
a key spelled with it."""


def largest_token(tail: bytes) -> int:
    """``max(line_token(line) for line in tail.split(b"\\n"))`` (``tail``: the session's
    last lines, read at each acquire with the etcd store). Where every mention of the
    key in ``tail`` is a stamp as fencelock writes it, with no escape that may spell the
    key and no line that may be UTF-16 or UTF-32 (which a parse decodes too), no line
    counts for more than the largest of those stamps' tokens (its parse, or
    a line that does not parse read from its end, finds one of them): only the line
    holding the largest is parsed, not each of hundreds of stamped lines. Anything
    else (or a largest stamp its line does not count for) takes every line."""
    if _STAMP_KEY_BYTES not in tail and b"\\u" not in tail:
        return 0  # no line may hold a stamp (`may_hold_stamp`)
    found = _STAMP_AS_WRITTEN.findall(tail)
    # A NUL may belong to a UTF-16 or UTF-32 line, which a parse decodes as such (and
    # whose key is neither those bytes nor such an escape).
    if found and len(found) == tail.count(_STAMP_KEY_BYTES) and b"\0" not in tail and \
            not _KEY_ESCAPE.search(tail):
        try:
            digits = max(found, key=int)
        except ValueError:  # more digits than this interpreter converts (its own limit)
            digits = b""
        at = tail.find(b'"%s":{"token":%s,' % (_STAMP_KEY_BYTES, digits)) if digits else -1
        if at >= 0:
            start = tail.rfind(b"\n", 0, at) + 1
            token = line_token(_line_at(tail, start))
            if token == int(digits):
                return token
    # A line that starts before the window is read from its end (`line_token`).
    return max(line_token(line) for line in tail.split(b"\n"))


def _line_at(tail: bytes, start: int) -> bytes:
    end = tail.find(b"\n", start)
    return tail[start:] if end < 0 else tail[start:end]


def line_token(line: bytes) -> int:
    """The token a line counts for in a floor: its stamp's, parsed; for a line that
    does not parse (cut off at its start, or too deep), the stamp at its end. 0 for
    none, and for one above `MAX_TOKEN` (never issued)."""
    if not may_hold_stamp(line):
        return 0
    try:
        token = stamp_of(json.loads(line))
    except (ValueError, RecursionError):
        return trailing_token(line)
    return token if token is not None and token <= MAX_TOKEN else 0


def trailing_token(line: bytes) -> int:
    """The token of the stamp at a line's end (`trailing_stamp`), as `line_token`
    counts it: 0 for none, and for one above `MAX_TOKEN`."""
    found = trailing_stamp(line)
    return found[0] if found is not None and found[0] <= MAX_TOKEN else 0


def went_backwards(session: str, token: int, stamped: int, store: str) -> FenceLockError:
    """The error for a store (etcd) whose new token is not above one the session's
    lines already carry."""
    return FenceLockError(
        f"{session}: {store} issued fencing token {token}, but the session already has "
        f"lines stamped with token {stamped}; tokens must never go back, so nothing was "
        f"written. {_store_behind(stamped)}"
    )


def store_behind(session: str, revision: int, stamped: int, store: str) -> FenceLockError:
    """The error for a session whose lines carry a token the store (etcd, at
    ``revision``) has not reached, which a probe shows and a recover raises: a run there
    would be refused."""
    return FenceLockError(
        f"{session}: {store} is at revision {revision}, below token {stamped} that lines "
        f"in the session are stamped with, so a run there would be refused "
        f"(tokens must never go back). {_store_behind(stamped)}"
    )


def _store_behind(stamped: int) -> str:
    return (
        f"The store lost its data or is another one than the one that issued {stamped} "
        f"(a session moved from sidecars with larger tokens does this too). Restore its "
        f"data from a backup, raise its revision past {stamped} (etcdutl snapshot "
        f"restore --bump-revision), or go on in a new session file"
    )


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
    return _mark_value(raw)


def mark_within(fd: int, low: int, high: int) -> bool:
    """Whether the mark of the session file open as ``fd`` is from ``low`` to ``high``;
    True where the file takes no extended attributes (it has no mark to raise or lose)."""
    if not hasattr(os, "getxattr"):
        return True
    try:
        return low <= _read_mark(fd) <= high
    except OSError as e:
        return e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)


def _mark_value(raw: bytes) -> int:
    """A mark's value: ASCII decimal digits and nothing else (no sign, space or ``_``,
    which Python's int() would take), else unparsable: 0. One far past the token limit
    reads as the limit (`floor` refuses it), without converting thousands of digits;
    leading zeros count for nothing (``0005`` is 5, as a writer padding it meant)."""
    if not raw.isdigit():  # bytes: ASCII digits only
        return 0
    raw = raw.lstrip(b"0")
    return (int(raw) if raw else 0) if len(raw) <= 20 else MAX_TOKEN


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
        return _raise_mark(target, token, new_mark)
    except OSError:
        return None


def _raise_mark(target: str | int, token: int, new_mark: int) -> bool:
    """`_cover`, raising the OSError of a mark that cannot be read or set."""
    if _read_mark(target) >= token:
        return False
    _write_mark(target, new_mark)
    return True


def needs_mark(session: str, token: int) -> bool:
    """Whether the mark on the session file (its path, not followed if a symlink) is
    below ``token``; False where it cannot be read (no file, no extended attributes)."""
    if not hasattr(os, "getxattr"):
        return False
    try:
        return _read_mark(session) < token
    except OSError:
        return False


def reserve(target: str | int, token: int) -> bool:
    """Make sure the session file's mark covers ``token``, raising it by `RESERVE` when
    it does not. Call while holding the session. True when it wrote (which moves the
    file's ctime: take the fingerprint after). Quietly does nothing where extended
    attributes are unsupported or not permitted.

    The mark is read every time (a read leaves ctime alone): a cached copy could
    belong to a removed file whose inode number a new session file now has."""
    return _cover(target, token, min(token + RESERVE - 1, MAX_TOKEN)) is True


def reserve_known(target: str, token: int) -> tuple[bool, int]:
    """`reserve`, also returning the mark now known to be on the file (0 where it is
    not known): a holder that finds the file's stat unchanged since may skip the read."""
    if not hasattr(os, "setxattr"):
        return False, 0
    try:
        mark = _read_mark(target)
        if mark >= token:
            return False, mark
        mark = min(token + RESERVE - 1, MAX_TOKEN)
        _write_mark(target, mark)
    except OSError:
        return False, 0
    return True, mark


def floor(session: str) -> int:
    """The largest token a session may have issued that its sidecar no longer shows."""
    saved = 0
    if hasattr(os, "getxattr"):
        try:
            saved = _read_mark(session)
        except OSError:
            saved = 0
    stamped = last_stamped(session)
    aside = 0
    directory = os.path.dirname(session)
    if os.path.lexists(os.path.join(directory, SET_ASIDE_MARKER)):
        aside = _set_aside_tokens(session)
    removed = removed_token(directory)
    best = max(saved, stamped, aside, removed)
    if best >= MAX_TOKEN:
        found = [(what, fix) for token, what, fix in (
            (saved, f"its {XATTR} attribute", "remove the attribute"),
            (stamped, "a stamp among its last lines",
             "set the session file aside (no token goes below a stamp in it)"),
            (aside, "the sidecar's .corrupt-* copies", "remove the copies"),
            (removed, f"the directory's {REMOVED_MARKER}", "remove that file"),
        ) if token >= MAX_TOKEN]
        raise FenceLockError(
            f"{session}: its fencing tokens are at their limit ({best}), going by "
            f"{' and '.join(what for what, _ in found)}; if that is not so, "
            f"{' and '.join(fix for _, fix in found)}"
        )
    return best


_TOKEN_TEXT = re.compile(rb'"token"%s:%s(\d{1,19})(?!\d)' % (_WS, _WS))
"""A token as a corrupt record's text may still hold it: a number longer than any token
is part of the corruption, not a token of its first 19 digits."""


def _legible_token(data: bytes) -> int:
    """The largest token legible in a set-aside record's bytes (0 if none): its token
    where they parse as a JSON object (a record `clear --force` set aside whole, too
    large to write back, whose key may be spelled with an escape), and any legible in
    their text (a corrupt one)."""
    # Numbers past the limit were never issued: they are part of the corruption.
    found = [t for m in _TOKEN_TEXT.findall(data) if (t := int(m)) <= MAX_TOKEN]
    try:
        whole = json.loads(data)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict) and type(token := whole.get("token")) is int \
            and 0 < token <= MAX_TOKEN:
        found.append(token)
    return max([0, *found])


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
            head = _platform.pread(fd, TAIL, 0)
        except FenceLockError:
            head = b""
        except OSError:
            head = b""
        finally:
            os.close(fd)
        best = max(best, _legible_token(head))
    return best


def removed_token(directory: str) -> int:
    """The token in ``directory``'s `REMOVED_MARKER` (0 for none, or one that cannot be
    read or parsed, or that another user planted where anyone may write: it could push
    every new session's tokens to their limit)."""
    path = os.path.join(directory, REMOVED_MARKER)
    try:
        fd, st = _sidecar.open_regular(path, os.O_RDONLY)
    except (OSError, FenceLockError):
        return 0
    try:
        _sidecar.refuse_planted(path, st)
        if _platform.CAN_BLOCK:  # (read all the same if a stopped writer keeps it)
            _lock_briefly(fd, shared=True)
        raw = _platform.pread(fd, 32, 0)
    except (OSError, FenceLockError):
        return 0
    finally:
        os.close(fd)
    return _mark_value(raw)


def _lock_briefly(fd: int, shared: bool) -> bool:
    """Take the marker's lock, waiting `_MARKER_WAIT` at most: whether it was taken."""
    give_up = time.monotonic() + _MARKER_WAIT
    while not _platform.try_lock(fd, shared):
        if time.monotonic() >= give_up:
            return False
        time.sleep(0.001)
    return True


def keep_removed(session: str, token: int) -> str | None:
    """Raise the `REMOVED_MARKER` beside ``session`` to ``token`` (never lower it), before
    its sidecar is removed. None when it covers the token; else why it cannot. OSError
    when it cannot be made: the directory's doing, as the sidecar's removal would be.

    The marker is 0600, and 0660 where the directory is writable by its group and not
    by everyone (sessions a group shares): its members then raise it in turn, whatever
    mode each gives its own sidecars; else the first one's marker shut the others'
    ``clear --remove`` out of the directory. Never readable by others: anyone who can
    open it can lock it, and hold up every new session and removal in the directory.
    One of this user's made with another mode before is given this one."""
    directory = os.path.dirname(session)
    path = os.path.join(directory, REMOVED_MARKER)
    try:
        where = os.stat(directory or ".").st_mode
        # (A directory anyone may write to, as /tmp, is nobody's group in particular.)
        shared = bool(where & stat.S_IWGRP) and not where & stat.S_IWOTH
    except OSError:
        shared = False  # (the open below says why)
    mode = 0o660 if shared else 0o600
    try:
        fd, st = _sidecar.open_regular(path, os.O_RDWR | os.O_CREAT, mode)
    except OSError as e:
        if not os.path.lexists(path):
            raise
        return _not_writable(path, e)
    except FenceLockError as e:
        return str(e)
    try:
        _sidecar.refuse_planted(path, st)
        if st.st_nlink > 1:  # another name's file (a backup's hard link) would be written
            if _mark_value(_platform.pread(fd, 32, 0)) >= token:
                return None  # it covers the token: nothing to write
            quoted, new = shell_word(path), shell_word(path + ".new")
            return (f"{path} is a hard link to a file with {st.st_nlink} names, which "
                    f"fencelock does not write through; give it a file of its own, "
                    f"keeping its token (cp -p {quoted} {new} && mv {new} {quoted}), and "
                    f"try again")
        by_root = not st.st_size and st.st_uid == 0  # made just now, as root (sudo)
        if by_root or (stat.S_IMODE(st.st_mode) != mode and st.st_uid == _sidecar.geteuid_now()):
            # (the umask keeps the group out; root's, the directory's owner is shut out;
            # an older one's 0644 let anyone lock it)
            _platform.set_mode(fd, mode, _platform.owner_for(path) if by_root else None)
        if not _lock_briefly(fd, shared=False):
            return f"{path} is locked by another process; try again"
        if _mark_value(_platform.pread(fd, 32, 0)) < token:
            data = str(token).encode()
            _platform.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
    except OSError as e:
        return f"{path} cannot be written: {e.strerror or e}"
    except FenceLockError as e:
        return str(e)
    finally:
        os.close(fd)
    return None


def _not_writable(path: str, e: OSError) -> str:
    """Why the marker at ``path`` cannot be opened (``e``): another user's is said to
    be theirs (planted, where anyone may write to the directory), with who can mend it."""
    said = f"{path} cannot be written: {e.strerror or e}"
    try:
        st = os.lstat(path)
        _sidecar.refuse_planted(path, st)
    except FenceLockError as planted:
        return str(planted)
    except OSError:
        return said
    if st.st_uid == _sidecar.geteuid_now():
        return said
    return (f"{said} (it is uid {st.st_uid}'s: they or root can let this user write it, as "
            f"the group that shares the sessions: chmod g+w)")


def keep_before_set_aside(session: str, fd: int) -> None:
    """Keep the token legible in the record in ``fd`` (`_legible_token`) before it is
    set aside: in the session file's mark and in the directory's `REMOVED_MARKER`, as
    `clear --remove` does (the mark is lost when the file is written anew and renamed
    over). Where that marker cannot be written, also by leaving `SET_ASIDE_MARKER` in
    the directory (which has new sidecars there read the `.corrupt-*` copies), which
    must succeed unless the mark covers the token. Call while holding the sidecar's
    lock, before it is moved away."""
    try:
        token = _legible_token(_platform.pread(fd, TAIL, 0))
    except OSError as e:
        raise FenceLockError(f"{session}.holder: cannot be read ({e}); nothing was moved") from None
    if not token:
        return
    marked = os.path.isfile(session) and _cover(session, token, token) is not None
    with contextlib.suppress(OSError):  # (then the set-aside marker below cannot be made either)
        if keep_removed(session, token) is None:
            return
    if marked:  # kept until the file is written anew: the marker too, where it can be
        with contextlib.suppress(FenceLockError):
            _leave_set_aside_marker(session)
        return
    _leave_set_aside_marker(session)


def _leave_set_aside_marker(session: str) -> None:
    """Make sure `SET_ASIDE_MARKER` is in the session's directory (FenceLockError,
    saying what to do, where it cannot be)."""
    marker = os.path.join(os.path.dirname(session), SET_ASIDE_MARKER)
    try:
        st: os.stat_result | None = os.lstat(marker)
    except OSError:
        st = None  # the create below says why, if it fails
    if st is not None and stat.S_ISREG(st.st_mode):
        # There already: that is all it takes, unless another user left it where anyone
        # may write (they could remove it, and the token with it: refused).
        _sidecar.refuse_planted(marker, st)
        return
    try:
        (fd, _), = map(_sidecar.open_regular, (marker,), (os.O_WRONLY | os.O_CREAT,))
    except OSError as e:
        from fencelock._errors import WRITE_FIXES

        fix = WRITE_FIXES.get(e.errno or 0, "fix the directory's permissions")
        again = "" if fix.endswith("try again") else ", and try again"
        raise FenceLockError(
            f"{marker}: cannot be created ({e.strerror or e}), so the token of the corrupt "
            f"record beside it would be lost; {fix}{again}"
        ) from None
    except FenceLockError as e:
        raise FenceLockError(
            f"{marker}: cannot be created ({e}), so the token of the corrupt record "
            f"beside it would be lost; remove what is there, and try again"
        ) from None
    os.close(fd)


def save(session: str, token: int) -> str | None:
    """Make sure the session file's mark covers ``token`` before its sidecar goes
    (never lowering it). None when it does; else why it cannot, with what to do."""
    if not hasattr(os, "setxattr"):
        return "this system has no extended attributes"
    try:
        _raise_mark(session, token, token)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            try:
                uid: int | None = os.stat(session).st_uid
            except OSError:
                uid = None
            if e.errno == errno.EPERM and (uid == os.geteuid() or os.geteuid() == 0):
                # Its owner (or root) refused: an attribute, not the owner, is in the way.
                return f"the session file's {XATTR} attribute cannot be set: " + attribute_fix(
                    session, "change")
            owner = "" if uid is None else f" (it belongs to uid {uid})"
            return (f"this user may not set its {XATTR} attribute{owner}; run clear "
                    f"--remove as the session file's owner")
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return "its filesystem has no extended attributes"
        return f"its {XATTR} attribute cannot be set: {e.strerror or e}"
    return None
