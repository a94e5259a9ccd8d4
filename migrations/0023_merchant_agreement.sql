-- The merchant agreement (docs/data-protection.md, "The merchant agreement"): each merchant is the
-- controller of its payers' data and we process it on its behalf, under a signed processing
-- agreement. A channel records the agreement's reference and version, the day it was signed and the
-- lawful basis the merchant relies on (the Data Protection Act 2019, s.30). The CHECKs mirror
-- services/channels/model.py.
ALTER TABLE channels
    ADD COLUMN agreement_reference text CHECK (char_length(agreement_reference) BETWEEN 1 AND 128),
    ADD COLUMN agreement_version   text CHECK (char_length(agreement_version) BETWEEN 1 AND 32),
    ADD COLUMN agreement_signed_on date,
    ADD COLUMN lawful_basis        text CHECK (lawful_basis IN ('consent', 'contract', 'legal_obligation',
                                                                'vital_interests', 'public_interest',
                                                                'legitimate_interests'));

-- No channel becomes active without a complete agreement, and an active channel cannot lose it.
-- A trigger, not a CHECK: channels active before this migration have none, and they keep taking
-- payments (and may still be edited) until their next activation; `channels compliance` flags them.
CREATE FUNCTION channels_agreement_before_activation() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    recorded integer := num_nonnulls(NEW.agreement_reference, NEW.agreement_version, NEW.agreement_signed_on,
                                     NEW.lawful_basis);
BEGIN
    IF NEW.status = 'active' AND recorded < 4 AND (TG_OP = 'INSERT' OR OLD.status <> 'active'
            OR recorded < num_nonnulls(OLD.agreement_reference, OLD.agreement_version, OLD.agreement_signed_on,
                                       OLD.lawful_basis)) THEN
        RAISE EXCEPTION 'channel % cannot be active without its processing agreement', NEW.channel_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER channels_agreement_before_activation BEFORE INSERT OR UPDATE ON channels
    FOR EACH ROW EXECUTE FUNCTION channels_agreement_before_activation();

-- `channels compliance` reads when each channel's payers last had their data erased. The table comes
-- with the erasure commands' migration (0022); the grant is given where that table exists.
DO $$
BEGIN
    IF to_regclass('payer_requests') IS NOT NULL THEN
        GRANT SELECT ON payer_requests TO mpesa_onboarding;
    END IF;
END $$;
