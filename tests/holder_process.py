"""A holder in its own process, driven line by line over stdin (tests only).

Prints ``ready`` once started, then answers each command with one line:
``acquire`` -> ``acquired <token>`` or ``contended``; ``append <json>``; ``prompt``
(enter the prompt window); ``endprompt``; ``release``; ``touch``; ``drop`` (close the
sidecar's descriptor behind the lock's back); ``head released`` and ``head held`` (the
record's head rewritten in place, the lock kept: a run that has just taken the lock over
a released record has not yet written its own); ``exit``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Literal

from fencelock import SessionContendedError, SessionLock, _record

MODES: dict[str, Literal["wait", "fail"]] = {"wait": "wait", "fail": "fail"}


def main() -> None:
    session, lane, on_contention = sys.argv[1], sys.argv[2], sys.argv[3]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    lock = SessionLock(session, lane, on_contention=MODES[on_contention], timeout=timeout)
    window = None
    out = sys.stdout
    out.write(f"ready {os.getpid()}\n")
    out.flush()
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "acquire":
                info = lock.acquire()
                reply = f"acquired {info.token}"
            elif cmd == "append":
                lock.append(json.loads(arg))
                reply = "ok"
            elif cmd == "prompt":
                window = lock.prompt_window()
                window.__enter__()
                reply = "ok"
            elif cmd == "endprompt":
                assert window is not None
                window.__exit__(None, None, None)
                reply = "ok"
            elif cmd == "touch":
                lock.touch()
                reply = "ok"
            elif cmd == "release":
                lock.release()
                reply = "released"
            elif cmd == "drop":
                # The lock let go as a dying process's is, the record left "held" and
                # the process running (for a moment, as it exits).
                os.close(lock._store._fd)  # type: ignore[attr-defined]
                reply = "dropped"
            elif cmd == "head":
                head = {"released": _record.RELEASED_HEAD, "held": _record.HELD_WRITE_HEAD}
                os.pwrite(lock._store._fd, head[arg], 0)  # type: ignore[attr-defined]
                reply = "ok"
            elif cmd == "exit":
                return
            else:
                reply = f"unknown {cmd}"
        except SessionContendedError:
            reply = "contended"
        except Exception as e:  # reported to the test, which decides
            reply = f"error {type(e).__name__}: {e}"
        out.write(reply + "\n")
        out.flush()


if __name__ == "__main__":
    main()
