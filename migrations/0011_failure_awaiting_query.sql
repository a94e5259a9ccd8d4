-- A failure callback after an unknown push outcome is confirmed by an STK query before it cancels
-- the payment, as a success is (docs/callback-proof.md): nothing else proves its CheckoutRequestID.
-- While the query runs, the candidate holds the callback's CheckoutRequestID and its result code
-- (a success candidate holds a receipt instead; never both).
ALTER TABLE payments
    ADD COLUMN candidate_result_code text CHECK (candidate_result_code <> '0'),
    DROP CONSTRAINT candidate_is_whole,
    ADD CONSTRAINT candidate_is_whole CHECK (
        (candidate_checkout_request_id IS NULL) = (candidate_receipt IS NULL AND candidate_result_code IS NULL)
        AND (candidate_receipt IS NULL OR candidate_result_code IS NULL)),
    ADD CONSTRAINT failure_candidate_only_while_open
        CHECK (candidate_result_code IS NULL OR state IN ('Requested', 'Pending', 'Review'));
