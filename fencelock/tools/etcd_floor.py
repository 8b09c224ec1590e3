"""`FloorEtcdLock`: the etcd store's protocol on a bare HTTP connection, for the
benchmark's "etcd floor" rows; and `transaction_costs`, one write transaction through
etcd3gw and through a bare connection."""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import time
from typing import Any

# Internals the floor needs, imported deliberately: it names its keys as fencelock's
# etcd store does, so that the two queue for the same session.
from fencelock import _backend, _etcdurl
from fencelock.tools.peers import record_bytes

_TXN = "/v3/kv/txn"
_HEADERS = {"Content-Type": "application/json"}
_ASCEND, _DESCEND, _BY_CREATE = 1, 2, 2


def _b64(raw: bytes | str) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode("ascii")


def _kvs(response: dict[str, Any]) -> list[dict[str, Any]]:
    return list(response.get("response_range", {}).get("kvs", []))


class FloorEtcdLock:
    """The etcd store's protocol, and only its requests, on a bare keep-alive HTTP
    connection (``http.client``) to etcd's JSON gateway.

    It sends the request bodies `fencelock._etcd.EtcdHolder` sends, in the same order:
    acquire puts ``PREFIX/sessions/<key>/<lease hex>`` under the lease (guarded by a
    compare on create revision 0) and reads the first key by create revision; the first
    key's owner writes its record (a transaction guarded by its key's create revision,
    into its key and ``PREFIX/last/<key>``). A waiter looks up the key just ahead of its
    own, watches it (NOPUT, from etcd's current revision; if anything was written
    since the look, it looks at that key once more) on a connection of its own whose
    chunked stream it reads in the acquiring thread itself, and once that key is
    deleted sends one transaction that checks no older key is left (CREATE on the
    prefix range GREATER than its revision - 1) and writes the record. Release is one
    transaction guarded by its key's create revision: put the released record into
    ``last``, delete its key.

    One lease per lock, granted with a time to live long enough for a benchmark run and
    never kept alive (`close` revokes it); one endpoint; records precomputed around the
    token, of fencelock's size; no reentrancy, no timeouts, no fork safety, no error
    handling beyond the transactions' own guards. This is a lower bound for the etcd
    store's protocol over the HTTP gateway, not a usable lock.
    """

    def __init__(self, url: str, session: str, ttl: int = 60) -> None:
        parsed = _etcdurl.parse(url)
        assert parsed is not None, "an etcd:// URL"
        self.host, self.port = parsed.endpoints[0]
        key = _backend.session_key(session, parsed.root)
        pfx = f"{parsed.prefix}/sessions/{key}/"
        self.conn = http.client.HTTPConnection(self.host, self.port)
        grant = json.dumps({"TTL": ttl, "ID": 0}).encode()
        self.lease = int(self._post("/v3/lease/grant", grant)["ID"])
        my = f"{pfx}{self.lease:x}"
        self.my, self.pfx = _b64(my), _b64(pfx)
        self.pfx_end = _b64(pfx[:-1] + chr(ord(pfx[-1]) + 1))
        self.last = _b64(f"{parsed.prefix}/last/{key}")
        first = {"request_range": {"key": self.pfx, "range_end": self.pfx_end,
                                   "sort_order": _ASCEND, "sort_target": _BY_CREATE,
                                   "limit": 1}}
        last = {"request_range": {"key": self.last}}
        self.enqueue = json.dumps({
            "compare": [self._created(self.my, 0)],
            "success": [{"request_put": {"key": self.my, "value": "", "lease": self.lease}},
                        first, last],
            "failure": [{"request_range": {"key": self.my}}, first, last],
        }).encode()
        record = json.loads(record_bytes(session))
        suffix = f',"lease":"{self.lease:x}","store":"etcd"}}'
        self.held = self._template({**record, "state": "held"}, suffix)
        self.released = self._template({**record, "state": "released"}, suffix)
        self.token = 0

    @staticmethod
    def _template(record: dict[str, Any], suffix: str) -> tuple[str, str]:
        text = json.dumps({**record, "token": "T"}, separators=(",", ":"))
        head, tail = text.split('"T"')
        return head, tail[:-1] + suffix

    @staticmethod
    def _created(key: str, revision: int) -> dict[str, Any]:
        return {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": revision}

    def _value(self, template: tuple[str, str]) -> str:
        return _b64(f"{template[0]}{self.token}{template[1]}")

    def _post(self, path: str, body: bytes) -> dict[str, Any]:
        self.conn.request("POST", path, body, _HEADERS)
        result: dict[str, Any] = json.loads(self.conn.getresponse().read())
        return result

    def _write(self, value: str) -> None:
        """The owner's first record (`EtcdHolder.write`)."""
        r = self._post(_TXN, json.dumps({
            "compare": [self._created(self.my, self.token)],
            "success": [{"request_put": {"key": self.my, "value": value, "lease": self.lease}},
                        {"request_put": {"key": self.last, "value": value}}],
            "failure": [],
        }).encode())
        assert r.get("succeeded"), r

    def acquire(self) -> None:
        r = self._post(_TXN, self.enqueue)
        assert r.get("succeeded"), "the floor does not nest"
        revision = self.token = int(r["header"]["revision"])
        owner = _kvs(r["responses"][1])
        if owner and int(owner[0]["create_revision"]) == revision:
            self._write(self._value(self.held))
            return
        look = [
            {"request_range": {"key": self.pfx, "range_end": self.pfx_end,
                               "sort_order": _DESCEND, "sort_target": _BY_CREATE, "limit": 1,
                               "max_create_revision": revision - 1}},
            {"request_range": {"key": self.my}}, {"request_range": {"key": self.last}},
        ]
        r = self._post(_TXN, json.dumps({"compare": [], "success": look,
                                         "failure": []}).encode())
        while True:
            ahead = _kvs(r["responses"][0])
            if not ahead:
                self._write(self._value(self.held))
                return
            watch = http.client.HTTPConnection(self.host, self.port)
            try:
                watch.request("POST", "/v3/watch", json.dumps({"create_request": {
                    "key": ahead[0]["key"], "filters": ["NOPUT"]}}).encode(), _HEADERS)
                stream = watch.getresponse()
                created = json.loads(stream.readline())["result"]
                gone = False
                if int(created["header"]["revision"]) > int(r["header"]["revision"]):
                    # written since the look: the key ahead may be gone already
                    now = self._post(_TXN, json.dumps({"compare": [], "failure": [], "success": [
                        {"request_range": {"key": ahead[0]["key"]}}]}).encode())
                    kvs = _kvs(now["responses"][0])
                    gone = not kvs or kvs[0]["create_revision"] != ahead[0]["create_revision"]
                while not gone:  # the key's deletion
                    line = stream.readline()
                    if not line:
                        raise RuntimeError("etcd ended the watch")
                    gone = bool(json.loads(line).get("result", {}).get("events"))
                value = self._value(self.held)
                r = self._post(_TXN, json.dumps({
                    "compare": [
                        self._created(self.my, revision),
                        {"key": self.pfx, "range_end": self.pfx_end, "target": "CREATE",
                         "result": "GREATER", "create_revision": revision - 1},
                    ],
                    "success": [
                        {"request_range": {"key": self.last}},
                        {"request_put": {"key": self.my, "value": value, "lease": self.lease}},
                        {"request_put": {"key": self.last, "value": value}},
                    ],
                    "failure": look,
                }).encode())
            finally:
                watch.close()
            if r.get("succeeded"):
                return

    def release(self) -> None:
        r = self._post(_TXN, json.dumps({
            "compare": [self._created(self.my, self.token)],
            "success": [{"request_put": {"key": self.last, "value": self._value(self.released)}},
                        {"request_delete_range": {"key": self.my}}],
            "failure": [],
        }).encode())
        assert r.get("succeeded"), r

    def close(self) -> None:
        self._post("/v3/lease/revoke", json.dumps({"ID": self.lease}).encode())
        self.conn.close()


def transaction_costs(endpoint: str, key: str, n: int, idle: float) -> dict[str, float]:
    """Median milliseconds of one write transaction (a put of a record-sized value)
    through etcd3gw's client and through a bare ``http.client`` connection, each kept
    alive: ``cold`` after ``idle`` seconds without a request, ``hot`` back to back. The
    two transports take turns."""
    import etcd3gw

    from fencelock import _etcdhttp

    host, _, port = endpoint.rpartition(":")
    session = _etcdhttp.Session(_etcdhttp.base_url(host, int(port)))  # as the store has it
    client = etcd3gw.client(host=host, port=int(port), timeout=2.0, session=session)
    conn = http.client.HTTPConnection(host, int(port))
    payload = {"compare": [], "failure": [], "success": [
        {"request_put": {"key": _b64(key), "value": _b64(record_bytes(key))}}]}
    body = json.dumps(payload).encode()
    url = client.get_url("/kv/txn")

    def gw() -> None:
        client.post(url, json=payload)

    def bare() -> None:
        conn.request("POST", _TXN, body, _HEADERS)
        conn.getresponse().read()

    times: dict[str, list[float]] = {}
    try:
        for fn in (gw, bare):
            fn()  # connect
        for kind, gap in (("cold", idle), ("hot", 0.0)):
            for _ in range(n):
                for name, fn in (("etcd3gw", gw), ("http.client", bare)):
                    if gap:
                        time.sleep(gap)
                    start = time.perf_counter_ns()
                    fn()
                    times.setdefault(f"{kind} {name}", []).append(
                        (time.perf_counter_ns() - start) / 1e6)
    finally:
        conn.close()
        client.session.close()
    return {k: statistics.median(v) for k, v in times.items()}
