"""Fork and interrupt edge cases around the sidecar descriptors' lifetimes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

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
    real_start: Callable[[tuple[str, bool], int], _wait.Waiter] = _wait.Waiter.start

    def start(key: tuple[str, bool], fd: int) -> _wait.Waiter:
        waiter = real_start(key, fd)
        real_wait = waiter.done.wait

        def wait(timeout: float | None = None) -> bool:
            if real_wait(timeout):
                raise Interrupt  # just as the lock arrived
            return False

        waiter.done.wait = wait  # type: ignore[method-assign]
        return waiter

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
