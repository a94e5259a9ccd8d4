-- Least privilege (docs/database-roles.md): the schema's owner (the role that runs these migrations)
-- is the only one that can alter, truncate or delete; each service gets what its SQL uses, through a
-- NOLOGIN group role. Login roles are made where the cluster is run (infra/postgres.sh, compose's
-- init script), each a member of one group, so passwords and rotation stay out of the schema.
-- Grants are per table, never per column (one exception, below): columns added later need no new
-- grant; a table added later needs its own in its migration.

-- The groups usually exist already (made by the cluster's scripts with the login roles); made here
-- otherwise, which needs CREATEROLE.
DO $$
DECLARE
    g text;
BEGIN
    FOREACH g IN ARRAY ARRAY['mpesa_ingress', 'mpesa_stk_worker', 'mpesa_ledger', 'mpesa_onboarding', 'mpesa_auditor']
    LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = g) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', g);
        END IF;
    END LOOP;
END $$;

-- Only the service roles connect; only the ledger makes temporary tables (its COPY staging table).
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO mpesa_ingress, mpesa_stk_worker, mpesa_ledger, '
                   'mpesa_onboarding, mpesa_auditor', current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO mpesa_ledger', current_database());
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;  -- PostgreSQL 15 does this already; older ones do not
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM PUBLIC;

-- Every service checks at start that the schema is at the version its code needs.
GRANT SELECT ON schema_migrations TO mpesa_ingress, mpesa_stk_worker, mpesa_ledger, mpesa_onboarding, mpesa_auditor;

-- Ingress: its idempotency records; reads payments for GET, API keys and channels to authorise.
GRANT SELECT, INSERT, UPDATE ON ingress_requests TO mpesa_ingress;
GRANT SELECT ON payments, payment_history, channels, api_keys TO mpesa_ingress;
-- The channel lookup shows a channel's newest credential version, never the sealed secret: the
-- one grant by column.
GRANT SELECT (channel_id, version, key_id, fingerprint, app_key_id, validated_at, created_at, created_by)
    ON channel_credentials TO mpesa_ingress;

-- STK worker: its push claims; reads channels and sealed credentials; audits each decryption.
GRANT SELECT, INSERT, UPDATE ON stk_push_claims TO mpesa_stk_worker;
GRANT SELECT ON channels, channel_credentials TO mpesa_stk_worker;
GRANT INSERT ON credential_audit TO mpesa_stk_worker;
GRANT USAGE ON SEQUENCE credential_audit_id_seq TO mpesa_stk_worker;

-- Ledger. UPDATE on outbox only because the relay's SELECT ... FOR UPDATE needs it; DELETE on
-- processed_events for the retention, on parked_facts once applied, on outbox once published.
GRANT SELECT, INSERT, UPDATE ON payments TO mpesa_ledger;
GRANT SELECT, INSERT ON payment_history, audit_log TO mpesa_ledger;
GRANT SELECT, INSERT, DELETE ON processed_events, parked_facts TO mpesa_ledger;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO mpesa_ledger;
GRANT USAGE ON SEQUENCE payment_history_id_seq, outbox_id_seq TO mpesa_ledger;

-- Onboarding (the onboarding API and the channels, keys and vault commands).
GRANT SELECT, INSERT, UPDATE ON channels, channel_credentials, api_keys TO mpesa_onboarding;
GRANT INSERT ON credential_audit TO mpesa_onboarding;
GRANT USAGE ON SEQUENCE credential_audit_id_seq TO mpesa_onboarding;

-- Anchors of the audit chain's head (services/ledger/anchors.py): each signed by a key the ledger
-- does not hold, written by the auditor role alone, never changed. An anchor whose row's hash
-- differs later proves the chain was rewritten, even with every hash recomputed after the edit.
CREATE TABLE audit_anchors (
    id          bigserial PRIMARY KEY,
    audit_seq   bigint NOT NULL CHECK (audit_seq >= 1),
    audit_hash  text NOT NULL CHECK (audit_hash ~ '^[0-9a-f]{64}$'),
    anchored_at timestamptz NOT NULL,
    key_id      text NOT NULL CHECK (key_id ~ '^[0-9a-f]{16}$'),
    signature   bytea NOT NULL CHECK (octet_length(signature) = 64)
);
CREATE INDEX audit_anchors_seq ON audit_anchors (audit_seq);

GRANT SELECT ON audit_log TO mpesa_auditor;
GRANT SELECT, INSERT ON audit_anchors TO mpesa_auditor;
GRANT USAGE ON SEQUENCE audit_anchors_id_seq TO mpesa_auditor;

-- The ledger may append: a row below 1 would sit outside every verification (they walk up from 1).
ALTER TABLE audit_log ADD CONSTRAINT audit_log_seq_positive CHECK (seq >= 1);

-- Append-only, for the owner too unless it first drops or disables the trigger (an ALTER that only
-- the owner can make). Row triggers do not fire on TRUNCATE: a statement trigger covers it.
CREATE FUNCTION refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_change();
CREATE TRIGGER audit_anchors_no_change BEFORE UPDATE OR DELETE ON audit_anchors
    FOR EACH ROW EXECUTE FUNCTION refuse_audit_change();
CREATE TRIGGER audit_anchors_no_truncate BEFORE TRUNCATE ON audit_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_change();
