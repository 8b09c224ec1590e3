"""`SessionLock`: the run-level holder of one session file.

Life cycle: take a slot in the in-process registry (so two runs in one process
contend even where the store's lock would not make them), then have the session's
store take its lock and write the record (the sidecar by default, see
`fencelock._sidecar_holder`; etcd with a backend). The lock stays held through the
prompt window; release leaves the record ``released`` and gives the lock back. This
module holds what every store shares: reentrancy, waiting off the event loop, the
record's fields, the fence and the heartbeat.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import stat
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from fencelock import (
    _cleanup,
    _fence,
    _fingerprint,
    _identity,
    _moved,
    _record,
    _registry,
    _sidecar,
    _store,
    _successors,
    _wait,
)
from fencelock._errors import (
    FenceLockError,
    FenceLockWarning,
    HolderLostError,
    MoveToFinish,
    NotHeldError,
    SessionMovedError,
    SessionTakeoverError,
    no_thread,
    warn_each_time,
)
from fencelock._fingerprint import STAT, FenceMode, Fingerprint
from fencelock._record import HELD, PROMPT, WRITE, HolderInfo, Phase, PreviousHolder, State

if TYPE_CHECKING:
    import asyncio

OnContention = Literal["wait", "fail"]


@functools.lru_cache(maxsize=256)
def _directory_facts(directory: str, real: str) -> tuple[FenceMode, bool]:
    """The fence mode of a sessions directory (``real`` is its real path), and whether
    it is on overlayfs (`_fingerprint.copy_up`); cached, as detecting them costs
    syscalls.

    Also warns, once per directory, when anyone may create files in the real directory:
    another user could then plant a sidecar or session of their own there.
    """
    try:
        mode = os.stat(real).st_mode
    except OSError:
        mode = 0
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        shown = directory if real == directory else f"{directory} (really {real})"
        warnings.warn(
            f"{shown}: sessions directory is world-writable without the sticky bit; "
            f"any user can plant or delete sidecars there. chmod o-w (or +t) it",
            FenceLockWarning,
            stacklevel=4,
        )
    return _fingerprint.detect(real)


def _session_facts(session: str) -> tuple[str, tuple[FenceMode, bool], bool]:
    """(registry key, (detected fence mode, on overlayfs), whether the key's directory
    was walked whole) of an absolute session path. Raises `ForeignSymlinkError` when the path goes
    through another user's symlink. Both are kept only when walked whole: a directory
    with a missing component (not made yet) is walked again next time, as another user
    may make the missing name meanwhile, as a symlink to a directory of theirs."""
    key, whole = _registry.walked_key(session)
    detect = _directory_facts if whole else _directory_facts.__wrapped__
    return key, detect(os.path.dirname(session), os.path.dirname(key)), whole


@functools.lru_cache(maxsize=1024)
def _static_part(
    *, pid: int, host: str, start: str, session: str, lane: str, fence: FenceMode,
    origin: str | None,
) -> str:
    """The record's fixed fields, shared by lock objects that would write the same."""
    return _record.static_part(
        pid=pid, host=host, process_start=start, session=session, lane=lane, fence=str(fence),
        origin=origin, extra={},
    )


class _ThreadOwner:
    """A thread as the owner of a lock object, for reentrancy: one per thread, for the
    thread's life. A thread id will not do: the system gives a finished thread's id to
    a later thread, which would then re-enter a lock the first one left held (handed to
    another thread to release)."""

    __slots__ = ()


class _Callbacks:
    """`on_abort` callbacks, each called once by whichever thread `run`s them first (a
    run's event loop, then the recover's thread for those the loop has not begun); the
    failures, for the recover's caller."""

    def __init__(self, callbacks: list[Callable[[], object]]) -> None:
        self._mu = threading.Lock()
        self._todo = callbacks
        self.failed: list[tuple[Callable[[], object], Exception]] = []
        self.ran = threading.Event()

    def run(self) -> None:
        with self._mu:
            while self._todo:
                callback = self._todo.pop(0)
                try:
                    callback()
                except Exception as e:
                    self.failed.append((callback, e))
        self.ran.set()


_IN_LOOP_WAIT = 0.25
"""Seconds a recover gives a run's event loop to call the run's `on_abort` callbacks."""


class _TaskOwner:
    """An asyncio task as the owner of a lock object, for reentrancy: one per task, for
    the task's life. Not the task itself: a held lock object (which the in-process
    registry keeps) would keep its task alive, so that a task dropped with its event
    loop closed never had its coroutine closed, and never gave the session back."""

    __slots__ = ("__weakref__", "loop")

    def __init__(self, loop: object) -> None:
        self.loop = weakref.ref(loop)
        """The task's event loop, where `on_abort` callbacks of its runs are called."""


_threads = threading.local()
_closing = threading.Lock()
"""Taken by releases for coroutines being closed (`SessionLock._release_closed`)."""
_tasks: weakref.WeakKeyDictionary[object, _TaskOwner] = weakref.WeakKeyDictionary()
"""Each live task's `_TaskOwner`."""


def _whoami() -> object:
    """The owner identity for reentrancy: the asyncio task's if any, else the thread's."""
    # No task can be running in a process that never imported asyncio, nor in this
    # thread while another thread is still importing it (a module half made, which
    # lacks the functions: an acquire then raised AttributeError).
    aio = sys.modules.get("asyncio")
    try:
        if aio is not None and (loop := aio._get_running_loop()) is not None and \
                (task := aio.current_task()) is not None:
            return _tasks.get(task) or _tasks.setdefault(task, _TaskOwner(loop))
    except AttributeError:
        pass
    try:
        return _threads.owner
    except AttributeError:
        owner = _threads.owner = _ThreadOwner()
        return owner


_take_slot = _registry.take
_free_slot = _registry.free

_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()
"""Whether one thread runs Python code at a time (a free-threaded build may run without
the GIL): `SessionLock.release` relies on it to skip the lock object's ``_io``."""


def _in_a_thread(loop: asyncio.AbstractEventLoop, work: Callable[[], None]
                 ) -> asyncio.Future[None]:
    """Run ``work`` (a release that may wait for its store) in a daemon thread of its
    own, not on the event loop nor in its default executor (see `acquire_async`); the
    future ends as it does, with its exception if it raises. A daemon: a process that
    ends while etcd is away does not wait for a lease the store lets expire anyway."""
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():  # (the awaiting task may have been cancelled)
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as e:  # handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, error)

    try:
        threading.Thread(target=run, name="fencelock-release", daemon=True).start()
    except RuntimeError:  # no thread to be had (a limit reached): released on the loop
        run()
    return done


def _settle(future: asyncio.Future[Any]) -> None:
    """End ``future`` with None unless it has ended (its task may have moved on)."""
    if not future.done():
        future.set_result(None)


async def _briefly(future: asyncio.Future[Any], grace: float) -> None:
    """For a cancelled task: wait for ``future`` (the attempt, or the giving back, it
    leaves behind) for at most ``grace`` seconds (the store's ``cancel_grace``), through
    further cancels."""
    import asyncio

    loop = asyncio.get_running_loop()
    ends = loop.time() + grace
    while not future.done() and (left := ends - loop.time()) > 0:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future}, timeout=left)


_CLOSED_LOOP_POLL = 0.05
"""How often a helper whose lock the awaiting task has not yet taken looks whether the
task's event loop was closed meanwhile (then it releases the lock itself)."""


def _check_text(what: str, text: str, instead: str) -> None:
    """Raise for a text field no record should carry: not a str, empty or blank (status
    would show nothing), or longer than `_record.MAX_TEXT` characters. ``instead``: what
    to give, for an empty one."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty; {instead}")
    if len(text) > _record.MAX_TEXT:
        raise ValueError(f"{what} is longer than {_record.MAX_TEXT} characters")


def _check_mode(mode: int) -> None:
    """Raise for a ``mode`` that is not the permission bits of a file its owner can
    reopen: setuid, setgid and sticky bits (or any higher ones) are refused, as is a
    mode without the owner's read and write."""
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise TypeError(f"mode must be an int such as 0o600, not {type(mode).__name__}")
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise ValueError(
            f"mode {mode:#o} is not the permission bits of a file its owner can read and "
            "write: give one from 0o600 to 0o777 (for example 0o600, or 0o660 for a group "
            "that shares the sessions)"
            if mode >= 0 else f"mode {mode} is negative: give one such as 0o600"
        )


class SessionLock:
    """Holds one session file for a whole run. docs/DESIGN.md explains the protocol."""

    def __init__(
        self,
        path: _sidecar.AnyPath,
        lane: str = "default",
        *,
        on_contention: OnContention = "wait",
        timeout: float | None = None,
        fence: FenceMode | str = FenceMode.AUTO,
        stamp: bool = False,
        mode: int = 0o600,
        origin: str | None = None,
        backend: str | None = None,
    ) -> None:
        if on_contention not in ("wait", "fail"):
            raise ValueError(f"on_contention must be 'wait' or 'fail', not {on_contention!r}")
        if timeout is not None:
            timeout = _wait.limit(timeout)
        self.check_lane(lane)
        _check_mode(mode)
        if origin is not None:  # a path: undecodable bytes are written escaped
            _check_text("origin", origin, "give the path of the session this run "
                        "replaces, or None")
        self.session, self.sidecar = _sidecar.paths(path)
        self.lane = lane
        self.on_contention: OnContention = on_contention
        self.timeout = timeout
        self.stamp = stamp
        self.mode = mode
        self.origin = origin
        self._key, (detected, overlay), self._walked = _session_facts(self.session)
        self.fence_mode = detected if fence == FenceMode.AUTO else FenceMode(fence)
        self._copies_up = overlay and self.fence_mode is STAT
        """The session's fingerprint is taken after `_fingerprint.copy_up`."""
        self._io = threading.Lock()
        self._append_mu = threading.Lock()
        self._appending = 0
        """The thread ident of an append under way (under ``_append_mu``), else 0."""
        self._release_deferred = 0
        """The thread whose signal handler (or finaliser) released in the middle of its
        append, fence check or record write (``_io_writers``), else 0: that thread
        makes the release as it ends (`_deferred_release`), once."""
        self._io_writers: set[int] = set()
        """The threads in a record write (`_io_held`: from before they take ``_io`` until
        after they let it go): a signal handler or a finaliser of one of them that
        releases, or writes the record, cannot take ``_io`` (it might wait for itself):
        the release is deferred to the write's end, the write left to the next one."""
        self._count = 0
        self._pid = 0
        self._owner: object = None
        self._info: HolderInfo | None = None
        """The record as a HolderInfo, built on demand from the fields below."""
        self._token = 0
        self._run_id = ""
        self._acquired_at = 0.0
        self._heartbeat_at = 0.0
        self._phase = Phase.WRITE
        self._line_going_in = False
        """An append in the prompt phase is writing its line: a record written meanwhile
        (a `touch` from another thread) says the write phase, whose fingerprint readers
        know may lag (docs/PROTOCOL.md 2.4)."""
        self._phase_said = True
        """The record last written says ``_phase``: a record write sets it; a prompt
        window's end clears it (the store writes the record at the next append, and the
        release writes it whole, until it says the write phase)."""
        self._previous: PreviousHolder | None = None
        self._static = ""
        self._static_pid = 0
        self._middle: tuple[str, str, bytes] = ("", "", b"")
        """(run id, fixed part, `_record.middle` of the two): encoded once a run."""
        self._shell_fixed: tuple[str, int, str, str, str, str, str | None] = (
            "", 0, "", "", "", "", None)
        """`_info_shell`'s arguments, taken again only in a forked child."""
        self._tail: tuple[str, bytes] = ("", b"")
        """(fixed part, its `_record.middle_tail`): encoded once while it stays the same."""
        self._fp_bytes: tuple[Fingerprint | None, bytes] = (None, b"null")
        """(fingerprint, its encoded value): encoded once while it stays the same."""
        self._fp: Fingerprint | None = None
        self._tail_checked = False
        self._takeover: tuple[
            str, tuple[Fingerprint | None, Fingerprint | None, str | None] | None] = ("", None)
        """(run id, the fingerprints of the takeover an append or fence check of that
        run found): every later append, fence check and prompt window of the run raises
        it again, even where the file has been put back as it was (a takeover sticks)."""
        self._abort_callbacks: list[Any] = []
        self._slot_attempt: object = None
        """The acquire attempt that took the in-process slot the run holds
        (`_registry.take`): its release frees that slot only, never one handed on to
        another owner of this object since (which a release run again would free)."""
        self._sole_name = False
        """Only fencelock's own acquirers lock this session's sidecar (`recover`'s fresh
        session, whose name only recovers know): an acquire that fails before its first
        record removes an empty sidecar, under its lock."""
        self._like = ""
        """The session file whose owner the sidecar this makes as root takes
        (`_platform.owner_for`), where not its own: recover's fresh session takes the
        stuck one's."""
        self._token_floor = 0
        """A new sidecar's first token is above this (`recover` sets it for a fresh
        session that carries another session's stamped lines)."""
        self._stamped_floor = 0
        """The largest token stamped in lines that `recover` carries into a fresh
        session: a store's (etcd's) token must be above it, as above the session's own."""
        self._wrote_in = ""
        """The run id of the last run of this object whose `append` put a line in."""
        self._only_if_free = False
        """The acquire under way takes the session only if that needs no wait: where a
        move is to be finished first, it leaves that to a thread (`MoveToFinish`)."""
        self._finishing: str | None = None
        """The session a recover moved to this one and was killed before it finished
        the move (the stale record this run's acquire took over says so: its
        ``origin``): the acquire finishes it before it returns (`_finish_origin_move`),
        its record saying that ``origin`` meanwhile."""
        self._store = _store.for_lock(self.session, self.sidecar, mode, backend)
        """Where the holder lives: the sidecar, or the store a backend names (etcd)."""
        self._key = _registry.in_store(self._key, self._store.space)

    # -- state -------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this process holds the session through this object."""
        return self._count > 0 and self._pid == _identity.ME.pid

    @property
    def info(self) -> HolderInfo | None:
        """The holder's record as it stands, while held (the sidecar's copy may lag its
        fingerprint and heartbeat by up to `RECORD_LAG` in the write phase)."""
        if not self.held:
            return None
        return self._info or self._completed_info(self._info_shell())

    def _info_shell(self) -> _record._Unfinished:
        """The part of `info` that is the same for every run of this object in this
        process (`_record.info_shell`)."""
        me = _identity.ME
        fixed = self._shell_fixed
        if fixed[1] != me.pid:  # a forked child's are its own
            fixed = self._shell_fixed = (
                self.session, me.pid, me.host, me.start, self.lane, str(self.fence_mode),
                self.origin,
            )
        return _record.info_shell(*fixed)

    def _record_now(self) -> HolderInfo | None:
        """The record of the run this object is starting or ending (None before its
        first), for a contender of this process that finds it neither held nor free;
        not kept (`info` is the held run's)."""
        return self._completed_info(self._info_shell(), keep=False) if self._run_id else None

    def _completed_info(self, shell: _record._Unfinished, keep: bool = True) -> HolderInfo:
        run_id, heartbeat_at, phase, fp = self._run_id, self._heartbeat_at, self._phase, self._fp
        extra = self._store.record_extra
        if extra is not None:
            unfinished: Any = shell
            unfinished.extra = dict(extra)
        info = _record.completed(
            shell, HELD, run_id, self._token, self._acquired_at, heartbeat_at, phase, fp,
            self._previous,
        )
        if keep:
            self._info = info
            # A thread asking for the holder's record (an in-process contender, say) may
            # build it as the holder's thread changes a field and drops the one kept:
            # then this one is already old, and is not kept. (Every change sets the
            # field first, then drops the record kept; so this keeps it first, then
            # looks.)
            if (self._heartbeat_at is not heartbeat_at or self._phase is not phase
                    or self._fp is not fp or self._run_id is not run_id):
                self._info = None
        return info

    def _encode(self, state: State = State.HELD) -> bytes:
        fp = self._fp
        if fp is not self._fp_bytes[0]:
            self._fp_bytes = (fp, _record.fingerprint_bytes(fp))
        middle = self._middle  # the run's, unless the fixed part changed since
        return _record.assemble(
            state, WRITE if self._line_going_in else self._phase, self._token,
            middle[2] if middle[0] is self._run_id else self._prepare_record(self._run_id),
            self._acquired_at, self._heartbeat_at, self._fp_bytes[1], self._previous,
        )

    def _prepare_record(self, run_id: str) -> bytes:
        """The record's part that run ``run_id`` does not change (`_record.middle`),
        encoded once: an acquire calls this before waiting, so that it costs the
        hand-off nothing."""
        middle, static = self._middle, self._static_part()
        if middle[0] is not run_id or middle[1] is not static:
            tail = self._tail
            if tail[0] is not static:
                tail = self._tail = (static, _record.middle_tail(static))
            middle = self._middle = (run_id, static, _record.middle_of(run_id, tail[1]))
        return middle[2]

    def _static_part(self) -> str:
        """The record's fixed fields as this process writes them (`_record.static_part`)."""
        pid = _identity.ME.pid
        if self._static_pid != pid:
            me = _identity.ME
            self._static = _static_part(
                pid=pid, host=me.host, start=me.start, session=self.session, lane=self.lane,
                fence=self.fence_mode, origin=self.origin,
            )
            self._static_pid = pid
        return self._static

    def _rewrite(self, **changes: Any) -> None:
        """Update some record fields and write the record again (or change nothing)."""
        before = {name: getattr(self, name) for name in changes}
        try:  # an interrupt among the changes puts them back too
            for name, value in changes.items():
                setattr(self, name, value)
            self._write_record()
        except BaseException:
            for name, value in before.items():
                setattr(self, name, value)
            # It may have been built from the changes, which the record may hold: the
            # next append or the release writes the record as it now is.
            self._info, self._phase_said = None, False
            raise

    def _write_record(self) -> None:
        # Under the object's own lock, so a heartbeat from another thread can never
        # write through a descriptor that release() has just closed; and only while
        # held (`release` may not take that lock: see there). A signal handler's write
        # in the middle of one of this thread's is left to the next write (the fields
        # it changed are set: waiting would be for itself); its release is done as the
        # write ends.
        if threading.get_ident() in self._io_writers:
            return
        with self._io_held():
            if not self._count:
                raise NotHeldError(f"{self.session}: released while the record was updated")
            self._store.write(self)

    @contextmanager
    def _io_held(self) -> Iterator[None]:
        """``_io`` for a record write, this thread noted in ``_io_writers`` from before
        it is taken until after it is let go; a release a signal handler of this thread
        deferred meanwhile is done at the end (an append's, as the append ends)."""
        me = threading.get_ident()
        try:
            self._io_writers.add(me)
            with self._io:
                yield
        finally:
            self._io_writers.discard(me)
            if self._release_deferred == me and self._appending != me:
                self._deferred_release()

    def _forget_in_child(self) -> None:
        # The inherited descriptor itself is closed by _forkguard's hook.
        self._store.forget_in_child()
        self._count, self._info = 0, None
        self._io = threading.Lock()  # another thread may have held it at the fork
        self._append_mu = threading.Lock()
        self._appending, self._release_deferred, self._io_writers = 0, 0, set()
        self._pid = -1  # marks "inherited through fork": release() becomes a no-op

    @staticmethod
    def check_lane(lane: str) -> None:
        """Raise ValueError for a lane no record can carry: empty or blank (status would
        show no lane), longer than `_record.MAX_TEXT` characters, or not valid UTF-8
        text (a name with bytes that are not UTF-8, as ``os.fsdecode`` gives them, would
        reach the record as escapes of lone surrogates, which strict JSON readers
        reject)."""
        _check_text("lane", lane, "name the lane (for example 'cron' or 'heartbeat')")
        if not lane.isascii():
            try:
                lane.encode()
            except UnicodeEncodeError:
                try:
                    raw = lane.encode("utf-8", "surrogateescape")
                    shown = "'" + raw.decode("utf-8", "backslashreplace") + "'"
                except UnicodeEncodeError:
                    shown = ascii(lane)
                raise ValueError(
                    f"lane {shown} is not valid UTF-8 text; name lanes in UTF-8"
                ) from None

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"<SessionLock {self.session!r} lane={self.lane!r} {state}>"

    def _backend_url(self) -> str | None:
        """The URL of the holder store (etcd) this lock lives in; None for its sidecar."""
        url = getattr(getattr(self._store, "holder", None), "url", None)
        return None if url is None else str(url.text)

    # -- acquire / release -------------------------------------------------------

    def acquire(
        self, *, timeout: float | Literal["default"] | None = "default"
    ) -> HolderInfo:
        """Take the session; returns the record written. Reentrant for the same owner."""
        # Built before any wait: what is left once the lock comes is quicker to do.
        shell = self._info_shell()
        wait = self.timeout if timeout == "default" else _wait.limit(timeout)
        me = _whoami()
        mine = self._count if self._owner == me and self._pid == _identity.ME.pid else 0
        try:
            self._enter(me, wait)
            return self._info or self._completed_info(shell)
        except BaseException:
            try:
                self._give_back(me, mine)
            except BaseException:  # one that landed as it was entered: once more
                self._give_back(me, mine)
                raise
            raise

    def _enter(self, me: object, wait: float | None) -> None:
        if self._count and self._owner == me and self._pid == _identity.ME.pid:
            self._again()
        else:
            self._acquire(me, None if wait is None else time.monotonic() + wait, None)

    def _again(self) -> None:
        """One more acquire by the run's owner (reentrant): `HolderLostError` instead
        when the run is known to have lost its holder (an etcd lease)."""
        self._store.check()
        self._count += 1

    def _refuse_unwalked(self) -> None:
        """The walk of the session's directory stopped short: a component is missing, or
        cannot be searched. Missing (or made since the walk), the directory is not
        opened, as a name made from here on may be another user's symlink that an open
        would go through: the store's missing-directory error, and the path is walked
        again at the next acquire. Unsearchable, the store's own open says so."""
        try:
            os.stat(os.path.dirname(self.session))
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError:
            return
        raise self._store.missing_directory(self)

    def _walk_again(self) -> None:
        """This object was made while the session's directory had a missing component:
        walk the path again (`ForeignSymlinkError` if another user has made that name
        since, as a symlink of theirs). The object keeps the key it was made with: a
        thread of it may be waiting for the session under that key."""
        self._walked = _session_facts(self.session)[2]

    def _give_back(self, me: object, mine: int) -> None:
        """An exception escaped an acquire that had taken the session (an interrupt:
        KeyboardInterrupt, a signal handler's exception, landing as it returned): the
        caller never learns it holds, and ``with`` never runs its exit. Give back what
        this acquire took: ``mine`` is the owner's count before it."""
        if self._count > mine and self._owner == me and self._pid == _identity.ME.pid:
            self.release()

    def _acquire(
        self, me: object, deadline: float | None, cancel: threading.Event | None,
        only_if_free: bool = False,
    ) -> bool:
        """Take the session for ``me``: True once taken. With ``only_if_free``, only if
        nothing holds it this moment, in this process or another (`acquire_async` tries
        so before it starts a thread to wait in): False, having waited for nothing, when
        something does or the store cannot tell without waiting (etcd)."""
        start = time.monotonic()
        attempt = object()
        if not self._walked:
            self._walk_again()
            if not self._walked:
                self._refuse_unwalked()
        # Every step inside the try, so that an interrupt (KeyboardInterrupt, a
        # cancellation) landing anywhere leaves neither the slot nor the lock behind.
        try:
            if not only_if_free:
                _take_slot(self._key, self, self.on_contention == "fail", deadline, cancel,
                           start, attempt)
            elif not _registry.take_if_free(self._key, self, attempt):
                return False
            self._slot_attempt = attempt
            self._only_if_free = only_if_free
            try:
                taken = self._store.acquire(self, me, deadline, cancel, start, only_if_free)
            except MoveToFinish:  # (only if free) the caller's thread finishes it
                _free_slot(self._key, self, attempt)
                return False
            if taken:
                if self._finishing is not None:
                    try:
                        self._finish_origin_move()
                    except BaseException:
                        # (A warning made an error, an interrupt) not returned as held:
                        # given back here, also for a caller that cannot (a thread's).
                        if self._count == 1:
                            self.release()
                        raise
                return True
            _free_slot(self._key, self, attempt)  # held elsewhere: nothing was taken
            return False
        except BaseException:
            if self._finishing is not None:  # (an acquire that failed after the look)
                self._finishing = None
                self._set_origin(None)
            # Only a slot this attempt took: while another owner (thread, task) holds
            # this object or is acquiring it, the slot, the object's one, is theirs.
            if not self._count:
                def free() -> None:
                    _registry.free_surely(self._key, self, attempt)

                try:
                    _cleanup.to_the_end(free)
                except BaseException:  # one that landed as it was entered: once more
                    _cleanup.to_the_end(free)
                    raise
            raise

    def _follow_last_run(self, last: tuple[str, int] | None, stale_origin: str | None) -> None:
        """The store's acquire is about to write this run's first record over the last
        run's (``last``: its run id and token, None where unknown; ``stale_origin``: the
        ``origin`` of a stale record), before it takes the session's fingerprint. A
        recover killed (SIGKILL) after it named a fresh session but before it marked
        the session it moved (docs/PROTOCOL.md 5.1) left that record as the only trace of
        the move; written over, the conversation would split (runs of this session
        writing here, runs of the fresh one there). So the move is finished first: for
        a run of the moved session, where the last run's fresh session exists
        (`_recovery.finish_for_next_run`; the sidecar store asks only where the recover
        set its moving bit, `_sidecar.MOVING`); for a run of a fresh session whose
        maker's run was killed (``stale_origin``, this run's own record saying that
        origin until the move is finished, `_finish_origin_move`). Only where the mark
        can be set (Linux, Python's extended attributes)."""
        if not _moved.CAN_MARK:
            return
        if stale_origin is not None and self.origin is None:
            try:
                named = stat.S_ISREG(os.lstat(self.session).st_mode)
            except OSError:
                named = False
            # (A fresh session its maker never named is no move; nor is a session a
            # caller made with an ``origin`` of its own, nor one a recover made for a
            # holder with no record, which it never marks.)
            if named:
                if self._only_if_free:  # (before the look: a probe may wait)
                    raise MoveToFinish(self.session)  # nothing written yet: a thread looks
                if self._moved_here_from(stale_origin):
                    self._finishing = stale_origin
                    self._set_origin(stale_origin)
        if last is not None:
            fresh = _successors.made(self.session, *last)
            if fresh is not None:
                if self._only_if_free:
                    raise MoveToFinish(self.session)
                from fencelock import _recovery  # (imports this module)

                _recovery.finish_for_next_run(self.session, fresh, self._backend_url())

    def _moved_here_from(self, origin: str) -> bool:
        """Whether this session is the fresh session a recover made for the last run of
        ``origin``: ``origin``'s mark names it, or ``origin``'s record is still that run's
        (`_successors.of_run`)."""
        if _moved.target(origin) == self.session:
            return True
        from fencelock import _probe  # (its lock code imports this module)

        try:
            record = _probe.probe(origin, backend=self._backend_url()).record
        except (FenceLockError, OSError):
            return False
        return record is not None and \
            _successors.of_run(origin, record.run_id, record.token) == self.session

    def _set_origin(self, origin: str | None) -> None:
        """Write ``origin`` in this object's records from now on (the encoded parts
        made anew)."""
        self.origin = origin
        self._static_pid = 0
        self._middle = ("", "", b"")
        self._shell_fixed = ("", 0, "", "", "", "", None)
        self._info = None

    def _finish_origin_move(self) -> None:
        """`_follow_last_run`'s move of ``_finishing`` to this session, finished as the
        acquire ends, the session held (`_recovery.finish_as_first_run`): then the
        record says no ``origin`` again. (Killed before that, the run leaves its stale
        record naming the origin, and the next acquire finishes the move.)"""
        origin, self._finishing = self._finishing, None
        assert origin is not None
        try:
            from fencelock import _recovery  # (imports this module)

            _recovery.finish_as_first_run(self, origin)
        finally:
            self._set_origin(None)
        with contextlib.suppress(FenceLockError, OSError):
            self._write_record()

    def _session_fingerprint(self) -> Fingerprint | None:
        """The session's fingerprint at acquire; the last one's object again if nothing
        moved. `PlantedFileError` for another user's session file in a directory anyone
        can write to: the run (or `fencelock run`'s command) would write into it, and
        the acquire would set its token mark."""
        if self.fence_mode is STAT:
            try:
                st = os.lstat(self.session)
            except FileNotFoundError:
                return None
            except OSError:
                pass  # take() below reports it
            else:
                if stat.S_ISREG(st.st_mode):
                    if st.st_uid != _sidecar.OWN_UID and st.st_uid:
                        _sidecar.refuse_planted(self.session, st)
                    if self._copies_up:
                        _fingerprint.copy_up(self.session)
                        return _fingerprint.take(self.session, STAT)
                    last = self._fp
                    # The last one's object again if nothing moved, else from this stat
                    # (not one an append left: its witness is for that run's checks).
                    if last is not None and last.witness is None and \
                            _fence._stat_matches(last, st):
                        return last
                    return _fingerprint.from_stat(st)
        fp = _fingerprint.take(self.session, self.fence_mode)
        if fp is not None:
            _sidecar.refuse_planted_at(self.session)
        return fp

    def release(self) -> None:
        """Give the session back (once per acquire). A forked child never releases.
        With the sidecar store, a release after a hold of a millisecond or more yields
        the CPU once right after unlocking, so that a waiter woken on this CPU goes first.

        Any thread or task of the holding process may call it, as with
        `threading.Lock`: ``await asyncio.wait_for(lock.acquire_async(), t)`` acquires in
        a task of its own, and the caller's task then releases.
        """
        if self._pid != _identity.ME.pid or self._count == 0:
            if self._pid == -1 or (self._count and self._pid != _identity.ME.pid):
                return  # inherited through fork: the parent's to release
            raise NotHeldError(f"{self.session}: release() without a matching acquire()")
        self._count -= 1
        if self._count:
            return
        if (self._appending or self._io_writers) and (
                self._appending == threading.get_ident()
                or threading.get_ident() in self._io_writers):
            # A signal handler (or a finaliser) of this thread, in the middle of an
            # append, a fence check or a record write: that cannot be waited for, and
            # its line must not land after the release. Done as it ends.
            self._count, self._release_deferred = 1, threading.get_ident()
            return
        try:
            quick = waited = False
            try:
                # An append under way in another thread ends before the release, so
                # that its line is not written after it: it notes itself in
                # ``_appending``, then checks that the lock is held; this has set
                # ``_count`` to 0, then looks (the same pairing as ``_io``'s, below).
                if self._appending or not _GIL:
                    self._await_append()
                waited = True
                # A record write from another thread takes ``_io``, then checks that the
                # lock is held; this has set ``_count`` to 0, then looks at ``_io``. With
                # one thread running Python at a time one of the two sees the other: if
                # ``_io`` is free here, no write can land after the release. Taking the
                # lock would cost the hand-off to a waiter ~10 us after a long hold
                # (a mutex cold after a model call), before the unlock.
                quick = _GIL and self._store.releases_in_place and not self._io.locked()
            finally:  # released even if an interrupt lands before ``quick`` is set
                try:
                    if not waited and (self._appending or not _GIL):
                        self._await_append()  # an interrupt came first: still after it
                    if quick:
                        self._store.release(self)
                    else:
                        with self._io:
                            self._store.release(self)
                except BaseException:
                    # An interrupt (KeyboardInterrupt, a signal handler's exception)
                    # that landed as the store's release began, before it let go:
                    # nothing else would let go until the process exits.
                    if self._store.holding():
                        with self._io, contextlib.suppress(Exception):
                            self._store.release(self)
                    raise
        finally:
            attempt = self._slot_attempt  # the run's: its slot is handed on to a later one
            try:
                self._run_ended(attempt)
            except BaseException:  # the same, at its start: the slot must be freed
                _cleanup.to_the_end(lambda: _registry.free_surely(self._key, self, attempt))
                raise

    def _await_append(self) -> None:
        """Wait for an append under way in another thread (not in this one: a signal
        handler that releases in the middle of an append cannot wait for it). An
        interrupt (Ctrl-C) does not cut the wait short, or the line would land after
        the release: it is raised once the append has ended (an append is bounded: a
        fence check, a write, an fsync, a record update)."""
        if self._appending == threading.get_ident():
            return
        interrupt: BaseException | None = None
        while True:
            try:
                with self._append_mu:
                    pass
                break
            except BaseException as e:
                interrupt = interrupt or e
        if interrupt is not None:
            raise interrupt

    # -- sharing the lock with a command (`fencelock run`) ---------------------------

    def _shared_fd(self) -> int:
        """The locked descriptor, for `fencelock run` to pass to the command it starts:
        a flock lock belongs to the open file description, so the command (and whatever
        it leaves running with the descriptor) holds the session with this process.
        -1 when the holder lives in a store (etcd): there is no descriptor to share."""
        self._require()
        return self._store.share_fd()

    def _name_command(self, pid: int) -> None:
        """Add ``command`` (the pid and start of the process that shares the lock) to
        the record, so a holder whose own process was killed is still named."""
        self._require()
        static = self._static_part() + _record.command_part(pid, _identity.process_start(pid))
        with self._io:  # (no call inside: no signal handler runs in it)
            self._static = static
            self._middle = ("", "", b"")  # encoded again with the command in it
        self._write_record()

    def _release_shared(self, kept: bool = False) -> None:
        """Like `release`, for a lock shared with a command: mark the record released
        and close this process's descriptor without unlocking. LOCK_UN would free the
        session for every process sharing the descriptor; closing frees it only once
        the last of them has closed it (or exited).

        With a store (etcd), ``kept`` says that the `fencelock run` keeper
        (`_etcdkeeper`) keeps this process's lease alive for what the command left
        running: the holder then stays in the store, its record released, and the keeper
        revokes the lease when they are gone. Without ``kept``: a plain release."""
        if self._pid != _identity.ME.pid or self._count != 1 or not (
            self._store.shares_fd or kept
        ):
            self.release()
            return
        self._count = 0
        try:
            with self._io:
                self._store.release_shared(self)
        finally:
            self._run_ended(self._slot_attempt)

    def _set_torn_tail_aside(self) -> None:
        """Before `fencelock run` starts its command, which appends to the session
        itself: move a torn last line aside, as this run's first `append` would
        (`_fence.set_torn_tail_aside`), and take the session as it then is as the fence
        point."""
        with self._append_mu:
            self._require()
            if self._tail_checked:
                return
            self._raise_if_moved()  # as its first append would
            fp = _fence.set_torn_tail_aside(self.session, self._fp, self.fence_mode,
                                            self.mode, self._token)
            self._tail_checked = True
            if fp is not self._fp:
                self._fp, self._info = fp, None
                self._store.fence_moved(self)

    def _follow_session(self) -> bool:
        """At the end of a `fencelock run`: its command wrote the session itself, outside
        the fence, and those writes are the run's own. Take the session as the run leaves
        it as the fence point, so that the released record's fingerprint is exact (a
        probe would read them as written by someone else after the release). False when
        nothing moved, or where the session cannot be read (the record keeps its own)."""
        try:
            fp = _fingerprint.take(self.session, self.fence_mode,
                                   opened=self._store.opens_session)
        except (OSError, FenceLockError):
            return False
        if fp == self._fp:
            return False
        self._fp, self._info = fp, None
        return True

    def _run_ended(self, attempt: object) -> None:
        """After the last release of a run (its acquire ``attempt``): its slot is free,
        its callbacks forgotten."""
        self._info = None
        if self._abort_callbacks:
            self._abort_callbacks = []
        _free_slot(self._key, self, attempt)

    def __enter__(self) -> SessionLock:
        me = _whoami()
        mine = self._count if self._owner == me and self._pid == _identity.ME.pid else 0
        try:
            self._enter(me, self.timeout)
        except BaseException:
            try:
                self._give_back(me, mine)
            except BaseException:  # one that landed as it was entered: once more
                self._give_back(me, mine)
                raise
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is GeneratorExit:
            self._exit_closed()
        else:
            self.release()

    def _exit_closed(self) -> None:
        """The exit of a ``with`` block in a generator or coroutine being closed: by its
        program (given back at once), or by the garbage collector, which closes a dropped
        one in whatever thread a collection starts, at any point: perhaps in the middle
        of the registry's mutex, which a release takes. While that mutex is taken (this
        thread's, or another's for an instant) it is given back from a thread of its
        own."""
        if _registry.busy():
            self._give_back_closed(self._run_id)
        else:
            self.release()

    # -- asyncio -----------------------------------------------------------------

    def acquire_async(
        self, *, timeout: float | Literal["default"] | None = "default"
    ) -> Coroutine[Any, Any, HolderInfo]:
        """Like `acquire` (``timeout`` too), but waiting happens off the event loop and
        can be cancelled. A session nothing holds is taken on the loop, with the sidecar
        store's few system calls (its release makes them there too); waiting for it, or
        any acquire from etcd, runs in a thread of its own.

        The owner (for reentrancy) is the task that calls it, also where the waiting runs
        in a task of its own: ``asyncio.wait_for`` makes one on Python 3.11, and that
        task's end would otherwise leave the lock owned by no task, so that the caller's
        own ``async with lock`` then waited for itself."""
        wait = self.timeout if timeout == "default" else _wait.limit(timeout)
        return self._acquire_async(_whoami(), wait)

    async def _acquire_async(self, caller: object, wait: float | None) -> HolderInfo:
        import asyncio

        # Called outside any task (the coroutine made before a loop runs it): the task
        # that runs it.
        me = _whoami() if isinstance(caller, _ThreadOwner) else caller
        if self.held and self._owner == me:
            self._again()
            info = self.info
        elif self._store.tries_in_place and self._taken_if_free(me):
            info = self._info or self._completed_info(self._info_shell())
        else:
            deadline = None if wait is None else time.monotonic() + wait
            cancel = threading.Event()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[HolderInfo | None] = loop.create_future()
            # A thread of its own, not the loop's default executor: waits can last
            # minutes, and a few of them would starve to_thread() and getaddrinfo().
            try:
                threading.Thread(
                    target=self._acquire_for, args=(loop, future, me, deadline, cancel),
                    name="fencelock-acquire", daemon=True,
                ).start()
            except RuntimeError:  # "can't start new thread": a limit reached
                raise no_thread(self.session, "acquire_async") from None
            try:
                await asyncio.shield(future)  # a cancel leaves the attempt to end below
            except (asyncio.CancelledError, GeneratorExit) as stop:
                cancel.set()  # from here the attempt gives back a lock that arrives
                delivered = future.result() if future.done() and \
                    future.exception() is None else None
                _registry.wake()  # (takes no mutex: this may be a thread inside it)
                if isinstance(stop, GeneratorExit):
                    # Closed, not cancelled (``coro.close()``, or a dropped task's
                    # coroutine finalized by the garbage collector, in any thread, perhaps
                    # one inside the registry's mutex): nothing can be awaited. A lock
                    # delivered meanwhile is given back in a thread; a later one the
                    # attempt gives back itself.
                    if delivered is not None:
                        self._give_back_closed(delivered.run_id)
                    raise
                if future.done():
                    if delivered is not None:
                        # Cancelled as it was delivered: given back before the task ends.
                        await _briefly(self._give_back_delivered(loop, delivered.run_id),
                                       self._store.cancel_grace)
                    raise
                # The attempt notices ``cancel`` soon; the caller is told it was cancelled
                # once it has ended, so that nothing is taken (a record written) after,
                # unless it takes longer than the store's ``cancel_grace`` (an etcd
                # that does not answer): it then ends on its own, giving back what arrives.
                await _briefly(future, self._store.cancel_grace)
                raise
            # The record as acquired: another task may already have released the lock
            # (any task of the holding process may) before this one resumed.
            info = future.result()
        assert info is not None
        return info

    def _taken_if_free(self, me: object) -> bool:
        """For `acquire_async`: take the session here, on the event loop, if nothing
        holds it (the sidecar's few system calls, as its release makes there); False, with
        nothing waited for, when something does: a thread then waits for it."""
        try:
            return self._acquire(me, None, None, only_if_free=True)
        except BaseException:  # an interrupt as it was taken: the caller never learns it
            self._give_back(me, 0)
            raise

    def _acquire_for(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[HolderInfo | None],
        me: object,
        deadline: float | None,
        cancel: threading.Event,
    ) -> None:
        """Acquire in a helper thread and hand the outcome to the awaiting task. A lock
        the task does not take (it gave up as the lock came, or its loop was closed
        before it could be told) is given back here, off the event loop: a release
        may wait for its store (etcd)."""
        info = None
        try:
            shell = self._info_shell()
            self._acquire(me, deadline, cancel)
            info = self._info or self._completed_info(shell)  # as `acquire` returns it
            error: BaseException | None = None
        except BaseException as e:
            error = e
        taken: list[bool] = []
        told = threading.Event()

        def deliver() -> None:
            try:
                if cancel.is_set():  # the task gave up: the attempt is over
                    taken.append(False)
                    if error is not None and not future.done():
                        future.set_result(None)  # (with a lock, once it is given back)
                elif error is None:
                    future.set_result(info)
                    taken.append(True)
                else:
                    future.set_exception(error)
            finally:
                told.set()

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
        else:
            if error is not None:
                return
            # Until the task has it: a loop stopped and closed before it ran `deliver`
            # (a program that drives its own loop) leaves nobody to release the lock.
            while not told.wait(_CLOSED_LOOP_POLL):
                if loop.is_closed() and not told.is_set():
                    break
            if taken and taken[0]:
                return
        if error is not None:
            return
        self._release_unwanted()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_settle, future)  # the cancelled task ends now

    def _give_back_delivered(
        self, loop: asyncio.AbstractEventLoop, run_id: str
    ) -> asyncio.Future[None]:
        """Release run ``run_id``, delivered to a task that was cancelled before it
        resumed; where the store's release may wait (etcd), in a thread of its own
        (`_in_a_thread`), so that the event loop runs on. The future is done once it is
        given back: the task waits for it (at most the store's ``cancel_grace``), as
        ``async with`` waits for its release."""
        if not self._store.releases_in_place:
            return _in_a_thread(loop, lambda: self._release_unwanted(run_id))
        self._release_unwanted(run_id)
        done: asyncio.Future[None] = loop.create_future()
        done.set_result(None)
        return done

    def _give_back_closed(self, run_id: str) -> None:
        """Release run ``run_id`` for a generator or coroutine being closed (an
        `acquire_async` it was delivered to before it resumed, a ``with`` block's exit
        run while the registry's mutex is taken, an etcd ``async with``'s), in a thread:
        the closing thread may be the garbage collector's, anywhere, the registry's
        mutex taken, which the release takes. Where no thread can be had, here (nothing
        else would)."""
        try:  # a bare thread: `threading`'s own locks may be what this one is inside
            _thread.start_new_thread(self._release_closed, (run_id,))
        except RuntimeError:
            self._release_closed(run_id)

    def _release_closed(self, run_id: str) -> None:
        with _closing:  # one at a time: the blocks of a re-entrant hold, each its own
            self._release_unwanted(run_id)

    def _release_unwanted(self, run_id: str | None = None) -> None:
        """Release a lock that a cancelled task did not take (nor its event loop, closed):
        given ``run_id``, only while that run holds (another task of this process may
        have released it, and the object been taken again, since it was delivered).
        A release that fails is reported as a warning: the task's answer is its
        cancellation."""
        if run_id is not None and (not self.held or self._run_id != run_id):
            return
        try:
            self.release()
        except Exception as e:
            warn_each_time(
                f"{self.session}: the session that came to a cancelled task could not be "
                f"given back cleanly: {e}", stacklevel=1)

    def __aenter__(self) -> Coroutine[Any, Any, SessionLock]:
        return self._entered(_whoami())  # owned by the caller's task, as acquire_async

    async def _entered(self, caller: object) -> SessionLock:
        await self._acquire_async(caller, self.timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The sidecar's release waits for an append another thread is writing, for its
        # write and fsync: then not on the event loop either.
        another_appends = self._appending and self._appending != threading.get_ident()
        if self._store.releases_in_place and (
                not another_appends or exc_type is GeneratorExit):
            self.__exit__(exc_type, exc, tb)
            return
        if exc_type is GeneratorExit:  # being closed: nothing can be awaited
            self._give_back_closed(self._run_id)
            return
        # It may wait for etcd to come back (up to the lease's time to live): not on the
        # event loop, nor in the loop's default executor (see `acquire_async`).
        import asyncio

        await _in_a_thread(asyncio.get_running_loop(), self.release)

    # -- the fence ---------------------------------------------------------------

    def _require(self) -> None:
        if not self.held:
            raise NotHeldError(f"{self.session}: this SessionLock does not hold the session")

    def append(self, entry: dict[str, Any] | str, *, stamp: bool | None = None) -> None:
        """Write one fenced, fsynced JSONL line; `SessionTakeoverError` if the fence moved."""
        self._require()
        self._append_bytes(self._line(entry, stamp))

    def _line(self, entry: dict[str, Any] | str, stamp: bool | None) -> bytes:
        """The line `append` writes for ``entry`` (held: a stamp takes this run's token);
        `FenceLockError` for an entry it refuses, before anything is written."""
        use_stamp = self.stamp if stamp is None else stamp
        try:
            return _fence.encode_entry(entry, (self._token, self._run_id) if use_stamp else None)
        except FenceLockError as e:  # which session: a gateway logs many
            raise FenceLockError(f"{self.session}: {e}") from None

    def _append_bytes(self, data: bytes) -> None:
        # One append at a time per holder: another thread's line landing between this
        # one's fence check and its write would read as a foreign write.
        me = threading.get_ident()  # before the mutex: a handler there finds it unset
        if self._appending == me:  # a signal handler's, in the middle of this thread's
            raise FenceLockError(
                f"{self.session}: an append of this thread is under way (a signal "
                f"handler's append in the middle of it?); nothing was written")
        try:
            with self._append_mu:
                self._appending = me
                try:
                    self._append_locked(data)
                finally:
                    self._appending = 0
        finally:  # once `_append_mu` is free: the release may wait for other appends
            if self._release_deferred:
                self._deferred_release()

    def _append_locked(self, data: bytes) -> None:
        self._require()
        self._store.check()  # a holder that may be lost writes nothing
        if self._takeover[1] is not None:
            self._raise_if_taken_over()
        check_tail, self._tail_checked = not self._tail_checked, False
        moved: list[Fingerprint | None] = []
        # A record in the prompt phase says its fingerprint is exact (PROTOCOL 2.4): it
        # says the write phase while the line goes in, until the record follows it.
        prompt = self._phase is PROMPT
        try:
            if prompt:
                self._line_going_in = True
                self._store.leave_prompt_said(self)
            # It refuses a session a recover moved (before this run took it, or while it
            # ran: its lines would be read by nobody), looking at the mark each time: the
            # mark moves the session's ctime, but within the clock's tick after a write
            # the stat fence cannot tell (and the content fence looks at no ctime).
            fp = _fence.append(
                self.session, data, self._fp, self.fence_mode,
                check_tail=check_tail, file_mode=self.mode, token=self._token, moved=moved,
            )
        except BaseException as e:
            self._line_going_in = False
            # A line taken back (a failed write, an interrupt) moves the session's stat:
            # the fence point follows (`_fence.append` put it in ``moved``; no call
            # before it here, where an interrupt could land), and so does the record.
            if moved:
                self._fp = moved[-1]
                self._store.fence_moved(self)
            elif prompt and isinstance(e, SessionTakeoverError) and self._phase is PROMPT:
                # Another's write found: the record says the prompt phase again, with
                # the fence point a reader compares the session with. (After any other
                # failure it stays in the write phase until the window's end.)
                with contextlib.suppress(FenceLockError):
                    self._write_record()
            if type(e) is SessionTakeoverError:
                self._raise_if_lost(e)
                self._raise_if_moved(e.expected, e.actual, e.stored, e)
                self._takeover = (self._run_id, (e.expected, e.actual, e.found))
            elif type(e) is SessionMovedError and not e.stored:
                later, carried = self._move_said(e.moved_to)
                if later or carried:
                    raise SessionMovedError(e.session, e.moved_to, e.expected, e.actual,
                                            later=later, carried=carried) from None
            raise
        self._line_going_in = False
        self._tail_checked = True
        self._wrote_in = self._run_id
        before, self._fp = self._fp, fp  # no call between: an interrupt lands after
        try:
            self._heartbeat_at = time.time()
            self._store.appended(self, before)
        except BaseException:  # an interrupt before the store heard of it
            self._store.fence_moved(self)
            raise

    def _raise_if_lost(self, takeover: SessionTakeoverError) -> None:
        """`HolderLostError` in place of ``takeover`` where the store knows this run's
        holder is lost (an etcd lease that lapsed while the run was paused between its
        check and its write): the other writer is the run that took the session over,
        not one outside the protocol, and the line may be in the file after its lines."""
        try:
            self._store.check()
        except HolderLostError as lost:
            raise HolderLostError(self.session, lost.why, bool(takeover.stored)) from takeover
        except FenceLockError:
            pass  # the takeover says what is known

    def _raise_if_moved(
        self, expected: Fingerprint | None = None, actual: Fingerprint | None = None,
        stored: bool = False, takeover: SessionTakeoverError | None = None,
    ) -> None:
        """`SessionMovedError` where a recover's mark on the session names the fresh
        session it moved the conversation to (`_moved`); in place of ``takeover`` where
        the mark moved the ctime the fence checked."""
        fresh = _moved.target(self.session)
        if fresh is not None:
            later, carried = self._move_said(fresh)
            raise SessionMovedError(self.session, fresh, expected, actual, stored,
                                    later, carried) from takeover

    def _move_said(self, fresh: str) -> tuple[bool, bool]:
        """How a move to ``fresh`` met this run (`SessionMovedError`'s ``later``,
        ``carried``): neither for the run the recover moved (the one whose fresh session
        ``fresh`` is: `_successors`, from its run id and token); for another, ``later``
        where it wrote nothing here, else ``carried`` (its lines went in before the
        mark, and the recover carries them)."""
        if not self._run_id or _successors.of_run(
                self.session, self._run_id, self._token) == fresh:
            return False, False
        wrote = self._wrote_in == self._run_id
        return not wrote, wrote

    def verify_fence(self) -> Fingerprint | None:
        """Raise `SessionTakeoverError` if the session moved since the last fence point."""
        self._require()
        self._store.check()
        return self._check_fence(self._store.opens_session)

    def _check_fence(self, opened: bool, *, move: bool = False) -> Fingerprint | None:
        """`_fence.check` against the fence point (moved to what it found if ``move``),
        after any append under way in another thread: its line is in the file before it
        moves the fence point. It counts as an append under way itself (``_appending``),
        so that a signal handler of this thread that releases does not wait for it (the
        release is done as the check ends); and a handler that checks in the middle of
        this thread's append or check checks at once (waiting would be for itself)."""
        me = threading.get_ident()
        if self._appending == me:
            return self._fence_check(opened, move)
        try:
            with self._append_mu:
                self._appending = me
                try:
                    return self._fence_check(opened, move)
                finally:
                    self._appending = 0
        finally:
            if self._release_deferred:
                self._deferred_release()

    def _deferred_release(self) -> None:
        """The release a signal handler asked for in the middle of this thread's append,
        fence check or record write, now that it has ended: made by that thread only,
        once (another thread's write ending meanwhile leaves it alone)."""
        if self._release_deferred != threading.get_ident():
            return
        self._release_deferred = 0
        self.release()

    def _fence_check(self, opened: bool, move: bool) -> Fingerprint | None:
        self._raise_if_moved()  # (as an append looks: each time)
        if self._takeover[1] is not None:
            self._raise_if_taken_over()
        try:
            fp = _fence.check(self.session, self._fp, self.fence_mode, opened, self._token)
        except SessionTakeoverError as e:
            if type(e) is SessionTakeoverError:
                self._takeover = (self._run_id, (e.expected, e.actual, e.found))
            raise
        if self.fence_mode is STAT and fp != self._fp:
            # A change of metadata alone (`_fence.metadata_only`): the fence point and
            # the record follow it, so the release says the session as it is.
            self._fp, self._info = fp, None
            self._store.fence_moved(self)
        elif move and fp != self._fp:
            # (An unchanged file keeps the fence point an append left: its witness lets
            # a later change of metadata alone, a hard link or chmod, be told from a write.)
            self._fp = fp
        return fp

    def _raise_if_taken_over(self) -> None:
        """The takeover this run found before, again (`_takeover`); a move a recover
        made since is said as the move (`SessionMovedError`, ``moved_to``)."""
        run, found = self._takeover
        if found is not None and run == self._run_id:
            expected, actual, what = found
            self._raise_if_moved(expected, actual)
            raise SessionTakeoverError(self.session, expected, actual, found=what)

    def touch(self) -> None:
        """Heartbeat: refresh ``heartbeat_at`` so the holder is not reported stuck."""
        self._require()
        self._rewrite(_heartbeat_at=time.time())

    @contextmanager
    def prompt_window(self) -> Iterator[SessionLock]:
        """The model-call window: still held, ``phase: "prompt"``, fence checked on exit."""
        self._require()
        # Where the holder lives in a store (etcd), the session may be on a filesystem
        # that other hosts write: its fingerprint comes from opening it (close-to-open).
        opened = self._store.opens_session
        self._check_fence(opened)
        inner = self._phase is PROMPT  # inside an open window: that one ends it
        if not inner:
            self._rewrite(_phase=PROMPT, _heartbeat_at=time.time())
        ours = False  # the body raised a fencelock error (a `HolderLostError` with `stored`)
        try:
            yield self
        except FenceLockError:
            ours = True
            raise
        finally:
            if not inner:
                # The window is over whatever lands next (no call before this): the
                # record, until written, says prompt while the run writes (`_phase_said`).
                self._phase, self._info, self._phase_said = WRITE, None, False
            held = self.held
            if held and not inner:
                self._heartbeat_at = time.time()
                if ours:
                    # The body's error goes on: this write's own (the holder found lost
                    # again, without the body's ``stored``) must not take its place. Any
                    # other error of the body's is the context of this write's.
                    with contextlib.suppress(FenceLockError):
                        self._write_record()
                else:
                    self._write_record()
        # Against the fence point, which the holder's own appends inside the window move.
        # A run released inside the window is over: whoever writes the session next is
        # no intruder into it (and the release wrote the write phase).
        if held:
            self._check_fence(opened, move=True)

    # -- recovery hook -----------------------------------------------------------

    def on_abort(self, callback: Callable[[], object]) -> None:
        """Register a callable that in-process `recover` calls to abort this run (the
        one held now, or else the next): the run's release forgets it."""
        self._abort_callbacks.append(callback)

    def superseded(self) -> str | None:
        """The fresh session a `recover` moved this run's conversation to (it found the
        run still holding the session past its wait), or the one the recover's mark on
        the session names (a move before this run took it: `_moved`); None otherwise.
        One lstat, and a listxattr where that finds none. A recover in another process
        does not stop the run (only `on_abort` callbacks of this process are called),
        and the turn it moved is re-fired in the fresh session: ask before writing the
        reply a long model call made (its appends there are refused from the mark on)."""
        self._require()
        from fencelock import _successors  # (its hash library: only where it is asked)

        return (_successors.made(self.session, self._run_id, self._token)
                or _moved.target(self.session))

    def _abort(self) -> None:
        """Called by `fencelock._registry.abort` (in-process `recover`): every callback
        is called; one that raises is reported as a warning (to the recover's caller)
        and stops neither the others nor the recovery, which then waits for the run to
        let go as for any run. For a run an asyncio task holds, whose loop runs in
        another thread, they are called in that loop (an `asyncio.Event`'s ``set``
        called from here would not wake it); those it has not run within `_IN_LOOP_WAIT`
        (a loop blocked, as a stuck run's may be) are called from here."""
        batch = _Callbacks(list(self._abort_callbacks))
        loop = self._owner_loop() if self._abort_callbacks else None
        if loop is not None:
            try:
                loop.call_soon_threadsafe(batch.run)
            except RuntimeError:  # closed since: all called here
                pass
            else:
                batch.ran.wait(_IN_LOOP_WAIT)
        batch.run()  # those the loop has not begun (after its run, if under way)
        for callback, error in batch.failed:
            warn_each_time(
                f"{self.session}: an on_abort callback ({callback!r}) raised "
                f"{type(error).__name__}: {error}", stacklevel=4)

    def _owner_loop(self) -> asyncio.AbstractEventLoop | None:
        """The running event loop of the asyncio task that holds the run, where this
        thread does not run it; None otherwise."""
        ref = getattr(self._owner, "loop", None)
        loop = ref() if ref is not None else None
        if loop is None or loop.is_closed() or not loop.is_running():
            return None
        import asyncio

        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        return None if here is loop else loop

