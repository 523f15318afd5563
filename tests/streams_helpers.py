"""Helpers for the stream-worker tests: worker subprocesses, producing agent-style batches, reading topics."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from gpusentry import contract as c
from gpusentry.broker import create_topics, free_port

_ids = itertools.count()
REPO = Path(__file__).resolve().parent.parent
T0 = 1_790_000_000.0


def topic_env(bootstrap: str, stem: str, partitions: int = 1, replication_factor: int = 1,
              exact_high_watermark: bool = False) -> dict[str, str]:
    """Environment for a worker on fresh, unique topics (all pre-created with ``partitions``);
    ``exact_high_watermark`` on Apache Kafka only (docs/brokers.md)."""
    tag = f"{stem}{os.getpid()}x{next(_ids)}x{int(time.time() * 1000) % 100000}"
    names = {k: f"t.{tag}.{k}" for k in ("gpu", "process", "network", "dns", "alerts", "deadletter", "feedback")}
    create_topics(bootstrap, names.values(), partitions=partitions, replication_factor=replication_factor,
                  topic_config={"min.insync.replicas": "2"} if replication_factor > 1 else None)
    env = {f"GPUSENTRY_TOPICS__{k.upper()}": v for k, v in names.items()}
    env.update({"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_KAFKA__PARTITIONS": str(partitions),
                "GPUSENTRY_WORKER__APP_ID": f"app-{tag}", "GPUSENTRY_WORKER__CHECKPOINT_INTERVAL_S": "0.5",
                "GPUSENTRY_WORKER__SESSION_TIMEOUT_S": "6",
                "GPUSENTRY_KAFKA__EXACT_HIGH_WATERMARK": "true" if exact_high_watermark else "false"})
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], name: str = "worker", metrics_port: int | None = None) -> None:
        self.env = {**os.environ, **env, "GPUSENTRY_LOGGING__LEVEL": "INFO"}
        self.env.pop("GPUSENTRY_CONFIG", None)
        self.metrics_port = metrics_port or free_port()
        self.env["GPUSENTRY_WORKER__METRICS_PORT"] = str(self.metrics_port)
        fd, self.log_path = tempfile.mkstemp(prefix=f"gpusentry-{name}-", suffix=".log")
        os.close(fd)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "worker", "--create-topics"],
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def metrics_text(self) -> str:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return ""

    def metric(self, name: str, **labels: str) -> float:
        text = self.metrics_text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head, _, value = line.rpartition(" ")
                if head.split("{")[0] != name:
                    continue
                if all(f'{k}="{v}"' in head for k, v in labels.items()):
                    total += float(value)
        return total


def producer(bootstrap: str, *, idempotent: bool = False) -> Producer:
    """A producer keyed like the agents' (murmur2).  ``idempotent`` (as the agent publishes) keeps each partition's
    order through broker restarts and leader changes; without it a retry can land a batch behind later ones."""
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": idempotent,
                     "message.max.bytes": 12_000_000, "partitioner": "murmur2_random"})


def produce(p: Producer, topic: str, host: str | None, value: bytes | Any, **kw: Any) -> None:
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    p.produce(topic, data, key=host.encode() if host else None, **kw)
    p.poll(0)


def read_topic(bootstrap: str, topic: str, *, until: Callable[[list[dict[str, Any]]], bool],
               timeout: float = 60.0, settle: float = 0.0) -> list[dict[str, Any]]:
    """Read every message of ``topic`` (all partitions) until ``until(messages)`` holds, then ``settle`` more."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{next(_ids)}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    meta = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    done_at: float | None = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                value = msg.value()
                out.append({"key": msg.key(), "value": orjson.loads(value) if value else None,
                            "headers": dict(msg.headers() or []), "partition": msg.partition()})
            if done_at is None and until(out):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= settle:
                break
    finally:
        consumer.close()
    return out


def gpu_batch(host: str, t: float, *, n_gpus: int = 2, miner: bool = False) -> list[dict[str, Any]]:
    procs = [{"pid": 31337, "used_memory_bytes": 5_000_000_000, "sm_pct": 99, "name": "xmrig",
              "executable": "/tmp/.x/xmrig", "command_line": "xmrig -o pool:3333"}] if miner else []
    return [c.gpu_event(host, t, index=i, uuid=f"GPU-{host}-{i}", name="NVIDIA H100 80GB HBM3",
                        gpu_pct=100 if miner else 35, memory_pct=20, memory_used_bytes=6_000_000_000,
                        memory_total_bytes=85_899_345_920, power_draw_watts=400 if miner else 180,
                        power_limit_watts=700, temperature_c=60, sm_clock_mhz=1410, mem_clock_mhz=2619,
                        processes=procs if i == 0 else [], event_id=f"gpu-{host}-{i}-{int(t * 1000)}")
            for i in range(n_gpus)]


def miner_start(host: str, t: float, pid: int = 31337) -> dict[str, Any]:
    return c.process_event(host, t, action="start", pid=pid, name="xmrig", executable="/tmp/.x/xmrig",
                           command_line="/tmp/.x/xmrig -o stratum+tcp://pool.example:3333", args=["/tmp/.x/xmrig"],
                           parent_pid=1, parent_name="bash", user_name="ml", event_id=f"proc-{host}-{pid}-{t}")


def benign_start(host: str, t: float, pid: int) -> dict[str, Any]:
    return c.process_event(host, t, action="start", pid=pid, name="python3", executable="/usr/bin/python3",
                           command_line="/usr/bin/python3 train.py", args=["/usr/bin/python3", "train.py"],
                           parent_pid=1, parent_name="bash", user_name="ml", event_id=f"proc-{host}-{pid}-{t}")


def alerts_of(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["value"] for m in messages if m["value"] is not None]
