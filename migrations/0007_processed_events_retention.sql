-- The ledger forgets processed-event ids once Kafka can no longer redeliver their events
-- (services/ledger/retention.py). Rows are appended in processed_at order, so a BRIN index finds
-- the old ones at a few pages' cost, where a B-tree would add a write to every event.
CREATE INDEX processed_events_processed_at ON processed_events USING brin (processed_at);
