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
USER app
