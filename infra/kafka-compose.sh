#!/bin/sh
# compose.yaml's Kafka: the same listeners and authorizer as infra/kafka.sh, in the apache/kafka image.
# Reads what kafka-init made in /secrets (infra/kafka_compose_init.py); data stays in the container.
set -eu
S=/secrets
pw() { cat "$S/kafka-$1.password"; }
umask 077
cat >/tmp/server.properties <<PROPS
process.roles=broker,controller
node.id=1
# The controller listener is on the container's loopback only and wants the broker's certificate.
controller.quorum.voters=1@127.0.0.1:9093
listeners=SASL_SSL://:9092,CONTROLLER://127.0.0.1:9093
advertised.listeners=SASL_SSL://kafka:9092
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL
listener.name.controller.ssl.client.auth=required
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$(pw broker)";
ssl.keystore.type=PKCS12
ssl.keystore.location=$S/broker.p12
ssl.keystore.password=$(pw keystore)
ssl.key.password=$(pw keystore)
ssl.truststore.type=PEM
ssl.truststore.location=$S/ca.crt
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:broker;User:admin;User:CN=mpesa-kafka-broker
log.dirs=/tmp/kraft-combined-logs
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
PROPS
# For the healthcheck: the admin's login.
cat >/tmp/admin.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(pw admin)";
ssl.truststore.type=PEM
ssl.truststore.location=$S/ca.crt
PROPS
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted -t "$(cat "$S/cluster.id")" -c /tmp/server.properties \
  --add-scram "SCRAM-SHA-512=[name=broker,password=$(pw broker)]" \
  --add-scram "SCRAM-SHA-512=[name=admin,password=$(pw admin)]" >/dev/null
exec /opt/kafka/bin/kafka-server-start.sh /tmp/server.properties
