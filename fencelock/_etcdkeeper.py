"""What an inherited flock descriptor does for a sidecar, for a holder in etcd: a small
process that keeps the holder's lease alive while `fencelock run`, its command, or
anything the command left running with the hold's descriptor still lives.

`fencelock run` makes two pipes. The command inherits the write end of the first as
``FENCELOCK_FD``, as it would inherit a sidecar's locked descriptor; `fencelock run`
keeps the only write end of the second. The keeper holds the read ends and renews the
lease every ``ttl/4`` seconds until both pipes read end of file: every process that
could write for the run is gone. Then it revokes the lease, so the session is free
(released) or stale (the wrapper was killed mid-run) at once, not a TTL later.

A run whose holder counts itself lost (its lease could not be confirmed in time, or
etcd expired it) no longer holds the session: `fencelock run` stops its command
(SIGTERM, then SIGKILL after a grace period) and writes a byte to the second pipe, on
which the keeper stops renewing and revokes the lease, so that nothing keeps a holder
alive in etcd that its own run counts as lost.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fencelock._etcd import EtcdHolder
    from fencelock._lock import SessionLock

_RETRY = 0.2
"""How soon a keepalive that etcd did not answer is tried again."""
STOP_GRACE = 5.0
"""How long a command stopped because its run's holder was lost has between SIGTERM
and SIGKILL."""
_GIVE_UP = b"L"
"""What `fencelock run` writes to its pipe when its holder is lost: stop renewing."""


class Keeper:
    """The keeper process of one `fencelock run` whose holder lives in etcd."""

    def __init__(self, proc: subprocess.Popen[bytes], holder: EtcdHolder, command_fd: int,
                 probe_fd: int, wrapper_fd: int) -> None:
        self.proc = proc
        self.holder = holder
        self.command_fd = command_fd
        """The write end the command inherits (``FENCELOCK_FD``)."""
        self._probe_fd = probe_fd
        self._wrapper_fd = wrapper_fd
        self.lost = ""
        """Why the run's holder was found lost while the command ran (then the command
        was stopped, and the keeper is told to stop renewing at `close`)."""
        self._ended = threading.Event()

    def guard(self, command: subprocess.Popen[bytes]) -> None:
        """Stop ``command`` if the run's holder is lost while it runs: from then on
        another run may hold the session, and the command's writes go around the fence.
        `ended` must be called once it has exited."""
        threading.Thread(target=self._stop_on_loss, args=(command,),
                         name="fencelock-run-guard", daemon=True).start()

    def ended(self) -> None:
        """The command has exited (and was waited for)."""
        self._ended.set()

    def _stop_on_loss(self, command: subprocess.Popen[bytes]) -> None:
        from fencelock._output import error_line

        why = ""
        while not why:
            if self._ended.is_set():
                return
            why = self.holder.lost_within(1.0)
        self.lost = why
        if self._ended.is_set():
            return
        error_line(f"{self.holder.session}: this run lost its holder ({why}); another run may "
                   f"hold the session now: stopping the command (pid {command.pid})")
        command.send_signal(signal.SIGTERM)  # nothing once it has been waited for
        if not self._ended.wait(STOP_GRACE):
            error_line(f"{self.holder.session}: the command (pid {command.pid}) did not exit "
                       f"within {STOP_GRACE:g} s of SIGTERM: killed")
            command.kill()

    def left_running(self) -> bool:
        """Whether a process other than this one still holds the command's descriptor
        (the command, or what it left running): a pipe reports hang-up only once no
        write end is open anywhere."""
        if self.command_fd >= 0:
            os.close(self.command_fd)
            self.command_fd = -1
        poller = select.poll()
        poller.register(self._probe_fd, select.POLLIN)
        return not any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))

    def release(self, lock: SessionLock) -> None:
        """Release the session the way `fencelock run` does at the command's end: at
        once when nothing the command left holds its descriptor; otherwise mark the
        record released and leave the holder to the keeper, which revokes it when the
        last of them exits."""
        from fencelock._errors import HolderLostError

        try:
            if self.left_running():
                lock._release_shared(kept=True)
            else:
                lock.release()
        except HolderLostError:
            if not self.lost:  # said already, when the command was stopped
                raise
        finally:
            self.close()

    def close(self) -> None:
        """This process is done: the keeper carries on only for what is left, and not
        at all once the holder was lost."""
        if self.lost and self._wrapper_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wrapper_fd, _GIVE_UP)
        for name in ("command_fd", "_probe_fd", "_wrapper_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


def start(lock: SessionLock) -> Keeper | None:
    """Start the keeper for ``lock``'s etcd holder; None for a sidecar holder (its
    locked descriptor is shared instead) or when no keeper can be started (the session
    is then held as long as this process lives, as before)."""
    from fencelock._etcd import EtcdHolder

    store = getattr(lock._store, "holder", None)  # a RemoteStore's driver
    if not isinstance(store, EtcdHolder) or store.lease_id is None:
        return None
    url = store.url
    endpoints = ",".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in url.endpoints)
    probe_r, command_w = os.pipe()
    wrapper_r, wrapper_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fencelock._etcdkeeper", endpoints, f"{url.ttl:g}",
             f"{store.lease_id:x}", str(probe_r), str(wrapper_r)],
            pass_fds=(probe_r, wrapper_r), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # not the terminal's: Ctrl-C is for the command
        )
    except OSError:
        for fd in (probe_r, command_w, wrapper_r, wrapper_w):
            os.close(fd)
        return None
    os.close(wrapper_r)
    return Keeper(proc, store, command_w, probe_r, wrapper_w)


def keep(endpoints: str, ttl: float, lease_id: int, command_fd: int, wrapper_fd: int) -> None:
    """Renew ``lease_id`` until both pipes read end of file, then revoke it. Stops early
    when the lease is gone (nothing left to keep), and stops renewing at once when
    `fencelock run` says its holder is lost (`_GIVE_UP` on ``wrapper_fd``)."""
    from fencelock import _backend, _etcd
    from fencelock._errors import StoreUnavailableError

    url = _backend.parse(f"etcd://{endpoints}/_?ttl={ttl:g}")
    assert url is not None
    cluster = _etcd.cluster(url)
    poller = select.poll()
    for fd in (command_fd, wrapper_fd):
        poller.register(fd, select.POLLIN)
    open_fds = {command_fd, wrapper_fd}
    due = time.monotonic()
    while open_fds:
        wait = max(0.0, due - time.monotonic())
        for fd, ev in poller.poll(wait * 1000):
            data = b""
            if ev & select.POLLIN:
                with contextlib.suppress(OSError):
                    data = os.read(fd, 4096)  # what a command wrote there is dropped
            if fd == wrapper_fd and _GIVE_UP in data:
                open_fds.clear()
            elif not data:  # end of file: every write end is closed
                poller.unregister(fd)
                open_fds.discard(fd)
        if not open_fds or time.monotonic() < due:
            continue
        try:
            r = cluster.call("/lease/keepalive", {"ID": lease_id})
        except StoreUnavailableError:
            due = time.monotonic() + _RETRY
            continue
        if int(r.get("result", {}).get("TTL", -1)) <= 0:
            return  # expired or revoked: nothing holds the session any more
        due = time.monotonic() + ttl / 4
    # Revoked now, or expired within its TTL once etcd answers again: nobody renews it.
    end = time.monotonic() + ttl
    while True:
        try:
            cluster.call("/kv/lease/revoke", {"ID": lease_id})
            return
        except StoreUnavailableError as e:
            if _etcd._LEASE_GONE in e.why or time.monotonic() >= end:
                return
            time.sleep(_RETRY)


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    endpoints, ttl, lease, command_fd, wrapper_fd = argv
    keep(endpoints, float(ttl), int(lease, 16), int(command_fd), int(wrapper_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
