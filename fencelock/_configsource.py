"""A gateway config as the gateway reads it before it looks at any setting: its
``$include`` directives replaced by what the files they name hold, then its ``${VAR}``
references by the environment's values (openclaw's config loader does both, in that
order). `fencelock check-config` judges what this gives, not the file as written: a
heartbeat set in an included file, or an interval taken from the environment, is one
the gateway runs.

Includes as the gateway resolves them: ``"$include": "FILE"`` or an array of file names,
each relative to the file that names it; an object holding nothing else becomes what
the files hold (merged in order), and one with other keys beside it is the files' object
with those keys merged over it. Merging is deep: objects key by key, arrays one after
the other, anything else the later value. Includes nest up to 10 deep, a file may not
include itself through others, and each is a regular file of at most 2 MiB. (The
gateway also keeps includes inside the config's directory, or roots its environment
adds; fencelock reads what the config names wherever it is.)

References as the gateway substitutes them, in every string: ``${NAME}``, NAME
upper-case letters, digits and ``_`` (not starting with a digit), is the variable's
value; ``$${NAME}`` is the text ``${NAME}``; anything else is left as it is. The
variables are the environment's, and, where it leaves one unset or blank, the config's
own: its ``env.vars``, and the strings directly under ``env`` (not ones that hold a
reference themselves). A variable set nowhere (the gateway refuses the config, or
leaves the text, as its versions differ) may be set in the gateway's environment,
which need not be this process's: such a string is kept, as `Unresolved`, and the check
reads it for what it may be (a heartbeat interval it cannot read is taken to run).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from fencelock._errors import ConfigError

INCLUDE_KEY = "$include"
MAX_INCLUDE_DEPTH = 10
MAX_INCLUDE_BYTES = 2 * 1024 * 1024
_REFERENCE = re.compile(r"\$(\$?)\{([A-Z_][A-Z0-9_]*)\}")
_NOT_MERGED = frozenset({"__proto__", "constructor", "prototype"})
"""Keys the gateway's merge passes over (JavaScript's prototype keys)."""
_REFUSED = "the gateway refuses this config too"


class Unresolved(str):
    """A string whose ``${NAME}`` references name variables this environment does not
    set (`names`): what the gateway reads there is not known here."""

    names: tuple[str, ...] = ()


Read = Callable[[str, int], Any]
"""Reads and parses a config file (its path, the most bytes it may hold)."""


def resolve(config: Any, path: str, read: Read,
            environ: Mapping[str, str] | None = None) -> Any:
    """``config`` (parsed from ``path``) with its includes resolved (files read with
    ``read``) and its references substituted from ``environ`` (this process's)."""
    included = _Includes(read).resolve(config, os.path.abspath(path), (), 0)
    variables = dict(os.environ if environ is None else environ)
    for name, value in _config_variables(included).items():
        if not variables.get(name, "").strip():  # the gateway's: only where unset or blank
            variables[name] = value
    return substitute(included, variables)


def _config_variables(config: Any) -> dict[str, str]:
    """The variables a config sets itself (``env.vars``, and strings directly under
    ``env``), which the gateway adds where its environment has none."""
    env = config.get("env") if isinstance(config, dict) else None
    if not isinstance(env, dict):
        return {}
    found = env.get("vars")
    pairs = [*(found.items() if isinstance(found, dict) else ()),
             *((k, v) for k, v in env.items() if k not in ("vars", "shellEnv"))]
    return {name.strip(): value for name, value in pairs
            if isinstance(name, str) and name.strip() and isinstance(value, str)
            and value.strip() and not any(not m[1] for m in _REFERENCE.finditer(value))}


def merge(target: Any, source: Any) -> Any:
    """``source`` merged over ``target`` as the gateway merges includes."""
    if isinstance(target, list) and isinstance(source, list):
        return [*target, *source]
    if isinstance(target, dict) and isinstance(source, dict):
        merged = dict(target)
        for key, value in source.items():
            if key not in _NOT_MERGED:
                merged[key] = merge(merged[key], value) if key in merged else value
        return merged
    return source


class _Includes:
    def __init__(self, read: Read) -> None:
        self.read = read

    def resolve(self, value: Any, path: str, chain: tuple[str, ...], depth: int) -> Any:
        """``value``, found in the file ``path`` (``chain``: the files that included it,
        ``depth`` of them), with every include in it resolved."""
        if isinstance(value, list):
            return [self.resolve(item, path, chain, depth) for item in value]
        if not isinstance(value, dict):
            return value
        if INCLUDE_KEY not in value:
            return {k: self.resolve(v, path, chain, depth) for k, v in value.items()}
        included = self._included(value[INCLUDE_KEY], path, chain, depth)
        rest = {k: self.resolve(v, path, chain, depth)
                for k, v in value.items() if k != INCLUDE_KEY}
        if not rest:
            return included
        if not isinstance(included, dict):
            raise ConfigError(path, f"{INCLUDE_KEY} beside other keys names files that do "
                              f"not hold an object, which those keys could be merged over; "
                              f"{_REFUSED}")
        return merge(included, rest)

    def _included(self, names: Any, path: str, chain: tuple[str, ...], depth: int) -> Any:
        if isinstance(names, str):
            return self._file(names, path, chain, depth)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(path, f"{INCLUDE_KEY} is {names!r:.80}, not a file name or an "
                              f"array of file names; {_REFUSED}")
        merged: Any = {}
        for name in names:
            merged = merge(merged, self._file(name, path, chain, depth))
        return merged

    def _file(self, name: str, path: str, chain: tuple[str, ...], depth: int) -> Any:
        target = os.path.normpath(os.path.join(os.path.dirname(path), name))
        if target == path or target in chain:
            cycle = " -> ".join([*chain, path, target])
            raise ConfigError(path, f"{INCLUDE_KEY} {name!r} includes a file that includes "
                              f"it ({cycle}); {_REFUSED}")
        if depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError(path, f"{INCLUDE_KEY} {name!r} nests includes more than "
                              f"{MAX_INCLUDE_DEPTH} deep; {_REFUSED}")
        try:
            parsed = self.read(target, MAX_INCLUDE_BYTES)
        except ConfigError as e:
            if e.line is not None:  # where in it: the message stands
                raise
            raise ConfigError(e.path, f"{e.why} (named by the {INCLUDE_KEY} in {path})"
                              ) from None
        return self.resolve(parsed, target, (*chain, path), depth + 1)


def substitute(value: Any, environ: Mapping[str, str]) -> Any:
    """``value`` with every string's references substituted (`Unresolved` where a
    variable is unset or empty)."""
    if isinstance(value, str):
        return _substituted(value, environ) if "${" in value else value
    if isinstance(value, list):
        return [substitute(item, environ) for item in value]
    if isinstance(value, dict):
        return {k: substitute(v, environ) for k, v in value.items()}
    return value


def _substituted(text: str, environ: Mapping[str, str]) -> str:
    unset: list[str] = []

    def one(m: re.Match[str]) -> str:
        if m[1]:  # $${NAME}: the text ${NAME}
            return m[0][1:]
        found = environ.get(m[2], "")
        if not found:  # (unset or empty: a blank one is substituted as it is)
            unset.append(m[2])
            return m[0]
        return found

    done = _REFERENCE.sub(one, text)
    if not unset:
        return done
    kept = Unresolved(done)
    kept.names = tuple(dict.fromkeys(unset))
    return kept
