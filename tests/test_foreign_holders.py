"""Sessions held by a process outside fencelock: util-linux ``flock(1)`` on the sidecar.

The lock decides, whoever holds it: every command agrees that such a session is live
(also under a shared lock, which keeps every exclusive acquirer out), and names the
holder as lslocks(8) would, from /proc/locks.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SpawnForeignHolder, SpawnHolder
from marks import needs
from test_cli import FENCELOCK, _read_until, cli, rows

from fencelock import SessionContendedError, SessionLock, _identity, _probe, probe, scan
from fencelock._errors import describe_holder

pytestmark = needs("proc_locks", "flock")


def sidecar(session: Path) -> Path:
    return Path(str(session) + ".holder")


def test_status_names_a_flock_holder(session: Path, foreign_holder: SpawnForeignHolder) -> None:
    h = foreign_holder(sidecar(session))
    out = cli("status", str(session))
    assert out.returncode == 0, out.stderr
    cells = out.stdout.splitlines()[1].split()
    assert cells[1:3] == ["live", str(h.pid)]
    assert "(not fencelock: flock)" in out.stdout
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["state"] == "live" and row["pid"] is None and row["held_by"] == h.pid
    assert row["lock_owners"] == [{"pid": h.pid, "command": "flock", "shared": False}]
    assert f"held by pid {h.pid} (flock), not a fencelock holder" in row["reason"]
    st = probe(session)
    assert st.state == "live" and st.held_by == h.pid and st.lock_owners is not None
    assert [o.pid for o in st.lock_owners] == [h.pid]


def test_a_fencelock_command_whose_record_was_emptied_is_not_called_an_outsider(
    session: Path, tmp_path: Path
) -> None:
    """A `fencelock run` whose sidecar something outside the protocol emptied holds the
    lock with no record: it is named as the fencelock command it is, not as a process
    outside fencelock. (The command's process name is its script's: a copy here.)"""
    script = tmp_path / "fencelock"
    script.write_text(f"#!{sys.executable}\nfrom fencelock._entry import main\n"
                      "main(prog_name='fencelock')\n")
    script.chmod(0o755)
    command = "import os, sys; os.write(1, b'x'); sys.stdin.read()"
    run = subprocess.Popen([str(script), "run", str(session), "--lane", "a", "--",
                            sys.executable, "-c", command],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert run.stdout is not None and run.stdout.read(1) == b"x"  # held
        sidecar(session).write_bytes(b"")
        out = cli("status", str(session))
        assert out.returncode == 0 and "(no record: fencelock)" in out.stdout, out
        assert "not fencelock" not in out.stdout
        (row,) = rows(cli("status", "--json", str(session)))
        assert row["state"] == "live" and row["held_by"] == run.pid, row
        assert row["reason"].startswith(
            f"held by pid {run.pid} (fencelock), a fencelock command whose record is missing"
        ), row["reason"]
    finally:
        assert run.stdin is not None
        run.stdin.close()
        assert run.wait(timeout=60) == 0
        assert run.stdout is not None
        run.stdout.close()


def test_a_flock_holder_behind_a_dead_runs_record_is_named_not_the_dead_pid(
    session: Path, foreign_holder: SpawnForeignHolder, spawn_holder: SpawnHolder
) -> None:
    dead = spawn_holder(session, lane="dead")
    dead.acquire()
    dead.kill()  # its record still says held
    h = foreign_holder(sidecar(session))
    st = probe(session)
    assert st.state == "live" and st.held_by == h.pid, st
    assert st.lock_owners is not None and [o.pid for o in st.lock_owners] == [h.pid]
    promise = f"held by pid {h.pid} (flock), not a fencelock holder"
    assert promise in st.reason
    with pytest.raises(SessionContendedError) as e:
        SessionLock(session, "x", on_contention="fail").acquire()
    assert e.value.holder is None and promise in str(e.value)
    assert str(dead.pid) not in cli("status", str(session)).stdout.split()
    refused = cli("clear", str(session))
    assert refused.returncode == 4 and promise in refused.stderr, refused.stderr


# Takes the lock, then its first thread exits (pthread_exit) while another runs on: the
# process shows as a zombie (Z) in /proc/PID/stat, and holds the lock all the same.
FIRST_THREAD_EXITS = """
import ctypes, fcntl, os, sys, threading
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
threading.Thread(target=sys.stdin.readline).start()
print("locked", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


@needs("linux")
def test_a_holder_whose_first_thread_exited_is_named_as_it_runs_on(session: Path) -> None:
    """A process that exited is named as gone (what holds its lock inherited it), but
    one whose first thread alone exited runs on and holds the lock itself: it is named,
    by its pid and command."""
    proc = subprocess.Popen([sys.executable, "-c", FIRST_THREAD_EXITS, str(sidecar(session))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        deadline = time.monotonic() + 30
        while True:  # until its first thread has exited: then it shows as a zombie
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
            assert time.monotonic() < deadline
            time.sleep(0.001)
        st = probe(session)
        assert st.state == "live" and st.held_by == proc.pid, st
        assert st.lock_owners is not None and [(o.pid, o.command is not None)
                                               for o in st.lock_owners] == [(proc.pid, True)]
    finally:
        proc.kill()
        proc.communicate()


def test_a_holder_in_another_pid_namespace_is_not_named_by_a_pid_of_this_one(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    # A run in a container on this host: its pid (1 there) names another process here.
    with SessionLock(session, "in-container"):
        pass
    record = json.loads(sidecar(session).read_bytes())
    ticks, boot, ns = _identity.ME.start.split("@")
    record.update(state="held", pid=1, process_start=f"{ticks}@{boot}@{int(ns) + 1}")
    sidecar(session).write_text(json.dumps(record))
    foreign_holder(sidecar(session))  # the lock, as that run holds it
    st = probe(session)
    assert st.state == "live" and st.owner_alive is None
    assert st.held_by is None  # not pid 1 of this namespace
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["held_by"] is None and row["pid"] == 1


def test_a_holder_that_cannot_be_checked_here_is_still_named_by_its_pid(
    session: Path, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where processes cannot be checked at all (no /proc: no start times), a live
    record's pid is still the best name for the holder."""
    h = spawn_holder(session, lane="a")
    h.acquire()
    monkeypatch.setattr(_identity.ME, "start", "")
    st = probe(session)
    assert st.state == "live" and st.owner_alive is None and st.held_by == h.pid


def test_contention_names_a_flock_holder(session: Path, foreign_holder: SpawnForeignHolder) -> None:
    h = foreign_holder(sidecar(session))
    promise = f"held by pid {h.pid} (flock), not a fencelock holder"
    run = cli("run", "--no-wait", str(session), "--lane", "x", "--", "true")
    assert run.returncode == 4 and promise in run.stderr, run.stderr
    assert "waiting" not in run.stderr  # --no-wait: its grace for fencelock's own is no wait
    clear = cli("clear", str(session))
    assert clear.returncode == 4 and promise in clear.stderr, clear.stderr
    wait = cli("wait", "--timeout", "0", str(session))
    assert wait.returncode == 4 and promise in wait.stderr, wait.stderr
    recover = cli("recover", "--no-fresh", "--wait", "0", str(session))
    assert recover.returncode == 4 and promise in recover.stderr, recover.stderr
    with pytest.raises(SessionContendedError) as e:
        SessionLock(session, "x", on_contention="fail").acquire()
    assert e.value.holder is None and e.value.lock_owners is not None
    assert [(o.pid, o.command, o.shared) for o in e.value.lock_owners] == [
        (h.pid, "flock", False)
    ]
    assert promise in str(e.value) and e.value.waited is None
    for timeout in (0, 0.03):  # timed waits, shorter than the grace: each says it waited
        with pytest.raises(SessionContendedError) as timed:
            SessionLock(session, "x").acquire(timeout=timeout)
        assert timed.value.waited is not None and timed.value.waited >= timeout
        assert promise in str(timed.value)
    try_run = cli("run", "--timeout", "0", str(session), "--lane", "x", "--", "true")
    assert try_run.returncode == 4 and promise in try_run.stderr, try_run.stderr
    assert "waiting" not in try_run.stderr  # the grace is no wait its caller asked for


def test_a_released_record_is_not_taken_for_the_flock_holder(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    """A past run's released record stays the last run's: the holder named is flock."""
    with SessionLock(session, "before") as lock:
        last = lock.info
        assert last is not None
    h = foreign_holder(sidecar(session))
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["state"] == "live" and row["held_by"] == h.pid
    assert row["pid"] == last.pid  # the record's field, documented as the last run's
    run = cli("run", "--no-wait", str(session), "--lane", "x", "--", "true")
    assert run.returncode == 4
    assert f"held by pid {h.pid} (flock)" in run.stderr and "'before'" not in run.stderr


def test_a_lock_left_to_flocks_child_names_the_exited_pid(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    h = foreign_holder(sidecar(session))
    h.kill_flock()  # /proc/locks still names flock's pid; its command holds the lock
    (row,) = rows(cli("status", "--json", str(session)))
    assert row["state"] == "live" and row["held_by"] is None
    assert row["lock_owners"] == [{"pid": h.pid, "command": None, "shared": False}]
    run = cli("run", "--no-wait", str(session), "--lane", "x", "--", "true")
    assert run.returncode == 4
    assert f"a process that inherited the lock from pid {h.pid} (exited)" in run.stderr
    h.release()
    assert cli("run", "--no-wait", str(session), "--lane", "x", "--", "true").returncode == 0


def test_a_shared_flock_is_live_for_every_command(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    """`flock -s` keeps every exclusive acquirer out, so status says live too, and
    `wait` waits for it; once it is gone, all agree that the session is free."""
    h = foreign_holder(sidecar(session), shared=True)
    status = cli("status", "--json", str(session))
    assert status.returncode == 0
    (row,) = rows(status)
    assert row["state"] == "live"
    assert row["lock_owners"] == [{"pid": h.pid, "command": "flock", "shared": True}]
    assert probe(session).state == "live"
    promise = f"held by pid {h.pid} (flock) in shared mode, not a fencelock holder"
    for args in (
        ["run", "--no-wait", str(session), "--lane", "x", "--", "true"],
        ["clear", str(session)],
        ["wait", "--timeout", "0.1", str(session)],
        ["recover", "--no-fresh", "--wait", "0", str(session)],
    ):
        out = cli(*args)
        assert out.returncode == 4, (args, out.stderr)
        assert promise in out.stderr, (args, out.stderr)
    h.release()
    assert probe(session).state == "free"
    assert cli("wait", "--timeout", "0", str(session)).returncode == 0
    assert cli("run", "--no-wait", str(session), "--lane", "x", "--", "true").returncode == 0


def test_wait_returns_when_a_shared_flock_goes(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    h = foreign_holder(sidecar(session), shared=True)
    master, terminal = pty.openpty()  # wait shows a progress line on a terminal
    try:
        waiter = subprocess.Popen([*FENCELOCK, "wait", str(session)], stderr=terminal)
        os.close(terminal)
        shown = _read_until(master, b"waited").decode()  # it waits for the flock ...
        assert f"pid {h.pid}" in shown, shown
        h.release()  # ... until that goes
        assert waiter.wait(timeout=60) == 0
    finally:
        os.close(master)


def test_describing_an_owner_this_system_cannot_name() -> None:
    """Where /proc/locks is missing, or does not list the holder, the message says so."""
    assert "this system does not say which process" in describe_holder(None, None)
    assert "/proc/locks does not list" in describe_holder(None, ())


@needs("linux")
def test_a_line_the_lock_list_repeats_names_its_owner_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc/locks is read in pieces; a list that changes between them can repeat a
    line. One owner must stay one owner (else held_by cannot name it)."""
    from fencelock import _platform

    target = tmp_path / "s.jsonl.holder"
    target.write_bytes(b"")
    st = os.stat(target)
    where = b"%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    line = b"1: FLOCK  ADVISORY  WRITE %d %s 0 EOF\n" % (os.getpid(), where)
    listing = tmp_path / "locks"
    listing.write_bytes(line + b"2: FLOCK  ADVISORY  WRITE 1 00:00:1 0 EOF\n" + line)
    monkeypatch.setattr(_platform, "_PROC_LOCKS", str(listing))
    owners = _platform.lock_owners(str(target))
    assert owners is not None and [o.pid for o in owners] == [os.getpid()]


def test_recover_of_a_flock_holder_names_it_and_starts_a_new_fresh_session_each_time(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    """A past run's released record is not the stuck holder's: `recover --no-fresh`
    names the flock holder, and each time a process outside fencelock is stuck the
    fresh session is a new one, carrying the lines written since (named after the
    released run, a second recover answered the first copy, without them)."""
    from fencelock import recover

    session.write_text('{"a":1}\n')
    with SessionLock(session, "before"):
        pass
    h = foreign_holder(sidecar(session))
    with pytest.raises(SessionContendedError) as e:
        recover(session, wait=0, fresh=False)
    assert e.value.holder is None
    assert f"held by pid {h.pid} (flock)" in str(e.value) and "'before'" not in str(e.value)
    first = recover(session, wait=0)
    h.release()
    with open(session, "a") as f:
        f.write('{"b":2}\n')
    foreign_holder(sidecar(session))
    second = recover(session, wait=0)
    assert second.session != first.session and second.carried_lines == 2
    assert Path(second.session).read_text() == '{"a":1}\n{"b":2}\n'


class _CountingSleep:
    """``time`` for `fencelock._probe`, counting the pauses a probe makes."""

    def __init__(self) -> None:
        self.sleeps = 0
        self.monotonic, self.time = time.monotonic, time.time

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        time.sleep(seconds)


def test_scan_waits_out_one_grace_for_many_sessions_held_outside_fencelock(
    tmp_path: Path, foreign_holder: SpawnForeignHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lock taken with no record behind it gets a grace before it counts as a holder
    # outside fencelock (an acquirer may be about to write its record): status of a
    # directory full of such sessions waits that grace once, not once a session.
    held = [tmp_path / f"s{i:02d}.jsonl" for i in range(0, 20, 2)]
    free = [tmp_path / f"s{i:02d}.jsonl" for i in range(1, 20, 2)]
    holders = {s: foreign_holder(sidecar(s), shared=i % 2 == 1) for i, s in enumerate(held)}
    for s in free:
        with SessionLock(s, "done"):
            pass
    clock = _CountingSleep()
    monkeypatch.setattr(_probe, "time", clock)
    one = probe(held[0])
    assert one.state == "live" and one.held_by == holders[held[0]].pid
    one_grace, clock.sleeps = clock.sleeps, 0
    found = list(scan(tmp_path))
    assert clock.sleeps < 3 * one_grace, (clock.sleeps, one_grace)
    assert [Path(st.session) for st in found] == sorted(held + free)
    for st in found:
        if Path(st.session) in holders:
            assert st.state == "live" and st.held_by == holders[Path(st.session)].pid, st
        else:
            assert st.state == "free" and st.lane == "done", st
    # However few sessions it watches at once and rows it keeps back: the same rows.
    monkeypatch.setattr(_probe, "_MAX_WATCHED", 3)
    monkeypatch.setattr(_probe, "_MAX_PENDING_ROWS", 2)
    assert list(scan(tmp_path)) == found


def test_a_scan_left_unfinished_closes_the_sidecars_it_watched(
    tmp_path: Path, foreign_holder: SpawnForeignHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = [tmp_path / f"s{i}.jsonl" for i in range(4)]
    for s in sessions:
        foreign_holder(sidecar(s))
    # The first session's grace is the usual one, the others' long: when the first row
    # comes out, the scan is still watching the other three sidecars.
    look = _probe._look

    def first_quick(session: str, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(_probe, "_GRACE", 0.05 if session == str(sessions[0]) else 600.0)
        return look(session, *args, **kwargs)

    monkeypatch.setattr(_probe, "_look", first_quick)
    before = len(os.listdir("/proc/self/fd"))
    rows_seen = scan(tmp_path)
    first = next(rows_seen)
    assert first.state == "live" and first.session == str(sessions[0])
    assert len(os.listdir("/proc/self/fd")) == before + 3
    del rows_seen  # a loop left early: the generator is closed as it goes
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_probe_interrupted_in_its_grace_leaves_no_descriptor_open(
    session: Path, foreign_holder: SpawnForeignHolder
) -> None:
    # A caller's timeout (a signal handler that raises) lands while the probe waits out
    # the grace of a lock held without a record.
    foreign_holder(sidecar(session))

    class GaveUp(Exception):
        pass

    def give_up(signum: int, frame: object) -> None:
        raise GaveUp

    before = sorted(os.listdir("/proc/self/fd"))
    old = signal.signal(signal.SIGALRM, give_up)
    try:
        for _ in range(5):
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # shorter than the 50 ms grace
            with pytest.raises(GaveUp):
                probe(session)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sorted(os.listdir("/proc/self/fd")) == before


_FEW_DESCRIPTORS = r"""
import fcntl, os, resource, subprocess, sys
from collections import Counter
from fencelock import scan
directory, count = sys.argv[1], int(sys.argv[2])
# another process holds every sidecar's lock (no record): each is watched for its grace
holder = subprocess.Popen([sys.executable, "-c", '''
import fcntl, os, sys
fds = [os.open(p, os.O_RDWR) for p in sys.argv[1:]]
for fd in fds:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
''', *[os.path.join(directory, f"s{i:04d}.jsonl.holder") for i in range(count)]],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline() == "held\n"
# a process with few descriptors to spare (an agent server with its sockets open)
spare = len(os.listdir("/proc/self/fd")) + 40
resource.setrlimit(resource.RLIMIT_NOFILE, (spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(dict(Counter(str(st.state) for st in scan(directory))))
holder.stdin.close()
holder.wait()
"""


def test_scan_with_few_descriptors_to_spare_waits_for_its_watches(tmp_path: Path) -> None:
    for i in range(100):
        (tmp_path / f"s{i:04d}.jsonl.holder").touch()
    out = subprocess.run([sys.executable, "-c", _FEW_DESCRIPTORS, str(tmp_path), "100"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'live': 100}", out.stdout


def test_a_scan_of_many_flock_holders_reads_the_lock_list_once_a_burst(
    tmp_path: Path, foreign_holder: SpawnForeignHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Naming the holders of a directory's sidecars that processes outside fencelock
    hold read the system's whole lock list once a row: 3,000 rows took 11.6 s. The list
    is now kept for a moment (held still longer here, so that the count does not hang
    on the machine's speed), and every row still names its own holder."""
    from fencelock import _platform

    holders = {f"s{i}.jsonl": foreign_holder(tmp_path / f"s{i}.jsonl.holder") for i in range(12)}
    reads: list[int] = []
    real = _platform._read_locks

    def counted() -> dict[tuple[int, int, int], list[tuple[int, bool]]]:
        reads.append(1)
        return real()

    monkeypatch.setattr(_platform, "_read_locks", counted)
    monkeypatch.setattr(_platform, "_LOCKS_KEPT", 3600.0)
    monkeypatch.setattr(_platform, "_locks", (-1e9, {}))
    found = {os.path.basename(st.session): st.held_by for st in scan(tmp_path)}
    assert found == {name: h.pid for name, h in holders.items()}
    assert len(reads) == 1
