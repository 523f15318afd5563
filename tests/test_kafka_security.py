"""Security for real, on Apache Kafka: TLS, SASL/SCRAM-SHA-512 users, and the least-privilege ACLs that
`deploy/kafka-acls.sh` ships, applied by that script with Kafka's own ACL tool.

Every component connects through TLS as its own user: the agent's events reach the worker, the worker's
incident reaches the forwarder's webhook.  And the principals hold only what they need: the agent cannot write
verdicts, alerts or dead letters, nor read anything; nothing connects without a password or over plaintext.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from gpusentry.apache_kafka import KafkaCluster, KafkaUnavailable
from gpusentry.broker import create_topics
from gpusentry.config import Config
from tests import outputs_receivers as rx
from tests.conftest import kafka_missing
from tests.streams_helpers import REPO, WorkerProcess, miner_start

pytestmark = [pytest.mark.broker, pytest.mark.kafka, pytest.mark.slow]

USERS = ("gpusentry-agent", "gpusentry-worker", "gpusentry-forwarder", "gpusentry-analyst")
TOPICS = Config().topics


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure-kafka")
    try:
        cluster = KafkaCluster(workdir=work, scram_users={u: uuid.uuid4().hex for u in USERS}).start()
    except KafkaUnavailable as exc:
        kafka_missing(exc)
    try:
        assert cluster.scram_users is not None and cluster._lib is not None
        admin = cluster.client_config("admin")
        create_topics(cluster.bootstrap_servers, TOPICS.all(), partitions=2,
                      client_config={k: v for k, v in admin.items() if k != "bootstrap.servers"})
        # The shipped ACL script, run as an operator would, with Kafka's own ACL tool.
        acl_tool = work / "kafka-acls.sh"
        acl_tool.write_text(f"#!/bin/sh\nexec java -cp '{cluster._lib}/*' org.apache.kafka.tools.AclCommand \"$@\"\n")
        acl_tool.chmod(0o755)
        props = work / "admin.properties"
        props.write_text("security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
                         "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
                         f'username="admin" password="{cluster.scram_users["admin"]}";\n'
                         f"ssl.truststore.type=PEM\nssl.truststore.location={cluster.ca_path}\n")
        done = subprocess.run(["bash", str(REPO / "deploy" / "kafka-acls.sh")], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "BOOTSTRAP": cluster.bootstrap_servers,
                                                "ADMIN_CONFIG": str(props), "KAFKA_ACLS": str(acl_tool)})
        assert done.returncode == 0, done.stderr[-3000:]
        yield cluster
    finally:
        cluster.stop()


def produce_as(cluster: KafkaCluster, user: str, topic: str, value: bytes, key: bytes = b"h") -> KafkaError | None:
    """The delivery error of one message produced as ``user`` (None: written)."""
    errors: list[KafkaError | None] = []
    p = Producer({**cluster.client_config(user), "enable.idempotence": user == "gpusentry-agent",
                  "message.timeout.ms": 15000})
    p.produce(topic, value, key=key, on_delivery=lambda err, _msg: errors.append(err))
    p.flush(30)
    return errors[0] if errors else KafkaError(KafkaError._MSG_TIMED_OUT)


def test_the_agents_principal_writes_only_the_event_topics_and_reads_nothing(secure):
    assert produce_as(secure, "gpusentry-agent", TOPICS.gpu, b"[]") is None
    for topic in (TOPICS.feedback, TOPICS.alerts, TOPICS.deadletter):
        err = produce_as(secure, "gpusentry-agent", topic, b'{"verdict": "suppress"}')
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, err)
    assert produce_as(secure, "gpusentry-analyst", TOPICS.feedback, b"{}") is None, "analysts write verdicts"
    reader = Consumer({**secure.client_config("gpusentry-agent"), "group.id": "gpusentry-agent-snoops",
                       "auto.offset.reset": "earliest"})
    try:
        reader.subscribe([TOPICS.gpu])
        deadline, refused = time.monotonic() + 20, None
        while refused is None and time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is not None and msg.error():
                refused = msg.error().code()
            elif msg is not None:
                pytest.fail("the agent's principal read an event")
    finally:
        reader.close()
    assert refused in (KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED)


def test_nothing_connects_without_tls_and_a_password(secure):
    wrong = {**secure.client_config("gpusentry-agent"), "sasl.password": "not-the-password"}
    p = Producer({**wrong, "message.timeout.ms": 5000})
    errors: list[KafkaError] = []
    p.produce(TOPICS.gpu, b"[]", on_delivery=lambda err, _m: errors.append(err))
    p.flush(15)
    assert errors and errors[0] is not None, "a wrong password was let in"
    plain = Producer({"bootstrap.servers": secure.bootstrap_servers, "message.timeout.ms": 5000})
    errors = []
    plain.produce(TOPICS.gpu, b"[]", on_delivery=lambda err, _m: errors.append(err))
    plain.flush(15)
    assert errors and errors[0] is not None, "a plaintext client was let in"


def test_agent_worker_and_forwarder_each_connect_as_their_own_user(secure, tmp_path):
    receivers = rx.Receivers().start()
    env = {**secure.client_env("gpusentry-worker"), "GPUSENTRY_WORKER__CHECKPOINT_INTERVAL_S": "0.5",
           "GPUSENTRY_WORKER__SESSION_TIMEOUT_S": "6", "GPUSENTRY_KAFKA__PARTITIONS": "2"}
    worker = WorkerProcess(env, "secure").start()
    (tmp_path / "gpusentry.toml").write_text("")
    fenv = {**os.environ, **secure.client_env("gpusentry-forwarder"),
            "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
            "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET}
    fenv.pop("GPUSENTRY_CONFIG", None)
    with open(tmp_path / "forward.log", "wb") as flog:
        forwarder = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "forward", "--config",
                                      str(tmp_path / "gpusentry.toml")], cwd=REPO, env=fenv, stdout=flog,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        now = time.time()
        batch = orjson.dumps([miner_start("secure-node", now - 30 + i, pid=31_000 + i) for i in range(3)])
        deadline = time.monotonic() + 60
        while "feedback applied" not in worker.log() and time.monotonic() < deadline:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
            time.sleep(0.3)
        assert produce_as(secure, "gpusentry-agent", TOPICS.process, batch, key=b"secure-node") is None
        deadline = time.monotonic() + 90
        while not receivers.received[rx.WEBHOOK_PATH] and time.monotonic() < deadline:
            assert forwarder.poll() is None, Path(tmp_path / "forward.log").read_text()[-3000:]
            time.sleep(0.3)
        got = receivers.received[rx.WEBHOOK_PATH]
        assert got, f"no incident reached the webhook\nworker:\n{worker.log()[-2000:]}\nforwarder:\n" \
                    f"{Path(tmp_path / 'forward.log').read_text()[-2000:]}"
        assert got[0]["host"]["name"] == "secure-node"
        assert "TOPIC_AUTHORIZATION" not in worker.log() and "AuthorizationFailed" not in worker.log()
    finally:
        worker.kill()
        forwarder.kill()
        forwarder.wait(10)
        receivers.stop()
