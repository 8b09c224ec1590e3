"""Fenced, durable JSONL appends to a session file.

One entry is one line written with ``O_APPEND`` (looping on short writes) and
fsynced; a new file also fsyncs its directory. Before writing, the session's
fingerprint must match the last fence point, or `SessionTakeoverError` is raised and
nothing is written. A torn last line left by a crashed writer is cut off and kept in
``<session>.torn`` so the session stays valid JSONL. `publish` makes a new session
whole or not at all (recover's fresh session).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

from fencelock import _fingerprint, _moved, _platform, _sidecar, _tokens
from fencelock._errors import (
    FenceLockError,
    PlantedFileError,
    SessionMovedError,
    SessionTakeoverError,
    SessionWriteError,
    UnsafePathError,
    warn_each_time,
)
from fencelock._fingerprint import CONTENT, STAT, FenceMode, Fingerprint, Witness
from fencelock._json import NotJSONError, digits_problem, strict_loads
from fencelock._platform import O_CLOEXEC, owner_for, set_mode

TORN_SUFFIX = ".torn"
"""Torn fragments cut from a session's end are appended here, one per line, as found."""

# Seams for fault-injection tests: replaced to simulate short writes and I/O errors.
_write = os.write
_fsync = os.fsync


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
"""What `json.dumps` with these arguments builds at every call (2 µs of an append's 4):
allow_nan=False, as NaN and Infinity are not JSON, and strict readers (and `fencelock
hold`'s requests) refuse them."""


def encode_entry(entry: dict[str, Any] | str, stamp: tuple[int, str] | None) -> bytes:
    """One JSONL line for ``entry``: a dict, or a str holding exactly one line of JSON.
    An entry that carries the reserved stamp key without being stamped is refused: a
    token there would pass for fencelock's own. One too large to check, stamp or encode
    in this process's memory (a text entry's parse takes many times its size) is
    refused too, rather than a bare MemoryError raised from the middle of it."""
    try:
        return _encode_entry(entry, stamp)
    except MemoryError:  # what was built for it is freed by now
        raise _too_large(len(entry) if isinstance(entry, str) else None) from None


def _encode_entry(entry: dict[str, Any] | str, stamp: tuple[int, str] | None) -> bytes:
    if isinstance(entry, str):
        if "\n" in entry or "\r" in entry:
            raise FenceLockError("a session entry must be one line; this one has a line break; "
                                 "nothing was written")
        try:
            parsed = strict_loads(entry)
        except RecursionError:
            raise FenceLockError(
                "a session entry is nested too deeply for Python's JSON parser; nothing "
                "was written") from None
        except NotJSONError as e:  # NaN, Infinity, a number past a double's range
            raise FenceLockError(f"a session entry must be JSON that any reader takes: {e}; "
                                 "nothing was written") from None
        except ValueError as e:
            digits = digits_problem(e)
            why = f"a session entry holds {digits}" if digits else (
                "a session entry must be one line of JSON when given as text (pass a dict "
                "to have it encoded)")
            raise FenceLockError(f"{why}; nothing was written") from None
        if stamp is not None and not isinstance(parsed, dict):
            raise FenceLockError("a session entry must be a JSON object to be stamped; nothing "
                                 "was written")
        if "\\u" in entry:  # an escape may spell a lone surrogate, which strict readers refuse
            try:
                _ENCODER.encode(parsed).encode()
            except UnicodeEncodeError:
                raise FenceLockError(
                    "a session entry must be valid Unicode text: a \\u escape in it spells a "
                    "lone surrogate; nothing was written") from None
        if isinstance(parsed, dict) and _tokens.STAMP_KEY in parsed:
            entry = parsed  # refused below, or its stamp replaced (and put last)
        elif stamp is not None:
            # Stamped in the text, which is otherwise written as it is: parsed and
            # encoded again, its numbers would change (1e2, 19.990000000000000001)
            # and a repeated key would go.
            body = entry.strip(" \t")[:-1].rstrip(" \t")
            comma = "" if body.endswith("{") else ","
            entry = (f'{body}{comma}"{_tokens.STAMP_KEY}":'
                     f"{_ENCODER.encode({'token': stamp[0], 'run_id': stamp[1]})}}}")
            stamp = None  # stamped: written as it is now
    if stamp is None and isinstance(entry, dict) and _tokens.STAMP_KEY in entry:
        raise FenceLockError(
            f"a session entry must not carry the reserved key {_tokens.STAMP_KEY!r} (append "
            f"with stamp=True to have fencelock stamp it); nothing was written")
    try:
        if isinstance(entry, dict):
            if stamp is not None:
                if _tokens.STAMP_KEY in entry:  # the stamp goes last, where readers look
                    entry = {k: v for k, v in entry.items() if k != _tokens.STAMP_KEY}
                entry = {**entry, _tokens.STAMP_KEY: {"token": stamp[0], "run_id": stamp[1]}}
            text = _ENCODER.encode(entry)
            return text.encode() + b"\n"
        if isinstance(entry, str):
            return entry.encode() + b"\n"
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from os.fsdecode
        raise FenceLockError(f"a session entry must be valid Unicode text: {e.reason} at "
                             f"{e.start}; nothing was written") from None
    except (TypeError, ValueError, RecursionError) as e:  # sets, NaN, cycles, depth
        why = (digits_problem(e) if isinstance(e, ValueError) else None) or (
            "it is nested too deeply for Python's JSON encoder" if isinstance(e, RecursionError)
            else str(e))
        raise FenceLockError(f"a session entry must be JSON: {why}; nothing was "
                             f"written") from None
    raise FenceLockError(f"a session entry must be a dict or a str, not {type(entry).__name__}; "
                         "nothing was written")


def _too_large(characters: int | None) -> FenceLockError:
    size = "" if characters is None else f" of {characters:,} characters"
    return FenceLockError(
        f"a session entry{size} is too large to be checked and encoded in this "
        f"process's memory; nothing was written (write it in smaller entries, or give the "
        f"process more memory)")


def _fingerprint_fd(
    fd: int, mode: FenceMode, session: str, st: os.stat_result | None = None,
    witness: Witness | None = None,
) -> Fingerprint:
    try:
        if st is None:
            st = os.fstat(fd)
        tail = _fingerprint.tail_digest(fd, st.st_size) if mode is CONTENT else None
    except OSError as e:
        raise SessionWriteError(session, e, "reading it for the fence") from None
    return _fingerprint.from_stat(st, tail, witness)


_WITNESS_BYTES = 4096
"""How much of the end of a run's last line a fence point keeps, to tell a change of
the session's metadata alone from a write (`metadata_only`)."""


def _witness(line: bytes, at: int, st: os.stat_result) -> Witness:
    """Where the end of ``line``, appended at offset ``at``, lies, those bytes, and the
    metadata of the file it went into (``st``, its stat after the write)."""
    if len(line) > _WITNESS_BYTES:
        return at + len(line) - _WITNESS_BYTES, line[-_WITNESS_BYTES:], _metadata(st)
    return at, line, _metadata(st)


def _metadata(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a change of a file's metadata alone moves with its ctime."""
    return st.st_nlink, st.st_mode, st.st_uid, st.st_gid


def metadata_only(
    fd: int, expected: Fingerprint | None, st: os.stat_result, token: int
) -> bool:
    """Whether the session (open as ``fd``, its stat ``st``) differs from ``expected``
    by a change of its metadata alone, which writes nothing: a hard link made or
    removed (a `cp -al` backup), chmod, chown. Only against a fence point an append of
    this run left, which keeps the end of its line and the file's metadata then
    (``witness``): the device, inode, size and mtime are as they were; the link count,
    permission bits or owner moved (a ctime that moved with none of them is a write
    whose mtime was put back: `cp -p`, `rsync -t`, `tar x`); the end of the run's line
    is still where it wrote it; and the token mark is where this run's acquire left
    it: at least its ``token`` (a file made anew has none) and at most ``token`` +
    `RESERVE` - 1 (an acquire through another name of the file raises it further)."""
    if expected is None or expected.witness is None:
        return False
    at, end, meta = expected.witness
    if (st.st_size != expected.size or st.st_mtime_ns != expected.mtime_ns
            or st.st_ino != expected.ino or st.st_dev != expected.dev
            or _metadata(st) == meta):
        return False
    try:
        return _holds(fd, end, at) and _tokens.mark_within(
            fd, token, token + _tokens.RESERVE - 1)
    except OSError:
        return False


def _metadata_only_at(
    session: str, expected: Fingerprint, token: int
) -> Fingerprint | None:
    """`metadata_only` for the file at ``session`` now: its fingerprint if so (its
    witness keeping the end of the line, with the metadata now), else None."""
    try:
        fd, st = _sidecar.open_regular(session, os.O_RDONLY)
    except (OSError, FenceLockError):
        return None
    try:
        if not metadata_only(fd, expected, st, token) or expected.witness is None:
            return None
        # The next change is told from this one: the witness takes the metadata now.
        at, end, _ = expected.witness
        return _fingerprint.from_stat(st, None, (at, end, _metadata(st)))
    finally:
        os.close(fd)


def check(
    session: str, expected: Fingerprint | None, mode: FenceMode, opened: bool = False,
    token: int = 0,
) -> Fingerprint | None:
    """The session's fingerprint now; raises `SessionTakeoverError` if it moved.
    ``opened``: taken from the opened file (see `_fingerprint.take`). A change of its
    metadata alone (`metadata_only`, for the run of ``token``) is no move: the
    fingerprint returned then differs from ``expected`` in its ctime."""
    try:
        actual = _fingerprint.take(session, mode, opened)
    except UnsafePathError as e:
        raise _replaced(session, expected, e) from e
    if not _same(expected, actual, mode):
        if expected is None and actual is not None and actual.size == 0 \
                and _own_empty(session, actual):
            return None  # what the next append takes as its own creation (`_open_empty`)
        if mode is STAT and expected is not None and expected.witness is not None:
            kept = _metadata_only_at(session, expected, token)
            if kept is not None:
                return kept
        raise SessionTakeoverError(session, expected, actual)
    return actual


def _own_empty(session: str, actual: Fingerprint) -> bool:
    """Whether the file ``actual`` describes is still an empty regular file of this
    user's at ``session``: it holds nothing to take over, so the fence point "no file"
    stands (an interrupt right as a create's ``open`` returned leaves one)."""
    try:
        st = os.lstat(session)
    except OSError:
        return False
    return _empty_of_mine(st) and st.st_ino == actual.ino and st.st_dev == actual.dev


def _empty_of_mine(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_uid == _sidecar.OWN_UID


def _replaced(session: str, expected: Fingerprint | None,
              refused: UnsafePathError | None = None) -> SessionTakeoverError:
    """The takeover of a run whose session path now holds what no run writes to (a
    symlink, FIFO or directory put in its place, ``refused`` saying which): the run
    began on a regular file, or on none, so something outside it changed the path."""
    try:
        actual: Fingerprint | None = _fingerprint.from_stat(os.lstat(session))
    except OSError:
        actual = None
    return SessionTakeoverError(session, expected, actual,
                                found=None if refused is None else refused.what)


def _stat_matches(expected: Fingerprint | None, st: os.stat_result) -> bool:
    """The stat fence's comparison straight from a stat result (no Fingerprint built)."""
    return expected is not None and (
        st.st_size == expected.size
        and st.st_mtime_ns == expected.mtime_ns
        and st.st_ino == expected.ino
        and st.st_ctime_ns == expected.ctime_ns
        and st.st_dev == expected.dev
    )


def _same(expected: Fingerprint | None, actual: Fingerprint | None, mode: FenceMode) -> bool:
    if expected is None:
        return actual is None
    return expected.matches(actual, mode)


def _open_torn(
    torn: str, file_mode: int, session_st: os.stat_result
) -> tuple[int, os.stat_result]:
    """Open ``<session>.torn`` to append to it, made with ``file_mode`` if missing (as
    root, the session's owner's: ``session_st``, its descriptor's stat); (descriptor,
    its stat)."""
    while True:
        for flags in (os.O_APPEND | os.O_CREAT | os.O_EXCL, os.O_APPEND):
            try:  # through `map`, as the append's own open
                try:
                    (fd, st), = map(_sidecar.open_regular, (torn,), (flags | os.O_RDWR,),
                                    (file_mode,))
                except PermissionError:  # writable only: no look at what it holds
                    (fd, st), = map(_sidecar.open_regular, (torn,), (flags | os.O_WRONLY,),
                                    (file_mode,))
            except FileExistsError:
                continue  # kept from before: appended to as it is
            except FileNotFoundError:
                if flags & os.O_CREAT:
                    raise  # its directory is gone
                break  # removed since the exclusive create failed: make it after all
            try:
                if flags & os.O_CREAT:
                    set_mode(fd, file_mode, owner_for(torn, st=session_st))
            except BaseException:
                os.close(fd)
                raise
            return fd, st


def _cut_torn_tail(
    fd: int, session: str, st: os.stat_result, expected: Fingerprint | None, mode: FenceMode,
    cutting: list[int], file_mode: int = 0o600,
) -> int:
    """If the file does not end in a newline, move its last partial line aside; returns
    where the file ends after that. ``st`` is the file's stat at the fence check, which
    found it ``expected``. Where the file is cut goes in ``cutting`` just before the
    cut, so that an interrupt from there on finds the fence point to move to. A
    ``.torn`` this makes gets ``file_mode``, as the session and its sidecar do."""
    size = st.st_size
    try:
        if size == 0 or _platform.pread(fd, 1, size - 1) == b"\n":
            return size
        keep = last_line_start(fd, size)
    except OSError as e:
        raise SessionWriteError(session, e, "reading its last line") from None
    torn = session + TORN_SUFFIX
    try:
        (aside, kept), = map(_open_torn, (torn,), (file_mode,), (st,))
    except UnsafePathError:
        # Not a regular file: another user's, where anyone may create files, is said to
        # be planted (with who can remove it), as a regular one is below.
        _sidecar.refuse_planted_at(torn)
        raise
    except OSError as e:
        # None there: its directory refused to make it (named as the cause).
        what = "keeping the torn last line aside"
        raise SessionWriteError(torn, e, what if os.path.lexists(torn) else f"create ({what})"
                                ) from None
    try:
        if kept.st_nlink > 1:  # another name's file would get the fragment
            raise UnsafePathError(torn, f"a hard link to a file with {kept.st_nlink} names")
        _sidecar.refuse_planted(torn, kept)
    except BaseException:  # an interrupt's too
        os.close(aside)
        raise
    try:
        end = kept.st_size
        if end and not _ends_a_line(aside, end):
            # A copy cut short (a holder killed in the middle of one; the fragment is
            # still in the session, which is cut only once its copy is whole): ended
            # here, so that what follows is a line of its own, never glued to it.
            _write_all(aside, b"\n", torn)
            end += 1
        # Kept already only if the session is strictly older than S.torn: a tie (a
        # coarse clock) keeps it again, rather than lose a second tear of the same bytes.
        if not (st.st_mtime_ns < kept.st_mtime_ns
                and _kept_last(aside, end, fd, keep, size)):
            what = f"keeping the session's torn last line ({size - keep:,} bytes) aside"
            _copy_sparsely(fd, keep, size, aside, session, torn, what)
            _write_all(aside, b"\n", torn, what)
        _fsync(aside)
    except BaseException as e:
        # What part of the fragment reached S.torn goes again: the next append keeps
        # the whole fragment on a line of its own, not glued to a piece of itself. An
        # empty S.torn (made for this copy, most likely) goes altogether.
        with contextlib.suppress(OSError):
            os.ftruncate(aside, kept.st_size)
            if not kept.st_size:
                _sidecar.unlink_if_still(torn, kept)
        if isinstance(e, OSError):
            raise SessionWriteError(torn, e, "fsync of the torn last line") from None
        raise
    finally:
        os.close(aside)
    try:
        # Cut only what the fence check saw: a line appended meanwhile (by a writer
        # outside the protocol) would go with the cut. (A stat that flaps under the
        # content fence leaves its size to compare.)
        now = os.fstat(fd)
        if now.st_size != size or (
            mode is STAT and not _stat_matches(expected, now)
        ):
            raise SessionTakeoverError(session, expected, _fingerprint_fd(fd, mode, session, now))
        cutting.append(keep)
        os.ftruncate(fd, keep)
    except OSError as e:
        del cutting[:]  # not cut: the fragment is still in the session, not moved
        raise SessionWriteError(
            session, e, f"cutting its torn last line (a copy is already in {torn})"
        ) from None
    return keep


def _check_opened(
    fd: int, st: os.stat_result, session: str, expected: Fingerprint | None,
    mode: FenceMode, token: int,
) -> None:
    """An append's fence check on the session file it opened (``st``, its stat): a
    takeover unless it is the fence point, or differs by its metadata alone
    (`metadata_only`); and not another user's from the start (planted), not a swap."""
    if not (mode is STAT and _stat_matches(expected, st)):
        actual = _fingerprint_fd(fd, mode, session, st)
        if not _same(expected, actual, mode) and not (
                mode is STAT and metadata_only(fd, expected, st, token)):
            raise SessionTakeoverError(session, expected, actual)
    _sidecar.refuse_planted(session, st)


def set_torn_tail_aside(
    session: str, expected: Fingerprint | None, mode: FenceMode, file_mode: int = 0o600,
    token: int = 0,
) -> Fingerprint | None:
    """Before writers that do not go through `append` take over the session (a `fencelock
    run` command): move a torn last line aside, as a run's first `append` does, so that
    their first line is not glued to it. Returns the fence point after that (``expected``
    when nothing was torn, or there is no file); `SessionTakeoverError` if the session
    moved since ``expected``; says what it moved with a `FenceLockWarning`."""
    if expected is None:
        return None
    try:
        (fd, st), = map(_sidecar.open_regular, (session,), (os.O_RDWR | os.O_APPEND,))
    except UnsafePathError as e:
        raise _replaced(session, expected, e) from e
    except FileNotFoundError:
        raise SessionTakeoverError(session, expected, None) from None
    except OSError as e:
        # Not this user's to write (nor, then, the command's): only a torn line, known
        # to be there, is worth saying. (Any other failure, out of descriptors say, is;
        # so is a file this user may write but not read, whose tail cannot be checked.)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not ends_torn(session) \
                and not os.access(session, os.W_OK):
            return expected
        raise SessionWriteError(session, e, "open") from None
    try:
        _check_opened(fd, st, session, expected, mode, token)
        end = _cut_torn_tail(fd, session, st, expected, mode, [], file_mode)
        if end == st.st_size:
            return expected
        try:
            _fsync(fd)
        except OSError as e:
            raise SessionWriteError(session, e, "fsync of the cut") from None
        fp = _fingerprint_fd(fd, mode, session)
    finally:
        os.close(fd)
    _torn_warning(session, st.st_size - end, stacklevel=3)
    return fp


def ends_torn(session: str) -> bool:
    """Whether the session, opened to read only, is known to end in a torn line: not
    empty, and not ending in a newline (False where it cannot be read either)."""
    try:
        fd, st = _sidecar.open_regular(session, os.O_RDONLY)
    except (OSError, FenceLockError):
        return False
    try:
        return st.st_size > 0 and _platform.pread(fd, 1, st.st_size - 1) != b"\n"
    except OSError:
        return False
    finally:
        os.close(fd)


def _copy_sparsely(
    fd: int, start: int, stop: int, aside: int, session: str, torn: str, what: str
) -> None:
    """Append bytes ``start``..``stop`` of the session (``fd``) to S.torn (``aside``) a
    chunk at a time: a fragment may be larger than memory. A hole, or a chunk of
    nothing but NULs (what a crash, or a file extended past its end, leaves), is not
    written where S.torn can be extended over it instead (not an append-only file),
    which reads back the same NULs and takes no space; a hole is not even read. A
    session that ended early ends the copy there (the size check before the cut
    reports it)."""
    at = start
    while at < stop:
        try:
            data = _next_data(fd, at, stop)
            if data > at:  # a hole: no further than the file now goes
                data = min(data, os.fstat(fd).st_size)
                if data <= at:
                    return
            part = b"" if data > at else _platform.pread(fd, min(_CHUNK, stop - at), at)
        except OSError as e:
            raise SessionWriteError(session, e, "reading its last line") from None
        if data == at and not part:
            return
        if part and part.count(0) < len(part):
            _write_all(aside, part, torn, what)
            at += len(part)
            continue
        grown = len(part) or data - at
        try:
            os.ftruncate(aside, os.fstat(aside).st_size + grown)
        except OSError:  # written out instead, a chunk at a time
            for done in range(0, grown, _CHUNK):
                _write_all(aside, bytes(min(_CHUNK, grown - done)), torn, what)
        at += grown


_SEEK_DATA = getattr(os, "SEEK_DATA", None)


def _next_data(fd: int, at: int, stop: int) -> int:
    """Where the file's next data at or after ``at`` begins (at most ``stop``): past a
    hole, where the system says where holes are; ``at`` otherwise."""
    if _SEEK_DATA is None:
        return at
    try:
        return min(os.lseek(fd, at, _SEEK_DATA), stop)
    except OSError as e:
        if e.errno == errno.ENXIO:  # nothing but a hole from here to the end
            return stop
        return at  # not known on this filesystem


def _torn_warning(session: str, cut: int, stacklevel: int = 6) -> None:
    """Tell the caller of `SessionLock.append` that its append moved ``cut`` bytes of a
    torn last line to the session's `TORN_SUFFIX` file (said once the line is in: where
    warnings are errors, the append has still happened, its fence point kept)."""
    warn_each_time(
        f"{session}: its last line was torn ({cut} bytes without a line break: a "
        f"writer that died mid-append, or the file cut mid-line); moved it to "
        f"{session + TORN_SUFFIX}",
        stacklevel=stacklevel,  # the caller of SessionLock.append, by default
    )


_CHUNK = 1 << 20
"""How much of a session file a search for its last line break reads at a time."""


def _ends_a_line(aside: int, size: int) -> bool:
    """Whether the torn file (``size`` bytes) ends in a newline; False where it cannot
    be read (opened write-only): a newline too many only makes an empty line there."""
    try:
        return _platform.pread(aside, 1, size - 1) == b"\n"
    except OSError:
        return False


def _kept_last(aside: int, aside_size: int, fd: int, keep: int, size: int) -> bool:
    """Whether the torn file's last line is already the fragment ``fd[keep:size]``: an
    earlier append kept it aside but could not cut it from the session (an append-only
    file, say), and the session was not written since (the caller compares times), so
    it is not kept a second time (however large: compared a chunk at a time). The torn
    file ends in a newline (the caller has seen to it)."""
    at = aside_size - (size - keep) - 1  # where the fragment's copy would start
    if at < 0:
        return False
    try:
        if at and _platform.pread(aside, 1, at - 1) != b"\n":
            return False  # the end of a longer line
        for done in range(0, size - keep, _CHUNK):
            n = min(_CHUNK, size - keep - done)
            if _platform.pread(aside, n, at + done) != _platform.pread(fd, n, keep + done):
                return False
        return True
    except OSError:
        return False


def last_line_start(
    fd: int, size: int, read: Callable[[int, int, int], bytes] | None = None
) -> int:
    """Where the file's last line starts: after its last ``\\n`` before ``size`` (0 when
    there is none), however far back that is; ``read`` is a wrapper of `_platform.pread`."""
    read = read or _platform.pread
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        if _next_data(fd, start, end) == end:
            end = start  # a hole (a file extended past its end): no line break to read
            continue
        cut = read(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _write_all(fd: int, data: bytes, path: str, what: str = "write") -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            n = _write(fd, view[done:])
        except OSError as e:
            raise SessionWriteError(path, e, what) from None
        if n <= 0:
            raise SessionWriteError(path, OSError(errno.EIO, "write returned 0"), what)
        done += n


def _holds(fd: int, data: bytes, at: int, length: int | None = None) -> bool:
    """Whether the file holds ``data`` (its first ``length`` bytes: all by default) from
    offset ``at`` (raises OSError). Read back a chunk at a time, as long as reads return
    part of what was asked: one returns at most 2 GiB on Linux, and a line may be large
    enough that a second copy of it in memory matters. (``startswith`` at an offset
    compares bytes as memory, with no copy of ``data``.)"""
    length = len(data) if length is None else length
    done = 0
    while done < length:
        part = _platform.pread(fd, min(_CHUNK, length - done), at + done)
        if not part or not data.startswith(part, done):
            return False
        done += len(part)
    return True


def _landed(fd: int, line: bytes) -> bool:
    """Whether ``line`` is whole in the file where this descriptor's last write put it:
    an ``O_APPEND`` write leaves the descriptor's offset at the end of what it wrote,
    whatever other writers appended before or after. Whole: a line of its own too, not
    the end of another writer's unfinished one (no line break before it)."""
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR) - len(line)
        return start >= 0 and _holds(fd, line, start) and (
            start == 0 or _platform.pread(fd, 1, start - 1) == b"\n")
    except OSError:
        return False


SESSION_LOCK_WAIT = 10.0
"""Seconds an append waits for the session file's own lock (`append`): a recover
holds it exclusively for as long as it takes to set its mark and read the session's
end."""


def append(
    session: str,
    line: bytes,
    expected: Fingerprint | None,
    mode: FenceMode,
    *,
    check_tail: bool,
    file_mode: int = 0o600,
    token: int = 0,
    moved: list[Fingerprint | None] | None = None,
) -> Fingerprint:
    """Append ``line`` if the fence holds; returns the new fence point. A session file
    this creates gets the token mark for ``token`` (see `_tokens.reserve`). One that
    exists is locked shared (the session file's own flock, `SESSION_LOCK_WAIT`) from
    before the look at a recover's moved mark (`SessionMovedError`, nothing written)
    until the line is in and checked (and the mark looked for again): a recover sets
    the mark holding that lock exclusively (`_recovery._hold_to_mark`), so a line
    either went in before the mark, and the recover carries it, or is never written.

    Any other exception than fencelock's own (an interrupt: KeyboardInterrupt, a signal
    handler's exception) while the line is written, fsynced or named tells the caller
    that nothing was appended, so nothing is:
    what reached the file is taken back (a file this created is removed) and the fence
    point that leaves is put in ``moved``. Call it holding the session: a signal
    handler's release must wait for the append (`SessionLock` defers it)."""
    flags = os.O_RDWR | os.O_APPEND
    created = expected is None
    made = created  # the file is this append's own creation (not an empty one found)
    try:
        try:  # through `map`: stored as the call returns, with no point for an
            # interrupt between (see `_sidecar.open_regular`), as the `try` below begins
            (fd, st), = map(_sidecar.open_regular, (session,),
                            (flags | (os.O_CREAT | os.O_EXCL if created else 0),), (file_mode,))
        except FileExistsError:
            made = False
            (fd, st), = map(_open_empty, (session,), (flags,))
    except UnsafePathError as e:
        raise _replaced(session, expected, e) from e
    except FileNotFoundError:
        if created:
            raise SessionWriteError(
                session, FileNotFoundError(errno.ENOENT, "directory missing"), "create"
            ) from None
        raise SessionTakeoverError(session, expected, None) from None
    except OSError as e:
        raise SessionWriteError(session, e, "create" if made else "open") from None
    size = 0 if created else -1  # where the line goes, once the fence check has passed
    cutting: list[int] = []  # where a torn tail is cut off, once it is
    taking_back = False  # a failed write's line is being cut off (the stat moves)
    try:
        if made:
            # Before the fence point (it moves ctime); as root, its directory's owner's.
            set_mode(fd, file_mode, owner_for(session))
        if created and token:
            _tokens.reserve(fd, token)
        if made:
            # Locked shared and the mark looked at here too: a recover moving the run
            # meanwhile finds this file made (its own make is O_EXCL too) and opens it
            # to mark it (`_recovery._make_to_mark`). Marked first, nothing is written;
            # else it waits for this line, then carries it to the fresh session.
            _platform.lock_session(fd, True, SESSION_LOCK_WAIT)
            fresh = _moved.target(session)
            if fresh is not None:
                raise SessionMovedError(session, fresh, expected,
                                        _fingerprint_fd(fd, mode, session, st))
        else:
            locked = _platform.lock_session(fd, True, SESSION_LOCK_WAIT)
            if locked == _platform.TAKEN_AFTER_A_WAIT:  # its holder may have written
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise SessionWriteError(session, e, "reading it for the fence") from None
            fresh = _moved.target(session)
            if fresh is not None:  # a recover moved the conversation: nothing goes in
                raise SessionMovedError(session, fresh, expected,
                                        _fingerprint_fd(fd, mode, session, st))
            if not locked:
                raise SessionWriteError(session, OSError(errno.EAGAIN, (
                    f"the session file itself has been held locked (flock) for over "
                    f"{SESSION_LOCK_WAIT:g} s through another of its descriptors (another "
                    f"process's, a child's this one forked, or a recover's in this one; "
                    f"fencelock locks the sidecar, and takes a shared lock on the session "
                    f"for each write); lslocks names the process")), "lock")
        if not created:
            _check_opened(fd, st, session, expected, mode, token)
            size = _cut_torn_tail(fd, session, st, expected, mode, cutting, file_mode) \
                if check_tail else st.st_size
        try:
            _write_all(fd, line, session)
            try:
                _fsync(fd)
            except OSError as e:
                raise SessionWriteError(session, e, "fsync") from None
        except SessionWriteError as e:
            # Take back whatever part of the line reached the file, so the session
            # stays valid JSONL and the run keeps its fence point; but only when
            # nothing past the fence point is anyone else's.
            try:
                end = os.fstat(fd).st_size
                ours = end >= size and end - size <= len(line) and _holds(
                    fd, line, size, end - size)
            except OSError:
                raise e from None
            if not ours:
                now = _fingerprint_fd(fd, mode, session)
                raise SessionTakeoverError(session, expected, now) from e
            taking_back = True
            try:
                os.ftruncate(fd, size)
            except OSError as cut:
                # The line may be in the file now (a filesystem that has turned
                # read-only after the failed fsync): say so, and keep the fence point
                # on the file as it is, so the run's next append is not a takeover.
                e = SessionWriteError(session, e.cause, e.what, stored=None, kept=cut)
            else:
                # A file this append made, empty again: removed, as an interrupt's is;
                # the run's fence point stays "no file".
                if made and _sidecar.unlink_if_still(session, st, fd):
                    raise e from None
            with contextlib.suppress(OSError, SessionWriteError):
                e.fingerprint = _fingerprint_fd(fd, mode, session)
            if moved is not None and e.fingerprint is not None:
                moved.append(e.fingerprint)  # the fence point follows the file
            raise e from None
        try:
            written = os.fstat(fd)
        except OSError as e:
            raise SessionWriteError(session, e, "reading it for the fence") from None
        after = _fingerprint_fd(fd, mode, session, written, _witness(line, size, written))
        if after.size != size + len(line) or not _holds(fd, line, size):
            # Someone wrote between the fence check and the fsync: the session is no
            # longer only this run's. Our line is in it, unless that writer cut it.
            raise SessionTakeoverError(session, expected, after, stored=_landed(fd, line))
        named = _named_now(session, after, mode, line, size)
        if named is not after:
            # Renamed over or removed since the open: the line went into a file that is
            # no longer the session, unless the file put in its place is a copy of it
            # made after the write (a `sed -i` running then).
            raise SessionTakeoverError(session, expected, named,
                                       stored=_in_file_at(session, line, size))
        if created:
            try:
                _fsync_dir(os.path.dirname(session))
            except SessionWriteError as e:
                e.fingerprint = after  # the line is in the file; only its name may not be
                if moved is not None:
                    moved.append(after)
                raise
        if moved is not None:
            moved.append(after)  # appended: an interrupt from here on keeps the line
        # Still holding the lock: a mark a recover that could not have it (this append
        # held it past its `MARK_WAIT`) set meanwhile, without it. The line is in the
        # old session, and may be in the fresh one.
        fresh = _moved.target(session)
        if fresh is not None:
            raise SessionMovedError(session, fresh, expected, after, True)
        if cutting:
            _torn_warning(session, st.st_size - cutting[0])
        return after
    except FenceLockError:
        if cutting:  # the cut stands though the entry failed: still said, never instead
            with contextlib.suppress(Warning):
                _torn_warning(session, st.st_size - cutting[0])
        raise  # what this function decided, the line's fate said (`stored`, `fingerprint`)
    except BaseException:  # an interrupt, or an error of the system after the write
        if moved is not None:
            _take_back(fd, st, session, size, line, made, mode, moved,
                       cutting[0] if cutting else None, taking_back)
        raise
    finally:
        os.close(fd)


def _named_now(
    session: str, written: Fingerprint, mode: FenceMode, line: bytes, at: int
) -> Fingerprint | None:
    """``written`` (the file an append just wrote, ``line`` at offset ``at``) if
    ``session`` still names it; else what the path holds now (None: nothing). One
    ``lstat``. The content fence, for file systems whose inode numbers flap, asks that
    the file at the path be no shorter and hold the line's end where it was written: a
    copy taken after the write, renamed over it, does (a longer file made from the
    session as it was before the write does not). (A foreign append after the write
    is no replacement: the next fence check reports it.)"""
    try:
        st = os.lstat(session)
    except FileNotFoundError:
        return None
    except OSError:
        return written  # not known to be replaced: the next fence check looks again
    if mode is CONTENT:
        end = line[-_WITNESS_BYTES:]
        if st.st_size >= written.size and _in_file_at(session, end, at + len(line) - len(end)):
            return written
    elif st.st_ino == written.ino and st.st_dev == written.dev:
        return written
    return _fingerprint.from_stat(st)


def _in_file_at(path: str, line: bytes, at: int) -> bool:
    """Whether the regular file at ``path`` holds ``line`` from offset ``at``."""
    try:
        fd, _ = _sidecar.open_regular(path, os.O_RDONLY)
    except (OSError, FenceLockError):
        return False
    try:
        return _holds(fd, line, at)
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_empty(session: str, flags: int) -> tuple[int, os.stat_result]:
    """A session file that appeared where the run's fence point says there is none: an
    empty regular file of this user's is taken as if the append had created it (it
    holds nothing to take over: an interrupt right as this run's own create returned
    left it, or a program made the file without writing); anything else is a takeover.
    A write by another after this look is caught as after any fence check."""
    try:
        (fd, st), = map(_sidecar.open_regular, (session,), (flags,))
    except OSError:
        raise _replaced(session, None) from None
    try:
        mine = _empty_of_mine(st)
    except BaseException:
        os.close(fd)
        raise
    if mine:
        return fd, st
    os.close(fd)
    raise _replaced(session, None)


def _take_back(fd: int, st: os.stat_result, session: str, size: int, line: bytes,
               made: bool, mode: FenceMode, moved: list[Fingerprint | None],
               cut_to: int | None = None, taken_back: bool = False) -> None:
    """After an interrupt in `append`: remove the file it made (empty it where an open
    file cannot be removed: Windows; the next append takes it for none), or cut what reached the
    file of ``line`` (written from ``size``), and put the fence point that leaves in
    ``moved``. Nothing when none of it reached the file (the fence point stands, unless
    the append cut a torn tail off at ``cut_to``, or ``taken_back``: a failed write's
    line was being cut off; then the file so cut is the fence point), or when what
    follows ``size`` is not only ours (the next fence check reports it). An empty file
    that was found, not made, is cut back to empty, never removed: whoever made it may
    still have it open."""
    try:
        if moved:
            return  # the append was complete: its line stays, the fence point with it
        if made:
            # Only a file that holds nothing but (part of) this line: a writer outside
            # the protocol may have appended to it meanwhile.
            now = os.lstat(session)
            end = os.fstat(fd).st_size
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and end <= len(line) \
                    and _holds(fd, line, 0, end):
                if _platform.WINDOWS:
                    # An open file cannot be removed there: emptied, which the next
                    # append takes for no file (an empty file of this user's own).
                    os.ftruncate(fd, 0)
                else:
                    os.unlink(session)
                moved.append(None)
            return
        if cut_to is not None:
            size = cut_to  # the interrupt came during the cut of a torn tail, or after it
        if size < 0:
            return  # before the fence check: nothing of this append is in the file
        end = os.fstat(fd).st_size
        if end == size:
            if cut_to is not None or taken_back:
                moved.append(_fingerprint_fd(fd, mode, session))  # the cut is the run's
            return  # nothing written: no truncate, which would move the stat all the same
        if end > size and end - size <= len(line) and _holds(fd, line, size, end - size):
            os.ftruncate(fd, size)
            moved.append(_fingerprint_fd(fd, mode, session))
    except (OSError, FenceLockError):
        pass  # left as it is: the next append's fence check says what it finds


PART = ".part"
"""`publish` writes a session under its name plus this first."""
_NO_HARD_LINKS = {errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


def publish(session: str, chunks: Iterable[bytes], *, token: int, file_mode: int = 0o600,
            check: Callable[[], None] = lambda: None,
            owner: tuple[int, int] | None = None,
            before_name: Callable[[], None] = lambda: None) -> None:
    """Create ``session`` holding ``chunks``, whole or not at all: written, with the token
    mark for ``token``, and fsynced under ``session`` + `PART` (which only the session's
    holder writes: call it holding the session), then given its name, which no one sees
    before it is complete. ``check`` raises when the caller may no longer hold the
    session (an etcd lease that may have expired): it runs before each chunk and just
    before the name is given. `SessionTakeoverError` when a file appeared at
    ``session``, or another holder replaced the part; `SessionWriteError` naming the
    file that could not be written. On any failure nothing of this call's is left at
    either name (and nothing of anyone else's is removed). ``before_name`` runs once the
    part is whole, just before it is named."""
    part = session + PART
    # Another user's, in a directory anyone may write to: refused, also as root, which
    # the directory would let remove it.
    _sidecar.refuse_planted_at(part)
    try:
        os.unlink(part)  # what a holder that failed or died before its name left behind
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SessionWriteError(part, e, "remove") from None
    try:
        fd, st = _sidecar.open_regular(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
    except OSError as e:
        raise SessionWriteError(part, e, "create") from None
    # Open until the end: while it is, no other file can get its inode number, so its
    # stat (device and inode, `_sidecar.still_at_path`) tells the part this call wrote
    # from anyone else's.
    try:
        set_mode(fd, file_mode, owner)
        if token:
            _tokens.reserve(fd, token)
        for chunk in chunks:
            check()
            _write_all(fd, chunk, part)
        try:
            _fsync(fd)
        except OSError as e:
            raise SessionWriteError(part, e, "fsync") from None
        check()  # still the holder: nobody else can have made or be making it
        before_name()
        _name(part, session, st)
    finally:
        _unlink_if(part, st)
        os.close(fd)
    _fsync_dir(os.path.dirname(session))


def forget_part(session: str) -> None:
    """Remove ``session`` + `PART` when it is only a second name of the published
    ``session`` (left by a holder that died between naming it and removing the part)."""
    try:
        st = os.lstat(session)
    except OSError:
        return
    _unlink_if(session + PART, st)


def drop_part(session: str) -> str | None:
    """Remove ``session`` + `PART` left by a holder that died writing it before the
    session had its name (a recover killed mid-copy); its path if one was removed. Call
    holding the session: nobody else writes its part then. Left alone: anything but a
    regular file, another user's in a directory anyone may write to (planted: the next
    `publish` refuses it, saying so), and a part beside a session that exists (unless
    only a second name of it, `forget_part`'s case)."""
    part = session + PART
    try:
        st = os.lstat(part)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or os.path.lexists(session):
        forget_part(session)
        return None
    try:
        _sidecar.refuse_planted(part, st)
    except PlantedFileError:
        return None
    _unlink_if(part, st)
    return None if os.path.lexists(part) else part


def _unlink_if(path: str, st: os.stat_result) -> None:
    """Remove ``path`` if it is still the file ``st`` describes."""
    if _sidecar.still_at_path(path, st):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _name(part: str, session: str, st: os.stat_result) -> None:
    """Give the complete ``part`` (the file ``st`` describes) the name ``session``, which
    must not exist."""
    if not _sidecar.still_at_path(part, st):  # another holder's now: this one lost it
        raise SessionTakeoverError(session, None, None)
    try:
        os.link(part, session)
    except FileExistsError:
        raise SessionTakeoverError(
            session, None, _fingerprint.take(session, FenceMode.STAT)) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise SessionWriteError(session, e, "link") from None
        # A filesystem without hard links: rename, after making sure nothing is there
        # (the session's lock keeps every fencelock run away meanwhile).
        if os.path.lexists(session):
            raise SessionTakeoverError(
                session, None, _fingerprint.take(session, FenceMode.STAT)) from None
        try:
            os.rename(part, session)
        except OSError as e:
            raise SessionWriteError(session, e, "rename") from None
    if not _sidecar.still_at_path(session, st):  # the part was replaced just before
        with contextlib.suppress(OSError):
            os.unlink(session)  # the name this call gave another's file
        raise SessionTakeoverError(session, None, None)


def _fsync_dir(directory: str) -> None:
    try:
        dfd, = map(os.open, (directory or ".",), (os.O_RDONLY | O_CLOEXEC,))  # `open_regular`
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # a limit: said
            raise SessionWriteError(
                directory, e, "opening the directory for its fsync", stored=True
            ) from None
        return  # Windows and some filesystems cannot open a directory
    try:
        _fsync(dfd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise SessionWriteError(
                directory, e, "fsync of the directory", stored=True
            ) from None
    finally:
        os.close(dfd)
