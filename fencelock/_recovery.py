"""Stuck-session recovery done safely: never re-fire on a session that a run still holds.

`recover` asks any in-process run on the session to abort, waits up to ``wait``
seconds for the holder to let go, and then either answers ``"refire"`` (the session
is free; a stale record is cleared first) or starts a fresh session file beside the
old one (``"fresh"``), optionally carrying the old transcript's complete lines over.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from dataclasses import dataclass

from fencelock import _fingerprint, _lock, _probe, _sidecar, _store, _tokens, _wait
from fencelock._errors import FenceLockError, SessionContendedError, SidecarAccessError
from fencelock._fingerprint import FenceMode
from fencelock._probe import HolderStatus, ProbeState


class Action(enum.StrEnum):
    REFIRE = "refire"
    FRESH = "fresh"


@dataclass(frozen=True, slots=True)
class Recovery:
    """What `recover` decided: the action, the session to use, and what it found."""

    action: Action
    session: str
    holder: HolderStatus
    waited: float = 0.0
    carried_lines: int = 0


def fresh_session(path: str | os.PathLike[str]) -> str:
    """A new, unused ``<uuid>.jsonl`` path beside ``path`` (not created)."""
    session, _ = _sidecar.paths(path)
    directory = os.path.dirname(session)
    import uuid

    while True:
        candidate = os.path.join(directory, f"{uuid.uuid4()}.jsonl")
        if not os.path.lexists(candidate) and not os.path.lexists(candidate + _sidecar.SUFFIX):
            return candidate


def recover(
    path: str | os.PathLike[str],
    *,
    wait: float = 30.0,
    fresh: bool = True,
    carry: bool = True,
    lane: str = "recovery",
    stuck_after: float = _probe.DEFAULT_STUCK_AFTER,
    backend: str | None = None,
) -> Recovery:
    """The stuck-session recovery step. Raises `SessionContendedError` when the
    session is still held after ``wait`` and ``fresh`` is False.

    ``"refire"`` means the stuck run is gone, not that the session is reserved: another
    lane may take it before the re-fired run does, so that run acquires it as any run
    does (waiting by default), and never races the other.
    """
    limit = _wait.limit(wait, "wait")
    session, sidecar = _sidecar.paths(path)
    _fingerprint.take(session, FenceMode.STAT)  # refuses a directory, FIFO or symlink
    store = _store.open_store(backend, session)
    found = _probe.probe(session, stuck_after=stuck_after, backend=backend)
    if found.state is ProbeState.UNREADABLE:
        raise FenceLockError(f"{session}: cannot recover: {found.reason}")
    waited = 0.0
    if found.state is ProbeState.LIVE:
        local = _lock.held_in_process(_lock.registry_key(session))
        if local is not None:
            local._abort()
        start = time.monotonic()
        if store is not None:
            released = store.wait_free(limit)
        else:
            released = _wait.wait_until_unlocked(sidecar, limit)
        waited = time.monotonic() - start
        if not released:
            if not fresh:
                raise SessionContendedError(session, found.record, waited=waited)
            old_token = found.record.token if found.record is not None else 0
            new, carried = _start_fresh(session, lane, carry, old_token, backend)
            return Recovery(Action.FRESH, new, found, waited, carried)
    now = _probe.probe(session, stuck_after=stuck_after, backend=backend)
    if now.state is ProbeState.STALE:
        with contextlib.suppress(SessionContendedError):
            # Raised only when another run took the session in the meantime: its new
            # record replaces the stale one, and the re-fired run waits for it as any
            # run does.
            _probe.clear(session, backend=backend)
    return Recovery(Action.REFIRE, session, found, waited)


def _start_fresh(
    session: str, lane: str, carry: bool, old_token: int, backend: str | None = None
) -> tuple[str, int]:
    new = fresh_session(session)
    lock = _lock.SessionLock(new, lane, on_contention="fail", origin=session, backend=backend)
    data = _complete_lines(session) if carry else b""
    # The fresh session continues the old one's tokens: its stamped lines come along.
    lock._token_floor = max(old_token, _tokens.floor(session), _highest_stamp(data))
    with lock:
        if data:
            lock._append_bytes(data)
        else:
            lock._append_bytes(b"")
    return new, data.count(b"\n")


def _highest_stamp(data: bytes) -> int:
    best = 0
    key = _tokens.STAMP_KEY.encode()
    for line in data.split(b"\n"):
        if key in line:
            try:
                best = max(best, _tokens.stamp_of(json.loads(line)) or 0)
            except (ValueError, RecursionError):
                continue
    return best


def _complete_lines(session: str) -> bytes:
    """The old transcript up to its last line break (a torn last line stays behind)."""
    try:
        fd, _ = _sidecar.open_regular(session, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise SidecarAccessError(session, e, "recover with carry=False to start empty") from None
    return data[: data.rfind(b"\n") + 1]
