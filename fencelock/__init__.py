"""fencelock: one run-level holder per agent session file, visible to every process.

A `SessionLock` holds ``<session>.holder`` with an OS advisory lock for a run's whole
life, prompt window included, and writes a JSON record saying who holds it. `probe`,
`scan`, `clear` and `recover` look at and repair holders from outside. Everything
public is listed in ``__all__``; modules starting with ``_`` are internal.

The public names are imported on first use (PEP 562), so ``import fencelock`` and the
``fencelock`` command start quickly; ``from fencelock import X`` works as usual.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
"""fencelock's version: the one place it is written (pyproject.toml reads it from here)."""

_SOURCES = {
    "fencelock._errors": (
        "CoordinationError",
        "CorruptRecordError",
        "FenceLockError",
        "FenceLockWarning",
        "HolderLostError",
        "NotHeldError",
        "PlantedFileError",
        "RecordTooLargeError",
        "SessionContendedError",
        "SessionMovedError",
        "SessionTakeoverError",
        "SessionWriteError",
        "SidecarAccessError",
        "StoreUnavailableError",
        "UnsafePathError",
        "UnsafeSidecarError",
        "is_coordination_error",
    ),
    "fencelock._fingerprint": ("FenceMode", "Fingerprint"),
    "fencelock._lock": ("SessionLock",),
    "fencelock._platform": ("LockOwner",),
    "fencelock._probe": (
        "DEFAULT_STUCK_AFTER",
        "HolderStatus",
        "ProbeState",
        "clear",
        "probe",
        "scan",
    ),
    "fencelock._record": ("HolderInfo", "Phase", "PreviousHolder", "RunCommand", "State"),
    "fencelock._recovery": ("Action", "Recovery", "fresh_session", "recover"),
    "fencelock._tokens": ("STAMP_KEY",),
    "fencelock._verify": ("VerifyReport", "verify"),
}
"""Every public name, by the private module that defines it: the one list. ``__all__``
is made from it, and ``tests/test_package.py`` pins the API against it."""

__all__ = ["__version__", *sorted(name for names in _SOURCES.values() for name in names)]

_LAZY = {name: module for module, names in _SOURCES.items() for name in names}

if TYPE_CHECKING:
    # What type checkers see, as explicit re-exports; at run time the names load on
    # first use from _SOURCES. tests/test_package.py checks these name what it names.
    # One block per module, as _SOURCES has it:
    # isort: off
    from fencelock._errors import (
        CoordinationError as CoordinationError,
        CorruptRecordError as CorruptRecordError,
        FenceLockError as FenceLockError,
        FenceLockWarning as FenceLockWarning,
        HolderLostError as HolderLostError,
        NotHeldError as NotHeldError,
        PlantedFileError as PlantedFileError,
        RecordTooLargeError as RecordTooLargeError,
        SessionContendedError as SessionContendedError,
        SessionMovedError as SessionMovedError,
        SessionTakeoverError as SessionTakeoverError,
        SessionWriteError as SessionWriteError,
        SidecarAccessError as SidecarAccessError,
        StoreUnavailableError as StoreUnavailableError,
        UnsafePathError as UnsafePathError,
        UnsafeSidecarError as UnsafeSidecarError,
        is_coordination_error as is_coordination_error,
    )
    from fencelock._fingerprint import (
        FenceMode as FenceMode,
        Fingerprint as Fingerprint,
    )
    from fencelock._lock import SessionLock as SessionLock
    from fencelock._platform import LockOwner as LockOwner
    from fencelock._probe import (
        DEFAULT_STUCK_AFTER as DEFAULT_STUCK_AFTER,
        HolderStatus as HolderStatus,
        ProbeState as ProbeState,
        clear as clear,
        probe as probe,
        scan as scan,
    )
    from fencelock._record import (
        HolderInfo as HolderInfo,
        Phase as Phase,
        PreviousHolder as PreviousHolder,
        RunCommand as RunCommand,
        State as State,
    )
    from fencelock._recovery import (
        Action as Action,
        Recovery as Recovery,
        fresh_session as fresh_session,
        recover as recover,
    )
    from fencelock._tokens import STAMP_KEY as STAMP_KEY
    from fencelock._verify import (
        VerifyReport as VerifyReport,
        verify as verify,
    )
    # isort: on


def __getattr__(name: str) -> object:
    """Import a public name from its defining module on first use, then cache it."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY.keys())
