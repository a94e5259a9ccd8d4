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

# Waits until the caller's `ready` succeeds. Dies, showing the end of $LOGF, when the caller's
# `pid_alive` finds the process gone or $TIMEOUT seconds pass. $1 names the server in messages.
await_ready() {
  local deadline=$((SECONDS + TIMEOUT))
  until ready; do
    if ! pid_alive >/dev/null; then tail -n 30 "$LOGF" >&2 || true; die "$1 is not running (log: $LOGF)"; fi
    if ((SECONDS >= deadline)); then tail -n 30 "$LOGF" >&2 || true; die "$1 not ready after ${TIMEOUT}s (log: $LOGF)"; fi
    sleep 0.5
  done
}

# Stops process $2 (named $1 in messages): TERM, up to 30 s to exit, then KILL; returns once it is gone.
stop_process() {
  kill -TERM "$2"
  for _ in {1..300}; do kill -0 "$2" 2>/dev/null || return 0; sleep 0.1; done
  log "$1: still up after 30s, sending KILL"; kill -KILL "$2"
  while kill -0 "$2" 2>/dev/null; do sleep 0.1; done
}
