"""One webhook attempt: sign the body, POST it, read a bounded answer, and say what happened.

`Sender.send` never raises for a network or HTTP problem: whatever the receiver does (answers,
refuses, stalls, redirects, floods) comes back as an `AttemptResult`, and services/notifier/schedule.py
decides what follows (docs/webhooks.md §3).

Safety (docs/webhooks.md §2, §3):
- every connection resolves its host through `PolicyResolver`, which drops the addresses
  `DestinationPolicy` refuses, so a name that turns to 127.0.0.1 or 169.254.169.254 after the
  endpoint was checked reaches nothing (DNS rebinding); aiohttp never asks a resolver about an
  IP-literal host, so `send` checks literals itself;
- redirects are never followed, no proxy from the environment, no cookies, no decompression;
- connect and read timeouts and a bound on the whole attempt; the request body is ours and at most
  MAX_BODY_BYTES; the answer is read up to `max_response_bytes` and the connection dropped beyond.

Nothing returned or logged carries a secret or the request body; the receiver's answer appears only
as its first ERROR_SNIPPET_CHARS characters, through untrusted().
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks import Webhook
from yarl import URL

from services.common.text import untrusted
from services.notifier.destinations import DestinationPolicy, DestinationRefused
from services.notifier.schedule import AttemptResult as AttemptResult  # defined beside the pure schedule

USER_AGENT = "mpesa-pipeline-webhooks/1"
MAX_BODY_BYTES = 64 * 1024  # events.webhook_body is about 1 KiB; this guards against a caller's mistake
RETRY_AFTER_MAX_S = 24 * 3600.0  # a receiver may ask us to wait, not to give up: the window still ends it
RETRY_AFTER_STATUSES = frozenset((429, 503))  # where RFC 9110 §10.2.3 and RFC 6585 §4 give Retry-After a meaning
ERROR_SNIPPET_CHARS = 200
# Below Node.js's default server keep-alive of 5 s, the shortest common one: a pooled connection the
# receiver has already closed fails the POST on it (aiohttp retries only idempotent methods).
KEEPALIVE_S = 4.0
DNS_CACHE_S = 10  # answers were filtered before caching: a cached address was allowed when resolved
# getaddrinfo cannot be cancelled: a lookup whose DNS never answers holds its thread for as long as
# the system's resolver waits, whatever the attempt's timeout. aiohttp looks each host up once at a
# time, so this many receivers' DNS may hang at once before another endpoint's lookup waits for a thread
# (the event loop's default executor has min(32, CPUs + 4), and the database driver needs it too).
LOOKUP_THREADS = 256
TARGETS_CACHED_MAX = 4096  # checked URLs kept (per endpoint URL); cleared when full
SIGNERS_CACHED_MAX = 4096  # Webhook objects kept per secret (two per endpoint during a rotation)
# Before CPython 3.12.8 asyncio leaks the TLS transport of a receiver that never completes the TLS
# shutdown (https://github.com/python/cpython/pull/118960); aiohttp then aborts it after 2 s itself.
TLS_CLEANUP_NEEDED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)

# What failed, by exception type, most specific first (Sender._describe).
FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorDNSError, "the host name does not resolve"),
    (aiohttp.ClientConnectorCertificateError, "the receiver's TLS certificate was not accepted"),
    (aiohttp.ClientSSLError, "the TLS handshake failed"),
    (aiohttp.ServerDisconnectedError, "the receiver closed the connection without an answer"),
    (aiohttp.ClientPayloadError, "the answer's body was cut off or malformed"),
)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class PolicyResolver(AbstractResolver):
    """Resolves through `inner`, then keeps only the addresses the policy allows, on every lookup
    aiohttp makes (DestinationRefused when none is left)."""

    def __init__(self, policy: DestinationPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if not found:  # as a failed lookup, which aiohttp reports and the schedule retries
            raise OSError(f"{host} has no address")
        addresses = [_address(result["host"]) for result in found]
        allowed = set(self._policy.allowed_addresses(host, addresses))
        return [result for result, address in zip(found, addresses, strict=True) if address in allowed]

    async def close(self) -> None:
        await self._inner.close()


class OwnThreadsResolver(AbstractResolver):
    """getaddrinfo in threads of its own, never the event loop's default executor (LOOKUP_THREADS)."""

    def __init__(self, threads: int = LOOKUP_THREADS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webhook-dns")

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        lookup = functools.partial(socket.getaddrinfo, host, port, family=family, type=socket.SOCK_STREAM,
                                   flags=socket.AI_ADDRCONFIG)
        infos = await asyncio.get_running_loop().run_in_executor(self._executor, lookup)
        found: list[ResolveResult] = []
        for kind, _, proto, _, address in infos:
            if kind not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address[0], str):
                continue
            # An IPv6 scope (link-local) stays with the address, as aiohttp's ThreadedResolver keeps it.
            scope = address[3] if len(address) == 4 else 0
            text = f"{address[0]}%{scope}" if scope else address[0]
            found.append(ResolveResult(hostname=host, host=text, port=int(address[1]), family=kind, proto=proto,
                                       flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        return found

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)  # a hung lookup must not hold up a stop


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])  # fe80::1%eth0: the zone is not part of the address


def _looks_like_ip(host: str) -> bool:
    # aiohttp's own test (helpers.is_ip_address): such a host is connected to directly, without a resolver.
    return ":" in host or host.replace(".", "").isdigit()


class Sender:
    """One per process: one aiohttp session (keep-alive, pooled connections) shared by every endpoint.

    `max_connections` 0 means no limit in the pool: the caller bounds how many sends are in flight
    (waiting for a pooled connection would count against the attempt's timeouts). `resolver` is
    the resolver wrapped by the policy check (OwnThreadsResolver by default: the same getaddrinfo
    the endpoint check uses, in threads of its own)."""

    def __init__(self, policy: DestinationPolicy, *, connect_timeout_s: float, read_timeout_s: float,
                 max_response_bytes: int = 65536, clock: Callable[[], datetime] = _utc_now,
                 max_connections: int = 0, resolver: AbstractResolver | None = None) -> None:
        if connect_timeout_s <= 0 or read_timeout_s <= 0 or max_response_bytes < 0:
            raise ValueError("timeouts must be positive and max_response_bytes not negative")
        self._policy = policy
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        # sock_read bounds each wait for bytes; `total` bounds the whole attempt, so an answer
        # trickled a byte at a time cannot hold a delivery for longer than connect + read.
        self._timeout = aiohttp.ClientTimeout(total=connect_timeout_s + read_timeout_s, connect=None,
                                              sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._max_response_bytes = max_response_bytes
        self._clock = clock
        self._max_connections = max_connections
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._own_resolver: OwnThreadsResolver | None = None
        self._targets: dict[str, URL] = {}
        self._signers: dict[str, Webhook] = {}

    def _open_session(self) -> aiohttp.ClientSession:
        # Made on first use: a session and its resolver belong to the running event loop.
        if self._session is None or self._session.closed:
            if self._resolver is not None:
                inner: AbstractResolver = self._resolver
            else:  # ours to close: aiohttp closes only a resolver it made itself
                inner = self._own_resolver = OwnThreadsResolver()
            connector = aiohttp.TCPConnector(resolver=PolicyResolver(self._policy, inner),
                                             limit=self._max_connections, limit_per_host=0,
                                             keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=DNS_CACHE_S,
                                             enable_cleanup_closed=TLS_CLEANUP_NEEDED)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,  # a proxy from the environment would connect where no policy looks
                auto_decompress=False,  # the bound counts the bytes on the wire: no gzip bomb
                skip_auto_headers=("Accept-Encoding",), raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._own_resolver is not None:
            await self._own_resolver.close()

    async def send(self, url: str, webhook_id: str, body: str, secrets: Sequence[str]) -> AttemptResult:
        """Signs `body` with every secret (one `v1,` signature each, space separated), POSTs it to
        `url` once, never follows a redirect. Raises ValueError only for a caller's mistake (no
        secret, a malformed secret, a body over MAX_BODY_BYTES, a webhook id unfit for a header)."""
        data = body.encode()
        if len(data) > MAX_BODY_BYTES:
            raise ValueError(f"a webhook body is at most {MAX_BODY_BYTES} bytes (this one has {len(data)})")
        headers = self._headers(webhook_id, body, secrets)
        started = time.perf_counter()
        try:
            target = self._target(url)
            async with self._open_session().post(target, data=data, headers=headers,
                                                 allow_redirects=False) as response:
                status = response.status
                retry_after_s = (parse_retry_after(response.headers.get("Retry-After"), self._clock())
                                 if status in RETRY_AFTER_STATUSES else None)
                error = await self._read_answer(response)
        except DestinationRefused as refusal:
            return AttemptResult(None, _ms_since(started), untrusted(str(refusal)), None, refused=True)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return AttemptResult(None, _ms_since(started), self._describe(exc), None)
        return AttemptResult(status, _ms_since(started), error, retry_after_s)

    def _headers(self, webhook_id: str, body: str, secrets: Sequence[str]) -> dict[str, str]:
        if not secrets:
            raise ValueError("a webhook is never sent unsigned: no secret given")
        if not (0 < len(webhook_id) <= 256 and webhook_id.isascii() and webhook_id.isprintable()
                and " " not in webhook_id):
            raise ValueError("a webhook id is 1 to 256 printable ASCII characters without spaces")
        seconds = math.floor(self._clock().timestamp())
        moment = datetime.fromtimestamp(seconds, timezone.utc)  # the signed time is the header's, to the second
        signature = " ".join(self._signer(secret).sign(webhook_id, moment, body) for secret in secrets)
        return {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": webhook_id,
                "webhook-timestamp": str(seconds), "webhook-signature": signature}

    def _signer(self, secret: str) -> Webhook:
        signer = self._signers.get(secret)
        if signer is None:
            try:
                signer = Webhook(secret)
            except Exception:  # binascii.Error, EmptyWebhookSecretError: never echo the secret
                raise ValueError("a signing secret is not a whsec_ secret") from None
            if len(self._signers) >= SIGNERS_CACHED_MAX:
                self._signers.clear()
            self._signers[secret] = signer
        return signer

    def _target(self, url: str) -> URL:
        """The URL as aiohttp will use it, checked once per URL: the policy's URL rules, and an
        IP-literal host against the address rules (aiohttp connects to a literal without resolving)."""
        target = self._targets.get(url)
        if target is not None:
            return target
        self._policy.check_url(url)
        try:
            target = URL(url, encoded=False)
        except (ValueError, TypeError):
            raise DestinationRefused("the URL is malformed") from None
        host = target.raw_host or ""
        # Check what aiohttp will connect to, not only what urlsplit saw in check_url.
        if target.scheme not in ("http", "https") or not host or target.user is not None \
                or target.password is not None:
            raise DestinationRefused("the URL must be http(s)://host/path without a user name or password")
        if _looks_like_ip(host):
            try:
                literal = _address(host)
            except ValueError:
                raise DestinationRefused(f"{untrusted(host)} is not an IP address aiohttp could use") from None
            self._policy.allowed_addresses(host, [literal])
        if len(self._targets) >= TARGETS_CACHED_MAX:
            self._targets.clear()
        self._targets[url] = target
        return target

    async def _read_answer(self, response: aiohttp.ClientResponse) -> str | None:
        """Reads the answer's body up to the bound, keeping only what an error message shows; None
        for a 2xx read in full. A body over the bound is not read further: the connection is dropped."""
        keep = not 200 <= response.status <= 299
        kept = bytearray()
        left = self._max_response_bytes
        problem = None
        try:
            while True:
                chunk = await response.content.read(left + 1)  # at most one byte past the bound
                if not chunk:
                    break
                left -= len(chunk)
                if keep and len(kept) < ERROR_SNIPPET_CHARS:
                    kept += chunk[:ERROR_SNIPPET_CHARS - len(kept)]
                if left < 0:
                    problem = f"answer body over {self._max_response_bytes} bytes, not read further"
                    response.close()
                    break
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # The status line arrived: it stands (a 2xx delivered it); the body is what failed.
            problem = f"reading the answer's body: {self._describe(exc)}"
            response.close()
        if not keep:
            return problem
        text = f"HTTP {response.status}"
        if kept:
            text += ": " + untrusted(kept.decode("utf-8", "replace"), ERROR_SNIPPET_CHARS)
        return f"{text} ({problem})" if problem else text

    def _describe(self, exc: BaseException) -> str:
        """A short description of a failure; never str(exc), which may quote the URL (a receiver's token)."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"timed out connecting (after {self._connect_timeout_s:g} s)"
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return f"timed out waiting for the answer (nothing for {self._read_timeout_s:g} s)"
        if isinstance(exc, TimeoutError):
            return f"timed out: the attempt took over {self._connect_timeout_s + self._read_timeout_s:g} s"
        for kind, description in FAILURES:
            if isinstance(exc, kind):
                return description
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            return f"could not connect: {untrusted(reason, 80)}"
        if isinstance(exc, aiohttp.ClientResponseError):
            return f"the answer is not valid HTTP ({type(exc).__name__})"
        return f"connection error ({type(exc).__name__})"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds from `now`, 0..RETRY_AFTER_MAX_S: delay-seconds or an HTTP date
    (RFC 9110 §10.2.3); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 64:
        return None
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)  # "-0000": the date is UTC, its source unknown
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
