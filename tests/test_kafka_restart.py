"""A broker restart *with its data* (SIGKILL, a pause, the same node back), on Apache Kafka.

The normal case in production, impossible with the embedded memory broker: the worker and the forwarder keep
running through it (no exit, no restart of theirs), resume from their committed offsets, and the incidents on
the alerts topic after it are exactly those of the same events replayed, none doubled, none re-sent; every alert
reaches the webhook.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from detectors.engine import Engine
from gpusentry import contract as c
from tests import outputs_receivers as rx
from tests.streams_helpers import (
    REPO,
    T0,
    WorkerProcess,
    alerts_of,
    benign_start,
    gpu_batch,
    miner_start,
    produce,
    producer,
    read_topic,
    topic_env,
)

pytestmark = [pytest.mark.broker, pytest.mark.kafka, pytest.mark.slow]

HOSTS = [f"restart-{i}" for i in range(6)]


@pytest.fixture
def cluster(own_kafka):
    return own_kafka(1)


def stream(cycles: range) -> list[tuple[str, str, list]]:
    """(dataset, host, batch): every host opens an incident early in the first half and another in the second."""
    out = []
    for k in cycles:
        t = T0 + 10 * k
        for i, host in enumerate(HOSTS):
            batch = [benign_start(host, t, pid=10_000 + k)]
            if k in (5 + i, 90 + i):
                batch.append(miner_start(host, t + 1, pid=31_000 + k))
            out += [("gpu", host, gpu_batch(host, t)), ("process", host, batch)]
    return out


def publish(bootstrap: str, env: dict[str, str], messages: list[tuple[str, str, list]]) -> None:
    p = producer(bootstrap, idempotent=True)  # as agents publish: order kept through the restart
    topics = {"gpu": env["GPUSENTRY_TOPICS__GPU"], "process": env["GPUSENTRY_TOPICS__PROCESS"]}
    for dataset, host, batch in messages:
        produce(p, topics[dataset], host, batch)
    assert p.flush(60) == 0


def test_worker_and_forwarder_ride_through_a_broker_restart_with_data(cluster, tmp_path):
    bootstrap = cluster.bootstrap_servers
    env = topic_env(bootstrap, "brokerrestart", partitions=2, exact_high_watermark=True)
    first, second = stream(range(0, 60)), stream(range(60, 160))
    engine = Engine(strict=True)
    want: dict[str, set[str]] = defaultdict(set)
    updates = 0
    for _, _, batch in first + second:
        for ev in batch:
            for a in engine.process(c.validate_or_raise(c.expand_dotted(ev))):
                want[a["host"]["name"]].add(a["gpusentry"]["alert"]["dedup_key"])
                updates += 1

    receivers = rx.Receivers().start()
    (tmp_path / "gpusentry.toml").write_text("")
    fenv = {**os.environ, **env, "GPUSENTRY_OUTPUTS__GROUP_ID": f"restart-fwd-{time.time_ns()}",
            "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
            "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET}
    fenv.pop("GPUSENTRY_CONFIG", None)
    flog = open(tmp_path / "forward.log", "wb")  # noqa: SIM115 - closed below
    worker = WorkerProcess(env, "restart").start()
    forwarder = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "forward", "--config",
                                  str(tmp_path / "gpusentry.toml")], cwd=REPO, env=fenv, stdout=flog,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        publish(bootstrap, env, first)
        read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= len(HOSTS), timeout=120)
        cluster.kill_node(1)
        time.sleep(3)
        cluster.start_node(1)  # same data directory: topics, offsets, checkpoints and alerts are all still there
        publish(bootstrap, env, second)
        got = alerts_of(read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= updates,
                                   timeout=240, settle=5.0))
        deadline = time.monotonic() + 60
        while len(receivers.received[rx.WEBHOOK_PATH]) < len(got) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker.proc is not None and worker.proc.poll() is None, f"the worker exited:\n{worker.log()[-3000:]}"
        assert forwarder.poll() is None, "the forwarder exited:\n" + Path(tmp_path / "forward.log").read_text()[-3000:]
    finally:
        worker.kill()
        forwarder.kill()
        forwarder.wait(10)
        flog.close()
        receivers.stop()
    ids = Counter(a["event"]["id"] for a in got)
    assert not [i for i, n in ids.items() if n > 1], "updates re-sent after the restart"
    seen: dict[str, set[str]] = defaultdict(set)
    for a in got:
        seen[a["host"]["name"]].add(a["gpusentry"]["alert"]["dedup_key"])
    assert dict(seen) == dict(want), "incidents lost or doubled (or keys differing from a replay) across the restart"
    assert len(ids) == updates, f"{updates - len(ids)} update(s) missing"
    delivered = Counter(a["event"]["id"] for a in receivers.received[rx.WEBHOOK_PATH])
    assert set(delivered) == set(ids), "alerts on the topic that never reached the webhook"
    assert max(delivered.values()) == 1, "the forwarder delivered an alert twice"
