#!/usr/bin/env bash
# Stop the local schema registry, Kafka and PostgreSQL (data in .local/ is kept).
# Tries each even if one fails.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
rc=0
"$here/registry.sh" stop || rc=1
"$here/kafka.sh" stop || rc=1
"$here/postgres.sh" stop || rc=1
exit "$rc"
