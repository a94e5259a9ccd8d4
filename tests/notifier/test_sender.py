"""One webhook attempt against real HTTP receivers on loopback: what the receiver gets (a body a
standardwebhooks verifier accepts, with either secret of a rotation), and what the sender reports
whatever the receiver does (fails, asks to wait, stalls, redirects, floods, speaks no HTTP) or
wherever the URL points (inside the network: refused before anything is sent)."""
import asyncio
import ipaddress
import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings, strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from services.notifier.destinations import DestinationPolicy
from services.notifier.schedule import Outcome, RetryPolicy, decide
from services.notifier.secrets import new_secret
from services.notifier.sender import (
    MAX_BODY_BYTES,
    RETRY_AFTER_MAX_S,
    USER_AGENT,
    AttemptResult,
    Sender,
    parse_retry_after,
)
from tests.notifier.receiver import Receiver

LOOPBACK = DestinationPolicy((ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")))
PUBLIC_ONLY = DestinationPolicy()
BODY = '{"type":"payment.settled","timestamp":"2026-03-01T12:00:00.000Z","data":{"paymentId":"pay_1","amount":100}}'
SECRETS = (new_secret(), new_secret())
# Bounds on a test, not timed assertions: a sender that ignored its timeouts fails here instead of hanging.
STALL_BOUND_S = 20.0


@pytest.fixture
async def receivers():
    started: list[Receiver] = []

    async def start(handler=None, **fields) -> Receiver:
        receiver = Receiver(**fields) if handler is None else Receiver(handler, **fields)
        started.append(await receiver.start())
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


@pytest.fixture
async def senders():
    made: list[Sender] = []

    def make(policy: DestinationPolicy = LOOPBACK, **options) -> Sender:
        options = {"connect_timeout_s": 5.0, "read_timeout_s": 5.0, **options}
        made.append(Sender(policy, **options))
        return made[-1]

    yield make
    for sender in made:
        await sender.close()


def assert_safe(result: AttemptResult) -> None:
    """Nothing a sender returns carries a secret or the request body."""
    text = repr(result)
    assert not any(secret in text or secret.removeprefix("whsec_") in text for secret in SECRETS)
    assert BODY not in text and "pay_1" not in text
    assert result.error is None or (len(result.error) <= 260 and result.error.isprintable())


async def test_every_secret_signs_and_a_verifier_accepts_either_and_refuses_another(receivers, senders):
    receiver = await receivers()
    result = await senders().send(receiver.url, "evt_1", BODY, SECRETS)
    assert (result.http_status, result.error, result.refused) == (204, None, False)
    assert result.latency_ms > 0
    [got] = receiver.received
    assert got.body == BODY
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == USER_AGENT
    assert got.headers["webhook-id"] == "evt_1"
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in SECRETS:
        assert Webhook(secret).verify(got.body, got.headers) == {"type": "payment.settled", "timestamp":
                                                                 "2026-03-01T12:00:00.000Z", "data": {
                                                                     "paymentId": "pay_1", "amount": 100}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(got.body, got.headers)
    tampered = {**got.headers, "webhook-id": "evt_2"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRETS[0]).verify(got.body, tampered)
    assert_safe(result)


async def test_an_old_secret_no_longer_given_fails_verification(receivers, senders):
    receiver = await receivers()
    await senders().send(receiver.url, "evt_1", BODY, SECRETS[1:])
    [got] = receiver.received
    Webhook(SECRETS[1]).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRETS[0]).verify(got.body, got.headers)


async def test_every_attempt_carries_the_same_webhook_id_and_a_fresh_valid_signature(receivers, senders):
    receiver = await receivers()
    sender = senders()
    for _ in range(3):
        assert (await sender.send(receiver.url, "evt_same", BODY, SECRETS[:1])).http_status == 204
    assert [got.headers["webhook-id"] for got in receiver.received] == ["evt_same"] * 3
    for got in receiver.received:
        Webhook(SECRETS[0]).verify(got.body, got.headers)


async def test_the_signed_timestamp_is_the_clocks_and_the_headers(receivers, senders):
    receiver = await receivers()
    now = datetime.now(timezone.utc)
    await senders(clock=lambda: now).send(receiver.url, "evt_1", BODY, SECRETS[:1])
    [got] = receiver.received
    assert got.headers["webhook-timestamp"] == str(int(now.timestamp()))
    Webhook(SECRETS[0]).verify(got.body, got.headers)


async def test_sends_to_one_receiver_reuse_one_kept_alive_connection(receivers, senders):
    receiver = await receivers()
    sender = senders()
    for _ in range(3):
        await sender.send(receiver.url, "evt_1", BODY, SECRETS[:1])
    assert len({got.peer_port for got in receiver.received}) == 1


async def test_a_500_is_reported_with_the_start_of_the_answer_made_safe(receivers, senders):
    async def fail(_receiver, _request):
        return web.Response(status=500, text="boom\n\x1b[31m" + "x" * 5000)

    receiver = await receivers(fail)
    result = await senders().send(receiver.url, "evt_1", BODY, SECRETS)
    assert result.http_status == 500 and result.retry_after_s is None
    assert result.error is not None and result.error.startswith("HTTP 500: boom\\u000a\\u001b[31mxxx")
    assert_safe(result)
    assert decide(result, 1, datetime.now(timezone.utc), datetime.now(timezone.utc), RetryPolicy())[0] is Outcome.RETRY


async def test_retry_after_in_seconds_and_as_an_http_date_is_read(receivers, senders):
    now = datetime.now(timezone.utc).replace(microsecond=0)

    async def busy(_receiver, request):
        later = request.headers["webhook-id"] == "evt_date"
        value = format_datetime(now + timedelta(seconds=90), usegmt=True) if later else "120"
        return web.Response(status=503 if later else 429, headers={"Retry-After": value})

    receiver = await receivers(busy)
    sender = senders(clock=lambda: now)
    assert (await sender.send(receiver.url, "evt_secs", BODY, SECRETS)).retry_after_s == 120.0
    result = await sender.send(receiver.url, "evt_date", BODY, SECRETS)
    assert (result.http_status, result.retry_after_s) == (503, 90.0)


def test_retry_after_values_are_bounded_and_garbage_is_ignored():
    now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_retry_after("0", now) == 0.0
    assert parse_retry_after(" 30 ", now) == 30.0
    assert parse_retry_after("9" * 60, now) == RETRY_AFTER_MAX_S
    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0.0  # in the past: now
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 -0000", now) == 30.0
    for garbage in (None, "", "-5", "1.5", "٣", "soon", "Sun, 99 Foo 2026", "9" * 100, "1e9"):
        assert parse_retry_after(garbage, now) is None, garbage


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=st.one_of(st.text(max_size=80), st.integers(-10**20, 10**20).map(str),
                       st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: format_datetime(d, usegmt=True))))
def test_any_retry_after_value_reads_as_nothing_or_a_bounded_wait(value):
    seconds = parse_retry_after(value, datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc))
    assert seconds is None or 0.0 <= seconds <= RETRY_AFTER_MAX_S


async def test_a_receiver_that_does_not_answer_in_time_gives_no_status_and_an_error(receivers, senders):
    async def stall(receiver, _request):
        await receiver.release.wait()
        return web.Response(status=200)

    receiver = await receivers(stall)
    sender = senders(connect_timeout_s=1.0, read_timeout_s=0.3)
    result = await asyncio.wait_for(sender.send(receiver.url, "evt_1", BODY, SECRETS), STALL_BOUND_S)
    assert result.http_status is None and not result.refused
    assert result.error == "timed out waiting for the answer (nothing for 0.3 s)"
    assert_safe(result)


async def test_an_answer_trickled_byte_by_byte_is_cut_at_the_attempts_bound(receivers, senders):
    async def trickle(receiver, request):
        response = web.StreamResponse(status=200, headers={"Content-Length": "100000"})
        await response.prepare(request)
        while not receiver.release.is_set():
            await response.write(b"x")
            await asyncio.sleep(0.05)
        return response

    receiver = await receivers(trickle)
    sender = senders(connect_timeout_s=0.5, read_timeout_s=0.5)
    result = await asyncio.wait_for(sender.send(receiver.url, "evt_1", BODY, SECRETS), STALL_BOUND_S)
    # The 200 arrived, so the receiver has the event; the body that never ended is the error.
    assert result.http_status == 200
    # The whole attempt's bound ends it (or, on a machine stalled for half a second, the read timeout).
    assert result.error is not None and result.error.startswith("reading the answer's body: timed out")


async def test_a_connection_that_is_never_accepted_times_out(senders):
    # A listener whose accept queue is full drops new SYNs, as a filtered address would.
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        sender = senders(connect_timeout_s=0.5, read_timeout_s=5.0)
        result = await asyncio.wait_for(sender.send(f"http://127.0.0.1:{port}/hooks", "evt_1", BODY, SECRETS),
                                        STALL_BOUND_S)
    finally:
        for sock in (listener, *fillers):
            sock.close()
    assert (result.http_status, result.refused, result.error) == (None, False, "timed out connecting (after 0.5 s)")


async def test_a_refused_connection_gives_no_status_and_is_retried(senders):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await senders().send(f"http://127.0.0.1:{port}/hooks?token=tok_receivers_own", "evt_1", BODY, SECRETS)
    assert result.http_status is None and not result.refused
    assert result.error is not None and result.error.startswith("could not connect: ")
    assert "tok_receivers_own" not in result.error  # a URL may carry the receiver's own secret
    assert_safe(result)


async def test_a_redirect_is_not_followed(receivers, senders):
    target = await receivers()

    async def redirect(_receiver, _request):
        raise web.HTTPFound(target.url)

    receiver = await receivers(redirect)
    result = await senders().send(receiver.url, "evt_1", BODY, SECRETS)
    assert result.http_status == 302 and result.error is not None and result.error.startswith("HTTP 302")
    assert len(receiver.received) == 1 and target.received == []
    assert decide(result, RetryPolicy().max_client_error_attempts, datetime.now(timezone.utc),
                  datetime.now(timezone.utc), RetryPolicy())[0] is Outcome.PARKED


async def test_a_huge_answer_is_not_read_beyond_the_bound(receivers, senders):
    total = 64 * 1024 * 1024  # far more than the kernel's socket buffers hold
    written = []
    done = asyncio.Event()

    async def flood(_receiver, request):
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        sent = 0
        try:
            while sent < total:
                await response.write(b"x" * 65536)
                sent += 65536
        except (ConnectionError, RuntimeError):
            pass  # the sender hung up
        finally:
            written.append(sent)
            done.set()
        return response

    receiver = await receivers(flood)
    result = await senders(max_response_bytes=65536).send(receiver.url, "evt_1", BODY, SECRETS)
    assert result.http_status == 200
    assert result.error == "answer body over 65536 bytes, not read further"
    await asyncio.wait_for(done.wait(), STALL_BOUND_S)
    assert written[0] < total  # the connection was dropped, not drained


async def test_a_small_answer_body_is_read_in_full_and_the_connection_kept(receivers, senders):
    async def chatty(_receiver, _request):
        return web.Response(status=200, body=b"y" * 65536)

    receiver = await receivers(chatty)
    sender = senders(max_response_bytes=65536)
    for _ in range(2):
        result = await sender.send(receiver.url, "evt_1", BODY, SECRETS)
        assert (result.http_status, result.error, result.retry_after_s) == (200, None, None)
    assert len({got.peer_port for got in receiver.received}) == 1


async def raw_server(reply: bytes) -> tuple[asyncio.Server, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("reply", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 100_000 + b"\r\n\r\n",
    b"",
])
async def test_an_answer_that_is_not_http_gives_no_status_and_an_error(senders, reply):
    server, port = await raw_server(reply)
    try:
        result = await asyncio.wait_for(senders().send(f"http://127.0.0.1:{port}/", "evt_1", BODY, SECRETS),
                                        STALL_BOUND_S)
    finally:
        server.close()
    assert result.http_status is None and result.error is not None and not result.refused
    assert_safe(result)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/hooks", "http://localhost:{port}/hooks", "http://LocalHost:{port}/hooks",
    "http://[::ffff:127.0.0.1]:{port}/hooks", "http://[::1]:{port}/hooks", "https://127.1:{port}/hooks",
    "https://2130706433:{port}/hooks", "https://0x7f.0.0.1:{port}/hooks", "https://0.0.0.0:{port}/hooks",
    "http://0.0.0.0:{port}/hooks", "ftp://127.0.0.1:{port}/hooks", "http://user:pw@127.0.0.1:{port}/hooks",
])
async def test_without_loopback_allowed_a_loopback_destination_is_refused_and_nothing_arrives(receivers, senders,
                                                                                              url):
    receiver = await receivers()
    result = await senders(PUBLIC_ONLY).send(url.format(port=receiver.port), "evt_1", BODY, SECRETS)
    assert (result.http_status, result.refused) == (None, True)
    assert result.error
    assert receiver.received == []
    assert_safe(result)


class FixedResolver(AbstractResolver):
    """DNS as an attacker who controls a name makes it: the name points wherever they like."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for address in self.addresses]

    async def close(self) -> None:
        pass


async def test_a_public_name_that_resolves_inside_is_refused_at_connection_time(receivers, senders):
    receiver = await receivers()
    resolver = FixedResolver("127.0.0.1")
    result = await senders(PUBLIC_ONLY, resolver=resolver).send(f"https://hooks.example.com:{receiver.port}/hooks",
                                                                 "evt_1", BODY, SECRETS)
    assert (result.http_status, result.refused) == (None, True)
    assert result.error is not None and "resolves to 127.0.0.1" in result.error
    assert resolver.asked == ["hooks.example.com"]
    assert receiver.received == []


async def test_of_the_addresses_a_name_resolves_to_only_allowed_ones_are_connected_to(receivers, senders):
    receiver = await receivers()
    trap = await receivers(host="127.0.0.2", port=receiver.port)  # the same port on a refused address
    resolver = FixedResolver("127.0.0.2", "127.0.0.1")
    only_one = DestinationPolicy((ipaddress.ip_network("127.0.0.1/32"),))
    result = await senders(only_one, resolver=resolver).send(f"http://localhost:{receiver.port}/hooks", "evt_1",
                                                             BODY, SECRETS)
    assert result.http_status == 204
    assert len(receiver.received) == 1 and trap.received == []


async def test_a_callers_mistake_raises_without_echoing_a_secret(senders):
    sender = senders()
    with pytest.raises(ValueError, match="at most"):
        await sender.send("http://127.0.0.1:9/", "evt_1", "x" * (MAX_BODY_BYTES + 1), SECRETS)
    with pytest.raises(ValueError, match="unsigned"):
        await sender.send("http://127.0.0.1:9/", "evt_1", BODY, [])
    with pytest.raises(ValueError, match="webhook id"):
        await sender.send("http://127.0.0.1:9/", "evt\r\nX-Injected: 1", BODY, SECRETS)
    with pytest.raises(ValueError) as raised:
        await sender.send("http://127.0.0.1:9/", "evt_1", BODY, ["whsec_abcde"])
    assert "abcde" not in str(raised.value) and raised.value.__cause__ is None


async def test_a_name_without_addresses_is_a_failed_lookup_retried_not_a_refusal(receivers, senders):
    receiver = await receivers()
    result = await senders(resolver=FixedResolver()).send(f"http://localhost:{receiver.port}/hooks", "evt_1", BODY,
                                                          SECRETS)
    assert (result.http_status, result.refused, result.error) == (None, False, "the host name does not resolve")
    assert receiver.received == []


def self_signed_context(directory) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def test_a_receiver_whose_certificate_is_not_trusted_gets_nothing(receivers, senders, tmp_path):
    receiver = await receivers(ssl_context=self_signed_context(tmp_path))
    result = await senders().send(f"https://localhost:{receiver.port}/hooks", "evt_1", BODY, SECRETS)
    assert (result.http_status, result.refused) == (None, False)
    assert result.error == "the receiver's TLS certificate was not accepted"
    assert receiver.received == []


async def test_host_names_whose_lookups_hang_do_not_hold_up_another_receivers_lookup(receivers, senders,
                                                                                      monkeypatch):
    """Many merchants' DNS hangs at once (their provider is down): each lookup holds a thread for as
    long as getaddrinfo waits, which the attempt's timeout does not end. Those threads must not be the
    ones every other endpoint's lookup (and the event loop's other users) needs."""
    receiver = await receivers()
    hung, entered = threading.Event(), []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".hung.test"):
            entered.append(host)
            hung.wait(STALL_BOUND_S * 3)
            raise socket.gaierror(socket.EAI_AGAIN, "temporary failure")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sender = senders(connect_timeout_s=1.0, read_timeout_s=1.0)
    try:
        stuck = [asyncio.ensure_future(sender.send(f"https://shop{i}.hung.test/hooks", f"evt_{i}", BODY, SECRETS))
                 for i in range(40)]
        for _ in range(200):  # until more lookups hang than the loop's default executor has threads
            if len(entered) >= 8:
                break
            await asyncio.sleep(0.05)
        result = await sender.send(f"http://localhost:{receiver.port}/hooks", "evt_ok", BODY, SECRETS)
        assert (result.http_status, result.error) == (204, None)
        assert all(r.http_status is None for r in await asyncio.gather(*stuck))
    finally:
        hung.set()
