#!/usr/bin/env bash
# Tools to read the topics without this repo's code (README, "Reading the topics"): Debian's kcat
# fetches messages over TLS with SASL/SCRAM, Apache Avro's avro-tools decodes a message's Avro body
# with the writer's schema from the registry. Debian's kcat 1.7.1 is built without libserdes, so its
# own `-s value=avro -r <registry>` refuses ("This build of kcat lacks Avro/Schema-Registry support")
# and avro-tools does that part (docs/schema-registry.md). Its librdkafka (Debian's 2.0.2) cannot log in
# to Kafka 4 with SCRAM either (the broker checks the nonce strictly since 4.0; librdkafka fixed its side
# in 2.6.1, confluentinc/librdkafka#4895), so $KCAT runs Debian's kcat with the librdkafka that the
# confluent-kafka wheel in .venv ships (same soname, librdkafka keeps its ABI within .so.1).
# Debian's prometheus package gives promtool, which checks and unit-tests ops/prometheus/alerts.yml (make
# check, make test), and the Prometheus server that infra/prometheus.sh runs.
# Usage: infra/tools.sh install [prometheus] | env [principal]
#   install: kcat and prometheus with apt-get (as root) and avro-tools with Maven, when missing;
#            `install prometheus` only Prometheus and promtool (all `make check` needs)
#   env:     KCAT (Debian's kcat on the newer librdkafka), KCAT_CONFIG (a 0600 librdkafka file with the principal's login, admin by default) and
#            AVRO_TOOLS (the jar), as env lines; the password stays in files, never on a command line
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR="$LOCAL/tools"
AVRO_VERSION="1.12.1"
AVRO_ARTIFACT="org.apache.avro:avro-tools:$AVRO_VERSION"
# Maven checks the repository's SHA-1; this pins the bytes themselves (sha256sum of the jar).
AVRO_SHA256="e81db810019bf6ab73855dc61dbbe489886a46ff3ec1ac7bed79e3f8f900ebd3"
AVRO_JAR="$DIR/avro-tools-$AVRO_VERSION.jar"
KCAT="$DIR/bin/kcat"

install_kcat() {
  command -v kcat >/dev/null && return
  ((EUID == 0)) || die "kcat not found; install Debian's package (sudo apt-get install kcat) or run as root"
  log "tools: kcat not found, installing it from Debian packages..."
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat; } >&2
  command -v kcat >/dev/null || die "kcat install failed"
}

# Without recommends: they add prometheus-node-exporter, a daemon on port 9100 that nothing here uses.
# The package also brings a service of its own (on every address, port 9090); our scripts never
# start it, and apt starts it only where services start on install (not in containers, whose
# policy-rc.d forbids it): infra/prometheus.sh runs its own, on loopback.
install_prometheus() {
  command -v promtool >/dev/null && command -v prometheus >/dev/null && return
  ((EUID == 0)) || die "promtool/prometheus not found; install Debian's package" \
    "(sudo apt-get install --no-install-recommends prometheus) or run as root"
  log "tools: promtool or prometheus not found, installing Debian's prometheus package..."
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } >&2
  command -v promtool >/dev/null && command -v prometheus >/dev/null || die "prometheus install failed"
}

# $KCAT: /usr/bin/kcat with .venv's librdkafka first on the library path (make install puts it there).
kcat_wrapper() {
  local lib
  lib="$(ls "$ROOT"/.venv/lib/python3*/site-packages/confluent_kafka.libs/librdkafka-*.so.1 2>/dev/null | head -n1)"
  [[ -n $lib ]] || die "no librdkafka in .venv (run make install first): Debian's cannot log in to Kafka 4"
  mkdir -p "$DIR/lib" "$DIR/bin"
  ln -sfn "$lib" "$DIR/lib/librdkafka.so.1"
  printf '#!/bin/sh\n# Debian kcat on a librdkafka that logs in to Kafka 4 (infra/tools.sh)\nLD_LIBRARY_PATH=%q exec %q "$@"\n' \
    "$DIR/lib" "$(command -v kcat)" >"$KCAT.tmp"
  chmod +x "$KCAT.tmp" && mv -f "$KCAT.tmp" "$KCAT"
}

install_avro_tools() {
  [[ -f $AVRO_JAR ]] && echo "$AVRO_SHA256  $AVRO_JAR" | sha256sum -c --quiet - 2>/dev/null && return
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  command -v java >/dev/null || die "java not found (apt-get install default-jre-headless)"
  log "tools: downloading $AVRO_ARTIFACT with Maven (first run only, 72 MB)..."
  mkdir -p "$DIR"
  rm -rf "$DIR/tmp" && mkdir -p "$DIR/tmp"
  mvn -q -B --strict-checksums dependency:copy -Dartifact="$AVRO_ARTIFACT" -DoutputDirectory="$DIR/tmp" \
    >"$DIR/mvn.log" 2>&1 || { cat "$DIR/mvn.log" >&2; die "Maven could not fetch $AVRO_ARTIFACT"; }
  echo "$AVRO_SHA256  $DIR/tmp/avro-tools-$AVRO_VERSION.jar" | sha256sum -c --quiet - \
    || die "tools: avro-tools-$AVRO_VERSION.jar is not the expected download"
  mv -f "$DIR/tmp/avro-tools-$AVRO_VERSION.jar" "$AVRO_JAR" && rm -rf "$DIR/tmp"
}

# kcat takes librdkafka properties from a file (-F): the login goes there, readable by us only.
kcat_config() {
  local principal=$1 key value conf="$LOCAL/secrets/kcat-$1.conf"
  declare -A env
  while IFS='=' read -r key value; do env[$key]=$value; done < <("$INFRA/kafka.sh" env "$principal")
  [[ -s ${env[KAFKA_CLIENT_SASL_PASSWORD_FILE]} ]] \
    || die "no Kafka password for $principal yet (${env[KAFKA_CLIENT_SASL_PASSWORD_FILE]}): start Kafka first"
  # A leftover .tmp would keep its own mode through the redirect: removed, so the file is made 0600.
  (umask 077 && mkdir -p "$(dirname "$conf")" && rm -f "$conf.tmp" && {
    echo "bootstrap.servers=${env[KAFKA_BOOTSTRAP_SERVERS]}"
    echo "security.protocol=${env[KAFKA_CLIENT_SECURITY_PROTOCOL]}"
    echo "sasl.mechanisms=${env[KAFKA_CLIENT_SASL_MECHANISM]}"
    echo "ssl.ca.location=${env[KAFKA_CLIENT_SSL_CA_LOCATION]}"
    echo "sasl.username=${env[KAFKA_CLIENT_SASL_USERNAME]}"
    echo "sasl.password=$(cat "${env[KAFKA_CLIENT_SASL_PASSWORD_FILE]}")"
  } >"$conf.tmp" && mv -f "$conf.tmp" "$conf")
  echo "$conf"
}

case "${1:-}" in
  install)
    if [[ ${2:-} == prometheus ]]; then install_prometheus; exit; fi
    [[ -z ${2:-} ]] || { echo "usage: $0 install [prometheus]" >&2; exit 2; }
    install_kcat; kcat_wrapper; install_prometheus; install_avro_tools ;;
  env) echo "KCAT=$KCAT"; echo "KCAT_CONFIG=$(kcat_config "${2:-admin}")"; echo "AVRO_TOOLS=$AVRO_JAR" ;;
  *) echo "usage: $0 install [prometheus]|env [principal]" >&2; exit 2 ;;
esac
