"""asyncio: waiting off the event loop, tasks that contend, cancellation."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SpawnHolder

from fencelock import (
    FenceLockWarning,
    ProbeState,
    SessionContendedError,
    SessionLock,
    _registry,
    probe,
)


async def hand_over(session: Path, holder: Any) -> None:
    """Release ``holder`` (a holder process) once a waiter of this process is blocked
    on the session: an `acquire_async` that found it held then takes it in its helper
    thread (a free session it takes on the loop)."""
    from conftest import wait_for_blocked_waiter

    await asyncio.to_thread(wait_for_blocked_waiter, session)
    assert await asyncio.to_thread(holder.call, "release") == "released"


async def until(predicate: Any, limit: float = 30.0) -> None:
    """Yield to the loop until ``predicate()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def test_async_with_gives_the_lock(session: Path) -> None:
    async def main() -> None:
        lock = SessionLock(session, lane="async")
        async with lock as entered:
            assert entered is lock and lock.held
            assert probe(session).state == ProbeState.LIVE
            lock.append({"role": "user"})
        info = await lock.acquire_async()
        assert info.token == 2
        lock.release()

    asyncio.run(main())
    assert probe(session).state == ProbeState.FREE


def test_a_free_session_is_taken_without_leaving_the_loop(session: Path) -> None:
    """`acquire_async` on a session nothing holds takes it in its first step, on the
    loop: no helper thread to start and hear back from (that cost 300 us against a
    25 us `acquire`). Then the record is the one `acquire` would give."""

    async def main() -> None:
        lock = SessionLock(session, lane="free")
        step = lock.acquire_async()
        with pytest.raises(StopIteration) as taken:
            step.send(None)  # a thread's wait would suspend here
        info = taken.value.value
        assert lock.held and info.token == 1 and info == lock.info
        lock.release()

    asyncio.run(main())
    assert probe(session).state == ProbeState.FREE


@pytest.mark.parametrize("holder", ["fencelock", "flock(1)", "in process"])
def test_a_held_session_is_waited_for_off_the_loop(
    session: Path, spawn_holder: SpawnHolder, foreign_holder: Any, holder: str
) -> None:
    """A session held (by a run of another process, by a lock outside fencelock with
    no live record, by another object of this process) is neither waited for nor given
    a moment's grace on the loop: the first step suspends, and the lock comes once it
    is released."""
    other: Any = None
    if holder == "fencelock":
        other = spawn_holder(session, lane="other")
        other.acquire()
    elif holder == "flock(1)":
        other = foreign_holder(Path(f"{session}.holder"))
    else:
        other = SessionLock(session, lane="other")
        other.acquire()

    async def main() -> int:
        lock = SessionLock(session, lane="waiting", on_contention="fail")
        step = lock.acquire_async(timeout=None)
        waiting = step.send(None)  # suspends: no SessionContendedError, no wait here
        assert isinstance(waiting, asyncio.Future) and not lock.held
        step.close()  # closed: the helper gives up (the session stays the holder's)
        lock = SessionLock(session, lane="waiting")
        task = asyncio.create_task(lock.acquire_async())
        await asyncio.sleep(0)
        assert not task.done()
        if holder == "fencelock":
            assert await asyncio.to_thread(other.call, "release") == "released"
        else:
            other.release()
        info = await asyncio.wait_for(task, 30)
        lock.release()
        return info.token

    assert asyncio.run(main()) >= 1
    assert probe(session).state == ProbeState.FREE


def test_an_acquire_closed_while_it_waits_leaves_no_lock_behind(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """An `acquire_async` closed rather than cancelled (``coro.close()``, as a dropped
    task's coroutine is) while it waits: the lock that comes later is given back. It
    was delivered to nobody and held for the life of the process."""
    from conftest import wait_for_blocked_waiter

    other = spawn_holder(session, lane="other")
    other.acquire()

    async def main() -> int:
        step = SessionLock(session, lane="closed").acquire_async()
        assert isinstance(step.send(None), asyncio.Future)
        await asyncio.to_thread(wait_for_blocked_waiter, session)  # its helper waits
        step.close()
        await hand_over(session, other)  # (the closed attempt's helper is the waiter)
        after = SessionLock(session, lane="after")
        info = await asyncio.wait_for(after.acquire_async(), 30)
        after.release()
        return info.token

    assert asyncio.run(main()) >= 2  # (3 if the closed attempt's helper took it first)
    assert probe(session).state == ProbeState.FREE


def test_an_acquire_closed_as_its_lock_was_delivered_gives_it_back(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The helper has delivered the lock, and the coroutine is closed before it resumes:
    the lock goes back (in a thread: a garbage collector closing it may run in one that
    holds the registry's mutex), not kept by nobody."""
    other = spawn_holder(session, lane="other")
    other.acquire()

    async def main() -> None:
        lock = SessionLock(session, lane="closed-late")
        step = lock.acquire_async()
        suspended = step.send(None)
        assert isinstance(suspended, asyncio.Future)
        await hand_over(session, other)
        await until(suspended.done)  # delivered: the coroutine would resume next
        assert lock.held
        step.close()
        await until(lambda: not lock.held)  # given back (its thread may still be at it)
        after = SessionLock(session, lane="after")
        assert (await asyncio.wait_for(after.acquire_async(), 30)).token == 3
        after.release()

    asyncio.run(main())
    assert probe(session).state == ProbeState.FREE


def test_reentry_after_wait_for_a_held_session_in_the_same_task(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """As below, for a lock that comes to the waiting thread: the caller's task owns it
    (`asyncio.wait_for` runs the acquire in a task of its own on Python 3.11)."""
    other = spawn_holder(session, lane="other")
    other.acquire()

    async def main() -> int:
        lock = SessionLock(session, lane="outer")
        acquiring = asyncio.ensure_future(asyncio.wait_for(lock.acquire_async(), 30))
        await hand_over(session, other)
        first = await acquiring
        async with lock:  # re-entered: bounded below, so a self-wait fails the test
            pass
        assert lock.held
        lock.release()
        return first.token

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 2
    assert probe(session).state == ProbeState.FREE


def test_loop_keeps_ticking_while_a_task_waits(session: Path, spawn_holder: SpawnHolder) -> None:
    holder = spawn_holder(session, lane="other-process")
    holder.acquire()

    async def main() -> int:
        ticks = 0
        enough = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 50:
                    enough.set()
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        lock = SessionLock(session, lane="async")
        waiter = asyncio.create_task(lock.acquire_async())
        await enough.wait()  # 50 ticks while the waiter is blocked on the lock
        assert not waiter.done()
        assert await asyncio.to_thread(holder.call, "release") == "released"
        info = await waiter
        lock.release()
        tick_task.cancel()
        return info.token

    assert asyncio.run(main()) == 2


def test_two_tasks_contend_like_two_processes(session: Path) -> None:
    events: list[str] = []

    async def main() -> None:
        first, second = SessionLock(session, lane="t1"), SessionLock(session, lane="t2")
        await first.acquire_async()
        events.append("t1 acquired")

        async def take_second() -> None:
            async with second:
                events.append("t2 acquired")

        task = asyncio.create_task(take_second())
        await until(lambda: _registry.waiters() == 1)
        assert events == ["t1 acquired"]
        events.append("t1 released")
        first.release()
        await task

    asyncio.run(main())
    assert events == ["t1 acquired", "t1 released", "t2 acquired"]


def test_same_object_is_not_shared_between_tasks(session: Path) -> None:
    async def main() -> None:
        lock = SessionLock(session, on_contention="fail")
        await lock.acquire_async()

        async def other_task() -> None:
            await lock.acquire_async()

        with pytest.raises(SessionContendedError):
            await asyncio.create_task(other_task())
        lock.release()

    asyncio.run(main())


def test_async_timeout_raises_contended(session: Path, spawn_holder: SpawnHolder) -> None:
    holder = spawn_holder(session, lane="busy")
    holder.acquire()

    async def main() -> None:
        with pytest.raises(SessionContendedError) as err:
            await SessionLock(session, timeout=0.1).acquire_async()
        assert err.value.holder is not None and err.value.holder.lane == "busy"

    asyncio.run(main())


def test_acquire_async_takes_a_timeout_as_acquire_does(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """`acquire_async(timeout=...)` overrides the object's timeout for this call, as
    `acquire(timeout=...)` does: 0.1 s on an object that would wait for good; 0 fails at
    once; None waits for good on an object with a timeout (it gets the session once
    the holder lets go)."""
    holder = spawn_holder(session, lane="busy")
    holder.acquire()

    async def main() -> None:
        for timeout in (0.1, 0):
            with pytest.raises(SessionContendedError) as err:
                await SessionLock(session).acquire_async(timeout=timeout)
            assert err.value.holder is not None and err.value.holder.lane == "busy"
        patient = SessionLock(session, timeout=0.1)
        waiting = asyncio.create_task(patient.acquire_async(timeout=None))
        await until(lambda: _registry.any_held())
        await asyncio.sleep(0.3)  # past the object's own timeout: still waiting
        assert not waiting.done()
        assert await asyncio.to_thread(holder.call, "release") == "released"
        info = await waiting
        assert info.lane == "default"
        patient.release()

    asyncio.run(main())


def test_cancelled_waiter_leaves_no_lock_behind(session: Path, spawn_holder: SpawnHolder) -> None:
    """Once the cancelled task has raised CancelledError, its attempt is over: nothing
    still waits for the lock (it could take it, write a "held" record, and be cut off
    by the process's exit with the record left so: a stale session)."""
    holder = spawn_holder(session, lane="holder")
    holder.acquire()

    async def main() -> None:
        waiter = asyncio.create_task(SessionLock(session, lane="cancelled").acquire_async())
        await until(lambda: not waiter.done() and _registry.any_held())
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not _registry.any_held()  # the attempt let go of its slot: it is over
        assert await asyncio.to_thread(holder.call, "release") == "released"
        # The session is free to anyone else; the cancelled run never wrote a record.
        async with SessionLock(session, lane="after") as lock:
            assert lock.info is not None and lock.info.token == 2
        await until(lambda: not _registry.any_held())

    asyncio.run(main())
    status = probe(session)
    assert status.state == ProbeState.FREE and status.lane == "after"


def test_waiting_tasks_do_not_starve_the_default_executor(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    holder = spawn_holder(session, lane="long-run")
    holder.acquire()

    async def main() -> None:
        waiting = [
            asyncio.create_task(SessionLock(session, lane=f"w{i}").acquire_async())
            for i in range((os.cpu_count() or 1) + 8)  # more than the default executor
        ]
        await until(lambda: _registry.waiters() >= len(waiting) - 1)
        # Unrelated blocking work and a free session still go through at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 10) == 42
        free = SessionLock(session.with_name("other.jsonl"), lane="free")
        await asyncio.wait_for(free.acquire_async(), 10)
        free.release()
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(main())


def test_cancelled_just_after_the_lock_was_delivered_leaves_no_lock_behind(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """The helper thread delivers the lock, and the task is cancelled before it resumes
    (a timeout or a task group can do that): the task sees CancelledError, so the lock
    must go back, not stay held by nobody."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lock = SessionLock(session, lane="cancelled-late")
        task: asyncio.Task[Any] | None = None
        real = loop.call_soon_threadsafe

        def then_cancel(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(callback, "__name__", "") != "deliver" or task is None:
                return real(callback, *args, **kwargs)
            cancelled = task

            def deliver_then_cancel() -> None:
                callback(*args)
                cancelled.cancel()  # after deliver(), before the task can resume

            return real(deliver_then_cancel, **kwargs)

        loop.call_soon_threadsafe = then_cancel  # type: ignore[assignment]
        task = asyncio.create_task(lock.acquire_async())
        await hand_over(session, other)
        with pytest.raises(asyncio.CancelledError):
            await task
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        assert not lock.held
        async with SessionLock(session, lane="after", on_contention="fail") as after:
            assert after.info is not None and after.info.token == 3

    other = spawn_holder(session, lane="other")
    other.acquire()
    asyncio.run(main())
    assert probe(session).state == ProbeState.FREE


def test_a_cancel_returns_even_when_giving_back_a_late_lock_fails(
    session: Path, monkeypatch: pytest.MonkeyPatch, spawn_holder: SpawnHolder
) -> None:
    """The lock arrives just after the cancel, and giving it back reports an error (an
    EIO writing "released"): the cancel still returns (as a cancellation; the error is
    a warning), and the lock is not kept."""
    import errno

    from fencelock._sidecar_holder import SidecarHolder

    entered, proceed = threading.Event(), threading.Event()
    write, release = SidecarHolder._write_new_record, SidecarHolder.release

    def slow_write(self: SidecarHolder, lock: SessionLock, run_id: str) -> None:
        entered.set()  # the lock is taken; its record is being written
        assert proceed.wait(60)
        write(self, lock, run_id)

    def failing_release(self: SidecarHolder, lock: SessionLock) -> None:
        release(self, lock)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(SidecarHolder, "_write_new_record", slow_write)
    monkeypatch.setattr(SidecarHolder, "release", failing_release)
    other = spawn_holder(session, lane="other")
    other.acquire()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(SessionLock(session, lane="late").acquire_async())
        await hand_over(session, other)
        await asyncio.to_thread(entered.wait, 60)
        task.cancel()
        loop.call_soon(proceed.set)  # after the task has taken the cancel
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 30)

    with pytest.warns(FenceLockWarning, match="could not be given back cleanly"):
        asyncio.run(main())
    status = probe(session)
    assert status.state == ProbeState.FREE and status.lane == "late"


def test_reentry_after_wait_for_in_the_same_task(session: Path) -> None:
    """``asyncio.wait_for(lock.acquire_async(), t)`` then ``async with lock`` in the same
    task re-enters: on Python 3.11 wait_for waits in a task of its own, which owned the
    lock once it ended, and the nested ``async with`` waited for itself for ever."""

    async def main() -> int:
        lock = SessionLock(session, lane="outer")
        first = await asyncio.wait_for(lock.acquire_async(), 30)
        async with lock:  # re-entered: bounded below, so a self-wait fails the test
            pass
        await asyncio.wait_for(lock.__aenter__(), 30)
        await lock.__aexit__(None, None, None)
        assert lock.held
        lock.release()
        assert not lock.held
        return first.token

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 1
    assert probe(session).state == ProbeState.FREE


def test_a_lock_released_by_another_task_before_the_acquirer_resumes(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """Any task of the holding process may release: one that does so right after the
    lock came, before the acquiring task resumed, leaves that task the record it took
    (it raised a bare AssertionError)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lock = SessionLock(session, lane="taken")
        real = loop.call_soon_threadsafe

        def release_first(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(callback, "__name__", "") != "deliver":  # (to_thread's, say)
                return real(callback, *args, **kwargs)

            def released_then_delivered() -> None:
                lock.release()  # as another task would, before the acquirer resumes
                callback(*args)

            return real(released_then_delivered, **kwargs)

        loop.call_soon_threadsafe = release_first  # type: ignore[method-assign, assignment]
        try:
            acquiring = asyncio.create_task(asyncio.wait_for(lock.acquire_async(), 30))
            await hand_over(session, other)
            info = await acquiring
        finally:
            loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        assert info.token == 2 and info.lane == "taken" and not lock.held

    other = spawn_holder(session, lane="other")
    other.acquire()
    asyncio.run(main())
    assert probe(session).state == ProbeState.FREE


def test_an_async_with_cancelled_before_it_starts_leaves_no_coroutine_unawaited(
    session: Path,
) -> None:
    """``__aenter__`` cancelled before its first step: no inner coroutine made and never
    awaited (Python warns of one at collection), and no lock taken."""
    import gc
    import warnings

    async def main() -> None:
        task = asyncio.create_task(SessionLock(session, lane="early").__aenter__())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert probe(session).state == ProbeState.FREE


def test_a_lock_that_comes_as_its_task_is_cancelled_is_given_back_off_the_loop(
    session: Path, monkeypatch: pytest.MonkeyPatch, spawn_holder: SpawnHolder
) -> None:
    """The lock arrives just after the cancel: the helper gives it back in its own
    thread (a release may wait for etcd: it blocked the event loop, and an error of it
    replaced the cancellation), and the task ends cancelled once it is given back."""
    from fencelock._sidecar_holder import SidecarHolder

    entered, proceed = threading.Event(), threading.Event()
    write, release = SidecarHolder._write_new_record, SidecarHolder.release
    released_in: list[threading.Thread] = []

    def slow_write(self: SidecarHolder, lock: SessionLock, run_id: str) -> None:
        entered.set()
        assert proceed.wait(60)
        write(self, lock, run_id)

    def noted_release(self: SidecarHolder, lock: SessionLock) -> None:
        released_in.append(threading.current_thread())
        release(self, lock)

    monkeypatch.setattr(SidecarHolder, "_write_new_record", slow_write)
    monkeypatch.setattr(SidecarHolder, "release", noted_release)
    other = spawn_holder(session, lane="other")
    other.acquire()

    async def main() -> threading.Thread:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(SessionLock(session, lane="late").acquire_async())
        await hand_over(session, other)
        await asyncio.to_thread(entered.wait, 60)
        task.cancel()
        loop.call_soon(proceed.set)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 30)
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert len(released_in) == 1 and released_in[0] is not loop_thread
    assert probe(session).state == ProbeState.FREE  # given back before the task ended


def test_a_lock_that_comes_after_its_event_loop_stopped_is_given_back_when_it_closes(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    """A program that drives its own loop stops it while a task waits, and the lock
    comes after: once the loop is closed, with the task never resumed, the helper gives
    the lock back (it stayed held for the life of the process)."""
    from conftest import wait_for_blocked_waiter

    other = spawn_holder(session, lane="other")
    other.acquire()
    loop = asyncio.new_event_loop()
    lock = SessionLock(session, lane="abandoned")
    task = loop.create_task(lock.acquire_async())
    loop.run_until_complete(asyncio.to_thread(wait_for_blocked_waiter, session))
    helpers = [t for t in threading.enumerate() if t.name == "fencelock-acquire"]
    assert len(helpers) == 1
    assert other.call("release") == "released"
    deadline = time.monotonic() + 30
    while not lock.held:  # the helper has the lock; the stopped loop cannot be told
        assert time.monotonic() < deadline
        time.sleep(0.001)
    loop.close()
    helpers[0].join(30)
    assert not helpers[0].is_alive() and not lock.held
    assert probe(session).state == ProbeState.FREE
    del task


HALF_IMPORTED = """
import sys, types
from fencelock import SessionLock

# What sys.modules holds while another thread is part way through `import asyncio`: the
# module, without the functions its import has not reached yet.
sys.modules["asyncio"] = types.ModuleType("asyncio")
lock = SessionLock(sys.argv[1], "t")
with lock:
    lock.append({"n": 1})
print(lock.acquire().token > 0)
lock.release()
"""


def test_an_acquire_while_another_thread_imports_asyncio(session: Path) -> None:
    """No task runs in a thread while asyncio is still being imported: an acquire then
    owns the session as its thread (it raised AttributeError; the etcd store's client
    imports asyncio on the first etcd acquire, so its first acquire set this off in a
    process's other threads)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HALF_IMPORTED, str(session)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "True\n", done.stderr


def test_a_task_holding_a_session_when_its_loop_is_closed_gives_it_back_once_collected(
    session: Path,
) -> None:
    """A program that drives its own loop closes it while a task holds the session in
    `async with` and another task of it waits: once the dropped tasks are collected,
    the holder's block is closed and the session given back, and the waiter's helper
    thread gives back what it then gets. The lock object kept its task alive (as the
    owner of the hold), so that the session stayed held, and the waiter's helper thread
    waited, for the life of the process."""
    import gc

    loop = asyncio.new_event_loop()
    inside = threading.Event()

    async def hold() -> None:
        async with SessionLock(session, lane="holder"):
            inside.set()
            await asyncio.sleep(3600)

    async def wait() -> None:
        async with SessionLock(session, lane="waiter"):
            pass

    tasks = [loop.create_task(hold()), loop.create_task(wait())]
    while not (inside.is_set() and _registry.waiters() == 1):
        loop.run_until_complete(asyncio.sleep(0.001))
    helpers = [t for t in threading.enumerate() if t.name == "fencelock-acquire"]
    assert len(helpers) == 1
    loop.close()
    del tasks, loop
    gc.collect()
    helpers[0].join(30)
    assert not helpers[0].is_alive()
    for thread in threading.enumerate():  # the release's own thread
        if thread.name == "fencelock-release":
            thread.join(30)
    assert probe(session).state == ProbeState.FREE
    with SessionLock(session, lane="after", on_contention="fail"):
        pass


@pytest.mark.parametrize("kind", ["async with", "with in a generator"])
def test_a_block_the_garbage_collector_closes_inside_the_registry_gives_the_session_back(
    session: Path, kind: str
) -> None:
    """A dropped coroutine suspended in `async with` (or a generator in `with`), kept
    only by a reference cycle, is closed by the garbage collector, in whatever thread
    and at whatever point a collection starts: here in one holding the registry's
    mutex. The collection returns, and the session is given back from a thread of its
    own once the mutex is free. The release, run in the block's exit, took the mutex
    again and hung that thread, and with it every acquire and release of the process."""
    import gc

    async def hold_async() -> None:
        async with SessionLock(session, lane="holder"):
            await _Suspended()  # here until closed

    def hold_sync() -> Any:
        with SessionLock(session, lane="holder"):
            yield

    gc.disable()  # no collection but the one below
    try:
        if kind == "async with":
            suspended: Any = hold_async()
            suspended.send(None)
        else:
            suspended = hold_sync()
            next(suspended)
        assert probe(session).state == ProbeState.LIVE
        cycle: list[Any] = [suspended]
        cycle.append(cycle)
        del suspended, cycle
        collector = threading.Thread(target=_collected_inside_the_registry, daemon=True)
        collector.start()
        collector.join(30)
        assert not collector.is_alive(), "the collection hung inside the registry's mutex"
    finally:
        gc.enable()
    deadline = time.monotonic() + 30
    while probe(session).state != ProbeState.FREE:  # (given back from its own thread)
        assert time.monotonic() < deadline, "never given back"
        time.sleep(0.001)
    with SessionLock(session, lane="after", on_contention="fail"):
        pass


def _collected_inside_the_registry() -> None:
    import gc

    with _registry._mu:
        gc.collect()


def test_a_block_closed_by_its_program_gives_the_session_back_before_the_close_returns(
    session: Path,
) -> None:
    """`aclose()` of an async generator that streams inside `async with` (or a
    coroutine's `close()`): the session is given back by the time it returns, so that
    the program's next acquire finds it free (the block's exit once released from a
    thread of its own for every close: the next fail-fast acquire met its own lane)."""
    async def stream() -> Any:
        async with SessionLock(session, lane="stream"):
            yield 1
            yield 2

    from fencelock import _lock

    async def main() -> None:
        items = stream()
        assert await items.__anext__() == 1
        # (A release handed to a thread would wait for this: seen as not yet done.)
        with _lock._closing:
            await items.aclose()
            assert probe(session).state == ProbeState.FREE
        with SessionLock(session, lane="next", on_contention="fail"):
            pass

    asyncio.run(main())


class _Suspended:
    """An awaitable that suspends its coroutine once, with no event loop."""

    def __await__(self) -> Any:
        yield


def test_async_with_exit_waits_for_another_threads_append_off_the_loop(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that offloads its append (``await asyncio.to_thread(lock.append, ...)``)
    and is cancelled mid-write: its ``async with`` exit releases, which waits for that
    append's write and fsync. Made on the loop, the wait blocked it, every other task
    with it. Here the append's fsync waits until the loop itself lets it go: a release
    made on the loop would wait for an fsync that waits for the loop."""
    from fencelock import _fence

    real, in_fsync, gate = _fence._fsync, threading.Event(), threading.Event()
    opened_by_the_loop: list[bool] = []

    def fsync(fd: int) -> None:
        in_fsync.set()
        opened_by_the_loop.append(gate.wait(10))
        real(fd)

    monkeypatch.setattr(_fence, "_fsync", fsync)
    lock = SessionLock(session, "channel")

    async def lane() -> None:
        async with lock:
            await asyncio.to_thread(lock.append, {"tool_output": "x"})

    async def main() -> None:
        task = asyncio.create_task(lane())
        await asyncio.to_thread(in_fsync.wait, 30)  # the append is in its fsync
        task.cancel()  # the task's exit runs next, then this callback
        asyncio.get_running_loop().call_soon(gate.set)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # (The file's fsync, then its new directory entry's.) The loop ran while the release waited.
    assert opened_by_the_loop and all(opened_by_the_loop), opened_by_the_loop
    assert not lock.held and probe(session).state == ProbeState.FREE
    assert session.read_text() == '{"tool_output":"x"}\n'
