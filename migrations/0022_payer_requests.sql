-- Subject access and erasure requests (`mpesa-pipeline payers export|erase`, POST /admin/payers/…):
-- who asked what, when and why, naming the payer only by their keyed pseudonym (Pseudonyms.phone),
-- never the number, so the record of an erasure holds nothing the erasure removed. Append-only, like
-- the audit trail.
CREATE TABLE payer_requests (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('export', 'erase')),
    payer_pseudonym text NOT NULL CHECK (payer_pseudonym ~ '^ph_[0-9a-f]{32}$'),
    channel_id      text,
    actor           text NOT NULL CHECK (char_length(actor) BETWEEN 1 AND 200),
    reason          text CHECK (char_length(reason) <= 500),
    payments        integer NOT NULL CHECK (payments >= 0),
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payer_requests_payer ON payer_requests (payer_pseudonym, at);

CREATE FUNCTION payer_requests_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payer_requests is append-only';
END $$;
CREATE TRIGGER payer_requests_no_change BEFORE UPDATE OR DELETE ON payer_requests
    FOR EACH ROW EXECUTE FUNCTION payer_requests_append_only();
CREATE TRIGGER payer_requests_no_truncate BEFORE TRUNCATE ON payer_requests
    FOR EACH STATEMENT EXECUTE FUNCTION payer_requests_append_only();

GRANT SELECT, INSERT ON payer_requests TO mpesa_privacy;
-- A payer's export shows everything held about them: whole payments rows, callback bodies and
-- parked payloads (the retention alone reads only the columns 0021 names).
GRANT SELECT ON payments, callback_bodies, parked_facts TO mpesa_privacy;
GRANT USAGE ON SEQUENCE payer_requests_id_seq TO mpesa_privacy;
-- What an export lists and an erasure scrubs beyond the payment itself: the webhook bodies sent
-- about the payer's payments (they carried the CheckoutRequestID, whose tail is the payer's number).
GRANT SELECT ON webhook_deliveries TO mpesa_privacy;
GRANT UPDATE (body) ON webhook_deliveries TO mpesa_privacy;
-- The ingress's idempotency records keep a payment's account and order references: an erasure
-- gives them the scrubbed payment's.
GRANT SELECT ON ingress_requests TO mpesa_privacy;
GRANT UPDATE (account_reference, order_reference) ON ingress_requests TO mpesa_privacy;
