"""The requests fencelock's etcd store sends to etcd's v3 JSON gateway, and the answers
it reads: keys and values in base64, the range, put, delete and compare parts of a
transaction, and the shape every answer of etcd's has (`misshapen`)."""

from __future__ import annotations

import base64
import functools
from typing import Any

REQUEST_TIMEOUT = 2.0
"""The longest one request to etcd may take (less when the caller's deadline is near)."""

_ASCEND, _DESCEND = 1, 2
_BY_CREATE = 2  # SortTarget: KEY, VERSION, CREATE, MOD, VALUE


def b64(text: str | bytes) -> str:
    if isinstance(text, str):
        return _b64_key(text)
    return base64.b64encode(text).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _b64_key(text: str) -> str:
    """A key as the gateway takes it. Kept: a holder names the same few keys in every
    request, and a hand-off's requests are built right after a long wait, when each
    step costs several times more than in a loop."""
    # A session name that is not UTF-8 reaches us as os.fsdecode gives it (lone
    # surrogates): the key is the name's bytes, as the filesystem has them.
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def key_text(kv: dict[str, Any]) -> str:
    """A key as text, its bytes that are not UTF-8 as os.fsdecode gives them."""
    return unb64(kv["key"]).decode("utf-8", "surrogateescape")


def prefix_end(prefix: str) -> str:
    """The end of the key range of every key starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def key_range(key: str, *, prefix: bool = False, first: bool = False, last: bool = False,
           max_create: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key)}
    if prefix:
        req["range_end"] = b64(prefix_end(key))
    if first or last:
        req.update(sort_order=_ASCEND if first else _DESCEND, sort_target=_BY_CREATE, limit=1)
    if max_create is not None:
        req["max_create_revision"] = max_create
    return {"request_range": req}


def put(key: str, value: bytes | Encoded, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": value if isinstance(value, Encoded)
                           else b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


class Encoded(str):
    """A value base64-encoded once for the several puts that store it."""


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def created(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": revision}


def holds(key: str, value: bytes) -> dict[str, Any]:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def holds_value(txn: dict[str, Any], value: bytes) -> bool:
    """Whether a failed transaction's one range found ``value``."""
    responses = txn.get("responses") or [{}]
    found = kvs(responses[0])
    return bool(found) and base64.b64decode(found[0].get("value", "")) == value


def kvs(response: dict[str, Any]) -> list[dict[str, Any]]:
    return list(response.get("response_range", {}).get("kvs", []))


def count(response: dict[str, Any]) -> int:
    return int(response.get("response_range", {}).get("count", 0))


def _integer(value: object) -> bool:
    """Whether ``value`` is an integer as etcd's gateway writes one (int64 as a string)."""
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def _objects(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def misshapen(path: str, payload: dict[str, Any], result: dict[str, Any]) -> str | None:
    """What an answer to ``path`` (asked with ``payload``) lacks of the shape etcd
    always gives it and the store reads (a lease's ID, one response for each operation
    of the branch a transaction took, ...); None when it has that shape."""
    if not isinstance(result.get("header", {}), dict):
        return "a header object"
    if path == "/lease/grant" and not (_integer(result.get("ID"))
                                       and _integer(result.get("TTL", 0))):
        return "a lease ID and TTL"
    if path == "/lease/keepalive":
        kept = result.get("result", {})
        if not isinstance(kept, dict) or not _integer(kept.get("TTL", -1)):
            return "a lease TTL"
    if path == "/kv/lease/timetolive" and not _integer(result.get("TTL", -1)):
        return "a lease TTL"
    if not _objects(result.get("kvs", [])):
        return "a list of keys"
    responses = result.get("responses", [])
    if not _objects(responses) or not all(
        isinstance(part, dict) for response in responses for part in response.values()
    ):
        return "a list of responses"
    if path == "/kv/txn":
        # etcd leaves out what is empty or false: "succeeded" when the compare failed,
        # "responses" when the branch taken has no operations.
        taken = payload.get("success" if result.get("succeeded") else "failure") or []
        if len(responses) != len(taken):
            return "a response for each operation"
    for response in responses:
        kvs = response.get("response_range", {}).get("kvs", [])
        if not _objects(kvs):
            return "a list of keys"
    return None


def raw(kvs: list[dict[str, Any]]) -> bytes | None:
    """The value of the first key in ``kvs``, None when there is none."""
    return unb64(kvs[0].get("value", "")) if kvs else None
