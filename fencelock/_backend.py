"""Which holder store a call uses: the ``backend=`` URL, ``FENCELOCK_BACKEND``, or the
sidecar default; and the store-independent session key that hosts agree on.

Imports nothing heavy: a URL is parsed (`_etcdurl`) only when one is given, and the
etcd client is loaded only when an etcd URL is used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fencelock._etcdurl import EtcdURL

ENV = "FENCELOCK_BACKEND"


# os.environ.get costs about a microsecond (it encodes the key each time), as much as
# the rest of SessionLock's constructor: where os.environ keeps its encoded dict (every
# CPython), look the encoded key up directly; the mapping stays the source of truth.
_ENV_DATA: dict[object, object] | None = getattr(os.environ, "_data", None)
_ENV_KEY: object = getattr(os.environ, "encodekey", lambda k: k)(ENV)


def env_set() -> bool:
    """Whether ``$FENCELOCK_BACKEND`` is set (possibly to ``local``)."""
    if _ENV_DATA is not None:
        return _ENV_KEY in _ENV_DATA
    return ENV in os.environ


def selected(backend: str | None) -> EtcdURL | None:
    """The store a call uses: ``backend``, else ``$FENCELOCK_BACKEND``; None = sidecars."""
    if backend is None:
        backend = os.environ.get(ENV)
        if not backend:
            return None
    from fencelock._etcdurl import parse

    return parse(backend)


_MOUNT_OF: dict[str, tuple[tuple[int, int], str, str]] = {}
"""`_mount_of`'s answers, each with the device and inode its directory had then."""


def _mount_of(directory: str) -> tuple[str, str]:
    """(mount point, the directory of its filesystem mounted there) of the mount that
    holds ``directory`` (a real path): the longest mount point above it whose device
    is the directory's (a mount hidden under a later one on a point above is not), else
    the longest. Kept while the directory stays the one found (a stat): a filesystem
    mounted on it or above it since gives it another key."""
    from fencelock._sidecar import directory_id

    seen = directory_id(directory) or (-1, -1)
    kept = _MOUNT_OF.get(directory)
    if kept is not None and kept[0] == seen:
        return kept[1], kept[2]
    from fencelock._platform import mounts

    above = [m for m in mounts()
             if directory == m.point or directory.startswith(m.point.rstrip("/") + "/")]
    device = None if seen[0] < 0 else (os.major(seen[0]), os.minor(seen[0]))
    same = [m for m in above if m.device == device]
    found = (same or above)[0] if above else None
    answer = ("/", "/") if found is None else (found.point, found.root)
    if len(_MOUNT_OF) >= 1024:
        _MOUNT_OF.clear()
    _MOUNT_OF[directory] = (seen, *answer)
    return answer


def session_key(session: str, root: str | None) -> str:
    """The key that names a session in a shared store.

    With ``root``: the session's path relative to it. Without: its path in the
    filesystem that holds it, relative to that filesystem's top, so that hosts
    mounting one share at different places agree (``/mnt/a/sessions/x.jsonl`` and
    ``/srv/b/sessions/x.jsonl`` both become ``sessions/x.jsonl`` when the share is
    mounted at ``/mnt/a`` and ``/srv/b``), and so does a bind mount of one of its
    directories (a container's volume).
    """
    directory = os.path.realpath(os.path.dirname(session))
    path = os.path.join(directory, os.path.basename(session))
    if root is not None:
        base = os.path.realpath(root)
        rel = os.path.relpath(path, base)
        if rel.split(os.sep, 1)[0] == os.pardir:
            from fencelock._errors import OutsideRootError

            raise OutsideRootError(session, root)
        return rel
    # Under a bind mount of a subdirectory, the key is that subdirectory's path in the
    # filesystem (as for the same file seen through the filesystem's own mount point).
    mount, within = _mount_of(directory)
    return os.path.normpath(os.path.join(within, os.path.relpath(path, mount))).lstrip("/")
