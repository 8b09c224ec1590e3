"""Security properties (see SECURITY.md): private files, no hostage through a read-only
descriptor, nothing followed or truncated before the lock is held, no signal ever sent
to a PID read from a record, and a warning for a world-writable sessions directory.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SpawnHolder, on_entry
from marks import needs_proc, needs_root
from privdrop import NOBODY, as_user, open_directory, spawn_as_user

import fencelock
from fencelock import (
    SessionContendedError,
    SessionLock,
    clear,
    probe,
    recover,
    scan,
    verify,
)

PACKAGE = Path(fencelock.__file__).parent
_TOOLS = {"_cli.py", "_supervisor.py", "_etcdserver.py", "_etcdkeeper.py"}
"""Command-line tools in the package: they start (and may signal) their own children,
and write their own output files; everything else is the library."""


def sidecar_of(session: Path) -> Path:
    return Path(str(session) + ".holder")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- private files ------------------------------------------------------------------


def test_files_are_created_0600_even_with_umask_0(session: Path, umask_zero: None) -> None:
    session.write_bytes(b'{"n":0}\n{"torn')  # so the first append makes <session>.torn
    session.chmod(0o600)
    with SessionLock(session, "a") as lock, pytest.warns(fencelock.FenceLockWarning):
        lock.append({"n": 1})
    fresh = session.parent / "new.jsonl"
    with SessionLock(fresh, "a") as lock:
        lock.append({"n": 1})
    for path in (sidecar_of(session), Path(str(session) + ".torn"), fresh, sidecar_of(fresh)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


@needs_root
def test_another_user_cannot_hold_a_private_sidecar_hostage() -> None:
    with open_directory() as sessions:
        session = sessions / "s.jsonl"
        with SessionLock(session, "owner") as lock:
            lock.append({"n": 1})
        result = as_user("""
            out = {}
            try:
                fd = os.open(args["sidecar"], os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                out["hostage"] = True
            except OSError as e:
                out["open"] = errno.errorcode[e.errno]
            try:
                SessionLock(args["session"], "intruder").acquire()
                out["acquire"] = "ok"
            except FenceLockError as e:
                out["acquire"] = type(e).__name__
            out["probe"] = str(probe(args["session"]).state)
            result = out
        """, session=str(session), sidecar=str(sidecar_of(session)))
        assert result == {"open": "EACCES", "acquire": "SidecarAccessError",
                          "probe": "unreadable"}
        with SessionLock(session, "owner", on_contention="fail"):
            pass


@needs_root
@pytest.mark.parametrize("how", ["fail", "timeout"])
def test_a_fail_fast_acquire_by_a_user_who_cannot_write_the_sidecar_names_a_live_holder(
    how: str,
) -> None:
    """A user who may read a session's sidecar but not write it (a shared group, mode
    0640 or 0644) and asks to fail fast, or to wait a while, is told who holds the
    session, as any caller who finds it held is, not that the sidecar cannot be written
    (a timed one said that, and `fencelock run --timeout` exited 1 where `--no-wait`
    exited 4); once nobody holds it, the permission error stands."""
    with open_directory() as sessions:
        session = sessions / "s.jsonl"
        lock = SessionLock(session, "owner", mode=0o644)
        with pytest.warns(fencelock.FenceLockWarning, match="every user"):
            lock.acquire()  # makes the sidecar: 0644 warns
        lock.release()
        ask = """
            out = {}
            kind = {"on_contention": "fail"} if args["how"] == "fail" else {"timeout": 5}
            try:
                SessionLock(args["session"], "other", **kind).acquire()
                out["acquire"] = "ok"
            except FenceLockError as e:
                out["acquire"] = type(e).__name__
                holder = getattr(e, "holder", None)
                out["holder"] = None if holder is None else holder.pid
            result = out
        """
        with lock:
            held = as_user(ask, session=str(session), how=how)
        free = as_user(ask, session=str(session), how=how)
    # (The command line turns the first into exit 4; the other user cannot start an
    # interpreter of its own here to run it: the standard library is root's.)
    assert held == {"acquire": "SessionContendedError", "holder": os.getpid()}
    assert free == {"acquire": "SidecarAccessError", "holder": None}


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o000])
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o644])
def test_files_a_holder_creates_get_exactly_its_mode_whatever_the_umask(
    tmp_path: Path, umask: int, mode: int
) -> None:
    """`mode` is the permission bits of the sidecar and of a session file the first
    append creates: a daemon's umask of 077 must not shut out the group a mode of 0660
    lets in (the open's own mode argument is cut down by the umask)."""
    session = tmp_path / "s.jsonl"
    old = os.umask(umask)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*made with mode 0o644",
                                    fencelock.FenceLockWarning)
            with SessionLock(session, "owner", mode=mode) as lock:
                lock.append({"n": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(sidecar_of(session).stat().st_mode) == mode
    assert stat.S_IMODE(session.stat().st_mode) == mode
    # A sidecar or session made earlier (by its owner, with a mode of its own) keeps it.
    os.chmod(session, 0o640)
    os.chmod(sidecar_of(session), 0o640)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*made with mode 0o644",
                                    fencelock.FenceLockWarning)
        with SessionLock(session, "again", mode=mode) as lock:
            lock.append({"n": 2})
    assert stat.S_IMODE(sidecar_of(session).stat().st_mode) == 0o640
    assert stat.S_IMODE(session.stat().st_mode) == 0o640


def test_the_wide_mode_warning_is_said_once_by_the_process_that_made_the_sidecar(
    session: Path
) -> None:
    """Said once, when this process made the sidecar (not by one that opened another's:
    two that race to make it do not both warn, and the mode said is the file's own).
    Where warnings are errors, the acquire that made it fails, holding nothing."""
    lock = SessionLock(session, "owner", mode=0o644)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fencelock.FenceLockWarning)
        with pytest.raises(fencelock.FenceLockWarning, match="made with mode 0o644"):
            lock.acquire()
    assert not lock.held and probe(session).state == "free"
    assert stat.S_IMODE(sidecar_of(session).stat().st_mode) == 0o644
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with lock:
            pass
    assert not said, said  # made already: not this acquire's doing


def _make_racing(path: str, mode: int, barrier: Any, conn: Any) -> None:
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        lock = SessionLock(path, f"mode-{mode:o}", mode=mode)
        barrier.wait()
        with lock:
            pass
    conn.send([str(w.message) for w in said if "made with mode" in str(w.message)])
    conn.close()


def test_of_two_processes_racing_to_make_a_sidecar_only_its_maker_warns(
    tmp_path: Path
) -> None:
    """Two runs make a new session's sidecar at once, one asking 0644, one 0600: the
    warning comes exactly when the 0644 one made it, and names the file's own mode."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(12):  # (the old warning, given before the create, failed most)
        path = str(tmp_path / f"s{trial}.jsonl")
        barrier = ctx.Barrier(2)
        pipes, procs = [], []
        for mode in (0o644, 0o600):
            here, there = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_make_racing, args=(path, mode, barrier, there))
            proc.start()
            there.close()
            pipes.append(here)
            procs.append(proc)
        said = [p.recv() for p in pipes]
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        made = stat.S_IMODE(os.stat(path + ".holder").st_mode)
        assert said[1] == [] and len(said[0]) == (made == 0o644), (made, said)


@needs_root
def test_a_readable_sidecar_can_be_held_hostage_which_is_why_0600() -> None:
    # The counter-example: a caller that opens the mode up to 0644 lets any user flock
    # the sidecar through a read-only descriptor and block every run; it is warned so.
    with open_directory() as sessions:
        session = sessions / "s.jsonl"
        lock = SessionLock(session, "owner", mode=0o644)
        with pytest.warns(fencelock.FenceLockWarning, match="which lets every user of this "
                                                            "machine open it, and so lock it"):
            lock.acquire()
        lock.release()
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            with SessionLock(session, "owner", mode=0o644):  # made already: said once
                pass
        assert not again, again
        intruder = spawn_as_user("""
            fd = os.open(args["sidecar"], os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("locked", flush=True)
            sys.stdin.read()
            result = "done"
        """, sidecar=str(sidecar_of(session)))
        try:
            assert intruder.stdout is not None
            assert intruder.stdout.readline().strip() == "locked"
            with pytest.raises(SessionContendedError):
                SessionLock(session, "owner", on_contention="fail").acquire()
            assert probe(session).state == "live"
        finally:
            intruder.kill()
            intruder.wait()
            for stream in (intruder.stdin, intruder.stdout):
                if stream is not None:
                    stream.close()


# -- nothing followed, nothing truncated before the lock is held --------------------


def test_outsiders_change_nothing_while_a_run_holds_the_session(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    h = spawn_holder(session, lane="owner")
    h.acquire()
    for n in range(3):
        assert h.call("append " + json.dumps({"n": n})) == "ok"
    assert h.call("prompt") == "ok"
    sidecar = sidecar_of(session)

    def state() -> tuple[object, ...]:
        s, c = os.stat(session), os.stat(sidecar)
        return (session.read_bytes(), sidecar.read_bytes(), s.st_ino, s.st_mtime_ns,
                c.st_ino, c.st_size)

    before = state()
    with pytest.raises(SessionContendedError):
        SessionLock(session, "x", on_contention="fail").acquire()
    with pytest.raises(SessionContendedError):
        SessionLock(session, "x", timeout=0.2).acquire()
    for remove, force in [(False, False), (True, False), (True, True)]:
        with pytest.raises(SessionContendedError):
            clear(session, remove=remove, force=force)
    with pytest.raises(SessionContendedError):
        recover(session, wait=0.1, fresh=False)
    moved = recover(session, wait=0.1)  # escalates to a new file; the old one's lines
    # untouched (it is marked moved: an extended attribute)
    assert moved.action == "fresh" and moved.session != str(session)
    assert probe(session).state == "live"
    list(scan(session.parent))
    assert verify(session).ok
    assert state() == before
    # Only the move's mark: the run is told where its conversation went.
    assert h.call("endprompt").startswith("error SessionMovedError"), before
    assert h.call("release") == "released"


def test_the_library_never_opens_with_o_trunc() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in _TOOLS:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "O_TRUNC":
                pytest.fail(f"{path.name}:{node.lineno} opens with O_TRUNC")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "open" and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and "w" in str(node.args[1].value)):
                pytest.fail(f"{path.name}:{node.lineno} opens with mode "
                            f"{node.args[1].value!r}, which truncates")


# -- nothing signals a PID taken from a record --------------------------------------

_SACRIFICE = textwrap.dedent("""
    import json, os, signal, sys
    got = []
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, lambda n, f: got.append(n))
        except (OSError, ValueError):
            pass
    print(os.getpid(), flush=True)
    for line in sys.stdin:
        print(json.dumps(got), flush=True)
""")


def _forge(session: Path, pid: int) -> None:
    """A held record naming ``pid`` as its owner, with its real start token."""
    from fencelock import _identity

    with SessionLock(session, "template"):
        pass
    obj = json.loads(sidecar_of(session).read_bytes())
    obj.update(state="held", pid=pid, process_start=_identity.process_start(pid),
               lane="forged")
    sidecar_of(session).write_bytes(json.dumps(obj).encode())


@needs_proc
def test_no_signal_reaches_a_pid_named_in_a_record(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    victim = subprocess.Popen([sys.executable, "-c", _SACRIFICE],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdin is not None and victim.stdout is not None
        pid = int(victim.stdout.readline())

        _forge(session, pid)
        status = probe(session)
        assert status.state == "stale" and status.owner_alive is True  # it is alive
        list(scan(session.parent))
        assert clear(session).state == "stale"

        _forge(session, pid)
        assert recover(session, wait=0.1).action == "refire"

        _forge(session, pid)
        with SessionLock(session, "takeover") as lock:
            assert lock.info is not None and lock.info.previous is not None
            assert lock.info.previous.pid == pid

        # The same while another process really holds it: wait, escalate, never signal.
        other = session.parent / "other.jsonl"
        _forge(other, pid)
        h = spawn_holder(other, lane="real")
        h.acquire()
        with pytest.raises(SessionContendedError):
            clear(other)
        assert recover(other, wait=0.2).action == "fresh"
        assert h.call("release") == "released"

        victim.stdin.write("report\n")
        victim.stdin.flush()
        assert json.loads(victim.stdout.readline()) == []
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        assert stat_line[stat_line.rfind(")") + 2] in "RS", "the victim was stopped"
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        for stream in (victim.stdin, victim.stdout):
            if stream is not None:
                stream.close()


_SENDERS = {("os", "kill"), ("os", "killpg"), ("signal", "pthread_kill"),
            ("signal", "pidfd_send_signal"), ("os", "pidfd_open")}
_OWN_THREADS = {("_signals.py", "pthread_kill"), ("_etcdkeeper.py", "pidfd_open"),
                ("_etcdkeeper.py", "pidfd_send_signal")}
"""pthread_kill reaches only threads of this process: the signal relay pokes its own
main thread with it. `fencelock run` with etcd stops what holds its own FENCELOCK_FD
pipe when its holder is lost: each process is pinned by a pidfd (which names no other
process once its pid is reused) and checked to hold that pipe before it is signalled."""


def test_the_package_has_no_way_to_signal_an_arbitrary_pid() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if (base, node.attr) in _SENDERS and (path.name, node.attr) not in _OWN_THREADS:
                pytest.fail(f"{path.name}:{node.lineno} uses {base}.{node.attr}")
            if node.attr in ("send_signal", "terminate", "kill") and path.name not in _TOOLS:
                pytest.fail(f"{path.name}:{node.lineno} signals a process ({node.attr})")


# -- world-writable sessions directory ----------------------------------------------


def _acquire_in(directory: Path) -> None:
    with SessionLock(directory / "s.jsonl", "a"):
        pass


def test_world_writable_directory_without_sticky_bit_warns(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    category = getattr(fencelock, "FenceLockWarning", None)
    assert category is not None, "fencelock exports no FenceLockWarning"
    assert issubclass(category, UserWarning)
    assert "FenceLockWarning" in fencelock.__all__
    with pytest.warns(category) as caught:
        _acquire_in(loose)
    message = str(caught[0].message)
    assert str(loose) in message and "world-writable" in message


def test_the_warning_looks_at_the_real_directory_behind_a_symlink(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.warns(fencelock.FenceLockWarning) as caught:
        _acquire_in(link)
    message = str(caught[0].message)
    assert f"{link} (really {loose})" in message and "world-writable" in message


@pytest.mark.parametrize("mode", [0o755, 0o700, 0o1777, 0o1733])
def test_safe_directories_do_not_warn(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _acquire_in(d)
        status = probe(d / "s.jsonl")
    assert status.state == "free"


def test_time_is_not_trusted_for_liveness(session: Path) -> None:
    # A record whose heartbeat is ancient but whose lock is held is live (stuck), never
    # stale: a clock cannot make clear() take a session away from a running holder.
    with SessionLock(session, "slow") as lock:
        obj = json.loads(sidecar_of(session).read_bytes())
        assert lock.held and obj["state"] == "held"
        status = probe(session, stuck_after=0)  # any heartbeat counts as ancient
        assert status.state == "live" and status.stuck
        with pytest.raises(SessionContendedError):
            clear(session)


@needs_root
@pytest.mark.parametrize("planted", ["session", "sidecar", "torn"])
def test_files_planted_by_another_user_in_a_shared_directory_are_refused(planted: str) -> None:
    """In a sticky world-writable directory another user can create a session, sidecar
    or .torn file in advance to read what is written there, or to steer the lock. Such
    a file is refused, named, and left untouched."""
    from fencelock import PlantedFileError

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        target = {"session": session, "sidecar": sidecar_of(session),
                  "torn": Path(str(session) + ".torn")}[planted]
        if planted == "torn":
            session.write_bytes(b'{"n":0}\n{"torn')  # ours, with a torn tail to move aside
        as_user(
            "import os\n"
            "fd = os.open(args['path'], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)\n"
            "os.fchmod(fd, 0o666)\n"
            "os.write(fd, args['data'].encode())\n"
            "result = True",
            path=str(target), data='{"n":0}\n' if planted == "session" else "",
        )
        before = target.read_bytes()
        with pytest.raises(PlantedFileError) as caught, SessionLock(session, "victim") as lock:
            lock.append({"secret": "not for another user"})
        assert str(target) in str(caught.value) and "planted" in str(caught.value)
        # Not "remove it": in a sticky directory only its owner (or root) can.
        assert f"uid {NOBODY} or root can remove it, as the directory is sticky" in \
            str(caught.value)
        assert target.read_bytes() == before
        assert b"secret" not in target.read_bytes()


@needs_root
@pytest.mark.parametrize("how", ["acquire", "clear"])
def test_a_planted_sidecar_the_victim_cannot_write_is_named_as_planted(how: str) -> None:
    """Planted 0644, another user's sidecar cannot even be opened for writing by the
    victim (EACCES): still named as planted, not "run as its owner" (its owner is the
    one who planted it). Left untouched."""
    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        sidecar = sidecar_of(session)
        as_user("import os\nos.close(os.open(args['path'], os.O_WRONLY | os.O_CREAT, 0o644))"
                "\nresult = True", path=str(sidecar))
        result = as_user("""
            try:
                if args["how"] == "acquire":
                    SessionLock(args["session"], "victim").acquire()
                else:
                    clear(args["session"])
                result = ["done"]
            except FenceLockError as e:
                result = [type(e).__name__, str(e)]
        """, uid=1, session=str(session), how=how)
        assert result[0] == "PlantedFileError", result
        assert f"uid {NOBODY} or root can remove it" in result[1] and "run as" not in result[1]
        assert sidecar.read_bytes() == b"" and sidecar.stat().st_uid == NOBODY


@needs_root
@pytest.mark.parametrize("which", ["sidecar", "session"])
@pytest.mark.parametrize(("mode", "flags", "doing"), [(0o444, "w", "writing"),
                                                      (0o200, "r", "reading"),
                                                      (0o000, "rw", "reading and writing")])
def test_a_file_of_this_user_s_own_that_it_cannot_open_says_chmod(
    which: str, mode: int, flags: str, doing: str
) -> None:
    """This user's own sidecar or session whose mode leaves out what fencelock opens it
    for (both reading and writing): the fix is `chmod u+<what is missing> FILE` (which
    the test then runs, and the append goes through), not "run as its owner"."""
    with open_directory(0o755) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        session = sessions / "s.jsonl"
        session.write_text('{"n": 0}\n')
        sidecar_of(session).write_text("")
        target = session if which == "session" else sidecar_of(session)
        for path in (session, sidecar_of(session)):
            os.chown(path, NOBODY, NOBODY)
        target.chmod(mode)
        body = """
            try:
                with SessionLock(args["session"], "owner") as lock:
                    lock.append({"n": 1})
                result = ["done"]
            except FenceLockError as e:
                result = [type(e).__name__, str(e)]
        """
        result = as_user(body, session=str(session))
        assert f"this user owns it, but its mode leaves out {doing}; chmod u+{flags} " \
            f"{target}" in result[1] and "run as its owner" not in result[1], result
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "chmod", f"u+{flags}", str(target)], check=True, timeout=60)
        assert as_user(body, session=str(session)) == ["done"]


@needs_root
def test_recover_does_not_answer_a_free_session_this_user_cannot_hold() -> None:
    """A free session whose sidecar this user cannot open for writing (0444 here; a
    read-only filesystem alike): recover says why, with the fix, rather than answer
    the session for a run whose acquire would fail at once."""
    with open_directory(0o755) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        session = sessions / "s.jsonl"
        session.write_text('{"n": 0}\n')
        sidecar_of(session).write_text("")
        for path in (session, sidecar_of(session)):
            os.chown(path, NOBODY, NOBODY)
        sidecar_of(session).chmod(0o444)
        body = """
            try:
                result = ["answered", recover(args["session"], wait=0).session]
            except FenceLockError as e:
                result = [type(e).__name__, str(e)]
        """
        result = as_user(body, session=str(session))
        assert result[0] == "SidecarAccessError" and f"chmod u+w {sidecar_of(session)}" in \
            result[1], result
        sidecar_of(session).chmod(0o644)
        assert as_user(body, session=str(session)) == ["answered", str(session)]
        # No sidecar yet, in a directory this user cannot make one in: the same.
        sidecar_of(session).unlink()
        os.chown(sessions, 0, 0)
        result = as_user(body, session=str(session))
        assert result[0] == "SidecarAccessError" and str(sidecar_of(session)) in \
            result[1] and "cannot create files in" in result[1], result
        os.chown(sessions, NOBODY, NOBODY)
        assert as_user(body, session=str(session)) == ["answered", str(session)]


_PLANT = (
    "import os\n"
    "fd = os.open(args['path'], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)\n"
    "os.fchmod(fd, 0o666)\n"
    "os.write(fd, args['data'].encode())\n"
    "result = True"
)


@needs_root
def test_status_names_a_corrupt_sidecar_another_user_planted_as_planted() -> None:
    """A corrupt sidecar another user left where anyone may write is shown as planted,
    naming its owner: the fix corrupt records get (`clear --force`) refuses it."""
    from fencelock import PlantedFileError

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        as_user(_PLANT, path=str(sidecar_of(session)), data="   \n")
        status = probe(session)
        assert status.state == "unreadable" and f"owned by uid {NOBODY}" in status.reason
        assert "clear --force" not in status.reason
        with pytest.raises(PlantedFileError):
            clear(session, force=True)


_HOLD_AS_OWNER = """
from fencelock import SessionLock
with SessionLock(args["path"], "owner"):
    print("held", flush=True)
    sys.stdin.read()
result = "done"
"""
_HOLD_AS_LOADED_BY_OWNER = """
import sys
from fencelock import SessionLock, _sidecar
_sidecar.OWN_UID = 65534  # loaded as the file's owner: the file is its own
with SessionLock(sys.argv[1], "owner"):
    print("held", flush=True)
    sys.stdin.read()
"""


@needs_root
def test_status_and_recover_name_a_free_session_another_user_planted(
    store: str | None,
) -> None:
    """A session file another user left where anyone may create files is one no run of
    this user takes: `status` shows it unreadable, naming its owner (not free to use),
    and `recover` refuses it as `run` does (it answered "refire"). Held by its owner, it
    is shown held; this user's own session beside it is free. In either store."""
    from fencelock import PlantedFileError

    with open_directory(0o1777) as sessions:
        session, mine = sessions / "s.jsonl", sessions / "mine.jsonl"
        as_user(_PLANT, path=str(session), data='{"n":0}\n')
        mine.write_text('{"n":0}\n')
        status = probe(session)
        assert status.state == "unreadable" and f"owned by uid {NOBODY}" in status.reason
        rows = {Path(row.session).name: row for row in scan(sessions)}
        assert rows["s.jsonl"].state == "unreadable" and rows["mine.jsonl"].state == "free"
        out = subprocess.run([sys.executable, "-m", "fencelock", "status", str(sessions)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 1 and "planted" in out.stderr, out.stderr
        with pytest.raises(PlantedFileError):
            recover(session, wait=0)
        assert sorted(os.listdir(sessions)) == ["mine.jsonl", "s.jsonl"]  # nothing made
        owner = spawn_as_user(_HOLD_AS_OWNER, path=str(session)) if store is None else \
            subprocess.Popen(  # as its owner would (the etcd client loads after a setuid)
                [sys.executable, "-c", _HOLD_AS_LOADED_BY_OWNER, str(session)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert owner.stdout is not None
            assert owner.stdout.readline().strip() == "held"
            assert probe(session).state == "live"
            assert {Path(r.session).name: r.state for r in scan(sessions)}["s.jsonl"] == "live"
        finally:
            if store is not None:
                owner.kill()  # its run dies holding: stale once its lease expires
            owner.communicate("", timeout=30)  # its stdin closed: it lets go and exits
        if store is not None:  # the store's own list, which names it by its record
            deadline = time.monotonic() + 60
            while True:
                listed = subprocess.run(
                    [sys.executable, "-m", "fencelock", "status", "--json", "--backend",
                     store], capture_output=True, text=True, timeout=60, check=False)
                states = {Path(r["session"]).name: r["state"]
                          for r in json.loads(listed.stdout)}
                if states.get("s.jsonl") not in (None, "live") or time.monotonic() > deadline:
                    break
            assert states == {"s.jsonl": "unreadable"} and listed.returncode == 1, listed


@needs_root
def test_a_planted_session_with_its_mark_at_the_limit_is_refused_as_planted() -> None:
    """Another user's session file whose token mark is at the limit is refused as
    planted, naming its owner, not as "tokens exhausted ... remove the attribute" (which
    this user cannot do), and the empty sidecar the acquire made is removed."""
    from fencelock import PlantedFileError
    from fencelock._record import MAX_TOKEN
    from fencelock._tokens import XATTR

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        as_user(_PLANT + "\nos.setxattr(args['path'], args['xattr'], args['mark'].encode())",
                path=str(session), data='{"n":0}\n', xattr=XATTR, mark=str(MAX_TOKEN))
        with pytest.raises(PlantedFileError):
            SessionLock(session, "victim").acquire()
        assert not sidecar_of(session).exists()
        assert session.read_bytes() == b'{"n":0}\n'


@needs_root
def test_clear_force_names_a_set_aside_marker_another_user_left() -> None:
    """Setting a corrupt record aside keeps its token in the directory's removed-token
    marker; where another user made that one first (where anyone may write: not
    trusted) and there is no session file to keep the token on, it leaves the
    directory's set-aside marker. One of those another user made first is refused as
    planted too (they could remove it, and the token with it), naming it; it said
    "cannot be created (Permission denied) ... fix the directory's permissions". One of
    this user's own is used as it is."""
    from fencelock import PlantedFileError
    from fencelock._tokens import REMOVED_MARKER, SET_ASIDE_MARKER

    with open_directory(0o1777) as pub:
        session = pub / "c.jsonl"  # no session file: the token goes to the marker
        sidecar_of(session).write_bytes(b'{"version":1,"state":"held","token":7,')
        marker = pub / SET_ASIDE_MARKER
        for path in (marker, pub / REMOVED_MARKER):
            as_user("import os\n"
                    "os.close(os.open(args['path'], os.O_WRONLY | os.O_CREAT, 0o644))\n"
                    "result = True", path=str(path))
        with pytest.raises(PlantedFileError) as exc:
            clear(session, force=True)
        assert str(exc.value).startswith(f"{marker}: owned by uid {NOBODY}")
        assert sidecar_of(session).exists()  # nothing moved
        as_user("import os\nos.unlink(args['path'])\nresult = True", path=str(marker))
        marker.touch()  # this user's own: used as it is
        assert clear(session, force=True).set_aside is not None
        assert not sidecar_of(session).exists()


@needs_root
def test_a_removed_marker_another_user_planted_neither_raises_tokens_nor_takes_one() -> None:
    """The directory's removed-token marker, made first by another user where anyone
    may write, with a number at the token limit: a new session does not start from it
    (it would refuse every new session there), and `clear --remove` keeps the sidecar
    rather than trust its token to a file that user can remove, saying so."""
    from fencelock._tokens import REMOVED_MARKER

    with open_directory(0o1777) as pub:
        marker = pub / REMOVED_MARKER
        as_user("import os\n"
                "fd = os.open(args['path'], os.O_WRONLY | os.O_CREAT, 0o644)\n"
                "os.write(fd, b'9223372036854775807')\n"
                "os.close(fd)\n"
                "result = True", path=str(marker))
        session = pub / "n.jsonl"
        with SessionLock(session, "new") as lock:
            assert lock.info is not None and lock.info.token == 1
            lock.append({"n": 1})
        done = clear(session, remove=True)
        assert not done.removed and sidecar_of(session).exists()
        assert f"{marker}: owned by uid {NOBODY}" in done.reason, done.reason


@needs_root
@pytest.mark.usefixtures("store")
def test_a_lock_made_before_its_directory_exists_walks_it_again_at_acquire() -> None:
    """A lock made while its sessions directory is not there yet (a gateway that makes
    it later; either store) does not keep that unfinished walk: another user who then makes the
    missing name, as a symlink to a directory of theirs, is refused at acquire, by that
    lock object and a new one alike, and nothing is made in their directory."""
    from fencelock import FenceLockError
    from fencelock._errors import ForeignSymlinkError

    with open_directory(0o1777) as pub:
        session = pub / "sessions" / "s.jsonl"
        lock = SessionLock(session, "victim")
        with pytest.raises(FenceLockError) as missing:  # no such directory yet
            lock.acquire()
        assert not isinstance(missing.value, ForeignSymlinkError)
        as_user("import os\n"
                "os.mkdir(args['theirs'], 0o777)\n"
                "os.symlink(args['theirs'], args['link'])\n"
                "result = True", theirs=str(pub / "theirs"), link=str(pub / "sessions"))
        with pytest.raises(ForeignSymlinkError):
            lock.acquire()
        with pytest.raises(ForeignSymlinkError):  # a new object: as it is made
            SessionLock(session, "victim").acquire()
        assert os.listdir(pub / "theirs") == []


@needs_root
def test_a_planted_session_file_is_refused_at_acquire_before_anything_touches_it() -> None:
    """`fencelock run` hands the session to its command, which would write into another
    user's file; and the acquire would set the token mark on it: both are refused."""
    from fencelock import PlantedFileError

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        as_user(_PLANT, path=str(session), data='{"n":0}\n')
        with pytest.raises(PlantedFileError):
            SessionLock(session, "victim").acquire()
        # The refused acquire left no sidecar of ours to lock the file's owner out.
        assert not sidecar_of(session).exists()
        out = subprocess.run(
            [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "a", "--",
             "sh", "-c", 'echo \'{"secret": 1}\' >> "$FENCELOCK_SESSION"'],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 1 and "planted" in out.stderr, out.stderr
        assert session.read_bytes() == b'{"n":0}\n'
        assert "user.fencelock.token" not in os.listxattr(session)
        owner = as_user("from fencelock import SessionLock\n"
                        "with SessionLock(args['path'], 'owner') as lock:\n"
                        "    result = lock.info.token", path=str(session))
        assert owner >= 1  # its owner takes it as ever


@needs_root
@pytest.mark.parametrize("fence", ["stat", "content"])
def test_the_planted_file_check_takes_the_user_fencelock_was_loaded_as(
    fence: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that was loaded as one user and runs as another now (seteuid) owns
    the first user's files too: both fences apply one rule to them."""
    from fencelock import _sidecar

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        as_user(_PLANT, path=str(session), data='{"n":0}\n')
        monkeypatch.setattr(_sidecar, "OWN_UID", NOBODY)  # as if loaded as that user
        with SessionLock(session, "same user", fence=fence) as lock:
            assert lock.held


@needs_root
@pytest.mark.parametrize("data", ["", "record"], ids=["empty", "with-a-record"])
def test_status_names_a_sidecar_another_user_planted_not_free(data: str) -> None:
    """A sidecar another user made in advance in a directory anyone can create files
    in: no run of this user takes the session (its acquire refuses the sidecar), so
    status shows it unreadable, naming its owner, not free to use."""
    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        record = ""
        if data:
            with SessionLock(session, "earlier"):
                pass
            record = sidecar_of(session).read_text()
            os.unlink(sidecar_of(session))
        as_user(_PLANT, path=str(sidecar_of(session)), data=record)
        found = probe(session)
        assert found.state == "unreadable", found
        assert f"owned by uid {NOBODY}" in found.reason and "planted" in found.reason
        assert [row.state for row in scan(sessions)] == ["unreadable"]
        with pytest.raises(fencelock.PlantedFileError):
            SessionLock(session, "mine").acquire()


@needs_root
@pytest.mark.parametrize("planted", ["sidecar", "fresh session"])
def test_recover_follows_no_record_another_user_planted(planted: str) -> None:
    """The fresh session every recover of a run answers is named from the session's
    record: another user who planted the record (or the fresh session of that name)
    would get the run's next lines."""
    from fencelock import PlantedFileError
    from fencelock._recovery import _successor

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        session.write_text('{"n":0}\n')
        with SessionLock(session, "before"):
            pass
        record = probe(session).record
        assert record is not None
        successor = _successor(str(session), record)
        assert successor is not None
        if planted == "sidecar":
            os.unlink(sidecar_of(session))
            as_user(_PLANT, path=str(sidecar_of(session)), data=record.encode().decode())
        else:
            as_user(_PLANT, path=successor, data="")
        with pytest.raises(PlantedFileError):
            recover(session, wait=0)
        if planted == "fresh session":
            assert Path(successor).read_bytes() == b""  # nothing written into theirs


@needs_root
@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
def test_recover_never_answers_a_fresh_session_planted_while_it_makes_it(
    spawn_holder: SpawnHolder, kind: str
) -> None:
    """Another user who learns the fresh session's name (its sidecar appears as recover
    takes its lock) and puts a file, a symlink or a FIFO there first: recover refuses
    it, says why, and answers nothing; it answered theirs, with nothing carried."""
    from fencelock import FenceLockError
    from fencelock._recovery import _successor
    from fencelock._sidecar_holder import SidecarHolder

    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        session.write_text('{"n":0}\n')
        spawn_holder(session, lane="stuck").acquire()
        record = probe(session).record
        assert record is not None
        successor = _successor(str(session), record)
        assert successor is not None
        loot = sessions.parent / "loot"
        loot.write_text("theirs\n")

        def plant() -> None:  # as their look at the directory would, once it is held
            body = {"file": _PLANT, "symlink": "import os\nos.symlink(args['to'], args['path'])"
                    "\nresult = True", "fifo": "import os\nos.mkfifo(args['path'], 0o666)\n"
                    "result = True"}[kind]
            as_user(body, path=successor, to=str(loot), data="theirs\n")

        # As the fresh session's acquire writes its first record: after its checks.
        with on_entry(SidecarHolder.write, plant) as ran, \
                pytest.raises(FenceLockError, match="a fresh session could not be started") \
                as caught:
            recover(session, wait=0)
        assert ran
        assert successor in str(caught.value)
        # Named as theirs, whatever it is, with whom to ask: the name is sticky's.
        assert f"owned by uid {NOBODY}" in str(caught.value)
        assert "or root can remove it, as the directory is sticky" in str(caught.value)
        assert loot.read_text() == "theirs\n"
        # Nothing of this recover's stays: its sidecar would keep out the next one.
        assert not os.path.lexists(successor + ".holder")
        if kind == "file":
            assert Path(successor).read_text() == "theirs\n"


_HOLD_AS_USER = """
with open(args['session'], 'w') as f:
    f.write('{"n": 0}\\n')
lock = SessionLock(args['session'], 'stuck')
lock.acquire()
print('held', flush=True)
sys.stdin.readline()
lock.release()
result = True
"""


@needs_root
@pytest.mark.parametrize(("runner", "mode"), [(4242, 0o1777), (0, 0o1777), (4242, 0o777)],
                         ids=["gateway", "root", "gateway-not-sticky"])
def test_recover_names_a_part_file_another_user_planted_in_a_shared_directory(
    runner: int, mode: int,
) -> None:
    """The fresh session's `.part`, made in advance by another user in a sticky
    directory, cannot be removed by this one (not root): recover says whose it is and
    whom to ask, not only "Operation not permitted", and leaves it as it is. Where the
    directory would let it be removed (run as root, or a directory without the sticky
    bit), the recover refuses it as planted too (it had removed it and gone on)."""
    from fencelock._recovery import _successor

    # 4242: the gateway's user; the other is NOBODY
    with open_directory(mode) as sessions:
        session = sessions / "s.jsonl"
        holder = spawn_as_user(_HOLD_AS_USER, uid=runner, session=str(session))
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline() == "held\n"
            record = probe(session).record
            assert record is not None
            successor = _successor(str(session), record)
            assert successor is not None
            as_user(_PLANT, path=successor + ".part", data="theirs\n")
            answer = as_user("result = recover(args['session'], wait=0).session",
                             uid=runner, session=str(session))
        finally:
            holder.communicate("go\n", timeout=60)
        assert isinstance(answer, dict) and answer["error"] == "FenceLockError", answer
        message = answer["message"]
        assert "a fresh session could not be started" in message
        assert f"{successor}.part: owned by uid {NOBODY}" in message, message
        sticky = "or root can remove it, as the directory is sticky"
        assert (sticky in message) == bool(mode & 0o1000), message
        assert Path(successor + ".part").read_text() == "theirs\n"
        assert not os.path.lexists(successor)


@needs_root
def test_clear_as_root_leaves_a_part_file_another_user_planted_in_a_sticky_directory() -> None:
    """Clearing the stale record of a recover that died copying removes the copy it
    left (`<fresh>.part`), but not another user's file at that name in a directory
    anyone may write to, which root could remove."""
    with open_directory(0o1777) as sessions:
        fresh = sessions / "fresh.jsonl"
        # A recover's fresh session, killed before its copy got the name: stale.
        subprocess.run([sys.executable, "-c", "import os, sys\nfrom fencelock import "
                        "SessionLock\nSessionLock(sys.argv[1], 'recovery', origin=sys.argv[2])"
                        ".acquire()\nos._exit(0)", str(fresh), str(sessions / "s.jsonl")],
                       check=True, timeout=60)
        as_user(_PLANT, path=str(fresh) + ".part", data="theirs\n")
        assert probe(fresh).state == "stale"
        cleared = clear(fresh)
        assert cleared.state == "stale" and ".part" not in cleared.reason, cleared.reason
        assert Path(str(fresh) + ".part").read_text() == "theirs\n"
        assert probe(fresh).state == "free"


@needs_root
def test_a_symlink_another_user_planted_above_the_session_is_refused() -> None:
    """Opening with O_NOFOLLOW guards only the last component. In a directory another
    user may create entries in (here group-writable, which the kernel's
    protected_symlinks does not cover), their symlink `sessions/agentA` could point runs
    into a directory of theirs; such a path is refused, and nothing is created there."""
    from fencelock import PlantedFileError

    with open_directory(0o775) as sessions:
        os.chown(sessions, 0, NOBODY)  # the other user's group may create entries
        theirs = sessions.parent / "theirs"
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        mine = sessions.parent / "mine"
        mine.mkdir()
        link = sessions / "agentA"
        as_user("os.symlink(args['target'], args['link'])\nresult = True",
                target=str(theirs), link=str(link))
        assert link.is_symlink() and link.lstat().st_uid == NOBODY
        session = link / "s.jsonl"
        with pytest.raises(PlantedFileError) as caught:
            SessionLock(session, "victim")
        assert str(link) in str(caught.value) and f"uid {NOBODY}" in str(caught.value)
        out = subprocess.run(
            [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "a", "--",
             "true"], capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert str(link) in out.stderr and "symlink owned by uid" in out.stderr
        # recover too, of a free session (it answered "refire" through their symlink)
        with pytest.raises(PlantedFileError):
            recover(session, wait=0)
        out = subprocess.run([sys.executable, "-m", "fencelock", "recover", str(session),
                              "--wait", "0"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "symlink owned by uid" in out.stderr, out.stderr
        assert list(theirs.iterdir()) == []  # nothing was created in their directory
        # Nor through a `..` after it (the part before the `..` is resolved as the
        # system resolves it, with the same check of whose symlinks lead there).
        (theirs / "sub").mkdir()
        for through in (link / "sub" / ".." / "s.jsonl", link / ".." / "s.jsonl"):
            with pytest.raises(PlantedFileError):
                SessionLock(through, "victim")
            for command in (["run", str(through), "--lane", "a", "--", "true"],
                            ["verify", str(through)], ["clear", str(through)]):
                out = subprocess.run([sys.executable, "-m", "fencelock", *command],
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
                assert "symlink owned by uid" in out.stderr
        assert list(theirs.iterdir()) == [theirs / "sub"]
        assert not (theirs.parent / "s.jsonl.holder").exists()
        # A symlink of this user's own is followed as before.
        own = sessions / "agentB"
        own.symlink_to(mine)
        with SessionLock(own / "s.jsonl", "a") as lock:
            lock.append({"n": 1})
        assert (mine / "s.jsonl").exists()


@needs_root
def test_the_planted_file_check_looks_through_a_symlink_of_our_own() -> None:
    """A sessions path reached through this user's own symlink into a shared directory
    gets the shared directory's checks: a sidecar another user planted there is refused."""
    from fencelock import PlantedFileError

    with open_directory(0o1777) as shared:
        link = shared.parent / "agent"
        link.symlink_to(shared)
        as_user(
            "import os\n"
            "fd = os.open(args['path'], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)\n"
            "os.fchmod(fd, 0o666)\n"
            "result = True",
            path=str(shared / "s.jsonl.holder"),
        )
        with pytest.raises(PlantedFileError), SessionLock(link / "s.jsonl", "victim"):
            pass
        assert (shared / "s.jsonl.holder").read_bytes() == b""


@needs_root
def test_files_root_makes_in_a_users_sessions_directory_stay_usable_by_that_user(
    spawn_holder: SpawnHolder,
) -> None:
    """An operator's ``sudo`` (run, hold, recover) makes a sidecar, a session file, a
    ``.torn`` and a fresh session in the gateway's directory: they go to the directory's
    owner and group, so the gateway's next run is not locked out of them."""
    with open_directory(0o700) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        new, torn, stuck = (str(sessions / f"{n}.jsonl") for n in ("new", "torn", "stuck"))
        with SessionLock(new, "ops") as lock:  # sidecar and session file made as root
            lock.append({"x": 1})
        for path in (torn, stuck):
            as_user("open(args['p'], 'w').write('{\"a\":1}\\n{\"b\"')\n", p=path)
        with SessionLock(torn, "ops") as lock, \
                pytest.warns(fencelock.FenceLockWarning, match="torn"):
            lock.append({"x": 2})  # the torn tail set aside as root
        holder = spawn_holder(Path(stuck), lane="stuck")
        holder.acquire()
        fresh = fencelock.recover(stuck, wait=0).session  # as root
        made = [new, new + ".holder", torn + ".holder", torn + ".torn", fresh,
                fresh + ".holder"]
        assert {p: (os.stat(p).st_uid, os.stat(p).st_gid) for p in made} == {
            p: (NOBODY, NOBODY) for p in made}
        for path in (new, torn, fresh):  # and the gateway's own run goes on in each
            assert as_user("with SessionLock(args['p'], 'gw') as lock:\n"
                           "    lock.append({'y': 1})\n"
                           "    result = 'ok'\n", p=path) == "ok"


@needs_root
def test_a_token_marker_root_makes_in_a_users_directory_stays_theirs_to_raise() -> None:
    """An operator's ``sudo fencelock clear --force`` (or ``--remove``) makes the
    directory's removed-token marker: root's at 0644, the user's own `clear --remove`
    could no longer raise it, and kept every sidecar ("cannot be written"). It goes to
    the directory's owner, as the other files root makes there do."""
    from fencelock._tokens import REMOVED_MARKER

    with open_directory(0o755) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        broken, other = sessions / "broken.jsonl", sessions / "other.jsonl"
        sidecar_of(broken).write_bytes(b'{"version":1,"state":"held","token":7,')
        assert fencelock.clear(broken, force=True).set_aside is not None  # as root
        marker = sessions / REMOVED_MARKER
        assert (marker.stat().st_uid, marker.stat().st_gid) == (NOBODY, NOBODY)
        assert as_user("with SessionLock(args['p'], 'gw'):\n"
                       "    pass\n"
                       "result = fencelock.clear(args['p'], remove=True).removed\n",
                       p=str(other)) is True


@needs_root
@pytest.mark.parametrize("made_before", [False, True])
def test_a_groups_members_each_remove_sidecars_of_sessions_they_share(made_before: bool) -> None:
    """Sessions in a group's directory: the first member's ``clear --remove`` makes the
    removed-token marker, which every member must then raise as they remove sidecars.
    Made 0644 (the umask's), the others' kept every sidecar ("cannot be written"); so
    too where that first member's own sidecar was 0600 (each member may give their
    sidecars their own mode). ``made_before``: one this user made so, by an earlier
    version, is widened at their next removal."""
    from fencelock._tokens import REMOVED_MARKER

    group, first, second = 4242, NOBODY - 1, NOBODY
    remove = ("with SessionLock(args['p'], 'gw', mode=args['m']):\n"
              "    pass\n"
              "os.umask(0o022)\n"
              "done = fencelock.clear(args['p'], remove=True)\n"
              "result = [done.removed, done.reason]\n")
    with open_directory(0o2770) as sessions:
        os.chown(sessions, 0, group)
        marker = sessions / REMOVED_MARKER
        if made_before:
            marker.write_text("1")
            marker.chmod(0o644)
            os.chown(marker, first, group)
        assert as_user(remove, uid=first, gid=group, p=str(sessions / "a.jsonl"),
                       m=0o600)[0] is True
        assert stat.S_IMODE(marker.stat().st_mode) == 0o660
        removed, reason = as_user(remove, uid=second, gid=group, p=str(sessions / "b.jsonl"),
                                  m=0o660)
        assert removed is True, reason
        assert marker.read_text() == ("3" if made_before else "2")  # b's started above a's


@needs_root
def test_a_token_marker_in_a_directory_anyone_may_write_is_not_the_groups() -> None:
    """In a directory anyone may write to (a sticky /tmp), group write on the directory
    is no group's sharing: the marker is 0600, or the user's primary group could lower
    it (tokens would start over); and no other user can open it to lock it, which held
    up every removal there (sidecars kept) and every new session's first acquire."""
    from fencelock._tokens import REMOVED_MARKER

    with open_directory(0o1777) as sessions:
        assert as_user("with SessionLock(args['p'], 'gw'):\n"
                       "    pass\n"
                       "os.umask(0o022)\n"
                       "result = fencelock.clear(args['p'], remove=True).removed\n",
                       p=str(sessions / "a.jsonl")) is True
        marker = sessions / REMOVED_MARKER
        assert stat.S_IMODE(marker.stat().st_mode) == 0o600
        assert as_user("try:\n"
                       "    os.close(os.open(args['m'], os.O_RDONLY))\n"
                       "    result = 'opened'\n"
                       "except PermissionError:\n"
                       "    result = 'refused'\n", uid=NOBODY - 1, m=str(marker)) == "refused"


@needs_root
def test_a_marker_another_user_planted_is_said_to_be_theirs() -> None:
    """Another user's removed-token marker in a sticky directory, which this user cannot
    open: the sidecar is kept, and the reason names the marker's owner and who can
    remove it, not only "Permission denied"."""
    from fencelock._tokens import REMOVED_MARKER

    with open_directory(0o1777) as sessions:
        marker = sessions / REMOVED_MARKER
        marker.write_text("5")
        os.chown(marker, NOBODY, NOBODY)
        marker.chmod(0o644)
        removed, reason = as_user("with SessionLock(args['p'], 'gw'):\n"
                                  "    pass\n"
                                  "done = fencelock.clear(args['p'], remove=True)\n"
                                  "result = [done.removed, done.reason]\n",
                                  uid=NOBODY - 1, p=str(sessions / "a.jsonl"))
        assert removed is False
        assert f"{marker}: owned by uid {NOBODY}, not this user" in reason, reason
        assert "as the directory is sticky" in reason and marker.read_text() == "5"


@needs_root
def test_a_torn_aside_link_another_user_planted_names_who_can_remove_it() -> None:
    """A symlink at `S.torn`, another user's, in a sticky directory: the append is
    refused and nothing is written through it, and the message says whose it is and
    who can remove it (this user cannot), not "remove or rename it"."""
    with open_directory(0o1777) as sessions:
        session = sessions / "s.jsonl"
        session.write_bytes(b'{"a": 1}\n{"b')
        os.chown(session, NOBODY - 1, NOBODY - 1)
        torn = Path(f"{session}.torn")
        torn.symlink_to(sessions / "elsewhere")
        os.lchown(torn, NOBODY, NOBODY)
        said = as_user("try:\n"
                       "    with SessionLock(args['p'], 'gw') as lock:\n"
                       "        lock.append({'x': 1})\n"
                       "    result = 'appended'\n"
                       "except fencelock.UnsafePathError as e:\n"
                       "    result = str(e)\n", uid=NOBODY - 1, p=str(session))
        assert f"owned by uid {NOBODY}, not this user" in said, said
        assert f"uid {NOBODY} or root can remove it, as the directory is sticky" in said, said
        assert "Remove or rename it" not in said
        assert session.read_bytes() == b'{"a": 1}\n{"b' and not (sessions / "elsewhere").exists()


@needs_root
def test_root_leaves_its_files_as_they_are_where_anyone_may_write() -> None:
    """In a directory anyone may write to (a sticky /tmp), another user's file is
    refused as planted: root's files stay root's there."""
    with open_directory(0o1777) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        session = str(sessions / "s.jsonl")
        with SessionLock(session, "ops") as lock:
            lock.append({"x": 1})
        assert os.stat(session + ".holder").st_uid == 0 == os.stat(session).st_uid


def test_a_torn_line_kept_aside_gets_the_locks_mode(tmp_path: Path) -> None:
    session = tmp_path / "s.jsonl"
    session.write_bytes(b'{"a":1}\n{"b"')
    with SessionLock(session, "gw", mode=0o660) as lock, \
            pytest.warns(fencelock.FenceLockWarning, match="torn"):
        lock.append({"x": 1})
    assert stat.S_IMODE(os.stat(f"{session}.torn").st_mode) == 0o660


@pytest.mark.parametrize(("mode", "fresh_mode"), [(0o660, 0o660), (0o600, 0o600),
                                                  (0o644, 0o600), (0o640, 0o600)])
def test_a_fresh_session_keeps_a_group_shared_sessions_mode(
    tmp_path: Path, spawn_holder: SpawnHolder, mode: int, fresh_mode: int,
) -> None:
    """Recover's fresh session and its sidecar are the group's where the stuck session
    was (read and write); never wider than that, nor readable by others."""
    session = tmp_path / "s.jsonl"
    session.write_bytes(b'{"a":1}\n')
    session.chmod(mode)
    holder = spawn_holder(session, lane="stuck")
    holder.acquire()
    fresh = fencelock.recover(session, wait=0).session
    assert fresh != str(session)
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in (fresh, fresh + ".holder")} == {
        fresh_mode}


@needs_root
@pytest.mark.parametrize("setgid", [False, True], ids=["own group", "set-group-ID directory"])
def test_a_fresh_session_is_the_groups_only_where_it_gets_the_sessions_group(
    setgid: bool,
) -> None:
    """A group-shared (0660) session recovered by a user whose files get another group
    (a directory that is not set-group-ID, the user's own primary group): the fresh
    session and its sidecar are 0600, not 0660 for that other group to read. In a
    set-group-ID directory of the session's group they get it, and stay 0660."""
    user, shared, own = NOBODY - 1, 4243, 4244
    with open_directory(0o2770 if setgid else 0o770) as sessions:
        os.chown(sessions, 0, shared if setgid else own)
        if setgid:
            sessions.chmod(0o2770)  # (chown clears the set-group-ID bit)
        session = sessions / "s.jsonl"
        session.write_bytes(b'{"secret":1}\n')
        sidecar = Path(f"{session}.holder")
        sidecar.touch()
        for path in (session, sidecar):
            os.chown(path, user, shared)
            path.chmod(0o660 if path == session else 0o600)
        # Held without a record (outside fencelock): a recover makes a fresh session.
        fd = os.open(sidecar, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fresh = as_user("result = fencelock.recover(args['p'], wait=0).session",
                            uid=user, gid=shared if setgid else own, p=str(session))
        finally:
            os.close(fd)
        assert fresh != str(session)
        made = {p: os.stat(p) for p in (fresh, fresh + ".holder")}
        assert {(stat.S_IMODE(st.st_mode), st.st_gid) for st in made.values()} == (
            {(0o660, shared)} if setgid else {(0o600, own)})


@needs_root
def test_root_gives_a_sessions_files_to_its_owner_not_to_the_directorys(
    spawn_holder: SpawnHolder,
) -> None:
    """In a directory one user owns and a group shares, another member's session: what
    root makes for it (its fresh session and sidecar, its .torn) is that member's, with
    the session's group; never the directory owner's, who could read it."""
    member = (12345, 12346)  # ids need no account to own files
    with open_directory(0o2770) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        stuck, torn = (sessions / f"{n}.jsonl" for n in ("stuck", "torn"))
        for path in (stuck, torn):
            path.write_bytes(b'{"secret":1}\n{"b"')
            os.chown(path, *member)
            path.chmod(0o660)
        with SessionLock(torn, "ops") as lock, \
                pytest.warns(fencelock.FenceLockWarning, match="torn"):
            lock.append({"x": 2})
        holder = spawn_holder(stuck, lane="stuck")
        holder.acquire()
        fresh = fencelock.recover(stuck, wait=0).session
        made = [f"{torn}.holder", f"{torn}.torn", fresh, f"{fresh}.holder"]
        assert {p: (os.stat(p).st_uid, os.stat(p).st_gid) for p in made} == {
            p: member for p in made}


@needs_root
def test_a_sidecar_another_member_made_does_not_get_roots_new_session() -> None:
    """A group member's file at a new session's sidecar name decides nothing about who
    gets the session root's append makes: its directory's owner does."""
    with open_directory(0o2770) as sessions:
        os.chown(sessions, NOBODY, NOBODY)
        session = sessions / "new.jsonl"
        Path(f"{session}.holder").touch()
        os.chown(f"{session}.holder", 12347, NOBODY)
        with SessionLock(session, "ops") as lock:
            lock.append({"content": "the operator's"})
        assert (os.stat(session).st_uid, os.stat(session).st_gid) == (NOBODY, NOBODY)


@needs_root
def test_a_fresh_session_belongs_to_the_owner_of_the_file_it_copied(
    spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stuck session renamed away and another member's file put at its name while
    recover copies it: the copy still goes to the owner of what was copied."""
    from fencelock import _recovery

    member, other = (12345, 12346), (12347, 12346)
    with open_directory(0o2770) as sessions:
        os.chown(sessions, NOBODY, 12346)
        stuck = sessions / "stuck.jsonl"
        stuck.write_bytes(b'{"secret":1}\n')
        os.chown(stuck, *member)
        holder = spawn_holder(stuck, lane="stuck")
        holder.acquire()
        scan = _recovery._scan

        def swapped(*args: Any) -> Any:  # the copy is read: now the name changes hands
            result = scan(*args)
            if not stuck.with_suffix(".gone").exists():
                stuck.rename(stuck.with_suffix(".gone"))
                stuck.write_bytes(b"")
                os.chown(stuck, *other)
            return result

        monkeypatch.setattr(_recovery, "_scan", swapped)
        fresh = fencelock.recover(stuck, wait=0).session
        assert (os.stat(fresh).st_uid, os.stat(fresh).st_gid) == member


@needs_root
@pytest.mark.usefixtures("store")
def test_a_directory_made_by_another_user_as_the_acquire_looks_is_not_gone_through() -> None:
    """A lock made before its sessions directory exists walks the path at each acquire.
    Another user who made the missing name, as a symlink to a directory of theirs, just
    after that walk (a race run thousands of times a second) had the acquire open the
    sidecar through it: the run's record, then its lines, went into their files. A
    directory the walk finds missing is not opened."""
    from fencelock import FenceLockError
    from fencelock._errors import ForeignSymlinkError

    with open_directory(0o1777) as pub:
        session, theirs = pub / "sessions" / "s.jsonl", pub / "theirs"
        as_user("import os\nos.mkdir(args['theirs'], 0o777)\nresult = True", theirs=str(theirs))
        lock = SessionLock(session, "victim")

        def link() -> None:  # right after the walk, as the store is asked
            as_user("import os\nos.symlink(args['theirs'], args['link'])\nresult = True",
                    theirs=str(theirs), link=str(pub / "sessions"))

        with on_entry(type(lock._store).acquire, link), \
                pytest.raises(FenceLockError) as missing, lock:
            lock.append({"role": "user", "content": "private"})
        assert not isinstance(missing.value, ForeignSymlinkError)
        assert "does not exist" in str(missing.value)
        assert os.listdir(theirs) == []


@needs_root
@pytest.mark.usefixtures("store")
def test_a_directory_this_user_cannot_search_is_said_so_not_missing() -> None:
    """A lock whose directory walk stops at a component this user may not search is no
    missing directory: its error says the permission, as the store's own open does
    (the refusal of a missing directory said "does not exist; create it" to this user,
    in the etcd store, of a directory that exists)."""
    with open_directory(0o700) as locked:  # root's: not searchable by the user below
        session = locked / "inner" / "s.jsonl"
        (locked / "inner").mkdir()
        said = as_user(
            "from fencelock import SessionLock\n"
            "try:\n"
            "    SessionLock(args['session'], 'denied').acquire()\n"
            "    result = 'acquired'\n"
            "except Exception as e:\n"
            "    result = f'{type(e).__name__}: {e}'\n",
            session=str(session), preload=("fencelock._etcd", "etcd3gw.client"))
    assert "Permission denied" in said and "does not exist" not in said, said
