-- STAND-IN UNTIL P2 MERGES (issue #17): the retention part's migration 0021 replaces this file. Only
-- what services/privacy/scrub.py's stand-in needs: a scrubbed payment's phone is a keyed pseudonym
-- (ph_ + 32 hex), the payment records when and how its payer data changed, and the privacy role may
-- rewrite the payer's fields and drop the raw bodies (never a state, amount, receipt or time).
ALTER TABLE payments DROP CONSTRAINT payment_shape,
    ADD CONSTRAINT payment_shape CHECK (state = 'Failed' OR (amount > 0
        AND (phone ~ '^254[17][0-9]{8}$' OR phone ~ '^ph_[0-9a-f]{32}$')
        AND char_length(account_reference) BETWEEN 1 AND 12 AND coalesce(char_length(description), 0) <= 13)),
    ADD COLUMN payer_data            text CHECK (payer_data IN ('pseudonymised', 'erased')),
    ADD COLUMN payer_data_changed_at timestamptz;
GRANT SELECT ON payments, callback_bodies, parked_facts TO mpesa_privacy;
GRANT UPDATE (phone, account_reference, description, metadata, order_reference, payer_data, payer_data_changed_at)
    ON payments TO mpesa_privacy;
GRANT DELETE ON callback_bodies, parked_facts TO mpesa_privacy;
