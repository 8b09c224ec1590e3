"""Fork safety for sidecar descriptors.

A flock lock belongs to the open file description, and fork() gives the child a copy
of every descriptor. A child that keeps an inherited sidecar descriptor keeps the
parent's lock alive after the parent closed its own copy, or died: the session would
read as live with nobody running. So every sidecar descriptor is tracked from the
moment it is opened to the moment it is closed, both done under `guard`, which
fork() waits for; a forked child closes every tracked descriptor before anything else
runs in it. (Descriptors are opened with O_CLOEXEC, so an exec'd child never has them.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Protocol

guard = threading.RLock()
"""Held while a sidecar descriptor is opened or closed; fork() takes it first.

Reentrant, so a signal handler that forks in a thread holding it cannot deadlock.
Always use it as ``_forkguard.guard``: a forked child replaces it."""

_forking = threading.local()
"""Whether this thread's fork took `guard` (a signal handler may interrupt the wait)."""

_open: dict[int, tuple[int, int]] = {}
"""Tracked descriptors: fd -> (st_dev, st_ino) of the sidecar it was opened on."""


class Owner(Protocol):
    """What keeps a tracked descriptor (`track`'s ``into``): its number and tracking
    entry, for `close_if_still`."""

    _fd: int
    _opened: object


def track(fd: int, st: os.stat_result, into: Owner | None = None) -> None:
    """Record a sidecar descriptor just opened; call with `guard` held since the open.
    ``into``: handed to its owner in the same step, with no point between where a signal
    handler's exception could land (which would leave it tracked and nobody's)."""
    _open[fd] = entry = (st.st_dev, st.st_ino)
    if into is not None:
        into._fd, into._opened = fd, entry


def tracked(fd: int) -> bool:
    """Whether ``fd`` is a sidecar descriptor fencelock opened in this process."""
    return fd in _open


def close(fd: int) -> None:
    """Close a tracked descriptor (which drops any lock held through it alone)."""
    # ``with``, not explicit acquire/release calls: a signal handler that raises runs
    # right after a call returns, which would leave the guard held for good.
    with guard:
        try:
            os.close(fd)
        finally:
            _open.pop(fd, None)  # after: a fork in between finds it tracked, not leaked


entry: Callable[[int], object] = _open.get
"""The tracking entry of a descriptor (an object of its open alone: see
`close_if_still`), or None. (The dict's own method: an acquire asks it every time.
`_open` is only ever cleared, never replaced.)"""


def close_if_still(fd: int, opened: object) -> None:
    """`close` ``fd`` if it is still the descriptor whose tracking entry was ``opened``
    (`entry`): for a cleanup run again after an interrupt (KeyboardInterrupt, a signal
    handler's exception) cut a `close` short. A close that got as far as closing it
    untracked it, and the number may be another open's by now: that one is left alone."""
    with guard:
        if opened is not None and _open.get(fd) is opened:
            close(fd)


def _before_fork() -> None:
    _forking.took = False
    guard.acquire()  # if a signal handler raises here, fork goes on without it
    _forking.took = True


def _after_fork_in_parent() -> None:
    if getattr(_forking, "took", False):
        _forking.took = False
        guard.release()


def _after_fork_in_child() -> None:
    global guard
    for fd, identity in _open.items():
        # Only what the parent had open: never a number something else reused.
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == identity:
                os.close(fd)
    _open.clear()
    # A new guard: the old one may be owned by a thread that did not survive the fork
    # (when waiting for it was interrupted).
    guard = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
