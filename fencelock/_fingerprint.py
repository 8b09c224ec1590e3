"""The session file's fingerprint: what the fence compares at each fence point.

Two fences exist. ``stat`` compares (dev, ino, size, mtime_ns, ctime_ns), costs one
stat, and catches any write. ``content`` compares size plus a digest of the file's
last bytes: it ignores stat fields that network filesystems (SMB/CIFS, Azure Files)
report differently for an unchanged file, at the cost of one small read.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from fencelock import _platform

TAIL_BYTES = 4096
"""How much of the file's end the content fence hashes."""

_TAIL = re.compile(r"[0-9a-f]{32}")
"""A content fence's ``tail``: the BLAKE2b digest (16 bytes) in lowercase hex."""

# Filesystems whose stat fields are known to flap for an unchanged file.
_FLAPPING_FS = frozenset({"cifs", "smb3", "smbfs", "smb2"})
_COPYING_UP_FS = frozenset({"overlay"})
"""Filesystems whose first open for writing of a lower layer's file moves its stat."""


class FenceMode(enum.StrEnum):
    """How the fence tells a foreign write: ``STAT`` compares the session's stat
    (device, inode, size, mtime, ctime); ``CONTENT`` its size and a hash of its last
    bytes, for filesystems whose stat flaps; ``AUTO`` picks per filesystem."""

    STAT = "stat"
    CONTENT = "content"
    AUTO = "auto"


STAT, CONTENT = FenceMode.STAT, FenceMode.CONTENT
"""As module globals for the hot paths (see `fencelock._record.HELD`)."""


Witness = tuple[int, bytes, tuple[int, int, int, int]]
"""A fence point's `Fingerprint.witness`: see `fencelock._fence.metadata_only`."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The session file's identity and state at a fence point (docs/PROTOCOL.md 2.3)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    tail: str | None = None
    """Hex digest of the last `TAIL_BYTES` bytes; only the content fence sets it."""
    witness: Witness | None = field(default=None, compare=False, repr=False)
    """For a fence point an append of the run left: where the end of its line lies,
    those bytes, and the file's (nlink, mode, uid, gid) then
    (`fencelock._fence.metadata_only`); never in a record."""

    def matches(self, other: Fingerprint | None, mode: FenceMode) -> bool:
        if other is None:
            return False
        if mode is CONTENT:
            return self.size == other.size and self.tail == other.tail
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns) == (
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
        )

    def short(self) -> str:
        text = f"ino {self.ino} size {self.size} mtime_ns {self.mtime_ns}"
        return text + (f" tail {self.tail[:12]}" if self.tail else "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dev": self.dev,
            "ino": self.ino,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
        }
        if self.tail is not None:
            out["tail"] = self.tail
        return out

    @classmethod
    def from_json(cls, data: object) -> Fingerprint | None:
        """Parse a record's ``fingerprint``; raises ValueError when malformed."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError("fingerprint is not an object")
        values: list[int] = []
        for name in ("dev", "ino", "size", "mtime_ns", "ctime_ns"):
            v = data.get(name)
            # Times may be negative: a file can carry an mtime from before 1970.
            if type(v) is not int or (v < 0 and not name.endswith("time_ns")):
                raise ValueError(f"fingerprint.{name} is not a valid integer")
            values.append(v)
        tail = data.get("tail")
        if tail is not None and (not isinstance(tail, str) or not _TAIL.fullmatch(tail)):
            raise ValueError("fingerprint.tail is not 32 hex digits")
        dev, ino, size, mtime_ns, ctime_ns = values
        return cls(dev, ino, size, mtime_ns, ctime_ns, tail)  # positional: see from_stat


def from_stat(
    st: os.stat_result, tail: str | None = None, witness: Witness | None = None
) -> Fingerprint:
    # Positional, in field order: keywords would cost a fifth of a microsecond more on
    # every fence point and every record a scan reads (the dataclass's generated __init__).
    return Fingerprint(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, tail,
                       witness)


def tail_digest(fd: int, size: int) -> str:
    start = max(0, size - TAIL_BYTES)
    data = _platform.pread(fd, size - start, start)
    import hashlib  # only the content fence needs it; keep it off the start-up path

    return hashlib.blake2b(data, digest_size=16).hexdigest()


def take(path: str, mode: FenceMode, opened: bool = False) -> Fingerprint | None:
    """Fingerprint of ``path`` now, or None when it does not exist.

    ``opened``: from the file opened and fstat-ed, never from a stat of the path. On a
    shared filesystem (NFS) an open revalidates what the client cached (close-to-open
    consistency), so the fence sees another host's writes; a stat may not.
    """
    if opened:
        return _take_opened(path, mode)
    try:
        st = os.lstat(path)  # never through a symlink: what is at the path counts
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _unreadable(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        from fencelock._errors import UnsafePathError

        raise UnsafePathError(path, _platform.describe_mode(st.st_mode, path))
    if mode is not CONTENT:
        return from_stat(st)
    flags = os.O_RDONLY | _platform.OPEN_FLAGS  # O_BINARY too: the bytes as written
    try:
        fd, = map(os.open, (path,), (flags,))  # see `_sidecar.open_regular`
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        st = os.fstat(fd)
        return from_stat(st, tail_digest(fd, st.st_size))
    finally:
        os.close(fd)


def _take_opened(path: str, mode: FenceMode) -> Fingerprint | None:
    flags = os.O_RDONLY | _platform.OPEN_FLAGS  # O_BINARY too: the bytes as written
    try:
        fd, = map(os.open, (path,), (flags,))  # `open_regular`
    except FileNotFoundError:
        return None
    except OSError as e:
        # A symlink (ELOOP), a socket (ENXIO): say what is there, as the stat path does.
        try:
            st = os.lstat(path)
        except OSError:
            raise _unreadable(path, e) from None
        if stat.S_ISREG(st.st_mode):
            raise _unreadable(path, e) from None
        raise _not_regular(path, st.st_mode) from None
    try:
        st = os.fstat(fd)
        if _platform.FOLLOWS_SYMLINKS and os.path.islink(path):
            raise _not_regular(path, stat.S_IFLNK)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        return from_stat(st, tail_digest(fd, st.st_size) if mode is CONTENT else None)
    except OSError as e:
        raise _unreadable(path, e) from None
    finally:
        os.close(fd)


def copy_up(path: str) -> None:
    """On overlayfs (a container's filesystem): open the session file for writing and
    close it, writing nothing. A file that so far is only in a lower layer (an image
    shipped it) is copied up to the upper layer then, which moves its ctime (and with
    ``metacopy=on`` its mtime): done by the first append's open instead, after the
    fence point was taken, the stat fence would read it as a write by someone else. A
    file already copied up is not changed. An error is left to the append to report."""
    flags = os.O_WRONLY | os.O_APPEND | _platform.O_NOFOLLOW | _platform.O_NONBLOCK
    try:
        fd, = map(os.open, (path,), (flags | _platform.O_CLOEXEC,))  # `open_regular`
    except OSError:
        return
    os.close(fd)


def _not_regular(path: str, st_mode: int) -> Exception:
    from fencelock._errors import UnsafePathError
    from fencelock._platform import describe_mode

    return UnsafePathError(path, describe_mode(st_mode, path))


def _unreadable(path: str, e: OSError) -> Exception:
    from fencelock._sidecar import unreadable_session

    return unreadable_session(path, e, "the fence needs to stat and read the session file")


def detect(directory: str) -> tuple[FenceMode, bool]:
    """The fence to use for files in ``directory`` (content on SMB/CIFS, else stat), and
    whether a file there is copied up (`copy_up`) before its fingerprint is taken
    (overlayfs)."""
    fstype = filesystem_type(directory)
    return mode_for(fstype), fstype in _COPYING_UP_FS


def mode_for(fstype: str | None) -> FenceMode:
    return FenceMode.CONTENT if fstype in _FLAPPING_FS else FenceMode.STAT


def filesystem_type(directory: str) -> str | None:
    """The filesystem type of ``directory`` from the system's mount table, None where
    unknown."""
    mounts = _platform.mounts_table()
    if mounts is None:
        return None
    try:
        real = os.path.realpath(directory)
    except OSError:  # a symlink on the way removed as it was read (realpath lets it out)
        return None
    return type_from_mounts(real, mounts)


def type_from_mounts(target: str, mounts: str) -> str | None:
    """The type of the longest mount point containing ``target`` in a mounts table."""
    best, best_type = -1, None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, best_type = len(point), parts[2]
    return best_type
