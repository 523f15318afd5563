"""A leader change in a three-node Apache Kafka cluster while the agent publishes and the worker consumes.

Topics are replicated three times with ``min.insync.replicas=2``; the node leading the GPU topic's partition is
SIGKILLed mid-stream and started again later with its data.  The agent's idempotent producer moves to the new
leader by itself, the worker's consumer too: every event the agent wrote to its own log reaches the worker exactly
once (a resent copy is dropped by the worker, so its event count is the agent's), and neither process restarts.
"""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka.admin import AdminClient

from agents.agent import Agent
from gpusentry.config import Config
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml
from tests.streams_helpers import WorkerProcess, topic_env

pytestmark = [pytest.mark.broker, pytest.mark.kafka, pytest.mark.slow]

HOST = "leader-change-node"


@pytest.fixture
def cluster(own_kafka):
    return own_kafka(3)


def leader_of(bootstrap: str, topic: str) -> int:
    """The partition's leader. Right after a topic is created, a broker's metadata may not list its partition yet
    (the controller answered; the others learn it a moment later): asked again until it does, 30 s at most."""
    import time

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 30
    while True:
        partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
        if 0 in partitions and partitions[0].leader >= 0:
            return partitions[0].leader
        assert time.monotonic() < deadline, f"no leader for {topic} partition 0 after 30 s: {partitions}"
        time.sleep(0.2)


def test_a_leader_change_loses_and_doubles_nothing_between_agent_and_worker(cluster, tmp_path):
    bootstrap = cluster.bootstrap_servers
    env = topic_env(bootstrap, "leader", partitions=1, replication_factor=3, exact_high_watermark=True)
    gpu_topic = env["GPUSENTRY_TOPICS__GPU"]
    old_leader = leader_of(bootstrap, gpu_topic)
    cfg = Config()
    cfg.agent.host_name = HOST
    cfg.agent.spool_dir = str(tmp_path / "spool")
    cfg.agent.collectors = ["gpu"]
    cfg.kafka.bootstrap_servers = bootstrap
    cfg.topics.gpu = gpu_topic
    sent_log = tmp_path / "sent.jsonl"
    agent = Agent(cfg, outputs=["kafka", f"jsonl:{sent_log}"], strict=True,
                  nvml=FakeNvml([FakeGpu(f"GPU-{i}", gpu_pct=10 * i) for i in range(4)]).module())
    worker = WorkerProcess(env, "leader").start()
    agent.start()
    try:
        def cycles(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                agent.run_cycle()
                time.sleep(0.2)

        cycles(3.0)
        cluster.kill_node(old_leader)  # the partition's leader, mid-stream
        new_leader, waited = old_leader, time.monotonic()
        while new_leader in (old_leader, -1) and time.monotonic() - waited < 30:
            cycles(1.0)  # the controller moves leadership once it misses the node's heartbeats
            new_leader = leader_of(bootstrap, gpu_topic)
        cycles(3.0)
        cluster.start_node(old_leader)  # back with its data; it catches up as a follower
        cycles(3.0)
        sink = agent.kafka_sink()
        assert sink is not None and sink.drain(60), "the agent's spool did not empty after the leader change"
    finally:
        agent.close()
    sent = [orjson.loads(line)["event"]["id"] for line in sent_log.read_bytes().splitlines()]
    try:
        deadline = time.monotonic() + 90
        while worker.metric("gpusentry_worker_events_total", topic=gpu_topic) < len(sent) \
                and time.monotonic() < deadline:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
            time.sleep(0.5)
        time.sleep(2.0)  # anything beyond the agent's events would be a doubled one
        processed = worker.metric("gpusentry_worker_events_total", topic=gpu_topic)
        resent = worker.metric("gpusentry_worker_resent_messages_total")
        alive = worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.kill()
    assert new_leader != old_leader and new_leader > 0, "no leader change happened"
    assert len(sent) == len(set(sent)) and len(sent) > 40
    assert processed == len(sent), f"the worker processed {processed} events of the agent's {len(sent)} " \
                                   f"({resent} resent message(s) dropped)"
    assert alive, "the worker exited during the leader change"
