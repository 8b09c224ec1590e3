"""A kill-chaos writer (tests only): runs turns on one session until told to stop.

A turn is: acquire, fenced append (part 1), prompt window, fenced append (part 2),
release. Every fact the driver needs is reported on stdout, one line per event, each
written with a single ``os.write`` *after* the library call returned, so a line the
driver sees as acknowledged is one the library said was durable:

    ready <pid>
    acq <token> <run_id> <prev_pid|-> <prev_token|-> <prev_run_id|->
    ack <run_id> <part>
    rel <run_id>            (about to release)
    done <run_id>           (released)
    err <type> <message>    (anything unexpected; the writer then exits 1)

Writes go through the library's ``_fence._write`` seam cut into short writes, so a
SIGKILL can land in the middle of a line and leave a torn tail for the next holder
to repair. Usage: ``chaos_writer.py SESSION INDEX SEED STOPFILE MAX_PROMPT``.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import TYPE_CHECKING

from fencelock import SessionLock, _fence

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12


def report(text: str) -> None:
    os.write(1, (text + "\n").encode())


def main() -> int:
    session, index, seed, stopfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    max_prompt = float(sys.argv[5])
    rng = random.Random(seed)
    real_write = _fence._write

    def short_write(fd: int, data: Buffer) -> int:
        # Short writes are legal for write(2); the library must loop. Yielding between
        # pieces widens the window in which a SIGKILL leaves a torn line.
        n = real_write(fd, bytes(memoryview(data)[: rng.randint(16, 96)]))
        os.sched_yield()
        return n

    _fence._write = short_write
    lock = SessionLock(session, f"chaos:{index}", stamp=True)
    pid = os.getpid()
    report(f"ready {pid}")
    turn = 0
    try:
        while not os.path.exists(stopfile):
            info = lock.acquire()
            prev = info.previous
            report(
                f"acq {info.token} {info.run_id} "
                + (f"{prev.pid} {prev.token} {prev.run_id}" if prev else "- - -")
            )
            pad = "x" * rng.randint(0, 600)
            base = {"w": index, "pid": pid, "run": info.run_id, "turn": turn}
            lock.append({**base, "part": 1, "pad": pad})
            report(f"ack {info.run_id} 1")
            with lock.prompt_window():
                time.sleep(rng.uniform(0, max_prompt))  # the simulated model call
            lock.append({**base, "part": 2, "pad": pad})
            report(f"ack {info.run_id} 2")
            report(f"rel {info.run_id}")
            lock.release()
            report(f"done {info.run_id}")
            turn += 1
    except Exception as e:  # reported to the driver, which counts it as a violation
        report(f"err {type(e).__name__} {str(e).replace(chr(10), ' ')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
