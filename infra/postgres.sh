#!/usr/bin/env bash
# Private PostgreSQL cluster for local runs: own data dir, port and socket; no Docker.
# Usage: infra/postgres.sh start|stop|status|url [ROLE]      Env: PGPORT (5433), PG_STOP_MODE (fast)
# Roles (docs/database-roles.md): `mpesa` owns the schema and runs the migrations; each service logs
# in as its own role, a member of a NOLOGIN group role that migrations/0009_roles.sql grants to.
# Passwords are generated into .local/secrets/pgpass (0600, libpq's password file): URLs carry none.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
umask 022   # the postgres user must be able to traverse the folders we create

PGPORT="${PGPORT:-5433}"
url() { echo "postgresql://${1:-mpesa}@127.0.0.1:${PGPORT}/mpesa"; }
PASSFILE="$LOCAL/secrets/pgpass"
# login role -> the group role holding its grants. `mpesa` (the owner) is in no group.
declare -A GROUP_OF=([ingress]=mpesa_ingress [stk_worker]=mpesa_stk_worker [ledger]=mpesa_ledger
                     [onboarding]=mpesa_onboarding [auditor]=mpesa_auditor [notifier]=mpesa_notifier
                     [privacy]=mpesa_privacy)
PGLINK="$LOCAL/pg"   # a real folder, or a symlink to /var/tmp when postgres can't reach the clone

# PostgreSQL refuses to run as root, so as root we run it as the 'postgres' system user.
# (cd /: the caller's cwd may be unreadable for postgres, e.g. under /root.)
if ((EUID == 0)); then
  as_pg() { (cd / && runuser -u postgres -- "$@"); }
  SUPER=postgres
else
  as_pg() { "$@"; }
  SUPER="$(id -un)"
fi

find_bin() {
  local d c
  # readlink: PATH may hold symlinks (e.g. /usr/local/bin/pg_ctl) to a dir that has the rest.
  c="$(readlink -f "$(command -v pg_ctl 2>/dev/null)" 2>/dev/null || true)"
  # shellcheck disable=SC2012
  for d in ${c:+"$(dirname "$c")"} $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -Vr); do
    [[ -x $d/pg_ctl && -x $d/initdb && -x $d/pg_isready && -x $d/psql ]] && { echo "$d"; return; }
  done
  return 1
}

install_pg() {
  ((EUID == 0)) || die "PostgreSQL not found; install it (apt-get install postgresql) or run as root"
  log "postgres: PostgreSQL not found, installing it from Debian packages..."
  # Debian may create and start its own 'main' cluster on 5432; we leave it alone (different port).
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } >&2
}

# Decide where the cluster lives (once). The data dir's parents must be traversable by postgres.
setup_home() {
  if [[ ! -e $PGLINK ]]; then
    mkdir -p "$LOCAL"
    if ((EUID != 0)) || runuser -u postgres -- test -x "$LOCAL"; then
      mkdir -p "$PGLINK"
    else
      local real; real="/var/tmp/mpesa-pipeline-$(printf %s "$ROOT" | sha256sum | cut -c1-10)/pg"
      log "postgres: $LOCAL is not reachable for user postgres, keeping the cluster in $real"
      # No link but old data there: .local was deleted (make clean), so that data goes too.
      if [[ -d $real/data ]] && ! as_pg "$BIN/pg_ctl" status -D "$real/data" >/dev/null 2>&1; then
        log "postgres: removing the stale cluster in $real"; rm -rf "$real"
      fi
      mkdir -p "$real" && ln -sfn "$real" "$PGLINK"
    fi
  fi
  PGH="$(readlink -f "$PGLINK")"
  ((EUID == 0)) && chown postgres:postgres "$PGH"
  DATA="$PGH/data"; RUN="$PGH/run"; LOGF="$PGH/postgres.log"
}

running() { [[ -d ${DATA:-} ]] && as_pg "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

init_cluster() {
  [[ -s $DATA/PG_VERSION ]] && return
  log "postgres: initdb $DATA"
  # Superuser password only matters for TCP logins (scram); local socket logins use peer auth.
  # shellcheck disable=SC2016
  as_pg bash -c 'umask 077; head -c 24 /dev/urandom | base64 >"$1"' _ "$PGH/superuser.pw"
  as_pg "$BIN/initdb" -D "$DATA" -U "$SUPER" --pwfile="$PGH/superuser.pw" \
    --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --no-locale --data-checksums >/dev/null
  echo "include 'local.conf'" | as_pg tee -a "$DATA/postgresql.conf" >/dev/null
}

write_conf() {
  as_pg mkdir -p "$RUN"
  as_pg tee "$DATA/local.conf" >/dev/null <<CONF
# Written by infra/postgres.sh on every start.
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$RUN'
max_connections = 200
shared_buffers = 128MB
# A payments ledger: keep durability on even locally.
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = 'scram-sha-256'
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
CONF
}

wait_ready() {
  local deadline=$((SECONDS + 60))
  until as_pg "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" -t 2; do
    ((SECONDS < deadline)) || { tail -n 30 "$LOGF" >&2 || true; die "postgres not ready after 60s (log: $LOGF)"; }
    sleep 0.3
  done
}

# A role's password from the password file, generated (base64url: nothing to escape) on first use.
password_of() {
  local role=$1 pw
  pw="$(awk -F: -v r="$role" '$4 == r { print $5; exit }' "$PASSFILE" 2>/dev/null || true)"
  if [[ -z $pw ]]; then
    pw="$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')"
    (umask 077; mkdir -p "$(dirname "$PASSFILE")"; echo "*:*:*:$role:$pw" >>"$PASSFILE")
  fi
  printf '%s' "$pw"
}

# Roles and database are created if missing and passwords set from the file, on every start
# (cheap, idempotent). Passwords travel on psql's stdin, never its command line.
ensure_db() {
  local role sql
  sql="SET client_min_messages = warning;
SELECT 'CREATE ROLE mpesa LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mpesa')\gexec
\set pw '$(password_of mpesa)'
ALTER ROLE mpesa LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD :'pw';
SELECT 'CREATE DATABASE mpesa OWNER mpesa' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mpesa')\gexec
"
  for role in "${!GROUP_OF[@]}"; do
    sql+="SELECT 'CREATE ROLE ${GROUP_OF[$role]} NOLOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${GROUP_OF[$role]}')\gexec
SELECT 'CREATE ROLE $role LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role')\gexec
\set pw '$(password_of "$role")'
ALTER ROLE $role LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB INHERIT PASSWORD :'pw';
GRANT ${GROUP_OF[$role]} TO $role;
"
  done
  as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$RUN" -p "$PGPORT" -U "$SUPER" -d postgres <<<"$sql" >/dev/null
  chmod 600 "$PASSFILE"
}

start() {
  lock "$LOCAL/.pg.lock"
  BIN="$(find_bin)" || { install_pg; BIN="$(find_bin)" || die "PostgreSQL install failed"; }
  if ((EUID == 0)) && ! id -u postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  setup_home
  if running; then
    wait_ready; ensure_db; log "postgres: already running on 127.0.0.1:$PGPORT"; return
  fi
  port_open "$PGPORT" && die "port $PGPORT is taken by another process (set PGPORT)"
  local t0; t0="$(now)"
  init_cluster
  write_conf
  as_pg "$BIN/pg_ctl" start -D "$DATA" -l "$LOGF" -w -t 60 -s 9>&- || { tail -n 30 "$LOGF" >&2; die "pg_ctl start failed"; }
  wait_ready
  ensure_db
  log "postgres: ready on 127.0.0.1:$PGPORT in $(elapsed "$t0")s ($BIN)"
}

stop() {
  lock "$LOCAL/.pg.lock"
  BIN="$(find_bin)" || { log "postgres: not installed"; return; }
  [[ -e $PGLINK ]] && setup_home
  # PG_STOP_MODE=immediate stops as a crash would (no checkpoint; recovery at the next start).
  local mode="${PG_STOP_MODE:-fast}"
  [[ $mode == fast || $mode == smart || $mode == immediate ]] || die "PG_STOP_MODE must be fast, smart or immediate"
  if running; then as_pg "$BIN/pg_ctl" stop -D "$DATA" -m "$mode" -w -t 60 -s; log "postgres: stopped ($mode)"
  else log "postgres: not running"; fi
}

status() {
  BIN="$(find_bin)" || { echo "postgres: stopped (not installed)"; return 1; }
  [[ -e $PGLINK ]] && setup_home
  if running && as_pg "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" -t 2; then
    echo "postgres: running (pid $(head -n1 "$DATA/postmaster.pid")) on 127.0.0.1:$PGPORT  $(url)"
  else echo "postgres: stopped"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url "${2:-}" ;;
  passfile) echo "$PASSFILE" ;;
  *) echo "usage: $0 start|stop|status|url [ROLE]|passfile" >&2; exit 2 ;;
esac
