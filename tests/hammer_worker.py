"""A worker that hammers one session (tests only):
``session log counter turns [timeout [work]]``.

With ``FENCELOCK_HAMMER_FLOOR=1`` in its environment it holds with the benchmark's
`FloorEtcdLock` on ``$FENCELOCK_BACKEND`` instead of a SessionLock (no timeout).

With a timeout, a turn whose wait runs out is skipped (and leaves the queue); ``work``
is how long each turn holds the session between its two log lines (simulated work).

Waits for a line on stdin (a start barrier), then runs its turns. Inside each hold it
logs ``enter``/``exit`` with its pid and does a read-modify-write on a counter file:
any overlap of two holders shows as an interleaved log or a lost increment.
"""

from __future__ import annotations

import os
import sys
import time

from fencelock import SessionContendedError, SessionLock


def main() -> None:
    session, log, counter, turns = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    work = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    pid = os.getpid()
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    floor = None
    if os.environ.get("FENCELOCK_HAMMER_FLOOR"):
        from fencelock.tools.etcd_floor import FloorEtcdLock

        floor = FloorEtcdLock(os.environ["FENCELOCK_BACKEND"], session)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    for _ in range(turns):
        lock: SessionLock | FloorEtcdLock = floor or SessionLock(
            session, lane=f"worker-{pid}", timeout=timeout)
        try:
            lock.acquire()
        except SessionContendedError:
            continue
        try:
            os.write(log_fd, f"enter {pid}\n".encode())
            with open(counter, "r+") as f:
                value = int(f.read() or "0")
                f.seek(0)
                f.write(str(value + 1))
                f.truncate()
            if work:
                time.sleep(work)
            os.write(log_fd, f"exit {pid}\n".encode())
        finally:
            lock.release()
    os.close(log_fd)
    if floor is not None:
        floor.close()


if __name__ == "__main__":
    main()
