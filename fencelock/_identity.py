"""Who a process is: pid, host and a start token that survives PID reuse.

The start token is ``<starttime>@<boot id>@<pid namespace>`` on Linux: field 22 of
``/proc/<pid>/stat`` (clock ticks since boot, immune to wall-clock changes), the
kernel's boot id, and the PID namespace inode. Elsewhere it is empty and liveness is
unknowable (None). Nothing here ever sends a signal.

The kernel shows field 22 shifted by the *reader's* time namespace boottime offset
(a checkpoint-restored container, ``unshare --time``), so each process takes its own
offset off what it reads: start ticks are counted from the host's boot everywhere,
and a holder in one time namespace is known as alive from another.
"""

from __future__ import annotations

import itertools
import os

_PROC = "/proc"
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)  # no O_CLOEXEC on Windows


def _read(path: str) -> str | None:
    """A small /proc file's text (a few hundred bytes; read in one call, as the kernel
    generates it), None where it cannot be read. Plain descriptor calls: a scan asks
    this for every stale record, and a file object costs it twice as much."""
    try:
        fd, = map(os.open, (path,), (_READ_FLAGS,))  # see `_sidecar.open_regular`
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if no such process."""
    text = _read(f"{_PROC}/{pid}/stat")
    if not text:
        return None
    # The command name may hold spaces and parentheses; it ends at the last ')'.
    rest = text[text.rfind(")") + 2 :]
    return rest.split()


def boot_id() -> str:
    return _read(f"{_PROC}/sys/kernel/random/boot_id") or ""


def pid_namespace(pid: int | str = "self") -> str:
    try:
        link = os.readlink(f"{_PROC}/{pid}/ns/pid")
    except OSError:
        return ""
    return link[link.find("[") + 1 : -1] if "[" in link else link


def _tick_ns() -> int:
    """A clock tick of /proc's process start times, in nanoseconds (10 ms most often)."""
    try:
        return 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError, ZeroDivisionError):
        return 10_000_000  # no sysconf (Windows): no /proc either


_TICK_NS = _tick_ns()


def _boottime_offset() -> tuple[int, bool] | None:
    """This process's time namespace's boottime offset, as (whole clock ticks, whether
    there is a part tick left over); (0, False) in the host's namespace or where there
    are none. None where it cannot be told: the process has entered a time namespace
    for its children only (``/proc/self/timens_offsets`` shows theirs, not its own)."""
    text = _read(f"{_PROC}/self/timens_offsets")
    if text is None:
        return 0, False
    try:
        if os.readlink(f"{_PROC}/self/ns/time") != os.readlink(
                f"{_PROC}/self/ns/time_for_children"):
            return None
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name == "boottime":
            try:
                seconds, nanoseconds = (int(n) for n in rest.split())
            except ValueError:
                return None
            ticks, part = divmod(seconds * 1_000_000_000 + nanoseconds, _TICK_NS)
            return ticks, part != 0
    return 0, False


_OFFSET: tuple[int, bool] | None = (0, False)
"""`_boottime_offset`, read as `ME` is made and again after fork (`_Self.refresh`): a
child forked after ``unshare(CLONE_NEWTIME)`` lives in the new namespace."""


_WRAPPED = 2**63 // _TICK_NS
"""Field 22 at or past this many ticks has wrapped: a process that started before this
reader's time namespace's zero (an offset below zero), which the kernel's unsigned sum
of nanoseconds makes a count near 2**64 ns."""


def _count(text: str) -> int | None:
    """A count of clock ticks written in ASCII digits (at most 19), else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None


def _start_ticks(fields: list[str]) -> int | None:
    """Field 22 of a /proc stat (``fields`` after the command name), counted from the
    host's boot: the kernel adds this reader's time namespace offset, taken off here.
    None where that cannot be told: the offset unknown, or the sum wrapped."""
    offset = _OFFSET
    # Field 22 overall is index 19 once pid and comm are dropped.
    ticks = _count(fields[19]) if offset is not None and len(fields) >= 20 else None
    if offset is None or ticks is None or ticks >= _WRAPPED:
        return None
    return ticks - offset[0]


def process_start(pid: int) -> str:
    """The start token of ``pid`` as seen from here, "" where it cannot be read."""
    fields = _stat_fields(pid)
    ticks = None if fields is None else _start_ticks(fields)
    if ticks is None:
        return ""
    return f"{ticks}@{boot_id()}@{pid_namespace()}"


def _gethostname() -> str:
    import socket

    return socket.gethostname()


class _Self:
    """This process's identity, recomputed after fork."""

    def __init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        global _OFFSET
        _OFFSET = _boottime_offset()
        self.pid = os.getpid()
        # os.uname().nodename is what gethostname() returns on POSIX, without
        # importing socket at start-up.
        self.host = os.uname().nodename if hasattr(os, "uname") else _gethostname()
        self.start = process_start(self.pid)


ME = _Self()


class _RunIds:
    """Unique run ids without a syscall each: a random per-process prefix and a counter,
    in hex digits, '-' and digits only, which a record writes with no escaping
    (`_record.middle_of`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)  # next() on it is atomic under the GIL

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter)}"


RUN_IDS = _RunIds()
"""Where each acquisition's ``run_id`` comes from (a forked child starts a new prefix)."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=ME.refresh)
    os.register_at_fork(after_in_child=RUN_IDS.reset)


def _local_start(host: str, start: str) -> tuple[str, bool, bool] | None:
    """A process start recorded on this host, against this process's own: (its clock
    ticks, same boot, same PID namespace); None where that cannot be told (another
    host, no start recorded, or none known here)."""
    if host != ME.host or not start or not ME.start:
        return None
    try:
        ticks, boot, ns = start.split("@")
    except ValueError:
        return None
    _, my_boot, my_ns = ME.start.split("@")
    return ticks, boot == my_boot, ns == my_ns


def in_other_pid_namespace(host: str, start: str) -> bool:
    """Whether a process recorded as started ``start`` on ``host`` ran in another PID
    namespace of this host (a container): its pid names another process here, or none.
    False where that cannot be told."""
    known = _local_start(host, start)
    return known is not None and known[1] and not known[2]


def owner_alive(pid: int, host: str, start: str) -> bool | None:
    """Is the process named by (pid, host, start) still running?

    None when it cannot be known from here: another host, another PID namespace, or a
    platform without /proc. A zombie counts as dead: it holds no locks.
    """
    known = _local_start(host, start)
    if known is None:
        return None
    ticks, same_boot, same_ns = known
    if not same_boot:
        return False  # recorded before the last reboot
    if not same_ns:
        return None
    fields = _stat_fields(pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X", "x"):
        return False
    now = _start_ticks(fields)
    if now is None:
        return None
    recorded = _count(ticks)
    if recorded is None:
        return False  # no start this process could have had
    # Where a time namespace's offset is not a whole number of ticks, the kernel's
    # rounding puts the start one tick later for a reader in it: the writer's count
    # may be one more than this reader's, or (this reader's offset being such) one less.
    # A reused PID started later than the owner did, never earlier: only the count one
    # less could be that, and one tick after the owner's start it cannot be.
    behind = recorded - now
    return behind == 0 or behind == 1 or (behind == -1 and bool(_OFFSET and _OFFSET[1]))
