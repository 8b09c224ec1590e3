"""The in-process registry's surface, and the seam between `SessionLock` and its store."""

from __future__ import annotations

import _thread
import ast
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SpawnHolder, wait_for_blocked_waiter
from interrupts import interrupted_at

import fencelock
from fencelock import (
    FenceLockWarning,
    SessionContendedError,
    SessionLock,
    _platform,
    _registry,
    _sidecar_holder,
)

PACKAGE = Path(fencelock.__file__).parent


def test_registry_key_is_the_real_path_through_a_symlinked_directory(
    session: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(session.parent)
    real = str(session.parent.resolve() / session.name)
    assert _registry.registry_key(str(link / session.name)) == real
    assert _registry.registry_key(str(session)) == real


def test_a_symlink_pointed_elsewhere_gives_its_new_directory_s_key(tmp_path: Path) -> None:
    """A directory symlink pointed at another directory while a run holds a session
    through it: a new lock object on the same path locks the session it now leads to,
    which is free (it was refused as held, by the run in the old directory)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a")
    with SessionLock(link / "s.jsonl", "first"):
        link.unlink()
        link.symlink_to(tmp_path / "b")
        assert _registry.registry_key(str(link / "s.jsonl")) == str(
            (tmp_path / "b").resolve() / "s.jsonl")
        with SessionLock(link / "s.jsonl", "second", on_contention="fail") as second:
            assert second.held
        assert (tmp_path / "b" / "s.jsonl.holder").exists()


def test_held_in_process_names_the_holding_object_only_while_it_holds(session: Path) -> None:
    key = _registry.registry_key(str(session))
    lock = SessionLock(session, "a")
    assert _registry.held_in_process(key) is None
    with lock:
        assert _registry.held_in_process(key) is lock
        assert _registry.any_held()
    assert _registry.held_in_process(key) is None


def test_abort_asks_the_run_that_holds_the_session_and_no_other(
    session: Path, tmp_path: Path
) -> None:
    other = session.parent / "other.jsonl"
    asked: list[str] = []
    a, b = SessionLock(session, "a"), SessionLock(other, "b")
    a.on_abort(lambda: asked.append("a"))
    b.on_abort(lambda: asked.append("b"))
    assert not _registry.abort(_registry.registry_key(str(session)))  # nothing held yet
    with a, b:
        assert _registry.abort(_registry.registry_key(str(session)))
    assert asked == ["a"]


def test_abort_callbacks_belong_to_one_run(session: Path) -> None:
    asked: list[int] = []
    lock = SessionLock(session, "a")
    with lock:
        lock.on_abort(lambda: asked.append(1))
    with lock:  # the next run registered nothing: run 1's callback is not its
        assert _registry.abort(_registry.registry_key(str(session)))
    assert asked == []


def test_a_raising_abort_callback_stops_neither_the_others_nor_the_abort(
    session: Path,
) -> None:
    asked: list[str] = []

    def broken() -> None:
        raise RuntimeError("gone")

    lock = SessionLock(session, "a")
    lock.on_abort(broken)
    lock.on_abort(lambda: asked.append("second"))
    with lock, pytest.warns(FenceLockWarning, match="on_abort callback .* RuntimeError: gone"):
        assert _registry.abort(_registry.registry_key(str(session)))
    assert asked == ["second"]


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / module).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "fencelock":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.removeprefix("fencelock."))
    return names


def test_session_lock_does_not_know_which_store_holds_it() -> None:
    """`SessionLock` reaches the sidecar (and any other store) only through the store
    object: no sidecar protocol, OS lock, token mark or etcd code in `_lock`."""
    assert not _imports("_lock.py") & {
        "_sidecar_holder", "_platform", "_tokens", "_etcd", "_backend", "_etcdurl",
    }
    source = (PACKAGE / "_lock.py").read_text()
    assert "_store is not None" not in source


def test_probe_and_recovery_use_the_registry_not_the_lock_internals() -> None:
    for module in ("_probe.py", "_recovery.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and (
                not node.attr.startswith("__")
            ):
                base = node.value
                reaches_lock = isinstance(base, ast.Name) and base.id == "_lock"
                private_call = node.attr in ("_abort", "_take_slot", "_free_slot", "_registry")
                assert not reaches_lock and not private_call, (
                    f"{module}:{node.lineno} reaches into {ast.unparse(node)}"
                )


def test_an_owner_giving_up_leaves_the_slot_to_the_owner_still_acquiring(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    # One object, several threads: A waits for another process's run; B gives up
    # waiting behind A. The slot stays A's, so nothing else enters the acquire A is in
    # (a third owner did, lost A's descriptor and left A's release waiting for ever).
    other = spawn_holder(session, lane="other")
    other.acquire()
    key = _registry.registry_key(str(session))
    lock = SessionLock(session, "shared")
    took = threading.Event()

    def first() -> None:
        with lock:
            took.set()

    a = threading.Thread(target=first, daemon=True)
    a.start()
    deadline = time.monotonic() + 30
    while _registry.held_in_process(key) is not lock:  # A has the slot, waits for the lock
        assert time.monotonic() < deadline and a.is_alive()
        time.sleep(0.001)
    with pytest.raises(SessionContendedError):
        lock.acquire(timeout=0.05)
    assert _registry.held_in_process(key) is lock  # still A's
    assert other.call("release") == "released"
    assert took.wait(30)
    a.join(30)
    assert not a.is_alive(), "A's release never returned"
    with lock:  # the object works on, in this thread
        lock.append({"after": True})
    assert other.acquire() > 0  # and another process takes the session after it


def _waiting_in_process(session: Path, lock: SessionLock) -> threading.Thread:
    """A thread in which ``lock`` waits for ``session``, returned once it has taken the
    session's slot and blocks in flock behind another process's run."""
    key = _registry.registry_key(str(session))
    t = threading.Thread(target=lock.acquire, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while _registry.held_in_process(key) is not lock:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.001)
    wait_for_blocked_waiter(session)
    return t


def test_abort_leaves_a_run_that_only_waits_for_another_process_alone(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The run to abort is the one holding the session: a lock object of this process
    that has the session's slot but still waits for another process's run has nothing
    to abort, and its callbacks (for the run it is about to start) are left alone."""
    other = spawn_holder(session, lane="stuck")
    other.acquire()
    asked: list[str] = []
    waiting = SessionLock(session, "queued")
    waiting.on_abort(lambda: asked.append("queued"))
    t = _waiting_in_process(session, waiting)
    assert not _registry.abort(_registry.registry_key(str(session)))
    assert asked == []
    assert other.call("release") == "released"
    t.join(30)
    assert waiting.held
    waiting.release()


@pytest.mark.parametrize("how", ["fail", "timeout"])
def test_contention_behind_a_waiting_object_names_the_other_process_s_holder(
    session: Path, spawn_holder: SpawnHolder, how: str
) -> None:
    """An acquirer queued behind a lock object of this process that itself waits is
    told who holds the session (the other process's run), not that a holder without a
    record does."""
    other = spawn_holder(session, lane="other-process")
    other.acquire()
    waiting = SessionLock(session, "queued")
    t = _waiting_in_process(session, waiting)
    lock = SessionLock(session, "late", on_contention="fail" if how == "fail" else "wait")
    with pytest.raises(SessionContendedError) as caught:
        lock.acquire(timeout=0.05) if how == "timeout" else lock.acquire()
    assert caught.value.holder is not None, str(caught.value)
    assert (caught.value.holder.lane, caught.value.holder.pid) == ("other-process", other.pid)
    assert f"held by pid {other.pid}" in str(caught.value)
    assert other.call("release") == "released"
    t.join(30)
    waiting.release()


def _until(predicate: Any) -> None:
    """Wait (polling: another thread's state, with no event to wait on) until
    ``predicate()`` holds."""
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.001)


def test_a_waiter_of_this_process_goes_before_its_holder_takes_the_session_again(
    session: Path,
) -> None:
    """A lane that takes the session again right after releasing it (its next run)
    does not keep out a lock object of its own process that waits: the waiter has the
    next turn, as a waiter in another process has (it waited for ever before: the
    releasing thread took the freed slot back before the woken waiter ran)."""
    busy, waiter = SessionLock(session, "busy"), SessionLock(session, "waiter")
    busy.acquire()
    got = threading.Event()

    def wait_for_it() -> None:
        waiter.acquire()
        got.set()

    t = threading.Thread(target=wait_for_it, daemon=True)
    t.start()
    _until(lambda: _registry.waiters() == 1)
    busy.release()
    with pytest.raises(SessionContendedError) as caught:
        busy.acquire(timeout=0)  # the lane's next run, at once
    assert got.wait(30)
    assert caught.value.holder is not None and caught.value.holder.lane == "waiter"
    waiter.release()
    t.join(30)
    busy.acquire(timeout=0)  # and its turn comes after
    busy.release()


class _PausedRelease:
    """A lock object of this process whose release stops once it has unlocked, before
    it frees its slot in the process (the session free on disk, its record released),
    until `resume`; `resume_once_queued` lets it go as soon as another acquire of this
    process waits in line for the slot."""

    def __init__(self, session: Path, monkeypatch: pytest.MonkeyPatch, grace: float) -> None:
        self.paused, self.resumed = threading.Event(), threading.Event()

        def held_up() -> None:
            self.paused.set()
            self.resumed.wait(30)

        monkeypatch.setattr(_platform, "hand_over", held_up)
        monkeypatch.setattr(_sidecar_holder, "HAND_OVER_AFTER", 0.0)
        monkeypatch.setattr(_sidecar_holder, "FAIL_GRACE", grace)
        self.lock = SessionLock(session, "ending")
        self.token = self.lock.acquire().token
        self.threads = [threading.Thread(target=self.lock.release, daemon=True)]
        self.threads[0].start()
        assert self.paused.wait(30)

    def resume_once_queued(self) -> None:
        def let_go() -> None:
            _until(lambda: _registry.waiters() == 1)
            self.resumed.set()

        self.threads.append(threading.Thread(target=let_go, daemon=True))
        self.threads[-1].start()

    def join(self) -> None:
        self.resumed.set()
        for t in self.threads:
            t.join(30)


def test_a_fail_fast_acquire_waits_out_a_release_under_way_in_this_process(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fail-fast acquire that finds the session's slot taken by a lock object of this
    process in the middle of its release (the session free on disk, the record
    released) takes the session once that release ends, as an acquirer in another
    process would; it failed before, blaming a holder without a readable record."""
    ending = _PausedRelease(session, monkeypatch, grace=60.0)  # timing cannot decide it
    ending.resume_once_queued()
    eager = SessionLock(session, "eager", on_contention="fail")
    assert eager.acquire().lane == "eager"
    eager.release()
    ending.join()


def test_a_release_of_this_process_longer_than_the_grace_is_named_by_its_run(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its grace, a fail-fast acquire behind a lock object of this process still
    ending its run names that run (it blamed a holder without a readable record)."""
    ending = _PausedRelease(session, monkeypatch, grace=0.0)
    try:
        with pytest.raises(SessionContendedError) as caught:
            SessionLock(session, "eager", on_contention="fail").acquire()
        holder = caught.value.holder
        assert holder is not None and (holder.lane, holder.token) == ("ending", ending.token)
        assert "without a readable" not in str(caught.value)
    finally:
        ending.join()


def test_an_interrupt_as_clear_is_handed_the_slot_leaves_the_session_free_here(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clear` waits out a release of this process and is handed the slot; an interrupt
    (a signal handler's exception) landing right then leaves the slot free, not taken
    for good by a clear that never ran (every later acquire here waited on it)."""
    ending = _PausedRelease(session, monkeypatch, grace=60.0)
    ending.resume_once_queued()
    code = _registry._wait_turn.__code__

    def interrupt_when_handed(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is code and event == "return" and arg is None:
            raise KeyboardInterrupt  # the slot is this clear's now
        return interrupt_when_handed if frame.f_code is code else None

    sys.settrace(interrupt_when_handed)
    try:
        with pytest.raises(KeyboardInterrupt):
            fencelock.clear(session)
    finally:
        sys.settrace(None)
    ending.join()
    assert _registry.held_in_process(_registry.registry_key(str(session))) is None
    with SessionLock(session, "after", on_contention="fail"):
        pass


def _interrupted_at(number: int, call: Callable[[], object]) -> tuple[bool, BaseException | None]:
    """`interrupted_at` in the registry's code or `threading`'s (which the registry must
    not depend on)."""
    return interrupted_at(number, call, (_registry.__file__, threading.__file__))


def _assert_registry_at_rest(session: Path) -> None:
    """Nothing of the registry left taken: its mutex, a slot, a line, a sleeper; and a
    new acquire of ``session`` in this process is not kept waiting."""
    assert not _registry.busy()
    with SessionLock(session, "after", on_contention="fail"):
        pass
    key = _registry.registry_key(str(session))
    assert key not in _registry._held and key not in _registry._lines
    assert _registry._sleepers == [] and _registry.waiters() == 0


@pytest.mark.timeout(300)
def test_an_interrupt_at_any_point_of_an_in_process_wait_wedges_nothing(
    session: Path,
) -> None:
    """An acquire waits for a holder of this process; an interrupt (a signal handler's
    exception) lands at one point of the registry's code, each in turn. The interrupt
    comes out as itself, the holder's release and every later acquire go on: the
    registry's mutex, taken back by a wait the interrupt cut short, once released a
    mutex another thread held (every acquire and release of the process then hung), or
    raised RuntimeError ('release unlocked lock') in place of the interrupt."""
    number = 0
    while True:
        holder = SessionLock(session, "holder")
        holder.acquire()
        waiter = SessionLock(session, "waiter", timeout=60)
        waited = threading.Event()

        def release_once_waited(holder: SessionLock = holder, key: str = holder._key,
                                waited: threading.Event = waited) -> None:
            _until(lambda: bool(_registry._lines.get(key)) or waited.is_set())
            holder.release()

        releaser = threading.Thread(target=release_once_waited, daemon=True)
        releaser.start()
        try:
            fired, _ = _interrupted_at(number, waiter.acquire)
        finally:
            waited.set()
        releaser.join(30)
        assert not releaser.is_alive(), f"the holder's release hung (point {number})"
        if waiter.held:
            waiter.release()
        _assert_registry_at_rest(session)
        if not fired:
            break
        number += 1
    assert number > 20  # the wait ran the registry's code


@pytest.mark.timeout(300)
def test_an_interrupt_at_any_point_of_a_release_with_waiters_wedges_nothing(
    session: Path,
) -> None:
    """A holder releases with two acquirers of this process in line; an interrupt lands
    at one point of the registry's code, each in turn. Each waiter still gets the
    session in turn, and the registry is left at rest."""
    number = 0
    while True:
        holder = SessionLock(session, "holder")
        holder.acquire()
        got: list[str] = []

        def take(name: str, got: list[str] = got) -> None:
            with SessionLock(session, name, timeout=60):
                got.append(name)

        waiters = []
        for name in ("first", "second"):
            waiters.append(threading.Thread(target=take, args=(name,), daemon=True))
            waiters[-1].start()
            count = len(waiters)
            _until(lambda count=count: _registry.waiters() == count)
        fired, _ = _interrupted_at(number, holder.release)
        assert not holder.held
        for waiter in waiters:
            waiter.join(30)
            assert not waiter.is_alive(), f"a waiter waited for good (point {number})"
        assert got == ["first", "second"], (number, got)
        _assert_registry_at_rest(session)
        if not fired:
            break
        number += 1
    assert number > 10  # the release ran the registry's code


def test_an_interrupt_at_any_point_of_a_wake_up_leaves_the_registry_s_mutex_free() -> None:
    """A cancelled acquire wakes every waiter of the process (`_registry.wake`); an
    interrupt landing at any point of it leaves the registry's mutex free (taken by a
    bare ``acquire()`` before a ``try``, it stayed taken for good after an interrupt
    there), and a wake-up that ran whole woke every sleeper."""
    number = 0
    while True:
        asleep = [_thread.allocate_lock() for _ in range(2)]
        for sleeper in asleep:
            sleeper.acquire()
        with _registry._mu:  # two waiters asleep
            _registry._sleepers.extend(asleep)
        fired, _ = _interrupted_at(number, _registry.wake)
        assert not _registry.busy(), number
        with _registry._mu:  # each waiter takes its own sleeper off, once awake
            for sleeper in asleep:
                _registry._forget(sleeper)
        if not fired:
            assert not any(sleeper.locked() for sleeper in asleep)
            break
        number += 1
    assert number >= 6  # the wake-up ran the registry's code


RELEASED_INSIDE_THE_MUTEX = """
import sys, threading, time
from fencelock import SessionLock, _registry
a, b = sys.argv[1:]
A, B, B2 = SessionLock(a, "a"), SessionLock(b, "b"), SessionLock(b, "b2", timeout=30)
A.acquire()
B.acquire()
taken = threading.Event()
def queued():
    with B2:
        taken.set()
waiter = threading.Thread(target=queued)
waiter.start()
deadline = time.monotonic() + 30
while not _registry.waiters():  # B2 in line behind B
    assert time.monotonic() < deadline
    time.sleep(0.001)
ran = []
def handler(frame, event, arg):  # A released where a signal handler would, inside B's free
    if event == "call" and frame.f_code is _registry.wake.__code__ and not ran:
        ran.append(True)
        A.release()
sys.settrace(handler)
B.release()
sys.settrace(None)
waiter.join(30)
other = SessionLock(a, "other", timeout=30)  # A's slot freed all the same
other.acquire()
other.release()
print(ran == [True], taken.is_set(), A.held)
"""
"""``python -c RELEASED_INSIDE_THE_MUTEX A B``: a release of session A that runs while
its thread is inside the registry's mutex (freeing B's slot for a waiter)."""


def test_a_release_by_a_signal_handler_inside_the_registrys_mutex_frees_its_slot_later(
    tmp_path: Path,
) -> None:
    """A signal handler (or a finaliser) that releases session A while its thread is
    inside the registry's mutex, freeing B's slot: it cannot take the mutex (its thread
    waited for itself, and every release and acquire of the process after it): A's slot
    is freed from a thread of its own once the mutex is let go, and another lock object
    of the process takes A at once."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", RELEASED_INSIDE_THE_MUTEX,
                           str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False"], done.stdout
