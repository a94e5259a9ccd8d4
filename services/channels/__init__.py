"""Channels: the merchants we act for, their Daraja credentials (encrypted), upstream API keys and
webhook endpoints.

model.py        pure: the Channel record and the validation of every onboarding input
vault.py        pure crypto: envelope encryption of credentials, key providers (local key file)
repository.py   the SQL, one function per statement group; callers own the transaction
onboarding.py   the operations the admin API and the command line share
credentials.py  the read side for the STK worker: decrypt once, cache, audit each decryption
rotation.py     re-wrapping every data key under a new key-encryption key
compliance.py   the compliance report: agreement, consent, credential age, retention, last erasure
apikeys.py      upstream API keys: issue (shown once), store hashed, authenticate with a cache
webhook_model.py          pure: validation of webhook endpoint management input, and its limits
webhook_repository.py     the SQL of webhook endpoints, their sealed secrets and the delivery log
webhooks.py     webhook endpoint operations: add, change, disable, delete, rotate secrets, redeliver
api.py          the onboarding HTTP API under /admin/ (python -m services.channels)
cli.py          `mpesa-pipeline channels|keys|webhooks|vault|admin-token ...`
"""
