"""Fork and interrupt edge cases around the sidecar descriptors' lifetimes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import marks
import pytest
from conftest import SpawnHolder

from fencelock import ProbeState, SessionContendedError, SessionLock, _forkguard, _wait, probe

HERE = Path(__file__).parent


@pytest.mark.parametrize("scenario", ["interrupted_guard_wait", "fork_during_first_import"])
def test_fork_scenario_in_a_fresh_interpreter(tmp_path: Path, scenario: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(HERE / "fork_scenarios.py"), scenario, str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt, which pytest itself would act on."""


@pytest.mark.parametrize("how", ["SessionLock timeout", "wait_until_unlocked timeout"])
def test_an_interrupt_as_the_lock_arrives_leaves_no_lock_behind(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The waiting thread is interrupted in the instant its helper got the lock: the
    descriptor is its own by then, and must be closed, not leaked with the lock on it."""
    from conftest import wait_for_blocked_waiter

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    real_start: Callable[[tuple[str, bool], _forkguard.Owner,
                          list[tuple[_wait.Waiter, object]]], None] = _wait.Waiter.start

    def start(key: tuple[str, bool], mine: _forkguard.Owner,
              box: list[tuple[_wait.Waiter, object]]) -> None:
        real_start(key, mine, box)
        waiter = box[0][0]
        real_wait = waiter.done.wait

        def wait(timeout: float | None = None) -> bool:
            if real_wait(timeout):
                raise Interrupt  # just as the lock arrived
            return False

        waiter.done.wait = wait  # type: ignore[method-assign]

    monkeypatch.setattr(_wait.Waiter, "start", staticmethod(start))

    def release_once_blocked() -> None:
        wait_for_blocked_waiter(session)
        holder.call("release")

    releaser = threading.Thread(target=release_once_blocked)
    releaser.start()
    try:
        with pytest.raises(Interrupt):
            if how == "SessionLock timeout":
                SessionLock(session, lane="waiter", timeout=60).acquire()
            else:
                _wait.wait_until_unlocked(str(session) + ".holder", 60)
    finally:
        releaser.join(timeout=60)
    monkeypatch.undo()
    assert probe(session).state == ProbeState.FREE
    with SessionLock(session, lane="after", on_contention="fail"):
        pass


@pytest.mark.parametrize("how", ["SessionLock timeout", "wait_until_unlocked timeout"])
@pytest.mark.parametrize("where", ["Waiter._begin", "start_new_thread returns",
                                   "Waiter.start returns"])
def test_an_interrupt_as_the_helper_starts_leaves_no_lock_behind(
    session: Path, spawn_holder: SpawnHolder, how: str, where: str
) -> None:
    """A timed wait hands its descriptor to a helper thread. An interrupt landing while
    that helper is being started must leave the waiting thread a helper to give up:
    one that nobody gives up takes the lock once the holder lets go, and keeps it
    until the process exits, with no run holding the session."""
    import _thread

    from conftest import on_entry, on_return

    def interrupt() -> None:
        raise Interrupt

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    sidecar = str(session) + ".holder"
    before = _sidecar_fds(sidecar)
    injected: AbstractContextManager[list[bool]] = {
        "Waiter._begin": lambda: on_entry(_wait.Waiter._begin, interrupt),
        "start_new_thread returns": lambda: on_entry(_thread.start_new_thread, interrupt,
                                                     at_return=True),
        "Waiter.start returns": lambda: on_return(_wait.Waiter.start, interrupt),
    }[where]()
    with injected as ran, pytest.raises(Interrupt):
        if how == "SessionLock timeout":
            SessionLock(session, lane="waiter", timeout=60).acquire()
        else:
            _wait.wait_until_unlocked(str(session) + ".holder", 60)
    assert ran
    holder.call("release")
    # A helper still blocked takes the lock now: an abandoned one drops it at once, one
    # that nobody gave up keeps it (a lock of this process's with no run behind it).
    _until_nobody_blocks_on(session)
    assert probe(session).state == ProbeState.FREE
    with SessionLock(session, lane="after", on_contention="fail"):
        pass
    # Nor is a waiter left pending for a later wait to adopt: one whose thread never
    # began would never hand the lock over. Nor a descriptor of the sidecar left open.
    _until_not_pending(sidecar)
    assert _sidecar_fds(sidecar) == before


def _sidecar_fds(sidecar: str) -> list[str]:
    """This process's open descriptors of ``sidecar``."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == sidecar:
                fds.append(fd)
    return sorted(fds)


def _until_not_pending(sidecar: str, limit: float = 30.0) -> None:
    """Return once no abandoned waiter of this process is pending on ``sidecar`` (one
    still blocked ends as soon as it gets the lock); ``limit`` bounds a broken build."""
    import time

    deadline = time.monotonic() + limit
    while any(key[0] == sidecar for key in _wait._pending):
        assert time.monotonic() < deadline, f"a waiter stays pending on {sidecar}"
        time.sleep(0.001)


def _until_nobody_blocks_on(session: Path, limit: float = 30.0) -> None:
    """Return once no process is blocked in flock(2) on the session's sidecar (no
    ``->`` FLOCK line in /proc/locks); ``limit`` bounds a broken build."""
    import time

    marks.require("proc_locks")
    inode = str(Path(str(session) + ".holder").stat().st_ino)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            blocked = [line for line in f if "->" in line.split() and "FLOCK" in line
                       and line.split()[-3].rsplit(":", 1)[-1] == inode]
        if not blocked:
            return
        time.sleep(0.001)
    raise AssertionError(f"a process stayed blocked on the sidecar lock of {session}")


@pytest.mark.parametrize("how", ["SessionLock timeout", "wait_until_unlocked timeout"])
def test_a_helper_whose_lock_call_fails_has_its_descriptor_closed_once(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The helper's blocking lock call fails (ENOLCK: no lock service on an NFS mount):
    the wait raises `SidecarAccessError` naming the sidecar, having closed its
    descriptor once. A second close of the same number could close whatever another
    thread opened meanwhile."""
    import errno

    from fencelock import SidecarAccessError, _forkguard, _platform

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    sidecar = str(session) + ".holder"

    def no_lock_service(fd: int, shared: bool = False) -> None:  # the helper's call
        raise OSError(errno.ENOLCK, "No locks available")

    closed: list[int] = []
    real_close = _forkguard.close

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(_platform, "lock_blocking", no_lock_service)
    monkeypatch.setattr(_forkguard, "close", close)
    monkeypatch.setattr("fencelock._sidecar.close", close)
    with pytest.raises(SidecarAccessError, match="waiting for its lock failed"):
        if how == "SessionLock timeout":
            SessionLock(session, lane="waiter", timeout=30).acquire()
        else:
            _wait.wait_until_unlocked(sidecar, 30)
    assert closed and len(closed) == len(set(closed)), closed
    assert _sidecar_fds(sidecar) == []


def test_an_interrupted_wait_does_not_take_back_a_helper_another_wait_adopted(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Thread A's timed wait gives its helper up (it stays pending, blocked); an
    interrupt lands in A as that returns, and before A's error path runs, thread B's
    wait adopts the helper. A's error path must leave B's helper alone: B then gets
    the lock as soon as the holder lets go."""
    import time

    holder = spawn_holder(session, lane="holder")
    holder.acquire()
    sidecar = str(session) + ".holder"
    results: dict[str, tuple[bool, float]] = {}
    adopted = threading.Event()

    def wait_in_b() -> None:
        start = time.monotonic()
        results["B"] = (_wait.wait_until_unlocked(sidecar, 30), time.monotonic() - start)

    code = _wait.Waiter.give_up.__code__
    fired: list[threading.Thread] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        if event == "return" and arg is False and not fired:
            waiter = frame.f_locals["self"]
            b = threading.Thread(target=wait_in_b)
            fired.append(b)
            b.start()
            deadline = time.monotonic() + 30
            while waiter.abandoned or (sidecar, True) in _wait._pending:  # B adopts it
                assert time.monotonic() < deadline, "B never adopted the helper"
                time.sleep(0.001)
            adopted.set()
            raise Interrupt  # A's signal handler, as its give-up returns
        return tracer

    sys.settrace(tracer)
    try:
        with pytest.raises(Interrupt):
            _wait.wait_until_unlocked(sidecar, 0.2)  # thread A
    finally:
        sys.settrace(None)
    assert adopted.is_set()
    holder.call("release")
    fired[0].join(60)
    got, took = results["B"]
    assert got is True and took < 25, results


def test_a_failed_acquire_writes_nothing_to_the_sidecar(session: Path) -> None:
    """An acquire that never got the lock (another open of the sidecar holds it: a fail-
    fast acquire, or a try with timeout 0) writes nothing, even where the record on
    disk is the lock object's own previous run's, still "held"."""
    import fcntl

    sidecar = str(session) + ".holder"
    lock = SessionLock(session, lane="again", on_contention="fail")
    lock.acquire()
    held = Path(sidecar).read_bytes()  # this run's record, "held"
    lock.release()
    Path(sidecar).write_bytes(held)  # as if the release had not written (it did)
    fd = os.open(sidecar, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # contends as another process would
        for attempt in (lock, SessionLock(session, lane="try", timeout=0)):
            with pytest.raises(SessionContendedError):
                attempt.acquire()
            assert Path(sidecar).read_bytes() == held
    finally:
        os.close(fd)
