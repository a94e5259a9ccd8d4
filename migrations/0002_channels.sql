-- Channels (merchants), their Daraja credentials sealed by the vault, upstream API keys, and the
-- append-only audit of every credential write, rotation and decryption (issue #4).
-- The CHECKs mirror services/channels/model.py: a bad row cannot be written by any path.

CREATE TABLE channels (
    channel_id          text PRIMARY KEY CHECK (channel_id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    display_name        text NOT NULL CHECK (char_length(display_name) BETWEEN 1 AND 100),
    shortcode_type      text NOT NULL CHECK (shortcode_type IN ('paybill', 'till')),
    business_shortcode  text NOT NULL CHECK (business_shortcode ~ '^[0-9]{5,7}$'),
    till_number         text CHECK (till_number ~ '^[0-9]{5,7}$'),
    environment         text NOT NULL CHECK (environment IN ('sandbox', 'production')),
    status              text NOT NULL DEFAULT 'onboarding' CHECK (status IN ('onboarding', 'active', 'suspended')),
    consent_reference   text CHECK (char_length(consent_reference) BETWEEN 1 AND 128),
    consent_date        date,
    max_amount          integer CHECK (max_amount BETWEEN 1 AND 250000),
    pushes_per_second   double precision CHECK (pushes_per_second > 0 AND pushes_per_second <= 1000),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- A till pays into its till number (PartyB); a paybill has none.
    CHECK ((shortcode_type = 'till') = (till_number IS NOT NULL)),
    -- The merchant's signed consent is a reference and a date, both or neither...
    CHECK ((consent_reference IS NULL) = (consent_date IS NULL)),
    -- ...and no channel takes payments without it.
    CHECK (status <> 'active' OR consent_reference IS NOT NULL)
);

-- One row per credential version; never updated except to re-wrap the data key (KEK rotation).
-- The plaintext never reaches the database: ciphertext is AES-256-GCM under a per-row data key,
-- wrapped_key is that data key sealed to the KEK `key_id`; both bind (channel_id, version).
CREATE TABLE channel_credentials (
    channel_id    text NOT NULL REFERENCES channels (channel_id),
    version       integer NOT NULL CHECK (version >= 1),
    key_id        text NOT NULL,
    wrapped_key   bytea NOT NULL,
    nonce         bytea NOT NULL CHECK (octet_length(nonce) = 12),
    ciphertext    bytea NOT NULL,
    fingerprint   text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{16}$'),
    app_key_id    text NOT NULL,  -- services.daraja.models.AppCredentials.key_id, as the Daraja client logs it
    validated_at  timestamptz,    -- when Daraja issued a token for these credentials, if asked to check
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL,
    PRIMARY KEY (channel_id, version)
);
CREATE INDEX channel_credentials_key_id ON channel_credentials (key_id);

-- Upstream API keys: only a SHA-256 of the key is kept (keys are 256-bit random, so a fast hash is
-- enough); key_id is the public part of the key, used to find the row.
CREATE TABLE api_keys (
    key_id       text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{12}$'),
    key_sha256   bytea NOT NULL UNIQUE CHECK (octet_length(key_sha256) = 32),
    label        text NOT NULL CHECK (char_length(label) BETWEEN 1 AND 100),
    channel_ids  text[] NOT NULL CHECK (cardinality(channel_ids) BETWEEN 1 AND 100),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,
    revoked_at   timestamptz,
    revoked_by   text,
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);

-- Who did what to which credential, when, and which version: never the secret itself.
CREATE TABLE credential_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL CHECK (char_length(actor) BETWEEN 1 AND 200),
    action      text NOT NULL CHECK (action IN (
                    'channel_created', 'channel_updated', 'channel_suspended', 'channel_activated',
                    'credentials_set', 'credentials_rotated', 'credentials_validated', 'credentials_refused',
                    'credentials_decrypted', 'credentials_decrypt_failed',
                    'credentials_rewrapped', 'credentials_rewrap_failed', 'kek_rotated', 'kek_retired',
                    'api_key_issued', 'api_key_revoked')),
    channel_id  text,
    version     integer,
    kek_id      text,
    api_key_id  text,
    detail      text
);
CREATE INDEX credential_audit_channel ON credential_audit (channel_id, id);

CREATE FUNCTION credential_audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credential_audit is append-only';
END $$;
CREATE TRIGGER credential_audit_no_update_or_delete BEFORE UPDATE OR DELETE ON credential_audit
    FOR EACH ROW EXECUTE FUNCTION credential_audit_is_append_only();
CREATE TRIGGER credential_audit_no_truncate BEFORE TRUNCATE ON credential_audit
    FOR EACH STATEMENT EXECUTE FUNCTION credential_audit_is_append_only();
