"""A worker that hammers one session (tests only): ``session log counter turns``.

Waits for a line on stdin (a start barrier), then runs its turns. Inside each hold it
logs ``enter``/``exit`` with its pid and does a read-modify-write on a counter file:
any overlap of two holders shows as an interleaved log or a lost increment.
"""

from __future__ import annotations

import os
import sys

from fencelock import SessionLock


def main() -> None:
    session, log, counter, turns = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    pid = os.getpid()
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    for _ in range(turns):
        with SessionLock(session, lane=f"worker-{pid}"):
            os.write(log_fd, f"enter {pid}\n".encode())
            with open(counter, "r+") as f:
                value = int(f.read() or "0")
                f.seek(0)
                f.write(str(value + 1))
                f.truncate()
            os.write(log_fd, f"exit {pid}\n".encode())
    os.close(log_fd)


if __name__ == "__main__":
    main()
