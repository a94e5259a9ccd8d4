#!/usr/bin/env bash
# Resident memory of this repo's Kafka broker and of every process of our PostgreSQL cluster.
# RSS counts shared pages (shared_buffers) once per postgres process, so PSS is shown too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/$3" 2>/dev/null || true; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

kpid="$(cat "$LOCAL/kafka/kafka.pid" 2>/dev/null || true)"
if [[ -n $kpid && -d /proc/$kpid ]]; then
  echo "kafka broker   pid $kpid: RSS $(mib "$(kib "$kpid" VmRSS status)") MiB"
else echo "kafka broker   not running"; fi

ppid="$(head -n1 "$LOCAL/pg/data/postmaster.pid" 2>/dev/null || true)"
if [[ -n $ppid && -d /proc/$ppid ]]; then
  rss=0 pss=0 n=0
  for p in "$ppid" $(pgrep -P "$ppid" || true); do
    rss=$((rss + $(kib "$p" VmRSS status))) pss=$((pss + $(kib "$p" Pss smaps_rollup))) n=$((n + 1))
  done
  echo "postgres       $n processes (postmaster $ppid): RSS $(mib "$rss") MiB summed, PSS $(mib "$pss") MiB"
else echo "postgres       not running"; fi
