"""``python cutting_hold.py hold ...``: ``fencelock hold`` as a caller sees it when hold
stops in the middle of an answer (a second stop signal while the answer waited for
room): the real hold runs behind it, and the answer to the second append is cut in half,
without its newline, then hold is stopped with SIGTERM and this exits as it does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

child = subprocess.Popen([sys.executable, "-m", "fencelock", *sys.argv[1:]],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
assert child.stdin is not None and child.stdout is not None
to_hold = child.stdin


def relay() -> None:
    for line in sys.stdin.buffer:
        to_hold.write(line)
        to_hold.flush()


threading.Thread(target=relay, daemon=True).start()
appends = 0
for answer in child.stdout:
    if b'"op": "append"' in answer:
        appends += 1
        if appends == 2:
            sys.stdout.buffer.write(answer[: len(answer) // 2])
            sys.stdout.buffer.flush()
            child.terminate()
            code = child.wait()
            os._exit(code if code >= 0 else 128 - code)  # the relay blocks in a read
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()
sys.exit(child.wait())
