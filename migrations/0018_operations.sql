-- Operations (the review desk, statements): who acted in the audit trail, the callbacks behind each
-- payment, and what the desk's searches need.

-- Who gave an instruction the ledger applied (an operator's resolution or query); null for the facts
-- the services report. It is part of the hashed entry only when set, so older rows keep their hashes
-- (services/ledger/store.py).
ALTER TABLE audit_log ADD COLUMN actor text CHECK (char_length(actor) BETWEEN 1 AND 200);

-- Every callback the ledger decided for a payment, as Daraja (or whoever posted it) sent it: the
-- evidence an operator reviews. Raw bodies hold the payer's phone number: personal data, dropped by
-- the retention of payers' data.
CREATE TABLE callback_bodies (
    event_id    uuid PRIMARY KEY,
    payment_id  text NOT NULL,
    received_at timestamptz NOT NULL,
    verdict     text NOT NULL,
    body        text NOT NULL CHECK (octet_length(body) <= 65536)
);
CREATE INDEX callback_bodies_payment ON callback_bodies (payment_id, received_at);

-- The desk's searches: payments over time (of a channel or all), by order reference, by phone.
CREATE INDEX payments_channel_requested ON payments (channel_id, requested_at);
CREATE INDEX payments_requested ON payments (requested_at, payment_id);  -- a search over every channel
CREATE INDEX payments_order_reference ON payments (order_reference) WHERE order_reference IS NOT NULL;
CREATE INDEX payments_phone ON payments (phone);

GRANT SELECT, INSERT ON callback_bodies TO mpesa_ledger;
-- The admin API and the payments and reports commands read payments with everything behind them;
-- they change nothing there: an operator's resolution reaches the ledger as an event.
GRANT SELECT ON payments, payment_history, audit_log, callback_bodies TO mpesa_onboarding;
