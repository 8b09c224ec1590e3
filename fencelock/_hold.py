"""`fencelock hold`: a session held on behalf of another process, over a JSON line protocol.

A caller that cannot take the lock itself (Node, a shell script) runs ``fencelock hold``
as a child and talks to it over its stdin and stdout: one JSON request per line in, one
JSON answer per line out. The lock, tokens, fence and durable appends are
`SessionLock`'s; this module only reads requests, calls it and writes answers.
docs/PROTOCOL.md states the protocol.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fencelock import _platform
from fencelock._constants import EXIT_CONTENDED, EXIT_ERROR, EXIT_OK
from fencelock._errors import (
    BadRequestError,
    FenceLockError,
    FenceLockWarning,
    HoldArgumentError,
    HolderLostError,
    SessionContendedError,
    SessionMovedError,
    SessionTakeoverError,
    SessionWriteError,
    session_lead,
)
from fencelock._json import (
    SPACE,
    RepeatedKeyError,
    digits_problem,
    kind,
    strict_loads,
    unique_keys,
)
from fencelock._signals import PromptHandlers, Seen, Stopped
from fencelock._tokens import STAMP_KEY

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from fencelock._lock import SessionLock
    from fencelock._record import HolderInfo

MAX_REQUEST = 8 * 1024 * 1024
"""The longest request line read, in bytes (newline excluded). A longer one is read
through and dropped, never kept whole, and answered with `BadRequestError`."""

_CHUNK = 64 * 1024
_QUEUED = 4
"""Requests queued ahead of the one being answered (the reader holds one more while it
waits for room, and the rest of its last read); the pipe buffers what follows."""

OPS = ("append", "prompt_begin", "prompt_end", "touch", "verify", "info", "superseded",
       "release")



class _CallerGone(Exception):
    """stdout is closed (EPIPE): nobody reads the answers any more. With ``error``,
    stdout failed otherwise (a full disk, an I/O error): said on stderr, exit 1."""

    def __init__(self, error: OSError | None = None) -> None:
        super().__init__(error)
        self.error = error


class _Refused(Exception):
    """A request refused (``error``) that is JSON all the same: its answer carries the
    id it gave (``echo``), as any refused request's does."""

    def __init__(self, error: BadRequestError, echo: dict[str, Any]) -> None:
        super().__init__(error)
        self.error, self.echo = error, echo


# -- reading requests --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Line:
    data: bytes


@dataclass(frozen=True, slots=True)
class _TooLong:
    length: int


_EOF = None
_Item = _Line | _TooLong | None


class _Inbox:
    """Reads stdin in a thread of its own: bounded lines, then end of file.

    Reading goes on while the lock is awaited, so that a caller that goes away before
    the session is held is noticed (`on_idle_eof`) instead of waited for.
    """

    def __init__(self, fd: int, limit: int = MAX_REQUEST) -> None:
        self.fd = fd
        self.limit = limit
        self.items: queue.Queue[_Item] = queue.Queue(_QUEUED)
        self._mu = threading.Lock()
        self._sent = 0
        self._idle_eof = False
        self._on_idle_eof: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="fencelock-hold-stdin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def on_idle_eof(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the reader thread, or now) if stdin ends before any
        request came."""
        with self._mu:
            if self._idle_eof:
                callback()
            else:
                self._on_idle_eof = callback

    def _put(self, item: _Item) -> None:
        if item is _EOF:
            with self._mu:
                if self._sent == 0:
                    self._idle_eof = True
                    if self._on_idle_eof is not None:
                        self._on_idle_eof()
        else:
            with self._mu:
                self._sent += 1
        self.items.put(item)

    def _read(self) -> bytes:
        while True:
            try:
                return os.read(self.fd, _CHUNK)
            except BlockingIOError:  # the caller made the pipe non-blocking: wait for data
                _platform.wait_ready((self.fd,), ())
            except OSError:
                return b""  # an unreadable stdin ends the conversation like a closed one

    def _run(self) -> None:
        buf = bytearray()
        scanned = 0
        skipped = -1  # >= 0: bytes of an over-long line dropped so far
        while True:
            chunk = self._read()
            if not chunk:
                if skipped >= 0:
                    self._put(_TooLong(skipped))
                elif buf:
                    self._put(_Line(bytes(buf)))  # a last request without its newline
                self._put(_EOF)
                return
            if skipped >= 0:
                end = chunk.find(b"\n")
                if end < 0:
                    skipped += len(chunk)
                    continue
                self._put(_TooLong(skipped + end))
                skipped = -1
                chunk = chunk[end + 1 :]
            buf += chunk
            start = 0
            while (end := buf.find(b"\n", max(start, scanned))) >= 0:
                if end - start > self.limit:
                    self._put(_TooLong(end - start))
                else:
                    self._put(_Line(bytes(buf[start:end])))
                start = end + 1
                scanned = 0
            del buf[:start]
            scanned = len(buf)
            if len(buf) > self.limit:  # no newline within the bound: drop it as it comes
                skipped = len(buf)
                buf.clear()
                scanned = 0


# -- writing answers ---------------------------------------------------------------------


def _encode(answer: dict[str, Any]) -> bytes:
    # ASCII only: a path's undecodable bytes or a lone surrogate are escaped, never sent
    # as invalid UTF-8. The default separators make every answer start with `{"ok": `.
    return json.dumps(answer, ensure_ascii=True).encode("ascii") + b"\n"


_LAST_ANSWER_WAIT = 1.0
"""How long the answer to a request that a stop signal came during waits for room in
stdout before hold stops without it (a caller that stopped reading must not keep hold
from stopping)."""
_PIPE_BUF = 4096
"""A write to a pipe that polls writable never blocks for up to this many bytes (a
terminal stopped with XOFF still may: it takes a key press there to resume)."""


class _Out:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._woken = -1, -1
        """A pipe a stop signal's handler writes a byte to while an owed answer waits
        for room (see `send_owed`); made by `prepare`."""

    def prepare(self) -> None:
        """Make the wake-up pipe, before any request is served: made when an append's
        answer is owed, a descriptor limit reached then would lose that answer though
        the line is in. (None to be had: answers wait as long as it takes, as on
        Windows.)"""
        if not _platform.WINDOWS:
            with contextlib.suppress(OSError):
                self._woken = os.pipe()
                for end in self._woken:
                    os.set_blocking(end, False)

    def send(self, answer: dict[str, Any]) -> None:
        """Write ``answer``'s line, waiting for room as long as it takes."""
        line = memoryview(_encode(answer))
        while line:
            try:
                line = line[os.write(self.fd, line) :]
            except BlockingIOError:  # the caller made the pipe non-blocking: wait for room
                _platform.wait_ready((), (self.fd,))
            except OSError as e:
                raise _gone(e) from None

    def send_owed(self, answer: dict[str, Any], seen: Seen) -> None:
        """Write the answer of a request that wrote, with stop signals noted, not
        raised: raised as a write returns, one would leave the line's end unsent, or
        have it sent twice. Once a stop signal has come, the answer waits for room in
        stdout only `_LAST_ANSWER_WAIT` more, so that a caller that no longer reads
        does not keep hold from stopping; a second signal ends the wait at once. The
        caller acts on the signal after."""
        if self._woken[0] < 0:
            # No wake-up pipe (Windows, where select takes no pipe and a write there is
            # never interrupted; or none could be made): as long as it takes.
            seen.deferred = True
            try:
                self.send(answer)
            finally:
                seen.deferred = False
            return
        woken, wake = self._woken
        line = memoryview(_encode(answer))
        give_up: float | None = None
        # Deferred first, then looked at: a signal before this is counted, one after it
        # also writes to the pipe, which wakes the wait to count it.
        seen.deferred, seen.wake = True, lambda: _poke(wake)
        try:
            while line:
                if seen.count and give_up is None:
                    give_up = time.monotonic() + _LAST_ANSWER_WAIT
                left = None  # no signal yet: as long as it takes
                if give_up is not None:  # after a second signal, only what fits now
                    left = 0.0 if seen.count > 1 else max(0.0, give_up - time.monotonic())
                try:
                    readable, writable = _platform.wait_ready((woken,), (self.fd,), left)
                    if writable:
                        line = line[os.write(self.fd, line[:_PIPE_BUF]) :]
                    elif readable:
                        os.read(woken, 64)  # a signal: look at the count again
                    else:
                        return  # no room came in time
                except BlockingIOError:
                    pass  # another writer took the room: wait again
                except OSError as e:
                    raise _gone(e) from None
        finally:
            seen.deferred, seen.wake = False, None
            with contextlib.suppress(BlockingIOError):
                os.read(woken, 64)  # wake-ups left over from this answer

    def close(self) -> None:
        """Close the wake-up pipe, if one was made (``fd`` stays the caller's)."""
        for end in self._woken:
            if end >= 0:
                os.close(end)
        self._woken = -1, -1


def _poke(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending already
        os.write(fd, b"!")


def _gone(e: OSError) -> _CallerGone:
    """A failed write to stdout: the caller closed its end (EPIPE; ECONNRESET or
    ENOTCONN where stdout is a socket, as Node's ``stdio: "pipe"`` is, and the caller
    left answers unread), or another error."""
    left = isinstance(e, (BrokenPipeError, ConnectionResetError)) or e.errno == errno.ENOTCONN
    return _CallerGone(None if left else e)


def error_name(e: BaseException) -> str:
    """The name a caller matches on: fencelock's class as the package exports it. A
    class of its own that is not exported (`HeldByOwnRunError`) answers as the
    exported class it refines (`SessionContendedError`); `BadRequestError` is the
    protocol's own. Any other error (an `OSError`) by its class name."""
    if not isinstance(e, FenceLockError):
        return type(e).__name__
    import fencelock  # the package itself: what it exports

    for cls in type(e).__mro__:
        if cls is BadRequestError or getattr(fencelock, cls.__name__, None) is cls:
            return cls.__name__
    return FenceLockError.__name__  # unreachable: FenceLockError is exported


def said(e: BaseException, session: str = "") -> str:
    """What ``e`` says: an `OSError` of the system's as the command line words one (the
    file, and what to do about a limit), anything else as it says itself; led by
    ``session`` where it names only the store (`_errors.session_lead`)."""
    if isinstance(e, OSError) and not isinstance(e, FenceLockError):
        from fencelock._output import os_message

        return os_message(e)
    return (session_lead(session, e) if session else "") + str(e)


def error_answer(e: BaseException, session: str = "") -> dict[str, Any]:
    """``{"ok": false, "error": <class name>, "message": ...}`` plus what the class
    carries; ``session``, the one being held, as `said` takes it."""
    answer: dict[str, Any] = {"ok": False, "error": error_name(e),
                              "message": said(e, session)}
    if isinstance(e, SessionContendedError):
        answer["holder"] = None if e.holder is None else e.holder.to_json()
    elif isinstance(e, SessionTakeoverError):
        answer["expected"] = None if e.expected is None else e.expected.to_json()
        answer["actual"] = None if e.actual is None else e.actual.to_json()
        answer["stored"] = e.stored
        if isinstance(e, SessionMovedError):
            answer["moved_to"] = e.moved_to
            answer["later"], answer["carried"] = e.later, e.carried
    elif isinstance(e, SessionWriteError):
        answer["stored"] = e.stored
    return answer


# -- parsing requests --------------------------------------------------------------------


def parse(item: _Line | _TooLong) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request, the part of the answer every answer to it carries: its ``id``).

    Raises `BadRequestError` for a line that is not a request; the error answer then
    carries the id if one could be read."""
    if isinstance(item, _TooLong):
        raise BadRequestError(
            f"request line of {item.length} bytes is longer than the {MAX_REQUEST}-byte "
            f"bound; it was dropped, and nothing was written: keep content that large in a "
            f"file of its own and put its path in the entry, or append it through the "
            f"Python library (SessionLock.append), which has no such bound"
        )
    try:
        text = item.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"request is not UTF-8 (byte {e.start})") from None
    if not text.strip(SPACE):
        raise BadRequestError("request line is empty; send one JSON object per line")
    if text.startswith("\ufeff"):
        raise BadRequestError("request starts with a byte order mark (EF BB BF); send UTF-8 "
                              "without one")
    try:
        request = strict_loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        raise BadRequestError("request is nested too deeply") from None
    except RepeatedKeyError as e:
        # Which value would count is a guess ({"op": "info", "op": "release"}), and an
        # entry object would lose one of them: refused, nothing done.
        raise _Refused(BadRequestError(
            f"request is refused: {e}, and which one counts is not clear; nothing was "
            f"done (an entry whose repeated keys must be kept goes as a one-line string)"
        ), _id_of(text)) from None
    except ValueError as e:
        why = digits_problem(e)
        hint = (" (a line break inside a string goes as \\n: each request is one line)"
                if str(e).startswith("Unterminated string") else
                " (a control character inside a string goes escaped: \\r, \\t, \\u0000)"
                if str(e).startswith("Invalid control character") else "")
        raise BadRequestError(f"request holds {why}" if why else f"request is not JSON: {e}"
                              f"{hint}") from None
    if not isinstance(request, dict):
        raise BadRequestError(f"request is not a JSON object but {kind(request)}")
    return request, ({"id": request["id"]} if "id" in request else {})


def _id_of(text: str) -> dict[str, Any]:
    """The ``id`` part of the answer to ``text``, a JSON object that names some key
    twice: its id where its top level gives one once, else nothing. (The hook sees the
    objects inner first: the top level's pairs come last.)"""
    seen: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append(pairs)
        return dict(pairs)

    try:
        request = strict_loads(text, object_pairs_hook=keep)
    except (ValueError, RecursionError):  # not a request on other counts too: no id read
        return {}
    once = isinstance(request, dict) and [k for k, _ in seen[-1]].count("id") == 1
    return {"id": request["id"]} if once else {}


def _entry(request: dict[str, Any], stamp: bool | None) -> dict[str, Any] | str:
    """The entry to append, checked as the protocol states (`BadRequestError`)."""
    if "entry" not in request:
        raise BadRequestError('append needs "entry": a JSON object or a one-line string')
    entry = request["entry"]
    if not isinstance(entry, dict | str):
        raise BadRequestError(
            f'"entry" must be a JSON object or a one-line string, not {kind(entry)}'
        )
    if isinstance(entry, str) and ("\n" in entry or "\r" in entry):
        raise BadRequestError('"entry" must be one line; this one has a line break')
    keyed: Any = entry
    if isinstance(entry, str):
        try:
            keyed = strict_loads(entry)
        except RecursionError:
            raise BadRequestError('"entry" is nested too deeply') from None
        except ValueError as e:
            why = digits_problem(e)
            raise BadRequestError(
                f'"entry" holds {why}' if why else
                f'"entry" given as a string must be one line of JSON ({e}); send the '
                f'object itself to have it encoded'
            ) from None
        if stamp and not isinstance(keyed, dict):
            raise BadRequestError('"stamp": true needs an entry that is a JSON object')
    try:  # a string entry's value too: its \u escapes may spell a lone surrogate
        json.dumps(keyed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequestError(
            f'"entry" holds a lone surrogate ({e.object[e.start]!a}), which is not UTF-8'
        ) from None
    except RecursionError:  # read at the parser's depth limit, one level short of it here
        raise BadRequestError('"entry" is nested too deeply') from None
    if not stamp and isinstance(keyed, dict) and STAMP_KEY in keyed:
        raise BadRequestError(
            f'"entry" must not carry the reserved key "{STAMP_KEY}"; send "stamp": true to '
            f'have fencelock stamp it'
        )
    return entry


# -- serving -----------------------------------------------------------------------------


class _Session:
    """The held lock and its prompt window, driven by requests."""

    def __init__(self, lock: SessionLock) -> None:
        self.lock = lock
        self.window: AbstractContextManager[SessionLock] | None = None
        self.release_failed = False
        """The release raised (not stored, or the holder was lost): hold exits 1."""
        self.lost: HolderLostError | None = None
        """The loss of the holder that a request's answer (or hold's own heartbeat) met.
        The store's release says nothing more of a loss its caller has heard of, but
        the release answers with it and hold exits 1: the hold did not end as held."""

    def handle(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._handle(op, request)
        except HolderLostError as e:
            self.lost = self.lost or e
            raise

    def _handle(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        lock = self.lock
        answer: dict[str, Any] = {"ok": True, "op": op}
        if op == "append":
            stamp = request.get("stamp")
            if stamp is not None and not isinstance(stamp, bool):
                raise BadRequestError('"stamp" must be true, false or null (the holder\'s default)')
            entry = _entry(request, lock.stamp if stamp is None else stamp)
            try:
                # The library's own check decides, once: a string entry parsed again at
                # another stack depth could pass the check above and fail this one.
                line = lock._line(entry, stamp)
            except FenceLockError as e:
                raise BadRequestError(f'"entry" cannot be written: {e}') from None
            lock._append_bytes(line)
        elif op == "prompt_begin":
            if self.window is not None:
                raise BadRequestError("prompt_begin inside the prompt window; prompt_end first")
            window: AbstractContextManager[SessionLock] = lock.prompt_window()
            window.__enter__()  # checks the fence, then marks phase "prompt"
            self.window = window
        elif op == "prompt_end":
            open_window, self.window = self.window, None
            if open_window is None:
                raise BadRequestError("prompt_end without prompt_begin")
            open_window.__exit__(None, None, None)  # phase "write", then the fence check
        elif op == "touch":
            lock.touch()
        elif op == "verify":
            fp = lock.verify_fence()
            answer["fingerprint"] = None if fp is None else fp.to_json()
        elif op == "info":
            if self.lost is not None:  # the record would say "held"
                raise HolderLostError(lock.session, self.lost.why)
            info = lock.info
            answer["record"] = None if info is None else info.to_json()
        elif op == "superseded":
            answer["session"] = lock.superseded()
        elif op == "release":
            self.close()
        return answer

    def close(self) -> None:
        """End an open prompt window (a failed fence check there is not reported:
        the caller asked to let go, or is gone) and release; `HolderLostError` when
        the release fails so, or when it was done after a loss already met (`lost`)."""
        window, self.window = self.window, None
        released = False
        try:
            if window is not None:
                with contextlib.suppress(FenceLockError, OSError):
                    window.__exit__(None, None, None)
        finally:
            if self.lock.held:
                try:
                    self.lock.release()
                except BaseException:
                    self.release_failed = True
                    raise
                released = True
        if released and self.lost is not None:
            self.release_failed = True
            raise HolderLostError(self.lock.session, self.lost.why)


def _stderr(message: str) -> None:
    """One line on stderr; control characters and a file name's bytes that are not
    UTF-8 shown as ``\\xNN``, as every command shows them."""
    from fencelock._output import clean  # the command line's, loaded with it

    with contextlib.suppress(OSError):
        os.write(2, f"fencelock hold: {clean(message)}\n".encode("utf-8", "backslashreplace"))


def make_lock(
    session: str,
    lane: str,
    *,
    no_wait: bool,
    timeout: float | None,
    backend: str | None,
    mode: int = 0o600,
    fence: str = "auto",
) -> SessionLock:
    """The `SessionLock` `hold` takes; `HoldArgumentError` for a value it cannot use."""
    from fencelock._lock import SessionLock

    try:
        return SessionLock(
            session, lane, on_contention="fail" if no_wait else "wait", timeout=timeout,
            backend=backend, mode=mode, fence=fence,
        )
    except FenceLockError:
        raise  # about the session (e.g. outside the backend's root), not an option value
    except ValueError as e:
        raise HoldArgumentError("--backend" if backend and "lane" not in str(e) else "--lane",
                                str(e)) from None


def _acquire_unless_stopped(
    lock: SessionLock, inbox: _Inbox, seen: Seen, out: int
) -> HolderInfo | None:
    """The lock's record once held; None if stdin ended first with no request sent.
    Raises `Stopped` for a stop signal that came while waiting, and `_CallerGone` when
    stdout (``out``) hung up meanwhile: the caller died, or closed it, and no answer
    could reach it (the wait has ended then, and nothing is held)."""
    import asyncio

    seen.deferred = True  # the loop must see the signal, not a callback of it
    try:
        info = asyncio.run(_acquire_unless_abandoned(lock, inbox, seen, out))
    finally:
        seen.deferred, seen.wake = False, None
    if seen.signum:
        raise Stopped(seen.signum)
    return info


async def _acquire_unless_abandoned(
    lock: SessionLock, inbox: _Inbox, seen: Seen, out: int
) -> HolderInfo | None:
    import asyncio

    loop = asyncio.get_running_loop()
    abandoned = asyncio.Event()
    stopped = asyncio.Event()
    hung_up = asyncio.Event()

    def wake(event: asyncio.Event) -> Callable[[], None]:
        def set_it() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: it ended
                loop.call_soon_threadsafe(event.set)

        return set_it

    seen.wake = wake(stopped)
    if seen.signum:
        stopped.set()
    if lock.on_contention != "fail":
        # A caller gone while hold waits ends the wait. Without a wait (``--no-wait``)
        # the one try ends on its own, and what it found (an etcd away) is said.
        inbox.on_idle_eof(wake(abandoned))
    unwatch = _watch_hang_up(loop, out, hung_up)
    taking = asyncio.ensure_future(lock.acquire_async())
    ends = {asyncio.ensure_future(e.wait()) for e in (abandoned, stopped, hung_up)}
    try:
        await asyncio.wait({taking, *ends}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        unwatch()
    for end in ends:
        end.cancel()
    if not taking.done():
        taking.cancel()  # acquire_async gives back a lock that arrives now
        try:
            await taking
        except asyncio.CancelledError:
            if hung_up.is_set() and not stopped.is_set():
                raise _CallerGone() from None
            return None
    return taking.result()


def _watch_hang_up(
    loop: asyncio.AbstractEventLoop, fd: int, hung_up: asyncio.Event
) -> Callable[[], None]:
    """Set ``hung_up`` once stdout (``fd``) reports that nobody can read it: a caller
    that sent requests, then died, must not leave `hold` waiting for a session it would
    take for nobody. Returns what stops the watch. A pipe or socket is watched (an
    epoll reader hears their hang-up, which poll(2) reports whatever was asked); a
    regular file or /dev/null cannot be watched so and never hangs up, and a terminal
    (a reader would hear what is typed) is not watched. A reader woken by data to read,
    not a hang-up (a socket that is stdin too, as socat and inetd give), would be woken
    again at once for as long as the data is there: from then on the hang-up is looked
    for every `_HANG_UP_POLL` seconds instead."""
    later: list[asyncio.TimerHandle] = []

    def look() -> None:
        if _platform.hung_up(fd):
            hung_up.set()
        else:
            later[:] = [loop.call_later(_HANG_UP_POLL, look)]

    def heard() -> None:
        loop.remove_reader(fd)
        look()

    def unwatch() -> None:
        loop.remove_reader(fd)
        for handle in later:
            handle.cancel()

    if os.isatty(fd):
        return lambda: None
    try:
        loop.add_reader(fd, heard)
    except (OSError, ValueError, NotImplementedError):
        return lambda: None
    return unwatch


def hold(lock: SessionLock, *, heartbeat: float, stdin: int = 0, stdout: int = 1) -> int:
    """Serve the line protocol on ``stdin``/``stdout`` for ``lock``; the exit code."""
    seen = Seen()
    served = _Session(lock)
    out = _Out(stdout)
    out.prepare()
    code = EXIT_ERROR
    try:
        # Installed for the rest of the process's life (its relay thread keeps it): see
        # the end of this function.
        PromptHandlers(seen.stop, _platform.stop_signals())
        code = _hold(served, heartbeat, _Inbox(stdin), out, seen)
    except Stopped:
        pass  # the code is the signal's, below
    finally:
        seen.settled = True  # from here a signal is noted, never raised
        try:
            served.close()
        except (FenceLockError, OSError) as e:
            _stderr(f"{lock.session}: release: {e}")
        out.close()
        # The handlers stay: a signal from here on is only noted, and the exit is this
        # code (128 + N for one that came before), never the signal's default action
        # (`main` then ignores stop signals, which the interpreter's shutdown keeps).
    if seen.signum:
        return 128 + seen.signum
    return EXIT_ERROR if served.release_failed and code == EXIT_OK else code


def _hold(served: _Session, heartbeat: float, inbox: _Inbox, out: _Out, seen: Seen) -> int:
    lock = served.lock
    inbox.start()
    try:
        info: HolderInfo | None = None
        if lock._store.tries_in_place:
            # One try first, in this thread: a session that cannot be held (a bad
            # path, a corrupt record) is reported whether or not stdin has ended.
            # (Not in etcd, where a try joins the queue and leaves it again.)
            try:
                info = lock.acquire(timeout=0)
            except SessionContendedError:
                if lock.on_contention == "fail":
                    raise
        if info is None:
            info = _acquire_unless_stopped(lock, inbox, seen, out.fd)
            if info is None:
                # stdin ended first, with nothing asked: the wait ends here, and says
                # what it found, as --no-wait's try does (a contended session exits 4;
                # one free by now is held, then released at once, exit 0).
                info = lock.acquire(timeout=0)
    except _CallerGone:
        return EXIT_OK  # stdout hung up while it waited: as a closed stdout, nothing held
    except SessionContendedError as e:
        _stderr(str(e))
        with contextlib.suppress(_CallerGone):
            out.send(error_answer(e))
        return EXIT_CONTENDED
    except (FenceLockError, OSError) as e:
        _stderr(said(e, lock.session))
        with contextlib.suppress(_CallerGone):
            out.send(error_answer(e, lock.session))
        return EXIT_ERROR
    try:
        out.send({"ok": True, "event": "held", "record": info.to_json()})
        _serve(served, inbox, out, heartbeat, seen)
    except _CallerGone as e:
        if e.error is not None:  # not a caller that left: say so, release, exit 1
            _stderr(f"cannot write its answers to stdout ({e.error.strerror or e.error}); "
                    f"releasing the session: check where stdout goes")
            return EXIT_ERROR
        # stdout closed: as for end of stdin, release (in hold) and exit 0
    return EXIT_OK


_HANG_UP_POLL = 0.25
"""Seconds between looks at a stdout whose reader woke for data (`_watch_hang_up`)."""
_BEATING = frozenset({"append", "prompt_begin", "prompt_end", "touch"})
"""The requests that write the record's heartbeat, and so put off hold's own."""
_WRITING = _BEATING | {"release"}
"""The requests a stop signal does not cut short: each is answered first (`verify` and
`info` write nothing, and stop at once)."""
_NOTHING = _TooLong(-1)
"""No request came for a beat (a stand-in no reader puts in the queue)."""


def _handled(served: _Session, op: str, request: dict[str, Any]) -> dict[str, Any]:
    """``served.handle``'s answer, or the error answer, carrying in ``warnings`` the
    `FenceLockWarning` warnings the request gave (a torn last line moved aside, a stored
    line whose record could not follow it), whatever the warning filters say: they
    decide only whether stderr shows them too."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FenceLockWarning)
            try:
                answer = served.handle(op, request)
            except (FenceLockError, OSError) as e:
                answer = error_answer(e, served.lock.session)
    finally:
        notes = _pass_on(caught)
    if notes:
        answer["warnings"] = notes
    return answer


def _pass_on(caught: list[warnings.WarningMessage]) -> list[str]:
    """The texts of the `FenceLockWarning` warnings in ``caught``; every warning caught
    is given again to the filters outside, as from the module that gave it (a filter
    may name it), to be shown (on stderr) or not as they say."""
    notes = []
    for w in caught:
        if issubclass(w.category, FenceLockWarning):
            notes.append(str(w.message))
        module = next((m for m in list(sys.modules.values())
                       if getattr(m, "__file__", None) == w.filename), None)
        warnings.warn_explicit(
            w.message, w.category, w.filename, w.lineno, source=w.source,
            module=None if module is None else module.__name__,
            registry=None if module is None else vars(module).setdefault(
                "__warningregistry__", {}),
        )
    return notes


def _refresh(served: _Session) -> None:
    try:
        served.lock.touch()
    except (FenceLockError, OSError) as e:
        if isinstance(e, HolderLostError):
            served.lost = served.lost or e
        _stderr(f"{session_lead(served.lock.session, e)}heartbeat not refreshed: {said(e)}")


def _serve(
    served: _Session, inbox: _Inbox, out: _Out, heartbeat: float, seen: Seen
) -> None:
    beat = heartbeat if 0 < heartbeat < threading.TIMEOUT_MAX else None
    # When hold refreshes the heartbeat itself, unless a request writes it first.
    due = 0.0 if beat is None else time.monotonic() + beat
    while True:
        try:
            item = inbox.items.get(
                timeout=None if beat is None else max(0.0, due - time.monotonic())
            )
        except queue.Empty:
            item = _NOTHING
        if beat is not None and time.monotonic() >= due:  # requests came, none wrote it
            _refresh(served)
            due = time.monotonic() + beat
        if item is _NOTHING:
            continue
        if item is _EOF:
            return
        echo: dict[str, Any] = {}
        op: Any = None
        try:
            request, echo = parse(item)
            asked = request.get("op")
            if not isinstance(asked, str) or asked not in OPS:
                shown = json.dumps(asked)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                raise BadRequestError(
                    f"unknown op {shown}; expected one of {', '.join(OPS)}"
                    if "op" in request else f'request has no "op" (one of {", ".join(OPS)})'
                )
            op = asked
            if op in _WRITING:
                # A stop signal from here is noted, not raised, until the request is
                # done: raised in the middle of an append, it would leave its line in
                # the session with no answer saying so (a caller would send it again)
                # and the record with the fence point before it; in the middle of the
                # release, the record saying held (stale).
                seen.settled = True
            answer = _handled(served, op, request)
        except (FenceLockError, OSError) as e:
            answer = error_answer(e)
        except _Refused as r:
            answer, echo = error_answer(r.error), r.echo
        if seen.settled:
            # The answer of a request that wrote goes out even if a stop signal comes
            # now: the caller must learn what was stored.
            out.send_owed({**answer, **echo}, seen)
            seen.settled = op == "release"  # released: nothing is left to cut short
            if seen.signum:
                raise Stopped(seen.signum)
        else:  # nothing written: a signal raises, even while the answer waits for room
            out.send({**answer, **echo})
        if op == "release":
            return
        if beat is not None and op in _BEATING and answer["ok"]:
            due = time.monotonic() + beat


def main(
    session: str,
    lane: str,
    *,
    no_wait: bool,
    timeout: float | None,
    heartbeat: float,
    backend: str | None,
    mode: int = 0o600,
    fence: str = "auto",
) -> int:
    """What ``fencelock hold`` runs once its arguments are parsed."""
    try:
        lock = make_lock(session, lane, no_wait=no_wait, timeout=timeout, backend=backend,
                         mode=mode, fence=fence)
    except HoldArgumentError:
        raise
    except FenceLockError as e:  # answered like a session that cannot be held
        _stderr(str(e))
        with contextlib.suppress(_CallerGone):
            _Out(1).send(error_answer(e))
        return EXIT_ERROR
    code = hold(lock, heartbeat=heartbeat)
    _ignore_stop_signals()
    sys.stdout.flush()
    return code


def _ignore_stop_signals() -> None:
    """The exit code is decided: a stop signal from here on is ignored. (The handlers
    would only note it, but the interpreter puts the default actions back as it shuts
    down, and a signal then would end the process as killed by it, not with the code.)
    Ignored, not default, signals are left as they are at shutdown."""
    import signal

    for sig in _platform.stop_signals():
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN)
