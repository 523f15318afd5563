"""Worker failures on the real broker: SIGKILL and restart, and a partition moving between two workers.

The input is a fleet of hosts whose process events open an incident, resolve it 10+ minutes (event
time) later and open a second one; each host's incident spans the kill or the move.  The expected
alerts come from the detection engine run in this process over the same messages in the same
per-host order: the worker(s) must publish exactly those, each once.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from detectors.engine import Engine
from gpusentry import contract as c
from tests.streams_helpers import (
    T0,
    WorkerProcess,
    alerts_of,
    benign_start,
    miner_start,
    produce,
    producer,
    read_topic,
    topic_env,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HOSTS = [f"gpu-node-{i:02d}" for i in range(16)]
CYCLES = 140
SPLIT = 90  # cycles before the kill / the second worker


def host_messages(index: int, host: str) -> list[list[dict[str, Any]]]:
    """One process-event batch per 10 s cycle: a miner at cycle 20+2i, resolved ~650 s later, a second one."""
    first, second = 20 + 2 * index, 20 + 2 * index + 80
    out = []
    for k in range(CYCLES):
        t = T0 + 10 * k
        batch = [benign_start(host, t, pid=10_000 + k)]
        if k in (first, second):
            batch.append(miner_start(host, t + 1, pid=31_000 + k))
        out.append(batch)
    return out


def expected_alerts(messages: dict[str, list[list[dict[str, Any]]]]) -> Counter[str]:
    engine = Engine(strict=True)
    ids: Counter[str] = Counter()
    for batches in messages.values():
        for batch in batches:
            for ev in batch:
                for alert in engine.process(c.validate_or_raise(c.expand_dotted(ev))):
                    ids[alert["event"]["id"]] += 1
    return ids


def produce_cycles(bootstrap: str, topic: str, messages: dict[str, list[list[dict[str, Any]]]], cycles: range) -> None:
    p = producer(bootstrap)
    for k in cycles:
        for host, batches in messages.items():
            produce(p, topic, host, batches[k])
    assert p.flush(30) == 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def check_alerts(bootstrap: str, env: dict[str, str], expected: Counter[str], logs: str) -> list[dict[str, Any]]:
    total = sum(expected.values())
    got = alerts_of(read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= total,
                               timeout=90, settle=3.0))
    ids = Counter(a["event"]["id"] for a in got)
    doubled = {k: n for k, n in ids.items() if n > 1}
    assert not doubled, f"alerts published twice: {doubled}"
    missing = expected - ids
    assert not missing, f"{len(missing)} alerts lost of {total}; worker logs:\n{logs[-4000:]}"
    assert ids == expected
    # Each host's incidents: open, resolved (same dedup key: the state crossed the kill/move), open again.
    for host in HOSTS:
        mine = [a["gpusentry"]["alert"] for a in got if a["host"]["name"] == host]
        resolved = [a for a in mine if a["status"] == "resolved"]
        assert resolved, f"{host}: no resolved incident"
        assert any(a["status"] == "open" and a["dedup_key"] == resolved[0]["dedup_key"] for a in mine)
    return got


def on_kafka(exact: bool | None) -> bool:
    """Whether the worker may trust partition ends: on the session's Apache Kafka (not on the embedded broker)."""
    from tests.conftest import selected_broker

    return selected_broker() == "kafka" if exact is None else exact


def test_sigkill_and_restart_loses_no_alert_and_doubles_none(bootstrap, exact_high_watermark=None):
    env = topic_env(bootstrap, "kill", partitions=4, exact_high_watermark=on_kafka(exact_high_watermark))
    messages = {h: host_messages(i, h) for i, h in enumerate(HOSTS)}
    expected = expected_alerts(messages)
    assert sum(expected.values()) >= 3 * len(HOSTS)
    topic = env["GPUSENTRY_TOPICS__PROCESS"]
    first = WorkerProcess(env, "kill-a").start()
    second = WorkerProcess(env, "kill-b")
    try:
        produce_cycles(bootstrap, topic, messages, range(SPLIT))
        read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= 12, timeout=60)
        first.kill()  # mid-stream: alerts sent, some of them after the last checkpoint
        assert first.metric("gpusentry_worker_checkpoints_total") == 0.0  # really gone
        produce_cycles(bootstrap, topic, messages, range(SPLIT, CYCLES))
        second.start()
        check_alerts(bootstrap, env, expected, first.log() + second.log())
        assert second.metric("gpusentry_worker_restores_total") >= 1, "no checkpoint was restored"
        skipped_or_deduplicated = (second.metric("gpusentry_worker_alerts_deduplicated_total"),
                                   second.metric("gpusentry_worker_messages_total"))
        print("after restart: deduplicated alerts, messages processed:", skipped_or_deduplicated)
    finally:
        first.kill()
        assert second.stop() == 0, second.log()[-3000:]


def test_two_workers_share_partitions_and_incidents_survive_the_move(bootstrap, exact_high_watermark=None):
    env = topic_env(bootstrap, "pair", partitions=4, exact_high_watermark=on_kafka(exact_high_watermark))
    messages = {h: host_messages(i, h) for i, h in enumerate(HOSTS)}
    expected = expected_alerts(messages)
    topic = env["GPUSENTRY_TOPICS__PROCESS"]
    a = WorkerProcess(env, "pair-a").start()
    b = WorkerProcess(env, "pair-b")
    try:
        produce_cycles(bootstrap, topic, messages, range(SPLIT))
        read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= 1, timeout=60)
        b.start()  # the group rebalances: some of a's partitions, with open incidents, move to b
        wait_for(lambda: b.metric("gpusentry_worker_restores_total") >= 1, 60, "the second worker to take over")
        produce_cycles(bootstrap, topic, messages, range(SPLIT, CYCLES))
        check_alerts(bootstrap, env, expected, a.log() + b.log())
        assert a.metric("gpusentry_worker_messages_total") > 0 and b.metric("gpusentry_worker_messages_total") > 0
        assert b.metric("gpusentry_worker_alerts_total") > 0, "the moved partitions' incidents did not go on"
    finally:
        assert b.stop() == 0, b.log()[-3000:]
        assert a.stop() == 0, a.log()[-3000:]
