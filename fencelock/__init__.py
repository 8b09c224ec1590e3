"""fencelock: one run-level holder per agent session file, visible to every process.

A `SessionLock` holds ``<session>.holder`` with an OS advisory lock for a run's whole
life, prompt window included, and writes a JSON record saying who holds it. `probe`,
`scan`, `clear` and `recover` look at and repair holders from outside. Everything
public is listed in ``__all__``; modules starting with ``_`` are internal.

The public names are imported on first use (PEP 562), so ``import fencelock`` and the
``fencelock`` command start quickly; ``from fencelock import X`` works as usual.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fencelock._errors import (
        CoordinationError,
        CorruptRecordError,
        FenceLockError,
        FenceLockWarning,
        HolderLostError,
        NotHeldError,
        PlantedFileError,
        SessionContendedError,
        SessionTakeoverError,
        SessionWriteError,
        SidecarAccessError,
        StoreUnavailableError,
        UnsafePathError,
        UnsafeSidecarError,
        is_coordination_error,
    )
    from fencelock._fingerprint import FenceMode, Fingerprint
    from fencelock._lock import SessionLock
    from fencelock._platform import LockOwner
    from fencelock._probe import (
        DEFAULT_STUCK_AFTER,
        HolderStatus,
        ProbeState,
        clear,
        probe,
        scan,
    )
    from fencelock._record import HolderInfo, Phase, PreviousHolder, State
    from fencelock._recovery import Action, Recovery, fresh_session, recover
    from fencelock._tokens import STAMP_KEY
    from fencelock._verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "STAMP_KEY",
    "Action",
    "CoordinationError",
    "CorruptRecordError",
    "FenceLockError",
    "FenceLockWarning",
    "FenceMode",
    "Fingerprint",
    "HolderInfo",
    "HolderLostError",
    "HolderStatus",
    "LockOwner",
    "NotHeldError",
    "Phase",
    "PlantedFileError",
    "PreviousHolder",
    "ProbeState",
    "Recovery",
    "SessionContendedError",
    "SessionLock",
    "SessionTakeoverError",
    "SessionWriteError",
    "SidecarAccessError",
    "State",
    "StoreUnavailableError",
    "UnsafePathError",
    "UnsafeSidecarError",
    "VerifyReport",
    "__version__",
    "clear",
    "fresh_session",
    "is_coordination_error",
    "probe",
    "recover",
    "scan",
    "verify",
]

# Where each public name is defined; must match the imports under TYPE_CHECKING above.
_SOURCES = {
    "fencelock._errors": (
        "CoordinationError",
        "CorruptRecordError",
        "FenceLockError",
        "FenceLockWarning",
        "HolderLostError",
        "NotHeldError",
        "PlantedFileError",
        "SessionContendedError",
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
    "fencelock._record": ("HolderInfo", "Phase", "PreviousHolder", "State"),
    "fencelock._recovery": ("Action", "Recovery", "fresh_session", "recover"),
    "fencelock._tokens": ("STAMP_KEY",),
    "fencelock._verify": ("VerifyReport", "verify"),
}
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}


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
