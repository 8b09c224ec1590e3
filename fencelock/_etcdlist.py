"""Every session the etcd store has a holder or a last record for, under one URL's
prefix (``fencelock status`` of a directory, or of the whole store), read a page at a
time."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fencelock import _backend, _etcd, _etcdcluster
from fencelock import _etcdwire as wire
from fencelock._errors import FenceLockError, OutsideRootError
from fencelock._record import HolderInfo

if TYPE_CHECKING:
    from fencelock._etcdurl import EtcdURL
    from fencelock._probe import HolderStatus


def _local_path(url: EtcdURL, key: str, record: HolderInfo | None) -> str | None:
    """The path on this host of the session stored under ``key``: under the URL's
    ``root``; else the record's own path when it names that key here too (a host that
    mounts the share elsewhere wrote another); None when not known."""
    if url.root is not None:
        return os.path.join(os.path.realpath(url.root), key)
    if record is None:
        return None
    try:
        here = _backend.session_key(record.session, None) == key
    except (OSError, FenceLockError):
        return None
    return record.session if here else None


_PAGE = 1000
"""Keys a listing asks etcd for at a time: every session ever held keeps its last
record, so a prefix may hold more than one answer should carry."""


def _paged(c: _etcdcluster.Cluster, prefix: str, *, keys_only: bool = False
           ) -> Iterator[dict[str, Any]]:
    """Every key under ``prefix`` in key order, read `_PAGE` keys a request. Each page
    is read as it is then: a listing, not a snapshot."""
    start, end = wire.b64(prefix), wire.b64(wire.prefix_end(prefix))
    while True:
        request: dict[str, Any] = {"key": start, "range_end": end, "limit": _PAGE}
        if keys_only:
            request["keys_only"] = True
        r = c.call("/kv/range", request)
        kvs = r.get("kvs", [])
        yield from kvs
        if not kvs or not r.get("more"):
            return
        start = base64.b64encode(wire.unb64(kvs[-1]["key"]) + b"\0").decode("ascii")


def list_holders(url: EtcdURL, stuck_after: float) -> Iterator[HolderStatus]:
    """Every holder under the URL's prefix, in key order: each session with an owner
    (live), a last record that says held (stale) or one that cannot be read; not
    released ones. The last records are read a page at a time, and not kept."""
    c = _etcdcluster.cluster(url)
    sessions = f"{url.prefix}/sessions/"
    lasts = f"{url.prefix}/last/"
    queues: dict[bytes, list[dict[str, Any]]] = {}  # the queued keys: the runs under way
    skip = len(sessions.encode("utf-8", "surrogateescape"))
    for kv in _paged(c, sessions):
        key = wire.unb64(kv["key"])[skip:]
        queues.setdefault(key.rpartition(b"/")[0], []).append(kv)
    queued = sorted(queues)
    i = 0
    skip = len(lasts.encode("utf-8", "surrogateescape"))
    for kv in _paged(c, lasts):
        key = wire.unb64(kv["key"])[skip:]
        while i < len(queued) and queued[i] < key:
            yield from _listed(url, queued[i], queues[queued[i]], None, stuck_after)
            i += 1
        if i < len(queued) and queued[i] == key:
            i += 1
        yield from _listed(url, key, queues.get(key, []), kv, stuck_after)
    for key in queued[i:]:
        yield from _listed(url, key, queues[key], None, stuck_after)


def _listed(url: EtcdURL, name: bytes, queued: list[dict[str, Any]],
            last: dict[str, Any] | None, stuck_after: float) -> Iterator[HolderStatus]:
    """`list_holders`'s row of the session whose key is ``name``, unless released."""
    from fencelock._probe import ProbeState

    key = name.decode("utf-8", "surrogateescape")
    queue = sorted(queued, key=lambda kv: int(kv["create_revision"]))
    where = f"{url.display}/{url.prefix}/sessions/{key}"
    lst = [] if last is None else [last]
    record = _etcd.decode_quietly(wire.raw(lst), where)
    owner_record = _etcd.decode_quietly(wire.raw(queue), where)
    session = _local_path(url, key, owner_record or record)
    command = None
    if session is None:  # the path is known only relative to some host's mount point
        command = (f"{_etcd.clear_command(url, 'SESSION')}, SESSION being the session "
                   f"file whose path in its filesystem, from the filesystem's top, is {key}")
    status = _etcd.session_status(session or key, where, owner=queue[:1], last=lst,
                     waiters=max(0, len(queue) - 1), stuck_after=stuck_after,
                     last_where=f"{url.display}/{url.prefix}/last/{key}",
                     command=command or _etcd.clear_command(url, session or key),
                     etcdctl=url.etcdctl, fence=session is not None)
    if status.state is not ProbeState.FREE:  # a released run holds nothing
        yield status


def names_in(url: EtcdURL, directory: str) -> set[str]:
    """Names of the sessions in ``directory`` that etcd has a holder or record for."""
    try:
        base = _backend.session_key(os.path.join(directory, "x"), url.root)[:-1]
    except OutsideRootError:
        raise OutsideRootError(directory, url.root or "/") from None
    found = set()
    for kind in ("sessions", "last"):
        pfx = f"{url.prefix}/{kind}/{base}"
        for kv in _paged(_etcdcluster.cluster(url), pfx, keys_only=True):
            rest = wire.key_text(kv)[len(pfx):]
            name = rest.split("/", 1)[0] if kind == "sessions" else rest
            if rest.count("/") == (1 if kind == "sessions" else 0):
                found.add(name)
    return found
