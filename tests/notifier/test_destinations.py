"""Where a webhook may go (services/notifier/destinations.py, docs/webhooks.md §2): the URL rules,
and the address rules that keep deliveries out of the facilitator's own networks (SSRF)."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from services.notifier.destinations import DestinationPolicy, DestinationRefused, embedded_ipv4, parse_networks

PUBLIC_ONLY = DestinationPolicy()
LOOPBACK_ALLOWED = DestinationPolicy(parse_networks("127.0.0.0/8,::1/128"))


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd00:ec2::254", "fc00::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::a00:1", "2002:7f00:1::",
    "2002:a9fe:a9fe::", "fec0::1",
])
def test_inner_and_special_addresses_are_refused(address):
    assert not PUBLIC_ONLY.address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "197.248.0.1", "2606:4700::1111", "64:ff9b::808:808",
                                     "2002:808:808::"])
def test_public_addresses_are_allowed(address):
    assert PUBLIC_ONLY.address_allowed(ipaddress.ip_address(address))


def test_an_allowed_network_opens_that_network_only():
    assert LOOPBACK_ALLOWED.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert LOOPBACK_ALLOWED.address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"))  # the same address
    assert not LOOPBACK_ALLOWED.address_allowed(ipaddress.ip_address("10.0.0.1"))
    assert not LOOPBACK_ALLOWED.address_allowed(ipaddress.ip_address("169.254.169.254"))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv6_form_of_an_ipv4_address_is_judged_as_that_address(value):
    inner = ipaddress.IPv4Address(value)
    for form in (f"::ffff:{inner}", f"64:ff9b::{inner}", f"2002:{value >> 16:x}:{value & 0xFFFF:x}::"):
        address = ipaddress.IPv6Address(form)
        assert embedded_ipv4(address) == inner
        assert PUBLIC_ONLY.address_allowed(address) == PUBLIC_ONLY.address_allowed(inner), form


@pytest.mark.parametrize("url, why", [
    ("http://example.com/hook", "https"),
    ("ftp://example.com/hook", "absolute"),
    ("/hook", "absolute"),
    ("https://user:pw@example.com/hook", "user name"),
    ("https://example.com/hook#x", "fragment"),
    ("https://example.com:0/hook", "port"),
    ("https://example.com:99999/hook", "malformed"),
    ("https://exa mple.com/hook", "spaces"),
    ("https://exämple.com/hook", "ASCII"),
    ("https://example.com/\x00", "control"),
    ("https://10.0.0.1/hook", "not a public address"),
    ("https://[::ffff:169.254.169.254]/hook", "not a public address"),
    ("https://" + "a" * 2050 + ".com/", "1 to 2048"),
    ("", "1 to 2048"),
])
def test_bad_urls_are_refused_with_the_reason(url, why):
    with pytest.raises(DestinationRefused, match=why):
        PUBLIC_ONLY.check_url(url)


def test_plain_http_only_to_loopback_and_loopback_only_when_allowed():
    assert LOOPBACK_ALLOWED.check_url("http://127.0.0.1:8099/hook") == "127.0.0.1"
    assert LOOPBACK_ALLOWED.check_url("http://localhost:8099/hook") == "localhost"
    with pytest.raises(DestinationRefused, match="not a public address"):
        PUBLIC_ONLY.check_url("http://127.0.0.1:8099/hook")
    with pytest.raises(DestinationRefused, match="https"):
        LOOPBACK_ALLOWED.check_url("http://10.0.0.1/hook")


async def test_a_name_is_checked_by_every_address_it_resolves_to():
    with pytest.raises(DestinationRefused, match="localhost resolves to"):
        await PUBLIC_ONLY.check("https://localhost/hook")  # resolves to loopback
    await LOOPBACK_ALLOWED.check("https://localhost/hook")
    with pytest.raises(DestinationRefused, match="does not resolve"):
        await PUBLIC_ONLY.check("https://no-such-host.invalid/hook")  # .invalid never resolves (RFC 6761)


def test_connection_time_filtering_keeps_only_allowed_addresses():
    addresses = [ipaddress.ip_address(a) for a in ("10.0.0.1", "8.8.8.8")]
    assert PUBLIC_ONLY.allowed_addresses("mixed.example", addresses) == [ipaddress.ip_address("8.8.8.8")]
    with pytest.raises(DestinationRefused):
        PUBLIC_ONLY.allowed_addresses("inside.example", addresses[:1])
