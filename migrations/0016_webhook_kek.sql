-- Rotating the notifier's key-encryption key (`mpesa-pipeline vault rotate-kek --webhooks`) re-wraps
-- webhook signing secrets as a credentials rotation re-wraps credentials, and audits each row the
-- same way (webhook_endpoint_id names the endpoint). The list is 0014's with the two new actions.
ALTER TABLE credential_audit DROP CONSTRAINT credential_audit_action_check;
ALTER TABLE credential_audit ADD CONSTRAINT credential_audit_action_check CHECK (action IN (
    'channel_created', 'channel_updated', 'channel_suspended', 'channel_activated',
    'credentials_set', 'credentials_rotated', 'credentials_validated', 'credentials_refused',
    'credentials_decrypted', 'credentials_decrypt_failed',
    'credentials_rewrapped', 'credentials_rewrap_failed', 'kek_rotated', 'kek_retired',
    'api_key_issued', 'api_key_revoked',
    'webhook_endpoint_created', 'webhook_endpoint_updated', 'webhook_endpoint_disabled',
    'webhook_endpoint_enabled', 'webhook_endpoint_deleted', 'webhook_endpoint_auto_disabled',
    'webhook_secret_rotated', 'webhook_secret_decrypt_failed', 'webhook_redelivery_requested',
    'webhook_secret_rewrapped', 'webhook_secret_rewrap_failed'));
