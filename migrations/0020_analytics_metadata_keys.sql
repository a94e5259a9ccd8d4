-- The metadata keys a channel lets the status topic (analytics) carry: none by default, so a
-- merchant's metadata, which may name or reach a payer, stays out of analytics unless the merchant
-- lists the keys that are safe to share (services/channels/model.py analyticsMetadataKeys).
ALTER TABLE channels ADD COLUMN analytics_metadata_keys text[] NOT NULL DEFAULT '{}'
    CHECK (cardinality(analytics_metadata_keys) <= 20);
-- The ledger reads it with its other setting (0010): a column grant, as there.
GRANT SELECT (analytics_metadata_keys) ON channels TO mpesa_ledger;
