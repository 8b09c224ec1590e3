"""Run a snippet of fencelock code as another user (tests only).

Tests run as root in CI containers, where permission checks do not apply (tests that
drop privileges carry ``marks.needs_root``). The snippet runs in a fresh interpreter
that imports what it needs first (the standard library may live under a directory the
other user cannot read), then drops to ``NOBODY`` with setgid/setuid, then runs. Its result
comes back as JSON: whatever the snippet assigns to ``result``, or
``{"error": <class name>, "message": <text>}``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NOBODY = 65534

_PRELUDE = """
import errno, fcntl, json, os, stat, sys, warnings
import urllib.parse  # a store's URL is parsed at acquire (3.13 no longer loads it at start)
import fencelock
from fencelock import *
{preload}
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
args = json.loads(sys.argv[1])
result = None
try:
{body}
except Exception as e:
    result = {{"error": type(e).__name__, "message": str(e)}}
print(json.dumps(result))
"""


def _code(body: str, uid: int, preload: tuple[str, ...] = (), gid: int | None = None) -> str:
    indented = "\n".join("    " + line for line in body.strip("\n").splitlines())
    imports = "".join(f"import {module}\n" for module in preload)
    return _PRELUDE.format(uid=uid, gid=uid if gid is None else gid, body=indented,
                           preload=imports)


def spawn_as_user(body: str, uid: int = NOBODY, **args: Any) -> subprocess.Popen[str]:
    """Start ``body`` as ``uid`` and return at once; talk to it over stdin/stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", _code(body, uid), json.dumps(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd="/",
    )


def as_user(body: str, timeout: float = 30, uid: int = NOBODY,
            preload: tuple[str, ...] = (), gid: int | None = None, **args: Any) -> Any:
    """Run ``body`` (statements; ``args`` is a dict) as ``uid`` (group ``gid``, else
    ``uid`` too); its ``result``.
    ``preload``: modules imported before the privileges are dropped (what ``body``
    imports later, as the etcd store does, must be readable by ``uid``)."""
    code = _code(body, uid, preload, gid)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, cwd="/",
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise AssertionError(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def open_directory(mode: int = 0o755) -> Iterator[Path]:
    """A fresh directory every user can reach (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="fencelock-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        sessions = base / "sessions"
        sessions.mkdir()
        sessions.chmod(mode)
        yield sessions
    finally:
        for root, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def mount_tmpfs(target: Path, size: str, ro: bool = False, inodes: int = 0) -> str | None:
    """Mount a small tmpfs on ``target`` (``inodes``: with room for that many files and
    directories); None on success, else why it cannot."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "needs Linux mount(8)"
    opts = f"size={size},mode=0755" + (",ro" if ro else "") + (
        f",nr_inodes={inodes}" if inodes else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.strip()}"
    return None


def mount_overlay(base: Path, options: str = "") -> tuple[Path, Path] | str:
    """Under ``base``: an overlayfs (``options`` added to its mount options) merging the
    ``lower`` directory (an image's layer, made if missing) into ``merged``; (lower,
    merged), or why it cannot be mounted. Unmount ``merged`` with `umount`."""
    lower, upper, work, merged = (base / name for name in ("lower", "upper", "work", "merged"))
    for directory in (lower, upper, work, merged):
        directory.mkdir(exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + (
        f",{options}" if options else "")
    done = subprocess.run(["mount", "-t", "overlay", "-o", opts, "overlay", str(merged)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount an overlayfs here: {done.stderr.strip()}"
    return lower, merged


def remount(target: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(target)], check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False)
