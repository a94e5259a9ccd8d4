# One image for every service; compose.yaml picks the module to run.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY schemas ./schemas
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . \
 && useradd --system --no-create-home app \
 && mkdir /vault && chown app /vault && chmod 700 /vault
# The audit anchor key's volume: only the audit-anchor service mounts it (compose.yaml).
RUN mkdir /audit && chown app /audit && chmod 700 /audit
USER app
