-- The ledger's payments and the events it has applied (exactly-once effect, design.md).
CREATE TABLE payments (
    payment_id          text PRIMARY KEY,
    channel_id          text NOT NULL,
    state               text NOT NULL CHECK (state IN ('Requested', 'Pending', 'Settled', 'Cancelled', 'Failed', 'Review')),
    amount              bigint NOT NULL CHECK (amount > 0),
    phone               text NOT NULL CHECK (phone ~ '^254[17][0-9]{8}$'),
    account_reference   text NOT NULL CHECK (char_length(account_reference) BETWEEN 1 AND 12),
    description         text CHECK (char_length(description) <= 13),
    order_reference     text,
    metadata            jsonb NOT NULL DEFAULT '{}',
    merchant_request_id text,
    checkout_request_id text UNIQUE,
    mpesa_receipt       text UNIQUE,
    transaction_time    timestamptz,
    result_code         text,
    result_desc         text,
    requested_at        timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- A settled payment always has its receipt; a pending one its CheckoutRequestID.
    CHECK (state <> 'Settled' OR mpesa_receipt IS NOT NULL),
    CHECK (state <> 'Pending' OR checkout_request_id IS NOT NULL)
);
CREATE INDEX payments_channel_state ON payments (channel_id, state);

CREATE TABLE payment_history (
    id          bigserial PRIMARY KEY,
    payment_id  text NOT NULL REFERENCES payments (payment_id),
    state       text NOT NULL,
    previous    text,
    reason      text,
    event_id    uuid NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_history_payment ON payment_history (payment_id, id);

-- One row per consumed event whose effect is committed; written in the same transaction.
CREATE TABLE processed_events (
    event_id     uuid PRIMARY KEY,
    topic        text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
