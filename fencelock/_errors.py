"""Every exception fencelock raises, with the attributes a caller needs.

Messages name the file and the next step, so a CLI can print them as they are. Each
exception survives ``pickle`` (its ``__reduce__`` gives the constructor's arguments and
the attributes set since), so it crosses a process pool intact.

::

    Exception
     └── FenceLockError                 anything fencelock raises on purpose
          ├── CoordinationError         two runs met on one session: do not retry the call
          │    ├── SessionContendedError     another run holds it
          │    └── SessionTakeoverError      something else wrote during the run
          │         ├── SessionMovedError    a recover moved the conversation elsewhere
          │         └── HolderLostError      an etcd holder could not confirm its lease
          ├── StoreUnavailableError     etcd cannot be reached
          ├── OutsideRootError          a session outside the etcd backend's root
          ├── UnsafePathError           a path fencelock will not use
          │    ├── PlantedFileError          a file another user placed
          │    │    └── ForeignSymlinkError  a directory symlink another user placed
          │    └── UnsafeSidecarError        a sidecar that is not a regular file
          ├── CorruptRecordError        a holder record that stays unparsable
          ├── RecordTooLargeError       a stale record `clear` cannot write back released
          ├── SidecarAccessError        a sidecar that cannot be opened or probed
          ├── SessionWriteError         a session write or fsync that failed
          ├── NotHeldError              a holder operation without the holder
          ├── ConfigError               a gateway config check cannot read the config
          ├── BadRequestError           a `fencelock hold` request it does not know
          └── HoldArgumentError         a `fencelock hold` option value it cannot use

    UserWarning
     └── FenceLockWarning               works, but unsafe (a world-writable directory)
"""

from __future__ import annotations

import errno
import os
import shlex
import time
from typing import TYPE_CHECKING, Any

from fencelock._ages import human_age
from fencelock._constants import COMMAND_NAME, DEFAULT_STUCK_AFTER

if TYPE_CHECKING:
    from fencelock._fingerprint import Fingerprint
    from fencelock._platform import LockOwner
    from fencelock._probe import HolderStatus
    from fencelock._record import HolderInfo


class FenceLockError(Exception):
    """Base class of everything fencelock raises on purpose."""

    def _init_args(self) -> tuple[Any, ...]:
        """The constructor's arguments, for `__reduce__`."""
        return self.args

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self._init_args(), self.__dict__ or None


class CoordinationError(FenceLockError):
    """Two runs met on one session; retrying the same model call will not help."""


def shell_word(text: str) -> str:
    """``text`` (a path, a URL) as one word that a shell reads back as the same bytes,
    for a command an error suggests: `shlex.quote`'s form, or where the text holds
    control characters or bytes that are not UTF-8 (which the message shows escaped,
    `_output.clean`), bash's ``$'...'`` with those bytes as ``\\xNN``. In that form a
    quote and a backslash are ``\\x27`` and ``\\x5c`` too: a shell without ``$'...'``
    (dash) then reads one inert word, never the rest of a name as code. A relative path
    that starts with '-' gets './' before it, so that no command takes it for an option."""
    if text.startswith("-"):
        text = "./" + text
    if text.isprintable():  # (a byte that is not UTF-8, os.fsdecode's escape, is not)
        return shlex.quote(text)
    return "$'" + "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b"\\'" else f"\\x{byte:02x}"
        for byte in os.fsencode(text)
    ) + "'"


def session_command(session: str, backend: str | None, verb: str = "recover") -> str:
    """The command line ``fencelock VERB`` for ``session`` in its store: by default,
    the one that starts a fresh session after its live run."""
    store = "" if backend is None else f"--backend {shell_word(backend)} "
    return f"fencelock {verb} {store}{shell_word(session)}"


class SessionContendedError(CoordinationError):
    """Another run holds the session (``on_contention="fail"``, or a wait timed out)."""

    def __init__(
        self,
        session: str,
        holder: HolderInfo | None,
        *,
        waited: float | None = None,
        lock_owners: tuple[LockOwner, ...] | None = None,
        backend: str | None = None,
        last: HolderInfo | None = None,
        held_by: str | None = None,
        seen_at: float | None = None,
    ):
        self.session = session
        self.holder = holder
        """The live holder's record; None when the lock is held without one."""
        self.seen_at = time.time() if seen_at is None else seen_at
        """When the holder was found (epoch seconds): its run's age is said from it."""
        self.last = last
        """Without a live record: the session's last record, when it names the
        `fencelock run` whose command left the processes that hold the lock."""
        self.backend = backend
        """The holder store's URL (etcd) the session is held in; None for its sidecar."""
        self.waited = waited
        self.lock_owners = lock_owners
        """Without a record: the processes the system lists as holding the lock (see
        `HolderStatus.lock_owners`), None where it cannot say."""
        self.held_by = held_by
        """Without a record: what holds the session, in the store's words (etcd: the
        owner key), where the store can say more than that."""
        super().__init__(f"{self.situation()}; {self.advice()}")

    def advice(self) -> str:
        """What to do: wait, or start a fresh session. A run with a record is said as
        busy or stuck by its heartbeat (`DEFAULT_STUCK_AFTER`, as `status` says it): a
        busy one is waited for, and a fresh session is for one that never ends."""
        fresh = f"start a fresh session ({session_command(self.session, self.backend)})"
        run = self.holder
        if run is None:
            return f"wait for it, or {fresh}"
        # A start a second or more ahead of this host's clock (the holder's host's
        # clock is ahead, or this one was set back) is said as such, not as "0s ago".
        age = self.seen_at - run.acquired_at
        began = f"began {human_age(age)} ago" if age > -1 else (
            f"began at a time {human_age(-age)} ahead of this host's clock")
        quiet = max(0.0, self.seen_at - run.heartbeat_at)
        if quiet > DEFAULT_STUCK_AFTER:
            return (f"its run {began} and was last heard from {human_age(quiet)} "
                    f"ago (stuck): {fresh}")
        return (f"its run {began} and is alive: wait for it (a longer time "
                f"limit), or, should it never end, {fresh}")

    def situation(self) -> str:
        """The message without its advice: ``SESSION: held by WHO[, after waiting Ns]``."""
        who = describe_holder(self.holder, self.lock_owners, self.last, self.held_by)
        waited = self.waited
        # Said from half a second on, as printed (a wait asked for 0.5 s may end a
        # hair before it): not for a try's moment of grace to a lock held without a
        # live record (50 ms, `_sidecar_holder.FAIL_GRACE`, longer on a busy host),
        # which its caller did not ask to wait.
        how = f", after waiting {waited:.1f}s" if waited and round(waited, 1) >= 0.5 else ""
        return f"{self.session}: held by {who}{how}"

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_contended, (self.session, self.holder, self.waited,
                                    self.lock_owners, self.backend, self.last,
                                    self.held_by, self.seen_at), self.__dict__


class HeldByOwnRunError(SessionContendedError):
    """The session is held by the `fencelock run` this process runs under: the lock's
    descriptor it passed on (``FENCELOCK_FD``) is open in this process (on Windows,
    where it passes none on: the held record names that run, ``FENCELOCK_RUN_ID``), so
    a wait for the session would wait for this process itself, for ever."""

    def __init__(self, session: str, holder: HolderInfo | None, fd: int,
                 seen_at: float | None = None):
        self.fd = fd
        super().__init__(session, holder, seen_at=seen_at)
        who = "" if holder is None else f"; pid {holder.pid}, lane {holder.lane!r}"
        if fd >= 0:
            how, holds = (f"its lock's descriptor, FENCELOCK_FD {fd}, is open here",
                          "The command already holds the session")
        else:
            how, holds = ("its record names the run this process runs under, "
                          "FENCELOCK_RUN_ID", "That run holds the session for the command")
        self.args = (
            f"{session}: held by the fencelock run this process runs under ({how}{who}), "
            f"so waiting for it would wait for ever. {holds}: use it without taking it "
            "again, or take another session",
        )

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return HeldByOwnRunError, (self.session, self.holder, self.fd, self.seen_at), \
            self.__dict__


class MoveToFinish(Exception):
    """An acquire that takes the session only if no wait is needed (`acquire_async`'s
    first try, on the event loop) found a recover's move to finish first (which may
    wait on the old session's own lock and copy lines): it takes nothing, and the
    acquire's thread does it (`SessionLock._follow_last_run`). Never reaches a caller."""

    def __init__(self, session: str) -> None:
        self.session = session
        super().__init__(f"{session}: a recover's move is to be finished first; "
                         f"the acquire's thread does it")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.session,)


class SessionTakeoverError(CoordinationError):
    """Something outside the holder changed the session file since the last fence point."""

    def __init__(
        self,
        session: str,
        expected: Fingerprint | None,
        actual: Fingerprint | None,
        stored: bool = False,
        found: str | None = None,
    ):
        self.session = session
        self.expected = expected
        self.actual = actual
        self.stored = stored
        """True when the append that found the change had already written its line, and
        the line is whole in the file, fsynced (another writer's bytes came between the
        fence check and the end of the append): it must not be written elsewhere again."""
        self.found = found
        """What the session's path held instead of a regular file (``"a symlink"``, ``"a
        FIFO"``, ``"a directory"``), where it was replaced by one; else None."""
        if found is not None:
            super().__init__(
                f"{session}: replaced by {found} outside this run (expected "
                f"{_fp(expected)}, found {found}, {_fp(actual)}); fencelock neither "
                f"follows links nor writes to anything but a regular file, so the run "
                f"stops here. Put the session's file back at that path and start the run "
                f"again from it"
            )
            return
        super().__init__(
            f"{session}: changed by a writer outside this run "
            f"(expected {_fp(expected)}, found {_fp(actual)}{_only_metadata(expected, actual)}"
            f"); the run's history "
            f"is no longer what it wrote, so it stops here"
            + ("; this append's line is in the file all the same, beside the other "
               "writer's bytes" if stored else "")
            + ". Start the run again from the session as it now is"
        )

    def _init_args(self) -> tuple[Any, ...]:
        return self.session, self.expected, self.actual, self.stored, self.found


class SessionMovedError(SessionTakeoverError):
    """A `recover` moved the session's conversation to a fresh session (``moved_to``):
    this run must not write into the old one, where nothing reads its lines any more."""

    def __init__(
        self,
        session: str,
        moved_to: str,
        expected: Fingerprint | None = None,
        actual: Fingerprint | None = None,
        stored: bool = False,
        later: bool = False,
        carried: bool = False,
    ):
        self.session = session
        self.moved_to = moved_to
        """The fresh session the conversation goes on in."""
        self.expected = expected
        self.actual = actual
        self.stored = stored
        self.found = None
        self.later = later
        """True for a run that took the session after the move and wrote nothing there (a
        lane queued behind the stuck run, or started since): its turn was never
        answered in the fresh session, and is to be done there. False for the run the
        recover moved (whose turn the recover's caller re-fires there), for one that
        ``carried`` says, and where it is not known."""
        self.carried = carried
        """True for a run other than the one the recover moved that had written lines
        here before the move (it took the session between the stuck run's end and the
        move's mark): the recover carries them to the fresh session, where the rest of
        its turn goes."""
        if later:
            CoordinationError.__init__(
                self,
                f"{session}: a recover moved its conversation to {moved_to} before this "
                f"run took the session; nothing of this run's was written here. Do this "
                f"turn in {moved_to} instead",
            )
            return
        if carried:
            CoordinationError.__init__(
                self,
                f"{session}: a recover moved its conversation to {moved_to} after this "
                f"run's lines went in here, and carries them there with the rest; this "
                f"run writes nothing more here. Write the rest of its turn in {moved_to}",
            )
            return
        CoordinationError.__init__(
            self,
            f"{session}: a recover moved its conversation to {moved_to}, where its last "
            f"turn is answered again; this run writes nothing more here"
            + ("; its last line went in here all the same, as a recover that did not wait "
               "for it marked the move, and may be at the end of the fresh session too: "
               "look there before writing it again" if stored else "")
            + f". Take {moved_to} instead",
        )

    def _init_args(self) -> tuple[Any, ...]:
        return (self.session, self.moved_to, self.expected, self.actual, self.stored,
                self.later, self.carried)


class HolderLostError(SessionTakeoverError):
    """The holder's etcd lease may have expired (a pause, a partition, etcd down): another
    run may hold the session now, so this one writes nothing more."""

    def __init__(self, session: str, why: str, stored: bool = False):
        self.session = session
        self.expected = None
        self.actual = None
        self.stored = stored
        self.found = None
        """The append that found the loss had written its line: it is in the session
        (keep it nowhere else, or it is there twice)."""
        self.why = why
        CoordinationError.__init__(
            self,
            f"{session}: this run lost its holder ({why}); another run may hold the "
            f"session now, so it writes nothing more"
            + ("; its last line was written all the same, as another run's may be"
               if stored else "") + ". Start the run again",
        )

    def _init_args(self) -> tuple[Any, ...]:
        return self.session, self.why, self.stored


class StoreUnavailableError(FenceLockError):
    """The holder store (etcd) cannot be reached or did not answer in time."""

    def __init__(self, endpoint: str, why: str, fix: str | None = None):
        self.endpoint = endpoint
        self.why = why
        self.fix = fix
        super().__init__(
            f"{endpoint}: the etcd holder store is unavailable ({why}); " + (
                fix or "check that etcd runs there, and that --backend / FENCELOCK_BACKEND "
                "names it")
        )

    def _init_args(self) -> tuple[Any, ...]:
        return self.endpoint, self.why, self.fix


def session_lead(session: str, e: BaseException) -> str:
    """What goes before ``e``'s message where a line is about ``session``: the session,
    for an error that names only the store (etcd away), as every other error names its
    file itself; else nothing."""
    return f"{session}: " if isinstance(e, StoreUnavailableError) else ""


class OutsideRootError(FenceLockError, ValueError):
    """A session the etcd store cannot name: it lies outside the ``root`` of the backend
    URL, under which session keys are taken. (A `ValueError` too: it is a bad argument.)"""

    def __init__(self, session: str, root: str):
        self.session = session
        self.root = root
        super().__init__(
            f"{session}: not under the backend's root {root}; name a session under "
            f"{root}, or change root= in the backend URL"
        )

    def _init_args(self) -> tuple[Any, ...]:
        return self.session, self.root


NO_SESSION_NAME = "a sidecar of no session (no file name before .holder)"
"""What `UnsafeSidecarError` calls ``DIR/.holder`` (and `scan`, ``..holder``): no session is its."""

SIDECAR_OF_A_SIDECAR = "the sidecar of a sidecar (no session's name ends in .holder)"
"""What `UnsafeSidecarError` calls ``S.holder.holder``: ``S.holder`` is a sidecar, which
no run holds as a session (its record is at its start)."""


class UnsafePathError(FenceLockError):
    """A file fencelock would open is a symlink, directory, FIFO or other non-regular file.

    fencelock never follows a link or writes to anything but a regular file.
    """

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        # A hard link is a regular file, but one that other names share; so is a
        # sidecar of no session.
        kind = "" if what.startswith(("a hard link", NO_SESSION_NAME, SIDECAR_OF_A_SIDECAR)) \
            else ", not a regular file"
        super().__init__(
            f"{path}: is {what}{kind}; fencelock neither follows links nor writes to "
            f"anything else, and left it untouched. {self._fix(path, what)}"
        )

    @staticmethod
    def _fix(path: str, what: str) -> str:
        return unsafe_path_fix(path, what)

    def _init_args(self) -> tuple[Any, ...]:
        return self.path, self.what


def unsafe_path_fix(path: str, what: str) -> str:
    """What to do about ``path``, which is ``what`` (a symlink, FIFO...), not a regular
    file: the sentence `UnsafePathError` ends with, and `status` gives too."""
    if path.endswith(".torn"):  # fencelock's own file, not one a user names
        return "Remove or rename it; fencelock creates it again as a regular file"
    if what.endswith("leads in a loop"):  # `_platform.describe_mode`
        return "Fix or remove the symlink: nothing can be reached through it"
    if what.startswith("a symlink"):
        return "Give the path of the file it points to instead, or remove the link"
    if what.startswith("a directory's path"):  # the path as typed, not what is there
        return "Give the session file's path without the trailing '/'"
    if what == "a directory" and not path.endswith(".holder"):  # a sessions directory
        return (f"Give the path of one session file in it (fencelock status "
                f"{shell_word(path)} lists them)")
    return "Give the path of a regular file, or rename or remove it"


class PlantedFileError(UnsafePathError):
    """A file fencelock would write is owned by another user, in a directory where
    anyone can create files: it may have been planted to read or steer a session."""

    def __init__(self, path: str, uid: int, directory: str, sticky: bool = False):
        self.path = path
        self.what = f"owned by uid {uid}"
        self.uid = uid
        # In a sticky directory (/tmp's mode) only the file's owner or root may remove it.
        remove = (f"uid {uid} or root can remove it, as the directory is sticky: ask them "
                  f"to, or move the sessions to a directory of their own" if sticky
                  else "remove it if it is not expected")
        FenceLockError.__init__(
            self,
            f"{path}: owned by uid {uid}, not this user, in {directory}, where anyone can "
            f"create files; another user may have planted it. Left untouched: {remove}, "
            f"and give the sessions directory mode 0700 or 0750",
        )
        self.directory = directory
        self.sticky = sticky

    def _init_args(self) -> tuple[Any, ...]:
        return self.path, self.uid, self.directory, self.sticky


class ForeignSymlinkError(PlantedFileError):
    """A directory on a session's path is reached through a symlink owned by another
    user (not this user, not root): it could lead runs into a directory of theirs."""

    def __init__(self, path: str, uid: int, directory: str):
        self.path = path
        self.what = f"a symlink owned by uid {uid}"
        self.uid = uid
        FenceLockError.__init__(
            self,
            f"{path}: a symlink owned by uid {uid}, not this user or root, on the way to "
            f"{directory}; another user could lead runs into a directory of theirs. Left "
            f"untouched: use the real path, or replace the symlink with one of your own",
        )
        self.directory = directory
        self.sticky = False

    def _init_args(self) -> tuple[Any, ...]:
        return self.path, self.uid, self.directory


class UnsafeSidecarError(UnsafePathError):
    """The sidecar is a symlink, directory, FIFO or other non-regular file."""

    def __init__(self, sidecar: str, what: str):
        self.sidecar = sidecar
        super().__init__(sidecar, what)

    @staticmethod
    def _fix(path: str, what: str) -> str:
        if what == NO_SESSION_NAME:
            return "Remove it: no run uses it"
        if what == SIDECAR_OF_A_SIDECAR:
            session = path[: -2 * len(".holder")]
            return (f"Give the session file's path ({shell_word(session)}); a file by "
                    f"this name is no run's, and can be removed")
        if what.startswith("a hard link"):
            # A run may hold it: removing this name would let the next run create a
            # new sidecar and take the session while that run still holds the old one.
            return (f"Remove its other name (a backup's hard link? find "
                    f"{shell_word(_mount_point(path))} -xdev -samefile {shell_word(path)}"
                    f"), not this one: a run may hold it")
        return "Remove or rename it if it is not meant to be there"

    def _init_args(self) -> tuple[Any, ...]:
        return self.sidecar, self.what


def _mount_point(path: str) -> str:
    """The mount point of the filesystem ``path`` is on (its hard links are there)."""
    here = os.path.dirname(os.path.realpath(path))
    while not os.path.ismount(here):
        here = os.path.dirname(here)
    return here


def _set_aside_command(where: str, command: str | None) -> str:
    """``command``, or the one that sets the sidecar ``where``'s record aside."""
    return command or f"fencelock clear --force {shell_word(where)}"


class CorruptRecordError(FenceLockError):
    """The sidecar's record cannot be parsed (truncated, oversized, not JSON, bad fields)."""

    def __init__(self, sidecar: str, why: str, command: str | None = None):
        self.sidecar = sidecar
        """Where the record is: the sidecar, or for the etcd store its key's URL."""
        self.why = why
        self.command = command
        """The command that sets it aside (default: ``fencelock clear --force SIDECAR``)."""
        # The command comes last, whole, so that it can be copied as it is.
        super().__init__(
            f"{sidecar}: holder record is corrupt ({why}); inspect it, then set it aside "
            f"and start over with: {_set_aside_command(sidecar, command)}"
        )

    def _init_args(self) -> tuple[Any, ...]:
        return self.sidecar, self.why, self.command


def own_record_too_long(where: str, size: int, bound: int) -> FenceLockError:
    """A record of this holder's own that would be over the bound readers keep to (a
    lane, session path or origin of thousands of characters, its control characters
    escaped in six bytes each): refused before it is written, as no reader could read it."""
    return FenceLockError(
        f"{where}: the record this run would write is {size} bytes, over the {bound}-byte "
        f"bound every reader keeps to (its session path, lane and origin, control "
        f"characters escaped in 6 bytes each, and a previous holder's lane and host); "
        f"nothing was written: give a shorter lane, origin or session path")


class RecordTooLargeError(FenceLockError):
    """`clear` found a stale record in another writer's layout that no longer fits the
    record bound once encoded again (`_record.released_again`), and kept it."""

    def __init__(self, where: str, command: str | None = None,
                 status: HolderStatus | None = None):
        self.where = where
        self.command = command
        """The command that sets it aside (default: ``fencelock clear --force WHERE``)."""
        self.status = status
        """What `clear` found (the stale record), for a caller to report."""
        super().__init__(
            f"{where}: its stale record cannot be marked released: encoded again (its "
            f"text escaped as fencelock escapes it) it would be over the 64 KiB bound, "
            f"even without its writer's own fields; set it aside instead: "
            f"{_set_aside_command(where, command)}")

    def _init_args(self) -> tuple[Any, ...]:
        return self.where, self.command, self.status


class SidecarAccessError(FenceLockError):
    """The sidecar or its directory cannot be opened, created or written (with a holder
    store, etcd: the session's directory is missing or a file)."""

    def __init__(self, path: str, cause: OSError, fix: str):
        self.path = path
        self.cause = cause
        self.fix = fix
        self.status: HolderStatus | None = None
        """From ``clear(remove=True)`` whose sidecar stays: what it found, and did first
        (a stale record cleared: ``status.state`` is stale); None otherwise."""
        reason = cause.strerror or type(cause).__name__
        super().__init__(f"{path}: {reason}; {fix}")

    def _init_args(self) -> tuple[Any, ...]:
        return self.path, self.cause, self.fix


WRITE_FIXES = {
    errno.ENOSPC: "free some space, or inodes where df -i shows none left",
    errno.EDQUOT: "free some space under this user's disk quota",
    errno.EROFS: "keep sessions on a filesystem mounted read-write, or remount it so",
    errno.EACCES: "this user cannot write it; run as its owner or fix the permissions",
    errno.EPERM: "this user cannot write it; run as its owner or fix the permissions",
}
"""What to do about a write that failed with these errors."""

LIMIT_FIXES = {
    errno.EMFILE: "this process has as many files open as its limit allows; raise the "
                  "limit (ulimit -n) and try again",
    errno.ENFILE: "the system has as many files open as it allows; try again once others "
                  "have closed some",
    errno.EFBIG: "the file would pass this process's file size limit; raise the limit "
                 "(ulimit -f) and try again",
}
"""What to do about an open or a write that a limit of the process or the system
refused."""
WRITE_FIXES.update(LIMIT_FIXES)


def record_lags(session: str, e: Exception) -> FenceLockWarning:
    """The warning for an append whose line is stored but whose holder record could
    not follow it (``e``: a full disk, etcd not answering): not an error, or a caller
    would write the line again."""
    return FenceLockWarning(
        f"{session}: the line is stored, but its holder record could not follow it ({e})")


NO_THREAD = ("(a limit reached: this user's processes and threads, ulimit -u, or this "
             "process's memory); raise the limit or end some processes, and try again")
"""Why a thread could not be started, and what to do."""


def no_thread(path: str, what: str) -> FenceLockError:
    """The error for ``what`` (for ``path``) that needed a thread the system would not
    start: `threading` raises a bare RuntimeError that names neither."""
    return FenceLockError(f"{path}: {what} needs a thread, and the system would not "
                          f"start one {NO_THREAD}")


def attribute_fix(path: str, how: str = "write") -> str:
    """What to do about EPERM on writing ``path``: permission bits give EACCES, so EPERM
    is an attribute that binds even root (immutable or append-only, chattr +i / +a)."""
    return (f"it may be immutable or append-only (lsattr {shell_word(path)}; chattr -i or "
            f"-a clears that), or this user cannot {how} it")


def own_file_fix(path: str, writing: bool) -> str | None:
    """What to do about EACCES on ``path`` where this user owns it and its mode shuts
    its owner out ("run as its owner" would not help); None otherwise (another user's
    file, or a mode that is not the cause)."""
    geteuid = getattr(os, "geteuid", None)
    try:
        st = os.stat(path)
    except OSError:
        return None
    # The owner's bits it needs: fencelock opens a file it writes for reading too.
    missing = (0o600 if writing else 0o400) & ~st.st_mode
    if geteuid is None or st.st_uid != geteuid() or not missing:
        return None  # another's, or its mode is not the cause (its directory may be)
    flags = "r" * bool(missing & 0o400) + "w" * bool(missing & 0o200)
    doing = {"r": "reading", "w": "writing", "rw": "reading and writing"}[flags]
    return (f"this user owns it, but its mode leaves out {doing}; chmod u+{flags} "
            f"{shell_word(path)} (g+{flags} too where a group shares the sessions)")


class SessionWriteError(FenceLockError):
    """A fenced append could not be written or made durable."""

    def __init__(self, session: str, cause: OSError, what: str, *,
                 stored: bool | None = False, kept: OSError | None = None):
        self.session = session
        self.cause = cause
        self.stored = stored
        """True when the line is in the file but may not survive a crash; None when the
        line could not be taken back out (``kept``: why), so that it may be in the file
        now, and whether it lasts is not known."""
        self.kept = kept
        self.fingerprint: Fingerprint | None = None
        """The session's new fence point (after the failed line was taken back out, or
        with it when it was not: ``stored`` True or None), when it could be read."""
        reason = cause.strerror or type(cause).__name__
        if what.startswith("create") and cause.errno in (errno.EACCES, errno.EPERM):
            # No file yet: what refused is its directory.
            fix: str | None = (f"this user cannot create files in "
                               f"{os.path.dirname(session) or '.'}; fix its permissions")
        elif cause.errno == errno.EPERM:
            fix = attribute_fix(session)
        else:
            fix = (cause.errno == errno.EACCES and own_file_fix(session, True)) or \
                WRITE_FIXES.get(cause.errno or 0)
        if fix is not None:
            reason += f" ({fix})"
        if stored is None:
            why = kept.strerror if kept is not None and kept.strerror else "cause unknown"
            outcome = (f"the entry could not be taken back out either ({why}), so it may "
                       f"be in the session: read the session before appending it again")
        elif stored:
            outcome = "the entry is in the session but a crash may lose the new file's name"
        else:
            outcome = "the entry was not stored, append it again once the cause is fixed"
        self.what = what
        self.failed = f"{session}: {what} failed: {reason}"
        """What failed, on which file, and its fix where one is known (without what
        became of the entry)."""
        super().__init__(f"{self.failed}; {outcome}")

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_write_error, (self.session, self.cause, self.what,
                                      self.stored, self.kept), self.__dict__


class FenceLockWarning(UserWarning):
    """Something works but is unsafe, e.g. a world-writable sessions directory."""


def warn_each_time(text: str, stacklevel: int | None = 1) -> None:
    """Warn ``text`` (a `FenceLockWarning`) as `warnings.warn` does, ``stacklevel`` alike,
    but as an event that is said each time it happens: Python's default filter shows a
    text once per place in a process's life, so a long-running caller would hear of a
    second etcd outage, or a second torn line, nothing. Filters that say "once",
    "ignore" or "error" apply as to any warning ("module", with no memory kept, shows
    each, as "default" does). ``stacklevel`` None: at the first caller outside the
    fencelock package, however deep the call that warns is (`recover`'s steps are
    reached along several paths)."""
    import sys
    import warnings

    try:
        frame = sys._getframe(1 if stacklevel is None else stacklevel)
        while stacklevel is None and _ours(frame.f_globals.get("__name__")):
            frame = frame.f_back  # type: ignore[assignment]  # (None: AttributeError)
    except (ValueError, AttributeError):  # (a shallower stack: as `warnings.warn`: sys)
        warnings.warn_explicit(FenceLockWarning(text), FenceLockWarning, "sys", 1,
                               module="sys", registry=None)
        return
    warnings.warn_explicit(
        FenceLockWarning(text), FenceLockWarning, frame.f_code.co_filename, frame.f_lineno,
        module=frame.f_globals.get("__name__"), registry=None)  # (no registry: no memory)


def _ours(module: object) -> bool:
    """Whether ``module`` (a frame's ``__name__``) is fencelock or one of its modules:
    a warning is said at its first caller outside them (`warn_each_time`), by module
    name, which holds wherever the files are (a zip, compiled without sources)."""
    return isinstance(module, str) and (module == "fencelock" or
                                        module.startswith("fencelock."))


class NotHeldError(FenceLockError):
    """An operation that needs the holder was called without it."""


class ConfigError(FenceLockError):
    """A gateway config (`fencelock check-config`) cannot be read, parsed, or has a shape
    the check cannot interpret."""

    def __init__(self, path: str, why: str, line: int | None = None, column: int | None = None):
        self.path = path
        self.why = why
        self.line = line
        self.column = column
        where = f"{path}: line {line}, column {column}" if line is not None else path
        super().__init__(f"{where}: {why}")

    def _init_args(self) -> tuple[Any, ...]:
        return self.path, self.why, self.line, self.column


def _rebuild_contended(
    session: str,
    holder: HolderInfo | None,
    waited: float | None,
    lock_owners: tuple[LockOwner, ...] | None,
    backend: str | None = None,
    last: HolderInfo | None = None,
    held_by: str | None = None,
    seen_at: float | None = None,
) -> SessionContendedError:
    return SessionContendedError(session, holder, waited=waited, lock_owners=lock_owners,
                                 backend=backend, last=last, held_by=held_by,
                                 seen_at=seen_at)


def _rebuild_write_error(
    session: str, cause: OSError, what: str, stored: bool | None, kept: OSError | None = None
) -> SessionWriteError:
    return SessionWriteError(session, cause, what, stored=stored, kept=kept)


def describe_leftovers(run: HolderInfo) -> str:
    """The processes that the command of `fencelock run` ``run`` (its last, released
    record) left holding the session, in words."""
    return (f"processes that the command of fencelock run pid {run.pid} (lane "
            f"{run.lane!r}, token {run.token}) left running after that run ended")


def describe_holder(
    holder: HolderInfo | None,
    lock_owners: tuple[LockOwner, ...] | None = None,
    last: HolderInfo | None = None,
    held_by: str | None = None,
) -> str:
    """Who holds a session, in words: its record, or else the lock's owners; or
    ``last``: the record of the ended `fencelock run` whose command left the processes
    that hold it (`_record.left_by_run`, or the etcd store's released owner record); or
    else ``held_by``, the store's own account."""
    if holder is None and last is not None:
        return describe_leftovers(last)
    if holder is None and held_by is not None:
        return held_by
    if holder is not None:
        command = holder.command
        shared = f"; shared with its command, pid {command.pid}" if command is not None else ""
        return (f"pid {holder.pid} on {holder.host} (lane {holder.lane!r}, token "
                f"{holder.token}{shared})")
    if lock_owners is None:
        return ("a live holder without a readable fencelock record (this system does not "
                "say which process)")
    if not lock_owners:
        return ("a process outside fencelock that /proc/locks does not list (another host "
                "or PID namespace)")
    names = ", ".join(
        f"pid {o.pid} ({o.command})" if o.command is not None
        else f"a process that inherited the lock from pid {o.pid} (exited)"
        for o in lock_owners
    )
    shared = " in shared mode" if all(o.shared for o in lock_owners) else ""
    if all(o.command == COMMAND_NAME for o in lock_owners):
        # The command itself (`run`, `hold`): a holder whose record is no longer there.
        return (f"{names}{shared}, a fencelock command whose record is missing: something "
                f"outside the protocol emptied or wrote over the sidecar")
    one = len(lock_owners) == 1
    return f"{names}{shared}, not {'a fencelock holder' if one else 'fencelock holders'}"


def _fp(fp: Fingerprint | None) -> str:
    return "no file" if fp is None else fp.short()


def _only_metadata(expected: Fingerprint | None, actual: Fingerprint | None) -> str:
    """Where the two read the same (`Fingerprint.short`), what moved: the fields left out."""
    if expected is None or actual is None or expected.short() != actual.short():
        return ""
    moved = [f"{name} {getattr(expected, name)} to {getattr(actual, name)}"
             for name in ("dev", "ctime_ns") if getattr(expected, name) != getattr(actual, name)]
    return ("; only its " + ", ".join(moved) + " moved (a change of its permissions, owner, "
            "links or extended attributes, such as the token mark a run through another "
            "name of the file sets; or a write whose mtime was set back)" if moved else "")


def is_coordination_error(exc: BaseException | None) -> bool:
    """True for a `CoordinationError`, also when it is the cause or context of ``exc``
    (False for anything that is not an exception)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]  # both links of each: a cause set with
    while todo:  # ``raise ... from`` hides no context the exception was raised in
        exc = todo.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        if isinstance(exc, CoordinationError):
            return True
        seen.add(id(exc))
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        todo += (exc.__context__, exc.__cause__)
    return False


class BadRequestError(FenceLockError):
    """A `fencelock hold` request that is not one the line protocol knows (not UTF-8,
    not JSON, too long, an unknown op, a bad field). It changes nothing."""


class HoldArgumentError(FenceLockError, ValueError):
    """A command-line value `fencelock hold` cannot use; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option

    def _init_args(self) -> tuple[Any, ...]:
        return self.option, str(self)
