"""Least privilege on Kafka: each service principal writes and reads exactly its topics
(services.common.topics.ACCESS, applied by infra/kafka_acl.py), and nobody gets in without a login."""
from __future__ import annotations

import importlib.util
import os
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from services.common.config import ConfigError, kafka_client_config
from services.common.kafka import ConsumerLoop, EventProducer, client_config, ensure_topics, per_event
from services.common.topics import (
    ACCESS,
    ALL_TOPICS,
    CALLBACK_RAW,
    DEAD_LETTER,
    PAYMENT_REQUESTED,
    PAYMENT_STATUS,
    STK_PUSH_RESULT,
    STK_QUERY_REQUESTED,
    STK_QUERY_RESULT,
    parse_upstream_producers,
    upstream_requested_topic,
)
from services.ingress.upstream import UpstreamReauthoriser, is_transient as upstream_is_transient
from tests.conftest import ROOT, kafka_login
from tests.platform.kafka_helpers import end_offsets, read_all, run_until, sample_request

PIPELINE_TOPICS = sorted(t.name for t in ALL_TOPICS)


def login_env(infra: dict[str, str], principal: str) -> dict[str, str]:
    return {**os.environ, **kafka_login(infra, principal)}


def produce_one(infra: dict[str, str], principal: str, topic: str, value: bytes = b"not an event") -> KafkaError | None:
    """Produces one message as `principal`; the delivery report's error (None: the broker took it)."""
    producer = Producer(client_config({"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"], "acks": "all",
                                       "enable.idempotence": True, "delivery.timeout.ms": 10_000},
                                      login_env(infra, principal)))
    errors = []
    producer.produce(topic, key=b"acl-test", value=value, on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    assert len(errors) == 1, "no delivery report within 15 s"
    return errors[0]


def first_consumer_error(infra: dict[str, str], principal: str, topic: str, group: str) -> KafkaError | None:
    consumer = Consumer(client_config({"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"], "group.id": group,
                                       "enable.auto.commit": False, "auto.offset.reset": "latest"},
                                      login_env(infra, principal)))
    try:
        consumer.subscribe([topic])
        polls_after_assignment = 0
        for _ in range(80):
            for msg in consumer.consume(10, 0.25):
                error = msg.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    return error
            if consumer.assignment():  # the group let it in; fetching the topic may still be refused
                polls_after_assignment += 1
                if polls_after_assignment >= 12:
                    return None  # three seconds of fetching without an error: allowed
        raise AssertionError(f"{principal} neither got {topic} nor an error")
    finally:
        consumer.close()


@pytest.mark.parametrize("principal", sorted(ACCESS))
def test_a_service_principal_cannot_write_a_topic_outside_its_acls(infra, principal):
    allowed = {t.name for t in ACCESS[principal].writes}
    for topic in PIPELINE_TOPICS:
        if topic not in allowed:
            err = produce_one(infra, principal, topic)
            assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (principal, topic, err)


def test_only_the_gateway_writes_callbacks_and_only_the_ingress_writes_payment_requests(infra, codec, unique):
    writers = {topic: sorted(p for p, a in ACCESS.items() if topic in a.writes)
               for topic in (CALLBACK_RAW, PAYMENT_REQUESTED)}
    assert writers == {CALLBACK_RAW: ["webhook-gateway"], PAYMENT_REQUESTED: ["ingress"]}
    refusal = produce_one(infra, "ingress", CALLBACK_RAW.name)
    assert refusal is not None and refusal.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # ...while its own topic takes its events: the refusals above are the ACLs, not a broken login.
    event = codec.encode(PAYMENT_REQUESTED, sample_request(f"acl-{unique}", str(uuid.uuid4())))
    assert produce_one(infra, "ingress", PAYMENT_REQUESTED.name, event) is None


@pytest.mark.parametrize("principal, topic", [("webhook-gateway", PAYMENT_STATUS), ("ingress", CALLBACK_RAW),
                                              ("stk-worker", CALLBACK_RAW), ("ledger", STK_QUERY_REQUESTED)])
def test_a_service_principal_cannot_read_a_topic_outside_its_acls(infra, principal, topic, unique):
    group = f"{ACCESS[principal].group_prefix or principal}-acl-{unique}"
    err = first_consumer_error(infra, principal, topic.name, group)
    assert err is not None and err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                              KafkaError.GROUP_AUTHORIZATION_FAILED), err


def test_a_service_principal_reads_its_topics_only_in_its_own_groups(infra, unique):
    assert first_consumer_error(infra, "ledger", STK_PUSH_RESULT.name, f"ledger-acl-{unique}") is None
    err = first_consumer_error(infra, "ledger", STK_QUERY_RESULT.name, f"stk-worker-acl-{unique}")
    assert err is not None and err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED, err


def refused(config: dict) -> list[KafkaError]:
    """Asks for metadata, which must fail; returns the errors the client reported on the way."""
    errors: list[KafkaError] = []
    # quiet: the errors are expected. confluent_kafka's annotation of conf leaves out callbacks such as error_cb.
    admin = AdminClient({**config, "error_cb": errors.append, "log_level": 0})  # type: ignore[dict-item]
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)
    admin.poll(0.5)  # serves error_cb
    return errors


def test_a_client_without_a_valid_login_is_refused(infra):
    bootstrap = {"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"]}
    good = {**bootstrap, **kafka_client_config(login_env(infra, "ingress"))}
    refused(bootstrap)  # plaintext: the listener speaks only TLS
    refused({**bootstrap, "security.protocol": "SSL", "ssl.ca.location": good["ssl.ca.location"]})  # TLS, no login
    errors = refused({**good, "sasl.password": "not-the-password"})
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    errors = refused({k: v for k, v in good.items() if k != "ssl.ca.location"})  # the system's CAs
    assert any(e.code() == KafkaError._SSL for e in errors), errors  # do not vouch for our broker
    AdminClient(good).list_topics(timeout=10)  # the same login with the local CA gets in


def test_a_service_principal_cannot_grant_itself_more_or_delete_what_others_need(infra):
    admin_as_ingress = AdminClient(client_config({"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"]},
                                                 login_env(infra, "ingress")))
    more = AclBinding(ResourceType.TOPIC, CALLBACK_RAW.name, ResourcePatternType.LITERAL, "User:ingress", "*",
                      AclOperation.WRITE, AclPermissionType.ALLOW)
    attempts = {
        "create_acls": lambda: admin_as_ingress.create_acls([more], request_timeout=10)[more],
        "alter_scram": lambda: admin_as_ingress.alter_user_scram_credentials([UserScramCredentialUpsertion(
            "admin", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), b"taken-over")],
            request_timeout=10)["admin"],
        "delete_topic":
            lambda: admin_as_ingress.delete_topics([CALLBACK_RAW.name], request_timeout=10)[CALLBACK_RAW.name],
    }
    for name, attempt in attempts.items():
        with pytest.raises(KafkaException) as refused_with:
            attempt().result()
        assert refused_with.value.args[0].code() in (KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                                                     KafkaError.TOPIC_AUTHORIZATION_FAILED), (name, refused_with.value)
    admin_as_ingress.list_topics(timeout=10)  # the login works: the refusals are the authorizer's


# The environment's client settings (no broker needed).

def test_client_settings_come_from_kafka_client_variables_and_files(tmp_path):
    password = tmp_path / "pw"
    password.write_text("s3cret-value\n")
    env = {"KAFKA_CLIENT_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_CLIENT_SASL_USERNAME": "ledger",
           "KAFKA_CLIENT_SASL_PASSWORD_FILE": str(password), "KAFKA_CLIENT_SSL_CA_LOCATION": "",
           "KAFKA_BOOTSTRAP_SERVERS": "ignored:1"}
    assert kafka_client_config(env) == {"security.protocol": "SASL_SSL", "sasl.username": "ledger",
                                        "sasl.password": "s3cret-value"}
    assert client_config({"group.id": "g"}, env)["sasl.password"] == "s3cret-value"


@pytest.mark.parametrize("env, message", [
    ({"KAFKA_CLIENT_SASL_PASSWORD": "s3cret-value", "KAFKA_CLIENT_SASL_PASSWORD_FILE": "/x"}, "both set"),
    ({"KAFKA_CLIENT_SASL_PASSWORD_FILE": "/nonexistent/s3cret-value"}, "cannot be read"),
    ({"KAFKA_CLIENT_ACKS": "1"}, "the service decides acks itself"),
    ({"KAFKA_CLIENT_GROUP_ID": "other"}, "the service decides group.id itself"),
])
def test_bad_client_settings_are_refused_by_name(env, message):
    with pytest.raises(ConfigError) as raised:
        client_config({"acks": "all", "group.id": "g"}, env)
    assert message in str(raised.value)
    if "KAFKA_CLIENT_SASL_PASSWORD" in env:
        assert "s3cret-value" not in str(raised.value).replace("/nonexistent/s3cret-value", "")


# Upstream producers: a topic of their own, re-authorised per channel by the ingress.

def load_kafka_acl():
    spec = importlib.util.spec_from_file_location("kafka_acl", ROOT / "infra" / "kafka_acl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def upstream_principal(infra, unique, tmp_path):
    """A principal made for the test the way infra/kafka_acl.py makes every upstream producer's."""
    kafka_acl, principal = load_kafka_acl(), f"up-{unique}"
    password = tmp_path / f"kafka-{principal}.password"
    password.write_text(uuid.uuid4().hex)
    admin = AdminClient(client_config({"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"]}))
    kafka_acl.converge(admin, {principal: kafka_acl.upstream_access(principal)}, {principal: password.read_text()})
    ensure_topics(infra["KAFKA_BOOTSTRAP_SERVERS"], [upstream_requested_topic(principal)], 1)
    login = {"KAFKA_CLIENT_SASL_USERNAME": principal, "KAFKA_CLIENT_SASL_PASSWORD_FILE": str(password)}
    yield principal, login
    admin.alter_user_scram_credentials([UserScramCredentialDeletion(principal, ScramMechanism.SCRAM_SHA_512)])


def produce_as(infra, login: dict[str, str], topic: str, value: bytes) -> KafkaError | None:
    producer = Producer(client_config({"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"], "acks": "all",
                                       "delivery.timeout.ms": 10_000}, {**os.environ, **login}))
    errors = []
    producer.produce(topic, key=b"k", value=value, on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    return errors[0]


async def test_an_upstream_producer_reaches_payment_requested_only_for_its_channels(
        infra, codec, unique, upstream_principal, monkeypatch):
    principal, login = upstream_principal
    own_topic = upstream_requested_topic(principal).name
    mine, other = f"shop-{unique}", f"other-{unique}"
    allowed, forbidden = sample_request(mine, str(uuid.uuid4())), sample_request(other, str(uuid.uuid4()))
    requested_mark = end_offsets(infra["KAFKA_BOOTSTRAP_SERVERS"], PAYMENT_REQUESTED.name)
    dead_mark = end_offsets(infra["KAFKA_BOOTSTRAP_SERVERS"], DEAD_LETTER.name)

    # Only its own topic takes its writes: not payment.requested, not another producer's topic.
    for topic in (PAYMENT_REQUESTED.name, upstream_requested_topic("someone-else").name):
        err = produce_as(infra, login, topic, codec.encode(PAYMENT_REQUESTED, allowed))
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, err)
    for request in ({**allowed, "source": "API"}, forbidden):  # it may claim to be the API; it is not
        assert produce_as(infra, login, own_topic, codec.encode(PAYMENT_REQUESTED, request)) is None

    with monkeypatch.context() as env:  # the re-authoriser's clients log in as the ingress, as in production
        for name, value in kafka_login(infra, "ingress").items():
            env.setenv(name, value)
        as_ingress = EventProducer(infra["KAFKA_BOOTSTRAP_SERVERS"], codec, client_id="upstream-test")
        reauthoriser = UpstreamReauthoriser({principal: frozenset({mine})}, as_ingress)
        loop = ConsumerLoop(bootstrap=infra["KAFKA_BOOTSTRAP_SERVERS"], group_id=f"ingress-upstream-{unique}",
                            topics=reauthoriser.topics, codec=codec, dead_letters=as_ingress, poll_timeout=0.1,
                            handler=per_event(reauthoriser.handle, upstream_is_transient))
    passed: list[Message] = []
    letters: list[Message] = []

    def both_seen() -> bool:
        passed[:] = read_all(infra["KAFKA_BOOTSTRAP_SERVERS"], PAYMENT_REQUESTED.name,
                             lambda m: m.key() in (mine.encode(), other.encode()), 1, requested_mark, 1)
        letters[:] = read_all(infra["KAFKA_BOOTSTRAP_SERVERS"], DEAD_LETTER.name,
                              lambda m: codec.decode(m.value())[1]["source_topic"] == own_topic, 1, dead_mark, 1)
        return bool(passed and letters)

    try:
        await run_until(loop, both_seen, timeout=60)
    finally:
        as_ingress.close()
    assert [codec.decode(m.value())[1]["payment_id"] for m in passed] == [allowed["payment_id"]]
    assert codec.decode(passed[0].value())[1]["source"] == "TOPIC"
    [letter] = [codec.decode(m.value())[1] for m in letters]
    assert letter["error_type"] == "NotAllowed" and other in letter["error"]


def test_upstream_producers_are_parsed_strictly():
    assert parse_upstream_producers(" shop-erp:shop-1, shop-2 ; partner:shop-3") == {
        "shop-erp": frozenset({"shop-1", "shop-2"}), "partner": frozenset({"shop-3"})}
    assert parse_upstream_producers("") == {}
    for bad in ("shop-erp", "shop.erp:shop-1", "ledger:shop-1", "admin:shop-1", "a:shop-1;a:shop-2", "a:",
                "a:Shop-1", "a:shop-1\n,shop-2\nx"):
        with pytest.raises(ValueError):
            parse_upstream_producers(bad)
