"""Where a webhook may be sent: the URL rules and the address rules that stop SSRF.

An endpoint URL comes from an operator, but its host's DNS answers come from whoever controls that
name, and may change at any time (DNS rebinding). So the rules apply twice: when an endpoint is
created (its name must resolve, and only to allowed addresses) and on every connection the
notifier opens (services/notifier/sender.py resolves through `DestinationPolicy`), so that a name
that later resolves to 127.0.0.1, 10.0.0.5 or the cloud metadata address 169.254.169.254 reaches
nothing. Redirects are never followed, for the same reason.

Allowed: https to a host whose every address is globally routable. Plain http only to loopback.
Private, loopback, link-local (the metadata address included), shared (100.64/10), reserved,
multicast and unspecified addresses are refused unless an operator lists their network in
WEBHOOK_ALLOWED_NETWORKS (a test receiver on 127.0.0.1, a merchant's server on a private link).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
URL_MAX = 2048


class DestinationRefused(ValueError):
    """The URL or the address it resolves to may not receive webhooks; the message says why."""


def parse_networks(raw: str) -> tuple[IPNetwork, ...]:
    """WEBHOOK_ALLOWED_NETWORKS: comma-separated CIDRs (`127.0.0.0/8,::1/128`); empty for none."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class DestinationPolicy:
    allowed_networks: tuple[IPNetwork, ...] = ()

    def address_allowed(self, address: IPAddress) -> bool:
        if any(address in network for network in self.allowed_networks):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            if address.is_site_local:  # fec0::/10: deprecated, yet routed inside some networks
                return False
            inner = embedded_ipv4(address)
            if inner is not None:  # judged by the IPv4 address it reaches
                return self.address_allowed(inner)
        return address.is_global and not address.is_multicast

    def check_url(self, url: str) -> str:
        """The URL's host, or DestinationRefused; DNS is not consulted here."""
        if not isinstance(url, str) or not url or len(url) > URL_MAX:
            raise DestinationRefused(f"the URL must be text of 1 to {URL_MAX} characters")
        if not url.isascii() or any(c.isspace() or ord(c) < 0x21 for c in url):
            raise DestinationRefused("the URL must be ASCII without spaces or control characters "
                                     "(write an international host name in its xn-- form)")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise DestinationRefused("the URL is malformed (its host or port cannot be read)") from None
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme not in ("https", "http") or not host:
            raise DestinationRefused("the URL must be absolute, https://host/path")
        if parts.username is not None or parts.password is not None:
            raise DestinationRefused("the URL must not carry a user name or password: the signature authenticates us")
        if parts.fragment:
            raise DestinationRefused("the URL must not have a #fragment (it is never sent)")
        if port == 0:
            raise DestinationRefused("the URL's port must be 1 to 65535")
        if parts.scheme == "http" and not _is_loopback_name(host):
            raise DestinationRefused("the URL must use https (plain http only to a loopback address)")
        literal = _literal(host)
        if literal is not None and not self.address_allowed(literal):
            raise DestinationRefused(_refusal(host, literal))
        return host

    async def check(self, url: str) -> None:
        """check_url, then every address the host resolves to must be allowed (at endpoint creation)."""
        host = self.check_url(url)
        if _literal(host) is not None:
            return
        for address in await resolve(host):
            if not self.address_allowed(address):
                raise DestinationRefused(_refusal(host, address))

    def allowed_addresses(self, host: str, addresses: list[IPAddress]) -> list[IPAddress]:
        """At connection time: the addresses a connection may use; DestinationRefused if none."""
        allowed = [a for a in addresses if self.address_allowed(a)]
        if not allowed:
            raise DestinationRefused(_refusal(host, addresses[0]) if addresses else f"{host} does not resolve")
        return allowed


_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, where it embeds one: mapped (::ffff:a.b.c.d),
    IPv4-compatible (::a.b.c.d, deprecated), 6to4 (2002::/16), Teredo (2001::/32) and NAT64
    (64:ff9b::/96, RFC 6052; 64:ff9b:1::/48, RFC 8215). Python calls some of these global, yet
    behind a NAT64 gateway or a 6to4 relay they reach the IPv4 address inside (10.0.0.1...)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address (the server's is public by design)
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1, which are themselves
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


async def resolve(host: str) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DestinationRefused(f"{host} does not resolve ({exc.__class__.__name__})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not addresses:
        raise DestinationRefused(f"{host} does not resolve")
    return addresses


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback_name(host: str) -> bool:
    literal = _literal(host)
    return literal.is_loopback if literal is not None else host.lower() == "localhost"


def _refusal(host: str, address: IPAddress) -> str:
    return (f"{host} resolves to {address}, which is not a public address (private, loopback, link-local, "
            "metadata or reserved); an operator may allow its network with WEBHOOK_ALLOWED_NETWORKS")
