"""JSON as strict readers take it: Python's extensions (``NaN``, ``Infinity``, numbers
past a double's range read as ``inf``) are refused wherever fencelock reads JSON that
another program wrote or will read (records, requests, session lines)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any


class NotJSONError(ValueError):
    """A constant or number that strict JSON readers refuse."""


class RepeatedKeyError(ValueError):
    """An object that names one key twice: readers disagree on which value counts."""

    def __init__(self, key: str) -> None:
        shown = json.dumps(key if len(key) <= 80 else key[:77] + "...")
        super().__init__(f"the key {shown} appears twice in one object")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """For ``object_pairs_hook``: the object, or `RepeatedKeyError` where a key repeats
    (``json.loads`` keeps the last value without a word)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKeyError(key)
            seen.add(key)
    return obj


def not_json(constant: str) -> Any:
    """For ``parse_constant``: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON."""
    raise NotJSONError(f"{constant} is not JSON")


def finite_float(text: str) -> float:
    """For ``parse_float``: a JSON number as a float; `NotJSONError` for one past a
    double's range (``1e400``), which would come back out as ``Infinity``."""
    value = float(text)
    if math.isinf(value):
        raise NotJSONError(f"number {text[:40]} is out of range for a double")
    return value


_SHORT = len(str(int(sys.float_info.max)))
"""Digits below which an integer is within a double's range, whatever they are."""


def finite_int(text: str) -> int:
    """For ``parse_int``: a JSON integer; `NotJSONError` for one past a double's range
    (a 400-digit one), which a reader that takes numbers as doubles (JavaScript's
    ``JSON.parse``) reads as ``Infinity``, as it does ``1e400``: one that rounds to
    infinity (from 2**1024 - 2**970 on), as Python's ``float`` does."""
    value = int(text)
    if len(text) >= _SHORT:
        try:
            float(value)
        except OverflowError:
            raise NotJSONError(f"number {text[:40]}... ({len(text)} digits) is out of "
                               "range for a double") from None
    return value


def loads(text: str | bytes, parse_int: Callable[[str], Any] | None = None) -> Any:
    """``json.loads`` without Python's extensions to JSON: ``NaN`` and ``Infinity``
    raise ValueError (as any JSON reader would). Numbers of any size are JSON."""
    return json.loads(text, parse_constant=not_json, parse_int=parse_int)


def strict_loads(text: str | bytes, parse_int: Callable[[str], Any] | None = None,
                 object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
                 ) -> Any:
    """``json.loads`` as strict JSON readers take it: no NaN or Infinity, and no number
    past a double's range (``parse_int``: in place of `finite_int`); ValueError (or
    RecursionError) otherwise. ``object_pairs_hook`` as json's (`unique_keys`: no key
    twice in one object)."""
    return json.loads(text, parse_constant=not_json, parse_float=finite_float,
                      parse_int=parse_int or finite_int, object_pairs_hook=object_pairs_hook)


SPACE = " \t\r\n"
"""What JSON counts as whitespace between tokens."""


def kind(value: object) -> str:
    """The JSON name of ``value``'s type, for messages to callers in any language."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "a string"


def digits_problem(e: ValueError) -> str | None:
    """Python's own limit on turning integers into text and back (not JSON's), in plain
    words; None for any other error."""
    if "integer string conversion" not in str(e):
        return None
    return (f"an integer of over {sys.get_int_max_str_digits()} digits, which Python "
            "does not convert (send it as a string)")
