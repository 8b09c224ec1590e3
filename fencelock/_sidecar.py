"""Opening, checking, reading and writing a sidecar file safely.

A sidecar is opened without following symlinks and without blocking (a planted FIFO
cannot hang a reader), then refused unless it is a regular file. Reads are bounded to
`MAX_RECORD`. Records are rewritten in place with one ``pwrite`` and padded with
spaces rather than truncated, so a reader never sees an empty file mid-update.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import time
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from fencelock import _forkguard, _platform
from fencelock._constants import NO_WORKING_DIRECTORY, SIDECAR_SUFFIX
from fencelock._errors import (
    LIMIT_FIXES,
    NO_SESSION_NAME,
    SIDECAR_OF_A_SIDECAR,
    WRITE_FIXES,
    CorruptRecordError,
    FenceLockError,
    FenceLockWarning,
    ForeignSymlinkError,
    HeldByOwnRunError,
    PlantedFileError,
    SidecarAccessError,
    UnsafePathError,
    UnsafeSidecarError,
    attribute_fix,
    own_file_fix,
    own_record_too_long,
    shell_word,
)
from fencelock._record import HELD, MAX_RECORD, HolderInfo, decode

_T = TypeVar("_T")

SUFFIX = SIDECAR_SUFFIX
_READ_RETRIES = 5
_PAD_LIMIT = 4096


AnyPath: TypeAlias = "str | bytes | os.PathLike[str] | os.PathLike[bytes]"
"""A path in any form ``os`` takes; bytes are decoded as ``os.fsdecode`` does."""


_SEPARATORS_TUPLE = tuple(os.sep + (os.altsep or ""))


def paths(path: AnyPath) -> tuple[str, str]:
    """(session, sidecar) as absolute paths, for a session file or a sidecar path.
    `UnsafePathError` for a path that ends in a separator: it names a directory."""
    if type(path) is str and path[:1] == "/" and "/.." not in path:
        return _paths_of_absolute(path)  # does not depend on the working directory
    text = _canonical(path)
    _refuse_directory_path(text)
    return _checked_paths(absolute(text))


def _canonical(path: AnyPath) -> str:
    """``path`` as text in the one spelling this system gives its bytes: a name that
    is not UTF-8 can also be written with its UTF-8 bytes escaped (``"caf\\udcc3\\udca9"``
    is ``"café"``), which would give one file two registry keys and two etcd claims."""
    return os.fsdecode(os.fsencode(path))


def directory_id(directory: str) -> tuple[int, int] | None:
    """The (device, inode) ``directory`` leads to now (symlinks followed); None where it
    cannot be looked at. What a kept answer about a path is checked against."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def names_a_directory(path: str) -> bool:
    """Whether ``path`` ends in a separator: it names a directory, never a file beside it
    (as ``os.path.abspath``, which drops the separator, would make it)."""
    return path.endswith(_SEPARATORS_TUPLE)


def _refuse_directory_path(path: str) -> None:
    if "\0" in path:  # os would refuse it at the first call, naming nothing
        raise ValueError(f"{path!r}: a path cannot hold a NUL byte")
    if names_a_directory(path):
        if _platform.leads_in_a_loop(path):
            raise UnsafePathError(path, "a path through a symlink that leads in a loop")
        raise UnsafePathError(path, f"a directory's path (it ends in {path[-1]!r})")


def absolute(path: AnyPath) -> str:
    """``path`` made absolute (`normal`); `SidecarAccessError` naming it when it is
    relative and the working directory is gone. ValueError for an empty path, which
    names nothing (``os.path`` would take it for the working directory)."""
    if not os.fspath(path):
        raise ValueError("an empty path names nothing (is a variable unset?)")
    try:
        return normal(os.fsdecode(path))  # bytes too, as os takes them
    except FileNotFoundError as e:
        raise SidecarAccessError(os.fsdecode(path), e, NO_WORKING_DIRECTORY) from None


def normal(path: str) -> str:
    """``path`` made absolute against the working directory, naming the file the system
    opens for it: ``.`` and repeated separators collapsed, and a ``..`` taken as the
    system takes it, from the directory a symlink before it leads to (collapsed as text,
    as ``os.path.abspath`` does, ``link/../s.jsonl`` named another file than the one a
    program opening that path writes). The part up to the last ``..`` is resolved as
    `real_directory` resolves it (refusing another user's symlink on the way); the rest
    is kept as given. A path with a ``..`` after what is not a directory (a missing
    one, a file) is left as it is, so that opening it fails as the system's open does."""
    if os.name == "nt":  # (Windows resolves ``..`` in the text of the path)
        return os.path.abspath(path)
    if not path.startswith(os.sep):
        path = os.path.join(os.getcwd(), path)
    parts = path.split(os.sep)
    if os.pardir not in parts:
        return os.path.normpath(path)
    for at, part in enumerate(parts):
        # A `..` after what is not a directory (missing, a file): the system's open
        # fails there (ENOENT, ENOTDIR), and so will this path's.
        if part == os.pardir and not os.path.isdir(os.sep.join(parts[:at]) or os.sep):
            return path
    last = len(parts) - parts[::-1].index(os.pardir)
    head = real_directory(os.sep.join(parts[:last]))
    if os.pardir in head.split(os.sep):  # the walk stopped short of it
        return os.path.join(head, *parts[last:])
    return os.path.normpath(os.path.join(head, *parts[last:]))


def _paths(p: str) -> tuple[str, str]:
    if p.endswith(SUFFIX):
        return p[: -len(SUFFIX)], p
    return p, p + SUFFIX


def _checked_paths(p: str) -> tuple[str, str]:
    """`_paths`, refusing ``DIR/.holder``, the sidecar of no session, and
    ``S.holder.holder``: ``S.holder`` is a sidecar (its record at its start), which no
    run may hold or append to as a session."""
    session, sidecar = _paths(p)
    if names_a_directory(session):
        raise UnsafeSidecarError(sidecar, NO_SESSION_NAME)
    if session.endswith(SUFFIX):
        raise UnsafeSidecarError(sidecar, SIDECAR_OF_A_SIDECAR)
    return session, sidecar


@functools.lru_cache(maxsize=4096)
def _paths_of_absolute(path: str) -> tuple[str, str]:
    path = _canonical(path)
    _refuse_directory_path(path)
    return _checked_paths(normal(path))


def found_at(path: str) -> str | None:
    """What is at ``path`` when it is not a regular file (a symlink, FIFO, ...)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _platform.describe_mode(mode, path)


def access_error(path: str, e: OSError, writing: bool) -> FenceLockError:
    if e.errno == errno.ELOOP and not _loop_on_the_way(path, e):  # the sidecar itself
        return UnsafeSidecarError(path, "a symlink")
    if e.errno == errno.EISDIR:
        return UnsafeSidecarError(path, "a directory")
    if e.errno in (errno.ENXIO, errno.EACCES, errno.EPERM):
        # A planted symlink in a sticky directory, or a FIFO or socket, can fail this way.
        found = found_at(path)
        if found is not None:
            return UnsafeSidecarError(path, found)
    if e.errno == errno.ENXIO:
        return UnsafeSidecarError(path, "a socket or device")
    return SidecarAccessError(path, e, path_fix(path, e, writing=writing, sidecar=True)
                              or "check the path and try again")


def unlink_error(path: str, e: OSError, done: str = "") -> Exception:
    """Removing ``path`` failed: a refused removal is its directory's doing (or an
    attribute of either), not a matter of writing the file. ``done``: what was done to
    it first (a stale record cleared), said before why it stays."""
    directory = os.path.dirname(path)
    first = f"{done}, but the sidecar stays: " if done else ""
    if e.errno == errno.EACCES and os.access(directory, os.X_OK):
        return SidecarAccessError(path, e, (
            f"{first}this user cannot remove entries from {directory} (removing a file "
            f"takes write permission on its directory); fix the directory's permissions "
            f"or run as its owner"))
    if e.errno == errno.EPERM:
        return SidecarAccessError(path, e, (
            f"{first}{directory} or the sidecar may be immutable or append-only (lsattr -d "
            f"{shell_word(directory)}; lsattr {shell_word(path)}), or {directory} is sticky "
            f"and the sidecar is another user's: run as the sidecar's owner"))
    error = access_error(path, e, True)
    return SidecarAccessError(path, e, f"{first}{error}") if first else error


def unreadable_session(session: str, e: OSError, why: str) -> SidecarAccessError:
    """A session file that cannot be read: what to do about ``e``, else ``why``."""
    return SidecarAccessError(session, e, path_fix(session, e, writing=False, sidecar=False)
                              or why)


def path_fix(path: str, e: OSError, *, writing: bool, sidecar: bool) -> str | None:
    """What to do about ``e`` on ``path`` (a sidecar, or else a session file), for the
    errors a user can act on; None for others."""
    directory = os.path.dirname(path)
    if e.errno == errno.ENOENT:
        if os.path.isdir(directory):
            return ("no sidecar there; nothing holds this session" if sidecar
                    else "no such file; check the path")
        missing = f"the directory {directory} does not exist"
        return missing + ("; create it first" if writing else "; check the path")
    if e.errno in (errno.EACCES, errno.EPERM):
        if not os.access(directory, os.X_OK):
            return (f"this user cannot enter {directory} (no search permission); fix its "
                    f"permissions or run as its owner")
        if writing and not os.path.lexists(path):
            if e.errno == errno.EPERM:  # an attribute, binding even root
                return (f"{directory} may be immutable (lsattr -d {shell_word(directory)}), "
                        f"which chattr -i clears, or this user cannot create files in it")
            return f"this user cannot create files in {directory}; fix its permissions"
        how = "write" if writing else "read"
        if e.errno == errno.EPERM and writing:
            return attribute_fix(path, how)
        return own_file_fix(path, writing) or \
            f"this user cannot {how} it; run as its owner or fix the permissions"
    if e.errno == errno.EROFS:
        return WRITE_FIXES[e.errno]
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return WRITE_FIXES[e.errno] + ", then try again"
    if e.errno == errno.ENAMETOOLONG:
        return _too_long(path, sidecar)
    if e.errno in LIMIT_FIXES:
        return LIMIT_FIXES[e.errno]
    if e.errno == errno.ENOTDIR:
        return f"a part of {directory} is not a directory; check the path"
    if e.errno == errno.ELOOP:
        return (f"{directory} cannot be reached: a symlink on the way leads in a loop; fix "
                f"the path or the symlinks in it")
    return None


def directory_error(session: str, writing: bool) -> SidecarAccessError | None:
    """The `SidecarAccessError` a sidecar's open raises where the session's directory is
    missing or not a directory, naming the session itself: for a holder store (etcd),
    which opens no sidecar, so that both stores refuse such a path alike. None where the
    directory is there, or cannot be looked at (the run's own opens then say why)."""
    try:
        if stat.S_ISDIR(os.stat(os.path.dirname(session)).st_mode):
            return None
        e: OSError = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except (FileNotFoundError, NotADirectoryError) as missing:
        e = missing
    except OSError:
        return None
    return no_directory(session, e, writing)


def no_directory(session: str, e: OSError, writing: bool) -> SidecarAccessError:
    """`directory_error` for ``e``, why the session's directory cannot be used."""
    return SidecarAccessError(session, e, path_fix(session, e, writing=writing, sidecar=False)
                              or "check the path")


def listing_fix(directory: str, e: OSError) -> str:
    """What to do about ``e``, raised listing ``directory`` for a scan."""
    if e.errno == errno.ENAMETOOLONG:
        return _too_long(directory, sidecar=False)
    if e.errno in LIMIT_FIXES:
        return LIMIT_FIXES[e.errno]
    if e.errno == errno.ELOOP:
        return "a symlink on its path leads in a loop; fix the path or the symlinks in it"
    return "scan needs a directory this user can list"


def _loop_on_the_way(path: str, e: OSError) -> bool:
    """Whether ``e`` (an open refusing ``path``) is a symlink loop in its directories
    rather than the symlink at ``path`` itself that the open refused to follow."""
    return e.errno == errno.ELOOP and found_at(path) is None


def name_max(directory: str) -> int:
    """The longest file name, in bytes, that ``directory``'s filesystem allows."""
    try:
        return os.pathconf(directory or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _too_long(path: str, sidecar: bool = True) -> str:
    """Which limit a path that is too long passes: its last name's, or the whole path's."""
    size = len(os.fsencode(os.path.basename(path)))
    limit = name_max(os.path.dirname(path))
    if size > limit:
        if not sidecar:
            return (f"its name is {size} bytes, more than the {limit} this filesystem "
                    f"allows; use a shorter name")
        return (f"its name is {size} bytes, more than the {limit} this filesystem allows; "
                f"a sidecar's name is the session's plus {len(SUFFIX)} bytes, so keep "
                f"session names within {limit - len(SUFFIX)} bytes")
    return (f"the path is {len(os.fsencode(path))} bytes, longer than this system allows; "
            f"keep sessions in a directory with a shorter path")


def open_regular(path: str, flags: int, mode: int = 0o600) -> tuple[int, os.stat_result]:
    """Open ``path`` without following a symlink or blocking on a FIFO; regular files only.

    Raises `UnsafePathError` for anything else, and lets other OSErrors through.
    """
    try:
        # Not ``fd = os.open(...)``: CPython runs a signal handler right after a call
        # returns, before its result is stored, and the handler's exception (Ctrl-C's
        # KeyboardInterrupt) would leave the descriptor open for good; a signal that comes
        # during the open's system call is handled just there. Unpacking a `map` stores
        # the result with no such point between. (The same wherever fencelock opens.)
        fd, = map(os.open, (path,), (flags | _platform.OPEN_FLAGS,), (mode,))
    except OSError as e:
        what = None if _loop_on_the_way(path, e) else _UNSAFE_ERRNO.get(e.errno or 0)
        if e.errno in (errno.ENXIO, errno.EACCES, errno.EPERM, errno.ELOOP):
            what = found_at(path) or what
        if what is None:
            raise
        raise UnsafePathError(path, what) from None
    try:  # closed on any exception, an interrupt's (a signal handler's) included
        st = os.fstat(fd)
        if _platform.FOLLOWS_SYMLINKS and os.path.islink(path):
            raise UnsafePathError(path, "a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(path, _platform.describe_mode(st.st_mode, path))
    except BaseException:
        try:
            if flags & os.O_CREAT and flags & os.O_EXCL:
                _unmake(path, fd)
        finally:
            os.close(fd)
        raise
    return fd, st


def _unmake(path: str, fd: int) -> None:
    """Remove the file this process has just created at ``path`` (``fd``, opened with
    O_EXCL) and has not written, as an interrupt ends its open: the caller never had
    it. Left as it is if the path now names another file, or the file is not empty."""
    try:
        st, now = os.fstat(fd), os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and st.st_size == 0:
            os.unlink(path)
    except OSError:
        pass  # left: the next look at it says what it finds


geteuid_now = getattr(os, "geteuid", lambda: 0)
"""The effective user now (0 where there are no POSIX users: Windows)."""

OWN_UID = geteuid_now()
"""This process's user when fencelock was loaded: its files are this user's, whatever
the effective user is now (`refuse_planted` also takes the current one's)."""


def refuse_planted(path: str, st: os.stat_result) -> None:
    """Raise `PlantedFileError` for a file owned by neither this user nor root in a
    directory anyone can write to: another user could have created it in advance."""
    if st.st_uid in (0, OWN_UID):
        return  # root's, or this process's user's when fencelock was loaded
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None or st.st_uid == geteuid():
        return  # this process's user's now (asked only here: it is a system call)
    directory = os.path.dirname(path) or "."
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return
    if mode & stat.S_IWOTH:
        raise PlantedFileError(path, st.st_uid, directory, sticky=bool(mode & stat.S_ISVTX))


def refuse_planted_at(path: str) -> None:
    """`refuse_planted` for whatever is at ``path`` (nothing there: nothing to refuse)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    refuse_planted(path, st)


_MAX_LINKS = 40


def real_directory(directory: str) -> str:
    """The real path of an absolute ``directory``, resolved the way the kernel would.

    Raises `ForeignSymlinkError` when a symlink on the way belongs to neither this user
    nor root: opening files with ``O_NOFOLLOW`` guards only the last component, and a
    symlink another user planted higher up would lead runs into a directory of theirs.
    A component that cannot be looked at ends the walk (the open that follows says why).
    """
    return walk(directory)[0]


def walk(directory: str) -> tuple[str, bool]:
    """`real_directory`, and whether every component was looked at: not so where one is
    missing (or cannot be looked at), and the rest is left as given. Such a result must
    not be kept: another user may make the missing name later, as a symlink of theirs."""
    if _platform.WINDOWS:  # pragma: no cover - symlinks there need privileges to make
        return os.path.realpath(directory), True
    me = geteuid_now()
    todo = [p for p in directory.split(os.sep) if p][::-1]
    path = os.sep
    links = 0
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            path = os.path.dirname(path)
            continue
        candidate = os.path.join(path, name)
        try:
            st = os.lstat(candidate)
        except OSError:
            return os.path.join(candidate, *todo[::-1]), False
        if not stat.S_ISLNK(st.st_mode):
            path = candidate
            continue
        if st.st_uid not in (0, me):
            raise ForeignSymlinkError(candidate, st.st_uid, directory)
        links += 1
        try:
            target = os.readlink(candidate)
        except OSError:
            return os.path.join(candidate, *todo[::-1]), False
        if links > _MAX_LINKS:  # a loop: opening it will fail with ELOOP
            return os.path.realpath(directory), True
        if target.startswith(os.sep):
            path = os.sep
        todo.extend(p for p in target.split(os.sep)[::-1] if p)
    return path, True


_UNSAFE_ERRNO = {
    errno.ELOOP: "a symlink", errno.EISDIR: "a directory", errno.ENXIO: "a socket or FIFO",
}


class Opened:
    """The owner of a descriptor `open_checked` tracks (its ``into``; one of its own for
    a caller that names none): `close` closes it, and is safe to run again after an
    interrupt (KeyboardInterrupt, a signal handler's exception) cut it short, or landed
    as it began."""

    __slots__ = ("_fd", "_opened")

    def __init__(self) -> None:
        self._fd = -1
        self._opened: object = None

    @property
    def fd(self) -> int:
        """The descriptor (-1 once closed, or handed on)."""
        return self._fd

    def close(self) -> None:
        """Close the descriptor, unless it is closed already (or never opened)."""
        _forkguard.close_if_still(self._fd, self._opened)


def using(sidecar: str, use: Callable[[Opened, os.stat_result], _T]) -> _T:
    """``use(opened, st)`` on the sidecar (opened read-only with `open_checked`), then
    closed: also when an interrupt lands as its close begins (run once more), which
    would leave it open, with any lock ``use`` took on it. ``use`` may hand the
    descriptor on (to a wait's helper thread), taking it out of ``opened``."""
    opened = Opened()
    try:
        _, st = open_checked(sidecar, create=False, into=opened)
        result = use(opened, st)  # (in the ``try``, not returned from it: see `_cleanup`)
    finally:
        try:
            opened.close()
        except BaseException:  # one that landed as it began: once more
            opened.close()
            raise
    return result


def open_checked(
    sidecar: str, *, create: bool, write: bool = False, mode: int = 0o600, like: str = "",
    into: _forkguard.Owner | None = None,
) -> tuple[int, os.stat_result]:
    """Open a sidecar for locking; (fd, fstat). Raises for anything but a regular file.
    One it makes gets ``mode``, and run as root the owner of its session, or of ``like``
    (`_platform.owner_for`).

    Close the descriptor with `close`: it is tracked so that a forked child closes its copy.
    ``into`` gets it as it is tracked (`_forkguard.track`): an interrupt as this returns
    leaves it there, for its owner's cleanup to close.

    ``create`` opens it read-write, creating it if missing; ``write`` opens an existing
    one read-write; otherwise it is opened read-only (enough to probe the lock).
    """
    access = os.O_RDWR if create or write else os.O_RDONLY
    flags = _platform.OPEN_FLAGS | access
    owner = into if into is not None else Opened()
    try:  # the `with`'s end too: an interrupt as the guard is let go closes it
        with _forkguard.guard:  # a forked child must never get a copy it does not know of
            made = False
            fd = -1
            # The opens inside the ``try`` that closes: from 3.12 a ``break`` out of the
            # loop may compile to a backward jump, where a signal handler runs.
            try:  # closed on any exception once open, an interrupt's (a signal handler's) too
                try:
                    while True:
                        try:  # stored with no point for a signal handler between
                            fd, = map(os.open, (sidecar,), (flags,), (mode,))  # `open_regular`
                            break
                        except FileNotFoundError:
                            if not create:
                                raise
                        # Only when the sidecar is missing (a session's first run): nothing
                        # is created beside a session path that no run could use.
                        refuse_unusable_session(sidecar)
                        try:  # O_EXCL: only a file this open made gets ``mode`` set on it
                            fd, = map(os.open, (sidecar,), (flags | os.O_CREAT | os.O_EXCL,),
                                      (mode,))
                            made = True
                            break
                        except FileExistsError:
                            if _platform.FOLLOWS_SYMLINKS and os.path.islink(sidecar):
                                # a dangling one: the create found the link itself
                                raise UnsafeSidecarError(sidecar, "a symlink") from None
                            continue  # another process made it first: open theirs
                    st = os.fstat(fd)
                except OSError as e:
                    if e.errno == errno.EACCES and (create or write):
                        # Another user's, planted where anyone may create files: said as
                        # such, not "run as its owner" (the owner planted it).
                        refuse_planted_at(sidecar)
                    raise access_error(sidecar, e, create or write) from None
                if _platform.FOLLOWS_SYMLINKS and os.path.islink(sidecar):
                    raise UnsafeSidecarError(sidecar, "a symlink")
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeSidecarError(sidecar, _platform.describe_mode(st.st_mode, sidecar))
                if st.st_nlink > 1:
                    raise UnsafeSidecarError(
                        sidecar, f"a hard link to a file with {st.st_nlink} names")
                if (create or write) and st.st_uid and st.st_uid != geteuid_now():
                    refuse_planted(sidecar, st)
                if made:
                    _platform.set_mode(fd, mode, _platform.owner_for(
                        sidecar, like or sidecar[: -len(SUFFIX)]))
                _forkguard.track(fd, st, owner)
            except BaseException:
                if fd >= 0:
                    _forkguard.close(fd)  # untracked too, if the interrupt came after `track`
                raise
        if made and mode & 0o006:  # by the process that made it, once all else is done
            _warn_open_to_all(sidecar, mode)
    except BaseException:
        _forkguard.close_if_still(owner._fd, owner._opened)  # once tracked (else closed)
        raise
    return fd, st


def _warn_open_to_all(sidecar: str, mode: int) -> None:
    """A sidecar just made with ``mode`` that lets other users read or write it: any of
    them can open it, and so lock it (flock needs only an open descriptor)."""
    import warnings

    warnings.warn(FenceLockWarning(
        f"{sidecar}: made with mode {mode:#o}, which lets every user of this machine open "
        f"it, and so lock it and keep every run out of the session; give 0o600, or 0o660 "
        f"for a group that shares the sessions (chmod o-rw fixes this one)"), stacklevel=2)


def refuse_unusable_session(sidecar: str) -> None:
    """Raise `UnsafePathError` when the session path a sidecar belongs to is something
    no run can use (a directory, FIFO or symlink, dangling or not)."""
    if not sidecar.endswith(SUFFIX):
        return
    session = sidecar[: -len(SUFFIX)]
    try:
        mode = os.lstat(session).st_mode
    except OSError:
        return  # missing (a new session), or unreachable: the open says why
    if not stat.S_ISREG(mode):
        raise UnsafePathError(session, _platform.describe_mode(mode, session))


close = _forkguard.close
"""Close a descriptor `open_checked` returned."""


def refuse_own_run(sidecar: str, own: int, st: os.stat_result) -> None:
    """Raise `HeldByOwnRunError` when this process waits for a lock it holds itself:
    the descriptor `fencelock run` passed it (``FENCELOCK_FD``) is open here on this
    sidecar (``st`` its fstat), is not one fencelock opened (``own``, or another it
    tracks), and holds the lock (the system says so; where it does not, the record
    must name that run, ``FENCELOCK_RUN_ID``). Such a lock is never let go while the
    descriptor is open. (A number that was closed and reused, or a run that passed
    nothing on, proves nothing: the wait goes on as for any holder.)"""
    if _platform.WINDOWS:
        _refuse_own_run_by_id(sidecar, own)
        return
    raw = os.environ.get("FENCELOCK_FD", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) < 10):
        return
    fd = int(raw)
    if fd == own or _forkguard.tracked(fd):
        return
    try:
        theirs = os.fstat(fd)
        record = read(own, sidecar)
    except (OSError, FenceLockError):
        return
    if (theirs.st_dev, theirs.st_ino) != (st.st_dev, st.st_ino):
        return
    holds = _platform.holds_flock(fd)
    if holds is False or (holds is None and (
            record is None or record.run_id != os.environ.get("FENCELOCK_RUN_ID"))):
        return
    raise HeldByOwnRunError(sidecar[: -len(SUFFIX)], record, fd)


def _refuse_own_run_by_id(sidecar: str, own: int) -> None:
    """`refuse_own_run` where `fencelock run` cannot share its lock with its command
    (Windows): the lock stays the wrapper's alone, and a held record that names the run
    this process runs under (``FENCELOCK_RUN_ID``) is that wrapper's while the lock stays
    taken. A wrapper that died left that record behind a free lock, which a probe or
    another acquirer may have for a moment: so the lock is tried for the grace a
    fail-fast acquirer gives such a moment (`_sidecar_holder.FAIL_GRACE`) before the
    wait is refused."""
    run_id = os.environ.get("FENCELOCK_RUN_ID")
    if not run_id:
        return
    from fencelock._sidecar_holder import FAIL_GRACE  # (which imports this module)

    session = sidecar[: -len(SUFFIX)]
    end = time.monotonic() + FAIL_GRACE
    while True:
        try:
            record = read(own, sidecar)
        except (OSError, FenceLockError):
            return
        if record is None or record.state is not HELD or record.run_id != run_id:
            return
        if _platform.try_lock(own):  # free: that run's wrapper is gone; the wait goes on
            _platform.unlock(own)
            return
        if time.monotonic() >= end:
            raise HeldByOwnRunError(session, record, -1)
        time.sleep(0.001)


def still_at_path(sidecar: str, st: os.stat_result) -> bool:
    """After locking: is the inode we locked still the one at the path?"""
    return at_path(sidecar, st) is not None


def at_path(sidecar: str, st: os.stat_result) -> os.stat_result | None:
    """After locking: the path's stat now, where the inode we locked is still the one
    at the path; else None."""
    try:
        now = os.lstat(sidecar)
    except OSError:
        return None
    return now if now.st_ino == st.st_ino and now.st_dev == st.st_dev else None


MOVING = stat.S_ISVTX
"""The mode bit a recover sets on a session's sidecar while it moves the session's
stuck run to a fresh session (docs/PROTOCOL.md 5.1), from before it names the fresh
session until the old one is marked moved: an acquire that finds it set looks for the
fresh session of the run whose record it writes over, and finishes a move that a
recover killed in between left. (The sticky bit means nothing on a regular file; an
acquire reads it from the stat it takes anyway.)"""


def set_moving(sidecar: str, on: bool, fd: int = -1) -> None:
    """Set or clear `MOVING` on ``sidecar`` (through ``fd`` when given); quietly nothing
    where it cannot be (not this user's file, no sidecar, a read-only filesystem): an
    acquire then does not look, as before the bit was used."""
    opened = fd < 0
    try:
        if opened:
            fd, st = open_checked(sidecar, create=False)
        else:
            st = os.fstat(fd)
    except (OSError, FenceLockError):
        return
    try:
        mode = stat.S_IMODE(st.st_mode)
        if bool(mode & MOVING) != on:
            os.fchmod(fd, mode | MOVING if on else mode & ~MOVING)
    except OSError:
        pass
    finally:
        if opened:
            close(fd)


def unlink_if_still(path: str, st: os.stat_result, fd: int = -1) -> bool:
    """Remove ``path`` if it is still the file ``st`` describes (and, given its ``fd``,
    still empty: a writer outside the protocol may have opened it meanwhile); whether
    it was removed. (Not on Windows, where an open file cannot be removed.)"""
    try:
        if (fd < 0 or not os.fstat(fd).st_size) and still_at_path(path, st):
            os.unlink(path)
            return True
    except OSError:
        pass
    return False


def read(fd: int, sidecar: str, size_hint: int | None = None) -> HolderInfo | None:
    """The record in ``fd``, None if empty. Retries a half-written one, then raises."""
    want = MAX_RECORD + 1 if size_hint is None else min(size_hint + 1, MAX_RECORD + 1)
    why = ""
    for _ in range(_READ_RETRIES):
        try:
            data = _platform.pread(fd, want, 0)
        except OSError as e:
            raise access_error(sidecar, e, False) from None
        if len(data) == want and want <= MAX_RECORD:
            want = MAX_RECORD + 1  # the hint was stale; read the whole bound
            continue
        try:
            return decode(data)
        except ValueError as e:
            why = str(e)
    raise CorruptRecordError(sidecar, why)


def write(fd: int, sidecar: str, info: HolderInfo, old_len: int) -> int:
    """Write ``info`` at offset 0, padding over a longer old record. Returns its length."""
    return len(write_bytes(fd, sidecar, info.encode(), old_len))


def write_bytes(fd: int, sidecar: str, record: bytes, old_len: int) -> bytes:
    """Write an encoded record at offset 0, padding over a longer old one. Returns the
    sidecar's bytes as they now are."""
    data = record + b"\n"
    if len(data) > MAX_RECORD:
        raise own_record_too_long(sidecar, len(data), MAX_RECORD)
    # Pad over a slightly longer old record (readers never see the file shrink); cut a
    # much longer one after writing, rather than rewrite all of it on every update.
    cut = old_len > len(data) + _PAD_LIMIT
    if len(data) < old_len and not cut:
        data = data + b" " * (old_len - len(data))
    try:
        if len(data) > old_len:
            # A longer record (or the first): its part past the old one first, so that a
            # full disk (which a write within the file's blocks does not meet) refuses it
            # before the old record is touched. What was written is cut off again if the
            # write is refused (part way: the file size limit, a full disk at a page's
            # end; or over the old record, which needs space too on a copy-on-write
            # filesystem): the old record stays whole, and a first one leaves the sidecar
            # empty (no record), not a fragment every run would read as corrupt.
            try:
                _write_from(fd, data, old_len)
                if old_len:
                    _write_from(fd, data[:old_len], 0)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, old_len)
                raise
        else:
            done = _platform.pwrite(fd, data, 0)
            if done < len(data):
                _write_from(fd, data, done)
        if cut:
            os.ftruncate(fd, len(data))
    except OSError as e:
        raise access_error(sidecar, e, True) from None
    return data


def _write_from(fd: int, data: bytes, start: int) -> None:
    """Write ``data[start:]`` at offset ``start`` (short writes are rare on regular
    files, but legal)."""
    while start < len(data):
        start += _platform.pwrite(fd, data[start:], start)
