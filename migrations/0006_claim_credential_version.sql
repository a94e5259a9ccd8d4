-- The credential version a push used, so its later STK queries use the same app even after a rotation.
ALTER TABLE stk_push_claims ADD COLUMN credential_version int;
