#!/usr/bin/env bash
# Local schema registry: Apicurio Registry 2.6 from Maven Central (its `-all` tar.gz, a Quarkus app
# that runs on Java 17; 3.x needs Java 21), on loopback (docs/schema-registry.md). Its storage is
# the H2 database the app embeds, in a file under .local/registry/data rather than in memory: schema
# ids live as long as the Kafka messages that carry them (both go with `make clean`), so a restart
# cannot hand an old id to another schema. Services register their topics' schemas when they start.
# Usage: infra/registry.sh start|stop|status|wait|env
# Env: SCHEMA_REGISTRY_PORT (8084), REGISTRY_HEAP_OPTS
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT="${SCHEMA_REGISTRY_PORT:-8084}"
DIR="$LOCAL/registry"
APP="$DIR/app"
DATA="$DIR/data"
PIDF="$DIR/registry.pid"
LOGF="$DIR/registry.log"
TIMEOUT=90
VERSION="2.6.13.Final"
ARTIFACT="io.apicurio:apicurio-registry-app:$VERSION:tar.gz:all"
# Maven checks the repository's SHA-1; this pins the bytes themselves (sha256sum of the tar.gz).
SHA256="3cda1b34aa020fb4ac4dd6a66018d757e81e437f97e20a1f92d366b70091c6ba"
RUNNER="apicurio-registry-app-$VERSION-runner.jar"

url() { echo "http://127.0.0.1:$PORT/apis/ccompat/v7"; }

# Prints the pid if our registry runs (checks the cmdline too, so a recycled pid doesn't count).
pid_alive() {
  local p; p="$(cat "$PIDF" 2>/dev/null)" || return 1
  [[ -n $p && "$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" == *"$RUNNER"* ]] && echo "$p"
}

ready() { port_open "$PORT" && curl -sf -o /dev/null "$(url)/subjects"; }

# Fetched once, through Maven like Kafka's jars; the marker names the version so a change refetches.
fetch_app() {
  [[ "$(cat "$APP/.fetched" 2>/dev/null)" == "$SHA256" ]] && return
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  command -v curl >/dev/null || die "curl not found (apt-get install curl): readiness is an HTTP request"
  log "registry: downloading Apicurio Registry $VERSION with Maven (first run only, 142 MB)..."
  local t0; t0="$(now)"
  rm -rf "$APP.tmp" && mkdir -p "$APP.tmp"
  mvn -q -B --strict-checksums dependency:copy -Dartifact="$ARTIFACT" -DoutputDirectory="$APP.tmp" \
    >"$DIR/mvn.log" 2>&1 || { cat "$DIR/mvn.log" >&2; die "Maven could not fetch $ARTIFACT"; }
  local tarball; tarball="$(ls "$APP.tmp"/*.tar.gz)"
  echo "$SHA256  $tarball" | sha256sum -c --quiet - || die "registry: $tarball is not the expected download"
  tar xzf "$tarball" -C "$APP.tmp" && rm -f "$tarball"
  echo "$SHA256" >"$APP.tmp/.fetched"
  rm -rf "$APP" && mv "$APP.tmp" "$APP"   # swap in whole, so a failed download leaves no half folder
  log "registry: ready to run in $(elapsed "$t0")s ($(du -sh "$APP" | cut -f1))"
}

start() {
  mkdir -p "$DIR"
  lock "$DIR/.lock"
  if pid_alive >/dev/null; then await_ready registry; log "registry: already running (pid $(pid_alive)) at $(url)"; return; fi
  port_open "$PORT" && die "port $PORT is taken by another process (set SCHEMA_REGISTRY_PORT)"
  fetch_app
  [[ -f $LOGF ]] && mv -f "$LOGF" "$LOGF.prev"
  local t0; t0="$(now)"
  rm -f "$PIDF"
  local heap; read -ra heap <<<"${REGISTRY_HEAP_OPTS:--Xms64m -Xmx384m}"
  # As infra/kafka.sh: own session, the pid file names the JVM, the lock is not inherited.
  # shellcheck disable=SC2016
  mkdir -p "$DATA"
  (cd "$APP" && REGISTRY_DATASOURCE_URL="jdbc:h2:file:$DATA/registry" exec setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PIDF" \
    java "${heap[@]}" -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$PORT" \
    -jar "$RUNNER") >"$LOGF" 2>&1 </dev/null 9>&- &
  for _ in {1..50}; do [[ -s $PIDF ]] && break; sleep 0.1; done
  await_ready registry
  log "registry: ready at $(url) (pid $(pid_alive)), start took $(elapsed "$t0")s"
}

stop() {
  mkdir -p "$DIR"
  lock "$DIR/.lock"
  local p
  if ! p="$(pid_alive)"; then rm -f "$PIDF"; log "registry: not running"; return; fi
  stop_process registry "$p"
  rm -f "$PIDF"
  log "registry: stopped"
}

status() {
  local p
  if p="$(pid_alive)" && ready; then echo "registry: running (pid $p) at $(url)"
  else echo "registry: stopped"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  wait) await_ready registry; log "registry: ready at $(url)" ;;
  env) echo "SCHEMA_REGISTRY_URL=$(url)" ;;
  *) echo "usage: $0 start|stop|status|wait|env" >&2; exit 2 ;;
esac
