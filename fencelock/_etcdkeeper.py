"""What an inherited flock descriptor does for a sidecar, for a holder in etcd: a small
process that keeps the holder's lease alive while `fencelock run`, its command, or
anything the command left running with the hold's descriptor still lives.

`fencelock run` makes two pipes. The command inherits the write end of the first as
``FENCELOCK_FD``, as it would inherit a sidecar's locked descriptor; `fencelock run`
keeps the only write end of the second. The keeper holds the read ends and renews the
lease every ``ttl/4`` seconds until both pipes read end of file: every process that
could write for the run is gone. Then it revokes the lease, so the session is free
(released) or stale (the wrapper was killed mid-run) at once, not a TTL later.

A run whose holder is lost (etcd says its lease or key is gone, or cannot be asked
before the lease may have expired) no longer holds the session: `fencelock run` stops
its command and what holds the first pipe with it (SIGTERM, then SIGKILL after a grace
period) and writes a byte to the second pipe, on which the keeper stops renewing and
revokes the lease, so that nothing keeps a holder alive in etcd that its own run gave
up. Once `fencelock run` is gone (killed, or ended with what its command left running
still holding the first pipe), that guard is the keeper's: it checks the run's key
with each renewal, and stops what holds the first pipe in the same way when the lease
or the key is gone, or when no renewal has vouched for the lease in time.
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
    from collections.abc import Callable

    from fencelock._etcd import EtcdHolder
    from fencelock._etcdcluster import Cluster
    from fencelock._lock import SessionLock

_RETRY = 0.2
"""How soon a keepalive that etcd did not answer is tried again."""
STOP_GRACE = 5.0
"""How long a command stopped because its run's holder was lost has between SIGTERM
and SIGKILL."""
_GIVE_UP = b"L"
"""What `fencelock run` writes to its pipe when its holder is lost: stop renewing."""
_PAUSED = b"P"
"""What `fencelock run` writes to its pipe, with the pids and a newline, before its
guard stops them while it asks etcd (`Keeper._pause`); ``_GOES_ON`` and a newline once
it has let them go on."""
_GOES_ON = b"C"
_ASK = 1.0
"""How long the guard gives etcd to say whether the run's lease is still there."""


def _sharing(pipe: int, besides: set[int]) -> list[int]:
    """The processes, other than ``besides``, that hold the pipe with inode ``pipe``
    open (Linux, from /proc; elsewhere none are found)."""
    found = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid not in besides and _holds(pid, pipe):
            found.append(pid)
    return found


def _holds(pid: int, pipe: int) -> bool:
    target = f"pipe:[{pipe}]"
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == target
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False  # gone, or another user's


def _signal(pids: list[int], pipe: int | None, signum: int) -> None:
    """Send ``signum`` to each of ``pids`` that holds the pipe ``pipe`` when signalled:
    each is pinned by a pidfd first, so a pid reused since it was found is never hit.
    With ``pipe`` None, to each (processes `Keeper._pause` stopped: stopped, none can
    have exited and had its pid reused since, unless killed). Where pidfds are missing,
    nothing is sent."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # gone
        try:
            if pipe is None or _holds(pid, pipe):  # still the holder, pinned by ``fd``
                signal.pidfd_send_signal(fd, signum)
        except OSError:
            pass
        finally:
            os.close(fd)


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (state ``T`` or ``t`` in /proc; False where it cannot
    be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _stop_writers(command_fd: int) -> None:
    """Stop every process but this one that holds the pipe of ``command_fd`` (the
    command of a run whose holder is lost, and what it left running): SIGTERM, then
    SIGKILL for what is left after `STOP_GRACE`."""
    pipe, me = os.fstat(command_fd).st_ino, {os.getpid()}
    _signal(_sharing(pipe, me), pipe, signal.SIGTERM)
    _signal(_still_sharing(pipe, me, time.monotonic() + STOP_GRACE), pipe, signal.SIGKILL)


def _still_sharing(pipe: int, besides: set[int], end: float) -> list[int]:
    """`_sharing`, once none are left or at ``end`` (monotonic): what is still there."""
    left = _sharing(pipe, besides)
    while left and time.monotonic() < end:
        time.sleep(_RETRY / 4)
        left = _sharing(pipe, besides)
    return left


def _pids(pids: list[int]) -> str:
    return ("pid " if len(pids) == 1 else "pids ") + ", ".join(map(str, pids))


class Keeper:
    """The keeper process of one `fencelock run` whose holder lives in etcd."""

    def __init__(self, proc: subprocess.Popen[bytes], holder: EtcdHolder, command_fd: int,
                 probe_fd: int, wrapper_fd: int) -> None:
        self.proc = proc
        self.holder = holder
        self.command_fd = command_fd
        """The write end the command inherits (``FENCELOCK_FD``)."""
        self._pipe = os.fstat(command_fd).st_ino
        self._probe_fd = probe_fd
        self._wrapper_fd = wrapper_fd
        self.lost = ""
        """Why the command was stopped: the run's holder was lost while it ran (the
        keeper is then told to stop renewing, at `close`)."""
        self._ended = threading.Event()
        self._mu = threading.Lock()
        self._guard: threading.Thread | None = None
        self._command: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._paused: list[int] = []
        """The processes the guard stopped (SIGSTOP), the command among them, while it
        asks etcd about a lease that may be expiring (`_loss`, `_pause`)."""

    def guard(self) -> None:
        """Start the guard that stops the command (handed to it by `watch`), and what
        holds ``FENCELOCK_FD`` with it, if the run's holder is lost while it runs: from
        then on another run may hold the session, and their writes go around the fence.
        Started before the command is: a thread that cannot be started then leaves no
        command running unguarded. `ended` must be called once the command has exited,
        or was not started."""
        self._guard = threading.Thread(target=self._stop_on_loss,
                                       name="fencelock-run-guard", daemon=True)
        self._guard.start()

    def watch(self, command: subprocess.Popen[bytes]) -> None:
        """The command the guard stops, now that it runs."""
        self._command = command
        self._started.set()

    def ended(self) -> None:
        """The command has exited (and was waited for), or was never started. If the
        guard is stopping what it left holding ``FENCELOCK_FD``, wait for that first."""
        with self._mu:
            self._ended.set()
            stopping = bool(self.lost)
        self._started.set()  # a guard still waiting for a command: there is none
        if stopping and self._guard is not None:
            self._guard.join()

    def _stop_on_loss(self) -> None:
        from fencelock._output import error_line

        why = self._loss()
        self._started.wait()  # a loss before the command started stops it all the same
        command = self._command
        with self._mu:  # decided against `ended`: stopped, or ended, never both
            if not why or self._ended.is_set() or command is None:
                self._pause(signal.SIGCONT)  # (what it left: ended by someone else)
                return
            self.lost = why
        besides = {os.getpid(), self.proc.pid, command.pid}  # this run, its keeper, its command
        sharing = _sharing(self._pipe, besides)
        named = f"the command (pid {command.pid})" + (
            f" and what holds FENCELOCK_FD with it ({_pids(sharing)})" if sharing else "")
        error_line(f"{self.holder.session}: this run lost its holder ({why}); another run may "
                   f"hold the session now: stopping {named}")
        end = time.monotonic() + STOP_GRACE
        command.send_signal(signal.SIGTERM)  # nothing once it has been waited for
        _signal(sharing, self._pipe, signal.SIGTERM)
        self._pause(signal.SIGCONT)  # stopped while etcd was asked: now to take SIGTERM
        self._ended.wait(STOP_GRACE)
        left = _still_sharing(self._pipe, besides, end)  # the rest of the grace, for those too
        stubborn = ([] if self._ended.is_set() else [command.pid]) + left
        if stubborn:
            error_line(f"{self.holder.session}: still running {STOP_GRACE:g} s after "
                       f"SIGTERM, killed: {_pids(stubborn)}")
            if not self._ended.is_set():
                command.kill()
            _signal(left, self._pipe, signal.SIGKILL)

    def _loss(self) -> str:
        """Block until the run's holder is lost (why), or the command ended ("").

        etcd is asked every ``ttl/4`` whether the lease and the run's key are there (a
        key deleted by hand frees the session as surely as an expiry). Counted from
        this process's clock alone (the lease could not be confirmed in time), a pause of
        this process (Ctrl-Z, a VM migration) looks like an expiry while the keeper kept
        the lease alive: while etcd answers that both are there, nobody else can hold
        the session."""
        from fencelock._errors import StoreUnavailableError
        from fencelock._etcdcluster import margin
        from fencelock._output import warning_line

        holder = self.holder
        safety = margin(holder.url.ttl)
        vouched_until = 0.0  # (monotonic) what etcd's last answer vouches for
        while True:
            if vouched_until:
                left = vouched_until - time.monotonic()
                if self._ended.wait(min(holder.url.ttl / 4, max(_RETRY, left))):
                    return ""
            else:
                holder.lost_within(holder.url.ttl / 4)  # woken early by a loss
                if self._ended.is_set():
                    return ""
            asked = time.monotonic()
            counted_lost = holder.lost_within(0.0)
            if counted_lost and asked >= vouched_until:
                # The lease may expire within the margin, and etcd may take longer than
                # that to answer (up to `_ASK`): the command writes nothing meanwhile.
                # Stopped (SIGSTOP) now, it goes on (SIGCONT) only if etcd vouches for
                # the lease; else it stays stopped until `_stop_on_loss` ends it.
                self._pause(signal.SIGSTOP)
            try:
                lease_left = holder.lease_left(asked + _ASK)
            except StoreUnavailableError:
                if asked < vouched_until or not counted_lost:
                    self._pause(signal.SIGCONT)
                    continue  # asked again soon, while the lease is vouched for
                return counted_lost
            except BaseException:
                self._pause(signal.SIGCONT)
                raise
            if lease_left is None:
                return "etcd says its lease or its key is gone"
            self._pause(signal.SIGCONT)
            if not counted_lost:
                continue  # the lease's own renewals vouch for it
            if not vouched_until:
                warning_line(f"{holder.session}: this run could not confirm its etcd lease "
                             f"in time ({holder.lost_within(0.0)}), but etcd still holds the "
                             f"session for it: the command goes on; the record is no longer "
                             f"updated")
            vouched_until = asked + lease_left - safety

    def _pause(self, signum: int) -> None:
        """SIGSTOP the command and what holds ``FENCELOCK_FD`` with it (not this run,
        nor its keeper, nor one stopped already: by Ctrl-Z, a debugger), or SIGCONT
        those this stopped (`_paused`), and only those. The keeper is told first which
        they are (and, after, that they go on): if this run is killed, or exits, while
        they are stopped, the keeper, which guards them from then on, decides (`keep`)."""
        if signum == signal.SIGCONT:
            paused, self._paused = self._paused, []
            if paused:
                self._send(paused, signal.SIGCONT)
                self._tell(_GOES_ON + b"\n")
            return
        with self._mu:  # not once the command has ended (`ended`): nothing to guard
            if self._ended.is_set():
                return
            command = self._command
            found = _sharing(self._pipe, {os.getpid(), self.proc.pid})
            if command is not None and command.pid not in found:
                found.append(command.pid)  # (it may have closed FENCELOCK_FD)
            pids = [pid for pid in found if not _stopped(pid)]
            if not pids:
                return
            self._paused = pids
            self._tell(_PAUSED + b",".join(b"%d" % pid for pid in pids) + b"\n")
            self._send(pids, signal.SIGSTOP)

    def _send(self, pids: list[int], signum: int) -> None:
        """``signum`` to ``pids``: the command through its `Popen` (nothing once it has
        been waited for), the others each pinned by a pidfd (`_signal`)."""
        command = self._command
        if command is not None and command.pid in pids:
            with contextlib.suppress(OSError):
                command.send_signal(signum)
        _signal([pid for pid in pids if command is None or pid != command.pid], None, signum)

    def _tell(self, message: bytes) -> None:
        """Write ``message`` to the keeper's pipe (quietly nothing once it is closed)."""
        if self._wrapper_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wrapper_fd, message)

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
    from fencelock import _platform
    from fencelock._etcd import EtcdHolder

    store = getattr(lock._store, "holder", None)  # a RemoteStore's driver
    if not isinstance(store, EtcdHolder) or store.lease_id is None or _platform.WINDOWS:
        return None  # (Windows: no descriptors can be passed to the keeper)
    probe_r, command_w = os.pipe()
    wrapper_r, wrapper_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fencelock._etcdkeeper", store.url.connection_text,
             f"{store.lease_id:x}", str(probe_r), str(wrapper_r), store.run_key],
            pass_fds=(probe_r, wrapper_r), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # not the terminal's: Ctrl-C is for the command
        )
    except OSError:
        for fd in (probe_r, command_w, wrapper_r, wrapper_w):
            os.close(fd)
        return None
    os.close(wrapper_r)
    store._cluster.hand_over(store.lease_id)  # the keeper revokes it when the run is over
    return Keeper(proc, store, command_w, probe_r, wrapper_w)


class _Renewer:
    """The keeper's renewals of the lease, in a thread of their own: a request that
    hangs (an etcd member that does not answer) never keeps the keeper from seeing
    `fencelock run` go, nor from counting the time its lease may have left."""

    def __init__(self, cluster: Cluster, lease_id: int, key: str, ttl: float,
                 clock: Callable[[], float], safety: float) -> None:
        self.cluster, self.lease_id, self.key, self.ttl = cluster, lease_id, key, ttl
        self.clock, self.safety = clock, safety
        # Until when (on ``clock``) the lease cannot have expired: `fencelock run`
        # renewed it at most ttl/4 before it started this process, which renews at once.
        self.vouched = clock() + ttl / 2
        self.lost = ""
        """Why the run's holder is gone for sure ("lease": the lease itself)."""
        self.guarding = threading.Event()
        """`fencelock run` is gone: the run's key is checked with each renewal."""
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._tried = threading.Condition()
        self._began = self._done = 0  # renewals begun, and done

    def run(self) -> None:
        from fencelock._errors import StoreUnavailableError

        while not self.stop.is_set():
            with self._tried:
                self._began += 1
            sent = self.clock()
            try:
                # The time to the lease's end shared out among the endpoints (one that
                # hangs must not take it all), each given at least what a request
                # needs: a slow etcd still renews.
                r = self.cluster.call("/lease/keepalive", {"ID": self.lease_id}, share=True,
                                      deadline=time.monotonic() + self.vouched - sent)
                left = int(r.get("result", {}).get("TTL", -1))
                if left <= 0:
                    self.lost = "lease"  # expired or revoked
                else:
                    self.vouched = max(self.vouched, sent + left)
                    if self.guarding.is_set() and _key_gone(self.cluster, self.lease_id,
                                                            self.key):
                        self.lost = "key"  # deleted by hand: the session is free
                pause = self.ttl / 4
            except StoreUnavailableError:
                pause = _RETRY
            with self._tried:
                self._done += 1
                self._tried.notify_all()
            if self.lost:
                return
            self._wake.wait(pause)
            self._wake.clear()

    def renewed_within(self, timeout: float) -> bool:
        """Have a renewal tried now and say, within ``timeout``, whether the lease is
        vouched for again: by the renewal under way, or else by one begun after this
        call (the one under way may have been waiting on a member that hangs, while
        the next goes first to another)."""
        with self._tried:
            wanted = self._began + 1
            self._wake.set()
            self._tried.wait_for(lambda: bool(self.lost) or not self.lapsing()
                                 or self._done >= wanted, timeout)
        return not self.lost and not self.lapsing()

    def lapsing(self) -> bool:
        """Whether no renewal vouches for the lease any more (less the margin)."""
        return self.clock() >= self.vouched - self.safety


def keep(backend: str, lease_id: int, command_fd: int, wrapper_fd: int, key: str) -> None:
    """Renew ``lease_id`` (of the store ``backend`` names: its endpoints, TLS settings
    and TTL) until both pipes read end of file, then revoke it. Stops early
    when the lease is gone (nothing left to keep), and stops renewing at once when
    `fencelock run` says its holder is lost (`_GIVE_UP` on ``wrapper_fd``). Once
    `fencelock run` is gone, guards the run as it did: when etcd says the lease or the
    run's ``key`` is gone, or no renewal vouched for the lease before it may have
    expired (less the margin a holder keeps), another run may hold the session, and
    what still holds the command's pipe is stopped (`_stop_writers`)."""
    from fencelock import _etcdcluster, _etcdurl
    from fencelock._errors import StoreUnavailableError

    url = _etcdurl.parse(backend)
    assert url is not None
    ttl = url.ttl
    cluster = _etcdcluster.cluster(url)
    # A clock that counts on while the host is suspended, as etcd's lease does.
    renewer = _Renewer(cluster, lease_id, key, ttl, _etcdcluster.lease_clock,
                       _etcdcluster.margin(ttl))
    threading.Thread(target=renewer.run, name="fencelock-keeper-renew", daemon=True).start()
    poller = select.poll()
    for fd in (command_fd, wrapper_fd):
        poller.register(fd, select.POLLIN)
    open_fds = {command_fd, wrapper_fd}
    paused: list[int] = []  # what `fencelock run`'s guard has stopped (`Keeper._pause`)
    told = b""  # what `fencelock run` wrote, up to its last newline
    try:
        while open_fds:
            # How soon what the renewals found is acted on: guarding, at once; else
            # only the lease's end matters (nothing left to keep), at renewal pace.
            wait = ttl / 4
            if renewer.guarding.is_set():
                wait = min(_RETRY, max(0.0, renewer.vouched - renewer.safety - renewer.clock()))
            for fd, ev in poller.poll(wait * 1000):
                data = b""
                if ev & select.POLLIN:
                    with contextlib.suppress(OSError):
                        data = os.read(fd, 4096)  # what a command wrote there is dropped
                if fd == wrapper_fd:
                    told += data
                    *lines, told = told.split(b"\n")
                    for line in lines:
                        if line.startswith(_PAUSED):
                            paused = [int(p) for p in line[1:].split(b",") if p.isdigit()]
                        elif line.startswith(_GOES_ON):
                            paused = []
                if fd == wrapper_fd and _GIVE_UP in data:
                    open_fds.clear()
                elif not data:  # end of file: every write end is closed
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    if fd == wrapper_fd:
                        renewer.guarding.set()
                        if paused:  # `fencelock run` is gone with what it stopped
                            if renewer.lapsing() and not renewer.renewed_within(
                                    _etcdcluster.MIN_REQUEST_TIMEOUT):
                                # Nothing vouches for the lease: they go on only to end
                                # (the guard below stops what holds the pipe for good).
                                _signal(paused, None, signal.SIGTERM)
                            _signal(paused, None, signal.SIGCONT)
                            paused = []
            if not open_fds:
                break
            if renewer.lost == "lease":  # nothing holds the session any more
                if renewer.guarding.is_set():
                    _stop_writers(command_fd)
                return
            if not renewer.guarding.is_set():
                continue
            if renewer.lost or (renewer.lapsing() and
                                not renewer.renewed_within(_etcdcluster.MIN_REQUEST_TIMEOUT)):
                # The key deleted, or nothing vouches for the lease any more (a pause of
                # this process looks so too: one renewal, or the one under way, first).
                _stop_writers(command_fd)
                if renewer.lost == "lease":
                    return
                break
    finally:
        renewer.stop.set()
    # Revoked now, or expired within its TTL once etcd answers again: nobody renews it.
    end = time.monotonic() + ttl
    while True:
        try:
            cluster.call("/kv/lease/revoke", {"ID": lease_id})
            return
        except StoreUnavailableError as e:
            if _etcdcluster.LEASE_GONE in e.why or time.monotonic() >= end:
                return
            time.sleep(_RETRY)


def _key_gone(cluster: Cluster, lease_id: int, key: str) -> bool:
    """Whether etcd says the run's ``key`` is no longer under the lease (deleted by
    hand: the session is free to another run though the lease lives). Not when etcd
    does not answer: the lease's renewal just vouched for the run, as the run's own
    guard takes it."""
    from fencelock._errors import StoreUnavailableError
    from fencelock._etcdcluster import lease_left

    try:
        return lease_left(cluster, lease_id, key, None) is None
    except StoreUnavailableError:
        return False


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    backend, lease, command_fd, wrapper_fd, key = argv
    keep(backend, int(lease, 16), int(command_fd), int(wrapper_fd), key)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
