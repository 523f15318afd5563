#!/usr/bin/env bash
# Least-privilege Kafka ACLs, one principal per gpusentry component, for Apache Kafka's kafka-acls.sh.
#
#   BOOTSTRAP=kafka-1:9093 ADMIN_CONFIG=admin.properties deploy/kafka-acls.sh           # apply
#   DRY_RUN=1 deploy/kafka-acls.sh                                                       # print the commands
#
# Principals (SASL/SCRAM users or TLS client-certificate names; override with the variables below):
#   agent      produce to the four event topics, nothing else (a compromised GPU node cannot write verdicts,
#              alerts, dead letters or checkpoints, and cannot read anything)
#   worker     read the event topics and feedback, write alerts and dead letters, own its checkpoints and group
#   forwarder  read alerts, write dead letters, own its group and its Slack-thread journal
#   analyst    write and read feedback (verdicts are also signed: docs/kafka-security.md)
# Topic names and ids follow the defaults in docs/config.md; set the variables if yours differ.
set -euo pipefail

: "${BOOTSTRAP:=localhost:9092}"
: "${ADMIN_CONFIG:=}"
: "${KAFKA_ACLS:=kafka-acls.sh}"
: "${AGENT_PRINCIPAL:=User:gpusentry-agent}"
: "${WORKER_PRINCIPAL:=User:gpusentry-worker}"
: "${FORWARDER_PRINCIPAL:=User:gpusentry-forwarder}"
: "${ANALYST_PRINCIPAL:=User:gpusentry-analyst}"
: "${TOPIC_PREFIX:=gpusentry.}"
: "${WORKER_APP_ID:=gpusentry}"
: "${FORWARDER_GROUP:=gpusentry-forwarder}"

EVENTS=("${TOPIC_PREFIX}gpu" "${TOPIC_PREFIX}process" "${TOPIC_PREFIX}network" "${TOPIC_PREFIX}dns")
ALERTS="${TOPIC_PREFIX}alerts"
DEADLETTER="${TOPIC_PREFIX}deadletter"
FEEDBACK="${TOPIC_PREFIX}feedback"

acl() {
  local cmd=("$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP")
  [ -n "$ADMIN_CONFIG" ] && cmd+=(--command-config "$ADMIN_CONFIG")
  cmd+=(--add --force "$@")
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

# agent: write the event topics; idempotent producer (exactly-once into the log after an outage).
for t in "${EVENTS[@]}"; do
  acl --allow-principal "$AGENT_PRINCIPAL" --operation Write --operation Describe --topic "$t"
done
acl --allow-principal "$AGENT_PRINCIPAL" --operation IdempotentWrite --cluster

# worker: read events and feedback, write alerts and dead letters.
for t in "${EVENTS[@]}" "$FEEDBACK"; do
  acl --allow-principal "$WORKER_PRINCIPAL" --operation Read --operation Describe --topic "$t"
done
for t in "$ALERTS" "$DEADLETTER"; do
  acl --allow-principal "$WORKER_PRINCIPAL" --operation Write --operation Read --operation Describe --topic "$t"
done
# Its consumer group and every topic faust and the checkpoints keep under the application id
# (<app_id>-checkpoints, faust's own <app_id>-* topics).
acl --allow-principal "$WORKER_PRINCIPAL" --operation All --resource-pattern-type prefixed --topic "$WORKER_APP_ID-"
acl --allow-principal "$WORKER_PRINCIPAL" --operation Read --resource-pattern-type prefixed --group "$WORKER_APP_ID"

# forwarder: read alerts, write dead letters, its group and Slack-thread journal.
acl --allow-principal "$FORWARDER_PRINCIPAL" --operation Read --operation Describe --topic "$ALERTS"
acl --allow-principal "$FORWARDER_PRINCIPAL" --operation Write --operation Describe --topic "$DEADLETTER"
acl --allow-principal "$FORWARDER_PRINCIPAL" --operation Read --group "$FORWARDER_GROUP"
acl --allow-principal "$FORWARDER_PRINCIPAL" --operation All --topic "$FORWARDER_GROUP-slack-threads"

# analysts: verdicts (`gpusentry feedback add|list|revoke`; list reads with a throw-away group).
acl --allow-principal "$ANALYST_PRINCIPAL" --operation Write --operation Read --operation Describe --topic "$FEEDBACK"
acl --allow-principal "$ANALYST_PRINCIPAL" --operation IdempotentWrite --cluster
acl --allow-principal "$ANALYST_PRINCIPAL" --operation Read --resource-pattern-type prefixed \
    --group gpusentry-feedback-list-
