-- The notifier's poller and backlog gauge, per endpoint (services/notifier/store.py): due pending
-- deliveries are found endpoint by endpoint, so the rows of a disabled endpoint (they wait, pending,
-- for `enable`) are never walked through again at every poll, and one endpoint's backlog cannot
-- fill a whole claim. created_at is included for the age of the oldest undelivered one.
CREATE INDEX webhook_deliveries_endpoint_due ON webhook_deliveries (endpoint_id, next_attempt_at)
    INCLUDE (created_at) WHERE state = 'pending';
