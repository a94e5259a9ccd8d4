-- An endpoint's failing run is continuous only while its failures follow each other closely: the time
-- of its latest failed attempt (kept to the minute) lets the notifier start a new run after a quiet
-- spell, so that one failure days ago and one now do not count as days of failing (which disables
-- the endpoint, and the events of a disabled endpoint are not queued for it).
ALTER TABLE webhook_endpoints ADD COLUMN last_failed_at timestamptz;
GRANT UPDATE (last_failed_at) ON webhook_endpoints TO mpesa_notifier;
