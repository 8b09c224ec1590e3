"""Process identity: (pid, host, start token) tells a live owner from a reused PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from marks import needs_linux

from fencelock import _identity
from fencelock._identity import ME, owner_alive, process_start


def test_self_is_alive() -> None:
    assert ME.start
    assert owner_alive(ME.pid, ME.host, ME.start) is True


def test_start_token_has_ticks_boot_id_and_namespace() -> None:
    ticks, boot, ns = process_start(ME.pid).split("@")
    assert ticks.isdigit() and len(boot) == 36 and ns.isdigit()


def test_reused_pid_is_not_the_owner() -> None:
    # Our own pid, but a start time it never had: a recycled PID.
    ticks, boot, ns = ME.start.split("@")
    forged = f"{int(ticks) - 1}@{boot}@{ns}"
    assert owner_alive(ME.pid, ME.host, forged) is False


def test_dead_process_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    start = process_start(child.pid)
    assert owner_alive(child.pid, ME.host, start) is True
    assert child.stdin is not None
    child.stdin.close()
    child.wait()
    assert owner_alive(child.pid, ME.host, start) is False


def test_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    start = process_start(child.pid)
    assert child.stdin is not None
    child.stdin.close()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    try:
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z"
        assert owner_alive(child.pid, ME.host, start) is False
    finally:
        child.wait()


def test_other_host_or_namespace_is_unknowable() -> None:
    assert owner_alive(ME.pid, ME.host + "-elsewhere", ME.start) is None
    ticks, boot, _ = ME.start.split("@")
    assert owner_alive(ME.pid, ME.host, f"{ticks}@{boot}@1") is None
    assert owner_alive(ME.pid, ME.host, "") is None


def test_record_from_before_a_reboot_is_dead() -> None:
    ticks, _, ns = ME.start.split("@")
    before_reboot = f"{ticks}@00000000-0000-0000-0000-000000000000@{ns}"
    assert owner_alive(ME.pid, ME.host, before_reboot) is False


RENAME_SELF = """
import ctypes, sys
print("started", flush=True)
sys.stdin.readline()
ctypes.CDLL(None, use_errno=True).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
print("renamed", flush=True)
sys.stdin.readline()
"""


@needs_linux  # prctl, and /proc
def test_command_names_with_parentheses_and_spaces_parse() -> None:
    # /proc/<pid>/stat puts the command in parentheses, and the command may itself
    # hold ") " and spaces: a process renamed so must keep its start token.
    name = "py) x (y"
    child = subprocess.Popen([sys.executable, "-c", RENAME_SELF, name],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "started\n"
        start = process_start(child.pid)  # read while the name is plain
        assert start.split("@")[0].isdigit()
        child.stdin.write("rename\n")
        child.stdin.flush()
        assert child.stdout.readline() == "renamed\n"
        assert Path(f"/proc/{child.pid}/comm").read_text() == name + "\n"
        assert f"({name})" in Path(f"/proc/{child.pid}/stat").read_text()
        fields = _identity._stat_fields(child.pid)
        assert fields is not None and fields[0] in "RS"
        assert process_start(child.pid) == start
        assert owner_alive(child.pid, ME.host, start) is True
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()
