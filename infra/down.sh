#!/usr/bin/env bash
# Stop local Kafka and PostgreSQL (data in .local/ is kept). Tries both even if one fails.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
rc=0
"$here/kafka.sh" stop || rc=1
"$here/postgres.sh" stop || rc=1
exit "$rc"
