"""Signal handlers that run promptly, whatever the main thread is blocked in.

CPython runs a Python-level signal handler in the main thread, between bytecodes. A
signal interrupts a blocking call of the main thread only if the kernel delivers it to
that thread while it is inside the call. It misses when it lands just before the call
starts, or on another thread (a waiter blocked in flock, the heartbeat). Its handler
then waits until the call returns, and for a session wait that can be the whole
timeout. `fencelock run` and `fencelock hold` would ignore a SIGTERM for that long.

`PromptHandlers` closes the gap. Each signal also writes its number to a pipe
(`signal.set_wakeup_fd`, done by the C-level handler in whichever thread took it). A
relay thread reading that pipe interrupts the main thread with SIGURG (which nothing
else sends a process without sockets of its own, and which is ignored by default) until
the handler has run. Calls interrupted that way are retried (PEP 475), so the pokes
cost nothing else. POSIX only: elsewhere the handlers are installed as they are.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], None]

_POKE: int | None = getattr(signal, "SIGURG", None) if hasattr(signal, "pthread_kill") else None
_POKE_EVERY = 0.002
"""Pause between two pokes of a main thread that has not run the handler yet."""
_POKE_FOR = 2.0
"""How long to poke a main thread that never runs its handlers (one stuck in a call
that does not return on a signal) before giving up."""


class PromptHandlers:
    """Installs ``handler`` for ``signals`` and sees that it runs promptly; `close`
    puts back what was there. Create it in the main thread.

    The relay pokes until the main thread has run a SIGURG handler after the signal
    came: CPython runs pending handlers in the order of their numbers, and SIGURG's is
    above SIGHUP, SIGINT and SIGTERM, so by then theirs have run too.
    """

    def __init__(self, handler: Handler, signals: Iterable[int]) -> None:
        self._handler = handler
        self._poked = 0
        self._closing = False
        self._previous: dict[int, Any] = {}
        self._wakeup = -1
        self._write = -1
        for sig in signals:
            # A signal the caller ignores (nohup, trap '', a script's background job)
            # stays ignored, here and in a command started from here, as flock(1) does.
            if signal.getsignal(sig) != signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._run)
        if _POKE is None or threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)  # the C-level handler must never block on it
        self._previous[_POKE] = signal.signal(_POKE, self._ack)
        self._wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._write = write
        main = threading.main_thread().ident
        assert main is not None
        threading.Thread(
            target=self._relay, args=(read, main), name="fencelock-signals", daemon=True
        ).start()

    def _run(self, signum: int, frame: FrameType | None) -> None:
        if not self._closing:  # while the handlers are put back, a signal only ends
            self._handler(signum, frame)

    def _ack(self, signum: int, frame: FrameType | None) -> None:
        """SIGURG's handler: nothing but a count, which tells the relay that the main
        thread has run its pending handlers."""
        self._poked += 1

    def _relay(self, read: int, main: int) -> None:
        try:
            while True:
                data = os.read(read, 64)
                if not data:
                    return  # closed: the handlers are back to what they were
                if all(sig == _POKE for sig in data):
                    continue
                seen = self._poked
                give_up = time.monotonic() + _POKE_FOR
                while (self._poked == seen and not self._closing
                       and time.monotonic() < give_up):
                    assert _POKE is not None
                    signal.pthread_kill(main, _POKE)
                    time.sleep(_POKE_EVERY)
        except OSError:
            return  # the main thread is gone, or the pipe: nothing left to poke
        finally:
            os.close(read)

    def close(self, *, ignore: bool = False) -> None:
        """Put the previous handlers back (call it in the main thread), or, with
        ``ignore``, leave handlers that do nothing (a process whose exit code is
        settled, on its way out; unlike SIG_IGN, a program it starts does not inherit
        them). A signal that lands meanwhile does not run the handler: the caller is on
        its way out."""
        self._closing = True
        for sig, previous in self._previous.items():
            # None: a handler that was not set from Python; the default is what it was.
            if ignore and sig != _POKE:
                signal.signal(sig, _nothing)
            else:
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
        if self._write >= 0:
            signal.set_wakeup_fd(self._wakeup)
            os.close(self._write)  # the relay reads end of file and stops
            self._write = -1


def _nothing(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing (`PromptHandlers.close`'s ``ignore``)."""


class Stopped(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) ends what the command was doing; the
    command exits 128 + ``signum`` once its clean-up is done. A BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Seen:
    """What a stop signal asked of a command. Set by plain attribute stores, which run
    no handler in between (CPython runs pending handlers on entering a call), so that
    the command's clean-up is never cut short."""

    signum = 0
    """The first stop signal that came (0: none)."""
    count = 0
    """How many stop signals came."""
    settled = False
    """From here a signal is noted, never raised (a release or a decision is under way)."""
    deferred = False
    """While set, a signal is noted and `wake` called (for every signal, the first and
    later ones), never raised: an event loop runs (asyncio catches and only logs an
    exception raised inside one of its callbacks), or a write whose count must not be
    lost."""
    wake: Callable[[], None] | None = None

    def stop(self, signum: int, frame: FrameType | None) -> None:
        """The handler: the first signal raises `Stopped` unless settled or deferred;
        later ones only end (a second signal must not cut the first one's clean-up
        short)."""
        self.count += 1
        first = not self.signum
        if first:
            self.signum = signum
        if self.deferred:
            if self.wake is not None:
                self.wake()
        elif first and not self.settled:
            raise Stopped(signum)
