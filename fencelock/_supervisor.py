"""The ``fencelock run`` supervisor: hold a session while a command runs, like flock(1).

It owns the signals that would end it (`_platform.run_signals`: SIGINT, SIGTERM, SIGHUP,
SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM) from before the acquire to after the release, hands
the locked descriptor to the command (so the session stays held as long as the
command, or anything it left running with the descriptor, lives), names the command
in the record, refreshes the heartbeat while it runs, and passes its exit code on.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fencelock import _platform
from fencelock._output import (
    CommandNotExecutableError,
    CommandNotFoundError,
    error_line,
    library_errors,
    warning_line,
)
from fencelock._signals import PromptHandlers, Stopped

if TYPE_CHECKING:
    import subprocess
    from types import FrameType

    from fencelock import _etcdkeeper
    from fencelock._lock import SessionLock
    from fencelock._record import HolderInfo


class SignalForwarder:
    """Owns the signals that would end it (`_platform.run_signals`) for the whole of
    ``run``, so that no signal ever kills it with the default action while it holds the
    session.

    Installed before the acquire. While waiting for the session a signal stops the
    wait (`Stopped`, which unwinds the acquire). From `hold` on, a signal is kept
    until the command runs and is then passed on to it, so the hold outlives the
    command and the release always happens. Python runs these handlers in the main
    thread between bytecodes, so the command starts with the caller's signal mask.
    """

    def __init__(self) -> None:
        import signal

        self.proc: subprocess.Popen[bytes] | None = None
        self.holding = False
        self.pending: list[int] = []
        self.sigterm = signal.SIGTERM
        # What a terminal sends its whole foreground process group: Ctrl-C, Ctrl-\.
        self.from_terminal = {signal.SIGINT, getattr(signal, "SIGQUIT", signal.SIGINT)}
        self.handlers = PromptHandlers(self._handle, _platform.run_signals())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.holding:
            self.holding = True  # one Stopped: a second signal must not cut its unwinding
            raise Stopped(signum)
        if self.proc is None:
            self.pending.append(signum)
            return
        # Ctrl-C (Ctrl-\) goes to the whole foreground process group, the command
        # included unless it moved to a group of its own; a second copy could interrupt
        # the command's own clean-up.
        if signum in self.from_terminal and _platform.in_terminal_foreground(self.proc.pid):
            return
        self._pass_on(self.proc, signum)

    def _pass_on(self, proc: subprocess.Popen[bytes], signum: int) -> None:
        # Windows: the console's Ctrl-C and Ctrl-Break reach the command itself, and
        # `send_signal` there takes SIGTERM only (of these), raising for the others.
        if _platform.WINDOWS and signum != self.sigterm:
            return
        proc.send_signal(signum)

    def hold(self) -> None:
        """The session is held: from now on signals wait for the command."""
        self.holding = True

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        for sig in self.pending:
            self._pass_on(proc, sig)

    def restore(self) -> None:
        """Put the handlers back; in the `fencelock` process itself, whose exit code is
        the command's from now on, leave the signals ignored instead: a late one (the
        group-wide copy of a `timeout(1)`, say) must not end it with another code."""
        self.holding = True  # a signal between these calls must not raise any more
        entry = sys.modules.get("fencelock._entry")
        self.handlers.close(ignore=bool(entry is not None and entry.ENDS_PROCESS))


class _Heartbeat:
    """Refreshes the record's heartbeat while the command runs, so it is not 'stuck'."""

    def __init__(self, lock: SessionLock, every: float, guarded: bool = False) -> None:
        import threading

        self.lock = lock
        self.every = every
        self.guarded = guarded
        """A keeper's guard watches for the holder's loss, and says what it finds."""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fencelock-heartbeat", daemon=True)
        if 0 < every < threading.TIMEOUT_MAX:  # 0 or inf: never
            self.thread.start()

    def _run(self) -> None:
        from fencelock._errors import FenceLockError, HolderLostError, session_lead

        said = ""  # a failure is said once, not at every beat while it lasts
        while not self.stop.wait(self.every):
            try:
                self.lock.touch()
            except (FenceLockError, OSError) as e:
                lost = isinstance(e, HolderLostError)
                if str(e) != said and not (lost and self.guarded):
                    said = str(e)
                    error_line(f"{session_lead(self.lock.session, e)}heartbeat not refreshed: {e}")
                if lost:
                    return  # for good: no later beat can refresh a lost holder's record
            else:
                said = ""

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _spawn(command: Sequence[str], env: dict[str, str], lock_fd: int) -> subprocess.Popen[bytes]:
    name = command[0]
    # Like flock(1), the command inherits the caller's open descriptors (`3<file`) and
    # the lock's own: a flock lock belongs to the open file description, so the
    # session stays held while the command (or anything it leaves running with the
    # descriptor) lives, even if this process is killed. fencelock's other
    # descriptors are close-on-exec. The threads running meanwhile (the heartbeat, an
    # etcd run's guard) start no processes, so no other child can inherit the lock by
    # accident.
    if lock_fd >= 0:
        os.set_inheritable(lock_fd, True)
    try:
        try:
            return _exec(list(command), env)
        except PermissionError:
            # The PATH search stopped at an entry it may not run (a directory, say), as
            # execvp(3) does not: run the first executable file of that name.
            found = _executable(name, env)
            if found is None:
                raise
            return _exec(list(command), env, found)
    except FileNotFoundError:
        found = _found(name, env)
        if found is not None and os.path.isfile(found):  # the file is there: its #! is not
            raise CommandNotFoundError(
                f"{name}: its interpreter was not found (check the #! line of {found})"
            ) from None
        raise CommandNotFoundError(f"{name}: command not found") from None
    except PermissionError:
        found = _found(name, env)
        if found is None:  # only directories of that name on PATH, as a shell says
            raise CommandNotFoundError(f"{name}: command not found") from None
        if os.path.isdir(found):
            raise CommandNotExecutableError(f"{name}: is a directory") from None
        raise CommandNotExecutableError(f"{name}: permission denied") from None
    except OSError as e:
        from fencelock._errors import LIMIT_FIXES

        fix = LIMIT_FIXES.get(e.errno or 0)
        raise CommandNotExecutableError(
            f"{name}: cannot run it: {e.strerror}" + (f"; {fix}" if fix else "")) from None
    finally:
        if lock_fd >= 0:
            os.set_inheritable(lock_fd, False)


def _exec(argv: list[str], env: dict[str, str], path: str | None = None
          ) -> subprocess.Popen[bytes]:
    """Start ``argv`` (from ``path`` when given); a file without a #! line runs under
    /bin/sh, as execvp(3) and shells run it (and flock(1) through them)."""
    import subprocess

    try:
        return subprocess.Popen(argv, executable=path, env=env, close_fds=False)
    except OSError as e:
        script = path or _found(argv[0], env)
        if e.errno != errno.ENOEXEC or script is None or not os.path.isfile(script):
            raise
        try:
            return subprocess.Popen(["/bin/sh", script, *argv[1:]], env=env, close_fds=False)
        except OSError:
            raise e from None


def _executable(name: str, env: dict[str, str]) -> str | None:
    """The first file on PATH called ``name`` that this user may execute (None for a
    name with a slash: no search)."""
    if os.sep in name:
        return None
    return _on_path(name, env, lambda path: os.path.isfile(path) and os.access(path, os.X_OK))


def _found(name: str, env: dict[str, str]) -> str | None:
    """What ``name`` names: itself if it has a slash, else the first PATH entry that
    has it (executable or not: this only says why running it failed)."""
    if os.sep in name:
        return name
    return _on_path(name, env, lambda path: os.path.exists(path) and not os.path.isdir(path))


def _on_path(name: str, env: dict[str, str], fits: Callable[[str], bool]) -> str | None:
    """The first ``name`` on the command's PATH that ``fits``."""
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if fits(candidate):
            return candidate
    return None


def run_held(
    lock: SessionLock,
    info: HolderInfo,
    command: Sequence[str],
    beat: float,
    forwarder: SignalForwarder,
    keeper: _etcdkeeper.Keeper | None = None,
) -> int:
    from fencelock._errors import FenceLockError, HolderLostError

    lock_fd = lock._shared_fd() if keeper is None else keeper.command_fd
    env = dict(os.environ)
    # The caller's LC_CTYPE, not the one Python's locale coercion set for this process
    # (C.UTF-8 where the caller's locale is C): the command runs as the caller asked.
    known, ctype = _platform.initial_environment("LC_CTYPE")
    if known and env.get("LC_CTYPE") != ctype:
        env.pop("LC_CTYPE", None)
        if ctype is not None:
            env["LC_CTYPE"] = ctype
    env.update(
        FENCELOCK_SESSION=lock.session,
        # The lane's UTF-8 bytes, whatever encoding this process gives the environment
        # (ASCII where Python's locale coercion is off, and a lane like "lané" would not
        # encode).
        FENCELOCK_LANE=os.fsdecode(lock.lane.encode("utf-8")),
        FENCELOCK_TOKEN=str(info.token),
        FENCELOCK_RUN_ID=info.run_id,
    )
    if lock_fd >= 0:  # the sidecar's locked descriptor, or the etcd keeper's pipe
        env["FENCELOCK_FD"] = str(lock_fd)
    if forwarder.pending:
        return 128 + forwarder.pending[0]
    # The threads first: one that cannot be started (a limit on threads, or memory)
    # then stops the run before its command starts, never leaves the command running
    # while `run` reports a failure and exits.
    heartbeat = _Heartbeat(lock, beat, guarded=keeper is not None)
    try:
        if keeper is not None:
            keeper.guard()
        proc = _spawn(command, env, lock_fd)
        forwarder.attach(proc)
        if keeper is not None:
            keeper.watch(proc)
        try:
            lock._name_command(proc.pid)
        except (FenceLockError, OSError) as e:
            # The command runs on: a note. A holder this process's clock counts as lost
            # is the keeper's to judge (it asks etcd, and says what it finds).
            if not (isinstance(e, HolderLostError) and keeper is not None):
                warning_line(f"{lock.session}: the record does not name the command: {e}")
        code = proc.wait()
    finally:
        if keeper is not None:
            keeper.ended()
        heartbeat.close()
    return 128 - code if code < 0 else code


def _set_torn_tail_aside(lock: SessionLock) -> None:
    """A torn last line left by a writer that died: moved aside before the command
    appends (said with a warning line). Where it cannot be moved, or the tail cannot be
    checked, but this user may write the session, the run is refused (`FenceLockError`)
    before the command starts, as `SessionLock.append` refuses its own line: a line the
    command appended would join the torn one. A reader's run (the session not writable
    here) only says so: its command cannot append."""
    from fencelock._errors import FenceLockError, SessionTakeoverError, SessionWriteError
    from fencelock._fence import ends_torn

    try:
        lock._set_torn_tail_aside()
    except SessionWriteError as e:  # (its own words are for an entry to append again)
        torn = ends_torn(lock.session)
        said = ("its last line is torn and could not be moved aside" if torn
                else "its last line could not be checked for a torn line")
        if os.access(lock.session, os.W_OK):
            raise FenceLockError(
                f"{lock.session}: {said}, so the command was not started (a line it "
                f"appended would join a torn one): {e.failed}; then run it again"
            ) from None
        failed = f"{e.what} failed: {e.cause.strerror or type(e.cause).__name__}"
        warning_line(f"{lock.session}: {said} ({failed}); a line the command appends "
                     f"would join {'it' if torn else 'one'}")
    except SessionTakeoverError:
        # Written by something outside the protocol since the acquire (a moved
        # conversation too: no command writes into the old session).
        raise
    except (FenceLockError, OSError) as e:
        # S.torn in the way (a directory, a link, another user's file), say: the torn
        # line stays, and so does the refusal where the command could append to it.
        if ends_torn(lock.session) and os.access(lock.session, os.W_OK):
            raise FenceLockError(
                f"{lock.session}: its last line is torn and could not be moved aside, so "
                f"the command was not started (a line it appended would join it): {e}"
            ) from None
        warning_line(f"{lock.session}: a torn last line may be left for the command's "
                     f"first line to join: {e}")


def _say_if_moved(lock: SessionLock) -> None:
    """A recover that moved the session's conversation while the command ran (it found
    the run stuck): said, as what the command wrote after the move is in the old
    session only, which nobody reads on. (The command's own writes are not fenced.)"""
    from fencelock import _moved

    fresh = _moved.target(lock.session)
    if fresh is not None:
        warning_line(f"{lock.session}: a recover moved its conversation to {fresh} while "
                     f"the command ran; what the command wrote after that is not there")


def supervise(lock: SessionLock, command: Sequence[str], heartbeat: float) -> int:
    """Acquire ``lock``, run ``command`` holding it, release; the exit code to give.

    Raises the command line's errors (a live holder in the way: exit 4)."""
    from fencelock import _etcdkeeper
    from fencelock._errors import FenceLockError

    # Installed before the acquire: a signal that lands once the lock is taken must
    # never kill this process with the default action (that would leave a stale record).
    forwarder: SignalForwarder | None = None
    keeper: _etcdkeeper.Keeper | None = None
    try:
        forwarder = SignalForwarder()
        try:
            with library_errors(lock.session):
                info = lock.acquire()
            forwarder.hold()
            with library_errors(lock.session):
                _set_torn_tail_aside(lock)
            # A holder in etcd: a keeper process stands in for the shared descriptor.
            keeper = _etcdkeeper.start(lock)
            code = run_held(lock, info, command, heartbeat, forwarder, keeper)
            _say_if_moved(lock)
        finally:
            # An attribute store, not a call: no handler runs before it (CPython runs
            # pending handlers on entering a function), so no Stopped can cut the
            # release below short.
            forwarder.holding = True
            if lock.held and not lock._store.shares_fd:
                # The command's writes are the run's own: the released record takes the
                # session as it is now (the sidecar store does so in `_release_shared`,
                # once it has set the token mark, which moves the session's ctime).
                lock._follow_session()
            if keeper is not None and lock.held:
                try:
                    keeper.release(lock)
                except (FenceLockError, OSError) as e:
                    error_line(f"{lock.session}: release: {e}")
            elif lock.held:
                try:
                    # Without unlocking: what the command left running keeps the session.
                    lock._release_shared()
                except (FenceLockError, OSError) as e:
                    error_line(f"{lock.session}: release: {e}")
    except Stopped as e:  # before the command started: nothing is held any more
        code = 128 + e.signum
    finally:
        # Kept until after the release, so a late SIGTERM cannot leave a stale record.
        if forwarder is not None:
            forwarder.restore()
    return code
