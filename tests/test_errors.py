"""Every exception in fencelock._errors survives pickle, so it crosses a process pool
with its message and attributes (records and fingerprints included)."""

from __future__ import annotations

import errno
import inspect
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

import pytest

from fencelock import LockOwner, _errors
from fencelock._ages import human_age
from fencelock._fingerprint import Fingerprint
from fencelock._record import HolderInfo, Phase, PreviousHolder, State

FP = Fingerprint(dev=2049, ino=77, size=120, mtime_ns=1_700_000_000_000_000_001,
                 ctime_ns=1_700_000_000_000_000_002)
FP_MOVED = Fingerprint(dev=2049, ino=78, size=0, mtime_ns=5, ctime_ns=6)
HOLDER = HolderInfo(
    state=State.HELD, session="/s/a.jsonl", pid=4242, host="gw-1", process_start="9@b@n",
    lane="session:agent:main:heartbeat", run_id="r-1", token=17, acquired_at=1.5,
    heartbeat_at=2.5, phase=Phase.PROMPT, fingerprint=FP,
    previous=PreviousHolder(pid=41, host="gw-0", lane="cron", run_id="r-0", token=16),
    origin="/s/old.jsonl", extra={"future_field": [1, 2]},
)
SEEN = 3.0
"""When the samples' holders were found: a fixed time, the same in a pool worker."""


def samples() -> dict[str, BaseException]:
    """One instance of every exception class in fencelock._errors."""
    cause = OSError(errno.EACCES, "Permission denied", "/s/a.jsonl.holder")
    write = _errors.SessionWriteError("/s/a.jsonl", OSError(errno.EIO, "I/O error"),
                                      "fsync", stored=True)
    write.fingerprint = FP
    return {
        "FenceLockError": _errors.FenceLockError("/s/a.jsonl: something"),
        "CoordinationError": _errors.CoordinationError("/s/a.jsonl: met"),
        "SessionContendedError": _errors.SessionContendedError("/s/a.jsonl", HOLDER,
                                                               waited=1.25, seen_at=SEEN),
        "SessionContendedError-etcd": _errors.SessionContendedError(
            "/s/a.jsonl", HOLDER, backend="etcd://127.0.0.1:2379/p?ttl=5", seen_at=SEEN),
        "SessionContendedError-foreign": _errors.SessionContendedError(
            "/s/a.jsonl", None, lock_owners=(LockOwner(99, True, "flock"),), seen_at=SEEN),
        "SessionContendedError-left": _errors.SessionContendedError(
            "/s/a.jsonl", None, lock_owners=(LockOwner(HOLDER.pid, False, None),),
            last=replace(HOLDER, state=State.RELEASED), seen_at=SEEN),
        "HeldByOwnRunError": _errors.HeldByOwnRunError("/s/a.jsonl", HOLDER, 3, SEEN),
        "HeldByOwnRunError-unread": _errors.HeldByOwnRunError("/s/a.jsonl", None, 5, SEEN),
        "SessionTakeoverError": _errors.SessionTakeoverError("/s/a.jsonl", FP, FP_MOVED),
        "SessionTakeoverError-gone": _errors.SessionTakeoverError("/s/a.jsonl", FP, None),
        "SessionTakeoverError-stored": _errors.SessionTakeoverError("/s/a.jsonl", FP, FP_MOVED,
                                                                    stored=True),
        "HolderLostError": _errors.HolderLostError("/s/a.jsonl", "lease not confirmed in 3s"),
        "SessionMovedError": _errors.SessionMovedError("/s/a.jsonl", "/s/b.jsonl", FP, FP_MOVED,
                                                       stored=True),
        "StoreUnavailableError": _errors.StoreUnavailableError("127.0.0.1:2379", "refused"),
        "OutsideRootError": _errors.OutsideRootError("/s/a.jsonl", "/srv/share"),
        "UnsafePathError": _errors.UnsafePathError("/s/a.jsonl", "a FIFO"),
        "PlantedFileError": _errors.PlantedFileError("/s/a.jsonl", 1001, "/s"),
        "PlantedFileError-sticky": _errors.PlantedFileError("/s/a.jsonl", 1001, "/s",
                                                            sticky=True),
        "ForeignSymlinkError": _errors.ForeignSymlinkError("/s/agentA", 1001, "/t/agentA"),
        "BadRequestError": _errors.BadRequestError("line 3: not JSON"),
        "MoveToFinish": _errors.MoveToFinish("/s/a.jsonl"),
        "HoldArgumentError": _errors.HoldArgumentError("--lane", "--lane: not UTF-8"),
        "UnsafeSidecarError": _errors.UnsafeSidecarError("/s/a.jsonl.holder", "a symlink"),
        "CorruptRecordError": _errors.CorruptRecordError("/s/a.jsonl.holder", "not JSON"),
        "RecordTooLargeError": _errors.RecordTooLargeError("/s/a.jsonl.holder"),
        "SidecarAccessError": _errors.SidecarAccessError("/s/a.jsonl.holder", cause, "fix it"),
        "SessionWriteError": write,
        "NotHeldError": _errors.NotHeldError("/s/a.jsonl: release() without acquire()"),
        "FenceLockWarning": _errors.FenceLockWarning("/s: world-writable"),
        "ConfigError": _errors.ConfigError("/etc/openclaw.json", "not JSON5 (bad value)", 3, 7),
        "ConfigError-file": _errors.ConfigError("/etc/openclaw.json", "the file is empty"),
    }


def test_every_exception_class_has_a_sample() -> None:
    defined = {
        name for name, obj in vars(_errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException)
        and obj.__module__ == _errors.__name__
    }
    assert defined == {key.split("-")[0] for key in samples()}


def test_a_coordination_error_says_what_to_do_next() -> None:
    """A takeover or a lost holder ends the run: each says to start it again (the
    caller's next step), not only why it stopped."""
    for name, error in samples().items():
        if name.startswith(("SessionTakeoverError", "HolderLostError")):
            assert str(error).endswith(". Start the run again") or str(error).endswith(
                ". Start the run again from the session as it now is"), (name, str(error))


@pytest.mark.parametrize(("waited", "said"), [
    (None, None), (0.1, None), (0.44, None), (0.4993, "0.5"), (0.5, "0.5"), (12.04, "12.0"),
])
def test_a_contention_error_names_a_wait_from_half_a_second_as_printed(
    waited: float | None, said: str | None
) -> None:
    """A wait of half a second or more is named; a timed wait of 0.5 s that ended a hair
    before it (an `acquire_async`, `hold --timeout 0.5`) is one, a try's moment of grace
    is not."""
    text = str(_errors.SessionContendedError("/s/x.jsonl", None, waited=waited))
    assert ("after waiting" in text) == (said is not None), text
    if said is not None:
        assert f", after waiting {said}s;" in text


@pytest.mark.parametrize(("ahead", "said"), [
    (0.4, "its run began 0s ago and is alive"),
    (1796.0, "its run began at a time 29m56s ahead of this host's clock and is alive"),
])
def test_a_contention_error_says_a_start_ahead_of_this_clock_as_such(
    ahead: float, said: str
) -> None:
    """A record whose run began later than this host's now (the holder's clock ahead)
    is not said to have begun "0s ago"; within a second it is."""
    text = str(_errors.SessionContendedError(
        "/s/a.jsonl", HOLDER, seen_at=HOLDER.acquired_at - ahead))
    assert f"; {said}: wait for it" in text, text


@pytest.mark.parametrize(("quiet", "stuck"), [(0.0, False), (599.0, False), (601.0, True)])
def test_a_contention_error_says_a_busy_run_is_waited_for_and_a_stuck_one_moved_from(
    quiet: float, stuck: bool
) -> None:
    """The advice follows the run's heartbeat as `status` does (stuck after 10 minutes
    without one): a busy run is waited for, and a fresh session is offered for one that
    never ends; a stuck one is moved from."""
    text = str(_errors.SessionContendedError(
        "/s/a.jsonl", HOLDER, seen_at=HOLDER.heartbeat_at + quiet))
    began = human_age(HOLDER.heartbeat_at + quiet - HOLDER.acquired_at)
    if stuck:
        assert text.endswith(f"; its run began {began} ago and was last heard from 10m01s "
                             "ago (stuck): start a fresh session (fencelock recover "
                             "/s/a.jsonl)"), text
    else:
        assert text.endswith(f"; its run began {began} ago and is alive: wait for it (a "
                             "longer time limit), or, should it never end, start a fresh "
                             "session (fencelock recover /s/a.jsonl)"), text


def _same(a: Any, b: Any) -> None:
    """Equal, comparing an OSError by its fields (OSError has no __eq__)."""
    if isinstance(a, OSError):
        assert type(a) is type(b) and a.args == b.args and a.filename == b.filename
    else:
        assert a == b


def check_round_trip(original: BaseException, copy: BaseException) -> None:
    assert type(copy) is type(original)
    assert str(copy) == str(original) and copy.args == original.args
    assert copy.__dict__.keys() == original.__dict__.keys()
    for key, value in original.__dict__.items():
        _same(value, copy.__dict__[key])
    holder = getattr(original, "holder", None)
    if holder is not None:
        copied = getattr(copy, "holder", None)
        assert copied is not None
        assert copied.extra == holder.extra
        assert copied.fingerprint == holder.fingerprint


@pytest.mark.parametrize("name", sorted(samples()))
def test_pickle_round_trip(name: str) -> None:
    original = samples()[name]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        check_round_trip(original, pickle.loads(pickle.dumps(original, protocol)))


def test_value_types_survive_pickle() -> None:
    for value in (HOLDER, FP, HOLDER.previous, LockOwner(1, False, None)):
        assert pickle.loads(pickle.dumps(value)) == value
    assert pickle.loads(pickle.dumps(HOLDER)).extra == HOLDER.extra


def raise_sample(name: str) -> None:
    """Run in a pool worker: raise the named sample there."""
    raise samples()[name]


def test_exceptions_cross_a_process_pool() -> None:
    names = sorted(samples())
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter unpickles them
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        futures = {name: pool.submit(raise_sample, name) for name in names}
        for name, future in futures.items():
            error = future.exception(timeout=120)
            assert error is not None, name
            check_round_trip(samples()[name], error)


@pytest.mark.parametrize(("code", "fix"), [
    (errno.ENOSPC, "free some space"),
    (errno.EACCES, "run as its owner or fix the permissions"),
    (errno.EROFS, "keep sessions on a filesystem mounted read-write, or remount it so"),
])
def test_a_failed_write_says_what_to_do(code: int, fix: str) -> None:
    e = _errors.SessionWriteError("/s/a.jsonl", OSError(code, "failed"), "write")
    assert str(e).startswith("/s/a.jsonl: write failed: failed (") and fix in str(e), str(e)
    assert "append it again once the cause is fixed" in str(e)


def test_every_planted_file_error_says_whether_its_directory_is_sticky() -> None:
    """`sticky` is there on every `PlantedFileError`, a foreign symlink's included (False:
    its advice is to use the real path), and says who can remove the file."""
    for error in (samples()["PlantedFileError"], samples()["ForeignSymlinkError"]):
        assert isinstance(error, _errors.PlantedFileError) and error.sticky is False
    sticky = samples()["PlantedFileError-sticky"]
    assert isinstance(sticky, _errors.PlantedFileError)
    assert sticky.sticky is True and "uid 1001 or root can remove it" in str(sticky)
    assert "remove it if it is not expected" in str(samples()["PlantedFileError"])
