"""The seam between `SessionLock` and the store that holds a session for it.

The sidecar store (section 2 of the protocol) is built into `SessionLock`, whose hot
path stays free of any indirection; another store is reached through `HolderStore`,
which `SessionLock` calls without knowing which store it is. `open_store` picks one
from a backend URL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from fencelock import _backend

if TYPE_CHECKING:
    from fencelock._probe import HolderStatus
    from fencelock._record import HolderInfo


class HolderStore(Protocol):
    """One session's holder in a store other than the sidecar, for one `SessionLock`."""

    name: str
    """Where the holder lives, as messages and `HolderStatus.sidecar` show it."""

    def acquire(
        self,
        fail: bool,
        deadline: float | None,
        cancel: threading.Event | None,
        record: Callable[[int, HolderInfo | None], bytes] | None,
    ) -> int:
        """Take the session's lock (waiting unless ``fail``) and return the fencing token.

        Once the lock is this holder's, ``record(token, last)`` gives the first record to
        store, where ``last`` is the session's last record (its ``state`` says whether
        that run ended cleanly); it may be called more than once. Raises
        `SessionContendedError`, `StoreUnavailableError`, or a cancellation."""

    def write(self, record: bytes) -> None:
        """Store the holder's record; `HolderLostError` when no longer the holder."""

    def check(self) -> None:
        """Raise `HolderLostError` unless the holder is sure it still holds the session."""

    def release(self, record: bytes | None) -> None:
        """Give the lock back, leaving ``record`` (the released record) as the last one."""

    def wait_free(self, timeout: float | None) -> bool:
        """Block until the session has no live holder; False on timeout."""

    def probe(self, stuck_after: float) -> HolderStatus:
        """The session's state, as `fencelock.probe` reports it."""

    def clear(self, remove: bool) -> HolderStatus:
        """Clear a stale record under the lock, as `fencelock.clear` does."""


def open_store(backend: str | None, session: str) -> HolderStore | None:
    """The store for ``session`` under ``backend`` (or ``$FENCELOCK_BACKEND``); None for
    the sidecar store."""
    url = _backend.selected(backend)
    if url is None:
        return None
    from fencelock import _etcd

    return _etcd.EtcdHolder(url, session)
