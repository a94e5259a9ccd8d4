-- Status webhooks (docs/webhooks.md): each channel's endpoints, their signing secrets sealed by the
-- notifier's vault key, one delivery per (status event, endpoint) and a log of every attempt.

CREATE TABLE webhook_endpoints (
    endpoint_id     text PRIMARY KEY CHECK (endpoint_id ~ '^ep_[0-9a-f]{20}$'),
    channel_id      text NOT NULL REFERENCES channels (channel_id),
    url             text NOT NULL CHECK (char_length(url) BETWEEN 10 AND 2048),
    -- services/notifier/events.py EVENT_TYPES; at least one.
    event_types     text[] NOT NULL CHECK (cardinality(event_types) BETWEEN 1 AND 5 AND event_types <@ ARRAY[
                        'payment.pending', 'payment.settled', 'payment.cancelled', 'payment.failed',
                        'payment.review']),
    description     text CHECK (char_length(description) <= 200),
    -- 'disabled': by an operator, or by the notifier after failing for the whole retry window;
    -- 'deleted': kept for its delivery log, never delivered to again.
    status          text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled', 'deleted')),
    disabled_reason text CHECK (char_length(disabled_reason) <= 500),
    -- When the current run of failed attempts began (null after a success): the automatic disabling.
    failing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL CHECK (char_length(created_by) BETWEEN 1 AND 200),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'disabled') = (disabled_reason IS NOT NULL))
);
CREATE INDEX webhook_endpoints_channel ON webhook_endpoints (channel_id) WHERE status = 'enabled';

-- Signing secrets: AES-256-GCM under a per-row data key wrapped to the notifier's KEK, both bound
-- to (endpoint_id, version) (services/notifier/secrets.py). The newest version signs; an older one
-- signs too until expires_at (the rotation overlap), so receivers can switch without a gap.
CREATE TABLE webhook_secrets (
    endpoint_id  text NOT NULL REFERENCES webhook_endpoints (endpoint_id),
    version      integer NOT NULL CHECK (version >= 1),
    key_id       text NOT NULL,
    wrapped_key  bytea NOT NULL,
    nonce        bytea NOT NULL CHECK (octet_length(nonce) = 12),
    ciphertext   bytea NOT NULL,
    fingerprint  text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{16}$'),
    expires_at   timestamptz,  -- null: signs until replaced; set when a newer version replaces it
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL CHECK (char_length(created_by) BETWEEN 1 AND 200),
    PRIMARY KEY (endpoint_id, version)
);

-- One row per (status event, endpoint): the unique pair makes a redelivered Kafka event enqueue
-- nothing new. `body` is the exact JSON sent on every attempt; `webhook_id` is the same on every
-- attempt and every manual redelivery, so receivers deduplicate on it.
-- Per endpoint and payment, only the earliest pending row (by occurred_at, then id) is attempted:
-- a Settled never overtakes its Pending.
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    webhook_id       text NOT NULL CHECK (char_length(webhook_id) BETWEEN 1 AND 100),
    event_id         text NOT NULL,
    endpoint_id      text NOT NULL REFERENCES webhook_endpoints (endpoint_id),
    channel_id       text NOT NULL,
    payment_id       text NOT NULL,
    event_type       text NOT NULL,
    occurred_at      timestamptz NOT NULL,
    body             text NOT NULL CHECK (octet_length(body) <= 65536),
    -- pending: to be attempted at next_attempt_at; delivered: a 2xx; parked: given up (a 4xx
    -- repeated, or the retry window passed); cancelled: its endpoint was deleted.
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'parked', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A notifier process holding the row in memory (its instance id) until leased_until; another
    -- process takes it over only after that, so a killed notifier's rows are retried.
    leased_by        text,
    leased_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    last_http_status integer,
    last_error       text CHECK (char_length(last_error) <= 500),
    UNIQUE (event_id, endpoint_id),
    CHECK ((state = 'pending') = (finished_at IS NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_chain ON webhook_deliveries (endpoint_id, payment_id, occurred_at, id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- Every attempt, for the delivery log (admin API, `webhooks attempts`).
CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id),
    at           timestamptz NOT NULL,
    http_status  integer,
    latency_ms   double precision NOT NULL CHECK (latency_ms >= 0),
    error        text CHECK (char_length(error) <= 500),
    outcome      text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'parked'))
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- Endpoint and secret changes are audited beside the credentials', in the same append-only table.
ALTER TABLE credential_audit ADD COLUMN webhook_endpoint_id text;
ALTER TABLE credential_audit DROP CONSTRAINT credential_audit_action_check;
ALTER TABLE credential_audit ADD CONSTRAINT credential_audit_action_check CHECK (action IN (
    'channel_created', 'channel_updated', 'channel_suspended', 'channel_activated',
    'credentials_set', 'credentials_rotated', 'credentials_validated', 'credentials_refused',
    'credentials_decrypted', 'credentials_decrypt_failed',
    'credentials_rewrapped', 'credentials_rewrap_failed', 'kek_rotated', 'kek_retired',
    'api_key_issued', 'api_key_revoked',
    'webhook_endpoint_created', 'webhook_endpoint_updated', 'webhook_endpoint_disabled',
    'webhook_endpoint_enabled', 'webhook_endpoint_deleted', 'webhook_endpoint_auto_disabled',
    'webhook_secret_rotated', 'webhook_secret_decrypt_failed', 'webhook_redelivery_requested'));

-- The notifier: reads status events (Kafka), endpoints and sealed secrets; keeps its deliveries;
-- may disable an endpoint that failed for the whole window (audited). It reads no channel
-- credentials and no payments.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mpesa_notifier') THEN
        CREATE ROLE mpesa_notifier NOLOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO mpesa_notifier', current_database());
END $$;
GRANT SELECT ON schema_migrations, webhook_endpoints, webhook_secrets TO mpesa_notifier;
GRANT UPDATE (status, disabled_reason, failing_since, updated_at) ON webhook_endpoints TO mpesa_notifier;
GRANT SELECT, INSERT, UPDATE ON webhook_deliveries TO mpesa_notifier;
GRANT SELECT, INSERT ON webhook_attempts TO mpesa_notifier;
GRANT INSERT ON credential_audit TO mpesa_notifier;
GRANT USAGE ON SEQUENCE webhook_deliveries_id_seq, webhook_attempts_id_seq, credential_audit_id_seq
    TO mpesa_notifier;

-- Onboarding manages endpoints and secrets (it seals, never opens them), reads the delivery log
-- and requeues deliveries (`webhooks redeliver`).
GRANT SELECT, INSERT, UPDATE ON webhook_endpoints, webhook_secrets TO mpesa_onboarding;
GRANT SELECT, UPDATE ON webhook_deliveries TO mpesa_onboarding;
GRANT SELECT ON webhook_attempts TO mpesa_onboarding;
