"""fencelock: one run-level holder per agent session file, visible to every process.

A `SessionLock` holds ``<session>.holder`` with an OS advisory lock for a run's whole
life, prompt window included, and writes a JSON record saying who holds it. `probe`,
`scan`, `clear` and `recover` look at and repair holders from outside. Everything
public is listed in ``__all__``; modules starting with ``_`` are internal.
"""

from fencelock._errors import (
    CoordinationError,
    CorruptRecordError,
    FenceLockError,
    FenceLockWarning,
    NotHeldError,
    SessionContendedError,
    SessionTakeoverError,
    SessionWriteError,
    SidecarAccessError,
    UnsafePathError,
    UnsafeSidecarError,
    is_coordination_error,
)
from fencelock._fingerprint import FenceMode, Fingerprint
from fencelock._lock import SessionLock
from fencelock._probe import DEFAULT_STUCK_AFTER, HolderStatus, ProbeState, clear, probe, scan
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
    "HolderStatus",
    "NotHeldError",
    "Phase",
    "PreviousHolder",
    "ProbeState",
    "Recovery",
    "SessionContendedError",
    "SessionLock",
    "SessionTakeoverError",
    "SessionWriteError",
    "SidecarAccessError",
    "State",
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
