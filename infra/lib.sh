# shellcheck shell=bash disable=SC2034
# Shared helpers for infra/*.sh (sourced, not executed).
# The repo root comes from this file's location so a clone anywhere (CI) works.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
LOCAL="$ROOT/.local"     # git-ignored; all runtime state lives here
INFRA="$ROOT/infra"

log() { printf '%s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# True if something accepts TCP connections on 127.0.0.1:$1 (bash /dev/tcp, no extra tools).
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Serialise concurrent start/stop calls on one instance (several people share it).
lock() { mkdir -p "$(dirname "$1")"; exec 9>"$1"; flock -w 120 9 || die "could not lock $1"; }
