# One image for every service; compose.yaml picks the module to run.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY schemas ./schemas
COPY migrations ./migrations
# `app` runs every service but the STK worker and the notifier; `stk` runs the STK worker and alone
# owns /vault, the private key-encryption key of Daraja credentials (compose.yaml); `notifier` alone
# owns /webhooks-vault, the one of webhook signing secrets. The public halves go to the -public
# directories, for onboarding.
RUN pip install --no-cache-dir -e . \
 && useradd --system --no-create-home app \
 && useradd --system --no-create-home stk \
 && useradd --system --no-create-home notifier \
 && mkdir /vault /vault-public && chown stk /vault /vault-public && chmod 700 /vault && chmod 755 /vault-public \
 && mkdir /webhooks-vault /webhooks-vault-public && chown notifier /webhooks-vault /webhooks-vault-public \
 && chmod 700 /webhooks-vault && chmod 755 /webhooks-vault-public
# The audit anchor key's volume: only the audit-anchor service mounts it (compose.yaml).
RUN mkdir /audit && chown app /audit && chmod 700 /audit
USER app
