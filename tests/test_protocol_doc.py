"""docs/PROTOCOL.md against fencelock: the record bytes it documents, the bounds it
states, and the tests its conformance section names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fencelock import SessionLock, probe
from fencelock._fingerprint import TAIL_BYTES
from fencelock._hold import MAX_REQUEST
from fencelock._record import MAX_RECORD, MAX_TEXT, STATE_OFFSET
from fencelock._tokens import RESERVE, XATTR

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "PROTOCOL.md"


def _js(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def test_record_bytes_follow_the_documented_layout(session: Path) -> None:
    lock = SessionLock(session, "heartbeat:é", fence="stat")  # non-ASCII stays UTF-8
    with lock:
        lock.append({"role": "user"})
        lock.touch()  # the write phase's record may lag an append; a heartbeat writes it
        r = lock.info
        assert r is not None and r.fingerprint is not None
        fp = r.fingerprint
        expected = (
            '{"version":1,"state":"held"    ,"phase":"write" ,"token":'
            f"{r.token:<20}"
            f',"run_id":{_js(r.run_id)},"pid":{r.pid},"host":{_js(r.host)}'
            f',"process_start":{_js(r.process_start)},"session":{_js(str(session))}'
            f',"lane":{_js("heartbeat:é")},"fence":"stat"'
            f',"acquired_at":{r.acquired_at!r},"heartbeat_at":{r.heartbeat_at!r}'
            f',"fingerprint":{{"dev":{fp.dev},"ino":{fp.ino},"size":{fp.size}'
            f',"mtime_ns":{fp.mtime_ns},"ctime_ns":{fp.ctime_ns}}},"previous":null}}\n'
        ).encode()
        data = Path(str(session) + ".holder").read_bytes()
        assert data.rstrip(b" ") == expected
        assert "é".encode() in data
    released = Path(str(session) + ".holder").read_bytes()
    assert released[:21] == b'{"version":1,"state":' and released[21:31] == b'"released"'
    assert released[:21] + b'"held"    ' + released[31:] == data


def test_a_record_written_from_the_document_is_read(session: Path) -> None:
    # Another implementation's record: any JSON layout, a field fencelock does not know,
    # written by a process that has since died (so the session is stale).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    record = {
        "version": 1, "state": "held", "phase": "prompt", "token": 41,
        "run_id": "go-1", "pid": int(dead.stdout), "host": os.uname().nodename,
        "process_start": "", "session": str(session), "lane": "go:worker",
        "fence": "stat", "acquired_at": 1.5, "heartbeat_at": 2.5,
        "fingerprint": None, "previous": None, "written_by": "another holder",
    }
    Path(str(session) + ".holder").write_text(json.dumps(record, indent=2) + "\n")
    status = probe(session)
    assert status.state == "stale" and status.record is not None
    assert status.record.lane == "go:worker" and status.record.token == 41
    with SessionLock(session, "py", on_contention="fail") as lock:
        info = lock.info
        assert info is not None and info.token == 42
        assert info.previous is not None and info.previous.run_id == "go-1"
    assert probe(session).state == "free"


def test_bounds_and_offsets_in_the_document_are_the_code_s() -> None:
    text = DOC.read_text()
    assert f"{MAX_REQUEST:,}" in text and MAX_REQUEST == 8 * 1024 * 1024
    assert f"{MAX_RECORD:,}" in text
    assert f"{MAX_TEXT:,}" in text
    assert f"offset {STATE_OFFSET}" in text
    assert f"min(size, {TAIL_BYTES})" in text
    assert f"per {RESERVE} acquisitions" in text and f"token + {RESERVE - 1}" in text
    assert f"`{XATTR}`" in text


def test_every_conformance_test_named_here_exists() -> None:
    names = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC.read_text())
    assert len(names) > 40
    missing = []
    for path, name in names:
        source = (ROOT / path).read_text()
        if not re.search(rf"^(async )?def {name}\(", source, re.M):
            missing.append(f"{path}::{name}")
    assert missing == []
