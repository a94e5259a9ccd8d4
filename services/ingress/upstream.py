"""Payment requests that upstream services produce to Kafka themselves, re-authorised per channel.

Each upstream producer has a principal whose ACLs allow writing one topic only, its own
(`mpesa.upstream.<principal>.payment-requested.v1`); Kafka does not tell a consumer who produced a
message, so the topic is what names the producer. A request goes on to mpesa.payment.requested.v1
only if its channel is one that producer may use (UPSTREAM_PRODUCERS); anything else is
dead-lettered with the reason. So the ingress stays the only writer of payment.requested.
"""
from __future__ import annotations

import logging
import re

from services.common.ids import new_id
from services.common.kafka import ConsumedEvent, EventRejected, Publisher, PublishError
from services.common.text import untrusted
from services.common.topics import PAYMENT_REQUESTED, Topic, upstream_requested_topic

log = logging.getLogger(__name__)

# The producer chooses the ids. The payment id becomes a path segment of the callback URL and a key of
# several indexes (a few KiB of it would not fit one: the STK worker would retry its claim forever),
# so it is kept to URL-safe characters and a bounded length.
PAYMENT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._~-]{0,63}")


class NotAllowed(EventRejected):
    """The producer of this event may not request payments for its channel (or sent something else)."""


class UpstreamReauthoriser:
    def __init__(self, producers: dict[str, frozenset[str]], publisher: Publisher):
        self._channels_by_topic = {upstream_requested_topic(p).name: channels for p, channels in producers.items()}
        self._publisher = publisher

    @property
    def topics(self) -> list[Topic]:
        return [Topic(name, PAYMENT_REQUESTED.schema) for name in sorted(self._channels_by_topic)]

    def check(self, event: ConsumedEvent) -> dict:
        """The request to pass on, or NotAllowed naming why not."""
        if event.schema != PAYMENT_REQUESTED.schema:
            raise NotAllowed(f"{event.topic} carries only PaymentRequested records, not {untrusted(event.schema)}")
        channel_id = event.value["channel_id"]
        if channel_id not in self._channels_by_topic.get(event.topic, frozenset()):
            raise NotAllowed(f"the producer of {event.topic} may not request payments for channel "
                             f"{untrusted(channel_id)}")
        if not PAYMENT_ID.fullmatch(event.value["payment_id"]):
            raise NotAllowed(f"payment_id {untrusted(event.value['payment_id'], 80)!r} is not 1 to 64 URL-safe "
                             "characters (letters, digits, - _ . ~)")
        # Passed on as a request from a topic whatever the producer claimed (the API's are the ingress's own),
        # under an event id of ours: the ledger applies an event id once, so a producer reusing one (its
        # own, or a guessable one) would have a pushed payment dropped as a replay.
        return {**event.value, "event_id": new_id(), "source": "TOPIC"}

    async def handle(self, event: ConsumedEvent) -> None:
        request = self.check(event)
        await self._publisher.publish(PAYMENT_REQUESTED, request)
        log.info("upstream request passed on", extra={"channel_id": request["channel_id"],
                                                      "payment_id": request["payment_id"]})


def is_transient(error: Exception) -> bool:
    return isinstance(error, PublishError)
