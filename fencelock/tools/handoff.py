"""Hand-off latency between two processes, for any lock with ``acquire``/``release``:
the time from the holder's release to the acquire of a waiter blocked in another
process. The sidecar and etcd sections of the benchmark both measure with it."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Protocol

from fencelock.tools._command import quietly, start_worker

_CTX = multiprocessing.get_context("fork")


class _Lock(Protocol):
    def acquire(self) -> None: ...
    def release(self) -> None: ...


def _close(lock: _Lock) -> None:
    close = getattr(lock, "close", None)
    if close is not None:
        close()


def _waiter(make: Callable[[], _Lock], rounds: int, conn: Connection) -> None:
    lock = make()
    try:
        for _ in range(rounds):
            conn.recv()  # the holder holds the lock now
            conn.send("waiting")
            lock.acquire()
            got = time.monotonic_ns()
            lock.release()
            conn.send(got)
    finally:
        _close(lock)
        conn.close()


def latencies(make: Callable[[], _Lock], rounds: int, hold: float) -> list[float]:
    """Milliseconds from each release to the other process's acquire, over ``rounds``
    hand-offs; the holder holds ``hold`` seconds first. ``make`` builds the lock (in
    each process: the waiter is a fork). One hand-off more goes first, untimed: the
    first after the fork also times the processes' first use of their new lock objects
    and of the pages the fork shares."""
    lock = make()
    here, there = _CTX.Pipe()
    child = _CTX.Process(target=quietly, args=(_waiter, make, rounds + 1, there), daemon=True)
    start_worker(child)
    there.close()
    out = []
    try:
        for _ in range(rounds + 1):
            lock.acquire()
            here.send("held")
            here.recv()
            time.sleep(hold)  # let the waiter reach its blocking call
            released = time.monotonic_ns()
            lock.release()
            got = here.recv()
            out.append((got - released) / 1e6)
    finally:
        _close(lock)
        here.close()
        child.join(30)
        if child.is_alive():
            child.kill()
    return out[1:]


def p99(values: Sequence[float]) -> float:
    """The 99th percentile of hand-off latencies, by nearest rank (the largest for
    fewer than 100)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]  # ceil(n * 0.99) - 1
