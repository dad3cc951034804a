"""Where an http task may connect, and how much it may read (the http kind's policy).

Checked twice: on the URL as written (the API refuses what it can already tell is
forbidden: a metadata host name, an address literal in a denied range, a denied
port), and on the addresses DNS gives for every connection, redirects included
(EgressResolver, the worker's aiohttp resolver), so a name that resolves or
re-resolves to a denied address is refused too.

* Always refused unless named in PGBEAT_HTTP_ALLOW: link-local (169.254.0.0/16,
  fe80::/10, where clouds serve instance credentials), the other cloud metadata
  addresses and names, the unspecified address (`0`, which Linux connects to
  localhost), multicast and reserved ranges.
* Refused with PGBEAT_HTTP_DENY_PRIVATE=1: private ranges (RFC 1918, CGNAT, unique
  local IPv6) and loopback. Allowed by default: a laptop's or a sidecar's endpoint
  is usually on loopback or a private network, and the tests serve on 127.0.0.1.
* Ports in PGBEAT_HTTP_DENY_PORTS (default: the Fetch standard's bad ports plus
  PostgreSQL's, Redis's and memcached's) are refused on any address.

Address literals are normalised first: `0`, `2130706433`, `0x7f.1`, `0177.0.0.1`
and IPv4 embedded in IPv6 (`::ffff:169.254.169.254`, NAT64, 6to4) are checked as
the IPv4 address they reach.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
TRUE_WORDS = ("1", "true", "yes", "on")

ALWAYS_DENIED: dict[str, tuple[str, ...]] = {
    "a link-local address (where clouds serve instance metadata)": ("169.254.0.0/16", "fe80::/10"),
    "a cloud metadata address": (
        "fd00:ec2::254/128",  # AWS (IPv6)
        "100.100.100.200/32",  # Alibaba Cloud
        "168.63.129.16/32",  # Azure wire server
        "192.0.0.192/32",  # Oracle Cloud
    ),
    "the unspecified address (it reaches this host)": ("0.0.0.0/8", "::/128"),
    "a multicast, broadcast or reserved address": ("224.0.0.0/3", "ff00::/8"),
}
PRIVATE: dict[str, tuple[str, ...]] = {
    "a loopback address": ("127.0.0.0/8", "::1/128"),
    "a private address": (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "198.18.0.0/15",
        "fc00::/7",
    ),
}
METADATA_HOSTS = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.com",
        "metadata.tencentyun.com",
    }
)
# The Fetch standard's "bad ports" (services a browser never lets a page reach),
# plus databases and caches commonly found next to a scheduler.
DEFAULT_DENIED_PORTS = frozenset(
    {0, 1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102,
     103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512,
     513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995,
     1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669,
     6679, 6697, 10080, 5432, 6379, 11211}
)  # fmt: skip


def _networks(groups: dict[str, tuple[str, ...]]) -> list[tuple[Network, str]]:
    return [(ipaddress.ip_network(net), why) for why, nets in groups.items() for net in nets]


_ALWAYS_DENIED = _networks(ALWAYS_DENIED)
_PRIVATE = _networks(PRIVATE)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressDenied(aiohttp.ClientError):
    """The egress policy refuses this destination."""


def reached_address(address: Address) -> Address:
    """The address a connection really reaches: IPv4 embedded in IPv6 as IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_literal(host: str) -> Address | None:
    """The address a host written as an address literal reaches, in any of the forms
    the C library accepts ('0', '2130706433', '0x7f.1', '0177.0.0.1'); None for a name."""
    host = host.strip("[]").rstrip(".")
    try:
        return reached_address(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host) and not re.fullmatch(r"[a-fA-F.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class HttpPolicy:
    """The http kind's limits: bytes read and where it may connect."""

    max_bytes: int = DEFAULT_MAX_BYTES
    deny_private: bool = False
    allow: tuple[Network, ...] = ()
    denied_ports: frozenset[int] = field(default=DEFAULT_DENIED_PORTS)
    max_redirects: int = 10

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> HttpPolicy:
        def number(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            try:
                return int(raw) if raw else default
            except ValueError:
                raise SystemExit(f"{name}: expected a whole number, got {raw!r}") from None

        try:
            allow = tuple(
                ipaddress.ip_network(part.strip(), strict=False)
                for part in env.get("PGBEAT_HTTP_ALLOW", "").split(",")
                if part.strip()
            )
        except ValueError as exc:
            raise SystemExit(f"PGBEAT_HTTP_ALLOW: {exc}") from None
        ports_raw = env.get("PGBEAT_HTTP_DENY_PORTS")
        try:
            ports = (
                DEFAULT_DENIED_PORTS
                if ports_raw is None
                else frozenset(int(p) for p in ports_raw.split(",") if p.strip())
            )
        except ValueError:
            raise SystemExit(f"PGBEAT_HTTP_DENY_PORTS: expected port numbers, got {ports_raw!r}") from None
        return cls(
            max_bytes=number("PGBEAT_HTTP_MAX_BYTES", DEFAULT_MAX_BYTES),
            deny_private=env.get("PGBEAT_HTTP_DENY_PRIVATE", "").strip().lower() in TRUE_WORDS,
            allow=allow,
            denied_ports=ports,
        )

    def refusal(self, address: Address) -> str | None:
        """Why the policy refuses connecting to address, or None."""
        address = reached_address(address)
        if any(address in net for net in self.allow if net.version == address.version):
            return None
        for net, why in _ALWAYS_DENIED:
            if net.version == address.version and address in net:
                return f"{address} is {why}; list it in PGBEAT_HTTP_ALLOW to allow it"
        if self.deny_private:
            for net, why in _PRIVATE:
                if net.version == address.version and address in net:
                    return f"{address} is {why}, refused under PGBEAT_HTTP_DENY_PRIVATE"
        return None

    def url_refusal(self, url: str) -> str | None:
        """Why the URL as written is refused (scheme, host, port or address literal), or None.
        A host name's addresses are checked when it is resolved."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            return f"is not a valid URL: {exc}"
        if parts.scheme.lower() not in ("http", "https"):
            return "must be an http:// or https:// URL"
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            return "has no host"
        if port is None:
            port = 443 if parts.scheme.lower() == "https" else 80
        if port in self.denied_ports:
            return f"port {port} is refused by the egress policy (PGBEAT_HTTP_DENY_PORTS)"
        literal = address_literal(host)
        if literal is not None:
            why = self.refusal(literal)
            return None if why is None else f"host {host}: {why}"
        if host in METADATA_HOSTS and not self.allow:
            return f"host {host} is a cloud metadata service; list its address in PGBEAT_HTTP_ALLOW"
        return None


class EgressResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the policy allows: every
    connection (first request or redirect) goes to a checked address."""

    def __init__(self, policy: HttpPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        name = host.rstrip(".").lower()
        if name in METADATA_HOSTS and not self.policy.allow:
            raise EgressDenied(f"host {name} is a cloud metadata service")
        results: list[ResolveResult] = await self.inner.resolve(host, port, family)
        allowed, refusals = [], []
        for result in results:
            why = self.policy.refusal(ipaddress.ip_address(result["host"].split("%")[0]))
            if why is None:
                allowed.append(result)
            else:
                refusals.append(why)
        if not allowed:
            raise EgressDenied(f"host {name}: {refusals[0] if refusals else 'no address'}")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def redact(text: str) -> str:
    """Text with the credentials of every URL in it replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


def redact_url(url: Any) -> Any:
    """A URL without its user:password (anything else is returned as it is)."""
    if not isinstance(url, str) or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
