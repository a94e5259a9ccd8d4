-- The retention of payers' data (services/privacy): after a channel's retention period from its final
-- state, a payment's payer data is replaced by a keyed pseudonym and its raw callbacks are dropped;
-- erasure on a payer's request replaces it by a random pseudonym. The money record stays as it was.

-- A payment may hold a pseudonym (services/common/pseudonyms.py) where the payer's number was.
ALTER TABLE payments DROP CONSTRAINT payment_shape,
    ADD CONSTRAINT payment_shape CHECK (state = 'Failed' OR (amount > 0
        AND (phone ~ '^254[17][0-9]{8}$' OR phone ~ '^ph_[0-9a-f]{32}$')
        AND char_length(account_reference) BETWEEN 1 AND 12 AND coalesce(char_length(description), 0) <= 13)),
    ADD COLUMN payer_data text NOT NULL DEFAULT 'kept' CHECK (payer_data IN ('kept', 'pseudonymised', 'erased')),
    ADD COLUMN payer_data_changed_at timestamptz,
    -- Once replaced, only a pseudonym stands where the number was.
    ADD CONSTRAINT payer_data_replaced CHECK (payer_data = 'kept'
        OR (phone ~ '^ph_[0-9a-f]{32}$' AND payer_data_changed_at IS NOT NULL));
-- The retention's search: a channel's final payments still holding payer data, oldest first.
CREATE INDEX payments_payer_data_due ON payments (channel_id, final_at)
    WHERE payer_data = 'kept' AND final_at IS NOT NULL;

-- Days after a payment's final state that its payer data is kept; null: PAYER_DATA_RETENTION_DAYS.
ALTER TABLE channels ADD COLUMN payer_data_retention_days int
    CHECK (payer_data_retention_days BETWEEN 1 AND 3650);

-- The privacy role reads what it decides on and writes only the payer's data: never a payment's
-- state, amount, receipt, CheckoutRequestID, times or result codes, nor the audit trail.
GRANT SELECT (payment_id, channel_id, state, final_at, phone, account_reference, order_reference, payer_data,
              checkout_request_id, candidate_checkout_request_id, review_reason, contradiction)
    ON payments TO mpesa_privacy;
-- Daraja's CheckoutRequestIDs end in the payer's number: they become their keyed pseudonyms too.
GRANT UPDATE (phone, account_reference, description, metadata, order_reference, payer_data, payer_data_changed_at,
              checkout_request_id, candidate_checkout_request_id, review_reason, contradiction)
    ON payments TO mpesa_privacy;
GRANT SELECT (payment_id, checkout_request_id), UPDATE (checkout_request_id) ON stk_push_claims TO mpesa_privacy;
GRANT SELECT (channel_id, payer_data_retention_days) ON channels TO mpesa_privacy;
GRANT SELECT (payment_id), DELETE ON callback_bodies, parked_facts TO mpesa_privacy;
-- The ingress's idempotency record repeats the references and a digest of the body with the phone.
GRANT SELECT (payment_id), UPDATE (account_reference, order_reference, body_sha256)
    ON ingress_requests TO mpesa_privacy;
