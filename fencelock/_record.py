"""The holder record (protocol v1): its fields, encoding, and a strict bounded decoder."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from fencelock._fingerprint import Fingerprint

VERSION = 1
MAX_RECORD = 64 * 1024
"""Readers read at most this much; a record that does not fit is corrupt."""

_MAX_PID = 2**31 - 1
_MAX_TOKEN = 2**63 - 1
_MAX_TEXT = 4096


class State(enum.StrEnum):
    HELD = "held"
    RELEASED = "released"


class Phase(enum.StrEnum):
    WRITE = "write"
    PROMPT = "prompt"


@dataclass(frozen=True, slots=True)
class PreviousHolder:
    """The stale record a run took over."""

    pid: int
    host: str
    lane: str
    run_id: str
    token: int

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "host": self.host,
            "lane": self.lane,
            "run_id": self.run_id,
            "token": self.token,
        }


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """One holder record as written in a sidecar."""

    state: State
    session: str
    pid: int
    host: str
    process_start: str
    lane: str
    run_id: str
    token: int
    acquired_at: float
    heartbeat_at: float
    phase: Phase
    fingerprint: Fingerprint | None
    previous: PreviousHolder | None = None
    fence: str = "stat"
    origin: str | None = None
    """For a session started by `recover`: the session it replaced."""
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Fields this version does not know, kept so they survive a rewrite."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            version=self.version,
            state=str(self.state),
            session=self.session,
            pid=self.pid,
            host=self.host,
            process_start=self.process_start,
            lane=self.lane,
            run_id=self.run_id,
            token=self.token,
            acquired_at=self.acquired_at,
            heartbeat_at=self.heartbeat_at,
            phase=str(self.phase),
            fingerprint=None if self.fingerprint is None else self.fingerprint.to_json(),
            previous=None if self.previous is None else self.previous.to_json(),
            fence=self.fence,
        )
        if self.origin is not None:
            out["origin"] = self.origin
        return out

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    def as_previous(self) -> PreviousHolder:
        return PreviousHolder(self.pid, self.host, self.lane, self.run_id, self.token)


_KNOWN = frozenset(HolderInfo.__dataclass_fields__) - {"extra"}


def decode(data: bytes) -> HolderInfo | None:
    """Parse a sidecar's bytes. None for an empty sidecar; ValueError when corrupt.

    Only the first JSON object counts: writers pad a shorter record with spaces
    instead of truncating, so trailing bytes are expected.
    """
    if len(data) > MAX_RECORD:
        data = data[:MAX_RECORD]
    text_bytes = data.strip(b" \t\r\n\x00")
    if not text_bytes:
        return None
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 at byte {e.start}") from None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        if len(data) >= MAX_RECORD:
            raise ValueError(f"larger than {MAX_RECORD} bytes") from None
        raise ValueError(f"not JSON ({e.msg} at offset {e.pos})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return from_json(obj)


def _int(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    v = obj.get(name)
    if type(v) is not int or not low <= v <= high:
        raise ValueError(f"{name} is {v!r}, not an integer in [{low}, {high}]")
    return v


def _str(obj: dict[str, Any], name: str, default: str | None = None) -> str:
    v = obj.get(name, default)
    if not isinstance(v, str) or len(v) > _MAX_TEXT:
        raise ValueError(f"{name} is not a string of at most {_MAX_TEXT} characters")
    return v


def _float(obj: dict[str, Any], name: str) -> float:
    v = obj.get(name)
    if type(v) not in (int, float):
        raise ValueError(f"{name} is not a number")
    return float(v)


def from_json(obj: dict[str, Any]) -> HolderInfo:
    version = obj.get("version")
    if version != VERSION:
        raise ValueError(f"version is {version!r}; this fencelock reads version {VERSION}")
    try:
        state = State(obj.get("state"))
    except ValueError:
        raise ValueError(f"state is {obj.get('state')!r}, not 'held' or 'released'") from None
    try:
        phase = Phase(obj.get("phase", "write"))
    except ValueError:
        raise ValueError(f"phase is {obj.get('phase')!r}, not 'write' or 'prompt'") from None
    prev_obj = obj.get("previous")
    previous = None
    if prev_obj is not None:
        if not isinstance(prev_obj, dict):
            raise ValueError("previous is not an object")
        previous = PreviousHolder(
            pid=_int(prev_obj, "pid", 1, _MAX_PID),
            host=_str(prev_obj, "host"),
            lane=_str(prev_obj, "lane"),
            run_id=_str(prev_obj, "run_id"),
            token=_int(prev_obj, "token", 0, _MAX_TOKEN),
        )
    origin = obj.get("origin")
    return HolderInfo(
        state=state,
        session=_str(obj, "session"),
        pid=_int(obj, "pid", 1, _MAX_PID),
        host=_str(obj, "host"),
        process_start=_str(obj, "process_start", ""),
        lane=_str(obj, "lane"),
        run_id=_str(obj, "run_id"),
        token=_int(obj, "token", 0, _MAX_TOKEN),
        acquired_at=_float(obj, "acquired_at"),
        heartbeat_at=_float(obj, "heartbeat_at"),
        phase=phase,
        fingerprint=Fingerprint.from_json(obj.get("fingerprint")),
        previous=previous,
        fence=_str(obj, "fence", "stat"),
        origin=origin if isinstance(origin, str) else None,
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )
