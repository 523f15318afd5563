"""The worker never relies on broker auto-creation and says when its topics change under it.

A topic deleted (or lost by a broker) while the worker runs is reported, with the fix, within
``worker.topic_check_s`` and cleared when it is back; no gpusentry client re-creates a missing topic with the
broker's default partition count, even on a broker with ``auto.create.topics.enable``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from confluent_kafka.admin import AdminClient

from gpusentry.broker import create_topics
from gpusentry.config import load_config
from streams.worker import topic_problems
from tests.streams_helpers import WorkerProcess, topic_env


def meta(partitions: int) -> SimpleNamespace:
    return SimpleNamespace(partitions=dict.fromkeys(range(partitions)))


def test_topic_problems_name_what_changed_and_the_fix():
    cfg = load_config(environ={"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    existing = {t: meta(4) for t in cfg.topics.all()}
    existing[f"{cfg.worker.app_id}-checkpoints"] = meta(4)
    assert topic_problems(cfg, existing, 4) == []
    del existing[cfg.topics.dns]
    existing[cfg.topics.gpu] = meta(1)  # re-created by a client's metadata request with the broker's default
    problems = topic_problems(cfg, existing, 4)
    assert len(problems) == 2
    assert f"{cfg.topics.dns!r} is missing" in problems[0] and "--create-topics" in problems[0]
    assert f"{cfg.topics.gpu!r} has 1 partition(s), the worker started with 4" in problems[1]


@pytest.mark.slow
def test_a_running_worker_reports_a_deleted_topic_and_its_return(bootstrap):
    env = topic_env(bootstrap, "topiccheck", partitions=2)
    env["GPUSENTRY_WORKER__TOPIC_CHECK_S"] = "1"
    worker = WorkerProcess(env, "topiccheck").start()
    dns = env["GPUSENTRY_TOPICS__DNS"]
    try:
        deadline = time.monotonic() + 60
        while "feedback applied" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.3)
        admin = AdminClient({"bootstrap.servers": bootstrap})  # kept: its futures die with it
        for future in admin.delete_topics([dns]).values():
            future.result(30)
        deadline = time.monotonic() + 30
        while f"topic {dns!r} is missing" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert f"topic {dns!r} is missing" in worker.log(), worker.log()[-3000:]
        assert worker.metric("gpusentry_worker_topic_problems") == 1
        time.sleep(2.0)  # Kafka finishes deleting before the same name can be created again
        create_topics(bootstrap, [dns], partitions=2)
        deadline = time.monotonic() + 30
        while "as the worker started with them again" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "as the worker started with them again" in worker.log(), worker.log()[-3000:]
        assert worker.metric("gpusentry_worker_topic_problems") == 0
        assert worker.proc is not None and worker.proc.poll() is None
        assert worker.log().count(f"topic {dns!r} is missing") == 1, "said once, not at every check"
    finally:
        worker.kill()


PROBE = """
import asyncio, sys
from aiokafka import AIOKafkaProducer
if sys.argv[2] == "refuse":
    from gpusentry.broker import refuse_auto_create
    refuse_auto_create()
async def main():
    p = AIOKafkaProducer(bootstrap_servers=sys.argv[1], request_timeout_ms=3000)
    await p.start()
    try:
        await asyncio.wait_for(p.partitions_for(sys.argv[3]), 4)
    except Exception as exc:  # noqa: BLE001 - the probe only reports what happened
        print(type(exc).__name__)
    await p.stop()
asyncio.run(main())
"""


@pytest.mark.kafka
@pytest.mark.slow
def test_no_gpusentry_client_creates_a_missing_topic_even_where_the_broker_would(own_kafka):
    cluster = own_kafka(broker_config={"auto.create.topics.enable": "true"})

    def probe(mode: str, topic: str) -> set[str]:
        subprocess.run([sys.executable, "-c", PROBE, cluster.bootstrap_servers, mode, topic], check=True,
                       timeout=60, capture_output=True)
        return set(AdminClient({"bootstrap.servers": cluster.bootstrap_servers}).list_topics(timeout=10).topics)

    assert "made.by.aiokafka" in probe("plain", "made.by.aiokafka"), "aiokafka alone asks the broker to create"
    assert "never.made" not in probe("refuse", "never.made")


def test_topics_create_makes_every_topic_with_its_configuration_and_exits(bootstrap):
    """What a deployment's topic job runs (the Helm chart's pre-install hook): every topic at kafka.partitions,
    the checkpoint topic compacted, the feedback topic kept for ever; a second run changes nothing."""
    import os

    from confluent_kafka.admin import ConfigResource

    tag = f"create{os.getpid()}x{int(time.time() * 1000) % 100000}"
    env = {**os.environ, "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_KAFKA__PARTITIONS": "3",
           "GPUSENTRY_WORKER__APP_ID": f"app-{tag}",
           **{f"GPUSENTRY_TOPICS__{k.upper()}": f"t.{tag}.{k}"
              for k in ("gpu", "process", "network", "dns", "alerts", "deadletter", "feedback")}}
    env.pop("GPUSENTRY_CONFIG", None)
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "topics", "create"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "3 partitions each" in r.stdout
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = admin.list_topics(timeout=15).topics
    for k in ("gpu", "process", "network", "dns", "alerts", "deadletter", "feedback"):
        assert len(topics[f"t.{tag}.{k}"].partitions) == 3, k
    ckpt = f"app-{tag}-checkpoints"
    assert len(topics[ckpt].partitions) == 3
    resources = [ConfigResource("topic", ckpt), ConfigResource("topic", f"t.{tag}.feedback")]
    configs = {res.name: fut.result(30) for res, fut in admin.describe_configs(resources).items()}
    assert configs[ckpt]["cleanup.policy"].value == "compact"
    assert configs[f"t.{tag}.feedback"]["retention.ms"].value == "-1"
    unreachable = {**env, "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "topics", "create"], env=unreachable,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "cannot reach Kafka at '127.0.0.1:1'" in r.stderr, r.stderr
