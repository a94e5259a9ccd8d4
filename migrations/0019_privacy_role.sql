-- The privacy role (docs/data-protection.md): the retention of payers' data and the erasure and
-- access commands log in as `privacy`, a member of this group. Its grants come with the migrations
-- of the tables it works on; it never writes a payment's state, amount, receipt or times.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mpesa_privacy') THEN
        CREATE ROLE mpesa_privacy NOLOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO mpesa_privacy', current_database());
END $$;
GRANT SELECT ON schema_migrations TO mpesa_privacy;
