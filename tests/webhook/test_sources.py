"""sources.py: allow-list, client address behind trusted proxies, per-source token bucket. Pure, no I/O."""
from __future__ import annotations

from ipaddress import ip_network

import pytest

from services.common.ratelimit import RateLimiter, retry_after_header
from services.webhook_consumer.settings import SAFARICOM_CALLBACK_SOURCES
from services.webhook_consumer.sources import (
    ANY_SOURCE,
    SourcePolicy,
    parse_address,
    parse_networks,
    parse_trusted_proxies,
    rate_limit_key,
)
from tests.webhook.conftest import FrozenClock

PROXY = "10.0.0.5"
PROXIES = parse_networks("10.0.0.0/24, 2001:db8::/32")


class TestParseNetworks:
    def test_reads_addresses_and_blocks_and_skips_blanks(self):
        assert parse_networks(" 196.201.212.69, 10.0.0.0/8,,2001:db8::/32 ") == (
            ip_network("196.201.212.69/32"), ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))

    def test_empty_is_no_networks(self):
        assert parse_networks("") == ()

    def test_the_safaricom_list_parses_to_twelve_addresses(self):
        networks = parse_networks(SAFARICOM_CALLBACK_SOURCES)
        assert len(networks) == 12 and all(n.num_addresses == 1 for n in networks)
        assert ip_network("196.201.212.69/32") in networks

    @pytest.mark.parametrize("raw", ["not-an-ip", "196.201.212.69/24", "10.0.0.0/33", "1.2.3.4:80"])
    def test_refuses_what_is_not_an_address_or_a_clean_block(self, raw):
        with pytest.raises(ValueError, match="not an IP address or CIDR block"):
            parse_networks(f"10.0.0.1,{raw}")


class TestParseAddress:
    def test_folds_ipv4_mapped_ipv6_to_ipv4(self):
        assert str(parse_address("::ffff:196.201.212.69")) == "196.201.212.69"

    @pytest.mark.parametrize("text", [None, "", "unknown", "1.2.3.4.5", "_hidden"])
    def test_non_addresses_are_none(self, text):
        assert parse_address(text) is None


class TestClientAddress:
    def test_without_trusted_proxies_forwarded_for_is_ignored(self):
        assert SourcePolicy().client_address("203.0.113.7", "196.201.212.69") == "203.0.113.7"

    def test_forwarded_for_from_an_untrusted_peer_is_ignored(self):
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address("203.0.113.7", "196.201.212.69") == "203.0.113.7"

    def test_a_trusted_proxy_names_the_client(self):
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address(PROXY, "196.201.212.69") == "196.201.212.69"

    def test_the_right_most_untrusted_hop_wins_over_what_the_client_wrote(self):
        # The client sent "X-Forwarded-For: 196.201.212.69"; the proxy appended the real address.
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address(PROXY, "196.201.212.69, 203.0.113.9") == "203.0.113.9"

    def test_trusted_hops_are_skipped_from_the_right(self):
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address(PROXY, "6.6.6.6, 196.201.212.69, 10.0.0.7,10.0.0.8") == "196.201.212.69"

    def test_a_chain_of_only_trusted_proxies_gives_the_left_most(self):
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address(PROXY, "10.0.0.9, 10.0.0.7") == "10.0.0.9"

    def test_a_garbage_hop_makes_the_peer_the_client(self):
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address(PROXY, "196.201.212.69, evil") == PROXY
        assert policy.client_address(PROXY, "196.201.212.69,, 10.0.0.7") == PROXY

    def test_a_trusted_proxy_without_forwarded_for_is_the_client(self):
        assert SourcePolicy(trusted_proxies=PROXIES).client_address(PROXY, None) == PROXY

    def test_ipv6_proxies_and_mapped_peers(self):
        policy = SourcePolicy(trusted_proxies=PROXIES)
        assert policy.client_address("2001:db8::1", "2001:db9::5") == "2001:db9::5"
        assert policy.client_address("::ffff:10.0.0.5", "196.201.212.69") == "196.201.212.69"

    def test_a_peer_that_is_not_an_address_is_kept_as_is(self):
        assert SourcePolicy(trusted_proxies=PROXIES).client_address(None, "196.201.212.69") == "unknown"


class TestTrustedProxies:
    @pytest.mark.parametrize("raw", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "104.16.0.0/13", "10.0.0.5",
                                     "2600:9000::/28", "2a06:98c0::/29", "2400:cb00::/32", "fd12:3456:789a::/48",
                                     "::1"])
    def test_one_operators_blocks_are_accepted(self, raw):
        assert parse_trusted_proxies(raw) == parse_networks(raw)

    @pytest.mark.parametrize("raw", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/7", "2000::/3",
                                     "2600::/12", "fc00::/7", "2600:9000::/27"])
    def test_blocks_wider_than_one_operator_are_refused(self, raw):
        with pytest.raises(ValueError, match="too wide to be trusted as a proxy"):
            parse_trusted_proxies(f"10.0.0.5,{raw}")


class TestRateLimitKey:
    def test_an_ipv4_address_is_its_own_source(self):
        assert rate_limit_key("203.0.113.7") == "203.0.113.7"
        assert rate_limit_key("203.0.113.8") != rate_limit_key("203.0.113.7")

    def test_an_ipv6_address_counts_as_its_64(self):
        assert rate_limit_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
        assert rate_limit_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
        assert rate_limit_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"

    def test_what_is_not_an_address_is_its_own_source(self):
        assert rate_limit_key("unknown") == "unknown"


class TestAllows:
    def test_an_empty_allow_list_allows_nobody(self):
        assert not SourcePolicy().allows("203.0.113.7")
        assert not SourcePolicy().allows("2001:db8::1")

    def test_any_source_allows_every_address_of_both_families(self):
        policy = SourcePolicy(allowed=ANY_SOURCE)
        for client in ("203.0.113.7", "2001:db8::1", "::ffff:c4c9:d445", "127.0.0.1", "::1"):
            assert policy.allows(client)
        assert not policy.allows("unknown")

    def test_only_listed_addresses_and_blocks_are_allowed(self):
        policy = SourcePolicy(allowed=parse_networks(f"{SAFARICOM_CALLBACK_SOURCES},192.0.2.0/28"))
        assert policy.allows("196.201.212.69")
        assert policy.allows("192.0.2.15")
        assert not policy.allows("192.0.2.16")
        assert not policy.allows("196.201.212.70")
        assert policy.allows("::ffff:c4c9:d445")  # 196.201.212.69 as an IPv4-mapped IPv6 peer
        assert not policy.allows("unknown")


class TestRateLimiter:
    def test_a_burst_is_allowed_then_refused_with_the_wait(self):
        limiter = RateLimiter(2.0, 3, clock=FrozenClock())
        assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
        assert limiter.take("a") == pytest.approx(0.5)

    def test_tokens_come_back_at_the_rate_up_to_the_burst(self):
        clock = FrozenClock()
        limiter = RateLimiter(2.0, 3, clock=clock)
        for _ in range(3):
            limiter.take("a")
        clock.now += 0.5
        assert limiter.take("a") == 0.0
        assert limiter.take("a") > 0
        clock.now += 3600  # a long pause refills to the burst, not beyond
        assert [limiter.take("a") for _ in range(4)][-1] > 0

    def test_refused_requests_spend_nothing(self):
        clock = FrozenClock()
        limiter = RateLimiter(1.0, 1, clock=clock)
        limiter.take("a")
        for _ in range(10):
            assert limiter.take("a") > 0
        clock.now += 1.0
        assert limiter.take("a") == 0.0

    def test_sources_have_separate_buckets(self):
        limiter = RateLimiter(1.0, 1, clock=FrozenClock())
        assert limiter.take("a") == 0.0
        assert limiter.take("a") > 0
        assert limiter.take("b") == 0.0

    def test_memory_is_bounded_forgetting_the_least_recently_seen(self):
        limiter = RateLimiter(1.0, 1, clock=FrozenClock(), sources_max=3)
        for source in ("a", "b", "c"):
            limiter.take(source)
        limiter.take("a")  # a is now the most recently seen
        limiter.take("d")  # evicts b
        assert len(limiter) == 3
        assert limiter.take("b") == 0.0  # forgotten: a full bucket again
        assert limiter.take("a") > 0  # remembered: still empty

    def test_bad_parameters_are_refused(self):
        with pytest.raises(ValueError):
            RateLimiter(0, 1)
        with pytest.raises(ValueError):
            RateLimiter(1, 0)

    @pytest.mark.parametrize("wait_s, header", [(0.01, "1"), (1.0, "1"), (1.2, "2"), (30.0, "30")])
    def test_retry_after_is_whole_seconds_never_zero(self, wait_s, header):
        assert retry_after_header(wait_s) == header
