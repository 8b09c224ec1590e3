"""Process identity: (pid, host, start token) tells a live owner from a reused PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SpawnHolder
from marks import needs_linux, needs_timens

from fencelock import _identity, probe
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


# Offsets of a time namespace's boottime clock (seconds, nanoseconds): a whole number
# of clock ticks, a part tick over, and one behind the host's.
TIME_OFFSETS = [(3600, 0), (3600, 5_000_000), (-100, 7_000_000)]


def _in_time_namespace(offset: tuple[int, int]) -> list[str]:
    return [sys.executable, str(Path(__file__).parent / "timens.py"), *map(str, offset)]


def _status_from(prefix: list[str], session: Path) -> dict[str, object]:
    out = subprocess.run([*prefix, sys.executable, "-m", "fencelock", "status", "--json",
                          str(session)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert isinstance(rows, list) and len(rows) == 1
    row: dict[str, object] = rows[0]
    return row


@needs_timens
@pytest.mark.parametrize("offset", TIME_OFFSETS)
def test_holder_is_alive_seen_from_another_time_namespace(
    session: Path, spawn_holder: SpawnHolder, offset: tuple[int, int]
) -> None:
    # The kernel shifts a process's start in /proc/<pid>/stat by the reader's time
    # namespace offset (a checkpoint-restored container): a live holder on the host
    # must not read as dead, "not a fencelock holder", from inside one, nor the other
    # way round.
    holder = spawn_holder(session, "cron")
    holder.acquire()
    row = _status_from(_in_time_namespace(offset), session)
    assert (row["state"], row["owner_alive"], row["lane"]) == ("live", True, "cron")
    inside = spawn_holder(session.with_name("inside.jsonl"), "dm",
                          prefix=_in_time_namespace(offset))
    inside.acquire()
    row = _status_from([], session.with_name("inside.jsonl"))
    assert (row["state"], row["owner_alive"], row["lane"]) == ("live", True, "dm")
    info = probe(session.with_name("inside.jsonl"))
    assert info.owner_alive is True
    # Its start as recorded there is the one a reader here takes for its pid.
    assert info.record is not None
    assert info.record.process_start.split("@")[0] in {
        str(int(process_start(inside.pid).split("@")[0]) + d) for d in (0, 1)}


@needs_timens
def test_a_holder_older_than_a_time_namespace_s_zero_is_unknown_there_not_dead(
    session: Path, spawn_holder: SpawnHolder
) -> None:
    # A namespace whose boottime clock starts after the holder did (an offset below
    # zero) sees the holder's start wrap around in the kernel's unsigned sum: the
    # owner cannot be told from there (None), and is never called dead.
    holder = spawn_holder(session, "cron")
    holder.acquire()
    fields = _identity._stat_fields(holder.pid)
    assert fields is not None
    started_ns = int(fields[19]) * _identity._TICK_NS  # host's boot clock, to a tick
    offset = divmod(-(started_ns + 2 * _identity._TICK_NS), 1_000_000_000)
    row = _status_from(_in_time_namespace(offset), session)
    assert (row["state"], row["owner_alive"], row["lane"]) == ("live", None, "cron")


def test_start_one_tick_apart_is_the_owner_only_as_time_namespaces_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A writer in a time namespace whose offset is not whole clock ticks may count its
    # start one tick later than a reader here; a reused PID only ever started later.
    ticks, boot, ns = ME.start.split("@")

    def start(delta: int) -> str:
        return f"{int(ticks) + delta}@{boot}@{ns}"

    assert owner_alive(ME.pid, ME.host, start(1)) is True
    assert owner_alive(ME.pid, ME.host, start(2)) is False
    assert owner_alive(ME.pid, ME.host, start(-1)) is False
    assert owner_alive(ME.pid, ME.host, "x" + start(0)) is False
    # This reader in such a namespace: its own count may be the one a tick later.
    whole_ticks = (_identity._OFFSET or (0, False))[0]
    monkeypatch.setattr(_identity, "_OFFSET", (whole_ticks, True))
    assert owner_alive(ME.pid, ME.host, start(-1)) is True
    assert owner_alive(ME.pid, ME.host, start(-2)) is False
    # A reader that cannot tell its own offset cannot tell.
    monkeypatch.setattr(_identity, "_OFFSET", None)
    assert owner_alive(ME.pid, ME.host, start(0)) is None
    assert process_start(ME.pid) == ""


ENTERED_FOR_CHILDREN = """
import ctypes, sys
assert ctypes.CDLL(None, use_errno=True).unshare(0x80) == 0  # CLONE_NEWTIME
from fencelock import _identity
print(_identity._OFFSET, repr(_identity.ME.start))
"""


@needs_timens
def test_a_process_that_made_a_time_namespace_for_its_children_records_no_start() -> None:
    # /proc/self/timens_offsets then shows the children's offsets, not its own: it
    # cannot count its start from the host's boot, and records none (owner unknown).
    out = subprocess.run([sys.executable, "-c", ENTERED_FOR_CHILDREN], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout == "None ''\n"
