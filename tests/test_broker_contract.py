"""Contract events through a real Kafka-protocol broker with confluent-kafka, the way agents send them."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from gpusentry import contract as c

pytestmark = pytest.mark.broker


def consume_all(bootstrap: str, topic: str, partitions: int, expected: int, timeout: float = 30.0) -> list:
    # assign() rather than subscribe(): no group join, so no rebalance wait.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 100, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg)
    finally:
        consumer.close()
    return got


def test_batched_contract_events_round_trip_through_the_broker(bootstrap, topic_factory):
    topic = topic_factory("gpu", partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": "lz4", "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5})
    sent: dict[str, list[dict]] = {}
    for cycle in range(5):
        for host in ("node-a", "node-b", "node-c", "node-d"):
            batch = [c.gpu_event(host, 1_790_000_000 + cycle, index=i, uuid=f"GPU-{host}-{i}", name="H100",
                                 gpu_pct=10.0 * i) for i in range(4)]
            sent.setdefault(host, []).extend(batch)
            producer.produce(topic, key=host, value=c.encode(batch))
    producer.produce(topic, key="node-a", value=b"{garbage")
    assert producer.flush(15) == 0

    messages = consume_all(bootstrap, topic, 3, expected=21)
    assert len(messages) == 21
    received: dict[str, list[dict]] = {}
    partition_of: dict[str, set[int]] = {}
    rejects = []
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        decoded = c.decode_message(msg.value(), key=msg.key())
        rejects.extend(decoded.rejects)
        for ev in decoded.events:
            received.setdefault(c.host_of(ev), []).append(ev)
            partition_of.setdefault(c.host_of(ev), set()).add(msg.partition())
    assert received == sent  # every event, in order per host
    assert all(len(p) == 1 for p in partition_of.values())  # a host's events stay on one partition
    assert [r.code for r in rejects] == [c.RejectCode.NOT_JSON]
