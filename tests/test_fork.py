"""Fork and interrupt edge cases around the sidecar descriptors' lifetimes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import marks
import pytest
from conftest import SpawnHolder

from fencelock import ProbeState, SessionLock, _wait, probe

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
    real_start: Callable[[tuple[str, bool], int, list[_wait.Waiter]], None] = \
        _wait.Waiter.start

    def start(key: tuple[str, bool], fd: int, box: list[_wait.Waiter]) -> None:
        real_start(key, fd, box)
        waiter = box[0]
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
    # began would never hand the lock over.
    _until_not_pending(str(session) + ".holder")


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
