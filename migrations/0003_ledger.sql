-- Ledger: reconciliation bookkeeping, early facts, the hash-chained audit trail and the outbox.

-- A request produced straight to the topic may be invalid; it is kept as Failed with its reason,
-- so the payment-shape checks apply to every other state only.
ALTER TABLE payments DROP CONSTRAINT payments_amount_check,
                     DROP CONSTRAINT payments_phone_check,
                     DROP CONSTRAINT payments_account_reference_check,
                     DROP CONSTRAINT payments_description_check;
ALTER TABLE payments
    ADD CONSTRAINT payment_shape CHECK (state = 'Failed' OR (amount > 0 AND phone ~ '^254[17][0-9]{8}$'
        AND char_length(account_reference) BETWEEN 1 AND 12 AND coalesce(char_length(description), 0) <= 13)),
    -- The STK query confirms payment without a receipt number (daraja.md §4).
    DROP CONSTRAINT payments_check,
    ADD CONSTRAINT settled_has_proof CHECK (state <> 'Settled' OR mpesa_receipt IS NOT NULL OR result_code = '0'),
    ADD COLUMN push_unknown    boolean NOT NULL DEFAULT false,
    ADD COLUMN pending_since   timestamptz,
    ADD COLUMN next_query_at   timestamptz,
    ADD COLUMN query_attempts  int NOT NULL DEFAULT 0,
    ADD COLUMN review_reason   text;
CREATE INDEX payments_to_reconcile ON payments (next_query_at) WHERE state IN ('Requested', 'Pending');

-- Facts that arrived before their payment; applied when it appears (nothing is dropped for being early).
CREATE TABLE parked_facts (
    event_id   uuid PRIMARY KEY,
    payment_id text NOT NULL,
    topic      text NOT NULL,
    payload    bytea NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_facts_payment ON parked_facts (payment_id, parked_at);

-- Append-only and hash-chained: each row's hash covers its content and the previous row's hash.
CREATE TABLE audit_log (
    seq         bigint PRIMARY KEY,
    payment_id  text NOT NULL,
    event_id    uuid,
    fact        text NOT NULL,
    verdict     text NOT NULL,
    from_state  text,
    to_state    text,
    detail      text NOT NULL DEFAULT '',
    at          timestamptz NOT NULL,
    prev_hash   text NOT NULL,
    hash        text NOT NULL
);
CREATE INDEX audit_log_payment ON audit_log (payment_id, seq);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

-- Status events written with their transition, published after commit by the relay.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    key        bytea NOT NULL,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
