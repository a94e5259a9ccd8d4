-- The STK worker's durable claim: at most one push per payment, ever (design.md, Guarantees).
-- A row in state 'claimed' whose worker died is an outcome-unknown push: never pushed again.
CREATE TABLE stk_push_claims (
    payment_id          text PRIMARY KEY,
    channel_id          text NOT NULL,
    status              text NOT NULL CHECK (status IN ('claimed', 'accepted', 'refused', 'unknown', 'invalid')),
    merchant_request_id text,
    checkout_request_id text,
    error_code          text,
    error_message       text,
    attempts            int NOT NULL DEFAULT 0,
    claimed_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);
