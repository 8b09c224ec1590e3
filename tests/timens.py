"""Run a command in a new time namespace (tests only).

``timens.py SECONDS NANOSECONDS COMMAND...``: the command's boottime clock runs that
far ahead of the host's (as in a checkpoint-restored container). Exits 3 with the
reason where no time namespace can be made (not root, Linux older than 5.6)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

CLONE_NEWTIME = 0x80


def main() -> int:
    seconds, nanoseconds, command = sys.argv[1], sys.argv[2], sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    # The caller stays where it is; the children it starts from here on are in it.
    if libc.unshare(CLONE_NEWTIME) != 0:
        print(f"unshare(CLONE_NEWTIME): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 3
    with open("/proc/self/timens_offsets", "w") as offsets:
        offsets.write(f"boottime {seconds} {nanoseconds}\n")
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
