"""The fence: durable fenced appends, the prompt window, stamps, and the two fences."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SpawnHolder, json_depth_limit, record_of
from marks import needs_linux, needs_proc, needs_regex, needs_root, needs_xattr

from fencelock import (
    STAMP_KEY,
    FenceLockError,
    FenceLockWarning,
    FenceMode,
    ProbeState,
    SessionLock,
    SessionTakeoverError,
    SessionWriteError,
    _fence,
    _fingerprint,
    clear,
    is_coordination_error,
    probe,
    verify,
)
from fencelock._fence import TORN_SUFFIX
from fencelock._tokens import TAIL, largest_token, line_token, trailing_stamp


def lines(session: Path) -> list[Any]:
    return [json.loads(line) for line in session.read_text().splitlines()]


def foreign_append(session: Path, text: str) -> None:
    """A writer outside the protocol, in another process."""
    subprocess.run(
        [sys.executable, "-c", f"open({str(session)!r}, 'a').write({text!r})"], check=True
    )


def test_append_writes_one_json_line_per_call_and_updates_the_record(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"role": "user", "content": "hi\nthere"})
        lock.append('{"role": "assistant", "content": "hello"}')
        rec = probe(session).record
        assert rec is not None and rec.fingerprint is not None
        assert rec.fingerprint.size == session.stat().st_size
        assert rec.fingerprint.ino == session.stat().st_ino
    assert lines(session) == [
        {"role": "user", "content": "hi\nthere"},
        {"role": "assistant", "content": "hello"},
    ]


def test_multi_line_string_is_refused_before_writing(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"a": 1})
        size = session.stat().st_size
        with pytest.raises(FenceLockError, match="one line"):
            lock.append('{"a": 1}\n{"b": 2}')
        assert session.stat().st_size == size
        lock.append({"b": 2})  # the fence still holds after a refused entry
    assert lines(session) == [{"a": 1}, {"b": 2}]


def test_new_session_file_is_created_0600(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"a": 1})
    assert session.stat().st_mode & 0o777 == 0o600


def test_torn_tail_is_cut_aside_never_glued(session: Path) -> None:
    session.write_text('{"role": "user"}\n{"role": "assist')  # a crashed writer's tail
    with SessionLock(session) as lock, pytest.warns(FenceLockWarning, match="torn") as caught:
        lock.append({"role": "assistant", "content": "ok"})
    assert caught[0].filename == __file__  # points at the append that found it
    assert str(session) + TORN_SUFFIX in str(caught[0].message)
    assert lines(session) == [{"role": "user"}, {"role": "assistant", "content": "ok"}]
    assert Path(str(session) + TORN_SUFFIX).read_text() == '{"role": "assist\n'
    assert verify(session).ok


def test_every_torn_tail_is_said_under_the_default_filter(session: Path) -> None:
    """Python's default filter shows a warning text once per place in a process's life:
    a second torn tail whose note reads as the first's (the same session, as long a
    fragment) is said too, and the second fragment is kept aside as the first was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(2):
            with open(session, "a") as f:
                f.write('{"role": "assist')
            with SessionLock(session) as lock:
                lock.append({"role": "assistant"})
    assert [w.category for w in caught] == [FenceLockWarning, FenceLockWarning], caught
    assert str(caught[0].message) == str(caught[1].message)
    assert Path(str(session) + TORN_SUFFIX).read_text() == '{"role": "assist\n' * 2


@pytest.mark.parametrize("before", ["", '{"torn": 0}\n', "xFRAGMENT\n"],
                         ids=["new", "after-another", "after-one-ending-like-it"])
@pytest.mark.parametrize("extra", [0, 3 * 1024 * 1024 + 5], ids=["small", "several-MiB"])
def test_a_torn_tail_that_cannot_be_cut_is_kept_aside_once(
    session: Path, before: str, extra: int
) -> None:
    """An append that kept the torn tail aside but could not cut it from the session
    (an append-only file: EPERM) fails; the next one does not keep a second copy, and
    once the cut can be made it is made, still with one copy kept (and only then said
    to be moved). Also a fragment of
    several MiB (a pasted file's line): a gateway retrying its append must not add a
    copy of it each time."""
    from conftest import on_entry

    fragment = '{"role": "assist' + "x" * extra
    before = before.replace("FRAGMENT", fragment)
    torn = Path(str(session) + TORN_SUFFIX)
    if before:
        torn.write_text(before)
    session.write_text('{"role": "user"}\n' + fragment)
    os.utime(session, ns=(1, 1))  # torn long before (a coarse clock would tie otherwise)

    def refuse() -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    with SessionLock(session) as lock:
        for _ in range(2):
            with on_entry(os.ftruncate, refuse) as ran, \
                    warnings.catch_warnings(record=True) as said, \
                    pytest.raises(SessionWriteError, match="a copy is already in"):
                warnings.simplefilter("always")
                lock.append({"role": "assistant", "content": "ok"})
            assert ran
            # Not cut: no word of a line "moved" that is still in the session.
            assert not [w for w in said if "moved it" in str(w.message)], said
        with pytest.warns(FenceLockWarning, match="torn"):
            lock.append({"role": "assistant", "content": "ok"})
    assert lines(session) == [{"role": "user"}, {"role": "assistant", "content": "ok"}]
    assert torn.read_text() == before + fragment + "\n"


@pytest.mark.parametrize("clock", ["later", "same-tick"])
def test_the_same_bytes_torn_again_later_are_kept_again(session: Path, clock: str) -> None:
    """A tail torn, cut aside, and later the same bytes torn again by another crash:
    the session was written since the first was kept, so the second is kept too; also
    where a coarse clock gives both files the same time (a tie keeps it again)."""
    torn = Path(str(session) + TORN_SUFFIX)
    for _ in range(2):
        with open(session, "a") as f:
            f.write('{"role": "assist')  # a writer killed mid-append
        if torn.exists():  # kept long before this crash, or in the same clock tick
            os.utime(torn, ns=(1, 1) if clock == "later" else (
                session.stat().st_atime_ns, session.stat().st_mtime_ns))
        with SessionLock(session) as lock, pytest.warns(FenceLockWarning, match="torn"):
            lock.append({"role": "assistant", "content": "ok"})
    assert torn.read_text() == '{"role": "assist\n' * 2
    assert lines(session) == [{"role": "assistant", "content": "ok"}] * 2


@pytest.mark.parametrize("first_line", [True, False])
def test_a_torn_tail_longer_than_the_search_step_is_cut_aside_whole(
    session: Path, first_line: bool
) -> None:
    # A writer killed while writing an entry of several MiB leaves more of it than one
    # read looks at: the next run still finds where it starts and sets it all aside.
    head = '{"role": "user"}\n' if first_line else ""
    fragment = '{"role": "tool", "content": "' + "x" * (5 * 1024 * 1024 // 2) + "y" * (
        5 * 1024 * 1024 // 2)
    session.write_text(head + fragment)
    with SessionLock(session) as lock, pytest.warns(FenceLockWarning, match="torn"):
        lock.append({"role": "assistant", "content": "ok"})
    expected = [{"role": "user"}] if first_line else []
    assert lines(session) == [*expected, {"role": "assistant", "content": "ok"}]
    assert Path(str(session) + TORN_SUFFIX).read_text() == fragment + "\n"
    assert verify(session).ok


@pytest.mark.parametrize("hole", [0, 64 * 1024 * 1024], ids=["nuls", "nuls-and-a-hole"])
def test_a_torn_tail_of_nuls_is_kept_aside_without_taking_their_space(
    session: Path, hole: int
) -> None:
    """A crash (or a file extended past its end) can leave a torn tail of NULs, or a
    hole: S.torn holds the same bytes, but is extended over them rather than written,
    so that a tail of gigabytes does not fill the disk at every append."""
    nuls = 16 * 1024 * 1024 + 7
    with open(session, "wb") as f:
        f.write(b'{"role": "user"}\n{"role": "tool", "content": "')
        f.write(b"\0" * nuls)
        f.seek(hole, os.SEEK_CUR)
        f.write(b"end")
    fragment = session.read_bytes()[len(b'{"role": "user"}\n'):]
    with SessionLock(session) as lock, pytest.warns(FenceLockWarning, match="torn"):
        lock.append({"role": "assistant", "content": "ok"})
    assert lines(session) == [{"role": "user"}, {"role": "assistant", "content": "ok"}]
    torn = Path(str(session) + TORN_SUFFIX)
    assert torn.read_bytes() == fragment + b"\n"
    # Chunks holding other bytes too are written whole (two here, of 1 MiB at most).
    assert os.stat(torn).st_blocks * 512 < 4 * 1024 * 1024, "the NULs were written out"


@needs_root
@needs_linux
def test_an_append_only_torn_file_gets_the_nuls_written(session: Path) -> None:
    """S.torn marked append-only (chattr +a) cannot be extended over a run of NULs: they
    are written out, as any fragment is, rather than every append failing on it."""
    from conftest import append_only

    fragment = b'{"b":' + b"\0" * (2 * 1024 * 1024) + b"2"
    session.write_bytes(b'{"a":1}\n' + fragment)
    torn = Path(str(session) + TORN_SUFFIX)
    torn.write_bytes(b'{"earlier":"fragment"}\n')
    with append_only(torn):
        for turn in range(2):
            with SessionLock(session) as lock, warnings.catch_warnings():
                warnings.simplefilter("ignore", FenceLockWarning)
                lock.append({"turn": turn})
    assert lines(session) == [{"a": 1}, {"turn": 0}, {"turn": 1}]
    assert torn.read_bytes() == b'{"earlier":"fragment"}\n' + fragment + b"\n"


def test_a_session_cut_short_while_its_torn_tail_is_copied_gets_no_nuls_kept(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer outside the protocol cuts the session while the append copies its torn
    tail (a fragment, then a hole) to S.torn: the copy ends where the file now ends,
    never padding S.torn with NULs the session no longer holds; the append reports the
    takeover."""
    from fencelock import _platform

    head = b'{"a":1}\n'
    with open(session, "wb") as f:
        f.write(head + b"x" * (1024 * 1024))
        f.seek(3 * 1024 * 1024, os.SEEK_CUR)
        f.write(b"y")
    real = _platform.pread

    def cut_after_the_first_chunk(fd: int, n: int, at: int) -> bytes:
        data = real(fd, n, at)
        if at == len(head) and n == 1024 * 1024:
            os.truncate(session, len(head) + 1000)
        return data

    with SessionLock(session) as lock:
        monkeypatch.setattr(_platform, "pread", cut_after_the_first_chunk)
        with pytest.raises(SessionTakeoverError):
            lock.append({"n": 1})
    assert b"\0" not in Path(str(session) + TORN_SUFFIX).read_bytes()


def test_a_line_longer_than_one_read_returns_is_read_back_whole(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One read returns at most 2 GiB on Linux (0x7ffff000 bytes), and any read may
    # legally return less than asked: the check that the line landed whole reads on,
    # instead of calling a short read a write by someone else.
    from fencelock import _platform

    real = _platform.pread

    def capped(fd: int, n: int, offset: int) -> bytes:
        return real(fd, min(n, 1000), offset)

    session.write_text('{"role": "user"}\n')
    entry = {"role": "tool", "content": "x" * 5000}
    with SessionLock(session) as lock:
        monkeypatch.setattr(_platform, "pread", capped)
        lock.append(entry)
        lock.append(entry)
        monkeypatch.undo()
    assert lines(session) == [{"role": "user"}, entry, entry]
    assert verify(session).ok


def test_a_read_back_that_meets_the_end_of_the_file_does_not_hold_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file cut by another writer between the write and its check ends before the
    # line does: not the line (and no endless reading of nothing), in one read or many.
    from fencelock._fence import _holds

    path = tmp_path / "cut"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        for chunk in (1 << 20, 4):
            monkeypatch.setattr(_fence, "_CHUNK", chunk)
            assert _holds(fd, b"3456789", 3)
            assert not _holds(fd, b"3456789A", 3)
            assert not _holds(fd, b"3456780", 3)
            assert not _holds(fd, b"x", 10)
    finally:
        os.close(fd)


def test_a_line_written_while_the_torn_tail_is_set_aside_is_not_cut_with_it(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session.write_bytes(b'{"a": 1}\n{"torn":')
    real = _fence._write

    def foreign_line_meanwhile(fd: int, data: Any) -> int:
        if bytes(data).startswith(b'{"torn":'):  # the fragment, on its way to .torn
            with open(session, "ab") as f:
                f.write(b'{"foreign": "mirror reply"}\n')
        return real(fd, data)

    monkeypatch.setattr(_fence, "_write", foreign_line_meanwhile)
    with SessionLock(session) as lock, pytest.raises(SessionTakeoverError) as err:
        lock.append({"n": 1})
    assert not err.value.stored
    # Nothing cut, nothing added: the foreign line stays where its writer put it.
    assert session.read_bytes() == b'{"a": 1}\n{"torn":{"foreign": "mirror reply"}\n'


@pytest.mark.parametrize("what", ["symlink", "fifo", "directory"])
@pytest.mark.parametrize("where", ["prompt_window", "append", "verify_fence"])
def test_a_session_replaced_by_what_no_run_writes_to_is_a_takeover(
    session: Path, what: str, where: str
) -> None:
    """A coordination error, as for any replacement: a model-fallback chain must stop,
    not retry as it would on a plain error. It says what replaced the file (not only an
    inode and a size) and that fencelock writes to no such thing."""
    with SessionLock(session) as lock:
        lock.append({"n": 1})
        copy = session.with_name("copy.jsonl")
        os.replace(session, copy)
        if what == "symlink":
            os.symlink(copy, session)
        elif what == "fifo":
            os.mkfifo(session)
        else:
            session.mkdir()
        with pytest.raises(SessionTakeoverError) as err:
            if where == "prompt_window":
                with lock.prompt_window():
                    pass
            elif where == "append":
                lock.append({"n": 2})
            else:
                lock.verify_fence()
        assert is_coordination_error(err.value)
        said = {"symlink": "a symlink", "fifo": "a FIFO", "directory": "a directory"}[what]
        assert err.value.found == said
        assert f"replaced by {said} outside this run" in str(err.value)
        assert "Put the session's file back" in str(err.value)
        again = pickle.loads(pickle.dumps(err.value))
        assert again.found == said and str(again) == str(err.value)
        with pytest.raises(SessionTakeoverError) as sticky:  # the same takeover, again
            lock.append({"n": 3})
        assert sticky.value.found == said
    assert copy.read_bytes() == b'{"n":1}\n'  # nothing written through the link


def test_short_writes_are_looped(session: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    calls = []

    def short(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real(fd, bytes(data[:7]))

    monkeypatch.setattr(_fence, "_write", short)
    with SessionLock(session) as lock:
        lock.append({"content": "x" * 40})
    assert len(calls) > 3
    assert lines(session) == [{"content": "x" * 40}]


def test_fsync_error_is_raised_not_retried(session: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    with SessionLock(session) as lock:
        lock.append({"a": 1})
        monkeypatch.setattr(_fence, "_fsync", failing)
        with pytest.raises(SessionWriteError, match="fsync failed: Input/output error") as err:
            lock.append({"b": 2})
        assert err.value.session == str(session) and len(calls) == 1
        monkeypatch.undo()
        lock.append({"c": 3})  # the failed line was taken back; the fence still holds
    assert lines(session) == [{"a": 1}, {"c": 3}]


def _filling_disk(room: int) -> Callable[[int, Any], int]:
    """A `_fence._write` for a disk with ``room`` bytes left: short writes until it is
    full, then ENOSPC."""
    real = os.write
    budget = [room]

    def filling(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    return filling


def test_enospc_mid_line_leaves_no_partial_line(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    filling = _filling_disk(10)

    with SessionLock(session) as lock:
        lock.append({"a": 1})
        monkeypatch.setattr(_fence, "_write", filling)
        with pytest.raises(SessionWriteError, match="No space left"):
            lock.append({"content": "x" * 100})
        monkeypatch.undo()
        lock.append({"b": 2})
    assert lines(session) == [{"a": 1}, {"b": 2}]
    assert verify(session).ok


def test_foreign_append_in_prompt_window_raises_takeover(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"role": "user"})
        with pytest.raises(SessionTakeoverError) as err, lock.prompt_window():
            assert record_of(session).phase == "prompt"
            foreign_append(session, '{"role": "intruder"}\n')
        assert err.value.session == str(session)
        assert err.value.expected is not None and err.value.actual is not None
        assert err.value.actual.size > err.value.expected.size
        assert lock.held  # the holder is still held; the caller decides what to do
        assert record_of(session).phase == "write"


def test_replace_during_prompt_window_raises_takeover(session: Path, tmp_path: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"role": "user"})
        with pytest.raises(SessionTakeoverError) as err, lock.prompt_window():
            other = tmp_path / "other.jsonl"
            other.write_text(session.read_text())
            os.replace(other, session)
        assert err.value.expected is not None and err.value.actual is not None
        assert err.value.expected.ino != err.value.actual.ino


def _cycle() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


BAD_ENTRIES: dict[str, Any] = {
    "nan": {"x": float("nan")},
    "infinity": {"x": float("-inf")},
    "a-set": {"x": {1, 2}},
    "a-cycle": _cycle(),
    "lone-surrogate": {"name": "caf\udcff"},
    "lone-surrogate-str": '{"name": "caf\udcff"}',
    "lone-surrogate-escaped": '{"name": "caf\\udcff"}',  # as text: a backslash escape
    "text-not-json": "hello",
    "text-cut-short": '{"role": "user", "content": "hi"',
    "text-nan": '{"x": NaN}',
    "text-overflow": '{"x": 1e400}',  # a float past a double's range: Infinity
    "text-big-integer": '{"x": 1' + "0" * 400 + "}",  # read as Infinity by JSON.parse
    "text-two-lines": '{"a": 1}\n{"b": 2}',
    "bytes": b'{"a": 1}',
}


@pytest.mark.parametrize("name", sorted(BAD_ENTRIES))
@pytest.mark.parametrize("stamp", [False, True], ids=["plain", "stamped"])
def test_an_entry_that_is_not_json_is_refused_and_nothing_written(
    session: Path, name: str, stamp: bool
) -> None:
    """NaN and Infinity (which json.dumps writes, and strict JSON readers refuse), and
    what cannot be written at all (a set, a cycle, a lone surrogate), are refused with
    a FenceLockError, not a raw TypeError or UnicodeEncodeError, that names the session
    (a gateway logs many), and the session and the run go on untouched."""
    with SessionLock(session, "a", stamp=stamp) as lock:
        lock.append({"n": 1})
        before = session.read_bytes()
        with pytest.raises(FenceLockError, match="a session entry must be") as exc:
            lock.append(BAD_ENTRIES[name])
        assert "nothing was written" in str(exc.value)
        assert str(exc.value).startswith(f"{session}: "), exc.value
        assert session.read_bytes() == before
        lock.append({"n": 2})
    for line in session.read_bytes().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the session"))
    assert verify(session).ok
    if name in ("text-overflow", "text-big-integer"):  # the reason, not "one line of JSON"
        assert "out of range for a double" in str(exc.value)



@pytest.mark.parametrize("entry", [
    {"role": "user", STAMP_KEY: {"token": 10**9, "run_id": "forged"}},
    '{"role": "user", "_fencelock": {"token": 1000000000, "run_id": "forged"}}',
    {STAMP_KEY: {"token": 10**9, "run_id": "forged"}, "role": "user"},
    '{"_fencelock": {"token": 1000000000, "run_id": "forged"}, "role": "user"}',
], ids=["dict", "text", "dict-key-first", "text-key-first"])
def test_an_unstamped_entry_cannot_carry_a_token_of_its_own(session: Path, entry: Any) -> None:
    """The stamp key is fencelock's: a forged token would pass for a real one (a new
    sidecar starts above the stamps in the session's last lines)."""
    with SessionLock(session, "a") as lock:
        with pytest.raises(FenceLockError, match="reserved key") as exc:
            lock.append(entry)
        assert "nothing was written" in str(exc.value)
        assert not session.exists() or session.read_bytes() == b""
    with SessionLock(session, "b", stamp=True) as lock:
        lock.append(entry)  # stamped: fencelock's own token replaces it
        assert lock.info is not None
        token = lock.info.token
    (line,) = session.read_bytes().splitlines()
    assert json.loads(line)[STAMP_KEY]["token"] == token
    # ... and goes last, where a reader of a line too long to parse looks for it.
    assert list(json.loads(line)) == ["role", STAMP_KEY]
    assert trailing_stamp(line) == (token, json.loads(line)[STAMP_KEY]["run_id"])


@pytest.mark.parametrize("damage", ["append", "truncate", "delete", "create"])
def test_append_refuses_after_foreign_change_and_writes_nothing(session: Path, damage: str) -> None:
    with SessionLock(session) as lock:
        if damage != "create":
            lock.append({"n": 1})
        if damage == "append":
            foreign_append(session, '{"n": "foreign"}\n')
        elif damage == "truncate":
            os.truncate(session, 0)
        elif damage == "delete":
            session.unlink()
        else:
            session.write_text('{"n": "created by someone else"}\n')
        before = session.read_bytes() if session.exists() else None
        with pytest.raises(SessionTakeoverError):
            lock.append({"n": 2})
        with pytest.raises(SessionTakeoverError):
            lock.verify_fence()
        assert (session.read_bytes() if session.exists() else None) == before


def test_quiet_prompt_window_passes_and_verify_fence_returns_the_fingerprint(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"a": 1})
        with lock.prompt_window():
            pass
        fp = lock.verify_fence()
        assert fp is not None and fp.size == session.stat().st_size
        lock.append({"a": 2})


def test_touch_moves_the_heartbeat(session: Path) -> None:
    with SessionLock(session) as lock:
        first = probe(session).record
        assert first is not None
        while time.time() <= first.heartbeat_at:  # a clock that ticks coarsely
            pass
        touched_at = time.time()
        lock.touch()
        second = probe(session).record
        assert second is not None and second.heartbeat_at >= touched_at > first.heartbeat_at
        assert second.run_id == first.run_id and second.token == first.token
        assert second.acquired_at == first.acquired_at


def flap_stat(session: Path) -> None:
    """Report an unchanged file differently: new inode and times, same bytes."""
    copy = session.with_suffix(".copy")
    shutil.copyfile(session, copy)
    os.utime(copy, ns=(1, 1))
    os.replace(copy, session)


def test_stat_fence_cries_wolf_on_flapping_stat_content_fence_does_not(tmp_path: Path) -> None:
    for mode, raises in ((FenceMode.STAT, True), (FenceMode.CONTENT, False)):
        session = tmp_path / f"{mode}.jsonl"
        with SessionLock(session, fence=mode) as lock:
            lock.append({"a": 1})
            if raises:
                with pytest.raises(SessionTakeoverError), lock.prompt_window():
                    flap_stat(session)
            else:
                with lock.prompt_window():
                    flap_stat(session)
                lock.append({"a": 2})


def rewrite_keeping_size_and_mtime(session: Path, scratch: Path) -> None:
    """Overwrite the session in place with other bytes of the same length, then put its
    mtime back, as a careless tool (or `touch -r`) would: only ctime still moves."""
    before = session.stat()
    # ctime comes from the filesystem's clock, which may tick coarsely: wait until it
    # has moved past the fence point's ctime, so the rewrite cannot share its tick.
    while True:
        scratch.write_bytes(b"x")
        if scratch.stat().st_ctime_ns > before.st_ctime_ns:
            break
    data = session.read_bytes()
    with open(session, "r+b") as f:
        f.write(data.replace(b"1", b"9"))
    os.utime(session, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = session.stat()
    assert session.read_bytes() != data
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


@pytest.mark.parametrize("where", ["prompt_window", "append", "verify_fence"])
def test_stat_fence_sees_a_same_size_rewrite_with_mtime_put_back(
    session: Path, tmp_path: Path, where: str
) -> None:
    with SessionLock(session, fence=FenceMode.STAT) as lock:
        lock.append({"a": 1})
        if where == "prompt_window":
            with pytest.raises(SessionTakeoverError) as err, lock.prompt_window():
                rewrite_keeping_size_and_mtime(session, tmp_path / "clock")
        else:
            rewrite_keeping_size_and_mtime(session, tmp_path / "clock")
            before = session.read_bytes()
            with pytest.raises(SessionTakeoverError) as err:
                if where == "append":
                    lock.append({"a": 2})
                else:
                    lock.verify_fence()
            assert session.read_bytes() == before
        assert err.value.expected is not None and err.value.actual is not None
        assert err.value.expected.ctime_ns != err.value.actual.ctime_ns


def tick_past(session: Path, scratch: Path) -> None:
    """Wait until the filesystem's coarse clock, which ctime comes from, is past the
    session's ctime: a change made then moves it."""
    while True:
        scratch.write_bytes(b"x")
        if scratch.stat().st_ctime_ns > session.stat().st_ctime_ns:
            return


def change_metadata(session: Path, change: str, lock: SessionLock) -> None:
    """Move the session's ctime without writing it: what a backup or an operator does."""
    before = session.stat()
    backup, newer = session.with_name("backup.jsonl"), session.with_name("backup.1.jsonl")
    if change == "link":  # a hard-link backup (`cp -al`, `ln`)
        os.link(session, backup)
    elif change == "unlink":  # the oldest such backup rotated away
        os.unlink(backup)
    elif change == "rotation":  # both, between two checks: the link count as it was
        os.unlink(backup)
        os.link(session, newer)
    else:
        session.chmod(0o640 if before.st_mode & 0o777 != 0o640 else 0o600)
        if change == "chmod and back":
            lock.verify_fence()  # taken for no write, and the fence point follows
            session.chmod(before.st_mode & 0o777)  # as at the last append: a change too
    after = session.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


@pytest.mark.parametrize("then", ["append", "release"])
@pytest.mark.parametrize("change", ["link", "unlink", "chmod", "chmod and back"])
@pytest.mark.parametrize("where", ["prompt_window", "append", "verify_fence"])
def test_a_change_of_links_or_permissions_after_an_append_is_no_takeover(
    session: Path, tmp_path: Path, where: str, change: str, then: str
) -> None:
    """A hard link made or removed (a `cp -al` backup, its rotation) or a chmod during a
    run moves the session's ctime, with its link count or mode. The stat fence took
    that for a write, and the run lost its reply. Once the run has appended, the fence
    point keeps the end of its line and the file's metadata: with the metadata moved,
    that end still in place and the token mark where the run left it, it is a change
    of metadata, and the fence point (and the released record) follow it."""
    session.write_text('{"a":0}\n')
    os.link(session, session.with_name("backup.jsonl"))
    if change == "link":
        os.unlink(session.with_name("backup.jsonl"))
    with SessionLock(session, fence=FenceMode.STAT) as lock:
        lock.append({"a": 1})
        tick_past(session, tmp_path / "clock")
        if where == "prompt_window":
            with lock.prompt_window():
                change_metadata(session, change, lock)
        else:
            change_metadata(session, change, lock)
            if where == "verify_fence":
                assert lock.verify_fence() is not None
        if then == "append" or where == "append":  # (the check an append makes)
            lock.append({"a": 2})
            lock.verify_fence()
    expected = [0, 1, 2] if then == "append" or where == "append" else [0, 1]
    assert [json.loads(line)["a"] for line in session.read_text().splitlines()] == expected
    assert probe(session).fence_ok is True  # the released record says the session as it is


def test_links_made_and_removed_between_two_checks_are_still_reported(
    session: Path, tmp_path: Path
) -> None:
    """A rotation that adds a backup's link and removes another between two checks
    leaves the link count as it was: nothing but the ctime tells it from a write whose
    mtime was put back, and the stat fence reports it (docs/DESIGN.md)."""
    session.write_text('{"a":0}\n')
    os.link(session, session.with_name("backup.jsonl"))
    with SessionLock(session, fence=FenceMode.STAT) as lock:
        lock.append({"a": 1})
        tick_past(session, tmp_path / "clock")
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            change_metadata(session, "rotation", lock)


@pytest.mark.parametrize("write", [
    "last line rewritten, mtime put back", "first line rewritten", "line appended, mtime "
    "put back", "copy renamed over", "nothing appended by the run yet",
    "first line rewritten, mtime put back, no chmod", "made anew, mtime put back",
])
def test_a_write_that_comes_with_a_change_of_metadata_is_still_a_takeover(
    session: Path, tmp_path: Path, write: str
) -> None:
    """What tells a change of metadata from a write (`metadata_only`) each has its case:
    the end of the run's last line (rewritten with its mtime put back), the mtime (an
    earlier line rewritten), the size (a line appended with its mtime put back), the
    inode (an identical copy renamed over), and a fence point an append left (none yet:
    nothing to tell by)."""
    session.write_text('{"a":0}\n')
    with SessionLock(session, fence=FenceMode.STAT) as lock:
        if write != "nothing appended by the run yet":
            lock.append({"a": 1})
        tick_past(session, tmp_path / "clock")
        before, data = session.stat(), session.read_bytes()
        back = (before.st_atime_ns, before.st_mtime_ns)
        if write == "last line rewritten, mtime put back":
            session.write_bytes(data.replace(b'{"a":1}', b'{"a":9}'))
            os.utime(session, ns=back)
        elif write == "first line rewritten":
            session.write_bytes(data.replace(b'{"a":0}', b'{"a":8}'))
        elif write == "line appended, mtime put back":
            with open(session, "ab") as f:
                f.write(b'{"x":1}\n')
            os.utime(session, ns=back)
        elif write == "copy renamed over":
            copy = session.with_name("copy.jsonl")
            shutil.copy2(session, copy)  # the same bytes, mtime and token mark
            os.replace(copy, session)
        elif write == "first line rewritten, mtime put back, no chmod":
            session.write_bytes(data.replace(b'{"a":0}', b'{"a":8}'))
            os.utime(session, ns=back)
        elif write == "made anew, mtime put back":  # (ext4 gives it the same inode number)
            session.unlink()
            session.write_bytes(data)  # no token mark on it
            os.utime(session, ns=back)
        if "no chmod" not in write:
            session.chmod(0o640)  # and a change of metadata with it
        with pytest.raises(SessionTakeoverError):
            lock.verify_fence()
        with pytest.raises(SessionTakeoverError):
            lock.append({"a": 2})
    assert b'{"a":2}' not in session.read_bytes()


@pytest.mark.parametrize("mode", [FenceMode.STAT, FenceMode.CONTENT])
def test_both_fences_catch_a_real_foreign_write(session: Path, mode: FenceMode) -> None:
    with SessionLock(session, fence=mode) as lock:
        lock.append({"a": 1})
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            foreign_append(session, '{"b": 2}\n')


def test_content_fence_catches_a_same_size_rewrite(session: Path) -> None:
    with SessionLock(session, fence="content") as lock:
        lock.append({"a": 1})
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            session.write_text(session.read_text().replace("1", "2"))


def test_fence_mode_is_detected_from_the_filesystem() -> None:
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "//nas/share /mnt/agents cifs rw 0 0\n"
        "fs.file.core.windows.net:/x /mnt/azure smb3 rw 0 0\n"
    )
    assert _fingerprint.type_from_mounts("/mnt/agents/sessions", mounts) == "cifs"
    assert _fingerprint.type_from_mounts("/mnt/agentsX", mounts) == "ext4"
    assert _fingerprint.mode_for("cifs") is FenceMode.CONTENT
    assert _fingerprint.mode_for("smb3") is FenceMode.CONTENT
    assert _fingerprint.mode_for("ext4") is FenceMode.STAT
    assert _fingerprint.detect("/tmp")[0] is FenceMode.STAT


def test_stamped_lines_carry_the_token_and_verify_finds_backwards_ones(session: Path) -> None:
    with SessionLock(session, stamp=True) as lock:
        lock.append({"n": 1})
        lock.append({"n": 2}, stamp=False)
    with SessionLock(session) as lock:
        lock.append({"n": 3}, stamp=True)
    entries = lines(session)
    assert entries[0][STAMP_KEY]["token"] == 1 and STAMP_KEY not in entries[1]
    assert entries[2][STAMP_KEY]["token"] == 2
    assert verify(session).ok and verify(session).max_token == 2
    # A write that slipped past a lost lock: an older token after a newer one.
    with open(session, "a") as f:
        f.write(json.dumps({"n": 4, STAMP_KEY: {"token": 1, "run_id": "late"}}) + "\n")
        f.write('{"n": 5, "torn')
    report = verify(session)
    kinds = [(p.line, p.kind) for p in report.problems]
    assert kinds == [(4, "token-backwards"), (5, "torn")]


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ('{"price": 19.990000000000000001, "n": 1e2, "k": 1, "k": 2}',
         '{"price": 19.990000000000000001, "n": 1e2, "k": 1, "k": 2,'),
        (" { } ", "{"),
        ('{"nested": {}}\t', '{"nested": {},'),
    ],
)
def test_a_text_entry_is_stamped_as_it_is_written(session: Path, text: str, written: str) -> None:
    """A str entry is written as it is: stamping adds the key to its text, without
    encoding it again (its numbers, spacing and repeated keys stay the caller's)."""
    with SessionLock(session, stamp=True) as lock:
        lock.append(text)
        token, run_id = lock._token, lock._run_id
    stamp = json.dumps({"token": token, "run_id": run_id}, separators=(",", ":"))
    assert session.read_text() == f'{written}"{STAMP_KEY}":{stamp}}}\n'
    assert verify(session).ok and verify(session).max_token == token


def test_verify_takes_a_first_stamp_of_token_0_as_one_run_s(session: Path) -> None:
    session.write_text(json.dumps({"n": 1, STAMP_KEY: {"token": 0, "run_id": "a"}}) + "\n")
    report = verify(session)
    assert report.ok and report.stamped == 1, report.problems


@pytest.mark.parametrize("line", [b'{"a":"\xed\xa0\x80"}', b'\xef\xbb\xbf{"a":1}',
                                  '{"a":1}'.encode("utf-16")])
def test_verify_reads_lines_as_utf8_strict_readers_do(session: Path, line: bytes) -> None:
    """UTF-8 spelling a lone surrogate, a byte-order mark, UTF-16: Python's json takes
    them from bytes; JSON.parse and other strict readers do not."""
    session.write_bytes(b'{"ok":1}\n' + line + b"\n")
    assert [(p.line, p.kind) for p in verify(session).problems] == [(2, "torn")]


def test_verify_finds_one_token_stamped_by_two_runs(session: Path) -> None:
    with SessionLock(session, stamp=True) as lock:
        lock.append({"n": 1})
        lock.append({"n": 2})  # same run, same token: fine
        assert lock.info is not None
        token = lock.info.token
    with open(session, "a") as f:
        f.write(json.dumps({"n": 3, STAMP_KEY: {"token": token, "run_id": "other"}}) + "\n")
    kinds = [(p.line, p.kind) for p in verify(session).problems]
    assert kinds == [(3, "token-repeated")]


def test_a_stamp_above_the_largest_token_is_reported_and_blocks_nothing(
    session: Path,
) -> None:
    """A token no run was ever given (a line written past fencelock) is named as such;
    it neither makes every later line 'backwards' nor keeps new runs out."""
    huge = {"n": 1, STAMP_KEY: {"token": 10**20, "run_id": "forged"}}
    negative = {"n": 0, STAMP_KEY: {"token": -(10**30), "run_id": "not a stamp"}}
    session.write_text(json.dumps(huge) + "\n" + '{"big": ' + "7" * 5000 + "}\n"
                       + json.dumps(negative) + "\n")
    with SessionLock(session, "next", stamp=True, on_contention="fail") as lock:
        lock.append({"n": 2})
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [
        (1, "token-out-of-range"), (3, "stamp-malformed"),  # a negative token: no stamp
    ]
    assert report.lines == 4 and report.stamped == 2  # the 5000-digit number is JSON


@pytest.mark.parametrize("stamp", [
    {"token": "4", "run_id": "r"}, {"token": 4.0, "run_id": "r"}, {"token": True},
    {"token": -1, "run_id": "r"}, "garbage", {"token": 4}, {"token": 4, "run_id": 7},
    {"token": 4, "run_id": ""},
], ids=["string", "float", "bool", "negative", "not-an-object", "no-run-id",
        "run-id-not-a-string", "empty-run-id"])
def test_the_reserved_key_holding_no_stamp_is_reported(session: Path, stamp: Any) -> None:
    """A line that misuses the reserved key came from outside fencelock: verify names
    it instead of counting the line as unstamped."""
    session.write_text(json.dumps({"n": 1, STAMP_KEY: stamp}) + "\n" + '{"n": 2}\n')
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [(1, "stamp-malformed")]
    assert report.stamped == 0


def test_an_unterminated_last_line_is_torn_only_without_a_live_holder(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A live holder's append in flight is not a torn line; the same bytes left by a
    run that is gone are."""
    session.write_text('{"n": 1}\n{"n": 2, "half')  # left by a run that died mid-append
    h = spawn_holder(session, lane="writing")
    h.acquire()
    # The holder came after it: its record's fence point is past the torn line.
    assert [p.kind for p in verify(session).problems] == ["torn"]
    assert h.call("release") == "released"
    session.write_text('{"n": 1}\n')
    h.acquire()
    with open(session, "a") as f:
        f.write('{"n": 2, "half')  # where the holder's next append would start
    assert verify(session).ok  # an append under way
    assert h.call("release") == "released"
    assert [p.kind for p in verify(session).problems] == ["torn"]


@needs_xattr
@needs_xattr
@pytest.mark.parametrize("appended", ["fresh", "after-an-append", "linked-after-an-append"])
def test_a_run_through_another_name_of_the_session_stops_the_first_and_says_why(
    session: Path, appended: str,
) -> None:
    """A session file with two names (a hard link) has a sidecar for each: runs through
    the two do not exclude each other (docs/DESIGN.md), and the fence stops one. A run through a
    name used for the first time raises the file's token mark, which moves its ctime
    and nothing else: the run holding the first name is stopped at its next append,
    and the error said "expected ino I size N mtime_ns M, found" the very same values."""
    session.write_text('{"n":0}\n')
    other = session.with_name("other.jsonl")
    if appended != "linked-after-an-append":
        os.link(session, other)
    first = SessionLock(session, "first")
    with first:
        assert first.info is not None
        if appended != "fresh":
            first.append({"by": "first"})
        if appended == "linked-after-an-append":
            # The link count moved too: a change of metadata, but for the token mark,
            # which the second name's acquire raised past what the first run's can set.
            os.link(session, other)
        with SessionLock(other, "second") as second:
            assert second.info is not None and second.info.token > first.info.token
            with pytest.raises(SessionTakeoverError) as caught:
                first.append({"by": "first"})  # before anything was written
            second.append({"by": "second"})
    expected, actual = caught.value.expected, caught.value.actual
    assert expected is not None and actual is not None
    assert expected.short() == actual.short() and expected.ctime_ns != actual.ctime_ns
    assert (f"only its ctime_ns {expected.ctime_ns} to {actual.ctime_ns} moved"
            in str(caught.value))
    assert [json.loads(line).get("by") for line in session.read_text().splitlines()] == [
        None, *(["first"] if appended != "fresh" else []), "second"]


def test_token_survives_sidecar_removal(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"a": 1})
    for _ in range(4):
        with SessionLock(session):
            pass
    assert probe(session).token == 5
    removed = clear(session, remove=True)
    assert "removed" in removed.reason and not Path(str(session) + ".holder").exists()
    mark = int(os.getxattr(session, "user.fencelock.token"))
    assert mark >= 5
    with SessionLock(session) as last:
        assert last.info is not None and last.info.token == mark + 1


@pytest.mark.parametrize("how", ["remove", "force", "force, no marker"])
@pytest.mark.parametrize("after", ["rewritten", "missing"])
def test_tokens_never_go_back_after_clear_remove_whatever_happens_to_the_session_file(
    session: Path, after: str, how: str
) -> None:
    """`clear --remove` keeps the token on the session file's mark, but a compaction
    that writes the file anew and renames it over (``sed -i``) leaves a file with no
    mark, and a session with no file has nothing to keep it on: the next run started
    again at token 1. The directory keeps the largest token removed there too. So for
    `clear --force`, which sets a corrupt record aside (its token still legible); where
    that directory's marker cannot be written, it leaves the set-aside marker, which
    has new sidecars read the set-aside copies (not only the mark, which goes)."""
    from fencelock._tokens import REMOVED_MARKER

    if how == "force, no marker":
        (session.parent / REMOVED_MARKER).mkdir()  # not a file: cannot be written
    for n in range(3):
        with SessionLock(session) as lock:
            lock.append({"n": n})
    assert probe(session).token == 3
    if after == "missing":
        session.unlink()
    if how == "remove":
        assert "sidecar removed" in clear(session, remove=True).reason
    else:  # either "force"
        sidecar = Path(str(session) + ".holder")
        sidecar.write_bytes(sidecar.read_bytes()[:60])  # cut short: corrupt
        assert "corrupt record moved to" in clear(session, force=True).reason
    if after == "rewritten":
        new = session.with_name("rewrite.tmp")
        new.write_bytes(session.read_bytes().replace(b'"n"', b'"N"'))
        os.replace(new, session)
        with contextlib.suppress(OSError):  # where there are xattrs: none on the new file
            assert not os.listxattr(session)
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token > 3, lock.info


def test_a_removed_marker_with_another_name_is_not_written_through(
    session: Path, tmp_path: Path
) -> None:
    """A directory's removed-token marker that is a hard link (a dedup or backup tool's,
    `cp -al`, `rsync --link-dest`) is never written, truncated or chmodded: the other
    name's file is not fencelock's. `clear --remove` keeps the sidecar, saying why."""
    from fencelock._tokens import REMOVED_MARKER

    other = tmp_path / "elsewhere" / "secret"
    other.parent.mkdir()
    other.write_bytes(b"not a token\n")
    other.chmod(0o600)
    os.link(other, session.parent / REMOVED_MARKER)
    with SessionLock(session) as lock:
        lock.append({"n": 1})
    found = clear(session, remove=True)
    assert not found.removed and "hard link to a file with 2 names" in found.reason, found
    assert Path(str(session) + ".holder").exists()
    assert other.read_bytes() == b"not a token\n"
    assert stat.S_IMODE(other.stat().st_mode) == 0o600
    # What the message says to do gives the marker a file of its own; clear then works.
    fix = found.reason[found.reason.index("(cp -p") + 1:found.reason.index("), and try")]
    subprocess.run(fix, shell=True, check=True)
    assert clear(session, remove=True).removed
    assert (session.parent / REMOVED_MARKER).read_text() == "1"
    assert other.read_bytes() == b"not a token\n"


def test_a_removed_marker_with_another_name_that_covers_the_token_lets_remove_go_on(
    session: Path, tmp_path: Path
) -> None:
    """Nothing needs writing to a marker that covers the token already: the sidecar is
    removed, the other name's file untouched."""
    from fencelock._tokens import REMOVED_MARKER

    with SessionLock(session) as lock:
        lock.append({"n": 1})
    other = tmp_path / "backup-of-marker"
    other.write_bytes(b"7")  # another session's removal raised it past this one's
    os.link(other, session.parent / REMOVED_MARKER)
    assert clear(session, remove=True).removed
    assert other.read_bytes() == b"7" and other.stat().st_nlink == 2


@needs_linux
def test_a_removed_marker_kept_locked_holds_up_neither_new_sessions_nor_clear(
    session: Path,
) -> None:
    """A process stopped while it held the directory's removed-token marker (a `clear
    --remove` stopped with Ctrl-Z as it wrote it) must not hold every new session of
    the directory in the kernel: a first acquire reads the marker all the same, and
    `clear --remove` keeps the sidecar, saying why."""
    import fcntl

    from fencelock._tokens import REMOVED_MARKER

    with SessionLock(session) as lock:
        lock.append({"n": 1})
    marker = session.parent / REMOVED_MARKER
    marker.write_text("41")
    fd = os.open(marker, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: it conflicts as a process's would
        with SessionLock(session.with_name("other.jsonl"), "new") as new:
            assert new.info is not None and new.info.token == 42
        kept = clear(session, remove=True)
        assert not kept.removed and "is locked by another process" in kept.reason, kept
    finally:
        os.close(fd)
    assert clear(session, remove=True).removed
    assert marker.read_text() == "41"  # above the removed token 1 already: not lowered


def test_tokens_never_go_back_when_a_sidecar_is_deleted_by_hand(session: Path) -> None:
    """No stamps, no clear: the mark the holders keep on the session file is all there
    is, and it is enough; it is written once per RESERVE acquisitions, not each time."""
    from fencelock import _tokens

    issued = []
    for round_ in range(3):
        for _ in range(_tokens.RESERVE + 5):
            with SessionLock(session) as lock:
                assert lock.info is not None
                issued.append(lock.info.token)
                if round_ == 0 and not session.exists():
                    lock.append({"created": True})
        Path(str(session) + ".holder").unlink()
    assert issued == sorted(set(issued)), "a token went back or repeated"


@needs_xattr
def test_tokens_never_go_back_for_a_session_file_another_writer_made_during_the_run(
    session: Path,
) -> None:
    """A ``fencelock run`` that starts before its session file exists, which its command
    then writes, leaves the mark on it as the run ends: a sidecar deleted by hand
    afterwards does not restart the tokens."""
    sidecar = Path(str(session) + ".holder")
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "cron", "--",
         sys.executable, "-c",
         "import os; open(os.environ['FENCELOCK_SESSION'], 'a').write('{\"n\": 1}\\n')"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first = record_of(sidecar).token
    assert session.exists() and first == 1
    sidecar.unlink()
    with SessionLock(session, "b") as lock:
        assert lock.info is not None and lock.info.token > first


@needs_xattr
def test_tokens_never_go_back_for_a_session_file_the_holders_own_writer_made(
    session: Path,
) -> None:
    """A library run that starts before its session file exists, which something other
    than `append` then writes (the gateway's own writer, a mirror lane), leaves the mark
    on it as it releases: a sidecar deleted by hand afterwards does not restart the
    tokens."""
    sidecar = Path(str(session) + ".holder")
    for _ in range(3):
        with SessionLock(session, "a"):
            pass
    with SessionLock(session, "a") as lock:
        assert lock.info is not None
        last = lock.info.token
        with open(session, "a") as f:
            f.write('{"written": "by the gateway itself"}\n')
    assert last == 4
    sidecar.unlink()
    with SessionLock(session, "b") as lock:
        assert lock.info is not None and lock.info.token > last


@needs_xattr
def test_the_release_marks_only_a_regular_file(session: Path) -> None:
    """A session path that became a directory during a run that found none gets no
    mark: fencelock writes to nothing but regular files."""
    with SessionLock(session, "a"):
        session.mkdir()
    assert os.listxattr(session) == []


@needs_xattr
@pytest.mark.parametrize(
    ("mark", "first"),
    [(b"41", 42), (b"1_000", 1), (b" 50\n", 1), (b"+60", 1), (b"0x10", 1), (b"", 1)],
)
def test_only_a_mark_of_ascii_digits_counts(session: Path, mark: bytes, first: int) -> None:
    """The mark is the token in ASCII decimal; anything else is unparsable and reads as
    0, as another language's reader of it would (Python's int() takes more)."""
    session.write_bytes(b"")
    os.setxattr(session, "user.fencelock.token", mark)
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == first


def lose_the_mark(session: Path, how: str) -> None:
    """Take the token mark off the session file: removed ("mark removed"), or the file
    replaced by a copy without it (a compaction, "session rewritten via rename")."""
    if how == "mark removed":
        os.removexattr(session, "user.fencelock.token")
    else:
        copy = session.with_name("compacted.tmp")
        copy.write_bytes(session.read_bytes())
        os.replace(copy, session)


def assert_tokens_go_on_without_the_sidecar(session: Path, last: int) -> None:
    """Remove the sidecar by hand: the next token must still be above ``last``."""
    Path(str(session) + ".holder").unlink()
    with SessionLock(session, lane="after") as after:
        assert after.info is not None and after.info.token > last, last


@needs_xattr
@pytest.mark.parametrize("how", ["mark removed", "session rewritten via rename"])
def test_the_mark_is_read_anew_not_trusted_from_memory(session: Path, how: str) -> None:
    """The session file's mark can vanish under a long-lived process (removed by hand,
    or the file replaced by a copy without it): the next holder must notice and write
    it again, or a later sidecar removal restarts the tokens."""
    with SessionLock(session) as lock:
        lock.append({"n": 0})
    for _ in range(3):
        with SessionLock(session):
            pass
    lose_the_mark(session, how)
    with SessionLock(session, on_contention="fail") as lock:
        assert lock.info is not None
        last = lock.info.token
    assert_tokens_go_on_without_the_sidecar(session, last)


def test_tokens_do_not_repeat_after_corrupt_records_are_set_aside(session: Path) -> None:
    sidecar = Path(str(session) + ".holder")
    with SessionLock(session) as lock:
        lock.append({"a": 1})
    tokens = []
    for _ in range(3):
        with SessionLock(session) as lock:
            assert lock.info is not None
            tokens.append(lock.info.token)
        sidecar.write_bytes(b"\0" * 100)  # corrupt, token illegible
        clear(session, force=True)
    for aside in session.parent.glob(sidecar.name + ".corrupt-*"):
        aside.unlink()  # as the error message for too many copies suggests
    with SessionLock(session) as lock:
        assert lock.info is not None
        tokens.append(lock.info.token)
    assert tokens == sorted(set(tokens))


@needs_xattr
@pytest.mark.parametrize("size", [10, 100_000], ids=["short-lines", "last-line-over-64k"])
def test_token_continues_from_stamps_when_sidecar_deleted_by_hand(
    session: Path, size: int
) -> None:
    """The floor counts the stamp of a last line that starts before the session's last
    64 KiB too (a long tool output): its stamp is at its end."""
    for _ in range(3):
        with SessionLock(session, stamp=True) as lock:
            lock.append({"a": 1, "out": "z" * size})
    Path(str(session) + ".holder").unlink()
    os.removexattr(session, "user.fencelock.token") if "user.fencelock.token" in os.listxattr(
        session
    ) else None
    with SessionLock(session) as last:
        assert last.info is not None and last.info.token == 4


def _stamped(token: object, run: str = "r1", **extra: Any) -> bytes:
    return json.dumps({**extra, STAMP_KEY: {"token": token, "run_id": run}},
                      separators=(",", ":")).encode()


_ODD_LINES = [
    # The largest stamp as written, but nested in the entry: the line counts for its own.
    b'{"copy":' + _stamped(9_000) + b"," + _stamped(5)[1:],
    # The key spelled with an escape, after one as written: a parse takes the last.
    _stamped(6)[:-1] + b',"\\u005ffencelock":{"token":8000,"run_id":"r"}}',
    _stamped(7)[:-1] + b',"_fenc\\u0065lock":{"token":8001,"run_id":"r"}}',
    # Spaces in the stamp, a second token in it, a run id with an escape.
    b'{"_fencelock": {"token": 8002, "run_id": "r"}}',
    b'{"_fencelock":{"token":3,"run_id":"r","token":8003}}',
    b'{"_fencelock":{"token":8004,"run_id":"a\\"b"}}',
    # Not JSON, its stamp at its end (read from there); leading zeros; past the limit.
    b'{"a": nope,' + _stamped(8005)[1:],
    b'{"_fencelock":{"token":08006,"run_id":"r"}}',
    _stamped(2**63),
    b'{"_fencelock":{"token":' + b"9" * 5000 + b',"run_id":"r"}}',
    # The key's name in text, in a run id, or as a longer key.
    b'{"text":"_fencelock","n":1}',
    b'{"__fencelock":{"token":8007,"run_id":"r"}}',
    _stamped(8008, run="_fencelock"),
    b'{"content":"caf\\u00e9",' + _stamped(11)[1:],
    b"[1, 2]",
    b"",
    # UTF-16 and UTF-32, which a parse decodes too (a NUL or a BOM tells it).
    '{"_fencelock":{"token":8009,"run_id":"r"},"t":"\u755c"}'.encode("utf-16-le"),
    '{"_fencelock":{"token":8010,"run_id":"r"}}'.encode("utf-16"),
    '{"_fencelock":{"token":8011,"run_id":"r"}}'.encode("utf-32-be"),
]


@pytest.mark.parametrize("seed", range(40))
def test_the_largest_stamp_in_a_session_s_tail_is_what_parsing_every_line_finds(
    seed: int,
) -> None:
    """The etcd store's floor reads it at each acquire: it parses only the line with the
    largest stamp as fencelock writes it, and must find what a parse of every line finds,
    whatever else the lines hold."""
    import random

    rng = random.Random(seed)
    lines = []
    for n in range(rng.randrange(0, 60)):
        pick = rng.random()
        if pick < 0.7:
            text = "x" * rng.randrange(80)
            lines.append(_stamped(rng.randrange(0, 10_000), run=f"r{n}", text=text))
        elif pick < 0.85:
            lines.append(json.dumps({"text": "y" * rng.randrange(80)}).encode())
        else:
            lines.append(rng.choice(_ODD_LINES))
    tail = b"\n".join(lines) + b"\n" * rng.randrange(2)
    # The window may begin inside a line (the session is longer than it).
    tail = tail[rng.randrange(len(tail) // 3 + 1):][-TAIL:]
    assert largest_token(tail) == max(line_token(line) for line in tail.split(b"\n"))


@pytest.mark.parametrize("odd", _ODD_LINES, ids=range(len(_ODD_LINES)))
def test_a_line_a_stamp_as_written_does_not_bound_is_parsed(odd: bytes) -> None:
    tail = b"\n".join([_stamped(4), _stamped(9), odd, _stamped(10)[1:], b""])
    assert largest_token(tail) == max(line_token(line) for line in tail.split(b"\n"))


def test_holders_own_append_inside_the_prompt_window_is_no_takeover(session: Path) -> None:
    with SessionLock(session) as lock:
        lock.append({"role": "user"})
        with lock.prompt_window():
            lock.append({"role": "tool", "content": "progress"})
        lock.append({"role": "assistant"})
    assert [e["role"] for e in lines(session)] == ["user", "tool", "assistant"]


def _during_the_next_append(monkeypatch: pytest.MonkeyPatch, before_the_write: bool,
                            intrude: Callable[[], object]) -> None:
    """Run ``intrude`` (a program outside the protocol) inside the next append: between
    its fence check and its write, or between its write and its fsync."""
    real_fsync, real_write = _fence._fsync, _fence._write

    def write_after(fd: int, data: memoryview) -> int:
        intrude()
        return real_write(fd, data)

    def fsync_after(fd: int) -> None:
        intrude()
        real_fsync(fd)

    if before_the_write:
        monkeypatch.setattr(_fence, "_write", write_after)
    else:
        monkeypatch.setattr(_fence, "_fsync", fsync_after)


@pytest.mark.parametrize("when", ["before our write", "after our write", "cutting ours"])
def test_a_foreign_write_during_the_append_is_not_absorbed(
    session: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    intruder = b'{"intruder": 1}\n'

    def intrude() -> None:
        with open(session, "ab") as f:
            if when == "cutting ours":
                f.truncate(len(b'{"n":1}\n'))
            f.write(intruder)

    with SessionLock(session) as lock:
        lock.append({"n": 1})
        _during_the_next_append(monkeypatch, when == "before our write", intrude)
        with pytest.raises(SessionTakeoverError) as caught:
            lock.append({"n": 2})
        monkeypatch.undo()
        with pytest.raises(SessionTakeoverError):  # the run's fence point did not move
            lock.append({"n": 3})
    ours = b'{"n":2}\n'
    data = session.read_bytes()
    expected = {
        "before our write": b'{"n":1}\n' + intruder + ours,
        "after our write": b'{"n":1}\n' + ours + intruder,
        "cutting ours": b'{"n":1}\n' + intruder,
    }[when]
    assert data == expected
    # The caller is told whether the line it could not append cleanly is in the file.
    assert caught.value.stored is (ours in data)
    assert ("in the file all the same" in str(caught.value)) is caught.value.stored


def test_failed_directory_fsync_says_the_line_is_stored(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync
    calls = []

    def dir_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the session file's fsync passes, the directory's fails
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    with SessionLock(session) as lock:
        monkeypatch.setattr(_fence, "_fsync", dir_fails)
        with pytest.raises(SessionWriteError, match="is in the session") as err:
            lock.append({"n": 1})
        assert err.value.stored
        lock.append({"n": 2})  # the holder's own line is its fence point: no takeover
    assert lines(session) == [{"n": 1}, {"n": 2}]


_TOO_LARGE_TO_PARSE = """
import resource, sys
from fencelock import FenceLockError, SessionLock
if sys.argv[2] == "objects":
    entry = '[' + '{},' * 4_000_000 + '{}]'  # 12 MB of text, hundreds of MB once parsed
elif sys.argv[2] == "escape":  # the parsed entry is encoded again for lone surrogates
    entry = '{"k":"\\\\u0041' + 'A' * 100_000_000 + '"}'
else:  # stamped: the text is copied to put the stamp in
    entry = '{"k":"' + 'A' * 100_000_000 + '"}'
with SessionLock(sys.argv[1], stamp=sys.argv[2] == "stamped") as lock:
    lock.append({"n": 1})
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 150 * 1024 * 1024, hard))
    try:
        lock.append(entry)
        print("not raised")
    except FenceLockError as e:
        print("too large" in str(e) and "nothing was written" in str(e))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    lock.append({"n": 2})
"""


@needs_proc
@pytest.mark.parametrize("kind", ["objects", "escape", "stamped"])
def test_an_entry_too_large_to_check_in_memory_is_refused_clearly(
    session: Path, kind: str
) -> None:
    """A text entry is parsed to check it, which takes many times its size: where that
    does not fit, the append says so and writes nothing (no bare MemoryError from the
    JSON parser). In a process of its own, with its address space capped."""
    done = subprocess.run([sys.executable, "-c", _TOO_LARGE_TO_PARSE, str(session), kind],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr
    assert [{k: v for k, v in line.items() if k != STAMP_KEY} for line in lines(session)] \
        == [{"n": 1}, {"n": 2}]


_NO_DESCRIPTOR_FOR_THE_DIRECTORY = """
import os, resource, sys
from fencelock import SessionLock, SessionWriteError
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
with SessionLock(sys.argv[1]) as lock:
    lowest = os.dup(0)  # the session file gets this number, its directory the next
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + 1, hard))
    try:
        lock.append({"n": 1})
        print("not raised")
    except SessionWriteError as e:
        print("ulimit -n" in str(e), e.stored)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    lock.append({"n": 2})
"""


def test_no_descriptor_left_for_the_directory_s_fsync_is_said(session: Path) -> None:
    """The descriptor limit reached just as an append that made the session file opens
    its directory for the fsync that makes the new name durable (EMFILE): said, as a
    failed fsync of the directory is (the line is in the session), not skipped as on a
    filesystem that cannot open directories. (In a process of its own: another thread
    of this one that closes a descriptor meanwhile would leave the directory one.)"""
    done = subprocess.run([sys.executable, "-c", _NO_DESCRIPTOR_FOR_THE_DIRECTORY,
                           str(session)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout) == (0, "True True\n"), done.stderr
    assert lines(session) == [{"n": 1}, {"n": 2}]


def test_session_with_an_mtime_before_1970_works(session: Path) -> None:
    session.write_text('{"n": 0}\n')
    os.utime(session, ns=(-10**9, -10**9))
    with SessionLock(session):
        fingerprint = record_of(session).fingerprint
        assert fingerprint is not None and fingerprint.mtime_ns < 0
    assert probe(session).state == "free"
    with SessionLock(session) as lock:
        lock.append({"n": 1})


def test_token_continues_after_a_corrupt_record_is_set_aside(session: Path) -> None:
    for _ in range(5):
        with SessionLock(session):
            pass
    sidecar = Path(str(session) + ".holder")
    sidecar.write_bytes(sidecar.read_bytes()[:-30])  # torn: corrupt, token still legible
    clear(session, force=True)
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 6


def test_a_number_too_long_for_a_token_is_not_read_as_one_in_a_corrupt_record(
    session: Path,
) -> None:
    """A corrupt record's tokens are read from its text: a number with more digits than
    a token can have is part of the corruption, not a token of its first 19 digits."""
    for _ in range(7):
        with SessionLock(session):
            pass
    sidecar = Path(str(session) + ".holder")
    sidecar.write_bytes(b'{"token": 7, "previous": {"token": 10000000000000000000')
    clear(session, force=True)
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 8


@needs_xattr
def test_set_aside_raises_the_session_mark_to_the_corrupt_records_token(
    session: Path,
) -> None:
    """The set-aside copy is not searched where the session file can keep the token:
    clear --force raises the session's mark to the token legible in the record."""
    with SessionLock(session) as lock:
        lock.append({"a": 1})
    for _ in range(4):
        with SessionLock(session):
            pass
    os.removexattr(session, "user.fencelock.token")  # only the record knows token 5 now
    sidecar = Path(str(session) + ".holder")
    sidecar.write_bytes(sidecar.read_bytes()[:-30])  # torn: corrupt, token still legible
    clear(session, force=True)
    assert not (session.parent / ".fencelock-set-aside").exists()
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 6


def test_new_sidecars_search_no_set_aside_copies_without_the_marker(session: Path) -> None:
    """A new session's first acquire does not read the whole directory: copies are
    only searched where a set-aside left its token nowhere else."""
    Path(str(session) + ".holder.corrupt-planted").write_bytes(b'{"token":500}')
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 1
    (session.parent / ".fencelock-set-aside").touch()
    Path(str(session) + ".holder").unlink()
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 501


def test_a_failed_fsync_whose_line_cannot_be_taken_back_says_it_may_be_stored(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync fails, and so does the cut that takes the line back (a filesystem that
    turned read-only after the I/O error): the error cannot say "not stored" (the line
    is in the file for every reader), so ``stored`` is None and the message says to read
    the session first; the fence point follows the file, so the run's next append is not
    taken for a takeover."""

    def eio(fd: int) -> None:
        monkeypatch.setattr(os, "ftruncate", cannot_cut)
        raise OSError(errno.EIO, "Input/output error")

    def cannot_cut(fd: int, length: int) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with SessionLock(session) as lock:
        lock.append({"n": 1})
        monkeypatch.setattr(_fence, "_fsync", eio)
        with pytest.raises(SessionWriteError) as exc:
            lock.append({"n": 2})
        assert exc.value.stored is None and exc.value.kept is not None
        assert "may be in the session" in str(exc.value)
        assert "append it again once" not in str(exc.value)
        monkeypatch.undo()
        lock.append({"n": 3})
    assert [e["n"] for e in lines(session)] == [1, 2, 3]


def test_a_failed_append_never_cuts_off_a_foreign_line(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write fails after another writer appended: taking back our partial line by
    truncation would delete theirs. It is a takeover; the file is left alone."""
    foreign = b'{"who": "someone else"}\n'

    def foreign_then_enospc(fd: int, data: Any) -> int:
        other = os.open(session, os.O_WRONLY | os.O_APPEND)
        os.write(other, foreign)
        os.close(other)
        raise OSError(errno.ENOSPC, "No space left on device")

    with SessionLock(session) as lock:
        lock.append({"n": 1})
        monkeypatch.setattr(_fence, "_write", foreign_then_enospc)
        with pytest.raises(SessionTakeoverError):
            lock.append({"n": 2})
    assert session.read_bytes() == b'{"n":1}\n' + foreign


def test_threads_appending_through_one_holder_are_not_taken_for_foreign_writers(
    session: Path,
) -> None:
    import threading

    errors: list[BaseException] = []
    with SessionLock(session) as lock:

        def writer(w: int) -> None:
            try:
                for seq in range(100):
                    lock.append({"w": w, "seq": seq})
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lock.verify_fence()
    assert errors == []
    assert sorted((e["w"], e["seq"]) for e in lines(session)) == [
        (w, s) for w in range(2) for s in range(100)
    ]


_VERIFY_IN_LITTLE_MEMORY = """
import resource, sys
from fencelock import verify
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (24 << 20), resource.RLIM_INFINITY))
report = verify(sys.argv[1])
print(report.ok, report.lines, report.max_token, report.unchecked)
for problem in report.problems:
    print(problem.detail)
"""


@needs_proc
def test_verify_reads_a_line_too_long_for_the_memory_there_is_as_an_over_long_one(
    session: Path,
) -> None:
    """A 40 MiB line where the process may use 24 MiB more (a memory limit): reading it
    whole fails (MemoryError), so it is read a step at a time as a line over the parse
    bound is, its stamp taken from its end; the lines after it are read as ever."""
    stamp = b'"_fencelock":{"token":5,"run_id":"r"}'
    with session.open("wb") as f:
        f.write(b'{"a":1}\n{"pad":"' + b"x" * (40 << 20) + b'",' + stamp + b"}\n"
                + b'{"b":2,' + stamp.replace(b"5", b"6") + b"}\n")
    done = subprocess.run([sys.executable, "-c", _VERIFY_IN_LITTLE_MEMORY, str(session)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "3", "6", "[2]"]


@needs_proc
def test_verify_places_a_nul_in_a_line_too_long_for_the_memory_there_is(
    session: Path,
) -> None:
    """The same line, with a run of NUL bytes in it: torn, and the message says where
    in the line, and how long the line is, though it was read a step at a time from its
    start rather than past its first 64 MiB."""
    line = b'{"pad":"' + b"x" * 1000 + b"\x00" * 16 + b"x" * (40 << 20) + b'"}\n'
    session.write_bytes(b'{"a":1}\n' + line + b'{"b":2}\n')
    done = subprocess.run([sys.executable, "-c", _VERIFY_IN_LITTLE_MEMORY, str(session)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    counts, detail = done.stdout.splitlines()
    assert counts.split() == ["False", "3", "0", "[]"]
    assert detail.startswith(
        f"not JSON: a control character at byte 1,008 of a line of {len(line):,} bytes")


def test_verify_reads_an_over_long_line_s_stamp_from_its_end_and_stops_after_many_problems(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line too long to parse (over 64 bytes here, 64 MiB in use) is no problem by
    that alone, not held in memory whole: verify lists it as unchecked and reads its
    stamp from its end, so a token that goes backwards after it is still found. Cut
    short at the end of the file it is the last line, and torn."""
    from fencelock import _verify

    monkeypatch.setattr(_verify, "MAX_LINE", 64)
    long = json.dumps({"c": "x" * 500, "_fencelock": {"token": 5, "run_id": "a"}}).encode()
    after = b'{"n":2,"_fencelock":{"token":3,"run_id":"b"}}\n'
    session.write_bytes(b'{"n":1}\n' + long + b"\n" + after)
    report = verify(session)
    assert report.unchecked == [2] and report.stamped == 2 and report.lines == 3
    assert [(p.line, p.kind) for p in report.problems] == [(3, "token-backwards")]
    assert "after token 5" in report.problems[0].detail
    session.write_bytes(b'{"n":1}\n' + long + b"\n" + long[:-5])
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [(3, "torn")]
    assert report.unchecked == [2]
    monkeypatch.setattr(_verify, "MAX_PROBLEMS", 3)
    session.write_bytes(b"garbage\n" * 10)
    kinds = [p.kind for p in verify(session).problems]
    assert kinds == ["torn", "torn", "torn", "stopped"]
    session.write_bytes(b"garbage\n" * 3)  # exactly at the cap, nothing unread
    assert [p.kind for p in verify(session).problems] == ["torn"] * 3


@pytest.mark.parametrize("at", [10, 63, 64, 300], ids=["head", "head-end", "rest", "rest-later"])
def test_verify_finds_a_byte_no_json_holds_in_an_over_long_line(
    session: Path, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """A line too long to parse is still searched for a control character other than
    JSON's whitespace, which neither a string nor the space between tokens may hold: a
    run of NUL bytes where a crash left blocks allocated but never written is torn,
    wherever in the line it is (in the first `MAX_LINE` bytes or after)."""
    from fencelock import _verify

    monkeypatch.setattr(_verify, "MAX_LINE", 64)
    monkeypatch.setattr(_verify, "_REST_STEP", 100)
    line = bytearray(b'{"c":"' + b"x" * 500 + b'"}\n')
    fine = bytes(line).replace(b'{"c"', b'{\t\r"c"')  # JSON's whitespace: no problem
    line[at:at + 20] = b"\x00" * 20
    session.write_bytes(b'{"n":1}\n' + bytes(line) + fine)
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [(2, "torn")], report
    assert f"control character at byte {at:,} of a line of {len(line):,} bytes" in \
        report.problems[0].detail
    assert report.unchecked == [3] and report.lines == 3


@needs_regex
@pytest.mark.parametrize("cut", [40, 70, 400], ids=["in-head", "past-head", "far-past"])
def test_verify_finds_a_torn_line_glued_to_the_next_inside_an_over_long_line(
    session: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    """A writer outside the protocol killed mid-line, and the next line glued to its
    fragment: too long to parse (over 64 bytes here, 64 MiB in use), the line is still
    checked as JSON as it is read, a step at a time, wherever the glue is."""
    from fencelock import _verify

    monkeypatch.setattr(_verify, "MAX_LINE", 64)
    monkeypatch.setattr(_verify, "_REST_STEP", 100)
    whole = b'{"role":"user","content":"' + b"A" * 500 + b'"}'
    glued = whole[:cut] + b'{"role":"assistant","content":"ok"}\n'
    session.write_bytes(b'{"n":1}\n' + whole + b"\n" + glued + b'{"n":2}\n')
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [(3, "torn")], report
    assert "checked as it was read" in report.problems[0].detail
    assert report.unchecked == [2] and report.lines == 4


@pytest.mark.parametrize(("stamp", "kind"), [
    (b'{"token":10000000000000000000,"run_id":"a"}', "token-out-of-range"),  # 20 digits
    (b'{"token":9,"run_id":"a\\"b"}', "token-backwards"),  # the next line's 3 is below
])
def test_verify_reads_any_stamp_at_an_over_long_line_s_end_as_a_short_line_s(
    session: Path, monkeypatch: pytest.MonkeyPatch, stamp: bytes, kind: str
) -> None:
    """The stamp read from an over-long line's end is the one a parse would give: a
    token of 20 digits (past the largest) or a run id with an escape is a stamp too."""
    from fencelock import _verify

    monkeypatch.setattr(_verify, "MAX_LINE", 64)
    long = b'{"c":"' + b"x" * 500 + b'","_fencelock":' + stamp + b"}\n"
    session.write_bytes(long + b'{"n":2,"_fencelock":{"token":3,"run_id":"b"}}\n')
    report = verify(session)
    assert report.unchecked == [1] and report.stamped == 2, report
    assert [(p.line, p.kind) for p in report.problems][:1] == [
        (1 if kind == "token-out-of-range" else 2, kind)
    ], report.problems


def test_release_records_the_last_appends_fence_point(session: Path) -> None:
    """Appends in the write phase may leave the record behind; release writes the
    session's fingerprint as the run left it, so the released record is true."""
    with SessionLock(session) as lock:
        for n in range(3):
            lock.append({"n": n})
        inside = lock.info
    status = probe(session)
    assert status.state == "free" and status.record is not None
    assert inside is not None and status.record.fingerprint == inside.fingerprint
    assert status.fence_ok is True


def test_entering_the_prompt_window_records_the_fence_point(session: Path) -> None:
    """Inside the prompt window the record's fingerprint is the one the fence compares
    against, so a probe can tell a foreign write during the model call."""
    with SessionLock(session) as lock:
        lock.append({"n": 1})
        lock.append({"n": 2})
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            assert record_of(session).phase == "prompt"
            assert probe(session).fence_ok is True
            with open(session, "a") as f:
                f.write('{"intruder": 1}\n')
            assert probe(session).fence_ok is False


def test_publish_names_nothing_once_the_holder_may_have_lost_the_session(tmp_path: Path) -> None:
    """`publish` (a session made whole at once) asks ``check`` before each chunk and
    before it gives the name: a holder that lost the session meanwhile (an etcd lease
    that may have expired while it was paused) names nothing, and leaves alone the part
    the next holder is writing under the same name."""
    from fencelock import HolderLostError
    from fencelock._fence import PART, publish

    session = str(tmp_path / "n.jsonl")
    calls = []

    def lost_after_first_chunk() -> None:
        calls.append(1)
        if len(calls) == 2:  # meanwhile the next holder started its own part
            os.unlink(session + PART)
            Path(session + PART).write_bytes(b'{"next":1}\n')
            raise HolderLostError(session, "its etcd lease could not be renewed in time")

    with pytest.raises(HolderLostError):
        publish(session, [b'{"n":1}\n', b'{"n":2}\n'], token=0, check=lost_after_first_chunk)
    assert not os.path.lexists(session)
    assert Path(session + PART).read_bytes() == b'{"next":1}\n'  # the next holder's

    def replaced_unseen() -> None:  # a holder that cannot tell it lost the session
        calls.append(1)
        if len(calls) == 3:  # just before the name: another's part is there now
            os.unlink(session + PART)
            Path(session + PART).write_bytes(b'{"other":1}\n')

    calls.clear()
    with pytest.raises(SessionTakeoverError):
        publish(session, [b'{"n":1}\n', b'{"n":2}\n'], token=0, check=replaced_unseen)
    assert not os.path.lexists(session)  # another's partial file never gets the name
    assert Path(session + PART).read_bytes() == b'{"other":1}\n'
    publish(session, [b'{"n":1}\n', b'{"n":2}\n'], token=0)
    assert Path(session).read_bytes() == b'{"n":1}\n{"n":2}\n'
    assert not os.path.lexists(session + PART)


def test_a_line_nested_deeper_than_python_parses_is_unchecked_not_torn(session: Path) -> None:
    """How deep Python's parser goes depends on its stack at the time: a line `append`
    accepted may be too deep for `verify` (under the CLI's frames). It is JSON all the
    same: verify reads its stamp from its end, as for an over-long line. One as deep
    that is not JSON is torn."""
    n = 5 * json_depth_limit()  # too deep for this interpreter's parser, whatever stack
    deep = "[" * n + "]" * n
    stamped = '{"deep":' + "[" * n + "]" * n + ',"_fencelock":{"token":3,"run_id":"r-1"}}'
    garbage = "[" * n + "xyz not json"
    unbalanced = "[" * n + "]" * (n - 1)
    session.write_text("\n".join(['{"n": 1}', deep, stamped, garbage, unbalanced]) + "\n")
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [(4, "torn"), (5, "torn")]
    assert report.unchecked == [2, 3]
    assert report.lines == 5 and report.stamped == 1 and report.max_token == 3
    with SessionLock(session, "deep") as lock, pytest.raises(FenceLockError, match="deeply"):
        lock.append(deep)


@needs_regex
def test_the_deep_line_check_agrees_with_the_json_parser() -> None:
    """`is_json`, verify's check for lines too deep to parse, and `JsonStream`, its
    check of lines too long to parse, fed in chunks of every small size, say what
    Python's own parser (as verify uses it: no NaN or Infinity) says, on lines it can
    parse: valid documents, and each of them cut, doubled and altered at every place."""
    import random

    from fencelock._json import loads
    from fencelock._jsoncheck import JsonStream, is_json

    def streamed(line: bytes, step: int) -> bool | None:
        stream = JsonStream()
        for at in range(0, len(line), step):
            stream.feed(line[at:at + step])
        return stream.end()

    def parses(text: str) -> bool:
        try:
            loads(text)
        except ValueError:
            return False
        return True

    docs = ['{"a": [1, -2.5e+3, true, false, null, "x\\"y\\u00e9\\n"], "b": {}}', "[]", "{}",
            '"plain"', "0", "-0.0", "[[], [{}], {\"k\": [1, {\"m\": null}]}]", " 7 ",
            '{"\\u12": 1}', "[1,]", "01", "1.", ".5", "NaN", "[Infinity]", '"tab\there"',
            '{"a" 1}', '{1: 2}', "[1 2]", "tru", "nulls", '"unterminated', "[1}",
            '{"a": 1]', "[[1]}", '{"a": [}]}', "1.5e", "-", '"\\x"']
    rng = random.Random(4)  # a fixed corpus: the same checks on every run
    alphabet = '[]{},:"\\ 0-1.eE+truefalsn\t'
    cases = set(docs)
    for doc in docs:
        cases.update({doc + doc, doc[:-1]})
        for i in range(len(doc) + 1):
            cases.update({doc[:i] + doc[i + 1:], doc[:i] + rng.choice(alphabet) + doc[i:]})
    for case in sorted(cases):
        line = (case + "\n").encode()
        assert is_json(line) == parses(case), case
        for step in (1, 2, 3, 5, len(line)):
            assert streamed(line, step) == parses(case), (case, step)
    assert not is_json(b"\xff\n")
    for line in (b"\xff\n", b'"\xc3\n', b'"\xed\xa0\x80"\n'):  # not UTF-8, whole or cut
        assert streamed(line, 1) is False and streamed(line, len(line)) is False


@needs_regex
@pytest.mark.parametrize(("line", "bound", "value"), [
    (b"[" + b'{"a":1},' * 20 + b'{"a":1}]\n', "MAX_TOKENS", 30),
    (b'{"n":' + b"7" * 40 + b"}\n", "MAX_CARRY", 16),
    (b"[" * 40 + b"]" * 40 + b"\n", "MAX_TOKENS", 30),
], ids=["tokens", "number", "depth"])
def test_the_streamed_check_gives_no_verdict_past_its_bounds(
    monkeypatch: pytest.MonkeyPatch, line: bytes, bound: str, value: int
) -> None:
    """Past its bounds (steps taken one at a time, each opening bracket one; a number or
    literal kept whole across chunks) the streamed check says nothing (None), never
    torn; a fault met before them is still one."""
    from fencelock._jsoncheck import JsonStream

    def streamed(data: bytes) -> bool | None:
        stream = JsonStream()
        for at in range(0, len(data), 8):
            stream.feed(data[at:at + 8])
        return stream.end()

    assert streamed(line) is True
    monkeypatch.setattr(JsonStream, bound, value)
    assert streamed(line) is None
    assert streamed(b"}" + line) is False


@needs_regex
def test_where_python_s_regular_expressions_are_unreliable_no_line_is_called_torn_unparsed(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11.0 to 3.11.4 mis-match a possessive repeat of a group with alternatives
    (gh-106052): there, a line too deep or too long to parse gets no verdict (listed
    unchecked), rather than one those expressions would get wrong."""
    from fencelock import _jsoncheck, _verify

    assert _jsoncheck.RELIABLE  # the Python running the tests matches as written
    n = 5 * json_depth_limit()  # too deep for this interpreter's parser: the is_json path
    deep = b"[" * n + b"]" * n + b"\n"
    session.write_bytes(b'{"n":0}\n' + deep + b"[" * n + b"\n" + b'{"n":2}\n')
    assert [(p.line, p.kind) for p in verify(session).problems] == [(3, "torn")]
    monkeypatch.setattr(_jsoncheck, "RELIABLE", False)
    report = verify(session)
    assert report.problems == [] and report.unchecked == [2, 3], report
    assert _jsoncheck.is_json(deep) is None and _jsoncheck.JsonStream().end() is None
    monkeypatch.setattr(_verify, "MAX_LINE", 64)  # too long to parse: the streamed check
    session.write_bytes(b'{"role":"user","content":"' + b"A" * 100 + b'{"n":1}\n')
    report = verify(session)
    assert report.problems == [] and report.unchecked == [1], report


LONG_STRING_IN_A_DEEP_LINE = """
import resource, sys
from fencelock._jsoncheck import is_json
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB for all of it
line = b"[" * 3000 + b'"' + b"x" * 20_000_000 + b'"' + b"]" * 3000 + b"\\n"
print(is_json(line), is_json(line[:-3001] + b"\\n"))
"""


@needs_regex
def test_the_deep_line_check_keeps_no_state_per_character() -> None:
    """A 20 MB string inside a deep line is checked in bounded memory (a repeat that
    kept a backtracking state per character took about 256 bytes each: 5 GB here)."""
    done = subprocess.run([sys.executable, "-c", LONG_STRING_IN_A_DEEP_LINE],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False"]


def test_verify_reads_lines_as_json_readers_do(session: Path) -> None:
    """NaN and Infinity are Python's extensions, not JSON: `append` refuses them, other
    readers (JSON.parse) cannot read them, and verify calls them torn. A number of any
    size is JSON."""
    session.write_bytes(b'{"ok":1}\n{"a":NaN}\n{"b":-Infinity}\n{"c":1e999}\n'
                        b'{"d":1' + b"0" * 400 + b'}\n')
    report = verify(session)
    assert [(p.line, p.kind) for p in report.problems] == [(2, "torn"), (3, "torn")]


@needs_proc
def test_verify_reads_a_line_it_has_no_memory_to_parse_as_an_over_long_one(
    tmp_path: Path,
) -> None:
    """A line under the 64 MiB limit can still take more memory to parse than there is
    (a 20 MB array of empty objects takes about 500 MB): verify lists it as unchecked
    and reads its stamp from its end, instead of ending in a MemoryError traceback."""
    import subprocess
    import sys

    session = tmp_path / "s.jsonl"
    many = (b'{"big":[' + b"{}," * (7 * 1024 * 1024) +
            b'{}],"_fencelock":{"token":7,"run_id":"r"}}')
    session.write_bytes(b'{"n":1}\n' + many + b'\n{"n":2,"_fencelock":{"token":3,"run_id":"s"}}\n')
    code = """
import json, resource, sys
from fencelock import verify
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 200 * 1024 * 1024, resource.RLIM_INFINITY))
r = verify(sys.argv[1])
print(json.dumps({"unchecked": r.unchecked, "problems": [[p.line, p.kind] for p in r.problems]}))
"""
    done = subprocess.run([sys.executable, "-c", code, str(session)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got == {"unchecked": [2], "problems": [[3, "token-backwards"]]}, got


def test_the_holders_own_appends_from_another_thread_are_no_takeover(session: Path) -> None:
    # A tool's output streamed from a thread while the main thread opens the prompt
    # window and checks the fence: a line written but not yet counted as the fence
    # point is the holder's own, not a foreign write.
    import threading

    lock = SessionLock(session, "only-writer")
    with lock:
        lock.append({"role": "user", "content": "hi"})
        for trial in range(40):
            stop, started = threading.Event(), threading.Event()

            def stream(trial: int, stop: threading.Event, started: threading.Event) -> None:
                while not stop.is_set():
                    lock.append({"role": "tool", "trial": trial})
                    started.set()

            writer = threading.Thread(target=stream, args=(trial, stop, started))
            writer.start()
            try:
                assert started.wait(30)
                with lock.prompt_window():
                    time.sleep(0.002)  # the model call, with the tool still writing
                lock.verify_fence()
            finally:
                stop.set()
                writer.join()
        lock.verify_fence()
    assert verify(session).ok


def _interrupted_append(lock: SessionLock, at: Any, release_first: bool = False) -> None:
    """``lock.append`` with KeyboardInterrupt landing as ``at`` is entered; with
    ``release_first``, a signal handler that releases the lock, then raises."""
    from conftest import on_entry

    def handler() -> None:
        if release_first:
            lock.release()
        raise KeyboardInterrupt

    with on_entry(at, handler) as ran, pytest.raises(KeyboardInterrupt):
        lock.append({"role": "assistant", "content": "lost"})
    assert ran  # it landed where the test says


_INTERRUPT_POINTS: dict[str, tuple[bool, Callable[[], Any]]] = {
    # an existing session: the line written, not yet fsynced; nothing written yet
    "fsync": (True, lambda: os.fsync),
    "write": (True, lambda: fence_module()._write_all),
    # before the fence check has passed: nothing of the append is in the file yet
    "fence check": (True, lambda: sidecar_module().refuse_planted),
    # a session the append creates: its token mark; the line in, its name not synced
    "token mark": (False, lambda: tokens_module().reserve),
    "directory fsync": (False, lambda: fence_module()._fsync_dir),
}


def fence_module() -> Any:
    import fencelock._fence

    return fencelock._fence


def sidecar_module() -> Any:
    import fencelock._sidecar

    return fencelock._sidecar


def tokens_module() -> Any:
    import fencelock._tokens

    return fencelock._tokens


@pytest.mark.parametrize("point", list(_INTERRUPT_POINTS))
def test_an_interrupted_append_leaves_nothing_and_the_fence_holding(
    session: Path, point: str
) -> None:
    """KeyboardInterrupt (or a signal handler's exception) in the middle of an append:
    the append raised, so its line is not left in the session (a file it created is
    removed), the run's next append is no takeover, and the released record carries
    the session as it is. Where nothing was written yet, the file is not touched."""
    existed, at = _INTERRUPT_POINTS[point]
    # Before the fence check, a session that begins like the line: none of it is ours.
    first = b'{"' if point == "fence check" else b'{"role":"user"}\n'
    if existed:
        session.write_bytes(first)
    before = os.stat(session) if existed else None
    lock = SessionLock(session, lane="interrupted")
    lock.acquire()
    _interrupted_append(lock, at())
    if before is None:
        assert not session.exists()
    else:
        assert session.read_bytes() == first
        if point in ("write", "fence check"):  # no truncate: it would move the stat
            assert os.stat(session).st_mtime_ns == before.st_mtime_ns
    with contextlib.ExitStack() as torn:
        if point == "fence check":  # the torn line it began with is set aside now
            torn.enter_context(pytest.warns(FenceLockWarning, match="torn"))
        lock.append({"role": "assistant", "content": "kept"})
    lock.release()
    assert b"lost" not in session.read_bytes()
    status = probe(session)
    assert status.state is ProbeState.FREE and status.fence_ok is True, status
    assert verify(session).ok


def test_a_handler_that_releases_then_raises_mid_append_leaves_the_next_run_nothing(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The handler releases, then raises, after the line was written: the release waits
    for the append to end (it takes its line back first, while still holding), so the
    next run finds the session as the interrupted run left it, and nothing of its own
    is cut."""
    session.write_bytes(b'{"role":"user"}\n')
    lock = SessionLock(session, lane="interrupted")
    lock.acquire()
    _interrupted_append(lock, os.fsync, release_first=True)
    assert not lock.held
    assert session.read_bytes() == b'{"role":"user"}\n'
    status = probe(session)
    assert status.state is ProbeState.FREE and status.fence_ok is True, status
    other = spawn_holder(session, lane="next", on_contention="fail")
    other.acquire()
    assert other.call('append {"role": "user", "content": "next"}') == "ok"


def test_an_interrupted_append_keeps_a_created_file_another_writer_added_to(
    session: Path
) -> None:
    """The append created the session, and a writer outside the protocol appended to it
    before the interrupt: the file is not only this append's, so it is not removed
    (nothing of anyone else's is ever taken back)."""
    lock = SessionLock(session, lane="interrupted")
    lock.acquire()

    def intrude_then_interrupt() -> None:
        with open(session, "ab") as f:
            f.write(b'{"role":"intruder"}\n')
        raise KeyboardInterrupt

    from conftest import on_entry

    with on_entry(os.fsync, intrude_then_interrupt) as ran, pytest.raises(KeyboardInterrupt):
        lock.append({"role": "assistant", "content": "mine"})
    assert ran and b"intruder" in session.read_bytes()
    lock.release()


def test_an_interrupt_as_the_append_s_create_returns_leaves_no_takeover(
    session: Path
) -> None:
    """An interrupt (a signal handler's exception) at the first point after the `open`
    that creates the session (the open's result is stored with no point between, so
    that is its `fstat`'s return) takes the file back: removed, its descriptor closed,
    the run's fence point "no file" stands and its next append creates it. (An
    interrupt right as the open returned lost the descriptor and left the empty file,
    which the next append then took as its own creation; a file that appeared with
    anything in it still is a takeover.)"""
    from conftest import interrupted_on_entry

    lock = SessionLock(session, lane="interrupted")
    lock.acquire()
    with interrupted_on_entry(os.fstat, at_return=True) as raised, \
            pytest.raises(KeyboardInterrupt):
        lock.append({"role": "assistant", "content": "first"})
    assert raised and not session.exists()
    if os.path.isdir("/proc/self/fd"):
        assert not [fd for fd in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{fd}") == str(session)]
    assert lock.verify_fence() is None  # the fence point "no file" stands, for every check
    with lock.prompt_window():
        pass
    lock.append({"role": "assistant", "content": "again"})
    lock.release()
    assert [json.loads(x)["content"] for x in session.read_text().splitlines()] == ["again"]
    status = probe(session)
    assert status.state is ProbeState.FREE and status.fence_ok is True, status
    assert verify(session).ok

    other = session.with_name("4f1c2a9e-0000-4000-8000-0000000000ff.jsonl")
    with SessionLock(other, lane="next") as second:
        other.write_bytes(b'{"role":"intruder"}\n')
        with pytest.raises(SessionTakeoverError):
            second.append({"role": "assistant", "content": "mine"})
    assert other.read_bytes() == b'{"role":"intruder"}\n'


@pytest.mark.parametrize("owner", ["mine", pytest.param("another user's", marks=needs_root)])
def test_an_empty_file_that_appears_in_the_prompt_window_is_a_takeover_only_if_not_mine(
    session: Path, owner: str
) -> None:
    """A run whose fence point is "no file": an empty file of its own user that appears
    holds nothing to take over, so the window closes and the next append takes the file
    (as it does the file an interrupted create leaves); another user's is a takeover,
    and is left as it is."""
    with SessionLock(session, lane="window") as lock:
        with contextlib.ExitStack() as outcome:
            if owner != "mine":
                outcome.enter_context(pytest.raises(SessionTakeoverError))
            with lock.prompt_window():
                session.touch(mode=0o600)
                if owner != "mine":
                    os.chown(session, 65534, 65534)
        if owner == "mine":
            lock.append({"role": "assistant", "content": "reply"})
    expected = b"" if owner != "mine" else b'{"role":"assistant","content":"reply"}\n'
    assert session.read_bytes() == expected


@pytest.mark.parametrize("at", ["fstat", "S_ISREG"])
def test_an_interrupt_inside_the_append_s_create_leaves_no_file(
    session: Path, at: str
) -> None:
    """An interrupt once the `open` that creates the session has returned, while the
    new file is looked at (before the append has it): the file it made is removed, so
    the fence point "no file" still holds for every check, not just the next append's,
    and the released record matches the session."""
    import stat

    from conftest import interrupted_on_entry

    lock = SessionLock(session, lane="interrupted")
    lock.acquire()
    with interrupted_on_entry(os.fstat if at == "fstat" else stat.S_ISREG) as raised, \
            pytest.raises(KeyboardInterrupt) as caught:
        lock.append({"role": "assistant", "content": "first"})
    assert raised and any(entry.name == "open_regular" for entry in caught.traceback)
    assert not session.exists()
    lock.verify_fence()
    with lock.prompt_window():
        pass
    lock.release()
    assert probe(session).fence_ok is True


def test_an_interrupted_append_cuts_an_empty_file_it_found_back_not_away(
    session: Path
) -> None:
    """An empty session file another program made (and may still have open) is taken
    by the run's append as if it were its own creation; an interrupt in that append
    cuts the line back out, leaving the same file, empty, instead of removing it: what
    that program writes to it afterwards is not lost."""
    from conftest import interrupted_on_entry

    lock = SessionLock(session, lane="interrupted")
    lock.acquire()
    made = os.open(session, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with interrupted_on_entry(os.fsync) as raised, pytest.raises(KeyboardInterrupt):
            lock.append({"role": "assistant", "content": "first"})
        assert raised and session.read_bytes() == b""
        lock.release()
        os.write(made, b'{"role":"other"}\n')
    finally:
        os.close(made)
    assert session.read_bytes() == b'{"role":"other"}\n'


def test_an_append_interrupted_once_its_line_is_in_keeps_the_line_and_the_fence(
    session: Path
) -> None:
    """An interrupt after the line is in and fsynced (as the run notes the time): the
    line stays, the run's fence point and its released record follow it."""
    import time as clock

    from conftest import on_entry

    session.write_bytes(b'{"role":"user"}\n')
    lock = SessionLock(session, lane="interrupted")
    lock.acquire()
    with on_entry(clock.time, _raise_interrupt) as ran, pytest.raises(KeyboardInterrupt):
        lock.append({"role": "assistant", "content": "in"})
    assert ran
    lock.append({"role": "assistant", "content": "next"})
    lock.release()
    assert probe(session).fence_ok is True
    assert verify(session).ok


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def test_a_torn_tail_warning_raised_as_an_error_leaves_the_append_done_and_fenced(
    session: Path,
) -> None:
    """Where warnings are errors, the torn-tail warning is raised once the entry is in:
    the run's fence point follows the cut and the entry (the next append read the
    run's own cut as another writer's before: a takeover nobody caused)."""
    import warnings

    session.write_bytes(b'{"a": 1}\n{"b":')
    with SessionLock(session) as lock:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FenceLockWarning)
            with pytest.raises(FenceLockWarning, match="torn"):
                lock.append({"n": 1})
        lock.append({"n": 2})
        lock.verify_fence()
    assert lines(session) == [{"a": 1}, {"n": 1}, {"n": 2}]
    assert Path(str(session) + TORN_SUFFIX).read_bytes() == b'{"b":\n'


def test_an_interrupt_right_after_the_torn_tail_cut_leaves_the_run_its_fence(
    session: Path,
) -> None:
    """An interrupt (a signal handler's exception) landing as the cut of a torn tail
    returns: nothing of the entry is written, and the cut is the run's own, not
    another writer's."""
    from conftest import interrupted_on_entry

    session.write_bytes(b'{"a": 1}\n{"b":')
    with SessionLock(session) as lock:
        with interrupted_on_entry(os.ftruncate, at_return=True) as ran, \
                pytest.raises(KeyboardInterrupt):
            lock.append({"n": 1})
        assert ran
        assert session.read_bytes() == b'{"a": 1}\n'
        lock.append({"n": 2})
        lock.verify_fence()
    assert lines(session) == [{"a": 1}, {"n": 2}]


def test_a_torn_tail_half_kept_aside_when_the_disk_filled_is_kept_whole_next_time(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write of the fragment to `.torn` that fails part way (a full disk) takes back
    what reached it (the `.torn` it made goes altogether): the next append keeps the
    fragment once, on a line of its own."""
    filling = _filling_disk(10)

    fragment = b'{"role":"assistant","content":"half'
    session.write_bytes(b'{"a":1}\n' + fragment)
    torn = Path(str(session) + TORN_SUFFIX)
    with SessionLock(session) as lock:
        monkeypatch.setattr(_fence, "_write", filling)
        # Naming what could not be written, and how much: freeing room for the entry
        # alone would not do.
        with pytest.raises(SessionWriteError, match=(
                f"keeping the session's torn last line \\({len(fragment)} bytes\\) aside "
                f"failed: No space left")):
            lock.append({"n": 1})
        monkeypatch.undo()
        assert not torn.exists() and session.read_bytes() == b'{"a":1}\n' + fragment
        with pytest.warns(FenceLockWarning, match="torn"):
            lock.append({"n": 2})
    assert torn.read_bytes() == fragment + b"\n"
    assert lines(session) == [{"a": 1}, {"n": 2}]


_KILLED_MID_COPY = """
import os, sys
from fencelock import SessionLock, _fence

def write(fd, data):
    done = os.write(fd, bytes(data)[:5])  # part of the fragment reaches S.torn
    os.write(1, b"partial\\n")
    sys.stdin.read()  # until killed
    return done

with SessionLock(sys.argv[1], "killed") as lock:
    _fence._write = write
    lock.append({"n": 1})
"""


def test_a_holder_killed_while_keeping_a_torn_tail_aside_leaves_no_glued_copy(
    session: Path,
) -> None:
    """A holder killed (SIGKILL: no clean-up runs) in the middle of copying a torn tail
    to `.torn`: the next append keeps the whole fragment on a line of its own, not glued
    to the part the killed one wrote."""
    fragment = b'{"role":"assistant","content":"half'
    session.write_bytes(b'{"a":1}\n' + fragment)
    torn = Path(str(session) + TORN_SUFFIX)
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_MID_COPY, str(session)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert killed.stdout is not None and killed.stdout.readline() == b"partial\n"
    finally:
        killed.kill()
        killed.communicate(timeout=30)
    assert torn.read_bytes() == fragment[:5]
    with SessionLock(session) as lock, pytest.warns(FenceLockWarning, match="torn"):
        lock.append({"n": 2})
    assert torn.read_bytes() == fragment[:5] + b"\n" + fragment + b"\n"
    assert lines(session) == [{"a": 1}, {"n": 2}]


def test_a_torn_tail_cut_by_an_append_that_then_fails_is_still_told(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut stands when the entry after it fails (an fsync error): the warning
    that says where the fragment went is given all the same."""
    synced: list[int] = []

    def eio(fd: int) -> None:  # the fragment's copy is fsynced first, then the entry
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    session.write_bytes(b'{"a": 1}\n{"b":')
    with SessionLock(session) as lock:
        monkeypatch.setattr(_fence, "_fsync", eio)
        with pytest.warns(FenceLockWarning, match="torn") as caught, \
                pytest.raises(SessionWriteError, match="fsync"):
            lock.append({"n": 1})
        assert caught[0].filename == __file__
        monkeypatch.undo()
        lock.append({"n": 2})
    assert lines(session) == [{"a": 1}, {"n": 2}]
    assert Path(str(session) + TORN_SUFFIX).read_bytes() == b'{"b":\n'


@needs_xattr
@pytest.mark.parametrize("how", ["library", "run"])
def test_tokens_never_go_back_for_a_session_file_renamed_over_during_its_runs(
    session: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A run that rewrites its session through a temporary file renamed over it (a
    compaction, `sed -i`) leaves a file whose new inode has no mark: the release marks
    it, so that a sidecar removed by hand after such runs does not start tokens again
    at 1 (a gateway that compacts every run left its session unmarked for good)."""
    from fencelock import _sidecar_holder

    monkeypatch.setattr(_sidecar_holder, "HAND_OVER_AFTER", 0.0)  # every run "long"
    session.write_text('{"a": 1}\n')
    issued = []
    for i in range(3):
        if how == "run":
            script = ('echo "$FENCELOCK_TOKEN"; cp "$0" "$0.tmp"; echo "{}" >> "$0.tmp"; '
                      'mv "$0.tmp" "$0"')
            out = subprocess.run(
                [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "compact",
                 "--", "sh", "-c", script, str(session)],
                capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            issued.append(int(out.stdout))
        else:
            with SessionLock(session, lane="compact") as lock:
                assert lock.info is not None
                issued.append(lock.info.token)
                tmp = session.with_name("compacted.tmp")
                tmp.write_text(session.read_text() + f'{{"n": {i}}}\n')
                os.replace(tmp, session)
    Path(str(session) + ".holder").unlink()
    with SessionLock(session, lane="after") as lock:
        assert lock.info is not None
        assert lock.info.token > max(issued), (issued, lock.info.token)


@needs_xattr
@pytest.mark.parametrize("back", ["an-hour", "to-its-start"])
def test_a_clock_set_back_during_the_run_does_not_skip_the_release_s_look(
    session: Path, monkeypatch: pytest.MonkeyPatch, back: str
) -> None:
    """The wall clock set back while a run held the session 20 ms (NTP stepping a fast
    clock), an hour or to just after the run began: the run still counts as long at
    its release, and marks a file renamed over its session (the hold measured by the
    wall clock came out below zero, or below the 1 ms that makes a run long, the look
    was skipped, and a sidecar removed by hand then took the tokens back to 1)."""
    import time as clock

    session.write_text('{"a": 1}\n')
    with SessionLock(session, lane="compact") as lock:
        assert lock.info is not None
        first = lock.info.token
        tmp = session.with_name("compacted.tmp")
        tmp.write_text(session.read_text() + '{"n": 1}\n')
        os.replace(tmp, session)
        real, began = clock.time, lock.info.acquired_at
        monkeypatch.setattr(clock, "time", (lambda: real() - 3600) if back == "an-hour"
                            else (lambda: began + 0.0005))
        clock.sleep(0.021)  # a hold of 20 ms and more, as the monotonic clock counts it
    monkeypatch.undo()
    Path(str(session) + ".holder").unlink()
    with SessionLock(session, lane="after") as lock:
        assert lock.info is not None and lock.info.token > first


@needs_xattr
def test_a_session_file_made_anew_under_the_same_inode_number_is_marked_at_release(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file replaced during the run may get the freed inode's number again (ext4 hands
    it back at once: two `sed -i` in one run): its changed ctime says so, and the
    release marks it (the inode alone said "the same file")."""
    from fencelock import _sidecar_holder

    monkeypatch.setattr(_sidecar_holder, "HAND_OVER_AFTER", 0.0)
    session.write_text('{"a": 1}\n')
    with SessionLock(session, lane="first") as lock:
        assert lock.info is not None
        first = lock.info.token
        # What a file made anew under the old number has: no mark, a new ctime.
        os.removexattr(session, "user.fencelock.token")
    Path(str(session) + ".holder").unlink()
    with SessionLock(session, lane="after") as lock:
        assert lock.info is not None and lock.info.token > first


@needs_root
@needs_xattr
def test_the_release_leaves_a_planted_file_renamed_over_the_session_unmarked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's file renamed over the session during a run, in a directory anyone
    can write to, is what an acquire refuses and leaves untouched: the release does not
    mark it either."""
    from fencelock import PlantedFileError, _sidecar_holder

    monkeypatch.setattr(_sidecar_holder, "HAND_OVER_AFTER", 0.0)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    session = shared / "s.jsonl"
    session.write_text('{"a": 1}\n')
    with pytest.warns(FenceLockWarning, match="world-writable"), \
            SessionLock(session, lane="run"):
        planted = shared / "planted"
        planted.write_text('{"planted": true}\n')
        os.chown(planted, 65534, 65534)
        os.replace(planted, session)
    with pytest.raises(OSError):
        os.getxattr(session, "user.fencelock.token")
    with pytest.raises(PlantedFileError):  # (the directory's warning was given once)
        SessionLock(session, lane="next").acquire()


@needs_xattr
@pytest.mark.parametrize("how", ["mark removed", "session rewritten via rename"])
def test_a_mark_lost_during_a_run_is_not_trusted_past_the_runs_appends(
    session: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A holder object skips reading the mark while the session's stat is what it was
    when it read it. Under the content fence (which does not compare ctime), the mark
    removed, or the file replaced by a copy without it, during a run is taken into the
    fence point by the run's next append: the same object's next acquire must read the
    mark again, or a sidecar removed by hand afterwards takes the tokens back to 1."""
    from fencelock import _sidecar_holder

    monkeypatch.setattr(_sidecar_holder, "_MARK_TRUST_AGE_NS", 0)  # trusted at once
    monkeypatch.setattr(_sidecar_holder, "HAND_OVER_AFTER", 3600.0)  # no release looks
    session.write_text('{"a": 1}\n')
    lock = SessionLock(session, lane="reused", fence=FenceMode.CONTENT)
    for _ in range(3):
        with lock:
            pass
    with lock:
        lose_the_mark(session, how)
        lock.append({"n": 1})
    with lock:
        assert lock.info is not None
        last = lock.info.token
    assert_tokens_go_on_without_the_sidecar(session, last)


@needs_xattr
@pytest.mark.parametrize("how", ["mark removed", "session rewritten via rename"])
def test_the_release_reads_the_mark_again_after_a_run(
    session: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A run of a millisecond or more looks at its release whether the session's mark
    still covers its token. Under the content fence the run's own append takes a file
    renamed over the session (or its mark removed) into the fence point, so the look
    must read the mark itself, not compare the file with the fence point: else a
    sidecar removed by hand right after that run takes the tokens back to 1."""
    from fencelock import _sidecar_holder

    monkeypatch.setattr(_sidecar_holder, "HAND_OVER_AFTER", 0.0)  # every run "long"
    session.write_text('{"a": 1}\n')
    with SessionLock(session, lane="run", fence=FenceMode.CONTENT) as lock:
        assert lock.info is not None
        last = lock.info.token
        lose_the_mark(session, how)
        lock.append({"n": 1})
    assert_tokens_go_on_without_the_sidecar(session, last)


DIES_MID_PROMPT_APPEND = """
import os, signal, sys, threading
from fencelock import SessionLock, _fence
session, backend, dies_at, touch = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4]
real = _fence._fsync
def fsync(fd):
    real(fd)
    if touch == "touch":  # a heartbeat from another thread as the line goes in
        toucher = threading.Thread(target=lock.touch)
        toucher.start()
        toucher.join()
    os.kill(os.getpid(), signal.SIGKILL)  # the line is in; the record not yet after it
lock = SessionLock(session, lane="dies", backend=backend)
lock.acquire()
lock.append({"n": 0})
with lock.prompt_window():
    for n in range(1, dies_at + 1):
        if n == dies_at:
            _fence._fsync = fsync
        lock.append({"n": n})
"""
"""A holder killed inside the prompt window, between the line of its ``dies_at``-th
append there and the record that follows it (argv: session, backend or "", dies_at,
"touch" to have another thread touch the record meanwhile, else "no-touch")."""


@pytest.mark.parametrize(("dies_at", "touch"), [(1, "no-touch"), (2, "no-touch"), (1, "touch")])
def test_a_holder_killed_in_a_prompt_window_append_leaves_no_false_takeover(
    session: Path, dies_at: int, touch: str
) -> None:
    """A record in the prompt phase says its fingerprint is exact, so a probe reads a
    difference from the session as a write by someone else. A holder killed between
    writing a line in the prompt window (its first there or a later one, with a `touch`
    from another thread meanwhile or not) and the record that follows it must not leave
    such a record: nobody else wrote ("moved" would send `recover` and people looking
    for an intruder)."""
    done = subprocess.run(
        [sys.executable, "-c", DIES_MID_PROMPT_APPEND, str(session), "", str(dies_at), touch],
        timeout=60)
    assert done.returncode == -9
    assert session.read_text().splitlines()[-1] == f'{{"n":{dies_at}}}'  # the line went in
    status = probe(session)
    assert status.state == ProbeState.STALE
    assert status.fence_ok is None, status


def test_a_takeover_found_by_a_prompt_window_append_leaves_the_record_saying_so(
    session: Path,
) -> None:
    """The record stops saying the prompt phase while an append in the window writes,
    and says it again when the append writes nothing (a write from outside found
    first): a probe then still reads the intruder's line as a takeover."""
    with SessionLock(session, lane="run") as lock:
        lock.append({"n": 0})
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            with session.open("a") as f:
                f.write('{"role": "intruder"}\n')
            with pytest.raises(SessionTakeoverError):
                lock.append({"n": 1})
            on_disk = Path(str(session) + ".holder").read_text()
            assert json.JSONDecoder().raw_decode(on_disk)[0]["phase"] == "prompt"
            # Probed from another process (this one's probe asks the holder object).
            seen = subprocess.run(
                [sys.executable, "-c", "import sys; from fencelock import probe; "
                 "s = probe(sys.argv[1]); print(s.state.value, s.fence_ok)", str(session)],
                capture_output=True, text=True, timeout=60)
            assert seen.stdout.split() == ["live", "False"], seen


def test_verify_does_not_call_torn_a_line_a_live_holder_ended_as_it_looked(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify` reads the file, then asks the holder whether a last line without its
    break is an append under way. An append that ends in between moves the holder's
    record past the line: read again, the line has its break, and it is no problem."""
    import threading

    from fencelock import _fence, _verify

    lock = SessionLock(session, lane="writer")
    lock.acquire()
    lock.append({"n": 0})
    half_in, go_on = threading.Event(), threading.Event()
    write = _fence._write

    def half_then_wait(fd: int, data: Any) -> int:
        if half_in.is_set():
            return write(fd, data)
        written = write(fd, data[: len(data) // 2])  # a short write: the rest follows
        half_in.set()
        go_on.wait(30)
        return written

    monkeypatch.setattr(_fence, "_write", half_then_wait)
    with lock.prompt_window():
        appending = threading.Thread(target=lock.append, args=({"n": 1, "pad": "x" * 999},))
        appending.start()
        assert half_in.wait(30)
        in_flight = _verify._in_flight

        def ended_meanwhile(*args: Any) -> bool:
            go_on.set()
            appending.join(30)  # the line ends, and the record follows it
            return in_flight(*args)

        monkeypatch.setattr(_verify, "_in_flight", ended_meanwhile)
        report = verify(session)
    lock.release()
    assert not appending.is_alive()
    assert report.problems == [] and report.lines == 2, report


def test_verify_still_finds_a_torn_line_under_a_live_holder(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Read again, a torn line from before the holder came is still torn (the look
    again is only for a line that has ended meanwhile)."""
    session.write_bytes(b'{"n": 0}\n{"n": 1, "cut sho')
    holder = spawn_holder(session, lane="came-after")
    holder.acquire()
    report = verify(session)
    assert [p.kind for p in report.problems] == ["torn"], report


@pytest.mark.parametrize("fence", ["stat", "content"])
@pytest.mark.parametrize("how", ["a copy renamed over it", "removed"])
@pytest.mark.parametrize("when", ["before our write", "after our write"])
def test_a_session_replaced_during_the_append_is_a_takeover_with_the_line_not_stored(
    session: Path, monkeypatch: pytest.MonkeyPatch, fence: str, how: str, when: str
) -> None:
    """A program outside the protocol renames a copy over the session (a compaction, a
    ``sed -i``), or removes it, after the append opened the session file: the line went
    into a file that is no longer the session. The append reported it stored, and a run
    whose last step it was ended as if all was well, its reply gone."""
    copy = session.with_name("copy.jsonl")

    def replace() -> None:
        if how == "removed":
            session.unlink()
        else:
            copy.replace(session)

    with SessionLock(session, fence=fence) as lock:
        lock.append({"n": 1})
        shutil.copyfile(session, copy)
        _during_the_next_append(monkeypatch, when == "before our write", replace)
        with pytest.raises(SessionTakeoverError) as caught:
            lock.append({"n": 2})
        monkeypatch.undo()
        assert caught.value.stored is False
    if how == "removed":
        assert not session.exists()
    else:
        assert session.read_bytes() == b'{"n":1}\n'


def test_a_copy_made_after_the_write_and_renamed_over_the_session_holds_the_line(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``sed -i`` that copies the session after the append's write and renames the
    copy over it: a takeover all the same, but the line is in the session the path now
    names, and the error must say so (it said not stored, and a caller that kept the
    line to send again would have sent it twice)."""
    copy = session.with_name("copy.jsonl")

    def copy_over() -> None:
        shutil.copyfile(session, copy)
        copy.replace(session)

    with SessionLock(session) as lock:
        lock.append({"n": 1})
        _during_the_next_append(monkeypatch, False, copy_over)
        with pytest.raises(SessionTakeoverError) as caught:
            lock.append({"n": 2})
        monkeypatch.undo()
    assert session.read_bytes() == b'{"n":1}\n{"n":2}\n'
    assert caught.value.stored is True


OUT_OF_DESCRIPTORS = """
import os, resource, sys
from fencelock import _fence, _fingerprint, SessionWriteError
session = sys.argv[1]
expected = _fingerprint.take(session, _fingerprint.STAT)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    _fence.set_torn_tail_aside(session, expected, _fingerprint.STAT)
except SessionWriteError as e:
    print("raised", e.cause.errno)
else:
    print("returned")
"""


def test_a_torn_line_that_cannot_be_opened_for_want_of_descriptors_is_said(
    session: Path
) -> None:
    """Only a user who may not write the session (nor, then, its command) is spared the
    torn line's warning: a session that cannot be opened for another cause (no
    descriptor left) is reported, its torn line left for the command to join."""
    session.write_bytes(b'{"a": 1}\n{"b": 2, "ha')
    out = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, str(session)],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == f"raised {errno.EMFILE}\n", out.stderr


def _fd_open_on(path: Path) -> bool:
    """Whether this process has ``path`` open (a thread's append has opened it)."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
    return False


@needs_proc
@pytest.mark.parametrize("mode", [FenceMode.STAT, FenceMode.CONTENT])
def test_a_line_written_while_the_append_waits_for_the_session_files_lock_is_a_takeover(
    session: Path, mode: FenceMode
) -> None:
    """A writer outside the protocol that locks the session file itself (flock(1),
    portalocker) and writes a whole line while a fenced append waits for that lock: the
    append looks at the file again once it has the lock, and writes nothing (its line
    would have gone in after a history the run never read)."""
    import threading

    with SessionLock(session, fence=mode) as lock:
        lock.append({"n": 1})
        with subprocess.Popen([sys.executable, "-c", textwrap_outsider(session)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) as outsider:
            assert outsider.stdout is not None and outsider.stdin is not None
            assert outsider.stdout.readline() == "locked\n"
            caught: list[BaseException] = []

            def appending() -> None:
                try:
                    lock.append({"n": "reply"})
                except BaseException as e:  # handed to the test
                    caught.append(e)

            thread = threading.Thread(target=appending)
            thread.start()
            deadline = time.monotonic() + 30
            while not _fd_open_on(session):  # the append has opened it, and waits
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.001)
            outsider.stdin.write("go\n")
            outsider.stdin.flush()
            thread.join(30)
            assert outsider.wait(30) == 0
        assert len(caught) == 1 and type(caught[0]) is SessionTakeoverError, caught
        assert caught[0].stored is False
    assert [line["n"] for line in lines(session) if "n" in line] == [1]
    assert lines(session)[-1] == {"outsider": 1}


def textwrap_outsider(session: Path) -> str:
    """A program that locks ``session`` with flock(2), says so, and on "go" appends a
    whole line and lets go."""
    return (
        "import fcntl, sys\n"
        f"f = open({str(session)!r}, 'ab')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "f.write(b'{\"outsider\": 1}\\n'); f.flush()\n"
    )


def test_a_line_that_ends_another_writers_unfinished_line_is_not_stored(tmp_path: Path) -> None:
    """`_landed` (whether a line an append wrote is whole where it went): a line that
    went in after another writer's half line is glued to it, not whole: the takeover
    must not say it is stored (keep it nowhere else), or the reply is lost in a line no
    reader can parse."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    line = b'{"reply": 1}\n'
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        foreign_append(path, '{"other": "half')
        os.write(fd, line)
        assert not _fence._landed(fd, line)
        foreign_append(path, '"}\n')
        os.write(fd, line)  # after a whole line: whole
        assert _fence._landed(fd, line)
    finally:
        os.close(fd)
    fd = os.open(tmp_path / "new.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)  # at the start of the file: whole
        assert _fence._landed(fd, line)
    finally:
        os.close(fd)


def test_under_the_content_fence_a_longer_file_renamed_over_during_the_append_is_a_takeover(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The content fence takes a file at the path that is no shorter than the one
    written for the same file (inode numbers may flap) only where it holds the line's
    end where it was written: a longer rewrite of the session as it was before the
    line (a compaction's, a `sed -i` that adds), renamed over it while the line was
    being written, is a takeover whose line is not stored, not an append that returns
    with its line in no file."""
    with SessionLock(session, fence=FenceMode.CONTENT) as lock:
        lock.append({"n": 1})
        rewrite = session.with_name("rewrite.jsonl")
        rewrite.write_bytes(session.read_bytes() + b'{"added": "%s"}\n' % (b"x" * 4000))
        real = _fence._fsync
        swapped: list[bool] = []

        def fsync(fd: Any) -> None:
            real(fd)
            if not swapped:  # the line is in and durable: now the rename
                swapped.append(True)
                os.rename(rewrite, session)

        monkeypatch.setattr(_fence, "_fsync", fsync)
        with pytest.raises(SessionTakeoverError) as caught:
            lock.append({"n": "reply"})
        assert swapped and caught.value.stored is False
        monkeypatch.setattr(_fence, "_fsync", real)
    assert [line.get("n") for line in lines(session)] == [1, None]


def test_a_prompt_window_in_which_nothing_changed_keeps_the_fence_points_witness(
    session: Path,
) -> None:
    """After a prompt window in which nothing was written, a hard link made (a `cp -al`
    backup) or a chmod is still a change of metadata alone, as it is without the
    window: the window's end keeps the fence point the last append left."""
    with SessionLock(session) as lock:
        lock.append({"n": 1})
        with lock.prompt_window():
            pass
        os.link(session, session.with_name("backup.jsonl"))
        session.chmod(0o640)
        lock.append({"n": 2})
        with lock.prompt_window():
            pass
        lock.append({"n": 3})
    assert [line["n"] for line in lines(session)] == [1, 2, 3]


def test_a_takeover_sticks_though_the_file_is_put_back(session: Path) -> None:
    """Under the content fence a foreign line is a takeover; truncating the file back to
    what the run wrote (an identical `sed -i` racing, say) makes the content match
    again, but the run stays taken over: every later fence check, prompt window and
    append raises the same error, and nothing more is written."""
    with SessionLock(session, fence=FenceMode.CONTENT) as lock:
        lock.append({"n": 1})
        size = session.stat().st_size
        foreign_append(session, '{"other": 1}\n')
        with pytest.raises(SessionTakeoverError) as first:
            lock.append({"n": 2})
        os.truncate(session, size)
        for check in (lock.verify_fence, lambda: lock.append({"n": 3})):
            with pytest.raises(SessionTakeoverError) as again:
                check()
            assert (again.value.expected, again.value.actual) == \
                (first.value.expected, first.value.actual)
            assert again.value.stored is False
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            pass
    assert [line["n"] for line in lines(session)] == [1]
    with SessionLock(session, fence=FenceMode.CONTENT) as lock:  # a new run: its own
        lock.append({"n": 4})
    assert [line["n"] for line in lines(session)] == [1, 4]


def test_a_run_whose_session_was_written_since_its_acquire_does_not_start_its_command(
    session: Path,
) -> None:
    """`fencelock run`'s look for a torn line before the command starts: a line written
    from outside the protocol since the acquire is a takeover, raised as one (the run
    does not start its command), not a warning about a torn line that is not there."""
    from fencelock import _supervisor

    session.write_text('{"a": 1}\n')
    with SessionLock(session, "run") as lock:
        foreign_append(session, '{"other": 1}\n')
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(SessionTakeoverError):
                _supervisor._set_torn_tail_aside(lock)
