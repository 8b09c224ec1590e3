"""The HTTP sessions the etcd store gives etcd3gw's clients and its watches (requests
sessions), and taking their connections down.

Imported only when an etcd URL is used: ``requests`` comes with the ``etcd`` extra.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import requests
from requests.structures import CaseInsensitiveDict


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class Session(requests.Session):
    """A requests session for one etcd endpoint, with the proxy settings read from the
    environment once, when it is made.

    With ``trust_env`` on, requests looks up the proxy variables and ~/.netrc at every
    request, about 0.3 ms of a transaction's 1-2 ms on loopback. The proxy in force stays
    the one the environment names (a netrc login does not apply: etcd's gateway takes
    none).

    A plain JSON POST (all the store and etcd3gw's client send, but for a watch's stream)
    goes as a prepared request straight to the connection adapter: `requests.Session`
    would merge this session's cookies, hooks, auth and settings into each request and
    run its redirect and cookie handling on each answer, none of which apply to etcd's
    gateway. That is 0.4 ms of a transaction's 2-3 ms after an idle pause (measured
    against a bare ``http.client`` connection, which takes about 0.6 ms less still).
    What the adapter does is unchanged: the connection pool, the proxy, the timeouts,
    and requests' exceptions, which etcd3gw maps to its own.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.proxies.update(requests.utils.get_environ_proxies(url))
        self.trust_env = False
        self._json_headers = {**self.headers, "Content-Type": "application/json"}

    def post(self, url: str | bytes, data: Any = None, json: Any = None,
             **kwargs: Any) -> requests.Response:
        if data is not None or json is None or kwargs.keys() - {"timeout"}:
            return super().post(url, data=data, json=json, **kwargs)
        body = _dumps(json)
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = url if isinstance(url, str) else url.decode()
        request.headers = CaseInsensitiveDict(self._json_headers)
        request.headers["Content-Length"] = str(len(body))
        request.body = body
        response = self.get_adapter(request.url).send(
            request, timeout=kwargs.get("timeout"), proxies=self.proxies, verify=self.verify,
            cert=self.cert)
        response.content  # noqa: B018 (read it all: the connection goes back to the pool)
        return response


def _dumps(payload: Any) -> bytes:
    """The body requests would send for ``json=payload``."""
    return json.dumps(payload, allow_nan=False).encode()


def close_client(client: Any) -> None:
    """Close an etcd3gw client's connections now (urllib3 2 closes a pool's connections
    only once the garbage collector finalizes the pool, not on the session's close)."""
    with contextlib.suppress(Exception):
        for adapter in client.session.adapters.values():
            pools = adapter.poolmanager.pools
            for key in pools.keys():  # noqa: SIM118 (the container refuses iteration)
                pools[key].close()
        client.session.close()


def close_inherited(client: Any) -> None:
    """In a forked child: close this process's copies of a client's idle connections
    (the parent's stay open), touching no lock a parent's thread may have held."""
    with contextlib.suppress(Exception):
        for adapter in client.session.adapters.values():
            # Direct connections, and those through a proxy (a pool manager per proxy).
            for manager in [adapter.poolmanager, *adapter.proxy_manager.values()]:
                for pool in list(manager.pools._container.values()):
                    for conn in list(getattr(pool.pool, "queue", None) or ()):
                        sock = getattr(conn, "sock", None)
                        if sock is not None:
                            sock.close()
