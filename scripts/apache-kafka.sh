#!/usr/bin/env bash
# A local Apache Kafka (KRaft) on loopback, resolved with Maven from deploy/apache-kafka/pom.xml on first use.
#   scripts/apache-kafka.sh resolve            fetch the jars once (progress on stderr), print their directory
#   scripts/apache-kafka.sh run [--nodes 3]    run a cluster until Ctrl-C; prints its bootstrap servers
# Needs Java 17+ and Maven; without them it says what to install (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m gpusentry.apache_kafka "$@"
