"""Whether a line is one JSON value, without Python's parser: for lines nested deeper
than it goes (`is_json`), and for lines too long to hold in memory, checked as they
are read (`JsonStream`). Strict JSON, as `fencelock._json` reads it: UTF-8, no NaN or
Infinity, no control characters unescaped."""

from __future__ import annotations

import codecs
import re

_WS = r"[ \t\n\r]*"
_BODY = r'(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+'
"""A string's inside: characters JSON allows there, and its escapes."""
_SCALAR = (rf'"{_BODY}"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?'
           r"|true|false|null")
"""A string, number or literal (NaN and Infinity are not JSON)."""

_TOKEN = re.compile(
    rf"{_WS}(?:(?P<open>[\[{{])|(?P<close>[\]}}])|(?P<colon>:)|(?P<comma>,)|(?P<value>{_SCALAR}))"
)
"""One JSON token after optional whitespace. Possessive repeats: a string of millions
of characters is matched without a backtracking state for each."""

_STRING_BODY = re.compile(_BODY)
"""The inside of a string up to its closing quote (or whatever is not allowed there)."""

_WHITESPACE = re.compile(_WS)

_ARRAY_RUN = re.compile(rf"(?:{_WS}(?:{_SCALAR}){_WS},)++")
"""Array elements that are plain values, each with its comma: an array of a million
numbers (an embedding, say) is taken in one match, not a token at a time."""

_TOKEN_START = re.compile(
    r"-?(?:0|[1-9][0-9]*)?(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?"
    r"|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?"
)
"""What the start of a number or literal cut by a chunk's end can look like."""

RELIABLE = (_STRING_BODY.match("\\u").end() == 0  # type: ignore[union-attr]
            and _ARRAY_RUN.match('"\\n",1').end() == 5)  # type: ignore[union-attr]
"""Whether this Python's regular expressions match a possessive repeat of a group with
alternatives as written: 3.11.0 to 3.11.4 do not (CPython gh-106052, fixed in 3.11.5),
and would call valid lines torn. Where they do not, no check here gives a verdict."""

_OPENS = {"[": ord("]"), "{": ord("}")}
_CLOSE_ARRAY = ord("]")


class _Grammar:
    """Where a JSON text stands between its tokens: the closing bracket of each
    container still open (a byte each), and what may come next: a value (``value``, or
    ``value]`` right after ``[``), a key (``key``, or ``key}`` right after ``{``), a
    ``:``, or ``next`` (a ``,``, a closing bracket, or the end)."""

    __slots__ = ("expect", "open")

    def __init__(self) -> None:
        self.open = bytearray()
        self.expect = "value"

    def take(self, kind: str, first: str) -> bool:
        """Take a token of ``kind`` (`_TOKEN`'s group names) beginning with ``first``;
        False where it cannot come here."""
        expect = self.expect
        if kind == "close":
            empty = "value]" if first == "]" else "key}"  # closing right after opening
            if not self.open or self.open[-1] != ord(first) or expect not in ("next", empty):
                return False
            self.open.pop()
            self.expect = "next"
        elif expect in ("value", "value]") and kind == "open":
            self.open.append(_OPENS[first])
            self.expect = "value]" if first == "[" else "key}"
        elif expect in ("value", "value]") and kind == "value":
            self.expect = "next"
        elif expect in ("key", "key}") and kind == "value" and first == '"':
            self.expect = ":"
        elif expect == ":" and kind == "colon":
            self.expect = "value"
        elif expect == "next" and kind == "comma" and self.open:
            self.expect = "value" if self.open[-1] == ord("]") else "key"
        else:
            return False
        return True

    def complete(self) -> bool:
        """Whether the tokens taken make one whole value."""
        return self.expect == "next" and not self.open


def is_json(raw: bytes) -> bool | None:
    """Whether ``raw`` (one line, its line break included) is one JSON value, checked
    with a stack of its own: for lines nested deeper than Python's parser goes. None
    where this Python cannot tell (`RELIABLE`)."""
    if not RELIABLE:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    grammar = _Grammar()
    pos = 0
    while (m := _TOKEN.match(text, pos)) is not None:
        pos, kind = m.end(), m.lastgroup or ""
        if not grammar.take(kind, m[kind][0]):
            return False
    return grammar.complete() and not text[pos:].strip(" \t\n\r")


class JsonStream:
    """`is_json` for a line fed a chunk at a time (``feed``, then ``end``), keeping in
    memory only what one token needs: a string is checked as it goes, however long.
    ``ok`` is False once the line cannot be JSON; None where the check gave up (a
    number or literal longer than `MAX_CARRY`, or more than `MAX_TOKENS` steps), which
    says nothing either way."""

    MAX_CARRY = 1 << 20
    MAX_TOKENS = 2_000_000
    """Tokens are taken one at a time in Python (about 1 us each), but for a string of
    any length and a run of plain array elements (a long list of numbers or strings),
    which are one step each: past this many, a check would take seconds a line. (Each
    opening bracket is a step: this bounds the depth kept too, at a byte a level.)"""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._grammar = _Grammar()
        self._text = ""  # decoded, not yet checked
        self._in_string = False
        self._tokens = 0
        self.ok: bool | None = True if RELIABLE else None

    def feed(self, data: bytes | memoryview) -> None:
        if self.ok:
            self._run(data, final=False)

    def end(self) -> bool | None:
        """Whether the line fed is one JSON value (None: the check gave up)."""
        if self.ok:
            self._run(b"", final=True)
            if self.ok and not (self._grammar.complete() and not self._in_string):
                self.ok = False
        return self.ok

    def _run(self, data: bytes | memoryview, final: bool) -> None:
        try:
            text = self._text + self._decoder.decode(data, final)
        except UnicodeDecodeError:
            self.ok = False
            return
        pos, end, grammar = 0, len(text), self._grammar
        while pos < end:
            if self._in_string:
                pos = _STRING_BODY.match(text, pos).end()  # type: ignore[union-attr]
                if pos == end:
                    break
                if text[pos] == '"':
                    pos += 1
                    self._in_string = False
                    continue
                if text[pos] == "\\" and end - pos < 6 and not final:
                    break  # an escape cut by the chunk's end: its rest comes next
                self.ok = False  # a control character, or an escape JSON has not
                return
            pos = _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]
            if pos == end:
                break
            self._tokens += 1  # a step: a token, a string, or a run of array elements
            if self._tokens > self.MAX_TOKENS:
                self.ok = None
                return
            if grammar.expect in ("value", "value]") and grammar.open and \
                    grammar.open[-1] == _CLOSE_ARRAY and (m := _ARRAY_RUN.match(text, pos)):
                pos, grammar.expect = m.end(), "value"  # after a comma: a value next
                continue
            if text[pos] == '"':  # a string: whole here, or checked as it comes
                m = _TOKEN.match(text, pos)
                whole = m is not None and m.lastgroup == "value"
                if not grammar.take("value", '"'):
                    self.ok = False
                    return
                if whole:
                    pos = m.end()  # type: ignore[union-attr]
                else:
                    self._in_string, pos = True, pos + 1
                continue
            if not final and _TOKEN_START.fullmatch(text, pos) is not None:
                # A number or literal the chunk's end may have cut (``12``, ``1.``,
                # ``tru``): checked once its rest comes, unless longer than is kept.
                if end - pos > self.MAX_CARRY:
                    self.ok = None
                    return
                break
            m = _TOKEN.match(text, pos)
            if m is None:
                self.ok = False
                return
            kind = m.lastgroup or ""
            if not grammar.take(kind, m[kind][0]):
                self.ok = False
                return
            pos = m.end()
        self._text = text[pos:]
