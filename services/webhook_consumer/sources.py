"""Who is calling, and how often: the client address behind trusted proxies, the source
allow-list, and the key a source is rate-limited by (the bucket itself: services/common/ratelimit.py).
Pure code: no I/O, time comes from a clock.

A source is one IPv4 address, or one IPv6 /64: a single host or customer is handed a whole /64
(RFC 6177, RFC 4291 §2.5.1) and can pick any address in it, so per-address buckets would let it
multiply its rate by 2^64.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

ANY_SOURCE: tuple[Network, ...] = (ip_network("0.0.0.0/0"), ip_network("::/0"))
IPV6_SOURCE_PREFIX = 64
# The widest block believed to hold only one operator's proxies. IPv4: 10.0.0.0/8, the largest
# private block (a CDN's published IPv4 ranges are /12 or narrower). IPv6: /28, the widest range a
# large CDN publishes (CloudFront 2600:9000::/28; Cloudflare's widest is a /29), while RIRs hand an
# ISP a /32 or /29: anything wider spans many organisations, and ::/0 or 2000::/3 the whole Internet.
PROXY_PREFIX_MIN = {4: 8, 6: 28}


def parse_networks(raw: str) -> tuple[Network, ...]:
    """Comma-separated IP addresses and CIDR blocks; a bare address is a /32 (or /128).

    Host bits set in a block (196.201.212.69/24) are refused rather than silently widened.
    """
    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ip_network(item, strict=True))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR block (host bits must be zero)") from None
    return tuple(networks)


@lru_cache(maxsize=4096)  # the same few peers and proxies, request after request
def parse_address(text: str | None) -> Address | None:
    """An IP address, IPv4-mapped IPv6 (::ffff:a.b.c.d) folded to IPv4; None when not an address."""
    if not text:
        return None
    try:
        address = ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_trusted_proxies(raw: str) -> tuple[Network, ...]:
    """parse_networks, refusing blocks too wide to be one operator's proxies (PROXY_PREFIX_MIN).

    Trusting a proxy means believing the client address it writes; trusting 0.0.0.0/0 would let
    every client name itself, past the allow-list and the rate limit.
    """
    networks = parse_networks(raw)
    for network in networks:
        narrowest = PROXY_PREFIX_MIN[network.version]
        if network.prefixlen < narrowest:
            raise ValueError(f"{network} is too wide to be trusted as a proxy "
                             f"(IPv{network.version} blocks must be /{narrowest} or narrower)")
    return tuple(networks)


@lru_cache(maxsize=4096)
def rate_limit_key(client: str) -> str:
    """The bucket a client address spends from: itself for IPv4, its /64 for IPv6."""
    address = parse_address(client)
    if not isinstance(address, IPv6Address):
        return client
    return str(IPv6Network((int(address) >> (128 - IPV6_SOURCE_PREFIX) << (128 - IPV6_SOURCE_PREFIX),
                            IPV6_SOURCE_PREFIX)))


def _within(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


@dataclass(frozen=True)
class SourcePolicy:
    """The allow-list and the proxies whose X-Forwarded-For we believe.

    An empty allow-list allows nobody; ANY_SOURCE allows every address. Settings decide which one
    an unset WEBHOOK_ALLOWED_SOURCES means, from the environment.
    """

    allowed: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The address to judge the request by.

        X-Forwarded-For is read only when the TCP peer is a trusted proxy. Each proxy appends the
        address it saw, so the hops are walked from the right past trusted proxies; the first
        untrusted hop is the client. Anything to its left was written by the client and is ignored.
        A hop that is not an address ends the walk: the chain cannot be believed beyond it, so the
        peer itself counts as the client.
        """
        peer_address = parse_address(peer)
        if peer_address is None:
            return peer or "unknown"
        if not forwarded_for or not _within(peer_address, self.trusted_proxies):
            return str(peer_address)
        nearest = peer_address
        for hop in reversed(forwarded_for.split(",")):
            hop_address = parse_address(hop)
            if hop_address is None:
                return str(peer_address)
            if not _within(hop_address, self.trusted_proxies):
                return str(hop_address)
            nearest = hop_address
        return str(nearest)  # every hop is a trusted proxy: the left-most is nearest the client

    def allows(self, client: str) -> bool:
        address = parse_address(client)
        return address is not None and _within(address, self.allowed)
