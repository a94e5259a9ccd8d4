#!/usr/bin/env bash
# Local single-node Kafka (KRaft, broker+controller) from Maven Central jars; no Docker (docs/kafka-local.md).
# Clients reach it only over TLS with SASL/SCRAM-SHA-512, and an authorizer with one principal per
# service (docs/kafka-security.md). First start: a local CA and broker certificate in .local/kafka/tls/,
# a password per principal in .local/secrets/kafka-<principal>.password (0600), then users and ACLs.
# Usage: infra/kafka.sh start|stop|status|wait|env
# Env: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_DIR (.local/kafka), KAFKA_HEAP_OPTS, PYTHON (with confluent_kafka)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-9093}"
# KAFKA_DIR: another broker's own state (data, settings, pid, log), e.g. one a test stops and starts
# beside the shared one; the jars and the TLS material (a certificate for 127.0.0.1, any port) are shared.
DIR="${KAFKA_DIR:-$LOCAL/kafka}"
LIBS="$LOCAL/kafka/libs"
DATA="$DIR/data"
PROPS="$DIR/server.properties"
PIDF="$DIR/kafka.pid"
LOGF="$DIR/kafka.log"
TLS="$LOCAL/kafka/tls"
SECRETS="$LOCAL/secrets"
TIMEOUT=90
# Super users: the broker itself (inter-broker SCRAM login, and its certificate's name on the
# controller listener) and the admin principal of tooling and tests. Services get ACLs instead.
BROKER_DN="CN=mpesa-kafka-broker"

kjava() { java -cp "$LIBS/*" -Dlog4j2.configurationFile="$INFRA/kafka/log4j2.properties" "$@"; }

# Prints the pid if our broker runs (checks the cmdline too, so a recycled pid doesn't count).
pid_alive() {
  local p; p="$(cat "$PIDF" 2>/dev/null)" || return 1
  [[ -n $p && "$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" == *"$PROPS"* ]] && echo "$p"
}

# A python with confluent_kafka gives a real metadata request; otherwise fall back to the log.
find_python() {
  local p
  for p in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
    [[ -n $p ]] && command -v "$p" >/dev/null && "$p" -c 'import confluent_kafka' 2>/dev/null && { echo "$p"; return; }
  done
  return 0
}

ready() {
  port_open "$PORT" || return 1
  if [[ -n $PY ]]; then
    # As the admin principal over the SASL_SSL listener: proves TLS, SCRAM and the authorizer work.
    env $(client_env admin) PYTHONPATH="$ROOT" "$PY" - 2>/dev/null <<'PYEOF'
from confluent_kafka.admin import AdminClient
from services.common.config import kafka_client_config
AdminClient({**kafka_client_config(), "bootstrap.servers": __import__("os").environ["KAFKA_BOOTSTRAP_SERVERS"]}
            ).list_topics(timeout=5)
PYEOF
  else
    grep -q -e 'Kafka Server started' -e 'Transitioning from RECOVERY to RUNNING' "$LOGF" 2>/dev/null
  fi
}

wait_ready() {
  PY="$(find_python)"
  [[ -n $PY ]] || log "kafka: no python with confluent_kafka; readiness from the broker log"
  await_ready kafka
}

# The env lines a client needs to log in as $1 (the password stays in its file).
client_env() {
  printf '%s\n' "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT" "KAFKA_CLIENT_SECURITY_PROTOCOL=SASL_SSL" \
    "KAFKA_CLIENT_SASL_MECHANISM=SCRAM-SHA-512" "KAFKA_CLIENT_SSL_CA_LOCATION=$TLS/ca.crt" \
    "KAFKA_CLIENT_SASL_USERNAME=$1" "KAFKA_CLIENT_SASL_PASSWORD_FILE=$SECRETS/kafka-$1.password"
}

# A random secret in $SECRETS/kafka-$1.password, made once (0600).
secret() {
  local f="$SECRETS/kafka-$1.password"
  if [[ ! -s $f ]]; then
    (umask 077 && mkdir -p "$SECRETS" && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$f.tmp" && mv "$f.tmp" "$f")
  fi
  cat "$f"
}

# A local CA and a broker certificate for 127.0.0.1/localhost, made once. The broker key serves
# the client listener (TLS server) and the controller listener (TLS client with its certificate).
make_tls() {
  # Kept while the keystore still opens with the password on file (gone if .local/secrets was wiped).
  [[ -s $TLS/ca.crt ]] && openssl pkcs12 -in "$TLS/broker.p12" -passin "file:$SECRETS/kafka-keystore.password" \
    -noout 2>/dev/null && return
  log "kafka: creating a local CA and broker certificate in $TLS"
  rm -rf "$TLS.tmp"
  (
    umask 077 && mkdir -p "$TLS.tmp" && cd "$TLS.tmp"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 3650 -subj "/CN=mpesa-pipeline local Kafka CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req "${ec[@]}" -keyout broker.key -out broker.csr -subj "/$BROKER_DN" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" >broker.ext
    openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile broker.ext \
      -out broker.crt 2>/dev/null
    openssl pkcs12 -export -in broker.crt -inkey broker.key -certfile ca.crt -name broker -out broker.p12 \
      -passout "file:$SECRETS/kafka-keystore.password"
    chmod 644 ca.crt broker.crt   # public halves; keys and keystore stay 0600
    rm -f broker.csr broker.ext ca.srl
  ) || die "could not create the TLS material"
  rm -rf "$TLS" && mv "$TLS.tmp" "$TLS"
}

# Jars are fetched once; the marker holds the pom's hash so editing the pom refetches (docs/kafka-local.md §1).
fetch_libs() {
  local want; want="$(sha256sum "$INFRA/kafka/pom.xml" | cut -d' ' -f1)"
  [[ "$(cat "$LIBS/.fetched" 2>/dev/null)" == "$want" ]] && return
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  log "kafka: downloading broker jars with Maven (first run only)..."
  local t0; t0="$(now)"
  rm -rf "$LIBS.tmp"
  # Output goes to a file, shown only on failure (Maven 3.8.7 prints stray colour codes even with -q -B).
  mvn -q -B -f "$INFRA/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" >"$DIR/mvn.log" 2>&1 \
    || { cat "$DIR/mvn.log" >&2; die "Maven could not fetch the Kafka jars"; }
  echo "$want" >"$LIBS.tmp/.fetched"
  rm -rf "$LIBS" && mv "$LIBS.tmp" "$LIBS"   # swap in whole, so a failed download leaves no half folder
  log "kafka: jars ready in $(elapsed "$t0")s ($(du -sh "$LIBS" | cut -f1))"
}

write_props() {
  local keystore_pw broker_pw
  keystore_pw="$(secret keystore)" broker_pw="$(secret broker)"
  (umask 077 && cat >"$PROPS.tmp") <<PROPS
# Generated by infra/kafka.sh on every start; edit the script, not this file. Mode 0600: it holds
# the keystore password and the broker's own SCRAM password.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
# No plaintext client listener: every client logs in with SCRAM over TLS.
listeners=SASL_SSL://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=SASL_SSL://127.0.0.1:$PORT
# The controller listener takes TLS with a client certificate: only the holder of the broker key
# (this broker) gets in. As plaintext it would have to make User:ANONYMOUS a super user, and any
# local process could then create ACLs or SCRAM users through it.
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL
listener.name.controller.ssl.client.auth=required
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$broker_pw";
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS/broker.p12
ssl.keystore.password=$keystore_pw
ssl.key.password=$keystore_pw
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.crt
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:broker;User:admin;User:$BROKER_DN
log.dirs=$DATA
auto.create.topics.enable=false
# One node: every internal topic must have replication 1 or groups/transactions hang.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer partitions and threads: faster start and less memory on a 2-core box.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
share.coordinator.state.topic.num.partitions=4
num.partitions=1
num.network.threads=2
num.io.threads=4
background.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=33554432
group.initial.rebalance.delay.ms=0
PROPS
  mv "$PROPS.tmp" "$PROPS"
}

# Users (SCRAM credentials) and ACLs of every service principal; idempotent, run on every start.
grant() {
  [[ -n $PY ]] || die "kafka: a python with confluent_kafka is needed to create users and ACLs (make install)"
  local p
  for p in $("$PY" "$INFRA/kafka_acl.py" principals); do secret "$p" >/dev/null; done
  env $(client_env admin) KAFKA_SECRETS_DIR="$SECRETS" "$PY" "$INFRA/kafka_acl.py" apply \
    || die "kafka: could not create users and ACLs"
}

start() {
  lock "$DIR/.lock"
  if pid_alive >/dev/null; then
    wait_ready; grant; log "kafka: already running (pid $(pid_alive)) on 127.0.0.1:$PORT"; return
  fi
  port_open "$PORT" && die "port $PORT is taken by another process (set KAFKA_PORT)"
  port_open "$CPORT" && die "port $CPORT is taken by another process (set KAFKA_CONTROLLER_PORT)"
  command -v java >/dev/null || die "java not found (JDK 17+ needed)"
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl): it makes the local CA"
  fetch_libs
  # The broker and admin SCRAM users are written into the storage at format time (the only way
  # in before the broker runs), from their password files: data without those files was formatted
  # for someone else's passwords (or before security), so it is formatted again.
  if [[ -f $DATA/meta.properties && ! ( -s $SECRETS/kafka-admin.password && -s $SECRETS/kafka-broker.password \
        && -f $DIR/scram.formatted ) ]]; then
    log "kafka: local data predates the SCRAM users or their passwords are gone: formatting it again"
    rm -rf "$DATA" "$DIR/scram.formatted"
  fi
  mkdir -p "$DATA"
  secret keystore >/dev/null
  make_tls
  write_props
  # Format the storage once; the cluster id is kept so data survives restarts.
  if [[ ! -s $DIR/cluster.id ]]; then
    kjava kafka.tools.StorageTool random-uuid | grep -Eo '^[A-Za-z0-9_-]{22}$' >"$DIR/cluster.id.tmp"
    mv "$DIR/cluster.id.tmp" "$DIR/cluster.id"
  fi
  if [[ ! -f $DATA/meta.properties ]]; then
    # The passwords are on this command line for the second it runs (the tool reads no file).
    kjava kafka.tools.StorageTool format -t "$(cat "$DIR/cluster.id")" -c "$PROPS" -g \
      --add-scram "SCRAM-SHA-512=[name=broker,password=$(secret broker)]" \
      --add-scram "SCRAM-SHA-512=[name=admin,password=$(secret admin)]" >/dev/null
    touch "$DIR/scram.formatted"
  fi
  [[ -f $LOGF ]] && mv -f "$LOGF" "$LOGF.prev"
  local t0; t0="$(now)"
  rm -f "$PIDF"
  local heap; read -ra heap <<<"${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
  # setsid: own session, so the broker outlives this shell and its terminal.
  # The inner bash writes its own pid, then execs java, so the pid file always names the JVM.
  # shellcheck disable=SC2016
  (cd "$DIR" && exec setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PIDF" \
    java "${heap[@]}" \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$INFRA/kafka/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$PROPS") >"$LOGF" 2>&1 </dev/null 9>&- &   # 9>&-: the JVM must not inherit the lock
  for _ in {1..50}; do [[ -s $PIDF ]] && break; sleep 0.1; done
  wait_ready
  grant
  log "kafka: ready on 127.0.0.1:$PORT (SASL_SSL, pid $(pid_alive)), broker start took $(elapsed "$t0")s"
}

stop() {
  lock "$DIR/.lock"
  local p
  if ! p="$(pid_alive)"; then rm -f "$PIDF"; log "kafka: not running"; return; fi
  stop_process kafka "$p"
  rm -f "$PIDF"
  log "kafka: stopped"
}

status() {
  local p
  if p="$(pid_alive)" && port_open "$PORT"; then echo "kafka: running (pid $p) on 127.0.0.1:$PORT"
  else echo "kafka: stopped"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  wait) wait_ready; log "kafka: ready on 127.0.0.1:$PORT" ;;
  env) client_env "${2:-admin}" ;;
  *) echo "usage: $0 start|stop|status|wait|env [principal]" >&2; exit 2 ;;
esac
