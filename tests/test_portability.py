"""The platform layer's choices (docs/PORTABILITY.md), tested where this OS allows.

Windows is exercised by loading ``fencelock/_platform.py`` with ``sys.platform`` set to
``win32`` and a recording stand-in for ``msvcrt`` in a child interpreter: that checks
which byte the Windows code locks, not Windows itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import SpawnForeignHolder, SpawnHolder
from marks import needs, needs_linux, needs_posix

import fencelock
from fencelock import (
    FenceMode,
    Fingerprint,
    SessionContendedError,
    SessionLock,
    UnsafeSidecarError,
    _fence,
    _platform,
    _registry,
    _sidecar_holder,
    probe,
)
from fencelock._errors import HeldByOwnRunError
from fencelock._record import MAX_RECORD

PLATFORM_SOURCE = Path(fencelock.__file__).parent / "_platform.py"


def test_windows_lock_byte_lies_past_any_record() -> None:
    # Readers read at most MAX_RECORD + 1 bytes from offset 0; the mandatory Windows
    # lock must not cover any of them.
    assert _platform.WINDOWS_LOCK_OFFSET >= MAX_RECORD + 1


@needs_posix  # POSIX open flags
def test_posix_open_flags_never_follow_and_never_block() -> None:
    assert os.O_NOFOLLOW and _platform.OPEN_FLAGS & os.O_NOFOLLOW
    assert _platform.OPEN_FLAGS & os.O_NONBLOCK  # a planted FIFO cannot hang open()
    assert _platform.OPEN_FLAGS & os.O_CLOEXEC  # an exec'd child does not inherit it
    assert _platform.CAN_BLOCK


@needs_posix  # flock is the POSIX primitive
def test_the_primitive_is_flock_not_lockf() -> None:
    import fcntl

    assert _platform._flock is fcntl.flock


_PROBE = "import sys; from fencelock import probe; print(probe(sys.argv[1]).state)"


def _probe_elsewhere(session: Path) -> str:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(session)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@needs_posix  # the POSIX record-lock pitfall
def test_closing_another_descriptor_does_not_drop_the_lock(session: Path) -> None:
    # With lockf/fcntl record locks, closing *any* descriptor of the file drops the
    # process's lock. flock locks belong to the open file description.
    with SessionLock(session, "a"):
        sidecar = str(session) + ".holder"
        for flags in (os.O_RDONLY, os.O_RDWR):
            os.close(os.open(sidecar, flags))
        with open(sidecar, "rb") as f:
            f.read()
        assert _probe_elsewhere(session) == "live"
    assert _probe_elsewhere(session) == "free"


@needs_linux  # local Linux semantics
def test_flock_and_posix_record_locks_are_independent_locally(session: Path) -> None:
    # On a local Linux filesystem a POSIX record lock does not see a flock. (On NFS the
    # kernel emulates flock with whole-file fcntl locks and they would conflict: see
    # docs/PORTABILITY.md.) This is how we know the primitive really is flock.
    code = textwrap.dedent("""
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("lockf-free")
        except OSError:
            print("lockf-conflict")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("flock-free")
        except OSError:
            print("flock-conflict")
    """)
    with SessionLock(session, "a"):
        out = subprocess.run([sys.executable, "-c", code, str(session) + ".holder"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert out == ["lockf-free", "flock-conflict"]


_WINDOWS_SIM = textwrap.dedent("""
    import importlib.util, json, os, sys, tempfile, types
    calls = []
    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_NBLCK, msvcrt.LK_UNLCK, msvcrt.LK_LOCK = 2, 0, 1
    def locking(fd, mode, nbytes):
        calls.append({"pos": os.lseek(fd, 0, os.SEEK_CUR), "mode": mode, "nbytes": nbytes})
    msvcrt.locking = locking
    sys.modules["msvcrt"] = msvcrt
    real = sys.platform
    sys.platform = "win32"
    try:
        spec = importlib.util.spec_from_file_location("_platform_win", sys.argv[1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.platform = real
    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, b"{}" + b" " * 100)
        got = mod.try_lock(fd)
        mod.unlock(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    print(json.dumps({"windows": mod.WINDOWS, "can_block": mod.CAN_BLOCK, "got": got,
                      "offset": mod.WINDOWS_LOCK_OFFSET, "calls": calls}))
""")


def test_windows_branch_locks_one_byte_past_the_record() -> None:
    out = subprocess.run([sys.executable, "-c", _WINDOWS_SIM, str(PLATFORM_SOURCE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    offset = result["offset"]
    assert result["windows"] is True and result["can_block"] is False and result["got"]
    assert offset >= MAX_RECORD + 1
    assert result["calls"] == [
        {"pos": offset, "mode": 2, "nbytes": 1},  # LK_NBLCK on the byte past the record
        {"pos": offset, "mode": 0, "nbytes": 1},  # LK_UNLCK on the same byte
    ]


_NO_POSITIONAL_IO = textwrap.dedent("""
    import json, os, sys
    del os.pread, os.pwrite  # as on Windows: Python has them only on POSIX
    from fencelock import SessionLock, _platform, clear, probe, verify
    session = sys.argv[1]
    with SessionLock(session, lane="a", stamp=True) as lock:
        lock.append({"role": "user", "content": "hi"})
        held = probe(session).state
    with SessionLock(session, lane="b") as lock:
        token = lock.info.token
        lock.append({"role": "assistant", "content": "hello"})
    after = probe(session)
    print(json.dumps({
        "fallback": _platform.pread is _platform._seek_pread
                    and _platform.pwrite is _platform._seek_pwrite,
        "held": str(held), "after": str(after.state), "fence_ok": after.fence_ok,
        "token": token, "verified": verify(session).ok,
        "cleared": str(clear(session).state),
    }))
""")


def test_without_positional_io_a_session_is_taken_appended_and_released(
    session: Path,
) -> None:
    """Where Python has no ``os.pread``/``os.pwrite`` (Windows), fencelock reads and
    writes records and sessions through its seek-and-read stand-ins: a whole run, the
    token carried on, the fence kept."""
    out = subprocess.run([sys.executable, "-c", _NO_POSITIONAL_IO, str(session)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "fallback": True, "held": "live", "after": "free", "fence_ok": True, "token": 2,
        "verified": True, "cleared": "free",
    }
    lines = session.read_bytes().splitlines()
    assert [json.loads(line)["role"] for line in lines] == ["user", "assistant"]


def test_the_positional_io_stand_ins_ignore_the_descriptor_position(tmp_path: Path) -> None:
    """The stand-ins for ``pread``/``pwrite`` read and write at the offset given, wherever
    the descriptor's position was left (by a lock call that seeks, say), and leave the
    position where it was."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        assert _platform._seek_pread(fd, 3, 2) == b"234"
        assert _platform._seek_pwrite(fd, b"ab", 0) == 2
        # The position is put back: an append reads it to find where its line went.
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
        os.lseek(fd, 1 << 20, os.SEEK_SET)  # where the Windows lock byte lies
        assert _platform._seek_pread(fd, 100, 0) == b"ab23456789"
        # A signal handler's record write inside a read of its own thread: no deadlock.
        with _platform._POSITIONED:
            assert _platform._seek_pread(fd, 4, 9) == b"9"
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1 << 20
    finally:
        os.close(fd)
    assert path.read_bytes() == b"ab23456789"
    if hasattr(os, "pread"):
        assert _platform.pread is os.pread and _platform.pwrite is os.pwrite


@needs_posix  # (O_NOFOLLOW taken away, symlinks made)
@pytest.mark.timeout(20)  # the failure this guards against is a spin
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_where_opens_follow_symlinks_a_symlinked_sidecar_is_still_refused(
    session: Path, monkeypatch: pytest.MonkeyPatch, dangling: bool
) -> None:
    """Without ``O_NOFOLLOW`` (Windows) an open follows a symlink: the path is looked at
    right after (or once an exclusive create finds a dangling one there), and a
    symlinked sidecar is refused as the open refuses it on POSIX, its target untouched
    (the inode re-check would otherwise never match, or the create never succeed, and
    the acquire try again for ever)."""
    target = session.parent / "elsewhere"
    if not dangling:
        target.write_bytes(b"")
    Path(str(session) + ".holder").symlink_to(target)
    monkeypatch.setattr(_platform, "FOLLOWS_SYMLINKS", True)
    monkeypatch.setattr(_platform, "OPEN_FLAGS", _platform.OPEN_FLAGS & ~os.O_NOFOLLOW)
    with pytest.raises(UnsafeSidecarError, match="is a symlink"):
        SessionLock(session, "x").acquire()
    assert target.read_bytes() == b"" if not dangling else not target.exists()


def test_run_passes_on_only_sigterm_where_the_console_signals_the_command_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Windows the console sends Ctrl-C and Ctrl-Break to `fencelock run`'s command
    itself, and ``Popen.send_signal`` takes SIGTERM only (of the stop signals): `run`
    passes on SIGTERM and nothing else there, rather than fail with ValueError."""
    import signal

    from fencelock._supervisor import SignalForwarder

    class Command:
        def __init__(self) -> None:
            self.sent: list[int] = []

        def send_signal(self, signum: int) -> None:
            self.sent.append(signum)

    forwarder = SignalForwarder.__new__(SignalForwarder)  # (its handlers not installed)
    forwarder.sigterm = signal.SIGTERM
    stops = [getattr(signal, name) for name in ("SIGINT", "SIGHUP", "SIGTERM")]
    for windows, passed in ((True, [signal.SIGTERM]), (False, stops)):
        monkeypatch.setattr(_platform, "WINDOWS", windows)
        command = Command()
        for signum in stops:
            forwarder._pass_on(cast(Any, command), signum)
        assert command.sent == passed


def test_where_an_open_file_cannot_be_removed_an_interrupted_first_line_is_taken_back(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt (Ctrl-C) during a run's first append, which made the session file:
    where an open file cannot be removed (Windows), the line is taken back by emptying
    the file, and the run's next append goes on into it (no takeover)."""
    monkeypatch.setattr(_platform, "WINDOWS", True)
    real = _fence._fsync

    def interrupted(fd: int) -> None:
        monkeypatch.setattr(_fence, "_fsync", real)
        raise KeyboardInterrupt

    with SessionLock(session, "a") as lock:
        monkeypatch.setattr(_fence, "_fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lock.append({"n": 1})
        assert session.read_bytes() == b""  # emptied, not removed
        lock.append({"n": 2})
    assert session.read_bytes() == b'{"n":2}\n'


def test_where_run_cannot_share_its_lock_its_commands_wait_is_refused_by_its_run_id(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where `fencelock run` cannot hand its lock to its command (Windows), a command
    that takes the run's own session would wait for the run, which waits for it: the
    held record names the run the command runs under (``FENCELOCK_RUN_ID``), and the
    wait is refused at once. Another run's id proves nothing: that wait goes on."""
    holder = spawn_holder(session, lane="outer")
    holder.acquire()
    record = probe(session).record
    assert record is not None
    monkeypatch.setattr(_platform, "WINDOWS", True)
    monkeypatch.setenv("FENCELOCK_RUN_ID", record.run_id)
    with pytest.raises(HeldByOwnRunError, match="FENCELOCK_RUN_ID"):
        SessionLock(session, "inner").acquire(timeout=10)
    monkeypatch.setenv("FENCELOCK_RUN_ID", record.run_id + "0")
    with pytest.raises(SessionContendedError) as e:
        SessionLock(session, "inner").acquire(timeout=0.2)
    assert not isinstance(e.value, HeldByOwnRunError)


@needs("flock")
@pytest.mark.timeout(60)
def test_a_dead_wrappers_record_does_not_refuse_its_commands_wait(
    session: Path, spawn_holder: SpawnHolder, foreign_holder: SpawnForeignHolder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the run-id test decides (Windows), a `fencelock run` that died left its held
    record behind a lock the system freed; its command, still running with that run's
    id, then finds the lock taken by someone else for a moment (a probe, an acquirer
    about to write). That is no wait for itself: once the lock comes free within the
    grace, the command takes the session."""
    holder = spawn_holder(session, lane="outer")
    holder.acquire()
    record = probe(session).record
    assert record is not None
    holder.kill()  # the wrapper dies: its record stays held, the lock is freed
    other = foreign_holder(Path(str(session) + ".holder"))
    monkeypatch.setattr(_platform, "WINDOWS", True)
    monkeypatch.setattr(_sidecar_holder, "FAIL_GRACE", 30.0)  # timing cannot decide this test
    monkeypatch.setenv("FENCELOCK_RUN_ID", record.run_id)
    outcome: list[object] = []

    def take() -> None:
        try:
            with SessionLock(session, "inner", timeout=30) as lock:
                outcome.append(lock.info.token if lock.info else None)
        except Exception as e:  # reported below
            outcome.append(e)

    waiter = threading.Thread(target=take)
    waiter.start()
    while not _in_call(waiter, "_refuse_own_run_by_id"):
        assert waiter.is_alive(), outcome
        time.sleep(0.001)
    other.release()
    waiter.join(timeout=30)
    assert outcome == [record.token + 1]


def _in_call(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


@pytest.mark.timeout(60)
def test_where_waits_go_in_slices_they_still_end_as_the_session_comes_free(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a lock's wait does not let Ctrl-C through (Windows: ``CAN_BLOCK`` false),
    waits go in steps of ``WAIT_SLICE``: a wait for another process's holder, and one
    queued behind another lock object of this process, still end, in turn, once the
    session comes free."""
    monkeypatch.setattr(_platform, "CAN_BLOCK", False)
    monkeypatch.setattr(_platform, "WAIT_SLICE", 0.01)
    other = spawn_holder(session, lane="other")
    other.acquire()
    got: list[str] = []

    def take(lane: str) -> None:
        with SessionLock(session, lane):
            got.append(lane)

    first = threading.Thread(target=take, args=("first",))
    first.start()
    while not _in_call(first, "_wait_in_slices"):  # waiting for the other process
        assert first.is_alive()
        time.sleep(0.001)
    second = threading.Thread(target=take, args=("second",))
    second.start()
    while not _in_call(second, "_wait_turn"):  # queued behind the first
        assert second.is_alive()
        time.sleep(0.001)
    # Queued, it wakes every slice on its own (a fresh sleeper each time), not only
    # when the slot changes hands.
    before = list(_registry._sleepers)
    end = time.monotonic() + 20
    while all(any(s is b for b in before) for s in _registry._sleepers):
        assert time.monotonic() < end, "the queued wait never woke on its own"
        time.sleep(0.001)
    assert other.call("release") == "released"
    first.join(timeout=30)
    second.join(timeout=30)
    assert got == ["first", "second"]


def test_library_calls_posix_only_functions_through_the_platform_layer() -> None:
    """``os.pread``, ``os.pwrite``, SIGHUP and the open flags ``O_NOFOLLOW``,
    ``O_NONBLOCK`` and ``O_CLOEXEC`` do not exist on Windows: the library reaches them
    through `_platform` only. (The etcd store's processes are POSIX only,
    docs/PORTABILITY.md.)"""
    import ast

    posix_only = {("os", "pread"), ("os", "pwrite"), ("signal", "SIGHUP"),
                  ("os", "O_NOCTTY"), ("os", "tcgetpgrp"), ("os", "getpgid"),
                  ("os", "O_NOFOLLOW"), ("os", "O_NONBLOCK"), ("os", "O_CLOEXEC")}
    package = Path(fencelock.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        if path.name in ("_platform.py", "_etcdkeeper.py", "_etcdserver.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and (node.value.id, node.attr) in posix_only):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []


def test_coarse_timestamps_need_the_content_fence() -> None:
    # On a filesystem with coarse timestamps, a same-size rewrite within one tick
    # leaves every stat field equal: the stat fence cannot see it, the content fence can.
    before = Fingerprint(dev=1, ino=2, size=100, mtime_ns=10**18, ctime_ns=10**18, tail="aa")
    after = Fingerprint(dev=1, ino=2, size=100, mtime_ns=10**18, ctime_ns=10**18, tail="bb")
    assert before.matches(after, FenceMode.STAT)  # the documented blind spot
    assert not before.matches(after, FenceMode.CONTENT)


def test_content_fence_catches_a_same_size_rewrite_with_restored_times(session: Path) -> None:
    with SessionLock(session, "a", fence="content") as lock:
        lock.append({"n": 1})
        st = os.stat(session)
        data = session.read_bytes()
        fd = os.open(session, os.O_WRONLY)
        try:
            os.pwrite(fd, data.replace(b"1", b"2"), 0)  # same size, other bytes
        finally:
            os.close(fd)
        os.utime(session, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if in one tick
        with pytest.raises(fencelock.SessionTakeoverError):
            lock.verify_fence()
