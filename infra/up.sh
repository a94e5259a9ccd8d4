#!/usr/bin/env bash
# Start local PostgreSQL, Kafka and the schema registry. Stdout is only the env lines (works as a
# .env file or with eval); progress goes to stderr.   Usage: infra/up.sh [> .env]
# The Kafka lines log a client in as the admin principal (tests, tools); its password stays in its
# file (KAFKA_CLIENT_SASL_PASSWORD_FILE). `infra/kafka.sh env <principal>` prints a service's lines.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
# First: if a tool cannot be had (not root and no kcat or prometheus, no Maven), say so before starting anything.
"$here/tools.sh" install >&2   # kcat and avro-tools, to read the topics (README); promtool, for the alert rules
"$here/postgres.sh" start >&2
"$here/kafka.sh" start >&2
"$here/registry.sh" start >&2
"$here/kafka.sh" env admin
"$here/registry.sh" env
# The migration role's URL; each service's is the same with its own role (infra/postgres.sh url ROLE).
# No password in it: libpq reads it from PGPASSFILE.
echo "DATABASE_URL=$("$here/postgres.sh" url)"
echo "PGPASSFILE=$("$here/postgres.sh" passfile)"
