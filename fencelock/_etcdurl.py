"""An etcd holder store's URL, parsed: ``etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=S&
root=DIR]``, or ``etcds://`` (HTTPS). Imported only where a URL is given: the class's
making costs a command that uses none about a millisecond of its start."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

DEFAULT_PREFIX = "fencelock"
DEFAULT_TTL = 10.0
LOCAL = ("", "local")


def _seconds(value: float) -> str:
    """``value`` written so that it reads back the same: short where that is exact."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True, slots=True)
class EtcdURL:
    """A parsed ``etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=S&root=DIR]``, or
    ``etcds://`` (HTTPS) with ``ca=``, ``cert=``, ``key=`` among its parameters."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str
    ttl: float
    root: str | None
    tls: bool = False
    """HTTPS: etcd's certificate checked against ``ca`` (else the system's CAs)."""
    ca: str | None = None
    cert: str | None = None
    """A client certificate (PEM) to show etcd, its key in ``key`` or in the same file."""
    key: str | None = None

    @property
    def scheme(self) -> str:
        return "etcds" if self.tls else "etcd"

    @property
    def display(self) -> str:
        """The endpoints as messages name them."""
        return f"{self.scheme}://{self._hosts}"

    @property
    def _hosts(self) -> str:
        return ",".join(self._host_ports)

    @property
    def _host_ports(self) -> list[str]:
        """Each endpoint as ``HOST:PORT`` (an IPv6 address in brackets)."""
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints]

    @property
    def text(self) -> str:
        """A URL naming the same store (endpoints, prefix, root) with the same settings
        (a TTL other than the default, TLS), for commands to print: a command run from
        advice holds as the deployment does."""
        ttl = None if self.ttl == DEFAULT_TTL else _seconds(self.ttl)
        return f"{self.display}/{quote(self.prefix, safe='/')}" + self._query(
            ("ttl", ttl), ("root", self.root), *self._tls_params)

    @property
    def connection_text(self) -> str:
        """A URL naming the same endpoints with the same TLS settings and TTL (for a
        process that keeps this store's lease alive)."""
        return f"{self.display}/_" + self._query(("ttl", _seconds(self.ttl)), *self._tls_params)

    @property
    def etcdctl(self) -> str:
        """The ``etcdctl`` command line that reaches the same endpoints, for advice."""
        from fencelock._errors import shell_word

        scheme = "https" if self.tls else "http"
        urls = ",".join(f"{scheme}://{host_port}" for host_port in self._host_ports)
        flags = [f"--{name}={shell_word(value)}" for name, value in (
            ("endpoints", urls), ("cacert", self.ca), ("cert", self.cert), ("key", self.key)
        ) if value is not None]
        return " ".join(["etcdctl", *flags])

    @property
    def _tls_params(self) -> tuple[tuple[str, str | None], ...]:
        return ("ca", self.ca), ("cert", self.cert), ("key", self.key)

    @staticmethod
    def _query(*params: tuple[str, str | None]) -> str:
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params if v is not None)
        return f"?{query}" if query else ""


def _host(url: str, part: str, host: str) -> str:
    """``host`` of ``part`` (HOST:PORT) as a connection takes it: a name, an IPv4 address,
    or an IPv6 address in brackets (brackets dropped). ValueError otherwise: without its
    brackets, ``fe80::1:2379`` could be a port after an address or a whole address."""
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if _ipv6(bare) if bracketed else not any(c in bare for c in ":[]"):
        return bare
    raise ValueError(
        f"backend {url!r}: {part!r} is not HOST:PORT (an IPv6 address goes in "
        f"brackets: etcd://[::1]:2379/PREFIX)"
    )


def _ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _refuse_user(scheme: str, rest: str, hosts: str) -> None:
    """ValueError for a URL whose endpoints carry a user (``USER[:PASSWORD]@``), which
    fencelock does not log in as; the URL is shown with the password masked (all of
    what comes before the ``@`` where a ``/`` in it cut the endpoints short)."""
    if "@" in hosts:
        at = hosts.rfind("@")  # (``hosts`` begins ``rest``)
        user, after = rest[:at], rest[at + 1:]
        shown = user.partition(":")[0] + (":***" if ":" in user else "")
    elif "@" in rest.partition("/")[2].partition("/")[0] and not all(
        p.rpartition(":")[2].isdigit() for p in hosts.split(",")
    ):  # a '/' in the password: the endpoints end before its '@'
        shown, after = "***", rest[rest.find("@") + 1:]
    else:
        return
    raise ValueError(
        f"backend '{scheme}://{shown}@{after}': it names a user (USER[:PASSWORD]@HOST:PORT), "
        f"which fencelock does not log in as: give HOST:PORT, and a client certificate "
        f"(etcds://...?cert=...&key=...) where etcd asks who connects"
    )


@functools.lru_cache(maxsize=64)
def parse(url: str) -> EtcdURL | None:
    """Parse a backend URL; None for the sidecar store (``local`` or empty).

    Raises ValueError naming what is wrong.
    """
    text = url.strip()
    if text in LOCAL:
        return None
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise ValueError(
            f"backend {url!r}: expected 'local', etcd://HOST:PORT[,HOST:PORT...]/PREFIX "
            f"or etcds://... (HTTPS)"
        )
    before = rest.partition("?")[0]
    _refuse_user(scheme, before, before.partition("/")[0])  # first: it masks a password
    if "#" in rest:  # (it was taken as part of the prefix, or of a parameter)
        raise ValueError(
            f"backend {url!r}: '#' would begin a fragment, which a backend URL has none of; "
            f"write %23 for a '#' in the prefix or a path")
    if re.search(r";(?:ttl|root|ca|cert|key)=", rest.partition("?")[2]):
        # ('?ttl=5;root=/srv': a bad ttl, it said; a ';' in a path is a path's)
        raise ValueError(
            f"backend {url!r}: parameters are separated by '&', not ';'")
    rest, _, query = rest.partition("?")
    hosts, _, prefix = rest.partition("/")
    endpoints = []
    for part in hosts.split(","):
        host, sep, port = part.rpartition(":")
        # ASCII digits only ('²' is a digit to str.isdigit, not to int), and a host
        # with no space or control character in it (requests would refuse the URL).
        if (not sep or not host or not (port.isascii() and port.isdigit())
                or not 0 < int(port) < 65536 or any(c.isspace() or ord(c) < 32 for c in host)):
            raise ValueError(f"backend {url!r}: {part!r} is not HOST:PORT")
        endpoints.append((_host(url, part, host), int(port)))
    if "&" in prefix or "=" in prefix:
        # Most likely a mistyped query ('/p&ttl=3'): it would be taken as the prefix,
        # and the TTL left at its default, without a word.
        raise ValueError(
            f"backend {url!r}: the prefix {prefix!r} has '&' or '='; parameters go after "
            f"'?' (etcd://HOST:PORT/PREFIX?ttl=S); to have them in a prefix, write %26 "
            f"or %3D"
        )
    try:
        decoded = unquote(prefix, errors="strict").strip("/")
    except UnicodeDecodeError:
        raise ValueError(
            f"backend {url!r}: the prefix {prefix!r} is not UTF-8 once its %XX escapes are "
            f"decoded; escape each byte of a UTF-8 character"
        ) from None
    if "\0" in decoded:
        # A key may hold one, but the lease keeper is given the prefix as an argument.
        raise ValueError(f"backend {url!r}: the prefix holds a NUL byte (%00); leave it out")
    if not decoded and prefix.strip("/"):
        raise ValueError(
            f"backend {url!r}: the prefix {prefix!r} is only slashes once decoded; name "
            f"one (or leave it out for the default, {DEFAULT_PREFIX!r})"
        )
    prefix = decoded or DEFAULT_PREFIX
    params = _query(url, query)
    tls = {name: params[name] for name in _TLS_PARAMS if name in params}
    if tls and scheme != "etcds":
        raise ValueError(
            f"backend {url!r}: {sorted(tls)[0]}= is for HTTPS: write etcds:// instead of "
            f"etcd://")
    for name, path in tls.items():
        if not os.path.isabs(path):
            raise ValueError(f"backend {url!r}: {name}= must be an absolute file path")
    if "key" in tls and "cert" not in tls:
        raise ValueError(f"backend {url!r}: key= goes with cert= (the client certificate)")
    ttl = DEFAULT_TTL
    if "ttl" in params:
        try:
            ttl = float(params["ttl"])
        except ValueError:
            ttl = -1.0
        if not 1 <= ttl <= 3600:
            raise ValueError(f"backend {url!r}: ttl must be a number of seconds, 1 to 3600")
    root = params.get("root")
    if root is not None and not os.path.isabs(root):
        raise ValueError(f"backend {url!r}: root must be an absolute directory")
    return EtcdURL(tuple(endpoints), prefix, ttl, root, scheme == "etcds",
                   tls.get("ca"), tls.get("cert"), tls.get("key"))


_TLS_PARAMS = ("ca", "cert", "key")


def _query(url: str, query: str) -> dict[str, str]:
    """The URL's parameters, each %XX-decoded as UTF-8; a ``+`` is a ``+`` (a path's,
    as in ``root=/srv/c++``), not a space as in an HTML form's query."""
    params: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue  # '?ttl=5&', '&&': nothing there
        name, _, value = item.partition("=")
        if name not in ("ttl", "root", *_TLS_PARAMS):
            raise ValueError(f"backend {url!r}: unknown parameter {name!r}")
        if name in params:
            raise ValueError(f"backend {url!r}: {name}= is given twice")
        try:
            params[name] = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(
                f"backend {url!r}: {name}= is not UTF-8 once its %XX escapes are decoded"
            ) from None
        if "\0" in params[name]:
            raise ValueError(f"backend {url!r}: {name}= holds a NUL byte (%00), which no "
                             f"{'number' if name == 'ttl' else 'path'} holds; leave it out")
    return params
