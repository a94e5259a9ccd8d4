# One image for every service; compose.yaml builds it once (by image name) and picks the module to run.
# Stage 1 builds the wheel: the image installs the package as users would, not the source tree.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY schemas ./schemas
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# `app` runs every service but the STK worker and the notifier; `stk` runs the STK worker and alone
# owns /vault, the private key-encryption key of Daraja credentials (compose.yaml); `notifier` alone
# owns /webhooks-vault, the one of webhook signing secrets. The public halves go to the -public
# directories, for onboarding.
RUN useradd --system --no-create-home app \
 && useradd --system --no-create-home stk \
 && useradd --system --no-create-home notifier \
 && mkdir /vault /vault-public && chown stk /vault /vault-public && chmod 700 /vault && chmod 755 /vault-public \
 && mkdir /webhooks-vault /webhooks-vault-public && chown notifier /webhooks-vault /webhooks-vault-public \
 && chmod 700 /webhooks-vault && chmod 755 /webhooks-vault-public
# The audit anchor key's volume: only the audit-anchor service mounts it (compose.yaml).
RUN mkdir /audit && chown app /audit && chmod 700 /audit
# The pseudonym key's volume (the ledger makes the key on first start; compose.yaml).
RUN mkdir /pseudonyms && chown app /pseudonyms && chmod 700 /pseudonyms
# Dependencies before the code, from pyproject.toml alone: this layer is rebuilt only when it changes,
# not on every change to the code.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt
# The package itself (schemas and migrations are its package data); no source tree in the image.
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && pip check && rm -rf /wheels
WORKDIR /app
USER app
