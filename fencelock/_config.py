"""Checking an agent gateway config for heartbeats that share the session file (the
original report, Part C).

An agent whose heartbeat is not ``isolatedSession: true`` runs its heartbeat lane on the
same session file as its channel and direct lanes, which is where takeovers come from.
The check follows which agents the gateway actually gives a heartbeat (its agents in
``agents.entries``, keyed by id, in newer gateways, else ``agents.list``): when an agent
has a ``heartbeat`` block of its own that leaves it an interval, only agents with a block
run one (the gateway's explicit-only rule, openclaw #46101 / #78713), and
``agents.defaults.heartbeat`` only fills in their settings; otherwise the defaults apply
to every agent (or to the one ``agents.defaults.heartbeat.agentId`` names, where the
gateway knows it), and with no heartbeat configured anywhere the default agent runs the
built-in one. Where gateway versions differ (a block that only turns its own heartbeat
off: openclaw #119005), the check reports what either may run. This module only parses
and reports; the command line formats what it returns.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from fencelock import _configsource, _platform
from fencelock._configsource import Unresolved
from fencelock._constants import SESSION_SUFFIX as _SESSION_SUFFIX
from fencelock._constants import SIDECAR_SUFFIX as _SIDECAR_SUFFIX

# ConfigError lives with the other exceptions; it is still importable from here.
from fencelock._errors import ConfigError as ConfigError

WHY = (
    "its heartbeat runs on the same session file as the channel and direct lanes, "
    "so heartbeat runs and conversation runs contend for it "
    "(set heartbeat.isolatedSession: true)"
)

MAX_CONFIG = 16 * 1024 * 1024
"""The largest config file read."""
_JSON5_POS = re.compile(r"^<string>:(\d+) (.*) at column (\d+)$", re.DOTALL)
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)?")
"""A heartbeat interval as the gateway reads one (trimmed, lowercased: its
``parseDurationMs``): ASCII digits, an optional fraction, an optional unit (minutes by
default). Linear to match: nothing in it can match the same text two ways."""
_SEGMENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
"""One part of a composite interval (``"1h30m"``, ``"2m500ms"``: newer gateways add the
parts up; each part has its unit, and the parts follow each other with nothing between)."""
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_JS_SPACE = ("\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
             "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff")
"""What JavaScript's ``String.prototype.trim`` removes (its white space and line
terminators: the BOM among them, but not every character Python's ``strip`` does)."""
_AGENT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.IGNORECASE | re.ASCII)
_NOT_IN_ID = re.compile(r"[^a-z0-9_-]+", re.ASCII)
MAX_JSON5 = 1024 * 1024
"""The largest config read as JSON5 when plain JSON fails: the JSON5 parser, pure
Python, takes some 20 seconds a MiB (a bigger config must be plain JSON)."""


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """One agent whose effective heartbeat shares the session file."""

    agent: str
    where: str
    """JSON path of the agent entry, e.g. ``agents.list[0]`` or ``agents.list.main``."""
    isolated: object
    """The effective ``isolatedSession`` value (None when unset)."""
    inherited: bool
    """Whether that value (or its absence) comes from ``agents.defaults.heartbeat``."""
    implicit: bool = False
    """No heartbeat is configured anywhere: this is the default agent, which the gateway
    gives its built-in heartbeat (every 30m, in the main session)."""
    chosen: str = ""
    """With ``implicit``: why this agent is the default one (``marked default: true``,
    ``the first listed``...)."""
    enabled_off: bool = False
    """The heartbeat says ``enabled: false``, which is no gateway setting: it still runs."""
    ignored: tuple[str, ...] = ()
    """Later entries with the same agent id (JSON paths): the gateway reads an agent's
    settings from its first entry only."""
    opted_out: tuple[str, ...] = ()
    """The agents whose heartbeat blocks all turn their heartbeat off, when this agent
    has no block of its own: newer gateways leave it the defaults' heartbeat, older ones
    applied the explicit-only rule to it (openclaw #119005)."""
    unknown_every: str = ""
    """The interval, where it names environment variables this process does not set
    (`_configsource.Unresolved`): taken to run."""

    @property
    def problem(self) -> str:
        if self.implicit:
            chosen = f" ({self.chosen})" if self.chosen else ""
            return ("no heartbeat is configured, so the gateway runs its default one "
                    f"(every 30m) for the default agent{chosen}, not isolated")
        if self.isolated is None:
            what = "heartbeat.isolatedSession is not set"
        else:
            what = f"heartbeat.isolatedSession is {_shown(self.isolated)}, not true"
        if self.inherited:
            what += " (inherited from agents.defaults.heartbeat)"
        if self.enabled_off:
            what += ('; enabled: false is no gateway setting and turns nothing off '
                     '(every: "0m" does)')
        if self.unknown_every:
            what += (f"; its interval, every: {self.unknown_every!r}, names a variable not "
                     f"set here, so it is taken to run (check where the gateway's is set)")
        return what

    @property
    def message(self) -> str:
        where = self.where
        if self.ignored:
            where += (f"; listed again at {', '.join(self.ignored)}, which the gateway does "
                      f"not read: it takes an agent's settings from its first entry")
        why = WHY
        if self.opted_out:
            why += (f"; gateways without the fix for openclaw #119005 run none for it, as "
                    f"{_agents_named(self.opted_out)} a heartbeat block that turns its own "
                    f"off")
        return f"agent {self.agent!r} ({where}): {self.problem}; {why}"


@dataclass(frozen=True, slots=True)
class ConfigNotice:
    """An agent that ``agents.defaults.heartbeat`` would give a heartbeat, but that runs
    none: other listed agents have heartbeat blocks of their own (the explicit-only
    rule). Nothing of it shares a session file; the notice is there so that a missing
    heartbeat does not come as a surprise."""

    agent: str
    where: str
    explicit: tuple[str, ...]
    """The listed agents whose heartbeat blocks of their own leave them an interval (which
    brings the explicit-only rule on), in file order."""

    @property
    def message(self) -> str:
        others = f"{_agents_named(self.explicit)} one"
        return (
            f"agent {self.agent!r} ({self.where}) runs no heartbeat: it has no heartbeat "
            f"block while {others}, and then the gateway runs heartbeats only for agents "
            f"with a block of their own (its explicit-only rule), so "
            f"agents.defaults.heartbeat does not reach it; give it a heartbeat block "
            f"(with isolatedSession: true) if it should run one"
        )


def _agents_named(agents: tuple[str, ...]) -> str:
    """``agent 'a' has`` or ``agents 'a', 'b', 'c' and 2 more have``."""
    if len(agents) == 1:
        return f"agent {agents[0]!r} has"
    named = "agents " + ", ".join(repr(a) for a in agents[:3])
    if len(agents) > 3:
        named += f" and {len(agents) - 3} more"
    return named + " have"


@dataclass(frozen=True, slots=True)
class ConfigReport:
    """What `review` found: warnings for heartbeats that share the session file, and
    notices for agents the explicit-only rule leaves without a heartbeat."""

    warnings: tuple[ConfigWarning, ...]
    notices: tuple[ConfigNotice, ...] = ()


_LONG_NUMBER = "an integer of more than 100 digits"

_NOT_A_CONFIG_FIX = "name the gateway's config file (usually ~/.openclaw/openclaw.json)"
"""What to do about a file that cannot be a gateway config at all."""

_SYNTAX_FIX = "mend the file there (the gateway cannot read it either)"
"""What to do about a config that does not parse."""

_NUMBER_FIX = "no gateway setting takes one: mend the file"

_TOO_DEEP = (f"nested too deeply to be checked, deeper than any gateway setting goes; "
             f"mend the file, or {_NOT_A_CONFIG_FIX}")
"""What to say of a config nested past what the parser can take."""


def _shown(value: object) -> str:
    """A setting's value for a message: a scalar as JSON (a long string cut short), an
    array or object by its kind (one may be huge, or nested past what can be encoded)."""
    if isinstance(value, (dict, list)):
        return _kind(value)
    if isinstance(value, str) and len(value) > 40:
        return json.dumps(value[:40])[:-1] + '..."'
    return json.dumps(value)


def _int(text: str, base: int = 10) -> int:
    # Python refuses to convert integers of over 4300 digits; no setting needs 100.
    # (json5 passes base=16 for a hexadecimal number such as 0x10.)
    if len(text) > 100:
        raise ValueError(f"{_LONG_NUMBER} ({text[:20]}...)")
    return int(text, base)


def _json_lines(text: str) -> bool:
    """Whether ``text`` is JSON lines: every non-blank line a JSON object. (Lines end
    at ``\n`` alone: a string may hold U+2028 or U+0085 unescaped, which
    `str.splitlines` would break at.)"""
    try:
        return all(isinstance(json.loads(line), dict) for line in text.split("\n")
                   if line.strip())
    except (ValueError, RecursionError):
        return False


def parse(text: str, path: str = "<config>") -> Any:
    """Parse JSON, or JSON5 when plain JSON fails (comments, trailing commas, bare keys)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise ConfigError(path, f"the file is empty; {_NOT_A_CONFIG_FIX}")
    try:
        return json.loads(text, parse_int=_int)
    except json.JSONDecodeError as e:
        # Several JSON objects, one a line: a session file named by mistake, which the
        # syntax error's advice ("mend the file") must not send anyone to edit.
        if e.msg == "Extra data" and _json_lines(text):
            raise ConfigError(path, f"JSON lines (one object a line), as in a session "
                                    f"file, not a gateway config; {_NOT_A_CONFIG_FIX}"
                              ) from None
        if len(text) > MAX_JSON5 // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_JSON5:
            raise ConfigError(
                path, f"not valid JSON: {e.msg}; fencelock reads a config over "
                f"{MAX_JSON5 >> 20} MiB as plain JSON only (its JSON5 parser would take "
                f"minutes): check a copy without JSON5's comments, trailing commas and "
                f"unquoted keys, or mend the file if the gateway cannot read it either",
                e.lineno, e.colno) from None
        # Otherwise JSON5: its errors are the ones to report
    except RecursionError:
        raise ConfigError(path, _TOO_DEEP) from None
    except ValueError as e:
        raise ConfigError(path, f"{e}; {_NUMBER_FIX}") from None
    import json5  # only configs that are not plain JSON pay for it

    try:
        return json5.loads(text, parse_int=_int)
    except RecursionError:
        raise ConfigError(path, _TOO_DEEP) from None
    except ValueError as e:
        if str(e).startswith(_LONG_NUMBER):
            raise ConfigError(path, f"{e}; {_NUMBER_FIX}") from None
        m = _JSON5_POS.match(str(e))
        if m:
            raise ConfigError(
                path, f"not valid JSON5: {m.group(2)}; {_SYNTAX_FIX}", int(m.group(1)),
                int(m.group(3)),
            ) from None
        # json5 gave no position (a number it could not convert, say): its own words,
        # not plain JSON's error, whose position may be a JSON5 comment or bare key.
        raise ConfigError(path, f"not valid JSON or JSON5: {e}; {_SYNTAX_FIX}") from None


JSON5_FRAMES = 25
"""Python frames the json5 parser takes for each level a value nests (pure Python: about
25 a level, where the json module takes one). The recursion limit is the interpreter's,
so the library leaves it alone (a config with a comment nests some 40 levels under the
default); ``fencelock check-config``, a process of its own, raises it this many times."""


def _read_fix(e: OSError) -> str:
    """What to do when the config cannot be opened."""
    if e.errno == errno.EISDIR:
        return "name the config file itself"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "run as a user who can read it, or fix its permissions"
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return "check the path (the gateway's is usually ~/.openclaw/openclaw.json)"
    return "check the path and try again"


def load(path: str | os.PathLike[str], limit: int = MAX_CONFIG) -> Any:
    """Read and parse a config file (of at most ``limit`` bytes: less for a file the
    config includes); `ConfigError` naming the file for anything wrong."""
    name = os.fspath(path)
    included = limit != MAX_CONFIG
    other_file = "fix the $include that names it" if included else "name the config file itself"
    try:
        # O_NONBLOCK: a FIFO named as the config must not hang the check.
        flags = os.O_RDONLY | _platform.O_NONBLOCK | _platform.O_CLOEXEC | _platform.O_BINARY
        try:
            fd = os.open(name, flags)
        except (ValueError, UnicodeError):  # a name no file can have (an $include's)
            bad = "a NUL byte" if "\0" in name else "text that is not valid Unicode"
            raise ConfigError(name, f"cannot read it: its name holds {bad}; "
                                    f"{other_file}") from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                what = _platform.describe_mode(mode)
                raise ConfigError(name, f"{what}, not a regular file; {other_file}")
            data = f.read(limit + 1)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket cannot be opened at all
            with contextlib.suppress(OSError):
                what = _platform.describe_mode(os.stat(name).st_mode)
                raise ConfigError(name, f"{what}, not a regular file; {other_file}") from None
        reason = e.strerror or type(e).__name__
        if e.errno == errno.ENOENT and os.path.islink(name):
            with contextlib.suppress(OSError):
                reason = f"a symlink to {os.readlink(name)}, which does not exist"
        fix = other_file if included else _read_fix(e)
        raise ConfigError(name, f"cannot read it: {reason}; {fix}") from None
    if len(data) > limit:
        raise ConfigError(name, f"larger than {limit >> 20} MiB: not a gateway config"
                          if limit == MAX_CONFIG else
                          f"larger than {limit >> 20} MiB, more than the gateway includes")
    # Named by mistake, whatever they hold: a one-line session file or a holder record
    # parses as a config with no agents (the gateway's default heartbeat, warned of),
    # and a session file's torn last line must not be "mended" on the linter's word.
    # (Either case: a case-insensitive filesystem takes S.JSONL.HOLDER for S.jsonl's.)
    # (An $include is read whatever its name, as the gateway reads it.)
    if not included and name.lower().endswith(_SESSION_SUFFIX):
        raise ConfigError(name, f"a session file (JSON lines), not a gateway config; "
                                f"{_NOT_A_CONFIG_FIX}")
    if not included and name.lower().endswith(_SIDECAR_SUFFIX):
        raise ConfigError(name, f"a session's holder record (fencelock's sidecar), not a "
                                f"gateway config; {_NOT_A_CONFIG_FIX}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            name, f"not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8"
        ) from None
    return parse(text, name)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _heartbeat(value: object, where: str, path: str) -> dict[str, Any] | bool | None:
    """A heartbeat setting as written: an object, True, or None. ``false`` is None: the
    gateway tests a block for truth and spreads it over the defaults, so ``false`` is
    no block at all (it turns nothing off)."""
    if value is None or value is False:
        return None
    if isinstance(value, (bool, dict)):
        return value
    raise ConfigError(path, f"{where} is {_kind(value)}, expected an object")




def _merged(base: dict[str, Any] | bool | None,
            own: dict[str, Any] | bool | None) -> dict[str, Any]:
    """An agent's heartbeat as the gateway runs it: its block over the defaults, a
    ``null`` ``every`` of its own taking the defaults' (the gateway's ``??``)."""
    merged: dict[str, Any] = dict(base) if isinstance(base, dict) else {}
    if isinstance(own, dict):
        merged.update(own)
        if own.get("every") is None and isinstance(base, dict):
            merged["every"] = base.get("every")
    return merged


def _cadence(hb: dict[str, Any]) -> bool:
    """Whether a merged heartbeat has an interval (a missing ``every`` is the gateway's
    default, 30m): whether it runs, and whether an agent's block selects it for the
    explicit-only rule. Only ``every`` turns a heartbeat off: the gateway has no
    ``enabled`` setting (its schema refuses one, and a config it refuses leaves the
    last one it took running)."""
    every = hb.get("every")
    return every is None or _interval(every)


def _interval(every: object) -> bool:
    """Whether the gateway runs ``every`` as an interval: JavaScript's ``String()`` of it,
    trimmed and lowercased, read as a duration (`_DURATION`) that rounds to a whole
    millisecond or more. A false value (false, 0, NaN, an empty string) is none, and so
    is what does not read as one (``true``, ``"1h 30m"``, ``"5 m"``, ``"+5"``, ``"5e1"``,
    ``"-5"``, a number that JavaScript writes with an exponent: under 1e-6 or from 1e21),
    and an array stands for its only element (``[5]`` is ``"5"``)."""
    if isinstance(every, Unresolved):
        return True  # what the gateway reads there is not known here: taken to run
    if isinstance(every, list):
        return len(every) == 1 and _interval(every[0])
    if isinstance(every, bool) or not isinstance(every, (int, float, str)):
        return False
    if isinstance(every, str):
        found = _duration_ms(every.strip(_JS_SPACE).lower())
        if found is None:
            return False
        ms = found
    else:
        try:
            value = float(every)
        except OverflowError:  # an integer past a double's range: Infinity in JavaScript
            return False
        if not 1e-6 <= value < 1e21:  # NaN, 0, negative, or written with an exponent
            return False
        ms = value * _UNIT_MS["m"]
    # Math.round: the nearest integer, a half up (x + 0.5 itself can round up in floating
    # point, where x is a hair under one half).
    return math.isfinite(ms) and (ms >= 1 or ms - math.floor(ms) >= 0.5)


def _duration_ms(text: str) -> float | None:
    """``text`` (trimmed, lowercased) in milliseconds as the gateway reads it: one part
    (`_DURATION`, minutes by default), or, in newer gateways, parts each with its unit
    (`_SEGMENT`) added up; None where it reads as neither."""
    match = _DURATION.fullmatch(text)
    if match is not None:
        return float(match[1]) * _UNIT_MS[match[2] or "m"]
    total, at = 0.0, 0
    for part in _SEGMENT.finditer(text):
        if part.start() != at:
            return None
        total += float(part[1]) * _UNIT_MS[part[2]]
        at = part.end()
    return total if at and at == len(text) else None


def _agent_key(agent_id: str) -> str:
    """The gateway's agent id for ``agent_id`` as written (its ``normalizeAgentId``):
    trimmed and lowercased, other characters than letters, digits, ``_`` and ``-`` made
    ``-``; ``main`` for none. Entries whose ids come to the same one are one agent."""
    trimmed = agent_id.strip(_JS_SPACE)
    if _AGENT_ID.fullmatch(trimmed):
        return trimmed.lower()
    return _NOT_IN_ID.sub("-", trimmed.lower()).strip("-")[:64] or "main"


_Listed = tuple[str, str, str, dict[str, Any]]
"""An agent entry: its gateway id (`_agent_key`), its id as written, where it is (its
JSON path), and the entry."""


def _js_order(keys: list[str]) -> list[str]:
    """An object's keys in the order JavaScript walks them: those that are array indices
    (``0``, ``10``; not ``01``), in ascending number, then the others as written."""
    def index(key: str) -> int | None:
        if key.isascii() and key.isdigit() and (key == "0" or key[0] != "0"):
            number = int(key)
            return number if number < 2**32 - 1 else None
        return None
    numbered = sorted((n, k) for k in keys if (n := index(k)) is not None)
    return [k for _, k in numbered] + [k for k in keys if index(k) is None]


def _roster(agents: dict[str, Any]) -> str:
    """Where the gateway's agents are: ``entries`` (newer gateways: keyed by id; a
    leftover ``list`` beside it is not read) or ``list``."""
    return "entries" if agents.get("entries") is not None else "list"


def _agents(agents: dict[str, Any], path: str) -> list[_Listed]:
    """Each agent in ``agents.entries`` or ``agents.list`` (`_roster`), in the gateway's
    order (`_Listed`)."""
    roster = _roster(agents)
    listed = agents.get(roster)
    out: list[_Listed] = []
    if listed is None:
        return out
    if isinstance(listed, list) and roster == "list":
        for i, entry in enumerate(listed):
            where = f"agents.list[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(path, f"{where} is {_kind(entry)}, expected an agent object")
            agent_id = entry.get("id")
            if isinstance(agent_id, str):
                out.append((_agent_key(agent_id), agent_id, where, entry))
            elif agent_id is None:  # no id: the gateway's `main`, as an empty one is
                out.append((_agent_key(""), where, where, entry))
            else:  # an id the gateway cannot read: judged on its own
                out.append((where, where, where, entry))
    elif isinstance(listed, dict):
        for agent_id in _js_order(list(listed)):
            where, entry = f"agents.{roster}.{agent_id}", listed[agent_id]
            if entry is None and roster == "entries":
                continue  # the gateway passes over an entry that is not an object
            if entry is None:
                entry = {}
            if not isinstance(entry, dict):
                raise ConfigError(path, f"{where} is {_kind(entry)}, expected an agent object")
            out.append((_agent_key(agent_id), agent_id, where, entry))
    else:
        expected = "an array or an object" if roster == "list" else "an object keyed by agent id"
        raise ConfigError(path, f"agents.{roster} is {_kind(listed)}, expected {expected}")
    return out


def _built_in_owners(
    agents: dict[str, Any], defaults: dict[str, Any], listed: list[_Listed]
) -> list[tuple[str, str, str]]:
    """The agents the gateway's built-in heartbeat may run for when no heartbeat is
    configured: (gateway id, id as written, why it is the default agent). In
    ``agents.entries`` (newer gateways only): ``agents.defaults.systemAgent.agentId``,
    else the one agent marked ``default: true`` (not under ``ownership: "explicit"``),
    else the only agent, else none. In ``agents.list``, read by older gateways too:
    what either may take, ``systemAgent.agentId`` (newer ones), the first marked agent,
    else ``main`` where listed (older ones) and the first listed."""
    system = _owner(defaults.get("systemAgent"))
    owners = [] if system is None else [(*system, "agents.defaults.systemAgent.agentId")]
    marked = [(key, name) for key, name, _, entry in listed if entry.get("default") is True]
    if _roster(agents) == "entries" and agents.get("entries"):
        if owners:
            return owners
        if len(marked) == 1 and agents.get("ownership") != "explicit":
            return [(*marked[0], "marked default: true")]
        if len({key for key, _, _, _ in listed}) == 1:
            return [(listed[0][0], listed[0][1], "the only agent")]
        return []  # no owner to be found: the gateway runs none
    if marked:
        owners.append((*marked[0], "marked default: true"))
    else:
        main = next(((key, name) for key, name, _, _ in listed if key == "main"), None)
        if main is not None:
            owners.append((*main, "older gateways take main when no agent is marked default"))
        owners.append((listed[0][0], listed[0][1], "the first listed"))
    seen: dict[str, tuple[str, str, str]] = {}
    for owner in owners:
        seen.setdefault(owner[0], owner)
    return list(seen.values())


def _settings(
    listed: list[_Listed], owns: list[dict[str, Any] | bool | None]
) -> dict[str, tuple[str, str, dict[str, Any] | bool | None]]:
    """For each gateway id: (name, where, heartbeat) of the first entry with that id, the
    one the gateway reads an agent's settings from."""
    first: dict[str, tuple[str, str, dict[str, Any] | bool | None]] = {}
    for (key, name, where, _), own in zip(listed, owns, strict=True):
        first.setdefault(key, (name, where, own))
    return first


def _owner(base: object) -> tuple[str, str] | None:
    """(gateway id, id as written) of ``agentId`` in ``base``: in
    ``agents.defaults.heartbeat``, the one agent the defaults' heartbeat runs for when no
    agent has a block of its own; in ``agents.defaults.systemAgent``, the agent newer
    gateways give the built-in heartbeat. None when it is not set (a string of more than
    white space)."""
    if not isinstance(base, dict):
        return None
    agent_id = base.get("agentId")
    written = agent_id.strip(_JS_SPACE) if isinstance(agent_id, str) else ""
    return (_agent_key(written), written) if written else None


def _is_block(value: object) -> bool:
    """Whether an agent's ``heartbeat`` counts as a block of its own for the explicit-only
    rule: any object (even an empty one) or ``true``, as the gateway tests it."""
    return value is True or isinstance(value, dict)


def _runs(hb: object) -> bool:
    """Whether a heartbeat setting (the defaults' alone) would run a heartbeat."""
    return hb is True or (isinstance(hb, dict) and _cadence(hb))


def check(config: object, path: str = "<config>") -> list[ConfigWarning]:
    """One warning per agent whose effective heartbeat is enabled and not isolated."""
    return list(review(config, path).warnings)


def review(config: object, path: str = "<config>") -> ConfigReport:
    """`check`'s warnings, plus a notice for each agent that the explicit-only rule
    leaves without the heartbeat ``agents.defaults.heartbeat`` would have given it."""
    if not isinstance(config, dict):
        raise ConfigError(path, f"the top level is {_kind(config)}, expected an object")
    agents = config.get("agents")
    if agents is None:
        agents = {}
    if not isinstance(agents, dict):
        raise ConfigError(path, f"agents is {_kind(agents)}, expected an object")
    defaults = agents.get("defaults")
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        raise ConfigError(path, f"agents.defaults is {_kind(defaults)}, expected an object")
    base = _heartbeat(defaults.get("heartbeat"), "agents.defaults.heartbeat", path)
    listed = _agents(agents, path)
    if not listed:  # no agents (or none listed): the implicit default agent runs
        roster = _roster(agents)
        why = "no agents.list" if agents.get(roster) is None else f"agents.{roster} is empty"
        listed = [("main", "main", f"agents ({why}: the implicit default agent)", {})]
    owns = [_heartbeat(entry.get("heartbeat"), f"{where}.heartbeat", path)
            for _, _, where, entry in listed]
    # Any entry with a block makes the explicit-only rule apply (a later entry of an id
    # listed twice too), but the gateway reads an agent's settings from the first entry
    # with its id: an id listed twice (or written two ways: `Ops`, ` ops`) is judged
    # once, by that entry.
    first = _settings(listed, owns)
    blocks = dict.fromkeys(
        key for (key, _, _, _), own in zip(listed, owns, strict=True) if _is_block(own))
    # The rule applies once one of those blocks leaves its agent an interval: in newer
    # gateways a block that turns it off (`every: "0m"`) only opts that agent out, and
    # the others keep the defaults' heartbeat (older ones applied the rule anyway: this
    # reports the heartbeats either may run).
    explicit = blocks if any(_cadence(_merged(base, first[key][2])) for key in blocks) else {}
    # With no block of its own anywhere, `agents.defaults.heartbeat.agentId` (gateways
    # that know it) gives the heartbeat to that one agent, listed or not.
    owner = None if explicit else _owner(base)
    if base is None and owner is None and not explicit:
        # No defaults: the gateway's built-in heartbeat runs for its default agent (see
        # `_built_in_owners`), unless a block of its own turns it off.
        built_in = []
        for key, written, chosen in _built_in_owners(agents, defaults, listed):
            name, where, own = first.get(key, (written, chosen, None))
            if own is None:  # (a block here leaves it no interval)
                built_in.append(ConfigWarning(name, where, None, False, implicit=True,
                                              chosen=chosen))
        return ConfigReport(tuple(built_in))
    if owner is not None and owner[0] not in first:
        first[owner[0]] = (owner[1], "agents.defaults.heartbeat.agentId", None)
    warnings: list[ConfigWarning] = []
    notices: list[ConfigNotice] = []
    wheres: dict[str, list[str]] = {}  # every entry of each id (once: the list may be long)
    for key, _, where, _ in listed:
        wheres.setdefault(key, []).append(where)
    # The agents whose blocks bring the rule on (each by its first entry's id): not one
    # whose block only turns its own heartbeat off, which would not have.
    named = tuple(first[key][0] for key in explicit if _cadence(_merged(base, first[key][2])))
    for key, (name, where, own) in first.items():  # each id once, in file order
        if explicit and key not in explicit:
            if own is None and _runs(base):
                notices.append(ConfigNotice(name, where, named))
            continue  # the explicit-only rule: no block of its own, no heartbeat
        if owner is not None and key != owner[0]:
            continue  # the defaults' heartbeat is another agent's
        merged = _merged(base, own)
        if not _cadence(merged):
            continue
        isolated = merged.get("isolatedSession")
        if isolated is True:
            continue
        own_sets = isinstance(own, dict) and "isolatedSession" in own
        inherited = not own_sets and isinstance(base, dict) and "isolatedSession" in base
        ignored = tuple(w for w in wheres.get(key, ()) if w != where)
        # No block of its own beside blocks that only opt out: older gateways ran none.
        opted_out = tuple(first[k][0] for k in blocks) if own is None and not explicit else ()
        every = merged.get("every")
        warnings.append(ConfigWarning(name, where, isolated, inherited, ignored=ignored,
                                      opted_out=opted_out,
                                      unknown_every=str(every)
                                      if isinstance(every, Unresolved) else "",
                                      enabled_off=merged.get("enabled") is False))
    return ConfigReport(tuple(warnings), tuple(notices))


def load_resolved(path: str | os.PathLike[str]) -> Any:
    """`load`, then the config as the gateway reads it: its includes resolved, its
    environment references substituted (`_configsource`)."""
    name = os.fspath(path)
    return _configsource.resolve(load(name), name, load)


def check_file(path: str | os.PathLike[str]) -> list[ConfigWarning]:
    """`load_resolved` then `check`."""
    name = os.fspath(path)
    return check(load_resolved(name), name)


def review_file(path: str | os.PathLike[str]) -> ConfigReport:
    """`load_resolved` then `review`."""
    name = os.fspath(path)
    return review(load_resolved(name), name)
