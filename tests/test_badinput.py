"""The bad-input matrix: every malformed sidecar, record, directory and disk condition
gives a clear error that names the file, and destroys nothing.

Planted non-regular files run under a timeout guard, so a hang fails the test instead
of stalling the suite. Permission cases drop to an unprivileged uid in a child process
(``privdrop``); disk faults use the library's I/O seams ``fencelock._fence._write`` and
``fencelock._fence._fsync`` or, where mounting is allowed, a real tiny tmpfs.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import marks
import pytest
from conftest import SpawnHolder, immutable, record_of
from marks import needs_root, needs_xattr
from privdrop import NOBODY, as_user, mount_tmpfs, open_directory, remount, umount

from fencelock import (
    CoordinationError,
    CorruptRecordError,
    FenceLockError,
    Phase,
    RecordTooLargeError,
    SessionLock,
    SessionWriteError,
    SidecarAccessError,
    State,
    UnsafePathError,
    UnsafeSidecarError,
    _fence,
    _platform,
    clear,
    probe,
    recover,
    scan,
    verify,
)
from fencelock._record import MAX_RECORD, RECORD_HEAD
from fencelock._tokens import REMOVED_MARKER

pytestmark = pytest.mark.torture

GUARD = 10.0
"""Seconds any single library call may take before the test calls it a hang."""


def guarded(fn: Callable[[], Any], timeout: float = GUARD) -> Any:
    """Call ``fn`` in a thread; fail (instead of hanging) if it does not return."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{fn} hung for {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def sidecar_of(session: Path) -> Path:
    return Path(str(session) + ".holder")


def snapshot(path: Path) -> tuple[Any, ...]:
    """What must not change: type, inode, mode, size, mtime, and a symlink's target."""
    st = os.lstat(path)
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return (stat.S_IFMT(st.st_mode), st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, target)


# -- planted non-regular sidecars ---------------------------------------------------


def _plant(kind: str, sidecar: Path, victim: Path) -> Iterator[None]:
    if kind == "symlink":
        victim.write_bytes(b"precious bytes, not a record\n")
        sidecar.symlink_to(victim)
    elif kind == "symlink-to-empty":
        victim.write_bytes(b"")  # an empty victim would read as a free record
        sidecar.symlink_to(victim)
    elif kind == "dangling-symlink":
        sidecar.symlink_to(victim)  # acquire must not create the victim through it
    elif kind == "directory":
        sidecar.mkdir()
        (sidecar / "keep").write_text("x")
    elif kind == "fifo":
        os.mkfifo(sidecar)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(sidecar.parent)  # socket paths are limited to ~108 bytes
        try:
            s.bind(sidecar.name)
        finally:
            os.chdir(cwd)
        yield
        s.close()
        return
    elif kind == "device":
        marks.require("root")
        os.mknod(sidecar, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    yield


KINDS = ["symlink", "symlink-to-empty", "dangling-symlink", "directory", "fifo", "socket",
         "device"]


@pytest.fixture(params=KINDS)
def planted(request: pytest.FixtureRequest, session: Path) -> Iterator[tuple[str, Path, Path]]:
    sidecar, victim = sidecar_of(session), session.parent / "victim.txt"
    gen = _plant(request.param, sidecar, victim)
    next(gen)
    yield request.param, sidecar, victim
    if request.param == "fifo":
        # Unstick any opener that did hang, so the guard's thread can end.
        fd = os.open(sidecar, os.O_RDWR | os.O_NONBLOCK)
        os.close(fd)
    next(gen, None)


def _untouched(kind: str, sidecar: Path, victim: Path, before: tuple[Any, ...],
               victim_before: bytes | None) -> None:
    assert snapshot(sidecar) == before
    if kind == "dangling-symlink":
        assert not victim.exists(), "something created the symlink's target"
    elif victim_before is not None:
        assert victim.read_bytes() == victim_before


def test_planted_sidecar_refused_by_acquire(planted: tuple[str, Path, Path], session: Path) -> None:
    kind, sidecar, victim = planted
    before = snapshot(sidecar)
    victim_before = victim.read_bytes() if victim.exists() else None
    for on_contention in ("fail", "wait"):
        lock = SessionLock(session, "bad", on_contention=on_contention, timeout=1)
        with pytest.raises(UnsafeSidecarError) as exc:
            guarded(lock.acquire)
        assert str(sidecar) in str(exc.value)
        assert not lock.held
    _untouched(kind, sidecar, victim, before, victim_before)
    assert not session.exists()


def test_planted_sidecar_reported_by_probe_and_scan(
    planted: tuple[str, Path, Path], session: Path
) -> None:
    kind, sidecar, victim = planted
    before = snapshot(sidecar)
    victim_before = victim.read_bytes() if victim.exists() else None
    status = guarded(lambda: probe(session))
    assert status.state == "unreadable"
    assert str(sidecar) in status.reason
    assert guarded(lambda: probe(sidecar)).state == "unreadable"
    rows = guarded(lambda: list(scan(session.parent)))
    assert [r.state for r in rows if r.sidecar == str(sidecar)] == ["unreadable"]
    _untouched(kind, sidecar, victim, before, victim_before)


def test_planted_sidecar_refused_by_clear(planted: tuple[str, Path, Path], session: Path) -> None:
    kind, sidecar, victim = planted
    before = snapshot(sidecar)
    victim_before = victim.read_bytes() if victim.exists() else None
    for remove, force in [(False, False), (True, False), (True, True)]:
        with pytest.raises(UnsafeSidecarError) as exc:
            guarded(functools.partial(clear, session, remove=remove, force=force))
        assert str(sidecar) in str(exc.value)
    _untouched(kind, sidecar, victim, before, victim_before)


# -- malformed records --------------------------------------------------------------


def _valid_record(session: Path) -> bytes:
    """A real record, as a holder that died mid-run left it (state held)."""
    code = textwrap.dedent("""
        import os, sys
        from fencelock import SessionLock
        SessionLock(sys.argv[1], "writer").acquire()
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code, str(session)], check=True)
    data = sidecar_of(session).read_bytes()
    assert probe(session).state == "stale"
    return data


def _record_with(session: Path, **fields: Any) -> bytes:
    obj = json.loads(_valid_record(session))
    obj.update(fields)
    return json.dumps(obj).encode()


BAD_RECORDS: dict[str, Callable[[Path], bytes]] = {
    "truncated": lambda s: _valid_record(s).rstrip()[:-40],
    "invalid-utf8": lambda s: _valid_record(s).replace(b'"writer"', b'"wr\xff\xfeiter"'),
    "nested-10000": lambda s: b"[" * 10_000 + b"]" * 10_000,
    "nested-object-10000": lambda s: b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "not-an-object": lambda s: b"[1, 2, 3]\n",
    "pid-0": lambda s: _record_with(s, pid=0),
    "pid-minus-1": lambda s: _record_with(s, pid=-1),
    "pid-2**63": lambda s: _record_with(s, pid=2**63),
    "pid-string": lambda s: _record_with(s, pid="1234"),
    "token-negative": lambda s: _record_with(s, token=-5),
    "version-2": lambda s: _record_with(s, version=2),
    "state-unknown": lambda s: _record_with(s, state="mine"),
    "garbage-100MB": lambda s: b"x" * (100 * 1024 * 1024),
    "nul-then-garbage": lambda s: b"\0" * 10 + b"{not json",
    "zero-filled": lambda s: b"\0" * 600,  # what a crash can leave in place of a record
    "spaces-only": lambda s: b"   \n",
    "nul-100MB": lambda s: b"\0" * (100 * 1024 * 1024),
    "time-nan": lambda s: _valid_record(s).replace(b'"acquired_at":', b'"acquired_at":NaN,"x":', 1),
    "time-infinity": lambda s: _record_with(s, heartbeat_at=float("inf")),
    "time-huge-integer": lambda s: _record_with(s, acquired_at=10**400),
    "token-past-limit-in-header": lambda s: _valid_record(s).replace(
        b'"token":1 ', b'"token":9999999999999999999', 1).replace(b'"held"    ', b'"released"'),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_corrupt_record_is_reported_never_free_and_kept(name: str, session: Path) -> None:
    sidecar = sidecar_of(session)
    data = BAD_RECORDS[name](session)
    sidecar.write_bytes(data)
    before = snapshot(sidecar)

    status = guarded(lambda: probe(session))
    assert status.state == "unreadable", status
    assert "corrupt" in status.reason and str(sidecar) in status.reason
    with pytest.raises(CorruptRecordError) as exc:
        guarded(SessionLock(session, "next", on_contention="fail").acquire)
    assert str(sidecar) in str(exc.value)
    with pytest.raises(CorruptRecordError):
        guarded(lambda: clear(session))
    with pytest.raises(CorruptRecordError):
        guarded(lambda: clear(session, remove=True))
    assert snapshot(sidecar) == before
    assert sidecar.read_bytes() == data

    # The documented way out: set it aside, and the next run starts over.
    status = clear(session, force=True)
    assert not sidecar.exists()
    aside = [p for p in session.parent.iterdir() if p.name.startswith(sidecar.name + ".corrupt")]
    assert len(aside) == 1 and aside[0].read_bytes() == data
    assert "moved" in status.reason
    with SessionLock(session, "fresh") as lock:
        assert lock.info is not None


def test_empty_record_is_free(session: Path) -> None:
    sidecar = sidecar_of(session)
    sidecar.write_bytes(b"")  # created by an acquirer that has not written yet
    status = probe(session)
    assert (status.state, status.record) == ("free", None)
    with SessionLock(session, "a") as lock:
        assert lock.info is not None and lock.info.previous is None


@pytest.mark.parametrize("written", ["emptied", "another layout"])
def test_a_release_after_the_sidecar_was_written_over_leaves_a_whole_record(
    session: Path, written: str
) -> None:
    """Something outside the protocol empties the held sidecar (``: > S.holder``) or
    writes a record of its own layout there during a run: the release (of a run of a
    millisecond or more, as every real run is) writes its whole record, where a flip of
    the head in place made one that read as corrupt and stopped every run after it."""
    sidecar = Path(str(session) + ".holder")
    lock = SessionLock(session, lane="run")
    info = lock.acquire()  # (no append: its record may lag, and the release write it all)
    if written == "emptied":
        os.truncate(sidecar, 0)
    else:
        sidecar.write_text(json.dumps({"version": 1, "state": "held", "token": 99}, indent=2))
    start = time.monotonic()
    while time.monotonic() - start < 0.002:  # the run lasts past the 1 ms a look needs
        time.sleep(0.001)
    lock.release()
    after = probe(session)
    assert after.state == "free", after
    assert after.record is not None and after.record.run_id == info.run_id, after
    assert json.loads(sidecar.read_bytes())["state"] == "released"
    with SessionLock(session, lane="next") as again:
        assert again.info is not None and again.info.token == info.token + 1


def test_clear_of_a_stale_record_in_fencelock_layout_changes_only_its_head(
    session: Path,
) -> None:
    record = _valid_record(session).rstrip(b"\n")
    # A writer's own fields in UTF-8, filling the record to its bound; and the prompt
    # phase, as a run that died in its model call leaves it.
    head = record.replace(b'"phase":"write" ', b'"phase":"prompt"', 1)
    note = ',"note":"' + "é" * 100 + '"}\n'
    fill = MAX_RECORD - len(head) + 1 - len(note.encode()) - len(b',"pad":""')
    data = head[:-1] + b',"pad":"' + b"x" * fill + b'"' + note.encode()
    assert len(data) == MAX_RECORD
    sidecar_of(session).write_bytes(data)
    assert probe(session).state == "stale"
    cleared = clear(session)
    assert cleared.state == "stale" and "cleared the stale record" in cleared.reason
    after = sidecar_of(session).read_bytes()
    head_len = len(RECORD_HEAD[State.RELEASED, Phase.WRITE])
    assert after[:head_len] == RECORD_HEAD[State.RELEASED, Phase.WRITE].encode()
    assert after[head_len:] == data[head_len:]  # every other byte as its writer left it
    assert record_of(session).state == "released" and record_of(session).phase == "write"


def test_clear_of_a_stale_record_in_another_layout_keeps_its_fields_in_utf8(
    session: Path,
) -> None:
    obj = json.loads(_valid_record(session))
    obj.update(phase="prompt", note={"ü": "é😀", "csi": "\x9b31m"})
    sidecar_of(session).write_bytes(json.dumps(obj, indent=2, ensure_ascii=False).encode())
    assert clear(session).state == "stale"
    after = sidecar_of(session).read_bytes()
    # UTF-8 as its writer had it, but for a C1 control, which the record never holds raw
    assert '"note":{"ü":"é😀","csi":"\\u009b31m"}'.encode() in after, after
    cleared = record_of(session)
    assert (cleared.state, cleared.phase, cleared.extra) == (
        "released", "write", {"note": {"ü": "é😀", "csi": "\x9b31m"}})


def test_clear_of_a_stale_record_that_grows_past_the_bound_when_encoded_again(
    session: Path,
) -> None:
    """A readable stale record in another layout is marked released by writing it anew,
    its own fields kept; a field of numbers written short (``1e5``, encoded again as
    ``100000.0``) can take that past the record's bound. `clear` then called the
    record corrupt and said to run `clear --force`, which failed the same way. It is
    cleared now, without the fields that do not fit."""
    obj = json.loads(_valid_record(session))
    text = json.dumps(obj)[:-1] + ', "samples": [' + ",".join(["1e5"] * 14_000) + "]}"
    assert len(text) < MAX_RECORD < len(text.replace("1e5", "100000.0"))
    sidecar_of(session).write_text(text)
    assert probe(session).state == "stale"
    cleared = clear(session)
    assert cleared.state == "stale" and "cleared the stale record" in cleared.reason
    assert cleared.reason.endswith(" without its fields of other writers (samples), which "
                                   "no longer fit in a record once written again")
    after = record_of(session)
    assert (after.state, after.token, after.extra) == ("released", obj["token"], {})


def test_clear_of_a_stale_record_too_large_to_mark_released_keeps_it_until_forced(
    session: Path,
) -> None:
    """A stale record in another layout whose text takes more room as fencelock writes
    it (raw C1 controls, two bytes each, come back as six-byte escapes) past the bound,
    even without fields of its writer's own: `clear` says so and keeps it as it is (it
    had been called corrupt), and `clear --force` sets it aside as a corrupt one is; the
    tokens go on from it."""
    obj = json.loads(_valid_record(session))
    text = "\x9b" * 4096
    obj.update(host=text, lane=text, process_start=text, run_id=text, origin=text)
    # Its token's key spelled with an escape, as a writer may: the set-aside keeps the
    # token read, not only one its bytes spell out.
    data = json.dumps(obj, ensure_ascii=False).replace(
        '"token":', '"\\u0074oken":', 1).encode()
    assert len(data) < MAX_RECORD and b'"token"' not in data
    sidecar_of(session).write_bytes(data)
    assert probe(session).state == "stale" and not session.exists()
    with pytest.raises(FenceLockError, match="over the 64 KiB bound") as refused:
        clear(session)
    assert not isinstance(refused.value, CorruptRecordError)
    assert f"clear --force {sidecar_of(session)}" in str(refused.value)
    assert sidecar_of(session).read_bytes() == data  # kept as it was
    out = subprocess.run([sys.executable, "-m", "fencelock", "clear", "--json", str(session)],
                         capture_output=True, text=True, timeout=60, check=False)
    (row,) = json.loads(out.stdout)
    assert out.returncode == 1 and (row["found"], row["token"], row["cleared"]) == (
        "stale", obj["token"], False), row
    with pytest.raises(RecordTooLargeError) as kept:  # --remove keeps it too
        clear(session, remove=True)
    assert kept.value.status is not None and kept.value.status.record is not None
    assert kept.value.status.record.token == obj["token"]
    assert sidecar_of(session).read_bytes() == data
    # recover re-fires on it: the run's record is written over it, its token after it.
    # A recover's copy cut short beside it (the record names an origin) is removed,
    # by recover's clear and by --force, as for any stale record.
    part = Path(str(session) + ".part")
    part.write_text("{}\n")
    assert recover(session, wait=0).action == "refire"
    assert sidecar_of(session).read_bytes() == data and not part.exists()
    part.write_text("{}\n")
    out = subprocess.run([sys.executable, "-m", "fencelock", "clear", "--force",
                          str(session.parent)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "too large to mark released, moved to" in out.stdout, out.stdout
    assert "; removed " in out.stdout and not os.path.lexists(str(session) + ".part")
    assert out.stdout.rstrip().endswith("set 1 record aside"), out.stdout
    (copy,) = session.parent.glob("*.corrupt-*")
    assert copy.read_bytes() == data
    with SessionLock(session, "next") as lock:
        assert lock.info is not None and lock.info.token == obj["token"] + 1


@pytest.mark.parametrize("with_file", [False, True], ids=["no-session-file", "renamed-over"])
def test_clear_force_keeps_a_token_only_the_whole_record_shows(
    session: Path, with_file: bool
) -> None:
    """The token of a record too large to write back, its key spelled with an escape
    that no scan of its text reads: where the directory's removed marker cannot keep it
    (here a hard link, which is not written), and the session file has no mark or loses
    it (written anew and renamed over), the set-aside copy keeps it: a copy that parses
    whole gives its token."""
    obj = json.loads(_valid_record(session))
    text = "\x9b" * 4096
    obj.update(host=text, lane=text, process_start=text, run_id=text, origin=text,
               token=5000)
    data = json.dumps(obj, ensure_ascii=False).replace(
        '"token":', '"\\u0074oken":', 1).encode()
    sidecar_of(session).write_bytes(data)
    if with_file:
        session.write_text('{"n": 1}\n')
    marker = session.parent / REMOVED_MARKER
    marker.write_text("1\n")
    os.link(marker, session.parent / "backup")
    forced = clear(session, force=True)
    assert forced.set_aside is not None and Path(forced.set_aside).read_bytes() == data
    if with_file:  # its mark goes with it
        anew = session.parent / "anew"
        anew.write_text('{"n": 1}\n')
        os.replace(anew, session)
    with SessionLock(session, "next") as lock:
        assert lock.info is not None and lock.info.token == 5001


def test_pid_values_in_records_are_bounded(session: Path) -> None:
    # PID 0 and -1 would address process groups if anything ever signalled them;
    # the decoder refuses them (covered above); the largest valid pid is accepted.
    sidecar = sidecar_of(session)
    sidecar.write_bytes(_record_with(session, pid=2**31 - 1))
    status = probe(session)
    assert status.state == "stale"
    assert status.record is not None and status.record.pid == 2**31 - 1
    assert status.owner_alive is False


def test_reads_are_bounded_on_a_huge_sidecar(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar = sidecar_of(session)
    record = _valid_record(session)
    with open(sidecar, "r+b") as f:  # a valid record followed by 100 MB of padding
        f.write(record + b" " * 16)
        f.truncate(100 * 1024 * 1024)
    asked: list[int] = []
    real_pread, real_read = _platform.pread, os.read

    def pread(fd: int, n: int, offset: int) -> bytes:
        asked.append(n)
        return real_pread(fd, n, offset)

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(_platform, "pread", pread)
    monkeypatch.setattr(os, "read", read)
    status = probe(session)
    list(scan(session.parent))
    monkeypatch.undo()
    # The padding after the record is ignored: it reads as the dead holder's record.
    assert status.state == "stale", status.reason
    assert status.record is not None and status.record.lane == "writer"
    assert asked and max(asked) <= MAX_RECORD + 1


def test_huge_empty_sidecar_does_not_amplify_writes(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar = sidecar_of(session)
    with open(sidecar, "wb") as f:
        f.write(_valid_record(session).replace(b'"held"    ', b'"released"'))
        f.truncate(100 * 1024 * 1024)  # a released record padded out to 100 MB
    assert probe(session).state == "free"
    written = [0]
    real_pwrite = _platform.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        written[0] += len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(_platform, "pwrite", pwrite)
    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        with lock.prompt_window():
            pass
        lock.append({"n": 2})
    monkeypatch.undo()
    assert probe(session).state == "free"
    assert 0 < written[0] < 16 * MAX_RECORD, f"{written[0]} bytes written for five record updates"


def test_terminal_escapes_in_lane_are_kept_and_not_raw_in_the_file(session: Path) -> None:
    lane = "evil\x1b[2J\x1b]0;pwned\x07\x9b31m\r\nlane\u202e\x7f\x85"
    with SessionLock(session, lane) as lock:
        assert lock.info is not None and lock.info.lane == lane
        status = probe(session)
        assert status.record is not None and status.record.lane == lane
        raw = sidecar_of(session).read_bytes()
        # C0 and C1 alike (U+009B is CSI to a terminal), and DEL
        for byte in (b"\x1b", b"\x07", b"\r", b"\n{", b"\x7f", "\x9b".encode(),
                     "\x85".encode()):
            assert byte not in raw, f"raw {byte!r} in the record: `cat` would act on it"
    assert record_of(session).lane == lane


# -- the session file itself --------------------------------------------------------


def test_session_that_is_a_directory_gives_a_clear_error(session: Path) -> None:
    session.mkdir()
    (session / "keep").write_text("x")
    with pytest.raises(FenceLockError) as exc:  # refused before the run starts
        SessionLock(session, "a").acquire()
    assert str(session) in str(exc.value) and "a directory" in str(exc.value)
    assert not isinstance(exc.value, CoordinationError)
    assert (session / "keep").read_text() == "x"
    assert not os.path.lexists(sidecar_of(session))  # refused before creating anything
    status = probe(session)  # and the probe says why no run can use it
    assert status.state == "unreadable" and "a directory" in status.reason


def test_clear_leaves_the_sidecar_of_a_session_path_that_became_a_directory(
    session: Path
) -> None:
    """A sidecar whose session path is now a directory (or was never a session: the
    directory ``sess`` beside a file ``sess.holder``): clear, even with --remove,
    refuses as acquire does and probe reports, and the sidecar stays."""
    with SessionLock(session, "a"):
        pass
    session.mkdir()
    sidecar = sidecar_of(session)
    before = sidecar.read_bytes()
    for remove in (False, True):
        with pytest.raises(UnsafePathError) as exc:
            clear(session, remove=remove)
        assert str(exc.value).startswith(f"{session}: is a directory")
    done = subprocess.run([sys.executable, "-m", "fencelock", "clear", "--remove",
                           str(sidecar)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is a directory" in done.stderr, done.stderr
    assert sidecar.read_bytes() == before


_FIFO_SESSION = textwrap.dedent("""
    import json, os, sys
    from fencelock import SessionLock
    lock = SessionLock(sys.argv[1], "a", on_contention="fail")
    try:
        lock.acquire()
        lock.append({"n": 1})
        print(json.dumps({"ok": True}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
""")


def test_session_that_is_a_fifo_does_not_hang(session: Path) -> None:
    os.mkfifo(session)
    try:
        done = subprocess.run([sys.executable, "-c", _FIFO_SESSION, str(session)],
                              capture_output=True, text=True, timeout=GUARD)
    except subprocess.TimeoutExpired:
        pytest.fail("acquire/append on a FIFO session hung")
    result = json.loads(done.stdout)
    assert "error" in result and str(session) in result["message"]
    assert stat.S_ISFIFO(os.lstat(session).st_mode)


def test_a_session_name_gone_during_a_scan_is_not_called_unreadable(session: Path) -> None:
    """A session name the listing found as a FIFO, and which is gone by the time the
    scan comes to it, is looked at as any session, not reported "gone, not a regular
    file" (unreadable, exit 1 from `fencelock status`)."""
    first = session.parent / "0.jsonl"  # sorted before the FIFO: the scan yields it first
    first.write_text('{"n":1}\n')
    os.mkfifo(session)
    rows = scan(session.parent)
    assert next(rows).session == str(first)  # the directory is listed by now
    os.unlink(session)
    row = next(rows)
    assert row.session == str(session) and row.state == "free", row.reason
    assert next(rows, None) is None


def test_session_that_is_a_symlink_is_not_followed(session: Path) -> None:
    victim = session.parent / "victim.txt"
    victim.write_bytes(b"precious line\nlast line without a break")
    before = victim.read_bytes()
    session.symlink_to(victim)
    try:
        with pytest.raises(FenceLockError) as exc:  # refused before the run starts
            SessionLock(session, "a").acquire()
        assert str(session) in str(exc.value) and "a symlink" in str(exc.value)
    finally:
        assert victim.read_bytes() == before, "the symlink's target was modified"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling-symlink", "socket",
                                  "directory"])
def test_an_unusable_session_path_says_what_to_do(session: Path, kind: str) -> None:
    """The refusal of a session path that is not a regular file names the fix, as the
    sidecar's does (it said only that the path was left untouched); for a directory
    (a sessions directory named by mistake, as `hold` takes it) not to remove it."""
    victim = session.parent / "victim.jsonl"
    if kind == "fifo":
        os.mkfifo(session)
    elif kind == "directory":
        session.mkdir()
    elif kind == "socket":
        gen = _plant("socket", session, victim)
        next(gen)
    else:
        if kind == "symlink":
            victim.write_text('{"n":1}\n')
        session.symlink_to(victim)
    before = snapshot(session)
    fix = ("Give the path of the file it points to instead, or remove the link"
           if "symlink" in kind else
           f"Give the path of one session file in it (fencelock status {session} lists them)"
           if kind == "directory" else "Give the path of a regular file, or rename or remove it")
    for call in (SessionLock(session, "a").acquire, lambda: verify(session),
                 lambda: recover(session, wait=0)):
        with pytest.raises(UnsafePathError) as exc:
            guarded(call)
        assert str(exc.value).startswith(f"{session}: is ") and str(exc.value).endswith(fix)
    status = probe(session)  # status and wait give the same fix
    assert status.state == "unreadable" and status.reason.endswith(fix), status.reason
    assert snapshot(session) == before
    if kind == "socket":
        next(gen, None)


def test_torn_file_that_is_a_symlink_is_not_followed(session: Path) -> None:
    victim = session.parent / "victim.txt"
    victim.write_bytes(b"precious\n")
    session.write_bytes(b'{"n":0}\n{"torn')
    Path(str(session) + ".torn").symlink_to(victim)
    with SessionLock(session, "a") as lock, pytest.raises(FenceLockError):
        lock.append({"n": 1})
    assert victim.read_bytes() == b"precious\n"


def test_torn_file_that_is_a_hard_link_is_not_written_through(session: Path) -> None:
    # Another name of the same file (a backup kept by hand, say) must not get the
    # fragment: the .torn name is refused, as a hard-linked sidecar is.
    other = session.parent / "backup.log"
    other.write_bytes(b"BACKUP LOG\n")
    os.link(other, str(session) + ".torn")
    session.write_bytes(b'{"n":0}\n{"torn')
    with SessionLock(session, "a") as lock, pytest.raises(UnsafePathError) as e:
        lock.append({"n": 1})
    assert "a hard link to a file with 2 names" in str(e.value) and ".torn" in str(e.value)
    assert other.read_bytes() == b"BACKUP LOG\n"
    assert session.read_bytes() == b'{"n":0}\n{"torn'


# -- directories --------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("how", ["dir-0555-owned-by-user", "dir-of-another-user"])
def test_unwritable_session_directory(how: str) -> None:
    with open_directory() as sessions:
        if how == "dir-0555-owned-by-user":
            os.chown(sessions, 65534, 65534)
            sessions.chmod(0o555)
        session = sessions / "s.jsonl"
        result = as_user("""
            lock = SessionLock(args["session"], "a")
            try:
                lock.acquire()
                result = {"acquired": True}
            except FenceLockError as e:
                result = {"error": type(e).__name__, "message": str(e)}
            result["probe"] = str(probe(args["session"]).state)
        """, session=str(session))
        assert result["error"] == "SidecarAccessError"
        assert str(session) + ".holder" in result["message"]
        assert f"cannot create files in {sessions}" in result["message"]
        assert result["probe"] == "free"  # nothing there, and nothing was created
        assert list(sessions.iterdir()) == []


def _shut_with_a_sidecar(sessions: Path, record: bytes) -> Path:
    """Make ``sessions`` a directory that takes no new files, holding only the sidecar
    of ``s.jsonl`` with ``record``, all of it the unprivileged user's (`as_user`)."""
    sidecar = sessions / "s.jsonl.holder"
    sidecar.write_bytes(record)
    os.chown(sidecar, 65534, 65534)
    os.chown(sessions, 65534, 65534)
    sessions.chmod(0o555)
    return sidecar


@needs_root
def test_an_append_that_cannot_create_the_session_names_the_directory() -> None:
    """The sidecar is there (this user's), the session file is not, and the directory
    takes no new files: the append says the directory is the cause (it said "this user
    cannot write it; run as its owner", of a file that does not exist)."""
    with open_directory() as sessions:
        _shut_with_a_sidecar(sessions, b"")
        result = as_user("""
            lock = SessionLock(args["session"], "a")
            lock.acquire()
            try:
                lock.append({"role": "user"})
                result = ["appended"]
            except FenceLockError as e:
                result = [type(e).__name__, str(e)]
            lock.release()
        """, session=str(sessions / "s.jsonl"))
        assert result[0] == "SessionWriteError", result
        assert f"this user cannot create files in {sessions}; fix its permissions" in result[1]
        assert "the entry was not stored" in result[1]
        assert not (sessions / "s.jsonl").exists()


@needs_root
@pytest.mark.parametrize("writable", [True, False])
def test_a_torn_tail_that_cannot_be_kept_aside_names_what_refused(writable: bool) -> None:
    """The session (this user's) ends in a torn line, and the directory takes no new
    files: the append names the directory as the cause, not the `.torn` file that is
    not there (it said "this user cannot write it"). A `.torn` there that this user
    cannot write is named itself. Nothing is cut or stored either way."""
    with open_directory() as sessions:
        sidecar = _shut_with_a_sidecar(sessions, b"")
        session, torn = sessions / "s.jsonl", sessions / "s.jsonl.torn"
        os.chmod(sessions, 0o755)
        session.write_text('{"a": 1}\n{"torn')
        os.chown(session, 65534, 65534)
        if not writable:
            torn.write_text("")
            torn.chmod(0o444)
        os.chmod(sessions, 0o555)
        result = as_user("""
            with SessionLock(args["session"], "a") as lock:
                try:
                    lock.append({"b": 2})
                    result = ["appended"]
                except FenceLockError as e:
                    result = [type(e).__name__, str(e)]
        """, session=str(session))
        assert result[0] == "SessionWriteError", result
        if writable:
            assert f"this user cannot create files in {sessions}; fix its permissions" in result[1]
        else:
            assert f"{torn}: keeping the torn last line aside failed" in result[1]
            assert "this user cannot write it" in result[1]
        assert "the entry was not stored" in result[1]
        assert session.read_text() == '{"a": 1}\n{"torn' and sidecar.exists()


@needs_root
@pytest.mark.parametrize("earlier", ['{"earlier": 1}\n', '{"earl'])
def test_a_torn_file_this_user_may_write_but_not_read_still_gets_the_fragment(
    earlier: str,
) -> None:
    """`S.torn` with mode 0200 (write only): the torn tail is kept aside and cut as it
    was before the check that reads what it holds, not refused; on a line of its own
    even after a copy cut short (its end cannot be read: a newline goes first, an empty
    line at worst)."""
    with open_directory() as sessions:
        os.chown(sessions, 65534, 65534)
        session, torn = sessions / "s.jsonl", sessions / "s.jsonl.torn"
        session.write_text('{"a": 1}\n{"torn')
        torn.write_text(earlier)
        for path, mode in ((session, 0o600), (torn, 0o200)):
            os.chown(path, 65534, 65534)
            path.chmod(mode)
        result = as_user("""
            warnings.simplefilter("ignore")
            with SessionLock(args["session"], "a") as lock:
                lock.append({"b": 2})
            result = "appended"
        """, session=str(session))
        assert result == "appended", result
        assert session.read_text() == '{"a": 1}\n{"b":2}\n'
        assert torn.read_text() == earlier + '\n{"torn\n'


@needs_root
def test_clearing_a_live_session_one_cannot_write_says_it_is_live(
    spawn_holder: SpawnHolder,
) -> None:
    """`clear` never touches a live holder, and says so (SessionContendedError, exit 4),
    also where this user could not write the sidecar anyway (a read-only filesystem, a
    sidecar of another user): a live run is the answer that counts, not the permission
    error a stale record would get. A free one is free (nothing to clear); only
    removing its sidecar needs the write this user lacks."""
    with open_directory() as sessions:
        session = sessions / "s.jsonl"
        sidecar = sessions / "s.jsonl.holder"
        sidecar.touch()
        sidecar.chmod(0o644)  # readable, not writable, by others
        h = spawn_holder(session, lane="live")
        h.acquire()
        before = sidecar.read_bytes()
        clear_it = """
            try:
                clear(args["session"])
                result = {"cleared": True}
            except FenceLockError as e:
                result = {"error": type(e).__name__, "message": str(e)}
        """
        result = as_user(clear_it, session=str(session))
        assert result["error"] == "SessionContendedError", result
        assert f"pid {h.pid}" in result["message"]
        assert sidecar.read_bytes() == before
        assert h.call("release") == "released"
        released = sidecar.read_bytes()
        result = as_user(clear_it, session=str(session))
        assert result == {"cleared": True}  # free: nothing to clear, nothing written
        assert sidecar.read_bytes() == released
        remove_it = clear_it.replace('clear(args["session"])',
                                     'clear(args["session"], remove=True)')
        result = as_user(remove_it, session=str(session))
        assert result["error"] == "SidecarAccessError", result  # removing: why it cannot


@needs_root
@needs_xattr
def test_remove_keeps_the_sidecar_and_says_why_when_the_token_cannot_be_kept() -> None:
    """``clear --remove`` keeps a sidecar whose token it cannot save on the session file
    (without it, tokens could start over); where this user may not set the attribute on
    another user's session file, it says that, and whose file it is, not that the
    filesystem lacks extended attributes."""
    with open_directory() as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        session = sessions / "s.jsonl"
        session.write_text('{"n": 1}\n')
        session.chmod(0o644)  # root's, readable by others
        result = as_user("""
            with SessionLock(args["session"], "a"):
                pass
            st = clear(args["session"], remove=True)
            result = {"removed": st.removed, "reason": st.reason}
        """, session=str(session))
        assert result["removed"] is False, result
        assert "sidecar kept" in result["reason"]
        assert "may not set its user.fencelock.token attribute" in result["reason"]
        assert "uid 0" in result["reason"] and "filesystem" not in result["reason"]
        assert (sessions / "s.jsonl.holder").exists()


@needs_root
def test_a_directory_this_user_cannot_enter_is_named_as_the_cause() -> None:
    """Without search permission on the sessions directory every call fails on the
    sidecar or the session, and the message names the directory, not the file (which
    this user could read, could it reach it)."""
    with open_directory(mode=0o700) as sessions:  # root's, and closed to others
        session = sessions / "s.jsonl"
        with SessionLock(session, "root-run") as lock:
            lock.append({"n": 1})
        before = {p.name: snapshot(p) for p in sessions.iterdir()}
        result = as_user("""
            out = {}
            for name, call in [("acquire", lambda: SessionLock(args["s"], "x").acquire()),
                               ("clear", lambda: clear(args["s"])),
                               ("recover", lambda: recover(args["s"], wait=0)),
                               ("verify", lambda: verify(args["s"]))]:
                try:
                    call()
                    out[name] = "ok"
                except FenceLockError as e:
                    out[name] = str(e)
            out["probe"] = probe(args["s"]).reason
            result = out
        """, s=str(session))
        for name, message in result.items():
            assert f"this user cannot enter {sessions} (no search permission)" in message, (
                name, message)
        assert {p.name: snapshot(p) for p in sessions.iterdir()} == before


def test_a_session_name_too_long_for_its_sidecar_says_how_long_names_may_be(
    session: Path,
) -> None:
    """A 250-byte session name is a valid file name, but its sidecar's (257 bytes) is
    not: the error says so and how long a session name may be."""
    long = session.parent / ("n" * 244 + ".jsonl")
    long.write_text('{"n":1}\n')
    with pytest.raises(SidecarAccessError) as exc:
        SessionLock(long, "a").acquire()
    message = str(exc.value)
    assert message.startswith(f"{long}.holder: ")
    assert "its name is 257 bytes" in message and "within 248 bytes" in message
    status = probe(long)
    assert status.state == "unreadable" and "within 248 bytes" in status.reason
    with pytest.raises(SidecarAccessError, match="within 248 bytes"):
        clear(long)
    assert verify(long).ok  # the session itself is readable
    assert long.read_text() == '{"n":1}\n'
    assert [p.name for p in session.parent.iterdir()] == [long.name]


def test_clear_force_of_a_name_too_long_for_its_corrupt_copy_says_how_long_names_may_be(
    session: Path,
) -> None:
    """A 248-byte session name (its sidecar, 255 bytes, fits) whose corrupt record
    `clear --force` would move aside under a longer name: the error names that name and
    how long a session name may be for it, not the sidecar's rule it already meets."""
    long = session.parent / ("c" * 242 + ".jsonl")
    sidecar = Path(f"{long}.holder")
    sidecar.write_bytes(b"garbage{")
    with pytest.raises(SidecarAccessError) as exc:
        clear(long, force=True)
    message = str(exc.value)
    assert ".corrupt-" in message and "within 207 bytes" in message, message
    assert "within 248 bytes" not in message
    assert sidecar.read_bytes() == b"garbage{"


def test_recover_whose_fresh_session_s_path_would_be_too_long_says_so(
    tmp_path: Path, spawn_holder: SpawnHolder
) -> None:
    """A session whose path fits, in a directory so deep that the fresh session recover
    would make (a 42-byte name) passes the system's path limit: the error says the
    path is too long and what to do, not that recover "needs to read it"."""
    base = len(os.fsencode(str(tmp_path)))
    deep = tmp_path
    while len(os.fsencode(str(deep))) < 4060 - 250:
        deep = deep / ("d" * 250)
    deep = deep / ("e" * (4060 - len(os.fsencode(str(deep))) - 1))
    assert base < 4060 and len(os.fsencode(str(deep))) == 4060
    deep.mkdir(parents=True)
    session = deep / "x.jsonl"
    session.write_text('{"n":1}\n')
    holder = spawn_holder(session, lane="stuck")
    holder.acquire()
    with pytest.raises(FenceLockError) as exc:
        recover(session, wait=0)
    message = str(exc.value)
    assert "longer than this system allows" in message and "shorter path" in message, message
    assert "needs to read it" not in message


def test_a_path_longer_than_the_system_allows_says_so(tmp_path: Path) -> None:
    deep = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(17):  # 17 x 251 bytes: past PATH_MAX (4096), no chdir needed
            os.mkdir("d" * 250, dir_fd=deep)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
            os.close(deep)
            deep = inner
    finally:
        os.close(deep)
    session = os.path.join(tmp_path, *["d" * 250] * 17, "s.jsonl")
    for call in (SessionLock(session, "a").acquire, lambda: verify(session),
                 lambda: clear(session)):
        with pytest.raises(SidecarAccessError) as exc:
            call()
        assert f"the path is {len(os.fsencode(str(exc.value.path)))} bytes" in str(exc.value)
        assert "shorter path" in str(exc.value)


@needs_root
def test_force_clear_in_a_directory_it_cannot_write_says_why_and_keeps_the_record() -> None:
    """`clear --force` cannot set a corrupt record aside where it cannot create the new
    name: it says that the directory is the cause (it said only "move the corrupt
    sidecar aside by hand"), and the record stays as it was."""
    with open_directory() as sessions:
        sidecar = _shut_with_a_sidecar(sessions, b"{not a record")
        before = snapshot(sidecar)
        result = as_user("""
            try:
                clear(args["s"], force=True)
                result = "cleared"
            except FenceLockError as e:
                result = [type(e).__name__, str(e)]
        """, s=str(sessions / "s.jsonl"))
        assert result[0] == "SidecarAccessError", result
        assert result[1].startswith(f"{sidecar}: Permission denied; ")
        assert f"this user cannot create files in {sessions}; fix its permissions" in result[1]
        assert result[1].endswith("or move the corrupt sidecar aside by hand")
        assert snapshot(sidecar) == before and sidecar.read_bytes() == b"{not a record"
        assert [p.name for p in sessions.iterdir()] == [sidecar.name]


@needs_root
def test_sidecar_without_permission() -> None:
    with open_directory() as sessions:
        session = sessions / "s.jsonl"
        with SessionLock(session, "root-run") as lock:
            lock.append({"n": 1})
        sidecar = sidecar_of(session)
        before = (snapshot(sidecar), sidecar.read_bytes(), session.read_bytes())
        result = as_user("""
            out = {}
            for name, call in [("acquire", lambda: SessionLock(args["s"], "x").acquire()),
                               ("clear", lambda: clear(args["s"]))]:
                try:
                    call()
                    out[name] = "ok"
                except FenceLockError as e:
                    out[name] = [type(e).__name__, str(e)]
            status = probe(args["s"])
            out["probe"] = [str(status.state), status.reason]
            result = out
        """, s=str(session))
        for name in ("acquire", "clear"):
            kind, message = result[name]
            assert kind == "SidecarAccessError" and str(sidecar) in message, result
        assert result["probe"][0] == "unreadable" and str(sidecar) in result["probe"][1]
        assert (snapshot(sidecar), sidecar.read_bytes(), session.read_bytes()) == before


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "mnt"
    target.mkdir()
    marks.require("linux", "root", "mount")
    why = mount_tmpfs(target, "256k")
    if why:
        marks.unavailable("mount", why, fix="run the suite where root may mount (CAP_SYS_ADMIN)")
    try:
        yield target
    finally:
        umount(target)


def test_read_only_filesystem_an_async_try_looks_off_the_loop(
    tmpfs_dir: Path, foreign_holder: Any
) -> None:
    """On a read-only filesystem, a fail-fast `acquire_async` of a session whose sidecar
    a lock outside fencelock holds finds out who holds it in its thread, not on the
    event loop (that look gives a lock with no live record a moment's grace): the first
    step suspends, and the answer is still `SessionContendedError`."""
    import asyncio

    from fencelock import SessionContendedError

    session = tmpfs_dir / "s.jsonl"
    with SessionLock(session, "before"):
        pass
    remount(tmpfs_dir, "ro")
    try:
        holder = foreign_holder(sidecar_of(session))

        async def main() -> None:
            lock = SessionLock(session, "after", on_contention="fail")
            step = lock.acquire_async()
            assert isinstance(step.send(None), asyncio.Future)  # the look's not done here
            step.close()
            with pytest.raises(SessionContendedError, match="flock"):
                await lock.acquire_async()

        asyncio.run(main())
        holder.release()
    finally:
        remount(tmpfs_dir, "rw")


def test_read_only_filesystem(tmpfs_dir: Path) -> None:
    session = tmpfs_dir / "s.jsonl"
    with SessionLock(session, "before") as lock:
        lock.append({"n": 1})
    # The lock object lives on: once released it holds nothing open, so the remount
    # (which refuses while a file is open for writing) goes through.
    fresh = tmpfs_dir / "never.jsonl"
    lone = tmpfs_dir / "lone.jsonl"  # a session with no sidecar yet
    lone.write_text('{"n": 1}\n')
    sidecar_before = sidecar_of(session).read_bytes()
    remount(tmpfs_dir, "ro")
    try:
        with pytest.raises(SidecarAccessError) as exc:
            SessionLock(session, "after").acquire()
        said = str(exc.value)
        assert "read-only" in said.lower() and str(sidecar_of(session)) in said
        assert "remount it" in said and said.lower().count("read-only") == 1
        with pytest.raises(SidecarAccessError):
            SessionLock(fresh, "after").acquire()
        assert probe(session).state == "free"  # reading still works
        # Nothing to clear is an answer, not an error; removing needs the filesystem.
        cleared = clear(session)
        assert (cleared.state, cleared.reason) == ("free", "was free")
        with pytest.raises(SidecarAccessError, match=r"(?i)read-only"):
            clear(session, remove=True)
        assert sidecar_of(session).read_bytes() == sidecar_before
        # No session to re-fire a run on, whose acquire would fail at once: said so.
        for stuck in (session, lone):
            with pytest.raises(SidecarAccessError, match=r"(?i)read-only") as exc:
                recover(stuck, wait=0)
            assert str(sidecar_of(stuck)) in str(exc.value)
    finally:
        remount(tmpfs_dir, "rw")


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; the file that does it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_status_table_whose_temporary_file_fills_the_disk_keeps_its_rows(
    tmpfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status`'s text table keeps rows past its memory share in a temporary file; when
    the disk that file is on fills up, the rest stay in memory and none is lost."""
    import tempfile

    from fencelock import HolderStatus, ProbeState
    from fencelock._output import StatusTable

    monkeypatch.setattr(tempfile, "tempdir", str(tmpfs_dir))
    # Rows of about 300 bytes: the first batch takes the file's first page, and the
    # batches after the disk is full go into that page until one is cut short.
    sessions = [str(tmp_path / f"{i:03d}-{'x' * 240}.jsonl") for i in range(60)]
    rows = [HolderStatus(s, s + ".holder", ProbeState.FREE) for s in sessions]
    whole = StatusTable()
    table = StatusTable()
    table.SPILL_AFTER = 3
    for i, row in enumerate(rows):
        if i == 3:
            fill(tmpfs_dir)
        whole.add(row, 0.0)
        table.add(row, 0.0)
    assert table._spill is not None
    assert 0 < table._spilled < os.fstat(table._spill.fileno()).st_size  # one cut short
    assert list(table.lines()) == list(whole.lines())
    assert len(list(table.lines())) == 61
    table.close()


def test_real_full_disk(tmpfs_dir: Path) -> None:
    session = tmpfs_dir / "s.jsonl"
    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        filler = fill(tmpfs_dir)
        with pytest.raises(SessionWriteError) as exc:
            lock.append({"n": 2, "pad": "y" * 8192})
        assert str(session) in str(exc.value) and "space" in str(exc.value)
        filler.unlink()
        lock.append({"n": 3})  # the holder goes on once space is back
    assert verify(session).ok
    assert [json.loads(x)["n"] for x in session.read_bytes().splitlines()] == [1, 3]


def test_a_full_disk_leaves_the_old_record_whole(tmpfs_dir: Path) -> None:
    """A record longer than the one before it needs more of the disk: on a full disk the
    acquire fails naming the sidecar and the cause, and the old record is left exactly as
    it was (it was half overwritten, and every later run read it as corrupt until
    `clear --force`); once there is space again the next run takes its token."""
    session = tmpfs_dir / "s.jsonl"
    lock = SessionLock(session, "a")
    first = lock.acquire().token
    lock.release()
    before = sidecar_of(session).read_bytes()
    filler = fill(tmpfs_dir)
    with pytest.raises(SidecarAccessError) as exc:
        SessionLock(session, "L" * 4000).acquire()  # a record past the sidecar's page
    assert str(sidecar_of(session)) in str(exc.value) and "space" in str(exc.value)
    assert sidecar_of(session).read_bytes() == before
    assert probe(session).state == "free"
    filler.unlink()
    lock = SessionLock(session, "L" * 4000)
    assert lock.acquire().token == first + 1
    lock.release()


def test_a_first_acquire_on_a_full_disk_leaves_its_sidecar_in_place_and_empty(
    tmpfs_dir: Path,
) -> None:
    """A new session's first record refused for want of space: the acquire names the
    sidecar and the cause, and leaves the sidecar as an empty file (no record: free),
    in place. Not removed: a process outside fencelock may be waiting on it (flock(1)
    locks what it opened, and would then hold a removed file while a run takes a new
    sidecar at the name)."""
    session = tmpfs_dir / "s.jsonl"
    filler = fill(tmpfs_dir)
    with pytest.raises(SidecarAccessError) as exc:
        SessionLock(session, "a").acquire()
    assert str(sidecar_of(session)) in str(exc.value) and "space" in str(exc.value)
    assert sidecar_of(session).read_bytes() == b"" and probe(session).state == "free"
    filler.unlink()
    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})


def test_a_recover_on_a_full_disk_leaves_no_successor_sidecar(
    tmpfs_dir: Path, spawn_holder: SpawnHolder
) -> None:
    """A recover of a stuck run that cannot start the fresh session (no space for its
    first record) leaves nothing of it: the successor's name is the same for every
    recover of that run, and an empty sidecar left at it was listed as a session of its
    own for good once the run ended and recovers re-fired the old session. (Removed
    under its lock: only recovers know that name.)"""
    session = tmpfs_dir / "s.jsonl"
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    filler = fill(tmpfs_dir)
    before = sorted(os.listdir(tmpfs_dir))
    with pytest.raises(FenceLockError, match="a fresh session could not be started") as exc:
        recover(session, wait=0)
    assert "--no-carry" not in str(exc.value)  # the record did not fit, not the copy
    assert sorted(os.listdir(tmpfs_dir)) == before
    filler.unlink()
    h.kill()
    assert recover(session, wait=0).action == "refire"
    assert sorted(os.listdir(tmpfs_dir)) == sorted(n for n in before if n != "filler")


def _lane_for_a_page_edge(session: Path) -> str:
    """A lane whose held record, written with no session file (fingerprint null), ends
    just short of the sidecar's first page: the fence point a release adds takes it past."""
    with SessionLock(session, "a"):
        pass
    base = sidecar_of(session).stat().st_size
    return "L" * (4096 - 32 - base + 1)


def test_a_full_disk_at_release_still_marks_the_session_released(tmpfs_dir: Path) -> None:
    """A release whose record grows past the sidecar's page (its first append's fence
    point added) on a full disk flips "held" to "released" in place: the session reads
    as released, not as stale (owner died mid-run), and the release raises nothing. The
    record keeps the fence point of its last write, so status shows the fence as moved."""
    session = tmpfs_dir / "s.jsonl"
    lock = SessionLock(session, _lane_for_a_page_edge(session))
    token = lock.acquire().token
    assert sidecar_of(session).stat().st_size <= 4096
    lock.append({"n": 1})
    filler = fill(tmpfs_dir)
    lock.release()
    st = probe(session)
    assert st.record is not None
    assert (st.state, st.record.state, st.record.token) == ("free", "released", token)
    assert st.fence_ok is False and st.record.fingerprint is None
    filler.unlink()
    assert lock.acquire().token == token + 1
    lock.append({"n": 2})
    lock.release()
    assert probe(session).fence_ok is True
    assert [json.loads(x)["n"] for x in session.read_bytes().splitlines()] == [1, 2]


def test_a_release_that_cannot_mark_the_record_says_it_reads_as_stale(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where neither the whole record nor the one-word flip can be written (the
    filesystem turned read-only during the run), the release still lets go, and its
    error says that the session reads as stale and how to mark it released; no "try
    again" (a second release has nothing to release)."""
    from fencelock import _platform

    lock = SessionLock(session, "a")
    lock.acquire()
    lock.append({"n": 1})
    monkeypatch.setattr(_platform, "pwrite", functools.partial(_fail, errno.EROFS))
    with pytest.raises(SidecarAccessError) as exc:
        lock.release()
    monkeypatch.undo()
    message = str(exc.value)
    assert str(sidecar_of(session)) in message and "writable filesystem" not in message
    assert "reads as stale" in message and f"fencelock clear {session}" in message
    assert "try again" not in message
    assert probe(session).state == "stale"
    assert not lock.held
    clear(session)
    record = probe(session).record
    assert probe(session).state == "free" and record is not None and record.state == "released"


def _no_room(*_: Any) -> int:
    raise SidecarAccessError("sidecar", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                             "free some space")


def test_a_release_in_the_prompt_window_on_a_full_disk_ends_the_window_too(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-place release of a full disk marks the record released in the write
    phase, as the whole record would have, not released in the prompt phase."""
    from fencelock import _sidecar

    lock = SessionLock(session, "a")
    lock.acquire()
    lock.append({"n": 1})
    window = lock.prompt_window()
    window.__enter__()
    monkeypatch.setattr(_sidecar, "write_bytes", _no_room)
    lock.release()
    monkeypatch.undo()
    record = probe(session).record
    assert record is not None and (record.state, record.phase) == ("released", "write")
    assert sidecar_of(session).read_text().startswith(RECORD_HEAD[State.RELEASED, Phase.WRITE])


def test_an_append_whose_record_cannot_follow_is_stored_and_said_so(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the prompt window an append writes the record at once; when that write fails
    (a full disk) the line is in the session all the same, so the append does not
    raise (a caller would append it again: twice in the file) but warns; the release
    writes the record whole once it can."""
    from fencelock import FenceLockWarning, _sidecar

    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        with lock.prompt_window():
            monkeypatch.setattr(_sidecar, "write_bytes", _no_room)
            with pytest.warns(FenceLockWarning, match="the line is stored, but its holder "
                                                      "record could not follow it"):
                lock.append({"n": 2})
            monkeypatch.undo()
    assert [json.loads(x)["n"] for x in session.read_bytes().splitlines()] == [1, 2]
    assert probe(session).fence_ok is True


def _fail(code: int, *_: Any) -> int:
    raise OSError(code, os.strerror(code))


def test_a_longer_record_refused_over_the_old_one_is_cut_back_off(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where writing over the old record needs space too (a copy-on-write filesystem,
    full), the new record's end, already written past the old one, is cut off again:
    the sidecar is left exactly as it was."""
    from fencelock import _platform

    with SessionLock(session, "a"):
        pass
    before = sidecar_of(session).read_bytes()
    real = _platform.pwrite

    def full_at_start(fd: int, data: bytes, offset: int) -> int:
        if offset == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(_platform, "pwrite", full_at_start)
    with pytest.raises(SidecarAccessError, match="space"):
        SessionLock(session, "L" * 4000).acquire()
    monkeypatch.undo()
    assert sidecar_of(session).read_bytes() == before


def test_a_first_record_cut_short_by_the_file_size_limit_leaves_no_fragment(
    session: Path,
) -> None:
    """A run under a file size limit smaller than its record (``ulimit -f``): the first
    record's write stops part way. The fragment is cut off again, so the sidecar holds
    no record (free), not a corrupt one that every later run would refuse until
    `clear --force`; the error names the limit."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    done = subprocess.run(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "x", "--", "true"],
        capture_output=True, text=True, timeout=60, check=False, preexec_fn=small_files,
    )
    assert done.returncode == 1 and "ulimit -f" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sidecar_of(session).read_bytes() == b""
    assert probe(session).state == "free"
    with SessionLock(session, "after") as lock:
        assert lock.held


def test_recover_that_cannot_make_a_fresh_session_says_so_and_leaves_nothing(
    tmpfs_dir: Path, spawn_holder: SpawnHolder
) -> None:
    """A live holder, and no room for the copy of its transcript: recover's error says
    that the fresh session could not be started, why, and the way out (--no-fresh), not
    an append's advice; the half-made fresh session is gone, and --json says it too."""
    session = tmpfs_dir / "s.jsonl"
    session.write_bytes(b'{"pad": "' + b"x" * 150_000 + b'"}\n')
    holder = spawn_holder(session, lane="busy")
    holder.acquire()
    before = sorted(os.listdir(tmpfs_dir))
    with pytest.raises(FenceLockError) as exc:
        recover(session, wait=0)
    message = str(exc.value)
    assert message.startswith(f"{session}: still held after ")
    assert "a fresh session could not be started" in message
    assert "No space left on device" in message and "--no-fresh" in message
    assert "or start it empty (--no-carry, carry=False)" in message
    assert "append it again" not in message
    assert sorted(os.listdir(tmpfs_dir)) == before
    done = subprocess.run([sys.executable, "-m", "fencelock", "recover", "--wait", "0",
                           "--json", str(session)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    answer = json.loads(done.stdout)
    assert answer["action"] is None and "could not be started" in answer["error"]
    # It read the holder before it failed: --json names it, as for a session still held.
    assert answer["holder"]["state"] == "live" and answer["holder"]["lane"] == "busy"
    assert sorted(os.listdir(tmpfs_dir)) == before
    # The way out it offers: a fresh session that carries nothing fits.
    done = subprocess.run([sys.executable, "-m", "fencelock", "recover", "--wait", "0",
                           "--no-carry", "--json", str(session)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["action"] == "fresh" and answer["carried_lines"] == 0
    assert Path(answer["session"]).read_bytes() == b""


# -- injected I/O faults ------------------------------------------------------------


def test_a_recover_that_cannot_read_the_transcript_leaves_no_successor_sidecar(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live holder, and an old transcript this recover cannot read (another user's,
    say): the fresh session, named after the stuck run so that every recover of it
    answers the same one, is not begun, and its sidecar is removed too. Left there, it
    would belong to whoever ran the failed recover and keep out the next recover of
    the same run (the session owner's)."""
    from fencelock import _recovery

    session.write_bytes(b'{"n": 1}\n')
    holder = spawn_holder(session, lane="busy")
    holder.acquire()
    before = sorted(os.listdir(session.parent))
    real_open_old = _recovery._open_old

    def unreadable(path: str) -> int:
        raise SidecarAccessError(path, OSError(errno.EACCES, os.strerror(errno.EACCES)),
                                 _recovery._START_EMPTY)

    monkeypatch.setattr(_recovery, "_open_old", unreadable)
    with pytest.raises(FenceLockError, match="a fresh session could not be started"):
        recover(session, wait=0)
    assert sorted(os.listdir(session.parent)) == before
    monkeypatch.setattr(_recovery, "_open_old", real_open_old)
    done = recover(session, wait=0)
    assert done.action == "fresh" and done.carried_lines == 1


def _enospc(*_: Any) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_on_write_is_a_write_error_and_the_holder_goes_on(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        before = session.read_bytes()
        monkeypatch.setattr(_fence, "_write", _enospc)
        with pytest.raises(SessionWriteError) as exc:
            lock.append({"n": 2})
        assert str(session) in str(exc.value) and exc.value.cause.errno == errno.ENOSPC
        assert not isinstance(exc.value, CoordinationError)
        assert session.read_bytes() == before
        monkeypatch.undo()
        lock.append({"n": 3})
    assert [json.loads(x)["n"] for x in session.read_bytes().splitlines()] == [1, 3]


def test_enospc_creating_the_session(session: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new session's first line refused: the file that append made for it is removed
    again (no empty session left behind, as an interrupt leaves none), and the run's
    next append makes it anew."""
    with SessionLock(session, "a") as lock:
        monkeypatch.setattr(_fence, "_write", _enospc)
        with pytest.raises(SessionWriteError) as exc:
            lock.append({"n": 1})
        assert exc.value.stored is False and not session.exists()
        monkeypatch.undo()
        lock.append({"n": 2})
    assert probe(session).state == "free" and probe(session).fence_ok is True
    assert session.read_bytes() == b'{"n":2}\n'


def test_short_write_then_enospc_leaves_no_torn_line(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _fence._write
    calls = [0]

    def short_then_full(fd: int, data: Any) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return real(fd, bytes(data[:7]))  # the disk fills mid-line
        return _enospc()

    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        before = session.read_bytes()
        monkeypatch.setattr(_fence, "_write", short_then_full)
        with pytest.raises(SessionWriteError):
            lock.append({"n": 2, "pad": "z" * 100})
        monkeypatch.undo()
        try:
            assert session.read_bytes() == before, "a torn line was left in the session"
        finally:
            lock.append({"n": 3})  # must not be mistaken for another writer's change
    assert verify(session).ok


def test_fsync_eio_is_raised_once_never_retried(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def eio(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        monkeypatch.setattr(_fence, "_fsync", eio)
        with pytest.raises(SessionWriteError) as exc:
            lock.append({"n": 2})
        assert exc.value.cause.errno == errno.EIO and "fsync" in str(exc.value)
        assert str(session) in str(exc.value)
        assert not isinstance(exc.value, CoordinationError)
        assert len(calls) == 1, f"fsync was called {len(calls)} times after EIO"


def test_after_fsync_eio_the_holder_is_not_told_it_was_taken_over(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with SessionLock(session, "a") as lock:
        lock.append({"n": 1})
        monkeypatch.setattr(_fence, "_fsync", eio)
        with pytest.raises(SessionWriteError):
            lock.append({"n": 2})
        monkeypatch.undo()
        # The failed line was taken back and the fence point kept: the run goes on,
        # and its own next line is not mistaken for another writer's.
        lock.append({"n": 3})
    assert [json.loads(line) for line in session.read_text().splitlines()] == [
        {"n": 1}, {"n": 3}]
    assert verify(session).ok


def test_eio_on_directory_fsync_when_creating(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _fence._fsync
    calls: list[int] = []

    def eio_on_dir(fd: int) -> None:
        calls.append(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    with SessionLock(session, "a") as lock:
        monkeypatch.setattr(_fence, "_fsync", eio_on_dir)
        with pytest.raises(SessionWriteError) as exc:
            lock.append({"n": 1})
        assert "directory" in str(exc.value)
        assert len(calls) == 2  # the file once, the directory once: no retry


def test_force_clear_never_overwrites_an_earlier_aside(session: Path) -> None:
    sidecar = sidecar_of(session)
    now = int(time.time())
    earlier = {}
    for t in range(now - 1, now + 30):  # whatever second the clear lands in
        p = Path(f"{sidecar}.corrupt-{t}")
        p.write_bytes(f"earlier corrupt record {t}".encode())
        earlier[p] = p.read_bytes()
    sidecar.write_bytes(b"{not a record")
    status = clear(session, force=True)
    assert not sidecar.exists()
    for p, data in earlier.items():
        assert p.read_bytes() == data, f"{p.name} was overwritten"
    moved = [p for p in session.parent.iterdir()
             if p.name.startswith(sidecar.name + ".corrupt") and p not in earlier]
    assert len(moved) == 1 and moved[0].read_bytes() == b"{not a record"
    assert str(moved[0]) in status.reason


def test_set_aside_names_cannot_be_exhausted_or_planted_in_advance(session: Path) -> None:
    # Someone who can create files in the directory fills every name a clock-based
    # scheme could pick in the next seconds; the corrupt record still goes aside, to
    # a name nobody could guess, and nothing planted is touched.
    sidecar = sidecar_of(session)
    planted = set()
    start = time.time()
    for t in range(3):
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(start + t))
        for n in range(1000):
            p = Path(f"{sidecar}.corrupt-{stamp}" + (f"-{n}" if n else ""))
            p.write_bytes(b"planted")
            planted.add(p)
    sidecar.write_bytes(b"{not a record")
    status = clear(session, force=True)
    assert status.set_aside is not None and Path(status.set_aside) not in planted
    assert Path(status.set_aside).read_bytes() == b"{not a record"
    assert re.fullmatch(r".*\.corrupt-\d{8}T\d{6}-[0-9a-f]{16}", status.set_aside)
    assert all(p.read_bytes() == b"planted" for p in planted)
    # the token floor still finds the copy under the glob readers use
    assert status.set_aside in glob.glob(glob.escape(str(session)) + ".holder.corrupt-*")


def test_two_forced_clears_in_one_second_keep_both_asides(session: Path) -> None:
    sidecar = sidecar_of(session)
    moved = []
    for n in range(2):
        sidecar.write_bytes(f"{{corrupt {n}".encode())
        status = clear(session, force=True)
        moved.append(status.reason.rsplit(" ", 1)[-1])
    assert moved[0] != moved[1]
    assert [Path(p).read_bytes() for p in moved] == [b"{corrupt 0", b"{corrupt 1"]


def test_hard_linked_sidecar_is_refused(session: Path) -> None:
    other = session.parent / "elsewhere"
    other.write_bytes(b"")
    os.link(other, sidecar_of(session))
    with pytest.raises(UnsafeSidecarError, match="hard link") as exc:
        SessionLock(session, "a").acquire()
    assert other.read_bytes() == b""
    assert "not a regular file" not in str(exc.value)  # it is one, with two names
    # A run may hold it through this name: the fix is to remove the other one.
    assert "Remove its other name" in str(exc.value) and "-samefile" in str(exc.value)
    assert "Remove or rename it" not in str(exc.value)


def test_a_lane_of_emoji_survives_a_takeover(session: Path) -> None:
    """Record text is written as UTF-8: escaped, a 4096-character lane of emoji was
    12 bytes a character, and the next holder's record (which repeats it in
    `previous`) outgrew the 64 KiB bound, leaving the session stuck."""
    lane = "\U0001F600" * 4096
    code = "import sys, os\nfrom fencelock import SessionLock\n" \
        "SessionLock(sys.argv[1], sys.argv[2]).acquire()\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", code, str(session), lane], check=True)
    assert probe(session).state == "stale"
    with SessionLock(session, lane) as lock:
        assert lock.info is not None and lock.info.previous is not None
        assert lock.info.previous.lane == lane[:256]
    assert probe(session).lane == lane


@needs_xattr
def test_tokens_stop_at_their_limit_with_a_clear_error(session: Path) -> None:
    import fencelock

    session.write_text('{"n":0}\n')
    os.setxattr(session, "user.fencelock.token", str(2**63 - 3).encode())
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 2**63 - 2
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 2**63 - 1
    with pytest.raises(fencelock.FenceLockError, match="exhausted"):
        SessionLock(session).acquire()
    assert probe(session).state == "free"  # the record is still a valid one


@needs_xattr
def test_a_mark_with_leading_zeros_reads_as_its_value(session: Path) -> None:
    """A token mark padded with zeros (written by a tool of the operator's) is the
    number it spells, not one past the limit that refuses every acquire."""
    session.write_text('{"n":0}\n')
    os.setxattr(session, "user.fencelock.token", b"0" * 43 + b"5")
    with SessionLock(session) as lock:
        assert lock.info is not None and lock.info.token == 6
    os.setxattr(session, "user.fencelock.token", b"000")
    os.unlink(f"{session}.holder")
    with SessionLock(session) as lock:  # all zeros: no mark to go by
        assert lock.info is not None and lock.info.token == 1


@pytest.mark.parametrize("source", ["mark", "stamp"])
def test_a_floor_at_the_token_limit_names_where_it_came_from(session: Path, source: str) -> None:
    """A session whose sidecar has no record, with a floor at the token limit: the
    error names what gave it, and that fix only. A stamp at the limit said to remove
    the attribute (which was not there) and the .corrupt-* copies (none)."""
    import fencelock
    from fencelock._record import MAX_TOKEN

    stamp = {"_fencelock": {"token": MAX_TOKEN, "run_id": "r"}}
    session.write_text(json.dumps(stamp if source == "stamp" else {"n": 0}) + "\n")
    if source == "mark":
        marks.require("xattr")
        os.setxattr(session, "user.fencelock.token", str(MAX_TOKEN).encode())
    with pytest.raises(fencelock.FenceLockError) as caught:
        SessionLock(session, "x").acquire()
    message = str(caught.value)
    assert f"at their limit ({MAX_TOKEN})" in message
    if source == "mark":
        assert "going by its user.fencelock.token attribute;" in message
        assert "remove the attribute" in message and "stamp" not in message
    else:
        assert "going by a stamp among its last lines;" in message
        assert "set the session file aside" in message and "attribute" not in message
    assert ".corrupt" not in message


def test_the_lsattr_commands_a_fix_suggests_read_back_as_the_paths(tmp_path: Path) -> None:
    """The lsattr commands in an EPERM fix are pasted into a shell: each path is one
    word there, whatever its spaces or quotes."""
    import shlex

    from fencelock import _sidecar

    directory = tmp_path / "my 'sessions'"
    directory.mkdir()
    sidecar = str(directory / "a b.jsonl.holder")
    eperm = OSError(errno.EPERM, os.strerror(errno.EPERM), sidecar)
    for fix in (_sidecar.path_fix(sidecar, eperm, writing=True, sidecar=True),
                str(_sidecar.unlink_error(sidecar, eperm))):
        assert fix is not None
        for command in fix.split("(lsattr ")[1:]:
            words = shlex.split(command.split(")")[0].replace(";", " ; "))
            paths = [w for w in words if w not in ("-d", ";", "lsattr")]
            assert paths and all(p in (sidecar, str(directory)) for p in paths), (fix, paths)


@needs_root
def test_recover_in_an_immutable_directory_says_what_the_run_s_acquire_would(
    tmp_path: Path
) -> None:
    """A session with no sidecar yet, in a directory marked immutable: root's acquire
    is refused with EPERM, and recover, which does not answer a session whose run would
    fail at once, says the same (not "Permission denied": root has every permission)."""
    directory = tmp_path / "frozen"
    directory.mkdir()
    session = directory / "s.jsonl"
    session.write_text('{"n": 1}\n')
    with immutable(directory):
        with pytest.raises(SidecarAccessError) as run:
            SessionLock(session, "run").acquire()
        with pytest.raises(SidecarAccessError) as recovered:
            recover(session, wait=0)
    assert "Operation not permitted" in str(run.value)
    assert f"may be immutable (lsattr -d {shlex.quote(str(directory))}" in str(run.value)
    assert str(recovered.value) == str(run.value)


def test_a_write_refused_with_eperm_names_the_immutable_attribute(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission bits refuse with EACCES; EPERM on a write to an existing file is an
    attribute that binds even root (chattr +i or +a): 'run as its owner' would not
    help, so the fix names lsattr and chattr."""
    from fencelock import _sidecar

    session.write_text("")
    eperm = OSError(errno.EPERM, os.strerror(errno.EPERM), str(session))
    fix = _sidecar.path_fix(str(session), eperm, writing=True, sidecar=False)
    assert fix is not None and "immutable or append-only" in fix and "lsattr" in fix
    eacces = OSError(errno.EACCES, os.strerror(errno.EACCES), str(session))
    fix = _sidecar.path_fix(str(session), eacces, writing=True, sidecar=False)
    # (this user's own file, writable by its mode: the mode is not the cause)
    assert fix is not None and "run as its owner" in fix and "immutable" not in fix
    # The same for a fenced append's write, and for the token mark that `clear --remove`
    # sets on the user's own session file.
    from fencelock import _tokens
    from fencelock._errors import SessionWriteError

    message = str(SessionWriteError(str(session), eperm, "write"))
    assert "immutable or append-only" in message and "run as its owner" not in message

    def refused(*args: object) -> None:
        raise eperm

    monkeypatch.setattr(_tokens, "_raise_mark", refused)
    why = _tokens.save(str(session), 5)
    assert why is not None and "immutable or append-only" in why, why
    assert "as the session file's owner" not in why, why


@pytest.mark.parametrize("mode", [-1, 0o4600, 0o7777777, 0o400, "600", 1.5, True],
                         ids=["negative", "setuid", "huge", "owner-cannot-write", "string",
                              "float", "bool"])
def test_a_mode_that_is_not_permission_bits_is_refused_before_anything_is_made(
    session: Path, mode: Any
) -> None:
    """``mode`` is the permission bits of the files a holder creates: a value that would
    make a setuid, setgid or sticky file, or one its owner could not reopen, is refused
    when the lock is made, not at acquire and not by creating the file."""
    with pytest.raises((ValueError, TypeError), match="mode"):
        SessionLock(session, "a", mode=mode)
    assert os.listdir(session.parent) == []


@pytest.mark.parametrize("lane", [None, 5, b"x"], ids=["none", "int", "bytes"])
def test_a_lane_that_is_not_text_is_refused_by_name(session: Path, lane: Any) -> None:
    with pytest.raises(TypeError, match="lane must be a str"):
        SessionLock(session, lane)
    assert os.listdir(session.parent) == []


@pytest.mark.parametrize(("origin", "error", "said"), [
    ("", ValueError, "origin is empty"), ("  ", ValueError, "origin is empty"),
    ("o" * 4097, ValueError, "longer than 4096"), (b"/s/old.jsonl", TypeError, "must be a str"),
], ids=["empty", "blank", "long", "bytes"])
def test_an_origin_no_record_should_carry_is_refused(
    session: Path, origin: Any, error: type[Exception], said: str
) -> None:
    """An ``origin`` names the session a run replaced: an empty or blank one (which
    status would show as naming nothing) is refused as an empty lane is, before
    anything is written."""
    with pytest.raises(error, match=said):
        SessionLock(session, "a", origin=origin)
    assert os.listdir(session.parent) == []


def test_an_origin_with_undecodable_bytes_is_written_escaped(session: Path) -> None:
    """An origin is a path: a name's undecodable bytes are written escaped and read
    back as they were, as the session's own path is."""
    origin = str(session.parent / "old-\udcff.jsonl")
    with SessionLock(session, "a", origin=origin) as lock:
        assert lock.info is not None and lock.info.origin == origin
    assert b"\\udcff" in Path(str(session) + ".holder").read_bytes()
    record = probe(session).record
    assert record is not None and record.origin == origin


def test_a_path_given_as_bytes_is_the_same_session(session: Path) -> None:
    """A path is a path in any of the forms ``os`` takes (str, bytes, ``PathLike``)."""
    raw = os.fsencode(session)
    with SessionLock(raw, "bytes") as lock:
        lock.append({"n": 1})
        assert lock.session == str(session)
        assert probe(raw).state == "live"
        assert [s.session for s in scan(os.fsencode(session.parent))] == [str(session)]
    assert probe(raw).state == "free"
    assert clear(raw).state == "free"
    assert verify(raw).lines == 1


@pytest.mark.parametrize(("record", "named"), [
    (b'{"version":true,"state":"held","token":3}', "version is true;"),
    (b'{"version":1.0,"state":"held","token":3}', "version is 1.0;"),
    (b'{"version":1,"state":"held"}', "session is missing, not a string"),
    (b'{"version":1,"state":"held","session":"s","pid":null}', "pid is null, not an integer"),
    (b'{"version":1,"state":"held","session":"s","pid":1,"host":"h","lane":"l",'
     b'"run_id":"r","token":true}', "token is true, not an integer"),
    (b'{"version":1,"state":"Held"}', 'state is "Held", not "held" or "released"'),
    (b'{"version":1,"state":"held","token":' + b"9" * 5000 + b"}", "record is corrupt"),
    (b'{"version":1,"state":"held","lane":"unterminated', "starting at offset"),
], ids=["version-true", "version-float", "no-session", "pid-null", "token-true",
        "state-capitalised", "5000-digit-token", "unterminated-string"])
def test_a_malformed_record_is_named_in_fencelock_s_words(
    session: Path, record: bytes, named: str
) -> None:
    """A record is corrupt for what it holds, told without Python's own advice (no
    "sys.set_int_max_str_digits()") and read to the protocol's types (true is no 1)."""
    sidecar = Path(str(session) + ".holder")
    sidecar.write_bytes(record)
    status = probe(session)
    assert status.state == "unreadable" and status.reason is not None
    assert named in status.reason, status.reason
    assert "sys." not in status.reason and "at at" not in status.reason
    assert sidecar.read_bytes() == record


@pytest.mark.parametrize("entry", [{"n": 10**5000}, '{"n": ' + "9" * 5000 + "}"],
                         ids=["object", "text"])
def test_an_integer_python_will_not_write_is_refused_in_plain_words(
    session: Path, entry: Any
) -> None:
    with SessionLock(session, "big") as lock, pytest.raises(FenceLockError) as exc:
        lock.append(entry)
    assert "integer of over" in str(exc.value) and "sys." not in str(exc.value)
    assert "one line of JSON" not in str(exc.value)
    assert not session.exists() or session.read_bytes() == b""


@needs_root
@pytest.mark.parametrize("stale", [False, True])
def test_a_sidecar_the_directory_will_not_let_go_names_the_directory(stale: bool) -> None:
    """Removing a file is the directory's business: a user who may write the sidecar
    but not the directory is told so, not that the sidecar cannot be written; and a
    stale record the clear released first is said to be cleared."""
    with open_directory(mode=0o755) as sessions:  # root's: others cannot remove entries
        session = sessions / "s.jsonl"
        if stale:
            _valid_record(session)  # held by a run that died
        else:
            with SessionLock(session, "before"):
                pass
        sidecar = sessions / "s.jsonl.holder"
        sidecar.chmod(0o666)  # anyone may write the sidecar itself
        before = sidecar.read_bytes()
        remove_it = """
            try:
                clear(args["session"], remove=True)
                result = {"removed": True}
            except FenceLockError as e:
                result = {"error": type(e).__name__, "message": str(e)}
        """
        result = as_user(remove_it, session=str(session))
        assert result["error"] == "SidecarAccessError", result
        assert f"cannot remove entries from {sessions}" in result["message"], result
        assert "cannot write it" not in result["message"]
        if stale:
            assert "cleared the stale record of pid" in result["message"]
            assert "but the sidecar stays" in result["message"]
            assert probe(session).state == "free"
        else:
            assert "cleared" not in result["message"]
            assert sidecar.read_bytes() == before


@needs_root
@pytest.mark.parametrize("marker", [False, True], ids=["marker-refused", "unlink-refused"])
@pytest.mark.parametrize("stale", [False, True])
def test_clear_remove_says_what_it_did_when_the_sidecar_stays(stale: bool, marker: bool) -> None:
    """`clear --remove` that clears a stale record (or finds the session free) and then
    cannot remove the sidecar (a directory this user may not remove entries from, nor
    make the removed-token marker in, unless it is there and writable): its JSON says
    what it found and did, `cleared` true for the stale record, `removed` false, and its
    directory count says the sidecar stays, not that the session could not be cleared;
    exit 1 either way."""
    with open_directory(mode=0o755) as sessions:  # root's: others cannot remove entries
        session = sessions / "s.jsonl"
        sidecar = sessions / "s.jsonl.holder"
        if marker:  # made and writable: the removal itself is what is refused
            (sessions / REMOVED_MARKER).touch(mode=0o666)
            (sessions / REMOVED_MARKER).chmod(0o666)
        clear_it = """
            from click.testing import CliRunner
            from fencelock._cli import main
            done = CliRunner().invoke(main, ["clear", "--remove", *args["argv"]])
            result = [done.exit_code, done.stdout, done.stderr]
        """
        found = "stale" if stale else "free"
        for argv in (["--json", str(session)], [str(sessions)]):
            if stale:
                _valid_record(session)  # held by a run that died
            else:
                with SessionLock(session, "before"):
                    pass
            sidecar.chmod(0o666)  # anyone may write the sidecar itself
            code, out, err = as_user(clear_it, preload=("click.testing", "fencelock._cli"),
                                     argv=argv)
            assert code == 1, (out, err)
            assert f"cannot remove entries from {sessions}" in err, err
            assert sidecar.exists() and probe(session).state == "free"
            if argv[0] == "--json":
                (row,) = json.loads(out)
                assert (row["found"], row["cleared"], row["removed"]) == (found, stale, False)
                assert row["pid"] is not None and row["error"] is not None
            else:
                assert out.splitlines()[-1] == (
                    f"{sessions}: cleared {int(stale)} stale, left 0 live alone, removed 0 "
                    f"sidecars; 1 sidecar could not be removed"), out


@pytest.mark.parametrize("command", [
    ["status"], ["clear"], ["wait"], ["recover"], ["run", "--lane", "x", "--", "true"],
    ["verify"],
])
def test_a_symlink_loop_on_the_way_is_named_as_such(tmp_path: Path, command: list[str]) -> None:
    # loop1 -> loop2 -> loop1: the open fails with ELOOP, as it does for a symlinked
    # sidecar that O_NOFOLLOW refuses; the fix is the path's, not a file's to remove.
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    session = str(tmp_path / "loop1" / "s.jsonl")
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", command[0], session, *command[1:]],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out
    assert "a symlink on the way leads in a loop" in out.stderr, out.stderr
    assert "Remove or rename" not in out.stderr and "is a symlink" not in out.stderr
    with pytest.raises(FenceLockError, match="a symlink on the way leads in a loop"):
        SessionLock(session, "x").acquire()
    assert "a symlink on the way leads in a loop" in probe(session).reason


def test_the_rest_of_a_longer_old_record_after_the_record_is_not_its_own(
    session: Path,
) -> None:
    # A shorter record written over a much longer one is followed by the old one's
    # rest until the file is cut to length; a holder killed in between leaves that
    # rest, which may begin mid-character. The record before it still counts.
    with SessionLock(session, "l" + "\U0001f600" * 2000):
        pass
    with SessionLock(session, "short") as lock:
        token = lock.info.token if lock.info else 0
    sidecar = Path(str(session) + ".holder")
    data = sidecar.read_bytes()
    old_rest = ("\U0001f600" * 2000).encode()[1:]  # begins mid-character
    sidecar.write_bytes(data + old_rest)
    st = probe(session)
    assert st.state == "free" and st.lane == "short", st
    with SessionLock(session, "next") as lock:
        assert lock.info is not None and lock.info.token == token + 1
    # Bytes that are not UTF-8 inside the record itself are corrupt, as before.
    bad = sidecar.read_bytes().replace(b'"next"', b'"n\xffxt"', 1)
    sidecar.write_bytes(bad)
    assert probe(session).state == "unreadable"


NO_THREADS = """
import asyncio, resource, sys, threading
from fencelock import FenceLockError, SessionLock, _registry, probe

def vm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

def no_more_threads():
    threading.stack_size(256 * 1024 * 1024)  # a thread's stack no longer fits in memory
    resource.setrlimit(resource.RLIMIT_AS, (vm() + 64 * 1024 * 1024, resource.RLIM_INFINITY))

def threads_again():
    threading.stack_size(0)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

async def release_without_threads():
    async with SessionLock(sys.argv[3], "t", backend=sys.argv[4]):  # acquired in a thread
        no_more_threads()  # released on the event loop itself (etcd's, in a thread else)

if sys.argv[4] == "local":
    no_more_threads()
else:
    no_more_threads()
    try:  # the process's first etcd acquire: its lease needs a keeper thread
        SessionLock(sys.argv[2], "t", backend=sys.argv[4]).acquire()
    except FenceLockError as e:
        print(e)
    threads_again()
    with SessionLock(sys.argv[2], "t", backend=sys.argv[4]):  # a lease, with its keeper
        print(sorted(t.name for t in threading.enumerate() if t.name.startswith("fencelock")))
    asyncio.run(release_without_threads())
    print(probe(sys.argv[3], backend=sys.argv[4]).state)
    sys.exit()

try:  # held in another process: a timed wait waits in a thread of its own
    SessionLock(sys.argv[1], "t", timeout=30).acquire()
except FenceLockError as e:
    print(e)

async def main():
    async with SessionLock(sys.argv[2], "t") as lock:  # free: taken on the loop, no thread
        print("taken" if lock.held else "not taken")
    try:  # held in another process: acquire_async waits in a thread of its own
        async with SessionLock(sys.argv[1], "t", timeout=30):
            pass
    except FenceLockError as e:
        print(e)
    print("left held" if _registry.any_held() else "nothing held")

asyncio.run(main())
"""


@marks.needs_linux  # /proc/self/status, RLIMIT_AS
def test_a_thread_that_cannot_be_started_is_a_fencelock_error(
    tmp_path: Path, spawn_holder: SpawnHolder, store: str | None
) -> None:
    """Where no thread can be started (this user's thread limit, or memory), a timed
    wait and an `async with` that must wait fail with a `FenceLockError` naming the file
    and what to do, not `threading`'s bare RuntimeError, and leave nothing held; an
    `async with` on a free session needs no thread; one whose release finds no thread
    releases on the event loop."""
    held, free, other = (tmp_path / f"{name}.jsonl" for name in ("held", "free", "other"))
    done = subprocess.run([sys.executable, "-c", NO_THREADS, str(held), str(free), str(other),
                           store or "local"], capture_output=True, text=True, timeout=60)
    if store is not None:
        assert done.returncode == 0, done.stderr
        refused, threads, released = done.stdout.splitlines()
        # No lease is kept without its keeper (it was, unrenewed: the run was lost later).
        assert refused.startswith("etcd://") and "keeping an etcd lease alive needs a " \
            "thread, and the system would not start one" in refused, refused
        assert "fencelock-etcd-lease" in threads
        assert released == "free"  # `async with`'s release, with no thread to release in
        return
    spawn_holder(held).acquire()
    done = subprocess.run([sys.executable, "-c", NO_THREADS, str(held), str(free), str(other),
                           "local"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    waited, taken, acquired, left = done.stdout.splitlines()
    assert waited.startswith(f"{held}.holder: waiting for its lock needs a thread, and the "
                             "system would not start one")
    assert taken == "taken" and left == "nothing held"
    assert acquired.startswith(f"{held}: acquire_async needs a thread")
    assert "ulimit -u" in waited and "ulimit -u" in acquired
    assert probe(free).state == "free" and probe(held).state == "live"


@pytest.mark.parametrize("name", [
    "my session.jsonl", "$(touch PWNED).jsonl", "it's.jsonl", "a\nb.jsonl",
    "caf\u00e9 \\x.jsonl", os.fsdecode(b"\xff\xfe-odd.jsonl"), "x\x01'; touch PWNED #.jsonl",
    "-dash.jsonl",
])
def test_a_suggested_command_names_the_file_it_was_written_for(
    name: str, tmp_path: Path,
) -> None:
    """The command an error suggests (here corrupt record's `clear --force`), pasted into
    a shell, acts on that file: no word split, nothing run, every byte kept."""
    tmp_path = tmp_path / "odd"
    tmp_path.mkdir()
    session = tmp_path / name
    session.write_bytes(b"{}\n")
    sidecar_of(session).write_bytes(b"garbage\n")
    status = subprocess.run([sys.executable, "-m", "fencelock", "status", str(session)],
                            capture_output=True, text=True, timeout=60, check=False)
    command = status.stderr.strip().split("start over with: ", 1)[1]
    assert command.startswith("fencelock clear --force ")
    # A shell without bash's $'...' (dash) may read other bytes, but never runs a part.
    subprocess.run(["sh", "-c", f"fencelock() {{ :; }}; {command}"], capture_output=True,
                   timeout=60, check=False, cwd=tmp_path)
    assert not (tmp_path / "PWNED").exists()
    shell = f'fencelock() {{ "{sys.executable}" -m fencelock "$@"; }}; {command}'
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not sidecar_of(session).exists()  # set aside, under a name beside it
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("*.corrupt-*")] == [
        sidecar_of(session).name]
    assert sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" not in p.name) == [name]


def _deep(tmp_path: Path, length: int) -> int:
    """A descriptor of a directory under ``tmp_path`` whose absolute path is ``length``
    bytes, made one short name at a time (no single call is given the whole path)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    here = len(os.fsencode(str(tmp_path)))
    while here < length:
        name = "d" * min(200, length - here - 1)
        os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, here = inner, here + 1 + len(name)
    return fd


def _fencelock_in(fd: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fencelock", *args], capture_output=True,
                          text=True, timeout=60, check=False, preexec_fn=lambda: os.fchdir(fd))


def test_a_scan_of_a_directory_past_path_max_says_the_path_is_too_long(
    tmp_path: Path,
) -> None:
    fd = _deep(tmp_path, 4300)
    try:
        for args in (["status"], ["status", "--json"], ["clear", "."]):
            done = _fencelock_in(fd, *args)
            assert done.returncode == 1 and "Traceback" not in done.stderr
            assert "longer than this system allows" in done.stderr, done.stderr
            assert "this user can list" not in done.stderr
    finally:
        os.close(fd)


def test_recover_refires_a_free_session_where_a_fresh_one_could_not_be_named(
    tmp_path: Path,
) -> None:
    """Its directory's path leaves room for the session and its sidecar, not for a fresh
    session's longer name: a free session needs none, and recover refires it."""
    fd = _deep(tmp_path, 4060)
    try:
        with open("s.jsonl", "w", opener=lambda p, f: os.open(p, f, 0o600, dir_fd=fd)) as f:
            f.write('{"a":1}\n')
        assert _fencelock_in(fd, "run", "--lane", "x", "s.jsonl", "--", "true").returncode == 0
        done = _fencelock_in(fd, "recover", "--json", "s.jsonl")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["action"] == "refire"
    finally:
        os.close(fd)


def test_a_suggested_status_of_a_directory_named_like_an_option_lists_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "-d").mkdir()
    done = subprocess.run([sys.executable, "-m", "fencelock", "wait", "--", "-d"],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=tmp_path)
    assert done.returncode == 1
    command = re.search(r"\((fencelock status .*) lists the sessions in it\)", done.stderr)
    assert command is not None, done.stderr
    shell = f'fencelock() {{ "{sys.executable}" -m fencelock "$@"; }}; {command[1]}'
    listed = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=60,
                            check=False, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr


def test_a_session_path_through_a_symlink_loop_is_named_as_a_loop(tmp_path: Path) -> None:
    tmp_path = tmp_path / "loop"
    tmp_path.mkdir()
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for args in (["status", "a"], ["status", "a/"], ["run", "a", "--lane", "x", "--", "true"],
                 ["clear", "a"]):
        done = subprocess.run([sys.executable, "-m", "fencelock", *args], capture_output=True,
                              text=True, timeout=60, check=False, cwd=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "leads in a loop" in done.stderr and "Fix or remove the symlink" in done.stderr
        assert "trailing '/'" not in done.stderr and "points to" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing made


@marks.needs_posix
def test_run_at_every_descriptor_limit_says_which_limit_and_the_fix(tmp_path: Path) -> None:
    """`fencelock run` at every limit on open descriptors (`ulimit -n`) too low for it:
    each failure says the limit and how to raise it. One that ran out as fencelock
    loaded a module it imports when needed named that module's source file alone
    ("Error: .../fencelock/_etcd.py: Too many open files"), and one that ran out
    starting the command said only "cannot run it: Too many open files"."""
    import resource

    failed = 0
    for limit in range(5, 12):  # (below 5, Python itself cannot start)
        session = tmp_path / f"{limit}.jsonl"

        def few(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "x", "--",
             "true"],
            capture_output=True, text=True, timeout=60, check=False, preexec_fn=few,
        )
        assert "Traceback" not in done.stderr, (limit, done.stderr)
        if done.returncode != 0:
            failed += 1
            assert "Too many open files" in done.stderr, (limit, done.stderr)
            assert "raise the limit (ulimit -n)" in done.stderr, (limit, done.stderr)
    assert failed >= 2  # the low limits were walked


def test_clear_force_with_no_inode_left_for_the_set_aside_marker_says_so(
    tmp_path: Path,
) -> None:
    """A corrupt record with no session file beside it keeps its token in the
    directory's set-aside marker; where the filesystem has no inode left for it, `clear
    --force` moves nothing and says so, with the fix. It said "fix the directory's
    permissions"."""
    target = tmp_path / "mnt"
    target.mkdir()
    marks.require("linux", "root", "mount")
    why = mount_tmpfs(target, "256k", inodes=16)
    if why:
        marks.unavailable("mount", why, fix="run the suite where root may mount (CAP_SYS_ADMIN)")
    try:
        session = target / "c.jsonl"  # no session file: the token goes to the marker
        sidecar_of(session).write_bytes(b'{"version":1,"state":"held","token":7,')
        filler = 0
        with pytest.raises(OSError):
            while True:  # until the filesystem has no inode left
                (target / f"fill{filler}").touch()
                filler += 1
        assert filler > 0
        done = subprocess.run([sys.executable, "-m", "fencelock", "clear", "--force",
                               str(session)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "free some space, or inodes where df -i shows none left" in done.stderr
        assert "permissions" not in done.stderr
        assert sidecar_of(session).read_bytes() == b'{"version":1,"state":"held","token":7,'
    finally:
        umount(target)


def test_a_record_of_its_own_over_the_bound_is_refused_as_too_long_not_as_corrupt(
    tmp_path: Path,
) -> None:
    """A run whose own record would pass the 64 KiB readers keep to (a lane, path and
    origin of thousands of control characters, six bytes each escaped, and a previous
    holder's lane as long): the acquire says the record is too long and what to
    shorten, not that the stale record on disk is corrupt (it is not: it is left as
    it was, and a run with a short lane takes it over)."""
    directory = tmp_path.joinpath(*["\x01" * 250] * 10)
    directory.mkdir(parents=True)
    session = directory / "s.jsonl"
    subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, sys
        from fencelock import SessionLock
        SessionLock(sys.argv[1], "\\x01" * 4096).acquire()
        os._exit(0)  # holding it: a stale record with that lane
    """), str(session)], check=True, timeout=60)
    sidecar = Path(f"{session}.holder")
    before = sidecar.read_bytes()
    lock = SessionLock(session, "\x01" * 4096, origin="/" + "\x01" * 4000)
    with pytest.raises(FenceLockError) as caught:
        lock.acquire()
    assert not isinstance(caught.value, CorruptRecordError)
    assert f"{sidecar}: the record this run would write is" in str(caught.value)
    assert "give a shorter lane, origin or session path" in str(caught.value)
    assert sidecar.read_bytes() == before and probe(session).state == "stale"
    short = SessionLock(session, "short")
    info = short.acquire()
    short.release()
    assert info.previous is not None and info.previous.token == 1
