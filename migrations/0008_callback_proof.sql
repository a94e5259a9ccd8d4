-- A success callback must prove itself (issue #11, docs/callback-proof.md).

ALTER TABLE payments
    -- When the payment became Settled, Cancelled or Failed: callbacks expire some time after.
    ADD COLUMN final_at                      timestamptz,
    -- How the callback's phone number compared with the payment's; never the number itself.
    ADD COLUMN phone_check                   text CHECK (phone_check IN ('match', 'mismatch', 'unverifiable')),
    -- A proven success awaiting the STK query that confirms it (kept in Review as evidence).
    ADD COLUMN candidate_receipt             text CHECK (candidate_receipt ~ '^[A-Z0-9]{10}$'),
    ADD COLUMN candidate_checkout_request_id text,
    ADD COLUMN candidate_transaction_time    timestamptz,
    -- A success with its proof after Cancelled or Failed: money moved (the payment is in Review).
    ADD COLUMN late_receipt                  text CHECK (late_receipt ~ '^[A-Z0-9]{10}$'),
    -- The last contradiction recorded on a final payment that it did not move (all are audited).
    ADD COLUMN contradiction                 text,
    ADD CONSTRAINT candidate_is_whole CHECK ((candidate_receipt IS NULL) = (candidate_checkout_request_id IS NULL)),
    ADD CONSTRAINT candidate_only_while_open
        CHECK (candidate_receipt IS NULL OR state IN ('Requested', 'Pending', 'Review')),
    -- Rows settled under the old rules are not re-checked; every new write is.
    ADD CONSTRAINT settled_names_its_push CHECK (state <> 'Settled' OR checkout_request_id IS NOT NULL) NOT VALID;

UPDATE payments SET final_at = updated_at WHERE state IN ('Settled', 'Cancelled', 'Failed');

-- One receipt proves one payment, whichever column holds it.
CREATE INDEX payments_candidate_receipt ON payments (candidate_receipt) WHERE candidate_receipt IS NOT NULL;
CREATE INDEX payments_late_receipt ON payments (late_receipt) WHERE late_receipt IS NOT NULL;
CREATE INDEX payments_candidate_checkout ON payments (candidate_checkout_request_id)
    WHERE candidate_checkout_request_id IS NOT NULL;

-- Per channel: every success is confirmed by an STK query before Settled (the authenticated channel).
ALTER TABLE channels ADD COLUMN confirm_success_by_query boolean NOT NULL DEFAULT false;
