"""librdkafka's own log lines go through the project's JSON logger, at their level, with no secret
(pure: the client talks to a closed loopback port, no broker needed)."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from services.common.avro import Codec
from services.common.config import ConfigError
from services.common.kafka import ClientLog, EventProducer, client_config
from services.common.observability import JsonFormatter

SECRET = "s3cret-Kafka-Passw0rd"
CLOSED_PORT = "127.0.0.1:1"  # nothing listens: librdkafka logs a connection failure


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the librdkafka logger writes, through the formatter every service's log uses."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("librdkafka")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(previous)


def lines_until(client: Producer, out: io.StringIO, wanted, timeout_s: float = 20.0) -> list[dict]:
    """Polls the client (which serves its log lines) until a line satisfies `wanted`, or fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        client.poll(0.1)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        if any(wanted(line) for line in lines):
            return lines
        assert time.monotonic() < deadline, f"no such line in {lines[-5:]}"


def test_a_connection_failure_is_a_json_error_line_not_a_stderr_line(json_lines, capfd):
    producer = Producer(client_config({"bootstrap.servers": CLOSED_PORT}, environ={}))

    lines = lines_until(producer, json_lines, lambda line: line["level"] == "error")

    failure = next(line for line in lines if line["level"] == "error")
    assert failure["logger"] == "librdkafka" and "FAIL" in failure["msg"]
    assert "%3|" not in capfd.readouterr().err  # librdkafka's own stderr format is gone


def test_a_clients_password_never_reaches_the_log_even_when_debugging(json_lines):
    login = {"KAFKA_CLIENT_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_CLIENT_SASL_MECHANISM": "PLAIN",
             "KAFKA_CLIENT_SASL_USERNAME": "ledger", "KAFKA_CLIENT_SASL_PASSWORD": SECRET}
    producer = Producer(client_config({"bootstrap.servers": CLOSED_PORT, "debug": "conf,security,broker"}, login))

    lines = lines_until(producer, json_lines, lambda line: line["level"] == "error")

    assert any(line["level"] == "debug" for line in lines)  # librdkafka's level 7, mapped
    assert SECRET not in json_lines.getvalue()


def test_a_line_quoting_a_secret_or_a_control_character_is_masked_and_kept_on_one_line(json_lines):
    ClientLog([SECRET, ""]).log(logging.WARNING, "%s [%s] %s", "SASL", "rdkafka#producer-1",
                                f"broker said: bad password {SECRET}\n{{\"forged\": true}}")

    [line] = [json.loads(text) for text in json_lines.getvalue().splitlines()]
    assert line["level"] == "warning"
    assert line["msg"] == 'SASL [rdkafka#producer-1] broker said: bad password ****\\u000a{"forged": true}'


async def test_an_idle_producers_log_lines_are_served_without_an_event_to_publish(json_lines):
    # librdkafka hands its lines over only when the client is polled; a producer with nothing to
    # send must not keep a lost broker's lines until the next event.
    producer = EventProducer(CLOSED_PORT, Codec(), client_id="idle-test")
    try:
        deadline = time.monotonic() + 20
        while '"level": "error"' not in json_lines.getvalue():
            assert time.monotonic() < deadline, "the idle producer's lines never came"
            await asyncio.sleep(0.1)
    finally:
        producer.close(0)


def test_the_logger_cannot_be_replaced_from_the_environment():
    with pytest.raises(ConfigError, match="KAFKA_CLIENT_LOGGER cannot be set"):
        client_config({}, {"KAFKA_CLIENT_LOGGER": "stderr"})
