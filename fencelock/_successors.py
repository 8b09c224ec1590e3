"""The fresh session a `recover` moves a stuck run's conversation to: one name for each
stuck run, worked out from its run id and token, so that every recover of that run, and
the run itself (`SessionLock.superseded`), name the same file."""

from __future__ import annotations

import hashlib
import os
import stat
import uuid

from fencelock import _sidecar
from fencelock._errors import PlantedFileError

_NAMESPACE = uuid.UUID("6f1c2a9e-53d1-4e0a-9c1b-f3a2d0e5b7c4")
"""The namespace of successor session names."""


def named(session: str, *parts: bytes) -> str:
    """A fresh session beside ``session`` named by ``parts``: uuid5, with hashlib
    imported with this module (recover may run in a process near its memory limit,
    where loading the hash library late would fail), over the name's own bytes (a name
    need not be UTF-8) and the parts."""
    key = b"\n".join([os.fsencode(os.path.basename(session)), *parts])
    name = uuid.UUID(bytes=hashlib.sha1(_NAMESPACE.bytes + key).digest()[:16], version=5)
    return os.path.join(os.path.dirname(session), f"{name}.jsonl")


def of_run(session: str, run_id: str, token: int) -> str:
    """The fresh session of the run ``run_id`` (fencing token ``token``) of ``session``:
    no other run shares both. A run id as the record has it."""
    return named(session, run_id.encode("utf-8", "surrogatepass"), b"%d" % token)


def made(session: str, run_id: str, token: int) -> str | None:
    """`of_run`'s fresh session once a recover has made it whole (it gets its name only
    then); None before, and where what is at that name is no recover's: not a regular
    file, or another user's in a directory anyone can write to (planted)."""
    fresh = of_run(session, run_id, token)
    try:
        st = os.lstat(fresh)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        _sidecar.refuse_planted(fresh, st)
    except PlantedFileError:
        return None
    return fresh
