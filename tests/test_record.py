"""The holder record: layout, round trip, and the strict bounded decoder."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pickle
import sys
from typing import Any

import pytest

from fencelock import Fingerprint, HolderInfo, Phase, PreviousHolder, RunCommand, State
from fencelock._record import (
    MAX_RECORD,
    MAX_TOKEN,
    RECORD_HEAD,
    RELEASE_PATCH,
    STATE_OFFSET,
    TOKEN_WIDTH,
    decode,
    peek,
)


def make(**changes: Any) -> HolderInfo:
    return dataclasses.replace(HolderInfo(
        state=State.HELD,
        session="/s/a b\"c.jsonl",
        pid=4242,
        host="host-1",
        process_start="123@boot@ns",
        lane="session:agent:main:telegram:channel:42",
        run_id="abc-1",
        token=7,
        acquired_at=1.25,
        heartbeat_at=2.5,
        phase=Phase.PROMPT,
        fingerprint=Fingerprint(1, 2, 3, 4, 5),
        previous=PreviousHolder(99, "h", "cron", "old-1", 6),
    ), **changes)


def test_round_trip_keeps_every_field() -> None:
    info = make(origin="/s/old.jsonl", fence="content")
    assert decode(info.encode()) == info


def test_record_is_one_plain_json_object_any_language_can_read() -> None:
    obj = json.loads(make().encode())
    assert obj["version"] == 1 and obj["state"] == "held" and obj["token"] == 7
    assert obj["fingerprint"] == {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5}
    assert obj["previous"]["pid"] == 99


def test_release_patch_flips_state_in_place() -> None:
    data = bytearray(make().encode())
    data[STATE_OFFSET : STATE_OFFSET + len(RELEASE_PATCH)] = RELEASE_PATCH
    info = decode(bytes(data))
    assert info is not None and info.state is State.RELEASED and info.token == 7


def test_peek_reads_state_and_token_and_refuses_foreign_layouts() -> None:
    assert peek(make(token=12345).encode()) == (State.HELD, 12345)
    record = make(state=State.RELEASED, phase=Phase.PROMPT, token=MAX_TOKEN).encode()
    for written in (record + b"\n", record + b"\n" + b" " * 40, record):
        assert peek(written) == (State.RELEASED, MAX_TOKEN)
    foreign = json.dumps(make().to_json()).encode()  # valid, but not our layout
    assert peek(foreign) is None
    assert decode(foreign) == make()
    assert peek(make().encode()[:-5]) is None  # torn
    assert peek(make().encode() + b"\n{") is None  # torn, as a longer record's tail
    head = len(RECORD_HEAD[State.HELD, Phase.WRITE])
    good = make(token=7).encode()
    for token_field in (b" 7" + b" " * 18, b"7 7" + b" " * 17, b" " * 20, b"+7" + b" " * 18,
                        b"1" * 20):
        # Not the fixed-width layout, or a token out of range: the full decoder reads it.
        assert peek(good[:head] + token_field + good[head + TOKEN_WIDTH:]) is None


def test_unknown_fields_are_kept() -> None:
    obj = make().to_json()
    obj["future_field"] = {"x": 1}
    obj["counter"] = 123456789012345678901234567890  # a long integer, kept exact
    info = decode(json.dumps(obj).encode())
    kept = {"future_field": {"x": 1}, "counter": 123456789012345678901234567890}
    assert info is not None and info.extra == kept
    again = decode(info.encode())
    assert again is not None and again.extra == kept
    assert b'"counter":123456789012345678901234567890' in info.encode()


@pytest.mark.parametrize(("command", "expected"), [
    ({"pid": 31337, "process_start": "9@boot@ns"}, RunCommand(31337, "9@boot@ns")),
    ({"pid": 31337}, RunCommand(31337, "")),
    (None, None),
    ({"pid": "31337", "process_start": ""}, None),
    ({"pid": 0, "process_start": ""}, None),
    ({"pid": 31337, "process_start": 5}, None),
    ([31337, ""], None),
])
def test_the_run_command_is_an_attribute(command: Any, expected: RunCommand | None) -> None:
    """`fencelock run`'s ``command`` field reads as ``HolderInfo.command`` (None where
    absent or named badly: a record stays readable), and is written back as it was."""
    obj = make().to_json()
    if command is not None:
        obj["command"] = command
    info = decode(json.dumps(obj).encode())
    assert info is not None and info.command == expected
    if expected is not None:
        read = info.command
        assert read is not None and (read.pid, read.process_start) == tuple(expected)
    again = decode(info.encode())
    assert again is not None and again.to_json().get("command") == command


def test_empty_record_is_none_and_trailing_padding_is_ignored() -> None:
    assert decode(b"") is None
    for blank in (b"   \n", b"\0" * 64):  # fencelock never writes these: corrupt, not free
        with pytest.raises(ValueError, match="NULs or spaces"):
            decode(blank)
    assert decode(make().encode() + b"\n" + b" " * 300) == make()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"version":1,"state":"he', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1,2]", "not a JSON object"),
        (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
        (b'{"version":2}', "version is 2"),
        (b'{"version":1,"state":"maybe"}', 'state is "maybe"'),
    ],
)
def test_corrupt_records_raise_value_error(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode(data)


@pytest.mark.parametrize("extra", ['"state":"released"', '"token":99',
                                   '"st\\u0061te":"released"', '"tok\\u0065n":99'],
                         ids=["state", "token", "escaped-state", "escaped-token"])
def test_a_record_that_repeats_a_head_field_is_corrupt_not_what_one_reader_takes(
    extra: str
) -> None:
    """A held record (its head says so) that gives ``state`` or ``token`` again: a JSON
    parser keeps the last value, a fixed-layout reader the head's, so one would call
    the session free and another stale. Corrupt, never free. A takeover's record,
    whose ``previous`` has a token of its own, is no repeat."""
    held = make(state=State.HELD, previous=None).encode()
    assert peek(held + b"\n") == (State.HELD, 7)
    repeated = held[:-1] + b"," + extra.encode() + b"}"
    # Also behind leading blanks, or before bytes past the record (which `peek` declines).
    for data in (repeated, repeated + b"\nx", b"\n " + repeated + b"\n\x01"):
        with pytest.raises(ValueError, match="given twice"):
            decode(data)
    assert decode(make().encode()) == make()  # "token" in previous too: read as before
    assert decode(make(lane="state").encode()) == make(lane="state")  # a value, no key


@pytest.mark.parametrize("pid", [0, -1, 2**63, "12", 1.5, None])
def test_impossible_pids_are_corrupt(pid: object) -> None:
    obj = make().to_json()
    obj["pid"] = pid
    with pytest.raises(ValueError, match="pid"):
        decode(json.dumps(obj).encode())


@pytest.mark.parametrize(("field", "value"), [("pid", 0), ("token", -1), ("lane", 5)])
def test_a_malformed_previous_field_is_named_as_previous(field: str, value: object) -> None:
    """A bad field of ``previous`` is said as ``previous.pid``, not as the record's own
    ``pid`` (which may be fine)."""
    obj = make().to_json()
    obj["previous"] = {"pid": 7, "host": "h", "lane": "l", "run_id": "r", "token": 1,
                       field: value}
    with pytest.raises(ValueError, match=rf"^previous\.{field} is "):
        decode(json.dumps(obj).encode())


def test_oversized_record_is_corrupt_not_free() -> None:
    data = b'{"version":1,"lane":"' + b"x" * MAX_RECORD + b'"}'
    with pytest.raises(ValueError, match="larger than"):
        decode(data)


def test_an_integer_is_refused_from_where_a_double_reader_rounds_it_to_infinity() -> None:
    """From 2**1024 - 2**970 on, a reader that takes numbers as doubles (JSON.parse)
    reads an integer as Infinity; below it, as the largest double: that one is JSON any
    reader takes. (The bound was the largest double itself.)"""
    from fencelock._json import NotJSONError, finite_int

    edge = 2**1024 - 2**970
    for value in (edge - 1, -(edge - 1), int(sys.float_info.max), 2**63, -(2**63)):
        assert finite_int(str(value)) == value
    for value in (edge, -edge, 10**400):
        with pytest.raises(NotJSONError, match="out of range"):
            finite_int(str(value))


@pytest.mark.parametrize("extra", [
    '"x":NaN', '"x":-Infinity', '"x":{"budget":1e400}',
    '"x":{"n":1' + "0" * 400 + "}", '"x":[-1' + "0" * 400 + "]",
])
def test_what_strict_json_readers_refuse_is_corrupt(extra: str) -> None:
    # Python's json would read these (as nan and inf, or a 401-digit int), and a
    # rewrite would carry them on; a reader that takes numbers as doubles reads the
    # integer as Infinity (PROTOCOL 2.4: a number past a double's range).
    data = make().encode()[:-1] + b"," + extra.encode() + b"}"
    with pytest.raises(ValueError, match="not JSON"):
        decode(data)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("fence", "foo", 'fence is "foo"'),
        ("origin", 5, "origin is 5, not a string"),
        ("origin", "o" * 4097, "origin is a string of 4097 characters, over 4096"),
        ("fingerprint", {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5,
                         "tail": "zz"}, "tail is not 32 hex digits"),
    ],
)
def test_malformed_fence_origin_and_tail_are_corrupt(field: str, value: Any, why: str) -> None:
    obj = make().to_json()
    obj[field] = value
    with pytest.raises(ValueError, match=why):
        decode(json.dumps(obj).encode())


def test_unknown_fields_are_written_back_in_utf8_not_escaped() -> None:
    obj = make().to_json()
    obj["note"] = {"ü": "é😀"}
    # "odd" is not valid Unicode (a lone surrogate): escaped, as any such string is.
    text = json.dumps(obj, ensure_ascii=False)[:-1] + r', "odd": "\udc80"}'
    info = decode(text.encode())
    assert info is not None and info.extra["odd"] == "\udc80"
    assert '"note":{"ü":"é😀"}'.encode() in info.encode()
    assert rb'"odd":"\udc80"' in info.encode()
    assert decode(info.encode()) == info


def test_negative_token_and_bad_fingerprint_are_corrupt() -> None:
    obj = make().to_json()
    obj["token"] = -3
    with pytest.raises(ValueError, match="token"):
        decode(json.dumps(obj).encode())
    obj = make().to_json()
    obj["fingerprint"] = {"dev": 1}
    with pytest.raises(ValueError, match="fingerprint"):
        decode(json.dumps(obj).encode())


def test_the_fast_builder_makes_what_the_constructor_makes() -> None:
    import dataclasses

    from fencelock._record import completed, info_shell

    info = make(origin="/s/old.jsonl", fence="content")
    values = [getattr(info, f.name) for f in dataclasses.fields(HolderInfo)]
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(HolderInfo)}
    fixed = ("session", "pid", "host", "process_start", "lane", "fence", "origin", "version",
             "extra")
    # Every field goes to one of the two: a field neither takes is an unexpected keyword
    # or is left over.
    shell = info_shell(**{name: fields.pop(name) for name in fixed})
    rest = list(inspect.signature(completed).parameters)[1:]  # positional, in this order
    built = completed(shell, *(fields.pop(name) for name in rest))
    assert not fields
    assert built == info and hash(built) == hash(info) and repr(built) == repr(info)
    assert type(built) is HolderInfo and pickle.loads(pickle.dumps(built)) == info
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.lane = "other"  # type: ignore[misc]
    assert all(getattr(built, f.name) == v for f, v in zip(dataclasses.fields(HolderInfo), values,
                                                           strict=True))


def test_a_run_id_of_this_process_needs_no_escaping_in_the_record() -> None:
    """A holder encodes its run id with no escaping (`middle_of`): every id it makes
    must read back as itself, as `middle` writes it."""
    from fencelock import _identity, _record

    static = _record.static_part(
        pid=1, host="h\u00e9", process_start="1", session='/s/"x".jsonl', lane="l",
        fence="stat", origin=None, extra={},
    )
    tail = _record.middle_tail(static)
    for _ in range(3):
        run_id = _identity.RUN_IDS.next()
        assert _record.middle_of(run_id, tail) == _record.middle(run_id, static)
        assert json.loads(b"{" + _record.middle_of(run_id, tail)[1:] + b"0}")["run_id"] == run_id
