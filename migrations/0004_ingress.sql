-- The ingress's idempotency records (issue #5): one row per (channel, Idempotency-Key).
--
-- A request claims its key by inserting first (ON CONFLICT DO NOTHING), so of two concurrent
-- requests with one key exactly one row, and so one payment id, wins. The event id and time are
-- fixed at the claim, so a retry after Kafka failed re-publishes the very same event.
-- published_at is set only after Kafka acknowledged that event: a row without it does not block a
-- retry, it tells the retry to publish. The payer's phone is not kept here.
CREATE TABLE ingress_requests (
    channel_id        text NOT NULL,
    idempotency_key   text NOT NULL CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
    body_sha256       bytea NOT NULL CHECK (octet_length(body_sha256) = 32),
    payment_id        text NOT NULL UNIQUE,
    event_id          uuid NOT NULL UNIQUE,
    occurred_at       timestamptz NOT NULL,
    api_key_id        text NOT NULL,
    amount            bigint NOT NULL CHECK (amount > 0),
    account_reference text NOT NULL CHECK (char_length(account_reference) BETWEEN 1 AND 12),
    order_reference   text,
    claimed_at        timestamptz NOT NULL DEFAULT now(),
    published_at      timestamptz,
    PRIMARY KEY (channel_id, idempotency_key),
    CHECK (published_at IS NULL OR published_at >= claimed_at)
);
