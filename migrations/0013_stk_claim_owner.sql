-- Who holds a push claim, and whether that process still lives (docs/stk-worker.md).
-- A claim still 'claimed' is waited on while its owner's heartbeat advances; only a claim whose
-- owner stopped beating is an outcome-unknown push. 'released': a push stopped before it was sent
-- (SIGTERM during a wait), which the next owner may push: nothing reached Daraja.
CREATE TABLE stk_worker_instances (
    instance_id text PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    beats       bigint NOT NULL DEFAULT 0,
    beat_at     timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE stk_push_claims ADD COLUMN owner text;
ALTER TABLE stk_push_claims DROP CONSTRAINT stk_push_claims_status_check;
ALTER TABLE stk_push_claims ADD CONSTRAINT stk_push_claims_status_check
    CHECK (status IN ('claimed', 'accepted', 'refused', 'unknown', 'invalid', 'released'));
-- An accepted push always carries Daraja's CheckoutRequestID: the query sweep needs it.
ALTER TABLE stk_push_claims ADD CONSTRAINT stk_push_claims_accepted_has_checkout
    CHECK (status <> 'accepted' OR checkout_request_id IS NOT NULL) NOT VALID;

GRANT SELECT, INSERT, UPDATE ON stk_worker_instances TO mpesa_stk_worker;
