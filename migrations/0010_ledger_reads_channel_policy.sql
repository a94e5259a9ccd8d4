-- The ledger reads one setting of a channel: whether every success callback must be confirmed by an
-- STK query before Settled (0008, services/ledger/policies.py). A column grant, not the table: the
-- ledger has no business with a channel's shortcode, status or consent.
GRANT SELECT (channel_id, confirm_success_by_query) ON channels TO mpesa_ledger;
