"""The holder record (protocol v1): its fields, encoding, and a strict bounded decoder."""

from __future__ import annotations

import enum
import functools
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from fencelock._fingerprint import Fingerprint
from fencelock._json import NotJSONError, finite_float, finite_int, not_json

if TYPE_CHECKING:
    from fencelock._platform import LockOwner

VERSION = 1
MAX_RECORD = 64 * 1024
"""Readers read at most this much; a record that does not fit is corrupt."""

_MAX_PID = 2**31 - 1
MAX_TOKEN = 2**63 - 1
"""The largest fencing token a record may carry."""
MAX_TEXT = 4096
"""The longest string field (lane, host, ...) a reader accepts."""
_PREVIOUS_TEXT = 256
"""How much of a taken-over holder's host, lane and run id ``previous`` keeps."""


class State(enum.StrEnum):
    """A record's ``state``: written ``HELD`` at acquire, ``RELEASED`` at release."""

    HELD = "held"
    RELEASED = "released"


class Phase(enum.StrEnum):
    """A held record's ``phase``: ``PROMPT`` inside the prompt window, else ``WRITE``."""

    WRITE = "write"
    PROMPT = "prompt"


HELD, RELEASED = State.HELD, State.RELEASED
WRITE, PROMPT = Phase.WRITE, Phase.PROMPT
"""The members as module globals, for the acquire, append and release paths: on Python
3.11 a member read through its class goes through the enum metaclass's attribute hook,
about 4x a global's cost warm and some microseconds cold (right after a long wait)."""


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


class RunCommand(NamedTuple):
    """The command a `fencelock run` holder started, which shares its lock (the record's
    ``command``): while that process lives, the holder is live even when ``pid`` is gone."""

    pid: int
    process_start: str


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

    @property
    def command(self) -> RunCommand | None:
        """For a record written by `fencelock run`: the command it started (`RunCommand`:
        ``pid``, ``process_start``); None otherwise, or where the record names it badly."""
        command = self.extra.get("command")
        if not isinstance(command, dict):
            return None
        pid, start = command.get("pid"), command.get("process_start", "")
        if type(pid) is not int or not 1 <= pid <= _MAX_PID:
            return None
        if not isinstance(start, str) or len(start) > MAX_TEXT:
            return None
        return RunCommand(pid, start)

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
        static = static_part(
            pid=self.pid, host=self.host, process_start=self.process_start,
            session=self.session, lane=self.lane, fence=self.fence, origin=self.origin,
            extra=self.extra,
        )
        return encode(
            state=self.state, phase=self.phase, token=self.token, run_id=self.run_id,
            static=static, acquired_at=self.acquired_at, heartbeat_at=self.heartbeat_at,
            fingerprint=self.fingerprint, previous=self.previous,
        )

    def as_previous(self) -> PreviousHolder:
        # Shortened: `previous` is for diagnosis, and a record must stay under the bound.
        cut = _PREVIOUS_TEXT
        return PreviousHolder(self.pid, self.host[:cut], self.lane[:cut], self.run_id[:cut],
                              self.token)


_KNOWN = frozenset(HolderInfo.__dataclass_fields__) - {"extra"}


class _Unfinished:
    """A `HolderInfo` being built: the same slots, filled with plain attribute stores,
    then made a `HolderInfo` by assigning its ``__class__`` (which Python allows between
    classes with the same slots). A frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, at about three times the cost, and a holder builds
    one on every acquire."""

    __slots__ = HolderInfo.__slots__


_new = object.__new__


def info_shell(
    session: str,
    pid: int,
    host: str,
    process_start: str,
    lane: str,
    fence: str,
    origin: str | None,
    version: int = VERSION,
    extra: dict[str, Any] | None = None,
) -> _Unfinished:
    """A `HolderInfo` begun (see `_Unfinished`): the fields one holder object writes on
    every acquire set, the others not yet; `completed` sets them.

    A waiter builds it before it waits, so that less is left to do between the lock
    coming free and ``acquire()`` returning. Completed once, it is a `HolderInfo`,
    which never changes after that.
    """
    info: Any = _new(_Unfinished)
    info.session = session
    info.pid = pid
    info.host = host
    info.process_start = process_start
    info.lane = lane
    info.fence = fence
    info.origin = origin
    info.version = version
    info.extra = {} if extra is None else extra
    return info  # type: ignore[no-any-return]


def completed(
    shell: _Unfinished,
    state: State,
    run_id: str,
    token: int,
    acquired_at: float,
    heartbeat_at: float,
    phase: Phase,
    fingerprint: Fingerprint | None,
    previous: PreviousHolder | None,
    /,
) -> HolderInfo:
    """Set the fields `info_shell` left out: ``shell``, now a `HolderInfo`.

    Positional: a waiter calls it between the lock coming free and ``acquire()``
    returning, where a call with keywords costs some microseconds more (the interpreter's
    generic call path, cold after a long wait)."""
    info: Any = shell
    info.state = state
    info.run_id = run_id
    info.token = token
    info.acquired_at = acquired_at
    info.heartbeat_at = heartbeat_at
    info.phase = phase
    info.fingerprint = fingerprint
    info.previous = previous
    info.__class__ = HolderInfo
    return info  # type: ignore[no-any-return]

# The record starts with a fixed-width header so that release can flip ``state`` with
# one small pwrite, and an acquirer can read the previous token without a full parse.
# JSON allows the padding: whitespace may follow any value.
_STATE_TEXT = {State.HELD: '"held"    ', State.RELEASED: '"released"'}
_PHASE_TEXT = {Phase.WRITE: '"write" ', Phase.PROMPT: '"prompt"'}
TOKEN_WIDTH = 20
"""The token is left-aligned and padded with spaces to this many characters."""
RECORD_HEAD = {
    (state, phase): f'{{"version":1,"state":{state_text},"phase":{phase_text},"token":'
    for state, state_text in _STATE_TEXT.items()
    for phase, phase_text in _PHASE_TEXT.items()
}
"""Every record's fixed-width start, up to its token, for each state and phase."""
_HEAD_BYTES = {key: head.encode() for key, head in RECORD_HEAD.items()}
STATE_OFFSET = len('{"version":1,"state":')
"""Where ``state``'s value starts: release overwrites it in place with `RELEASE_PATCH`."""
RELEASE_PATCH = _STATE_TEXT[State.RELEASED].encode()
_STATE_OF_HEAD = {head: state for (state, _), head in _HEAD_BYTES.items()}
RELEASED_HEAD = _HEAD_BYTES[State.RELEASED, Phase.WRITE]
"""Written over a held record's head in fencelock's layout (`in_layout_held`), it makes
the record released, in the write phase, leaving every other byte as it was."""
HELD_WRITE_HEAD = _HEAD_BYTES[State.HELD, Phase.WRITE]
"""Written over a held record's head in the prompt phase, it makes the record say the
write phase, leaving every other byte as it was."""
HEAD_LEN = len(RECORD_HEAD[State.HELD, Phase.WRITE])
_TOKEN_END = HEAD_LEN + TOKEN_WIDTH
if {len(head) for head in RECORD_HEAD.values()} != {HEAD_LEN}:  # pragma: no cover
    raise ImportError("fencelock._record: record heads differ in length")
_PLAIN = re.compile(r'[^A-Za-z0-9_.:-]')
"""Finds a character that would need escaping (run ids normally have none)."""
_C1 = re.compile("[\x7f-\x9f]")
"""DEL and the C1 controls, which JSON leaves raw: U+009B is a terminal's CSI."""


def _no_raw_controls(text: str) -> str:
    """JSON text with DEL and the C1 controls escaped (``\\u009b``), as JSON escapes
    the C0 ones: a sidecar shown with ``cat`` holds no raw control bytes."""
    if _C1.search(text) is None:
        return text
    return _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


@functools.lru_cache(maxsize=4096)
def _js(text: str) -> str:
    """JSON text of a string. UTF-8 is left as is (escaping could triple a record's
    size), but for DEL and the C1 controls; a string that is not valid Unicode (a
    path's undecodable bytes) is escaped."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(text)
    return _no_raw_controls(json.dumps(text, ensure_ascii=False))


def _fingerprint_text(fp: Fingerprint) -> str:
    text = (
        f'{{"dev":{fp.dev},"ino":{fp.ino},"size":{fp.size},'
        f'"mtime_ns":{fp.mtime_ns},"ctime_ns":{fp.ctime_ns}'
    )
    return text + (f',"tail":{_js(fp.tail)}}}' if fp.tail is not None else "}")


def static_part(
    *,
    pid: int,
    host: str,
    process_start: str,
    session: str,
    lane: str,
    fence: str,
    origin: str | None,
    extra: dict[str, Any],
) -> str:
    """The fields that stay fixed for one holder object, encoded once."""
    text = (
        f',"pid":{pid},"host":{_js(host)},"process_start":{_js(process_start)}'
        f',"session":{_js(session)},"lane":{_js(lane)},"fence":{_js(fence)}'
    )
    if origin is not None:
        text += f',"origin":{_js(origin)}'
    for key, value in extra.items():
        text += f",{_js(key)}:{_json_value(value)}"
    return text


def _json_value(value: Any) -> str:
    """An unknown field's value as the record's strings are written (`_js`): UTF-8 as is,
    escaped only where a string is not valid Unicode."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    return _no_raw_controls(text)


def command_part(pid: int, process_start: str) -> str:
    """The ``command`` field, appended to a record's fixed part by `fencelock run`."""
    return f',"command":{{"pid":{pid},"process_start":{_js(process_start)}}}'


def left_by_run(
    last: HolderInfo | None, owners: Sequence[LockOwner] | None
) -> HolderInfo | None:
    """``last``, a session's last record, when the processes holding its lock are ones
    the command of the `fencelock run` that wrote it left running: every lock the system
    lists (``owners``) is the one that run's own process took, which has exited: its
    descriptor lives on in what the command started. ``last`` is released (the run
    ended), or held by a run killed with its command (the caller has found both gone):
    then also where the system lists no lock (None: it cannot say; empty: another PID
    namespace's), as the record's word is all there is. None otherwise."""
    if last is None or (last.state is not RELEASED and last.command is None):
        return None
    if not owners:
        return last if last.state is HELD else None
    return last if all(o.pid == last.pid and o.command is None for o in owners) else None


def encode(
    *,
    state: State,
    phase: Phase,
    token: int,
    run_id: str,
    static: str,
    acquired_at: float,
    heartbeat_at: float,
    fingerprint: Fingerprint | None,
    previous: PreviousHolder | None,
) -> bytes:
    """A record's bytes, in the fixed layout that `peek` and `RELEASE_PATCH` rely on."""
    return assemble(
        state, phase, token, middle(run_id, static), acquired_at, heartbeat_at,
        fingerprint_bytes(fingerprint), previous,
    )


def middle(run_id: str, static: str) -> bytes:
    """The encoded fields between a record's token and its ``acquired_at`` value: the run
    id and the holder's fixed part (`static_part`), the same for every write of a run."""
    rid = _js(run_id) if _PLAIN.search(run_id) else f'"{run_id}"'
    return f',"run_id":{rid}{static},"acquired_at":'.encode()


def middle_tail(static: str) -> bytes:
    """What `middle` puts after the run id's opening quote and value, for `middle_of`."""
    return f'"{static},"acquired_at":'.encode()


def middle_of(run_id: str, tail: bytes) -> bytes:
    """`middle` from its `middle_tail`, encoded once for all runs of a holder, for a run
    id that needs no escaping (`_identity.RUN_IDS` makes only such ids)."""
    return b',"run_id":"' + run_id.encode() + tail


def fingerprint_bytes(fingerprint: Fingerprint | None) -> bytes:
    """The encoded ``fingerprint`` field's value."""
    return b"null" if fingerprint is None else _fingerprint_text(fingerprint).encode()


_LAYOUT = b'%%s%%-%dd%%s%%s,"heartbeat_at":%%s,"fingerprint":%%s,"previous":%%s}' % TOKEN_WIDTH
"""A record from its head to its end: one ``%`` formats it straight into bytes (the
times as their ``repr``, encoded beforehand: ``%r`` in bytes goes through `ascii`, which
costs a record write 0.3 us a time)."""


def assemble(
    state: State,
    phase: Phase,
    token: int,
    middle: bytes,
    acquired_at: float,
    heartbeat_at: float,
    fingerprint: bytes,
    previous: PreviousHolder | None,
    /,
) -> bytes:
    """`encode` from parts encoded earlier (`middle`, `fingerprint_bytes`): a holder
    encodes them once and writes its record many times. Positional, as `completed`."""
    prev = b"null" if previous is None else (
        f'{{"pid":{previous.pid},"host":{_js(previous.host)},"lane":{_js(previous.lane)}'
        f',"run_id":{_js(previous.run_id)},"token":{previous.token}}}'
    ).encode()
    at = repr(acquired_at).encode()
    # The first record of a run has one time twice: its repr once.
    beat = at if heartbeat_at == acquired_at else repr(heartbeat_at).encode()
    return _LAYOUT % (_HEAD_BYTES[state, phase], token, middle, at, beat, fingerprint, prev)


def in_layout_held(data: bytes) -> bool:
    """Whether ``data``, a record's first bytes, is the head of a held record in
    fencelock's fixed layout (2.4 of docs/PROTOCOL.md), so `RELEASED_HEAD` fits over it."""
    return _STATE_OF_HEAD.get(data[:HEAD_LEN]) is HELD


def peek(data: bytes) -> tuple[State, int] | None:
    """(state, token) from a record in fencelock's own layout, None otherwise.

    An acquirer taking over a released record needs only these two; anything that
    does not match (another writer's layout, a torn record) takes the full decoder. A
    record that gives ``state`` or ``token`` again after the head is read by its head
    here (the full decoder calls it corrupt): whoever can write that can write any
    head, and checking for it would cost every acquire 3% (0.7 µs).

    Slices and a dict, not a regular expression: right after a long wait (a waiter's
    hand-off) the expression cost about 15 µs more.
    """
    head = _head(data)
    # A record as written ends "}\n"; one padded over a longer old record, in spaces.
    if head is None or (
        not data.endswith(b"}\n") and not data.rstrip(b" \t\r\n\x00").endswith(b"}")
    ):
        return None
    if head[1] > MAX_TOKEN:
        return None  # the full decoder reports it
    return head


def _head(data: bytes) -> tuple[State, int] | None:
    """(state, token) as a fixed-layout reader takes them from the head of ``data``,
    whatever follows it; None when the head is not in fencelock's layout."""
    state = _STATE_OF_HEAD.get(data[:HEAD_LEN])
    if state is None or data[_TOKEN_END:_TOKEN_END + 1] != b",":
        return None
    digits = data[HEAD_LEN:_TOKEN_END].rstrip(b" ")
    return (state, int(digits)) if digits.isdigit() else None


_DECODER = json.JSONDecoder(parse_constant=not_json, parse_float=finite_float,
                            parse_int=finite_int)
"""Strict JSON: a record holding ``NaN``, ``Infinity`` or ``1e400`` is corrupt (other
readers refuse it; a rewrite would carry it on as ``Infinity``)."""


TOO_LARGE = "stale record, too large to mark released,"
"""What `clear --force` says it set aside when `released_again` found no room."""


def released_again(record: HolderInfo) -> tuple[bytes, bool] | None:
    """A stale ``record`` in another writer's layout, as `clear` writes it again: marked
    released in the write phase and encoded anew. Its bytes, and whether its writer's
    own fields (``extra``) were left out to fit the bound: encoded again, a record may
    grow (numbers written short, ``1e5``, come back as ``100000.0``; control characters
    left raw come back escaped). None where it is over the bound even without them."""
    released = replace(record, state=State.RELEASED, phase=Phase.WRITE)
    data = released.encode()
    if len(data) < MAX_RECORD:
        return data, False
    if record.extra:
        data = replace(released, extra={}).encode()
        if len(data) < MAX_RECORD:
            return data, True
    return None


def decode(data: bytes) -> HolderInfo | None:
    """Parse a sidecar's bytes. None for an empty (zero-length) sidecar; ValueError when
    corrupt, including a sidecar of nothing but NUL bytes or spaces.

    Only the first JSON object counts: writers pad a shorter record with spaces
    instead of truncating, so trailing bytes are expected.
    """
    if not data:
        return None
    if len(data) > MAX_RECORD:
        data = data[:MAX_RECORD]
    text_bytes = data.strip(b" \t\r\n\x00")
    if not text_bytes:
        # fencelock never writes this; a filesystem can leave it after a crash
        raise ValueError(f"{len(data)} bytes of NULs or spaces, no record")
    not_utf8 = None
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        # Bytes past the record are not its own: a shorter record written over a longer
        # one is followed by the old one's rest until the file is cut to length, and that
        # rest may begin mid-character. The record must end before them.
        not_utf8 = ValueError(f"not UTF-8 at byte {e.start}")
        text = text_bytes[: e.start].decode("utf-8")
    try:
        obj = _first_value(text, len(data))
    except ValueError:
        if not_utf8 is not None:
            raise not_utf8 from None
        raise
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    info = from_json(obj)
    head = _head(text_bytes)  # as a reader of the head takes it, whatever follows
    if head is not None and head != (info.state, info.token):
        # A name given twice (perhaps spelled with an escape): a JSON parser keeps the
        # last, the head holds the first, so one reader would call the session free and
        # another stale. fencelock never writes one.
        raise ValueError(f"its head says {head[0].value} with token {head[1]}, its fields "
                         f"{info.state.value} with token {info.token}: a field is given twice")
    return info


def _first_value(text: str, size: int) -> object:
    """The first JSON value in ``text`` (of a sidecar ``size`` bytes long); ValueError
    saying why there is none."""
    try:
        obj, _ = _DECODER.raw_decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except NotJSONError as e:
        raise ValueError(f"not JSON ({e})") from None
    except json.JSONDecodeError as e:
        if size >= MAX_RECORD:
            raise ValueError(f"larger than {MAX_RECORD} bytes") from None
        raise ValueError(f"not JSON ({e.msg.removesuffix(' at')} at offset {e.pos})") from None
    except ValueError:  # Python's own limit on converting long integers, not JSON's
        raise ValueError(f"an integer of over {sys.get_int_max_str_digits()} digits") from None
    return obj


def _field(obj: dict[str, Any], name: str) -> str:
    """``obj``'s field ``name`` for a message on what is wrong with it: "x is missing", or
    "x is" and its value as the record spells it (JSON), cut short."""
    if name not in obj:
        return f"{name} is missing"
    v = obj[name]
    if isinstance(v, dict | list):
        return f"{name} is {'an object' if isinstance(v, dict) else 'an array'}"
    shown = json.dumps(v, ensure_ascii=False)
    return f"{name} is {shown[:40]}{'...' if len(shown) > 40 else ''}"


def _int(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    v = obj.get(name)
    if type(v) is not int or not low <= v <= high:
        raise ValueError(f"{_field(obj, name)}, not an integer in [{low}, {high}]")
    return v


def _str(obj: dict[str, Any], name: str, default: str | None = None) -> str:
    v = obj.get(name, default)
    if not isinstance(v, str):
        raise ValueError(f"{_field(obj, name)}, not a string")
    if len(v) > MAX_TEXT:
        raise ValueError(f"{name} is a string of {len(v)} characters, over {MAX_TEXT}")
    return v


def _float(obj: dict[str, Any], name: str) -> float:
    v = obj.get(name)
    try:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    except OverflowError:  # an integer too large for a float
        pass
    raise ValueError(f"{_field(obj, name)}, not a finite number of seconds")


_STATES = {state.value: state for state in State}
_FENCES = frozenset({"stat", "content"})
_PHASES = {phase.value: phase for phase in Phase}


def from_json(obj: dict[str, Any]) -> HolderInfo:
    """A record's JSON object as a `HolderInfo`; ValueError for the first field that is
    missing or malformed. Built with `info_shell` and `completed` (a scan decodes
    thousands), not the frozen dataclass's slower keyword ``__init__``."""
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"{_field(obj, 'version')}; this fencelock reads version {VERSION}")
    v = obj.get("state")
    state = _STATES.get(v) if type(v) is str else None
    if state is None:
        raise ValueError(f'{_field(obj, "state")}, not "held" or "released"')
    v = obj.get("phase", "write")
    phase = _PHASES.get(v) if type(v) is str else None
    if phase is None:
        raise ValueError(f'{_field(obj, "phase")}, not "write" or "prompt"')
    prev_obj = obj.get("previous")
    previous = None
    if prev_obj is not None:
        if not isinstance(prev_obj, dict):
            raise ValueError("previous is not an object")
        try:
            previous = PreviousHolder(
                pid=_int(prev_obj, "pid", 1, _MAX_PID),
                host=_str(prev_obj, "host"),
                lane=_str(prev_obj, "lane"),
                run_id=_str(prev_obj, "run_id"),
                token=_int(prev_obj, "token", 0, MAX_TOKEN),
            )
        except ValueError as e:  # named as the record's field, not the top-level one
            raise ValueError(f"previous.{e}") from None
    # Checked in the record's field order, so the first bad field is the one reported.
    session = _str(obj, "session")
    pid = _int(obj, "pid", 1, _MAX_PID)
    host = _str(obj, "host")
    process_start = _str(obj, "process_start", "")
    lane = _str(obj, "lane")
    run_id = _str(obj, "run_id")
    token = _int(obj, "token", 0, MAX_TOKEN)
    acquired_at = _float(obj, "acquired_at")
    heartbeat_at = _float(obj, "heartbeat_at")
    fingerprint = Fingerprint.from_json(obj.get("fingerprint"))
    fence = _str(obj, "fence", "stat")
    if fence not in _FENCES:
        raise ValueError(f'{_field(obj, "fence")}, not "stat" or "content"')
    origin = obj.get("origin")
    if origin is not None:
        origin = _str(obj, "origin")
    shell = info_shell(
        session=session, pid=pid, host=host, process_start=process_start, lane=lane,
        fence=fence, origin=origin, version=version,
        extra={} if _KNOWN.issuperset(obj) else {
            k: v for k, v in obj.items() if k not in _KNOWN
        },
    )
    return completed(
        shell, state, run_id, token, acquired_at, heartbeat_at, phase, fingerprint, previous
    )
