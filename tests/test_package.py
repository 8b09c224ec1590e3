"""The package's public names: importable from ``fencelock`` though loaded lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import fencelock

# Each public name and the private module that defines it.
DEFINED_IN = {
    **dict.fromkeys(
        [
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
        ],
        "fencelock._errors",
    ),
    "FenceMode": "fencelock._fingerprint",
    "Fingerprint": "fencelock._fingerprint",
    "SessionLock": "fencelock._lock",
    "LockOwner": "fencelock._platform",
    **dict.fromkeys(
        ["DEFAULT_STUCK_AFTER", "HolderStatus", "ProbeState", "clear", "probe", "scan"],
        "fencelock._probe",
    ),
    **dict.fromkeys(["HolderInfo", "Phase", "PreviousHolder", "State"], "fencelock._record"),
    **dict.fromkeys(["Action", "Recovery", "fresh_session", "recover"], "fencelock._recovery"),
    "STAMP_KEY": "fencelock._tokens",
    "VerifyReport": "fencelock._verify",
    "verify": "fencelock._verify",
}


def test_all_lists_every_public_name() -> None:
    assert sorted(fencelock.__all__) == sorted([*DEFINED_IN, "__version__"])
    assert fencelock.__version__ == "0.1.0"


@pytest.mark.parametrize("name", sorted(DEFINED_IN))
def test_every_public_name_is_the_defining_modules_object(name: str) -> None:
    module = importlib.import_module(DEFINED_IN[name])
    assert getattr(fencelock, name) is getattr(module, name)
    namespace: dict[str, object] = {}
    exec(f"from fencelock import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_in_a_fresh_interpreter() -> None:
    """Importing the package loads no core module; names load on use; * and dir() work."""
    code = (
        "import sys, fencelock\n"
        "assert [m for m in sys.modules if m.startswith('fencelock.')] == [], sys.modules\n"
        "from fencelock import SessionLock\n"
        "import fencelock._lock\n"
        "assert SessionLock is fencelock._lock.SessionLock\n"
        "assert set(fencelock.__all__) <= set(dir(fencelock))\n"
        "ns = {}\n"
        "exec('from fencelock import *', ns)\n"
        "assert set(fencelock.__all__) <= set(ns), set(fencelock.__all__) - set(ns)\n"
        "try:\n"
        "    fencelock.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
