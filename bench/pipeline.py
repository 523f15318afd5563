"""Benchmark of one stream worker on the real broker, against baselines measured in the same run.

1. Throughput on a realistic mix: simulated 8-GPU hosts (benign work and hijacks) sampled every 5 s,
   as agent-style messages (one per host per dataset per cycle), preloaded on the event topics.
   Printed beside baselines on the same events: the detection engine's own `replay` rate (the same
   events as a JSONL file, read, decoded, validated and detected: the ceiling, measured before and
   after the worker and averaged), ``Engine.process`` alone on events decoded beforehand (stricter:
   no decoding at all), and a plain consume-and-decode loop (aiokafka + contract decoding, no engine).
   Targets: >= 10,000 events/s per worker and >= half the engine's own rate.
2. End-to-end latency at a fixed 5,000 events/s (3,125 eight-GPU hosts reporting every 5 s of wall time, plus a
   miner start on a new host ten times a second): from the event's ``@timestamp`` at the producer to
   the alert's arrival on the alerts topic.  Target: p99 < 1 s.

Usage: python bench/pipeline.py [--hosts 64] [--duration 1500] [--latency-s 20] [--rate 5000] [--broker both]
``--broker both`` (the default) measures 1 and 2 on Apache Kafka and on the embedded broker in one run, against the
same baselines.  Set GPUSENTRY_BENCH_BOOTSTRAP=host:port to run against an existing Kafka instead.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from detectors.engine import Engine  # noqa: E402
from gpusentry import contract as c  # noqa: E402
from gpusentry.apache_kafka import KafkaCluster  # noqa: E402
from gpusentry.broker import EmbeddedBroker, create_topics, free_port  # noqa: E402
from gpusentry.config import Config  # noqa: E402
from gpusentry.replay import run_replay  # noqa: E402
from gpusentry.simulate import SCENARIOS, simulate_host  # noqa: E402

TOPIC_KEYS = ("gpu", "process", "network", "dns", "alerts", "deadletter", "feedback")
PARTITIONS = 6


def topics_env(bootstrap: str, tag: str) -> dict[str, str]:
    names = {k: f"bench.{tag}.{k}" for k in TOPIC_KEYS}
    create_topics(bootstrap, names.values(), partitions=PARTITIONS)
    env = {f"GPUSENTRY_TOPICS__{k.upper()}": v for k, v in names.items()}
    env.update({"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_WORKER__APP_ID": f"bench-{tag}",
                "GPUSENTRY_KAFKA__PARTITIONS": str(PARTITIONS), "GPUSENTRY_LOGGING__LEVEL": "WARNING"})
    return env


# ---------------------------------------------------------------------------- workload


def fleet_messages(hosts: int, duration_s: float, seed: int = 7) -> list[tuple[str, str, bytes, list[dict[str, Any]]]]:
    """(dataset, host, message value, events) in global time order, one message per host/dataset/cycle."""
    names = sorted(SCENARIOS)
    start = 1_790_000_000.0
    per_host: list[Iterator[tuple[float, str, str, list[dict[str, Any]]]]] = []
    for i in range(hosts):
        host = f"bench-node-{i:03d}"
        _, events = simulate_host(names[i % len(names)], host, start=start, duration_s=duration_s, interval_s=5.0,
                                  seed=seed, gpus=8)
        per_host.append(_batches(host, events))
    out = []
    for _ts, dataset, host, batch in heapq.merge(*per_host, key=lambda b: b[0]):
        out.append((dataset, host, orjson.dumps(batch), batch))
    return out


def _batches(host: str, events: Iterator[dict[str, Any]], interval_s: float = 5.0
             ) -> Iterator[tuple[float, str, str, list[dict[str, Any]]]]:
    """Group a host's events as its agent does: one message per dataset per collection cycle."""
    pending: dict[str, list[dict[str, Any]]] = {}
    cycle = None
    for ev in events:
        ts = c.event_time(ev)
        k = int(ts // interval_s)
        if cycle is not None and k != cycle:
            for batch in pending.values():
                yield c.event_time(batch[0]), batch[0]["event"]["dataset"], host, batch
            pending = {}
        cycle = k
        pending.setdefault(ev["event"]["dataset"], []).append(ev)
    for batch in pending.values():
        yield c.event_time(batch[0]), batch[0]["event"]["dataset"], host, batch


# ---------------------------------------------------------------------------- baselines


def write_jsonl(messages: list[tuple[str, str, bytes, list[dict[str, Any]]]], path: Path) -> Path:
    """The workload's events, one per line, in message order: what `gpusentry replay` reads."""
    with path.open("wb") as fh:
        for _, _, value, _ in messages:
            for ev in orjson.loads(value):
                fh.write(orjson.dumps(ev) + b"\n")
    return path


def replay_rate(path: Path, total_events: int) -> tuple[float, float, int]:
    """(events/s of wall time, events per CPU-second, alerts) of `gpusentry replay` on the same events.

    Measured in a process of its own, as a user runs it: this one holds the whole workload in memory,
    which would slow the engine's garbage collection and understate the ceiling.
    """
    return _measure_apart("replay", path, total_events)


def engine_rate(path: Path, total_events: int) -> tuple[float, float, int]:
    """(events/s of wall time, events per CPU-second, alerts) of Engine.process alone on events decoded beforehand."""
    return _measure_apart("engine", path, total_events)


def _measure_apart(what: str, path: Path, total_events: int) -> tuple[float, float, int]:
    out = subprocess.run([sys.executable, __file__, f"--measure-{what}", str(path)], check=True, capture_output=True,
                         text=True, cwd=REPO).stdout
    wall, cpu, events, alerts = orjson.loads(out.splitlines()[-1])
    assert events == total_events, (what, events, total_events)
    return events / wall, events / cpu, alerts


def _measure(what: str, path: Path) -> None:
    """Child side of _measure_apart: print [wall s, CPU s, events, alerts] as JSON."""
    import gc

    from detectors.engine import discover

    discover()  # imports (river, scipy) before the clocks start
    if what == "replay":
        t0, cpu0 = time.perf_counter(), time.process_time()
        summary = run_replay([path], Config(), out=Path(os.devnull))
        assert summary.rejected == 0, summary.describe()
        events, alerts = summary.events_read, summary.alerts
    else:
        decoded = [c.validate_or_raise(orjson.loads(line)) for line in path.read_bytes().splitlines()]
        gc.freeze()  # the decoded workload is input, not engine state: keep it out of the collector's work
        engine = Engine()
        t0, cpu0 = time.perf_counter(), time.process_time()
        alerts = sum(len(engine.process(ev)) for ev in decoded)
        events = len(decoded)
    print(orjson.dumps([time.perf_counter() - t0, time.process_time() - cpu0, events, alerts]).decode())


def produce_all(bootstrap: str, env: dict[str, str], messages: list[tuple[str, str, bytes, Any]]) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": False,
                  "partitioner": "murmur2_random", "queue.buffering.max.messages": 1_000_000,
                  "log.connection.close": False})
    topic = {f"gpusentry.{k}": env[f"GPUSENTRY_TOPICS__{k.upper()}"] for k in ("gpu", "process", "network", "dns")}
    for dataset, host, value, _ in messages:
        p.produce(topic[dataset], value, key=host.encode())
        p.poll(0)
    assert p.flush(60) == 0


async def _consume_decode(bootstrap: str, env: dict[str, str], total_events: int) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=100, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(env[f"GPUSENTRY_TOPICS__{k.upper()}"], p)
               for k in ("gpu", "process", "network", "dns") for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        t0 = time.perf_counter()
        while seen < total_events:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for r in records:
                    seen += len(c.decode_message(r.value, key=r.key.decode() if r.key else None).events)
        return seen / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------- the worker


class Worker:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "GPUSENTRY_WORKER__METRICS_PORT": str(self.port)}
        self.env.pop("GPUSENTRY_CONFIG", None)
        self.log = tempfile.NamedTemporaryFile(prefix="gpusentry-bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "worker", "--create-topics"],
                                     cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float:
        try:
            # identity: not gzip, which would cost the worker compressing each scrape
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2,
                             headers={"Accept-Encoding": "identity"}).text
        except httpx.HTTPError:
            return -1.0
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.split("{")[0].split(" ")[0] == name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def worker_rate(env: dict[str, str], total_events: int, timeout: float = 600) -> tuple[float, float]:
    """(events/s of wall time, events per CPU-second of the worker process, all its threads)."""
    import psutil

    w = Worker(env)
    try:
        proc = psutil.Process(w.proc.pid)
        deadline = time.monotonic() + timeout
        first = None
        while time.monotonic() < deadline:
            done = w.metric("gpusentry_worker_events_total")
            if done > 0 and first is None:
                cpu = proc.cpu_times()
                first = (time.perf_counter(), done, cpu.user + cpu.system)
            if done >= total_events:
                assert first is not None
                cpu = proc.cpu_times()
                return ((done - first[1]) / (time.perf_counter() - first[0]),
                        (done - first[1]) / (cpu.user + cpu.system - first[2]))
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {Path(w.log.name).read_text()[-2000:]}")
            # A Prometheus scrape costs the worker a few ms: poll at 4 Hz (real scrapers: every 15 s or so).
            time.sleep(0.25)
        raise RuntimeError(f"worker did not finish in {timeout} s ({done} of {total_events} events)")
    finally:
        w.stop()


# ---------------------------------------------------------------------------- latency


def latency(bootstrap: str, rate: int, seconds: float) -> tuple[list[float], int]:
    from confluent_kafka import Consumer, Producer, TopicPartition

    env = topics_env(bootstrap, f"lat{os.getpid()}")
    w = Worker(env)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": False,
                  "partitioner": "murmur2_random", "log.connection.close": False})
    gpu_topic, proc_topic = env["GPUSENTRY_TOPICS__GPU"], env["GPUSENTRY_TOPICS__PROCESS"]
    alerts_topic = env["GPUSENTRY_TOPICS__ALERTS"]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-latency", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 10, "log.connection.close": False})
    consumer.assign([TopicPartition(alerts_topic, i, 0) for i in range(PARTITIONS)])
    try:
        # Warm up: the worker has joined its group once a first miner's alert comes back.
        warm = f"warmup-{os.getpid()}"
        deadline = time.monotonic() + 90
        sent_warm = False
        while time.monotonic() < deadline:
            if not sent_warm and w.metric("gpusentry_worker_checkpoints_total") >= 0:
                p.produce(proc_topic, orjson.dumps([_miner(warm, time.time(), 1)]), key=warm.encode())
                p.flush(10)
                sent_warm = True
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                break
        else:
            raise RuntimeError(f"the worker never answered: {Path(w.log.name).read_text()[-2000:]}")
        hosts = rate * 5 // 8  # 8-GPU hosts every 5 s
        template = [c.gpu_event("x", 0.0, index=i, uuid=f"GPU-{i}", name="NVIDIA H100 80GB HBM3", gpu_pct=93,
                                memory_pct=40, memory_used_bytes=60 * 2**30, memory_total_bytes=80 * 2**30,
                                power_draw_watts=520, power_limit_watts=700, temperature_c=61, sm_clock_mhz=1755,
                                mem_clock_mhz=2619, pcie_rx_bytes_per_s=4e9, pcie_tx_bytes_per_s=1e9,
                                processes=[{"pid": 2000, "used_memory_bytes": 60 * 2**30, "sm_pct": None,
                                            "name": "python3", "executable": "/usr/bin/python3",
                                            "command_line": "python3 train.py"}]) for i in range(8)]
        latencies: list[float] = []
        stop = threading.Event()

        def read_alerts() -> None:
            while not stop.is_set():
                msg = consumer.poll(0.05)
                if msg is None or msg.error():
                    continue
                alert = orjson.loads(msg.value())
                if alert["host"]["name"].startswith("lat-miner-"):
                    latencies.append(time.time() - c.event_time(alert))

        reader = threading.Thread(target=read_alerts, daemon=True)
        reader.start()
        t0 = time.time()
        sent = miners = 0
        tick = 0.1  # 10 ticks a second: a tenth of the fleet's cycle and one miner each
        per_tick = hosts // 50  # hosts per tick so that each host reports every 5 s
        n = 0
        while time.time() - t0 < seconds:
            now = time.time()
            for _ in range(per_tick):
                host = f"lat-node-{n % hosts:05d}"
                n += 1
                batch = []
                for g in template:
                    ev = dict(g)
                    ev["@timestamp"] = c.format_timestamp(now)
                    ev["host"] = {"name": host}
                    ev["event"] = {**g["event"], "id": f"{host}-{n}-{g['gpu']['index']}"}
                    batch.append(ev)
                p.produce(gpu_topic, orjson.dumps(batch), key=host.encode())
                sent += len(batch)
            miner_host = f"lat-miner-{miners:05d}"
            miners += 1
            p.produce(proc_topic, orjson.dumps([_miner(miner_host, now, miners)]), key=miner_host.encode())
            sent += 1
            p.poll(0)
            delay = t0 + (n // per_tick) * tick - time.time()
            if delay > 0:
                time.sleep(delay)
        p.flush(10)
        achieved = sent / (time.time() - t0)
        time.sleep(3)
        stop.set()
        reader.join(5)
        return latencies, int(achieved)
    finally:
        consumer.close()
        w.stop()


def _miner(host: str, t: float, pid: int) -> dict[str, Any]:
    return c.process_event(host, t, action="start", pid=pid, name="xmrig", executable="/tmp/.x/xmrig",
                           command_line="/tmp/.x/xmrig -o stratum+tcp://pool.example:3333", args=["/tmp/.x/xmrig"],
                           parent_pid=1, parent_name="bash", user_name="ml")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--measure-replay", "--measure-engine"):
        _measure(sys.argv[1].removeprefix("--measure-"), Path(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=64)
    ap.add_argument("--duration", type=float, default=1500.0, help="simulated seconds per host")
    ap.add_argument("--latency-s", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=5000, help="events/s for the latency run")
    ap.add_argument("--broker", choices=("kafka", "tansu", "both"), default="both",
                    help="Apache Kafka (resolved with Maven), the embedded broker, or both in one run (default)")
    args = ap.parse_args()
    external = os.environ.get("GPUSENTRY_BENCH_BOOTSTRAP")
    kinds = ["external"] if external else (["kafka", "tansu"] if args.broker == "both" else [args.broker])
    print(f"simulating {args.hosts} eight-GPU hosts for {args.duration:.0f} s each ...", flush=True)
    messages = fleet_messages(args.hosts, args.duration)
    total = sum(len(m[3]) for m in messages)
    gpu_share = sum(len(m[3]) for m in messages if m[0] == "gpusentry.gpu") / total
    print(f"workload: {total} events in {len(messages)} messages ({total / len(messages):.1f} events/message, "
          f"{gpu_share:.1%} GPU samples)", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpusentry-bench-"))
    jsonl = write_jsonl(messages, workdir / "fleet.jsonl")
    before, before_cpu, alerts = replay_rate(jsonl, total)
    print(f"engine's replay (ceiling):   {before:10.0f} events/s  ({before_cpu:.0f} per CPU-second, "
          f"{alerts} alerts)", flush=True)
    bare, bare_cpu, _ = engine_rate(jsonl, total)
    print(f"Engine.process alone:        {bare:10.0f} events/s  ({bare_cpu:.0f} per CPU-second; "
          "events decoded and validated beforehand)", flush=True)
    results = {}
    for kind in kinds:
        print(f"--- broker: {kind}", flush=True)
        results[kind] = on_broker(kind, external, messages, total, args)
        if results[kind] is None:
            return 1
    # The machine may be shared: the ceiling is measured again right after, and the two averaged;
    # events per CPU-second compare the cost per event whatever else runs beside.
    after, after_cpu, _ = replay_rate(jsonl, total)
    jsonl.unlink()
    workdir.rmdir()
    ceiling, ceiling_cpu = (before + after) / 2, (before_cpu + after_cpu) / 2
    print(f"engine's replay, again:      {after:10.0f} events/s  ({after_cpu:.0f} per CPU-second)", flush=True)
    ok = True
    for kind, r in results.items():
        assert r is not None
        worker, worker_cpu, decode, lat = r["worker"], r["worker_cpu"], r["decode"], r["latency"]
        print(f"[{kind}] one worker (faust): {worker:10.0f} events/s  = {worker / ceiling:.2f} x the engine's replay "
              f"({ceiling:.0f}), {worker / decode:.2f} x consume+decode; per CPU-second {worker_cpu:.0f} events = "
              f"{worker_cpu / ceiling_cpu:.2f} x the replay, {worker_cpu / bare_cpu:.2f} x Engine.process alone",
              flush=True)
        print(f"[{kind}] latency at {r['achieved']} events/s, {len(lat)} alerts: p50 {pct(lat, 0.5) * 1000:.0f} ms, "
              f"p99 {pct(lat, 0.99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms", flush=True)
        ok = ok and worker >= 10_000 and worker >= ceiling / 2 and pct(lat, 0.99) < 1.0
    print(f"targets (>= 10,000 events/s, >= 0.5 x the engine's replay, p99 < 1 s): {'met' if ok else 'NOT met'}")
    return 0


def on_broker(kind: str, external: str | None, messages: list[Any], total: int,
              args: argparse.Namespace) -> dict[str, Any] | None:
    """Consume+decode, the worker's rate and the latency on one broker, started here unless external."""
    broker: Any = None
    if kind == "kafka":
        broker = KafkaCluster(nodes=1, progress=lambda line: print(line, flush=True)).start()
    elif kind == "tansu":
        broker = EmbeddedBroker().start()
    bootstrap = external or broker.bootstrap_servers
    try:
        env = topics_env(bootstrap, f"tp{os.getpid()}")
        produce_all(bootstrap, env, messages)
        decode = asyncio.run(_consume_decode(bootstrap, env, total))
        print(f"consume + decode loop:       {decode:10.0f} events/s", flush=True)
        worker, worker_cpu = worker_rate(env, total)
        print(f"one worker (faust):          {worker:10.0f} events/s", flush=True)
        lat, achieved = latency(bootstrap, args.rate, args.latency_s)
        if not lat:
            print("latency: no alerts came back", flush=True)
            return None
        return {"worker": worker, "worker_cpu": worker_cpu, "decode": decode, "latency": lat, "achieved": achieved}
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
