-- Daraja's access tokens, shared by the STK worker processes (docs/scaling.md, "Daraja's tokens"):
-- each new token of an app invalidates the one before (docs/daraja.md §1), so several workers each
-- minting their own would keep refusing each other's. One row per app (credentials), the token sealed
-- with the vault's key as channel credentials are, and the app named by a digest of its key and
-- secret: no credential here is readable without the vault. A row is replaced when its token is
-- refused or near its expiry; the row of an app no longer used stays, its token expired within the hour.
CREATE TABLE daraja_tokens (
    app         text PRIMARY KEY CHECK (app ~ '^[0-9a-f]{64}$'),
    key_id      text NOT NULL,
    wrapped_key bytea NOT NULL,
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL,
    expires_at  timestamptz NOT NULL,
    minted_at   timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON daraja_tokens TO mpesa_stk_worker;
