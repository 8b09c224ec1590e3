"""Shared fixtures: holder processes driven over pipes, session paths, holder stores;
the one way to see a waiter blocked in flock(2); capability marks applied (marks.py)."""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import marks
import pytest

if TYPE_CHECKING:
    from fencelock import HolderInfo
    from fencelock._etcdserver import EtcdServer

HERE = Path(__file__).parent
OnContention = Literal["wait", "fail"]


def pytest_configure(config: pytest.Config) -> None:
    # Started as a background job of a script (`pytest ... &`), the run inherits SIGINT
    # ignored, and so would every process a test starts: fencelock keeps a signal that
    # was ignored when it started ignored (as nohup's users expect), and every Ctrl-C
    # test would fail or hang.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    marks.skip_where_missing(items)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Ahead of the runner's own hook, which sets up the test's fixtures.
    marks.check(item)


class Holder:
    """A fencelock holder in another process; every call waits for its answer."""

    def __init__(
        self, session: Path, lane: str, on_contention: OnContention, timeout: float | None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(HERE / "holder_process.py"), str(session), lane,
             on_contention, "-" if timeout is None else str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        ready = self._read()
        assert ready.startswith("ready"), ready
        self.pid = int(ready.split()[1])

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"holder process {self.proc.pid} died: {self.proc.wait()}")
        return line.strip()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def call(self, command: str) -> str:
        self.send(command)
        return self._read()

    def read(self) -> str:
        """The answer to a command sent earlier with `send`."""
        return self._read()

    def acquire(self) -> int:
        reply = self.call("acquire")
        assert reply.startswith("acquired"), reply
        return int(reply.split()[1])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """A session path in a fresh directory (the file itself does not exist yet)."""
    return tmp_path / "sessions" / "4f1c2a9e-0000-4000-8000-000000000001.jsonl"


@pytest.fixture(autouse=True)
def _sessions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sessions").mkdir(exist_ok=True)
    # The sidecar store unless a test picks another (the `store` fixture): a
    # FENCELOCK_BACKEND in the caller's environment must not move every test to etcd.
    monkeypatch.delenv("FENCELOCK_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _no_session_left_held() -> Iterator[None]:
    """A test ends with no session held by a lock object of this process: one left
    held stays held by the worker (its registry keeps the object), and a later test
    there would find it so (`_registry.any_held()` answers for the whole process).
    Fails the test that left it, not that later one."""
    from fencelock import _registry

    def held() -> set[str]:
        return {key for key, (lock, _) in list(_registry._held.items()) if lock.held}

    before = held()
    yield
    left = sorted(held() - before)
    assert not left, f"the test left these sessions held by this process: {left}"


class SpawnHolder(Protocol):
    """The ``spawn_holder`` fixture: starts a `Holder`, closed when the test ends."""

    def __call__(
        self, session: Path | str, lane: str = ..., on_contention: OnContention = ...,
        timeout: float | None = ..., prefix: Sequence[str] = ...,
    ) -> Holder: ...


@pytest.fixture
def spawn_holder() -> Iterator[SpawnHolder]:
    """Start holder processes: ``spawn_holder(session, lane="x", on_contention="wait")``;
    ``prefix``, a command that runs the holder (in a namespace, say)."""
    started: list[Holder] = []

    def spawn(session: Path | str, lane: str = "test", on_contention: OnContention = "wait",
              timeout: float | None = None, prefix: Sequence[str] = ()) -> Holder:
        h = Holder(Path(session), lane, on_contention, timeout, prefix)
        started.append(h)
        return h

    yield spawn
    for h in started:
        h.close()


def hammer(session: Path, log: Path, counter: Path, workers: int, turns: int,
           args: Callable[[int], list[str]] = lambda i: [],
           env: Callable[[int], dict[str, str]] = lambda i: {}) -> list[str]:
    """Run ``workers`` hammer_worker.py processes for ``turns`` turns each on ``session``
    (``args(i)``, ``env(i)``: worker i's extra arguments and environment), all released
    at once; wait for them to succeed and return their log's lines, after checking that
    every turn's "enter" is followed by its own "exit" (no two turns overlapped)."""
    counter.write_text("0")
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "hammer_worker.py"), str(session), str(log),
             str(counter), str(turns), *args(i)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **env(i)},
        )
        for i in range(workers)
    ]
    for p in procs:  # all started and imported: release them together
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    for p in procs:
        assert p.wait(timeout=180) == 0
        assert p.stdout is not None
        p.stdout.close()
    lines = log.read_text().splitlines()
    for enter, exit_ in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("enter ") and exit_ == "exit " + enter.split()[1]
    return lines


def wait_for_blocked_waiter(
    session: Path | str, inode: int | None = None, limit: float = 30.0,
    unless: threading.Event | None = None, *, proc: subprocess.Popen[Any] | None = None,
) -> bool:
    """Return True once a process is blocked in flock(2) on the session's sidecar (or on
    sidecar inode ``inode``): a ``->`` FLOCK line in /proc/locks. With ``proc``, that
    process, and fail at once if it exits instead. Return False if ``unless`` is set
    first (say, the would-be waiter finished without waiting). ``limit`` bounds a broken
    build; it is not a timing claim. This is the suite's one way to see a waiter."""
    marks.require("proc_locks")
    if inode is None:
        inode = Path(str(session) + ".holder").stat().st_ino
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" not in parts:
                    continue
                at = parts.index("->")
                kind, pid, device_inode = parts[at + 1], parts[at + 4], parts[at + 5]
                if (kind == "FLOCK" and device_inode.rsplit(":", 1)[-1] == str(inode)
                        and (proc is None or pid == str(proc.pid))):
                    return True
        if unless is not None and unless.is_set():
            return False
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"pid {proc.pid} exited ({proc.returncode}) without waiting")
        time.sleep(0.001)
    who = "no process" if proc is None else f"pid {proc.pid} never"
    raise AssertionError(f"{who} blocked on the sidecar lock of {session}")


def thread_in_syscall(
    pid: int, name: str, limit: float = 30.0, *, main: bool = False, alias: str = ""
) -> int:
    """The id of a thread of ``pid``, other than its main thread (with ``main``: its
    main thread), that sleeps in system call ``name`` (`marks.SYSCALLS`), or in
    ``alias`` (the call a C library may make for it instead); ``limit`` bounds a broken
    build."""
    marks.require("tgkill")
    numbers = [str(marks.SYSCALLS[n]) for n in (name, alias) if n in marks.SYSCALLS]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                call = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            except OSError:
                continue  # the thread has just ended
            if (int(tid) == pid) == main and call[:1] and call[0] in numbers:
                return int(tid)
        time.sleep(0.001)
    raise AssertionError(f"no thread of pid {pid} sleeps in {name}")


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs, wait for it, and close its pipes: a test that
    failed midway leaves nothing running or open behind it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def interrupt_waiter(
    session: Path | str, proc: subprocess.Popen[str], signum: int
) -> tuple[str, str]:
    """Once ``proc`` waits for the session's lock, send it ``signum``; its stdout and
    stderr once it has exited (it is killed if it has not within 60 s)."""
    try:
        wait_for_blocked_waiter(session, proc=proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    return out or "", err or ""


def tgkill(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to thread ``tid`` of process ``pid`` alone, as the kernel does
    when it picks that thread for a signal sent to the whole process."""
    import ctypes

    marks.require("tgkill")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(marks.SYSCALLS["tgkill"], pid, tid, signum) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"tgkill({pid}, {tid}): {os.strerror(err)}")


FLOCK = shutil.which("flock")
"""util-linux flock(1): a lock holder outside fencelock."""


class ForeignHolder:
    """``flock [-s] SIDECAR sh -c 'echo $$; exec cat'``: util-linux flock(1) holding a
    sidecar, as a process outside fencelock would. ``pid`` is flock's own (the one
    /proc/locks names), ``child`` its command's, which inherits the lock."""

    def __init__(self, sidecar: Path, shared: bool) -> None:
        assert FLOCK is not None
        self.proc = subprocess.Popen(
            [FLOCK, "-s" if shared else "-x", str(sidecar), "sh", "-c",
             "echo $$; exec cat >/dev/null"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # written by the command: the lock is held
        assert line.strip().isdigit(), line
        self.pid = self.proc.pid
        self.child = int(line)
        self.released = False

    def kill_flock(self) -> None:
        """SIGKILL flock itself: its command holds the lock on, as a child that
        inherited the descriptor."""
        self.proc.kill()
        self.proc.wait()

    def release(self) -> None:
        """Close the command's stdin: it exits, and the lock goes with it."""
        if self.released:
            return
        self.released = True
        try:
            exited = os.pidfd_open(self.child)  # readable once the command has exited
        except ProcessLookupError:
            exited = -1
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            if exited >= 0:
                ready, _, _ = select.select([exited], [], [], 60)
                assert ready, f"pid {self.child} still holds the lock"
        finally:
            if exited >= 0:
                os.close(exited)
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class SpawnForeignHolder(Protocol):
    """The ``foreign_holder`` fixture: starts a `ForeignHolder`, released at the end."""

    def __call__(self, sidecar: Path | str, shared: bool = ...) -> ForeignHolder: ...


@pytest.fixture
def foreign_holder() -> Iterator[SpawnForeignHolder]:
    """Start flock(1) holders: ``foreign_holder(sidecar, shared=False)``."""
    marks.require("flock")
    started: list[ForeignHolder] = []

    def spawn(sidecar: Path | str, shared: bool = False) -> ForeignHolder:
        h = ForeignHolder(Path(sidecar), shared)
        started.append(h)
        return h

    yield spawn
    for h in started:
        h.release()
# -- holder stores -----------------------------------------------------------------
# Each xdist worker runs its own etcd (free ports, a temporary data directory); tests
# that use the `store` fixture run once on the sidecar store and once on etcd. The URL
# reaches holder processes through FENCELOCK_BACKEND, as it would reach a real run.

STORES = ("sidecar", "etcd")
TEST_TTL = 6
"""Short, so a killed holder's session turns stale soon; long enough that a loaded
machine still renews leases in time (a holder counts itself lost 5 s after its last
renewal; with 4 s, a run at load average 12 once lost a lease it still had)."""


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    marks.require("etcd")
    from fencelock._etcdserver import EtcdServer

    server = EtcdServer()
    server.start()
    yield server
    server.stop()


def etcd_watchers(server: EtcdServer) -> int:
    """How many watches etcd serves (its ``etcd_debugging_mvcc_watcher_total``): a
    waiter's watch on the key it waits for is how a test sees it waiting."""
    import urllib.request

    with urllib.request.urlopen(f"http://{server.endpoint}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
    raise AssertionError("etcd reports no watcher count")


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The backend URL of the store under test (None: sidecars), also set as
    FENCELOCK_BACKEND for this test and the processes it starts."""
    if request.param == "sidecar":
        monkeypatch.delenv("FENCELOCK_BACKEND", raising=False)
        return None
    server: EtcdServer = request.getfixturevalue("etcd_server")
    import uuid

    url = server.url(f"t-{uuid.uuid4().hex[:12]}", ttl=TEST_TTL)
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    return url


_DEPTH_PROBE = """
import json

def refused(depth):
    try:
        json.loads("[" * depth + "]" * depth)
    except RecursionError:
        return True
    return False

high = 64
while not refused(high):
    high *= 2
low = high // 2
while high - low > 1:
    middle = (low + high) // 2
    low, high = (low, middle) if refused(middle) else (middle, high)
print(high)
"""


@functools.cache
def json_depth_limit() -> int:
    """The shallowest nesting of arrays this interpreter's JSON parser refuses, from a
    fresh interpreter's top level (about 1,000 on Python 3.11, 1,500 on 3.12, 10,000 on
    3.13: it follows each version's stack limits; deeper in a call stack it is less)."""
    done = subprocess.run([sys.executable, "-c", _DEPTH_PROBE], capture_output=True,
                          text=True, timeout=60, check=True)
    return int(done.stdout)


def record_of(session: Path | str, backend: str | None = None) -> HolderInfo:
    """The holder record `probe` reads for ``session``; the test fails if there is none."""
    from fencelock import probe

    record = probe(session, backend=backend).record
    assert record is not None, f"no holder record for {session}"
    return record


def wait_for_no_owner(session: Path, timeout: float = 60.0) -> None:
    """Block until no live holder is left (a killed holder's lease expires in etcd; a
    sidecar's lock goes with its process). Event-driven: a watch, or the kernel."""
    from fencelock import _store, _wait

    store = _store.open_store(None, str(session))
    if store is None:
        assert _wait.wait_until_unlocked(str(session) + ".holder", timeout)
    else:
        assert store.wait_free(timeout)


KILLED_MID_COPY = """
import os, signal, sys
from fencelock import SessionLock
fresh, old, *url = sys.argv[1:]
# As recover holds its fresh session (in the store of ``url``, if given), then killed.
SessionLock(fresh, lane="recovery", origin=old, backend=url[0] if url else None).acquire()
with open(fresh + ".part", "wb") as part:
    part.write(b'{"role": "user", "content": "half a co')
os.kill(os.getpid(), signal.SIGKILL)
"""
"""A recover killed while it copied: ``python -c KILLED_MID_COPY FRESH OLD [URL]``
leaves FRESH's stale record (naming OLD as its origin) and FRESH.part."""


KILLED_ON_NAMING = """
import os, signal, sys
from fencelock import _fence, recover
publish = _fence.publish
def named_then_killed(*args, **kwargs):
    publish(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # the fresh session has its name; nothing after
_fence.publish = named_then_killed
recover(sys.argv[1], wait=0)
"""
"""A recover killed just after it named the fresh session: ``python -c KILLED_ON_NAMING
SESSION`` (in the store FENCELOCK_BACKEND names)."""


PAUSED_BEFORE_NAMING = """
import sys
from fencelock import _recovery, recover
hold_to_mark = _recovery._hold_to_mark
def paused(*args, **kwargs):
    print("copied", flush=True)  # the stuck run still held the session as it began
    sys.stdin.readline()
    hold_to_mark(*args, **kwargs)
_recovery._hold_to_mark = paused
print(recover(sys.argv[1], wait=0).session, flush=True)
"""
"""A recover paused once its copy is made, before it names the fresh session, until a
line comes on its stdin: ``python -c PAUSED_BEFORE_NAMING SESSION``."""


class PausedRecover:
    """A recover of a session in a process of its own (`PAUSED_BEFORE_NAMING`), started
    once it has found the stuck run still holding and copied the session; `go` lets it
    name the fresh session, mark the old one and carry what came since."""

    def __init__(self, session: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PAUSED_BEFORE_NAMING, str(session)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        assert self.stdout.readline() == "copied\n"

    def go(self) -> str:
        """Let it finish; the fresh session it printed."""
        self.stdin.write("go\n")
        self.stdin.flush()
        fresh = self.stdout.readline().strip()
        assert self.proc.wait(timeout=60) == 0
        return fresh

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stdin.close()
        self.stdout.close()


@contextmanager
def paused_recover(session: Path) -> Iterator[PausedRecover]:
    """A `PausedRecover` of ``session``, stopped at the block's end if still running."""
    mover = PausedRecover(session)
    try:
        yield mover
    finally:
        mover.close()


@contextmanager
def append_only(path: Path) -> Iterator[None]:
    """``path`` marked append-only (chattr +a, Linux, as root) for the block: writes
    only at its end; truncating or rewriting it fails with EPERM, even for root."""
    with _attribute(path, 0x20):  # linux/fs.h: FS_APPEND_FL
        yield


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` marked immutable (chattr +i, Linux, as root) for the block: nothing
    changes it, nor, for a directory, its entries; EPERM, even for root."""
    with _attribute(path, 0x10):  # linux/fs.h: FS_IMMUTABLE_FL
        yield


@contextmanager
def _attribute(path: Path, flag: int) -> Iterator[None]:
    import fcntl
    import struct

    get_flags, set_flags = 0x80086601, 0x40086602  # FS_IOC_GETFLAGS, FS_IOC_SETFLAGS
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, get_flags, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, set_flags, struct.pack("i", flags | flag))
        try:
            yield
        finally:
            fcntl.ioctl(fd, set_flags, struct.pack("i", flags))
    finally:
        os.close(fd)


@contextmanager
def on_entry(
    function: Callable[..., Any], action: Callable[[], object], *, at_return: bool = False
) -> Iterator[list[bool]]:
    """Run ``action`` as ``function`` (a Python function or a builtin, called in this
    thread) is entered, once: what a signal handler does when the signal comes at that
    call. With ``at_return`` (builtins only), as it returns instead: its result is then
    lost, as when a handler raises right after the call. Yields a list that holds True
    once it ran."""
    code = getattr(function, "__code__", None)
    ran: list[bool] = []
    c_event = "c_return" if at_return else "c_call"

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if not ran and (
            (event == "call" and frame.f_code is code)
            or (event == c_event and arg is function)
        ):
            ran.append(True)
            action()
        return None

    # A Python function's entry is a trace event; a builtin's call only a profile one.
    set_hook: Callable[[Any], object] = sys.settrace if code is not None else sys.setprofile
    get_hook: Callable[[], Any] = sys.gettrace if code is not None else sys.getprofile
    before = get_hook()
    set_hook(tracer)
    try:
        yield ran
    finally:
        set_hook(before)


@contextmanager
def on_return(function: Callable[..., Any], action: Callable[[], object]) -> Iterator[list[bool]]:
    """Run ``action`` as the Python ``function`` returns in this thread, once: what a
    signal handler does when its signal comes right then (an exception from ``action``
    replaces the return). Yields a list that holds True once it ran."""
    code = function.__code__
    ran: list[bool] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        if event == "return" and not ran:
            ran.append(True)
            action()
        return tracer

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield ran
    finally:
        sys.settrace(before)


def _interrupt() -> None:
    raise KeyboardInterrupt


def interrupted_on_entry(
    function: Callable[..., Any], *, at_return: bool = False
) -> AbstractContextManager[list[bool]]:
    """`on_entry` with a signal handler that raises KeyboardInterrupt."""
    return on_entry(function, _interrupt, at_return=at_return)
