"""Fork scenarios that need a fresh interpreter (signals, a first import); run by
tests/test_fork.py as ``python fork_scenarios.py NAME DIRECTORY``. Prints one line:
"ok", or what went wrong."""

from __future__ import annotations

import importlib.abc
import os
import select
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

import fencelock
from fencelock import _forkguard


def _child_takes_a_session(session: Path) -> str:
    """Fork; the child takes ``session`` and reports. "child hung" after 20 s."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with fencelock.SessionLock(session, lane="child"):
                os.write(write_end, b"ok")
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 20)
    answer = os.read(read_end, 16).decode() if ready else "child hung"
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_end)
    return answer or "child failed"


def interrupted_guard_wait(directory: Path) -> str:
    """A signal handler raises while fork waits for the guard another thread holds:
    fork goes on without it, and neither side may be left with a guard it cannot take."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _forkguard.guard:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()

    def on_alarm(signum: int, frame: object) -> None:
        raise RuntimeError("interrupted while fork waited")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    answer = _child_takes_a_session(directory / "child.jsonl")
    release.set()
    holder.join()
    with fencelock.SessionLock(directory / "parent.jsonl", lane="parent"):
        pass
    return answer


def fork_during_first_import(directory: Path) -> str:
    """Another thread takes the process's first lock while the process forks: if that
    lock imports a module on first use, the child must not inherit the import half done
    (its module lock would be owned by a thread the child does not have). Any import the
    first lock makes is held open until the child has taken a session."""
    fencelock.SessionLock  # noqa: B018 (the package's own modules, loaded up front)
    first: threading.Thread | None = None
    entered, proceed, done = threading.Event(), threading.Event(), threading.Event()
    imported: list[str] = []

    class Gate(importlib.abc.MetaPathFinder):
        def find_spec(
            self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
        ) -> ModuleSpec | None:
            if threading.current_thread() is first and not imported:
                imported.append(name)
                entered.set()
                proceed.wait()
            return None

    sys.meta_path.insert(0, Gate())

    def first_lock() -> None:
        try:
            with fencelock.SessionLock(directory / "first.jsonl", lane="first"):
                pass
        finally:
            done.set()
            entered.set()

    first = threading.Thread(target=first_lock)
    first.start()
    entered.wait()  # an import is under way (its module lock taken), or the lock is done
    if imported:
        threading.Timer(0.3, proceed.set).start()
    answer = _child_takes_a_session(directory / "child.jsonl")
    proceed.set()
    first.join()
    return answer


if __name__ == "__main__":
    scenario = {f.__name__: f for f in (interrupted_guard_wait, fork_during_first_import)}
    print(scenario[sys.argv[1]](Path(sys.argv[2])))
