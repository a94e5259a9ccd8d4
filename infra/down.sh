#!/usr/bin/env bash
# Stop the local Prometheus (if `make run PROMETHEUS=1` started it), the schema registry, Kafka and
# PostgreSQL (data in .local/ is kept).
# Tries each even if one fails.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
rc=0
"$here/prometheus.sh" stop || rc=1
"$here/registry.sh" stop || rc=1
"$here/kafka.sh" stop || rc=1
"$here/postgres.sh" stop || rc=1
exit "$rc"
