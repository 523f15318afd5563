"""Replay throughput: events/s of `gpusentry replay` on a mixed fleet stream, against a bare orjson loop.

The stream (generated here, seeded, so every run reads the same bytes) is what a fleet sends: mostly
GPU samples (8 GPUs per host, 5 s apart, each with its process list), plus process starts, outbound
flows with payloads and DNS answers; a few hosts are hijacked (a renamed miner with a pool URL, Stratum
flows, pool DNS), so correlation and alerting run too.  Figures, all on one core in this process:

* baseline: ``orjson.loads`` of every line (the least any replay must do);
* validate: baseline plus contract validation;
* replay: ``run_replay`` end to end (read, decode, validate, every detector, correlation, alerts out);
* no-sandbox: replay without the agent-sandbox detectors (what they cost, in the same rounds);
* no-campaign: replay without the container-launch and known-malware detectors;
* no-agent-health: replay without agent.silent and agent.tampered (they read every GPU sample);
* no-allocation: replay without the allocation detectors (half the hosts report their scheduler's
  allocation on every sample, with each process's pod, as a Kubernetes node's agent does);
* replay-60s: the same with ``[detection.gpu] window_s = 60`` (half as many model updates per GPU;
  shown for the trade-off, the target is judged on the defaults).

Printed as events/s and as ratios to the baseline, each the fastest of --repeat interleaved rounds (this
machine is shared; the median round is printed too).  Target: replay >= 50,000 events/s.  The GPU
detectors of a host share their per-GPU windows and process table, so each one measured alone pays
for parsing and windowing that in a full engine is done once: the benchmark also prints what they
add together.

    python bench/replay_throughput.py [--hosts 16] [--minutes 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from detectors.engine import Engine, discover  # noqa: E402
from gpusentry import contract as c  # noqa: E402
from gpusentry.config import Config  # noqa: E402
from gpusentry.replay import run_replay  # noqa: E402

T0 = 1_790_000_000.0
TARGET_EVENTS_PER_S = 50_000
GPU_MODELS = [("NVIDIA H100 80GB HBM3", 80, 700), ("NVIDIA A100-SXM4-80GB", 80, 400), ("NVIDIA L40S", 48, 350)]
SUBSCRIBE = b'{"id":1,"method":"mining.subscribe","params":["xmrig/6.21.0"]}\n'


def fleet_stream(hosts: int, minutes: float, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    lines: list[tuple[float, bytes]] = []
    hijacked = {f"node-{i:03d}" for i in range(0, hosts, 16)}
    for h in range(hosts):
        host = f"node-{h:03d}"
        model, mem_gb, watts = GPU_MODELS[h % len(GPU_MODELS)]
        offset = rng.random() * 5
        t = 0.0
        pid = 1000 + h
        lines.append((offset, orjson.dumps(c.process_event(
            host, T0 + offset, action="start", pid=pid, name="python3", executable="/usr/bin/python3",
            command_line="python3 train.py --epochs 90", args=["python3", "train.py", "--epochs", "90"],
            parent_pid=1, parent_name="torchrun", user_name="ml"))))
        if host in hijacked:
            lines.append((offset + 60, orjson.dumps(c.process_event(
                host, T0 + offset + 60, action="start", pid=31337, name="kworker", executable="/dev/shm/.k/kworker",
                command_line="kworker -o stratum+tcp://10.9.9.9:3333 -a kawpow", parent_pid=1, parent_name="sh"))))
        scheduled = h % 2 == 1  # these hosts' agents report the kubelet's allocation (docs/scheduler.md)
        pod = {"kind": "kubernetes", "namespace": "ml", "pod": f"trainer-{h}", "pod_uid": f"00000000-0000-4000-8000-{h:012d}"}
        allocation = {"source": "kubernetes", "state": "current", "age_s": 2.0, "judges_host_processes": True,
                      "owners": [{**pod, "container": "main", "resource": "nvidia.com/gpu"}]} if scheduled else None
        owner = {**pod, "container_id": f"{h:064x}"} if scheduled else None
        while t < minutes * 60:
            ts = offset + t
            for g in range(8):
                util = 92 + rng.random() * 8
                lines.append((ts, orjson.dumps(c.gpu_event(
                    host, T0 + ts, index=g, uuid=f"GPU-{h:03d}-{g}", name=model, gpu_pct=round(util, 1),
                    memory_pct=round(util * 0.6, 1), memory_used_bytes=int(mem_gb * 0.9 * 2**30),
                    memory_total_bytes=mem_gb * 2**30, power_draw_watts=round(watts * 0.8, 1),
                    power_limit_watts=watts, temperature_c=65, sm_clock_mhz=1980, mem_clock_mhz=2619,
                    pcie_rx_bytes_per_s=2.1e9, pcie_tx_bytes_per_s=1.9e9,
                    processes=[{"pid": pid, "used_memory_bytes": int(mem_gb * 0.88 * 2**30), "sm_pct": 90,
                                "name": "python3", "executable": "/usr/bin/python3",
                                "command_line": "python3 train.py --epochs 90", "owner": owner}],
                    allocation=allocation))))
            if rng.random() < 0.1:
                miner = host in hijacked and t > 60
                payload = SUBSCRIBE if miner else b"GET /v1/models HTTP/1.1\r\nHost: api\r\n\r\n"
                lines.append((ts + 0.5, orjson.dumps(c.network_event(
                    host, T0 + ts + 0.5, source_ip="10.0.0.5", source_port=40000 + int(t) % 20000,
                    destination_ip="10.9.9.9" if miner else "10.0.1.20", destination_port=3333 if miner else 8080,
                    pid=31337 if miner else pid, process_name="kworker" if miner else "python3",
                    payload_b64=base64.b64encode(payload).decode()))))
            if rng.random() < 0.05:
                name = "xmr.nanopool.org" if host in hijacked and t > 60 else "huggingface.co"
                lines.append((ts + 0.2, orjson.dumps(c.dns_event(host, T0 + ts + 0.2, question=name,
                                                                 resolved_ips=["10.9.9.9"]))))
            t += 5.0
    lines.sort(key=lambda x: x[0])
    return [line for _, line in lines]


# The detectors of the agent-sandbox work, measured against a replay without them (a new detector may
# cost at most 10 % of replay time).
AGENTIC = frozenset({"process.tunnel", "process.reverse_shell", "network.tunnel_wire", "network.internal_probe",
                     "sandbox.gpu_process"})
SANDBOX_BUDGET = 0.10
ALLOCATION = frozenset({"gpu.outside_allocation", "gpu.unallocated_use"})
# Real-campaign coverage: miners started as containers, known cryptojacking malware names, tampering.
CAMPAIGN = frozenset({"process.miner_container", "process.known_malware", "process.defense_tampering"})
AGENT_HEALTH = frozenset({"agent.silent", "agent.tampered"})


def _run(engine: Engine, events: list) -> None:  # noqa: ANN001
    for ev in events:
        engine.process(ev)


def timed(fn) -> float:  # noqa: ANN001
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each figure is its best round")
    args = parser.parse_args()
    lines = fleet_stream(args.hosts, args.minutes)
    n = len(lines)
    discover()  # import every detector (river, scipy) before any clock starts
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        size_mb = path.stat().st_size / 2**20

        def baseline() -> None:
            with path.open("rb") as fh:
                for line in fh:
                    orjson.loads(line)

        def validate() -> None:
            with path.open("rb") as fh:
                for line in fh:  # as replay does it
                    c.validate_event(orjson.loads(line),
                                     dotted_keys=None if c.may_have_dotted_keys(line) else False)

        alerts: list[int] = []

        def replay() -> None:
            summary = run_replay([path], Config(), out=Path(os.devnull))
            assert summary.events_read == n and summary.rejected == 0, summary.describe()
            alerts.append(summary.alerts)

        def rules_only() -> None:
            engine = Engine(detectors=[cls() for cls in discover() if not cls.id.startswith("gpu.")])
            run_replay([path], Config(), out=Path(os.devnull), engine=engine)

        def without_agentic() -> None:
            engine = Engine(detectors=[cls() for cls in discover() if cls.id not in AGENTIC])
            run_replay([path], Config(), out=Path(os.devnull), engine=engine)

        def without_allocation() -> None:
            engine = Engine(detectors=[cls() for cls in discover() if cls.id not in ALLOCATION])
            run_replay([path], Config(), out=Path(os.devnull), engine=engine)

        def without_campaign() -> None:
            engine = Engine(detectors=[cls() for cls in discover() if cls.id not in CAMPAIGN])
            run_replay([path], Config(), out=Path(os.devnull), engine=engine)

        def without_agent_health() -> None:
            engine = Engine(detectors=[cls() for cls in discover() if cls.id not in AGENT_HEALTH])
            run_replay([path], Config(), out=Path(os.devnull), engine=engine)

        def replay_60s() -> None:
            cfg = Config()
            cfg.detection.gpu.window_s = 60.0
            run_replay([path], cfg, out=Path(os.devnull))

        # Rounds interleave the measurements, so a spell of load from other jobs on this shared machine
        # slows one round of each rather than every run of one; each figure is its fastest round (the
        # least disturbed), and the median round is printed beside it.
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for name, fn in (("baseline", baseline), ("validate", validate), ("no-gpu", rules_only),
                             ("no-sandbox", without_agentic), ("no-allocation", without_allocation), ("no-campaign", without_campaign), ("no-agent-health", without_agent_health),
                             ("replay", replay),
                             ("replay-60s", replay_60s)):
                runs.setdefault(name, []).append(timed(fn))
        results = {name: min(times) for name, times in runs.items()}
        events = [c.validate_event(orjson.loads(line)) for line in lines]
        # Per-detector costs are differences of small figures: each side is the best of --repeat runs.
        bare = min(timed(lambda: _run(Engine(detectors=[]), events)) for _ in range(args.repeat))
        gpu_classes = [cls for cls in discover() if cls.id.startswith("gpu.")]
        gpu_together = (min(timed(lambda: _run(Engine(detectors=[cls() for cls in gpu_classes]), events))
                            for _ in range(args.repeat)) - bare) / n
        per_detector = {cls.id: (min(timed(lambda cls=cls: _run(Engine(detectors=[cls()]), events))
                                     for _ in range(args.repeat)) - bare) / n
                        for cls in discover()}
    gpu_share = sum(1 for line in lines if b'"gpusentry.gpu"' in line) / n
    print(f"replay throughput: {n:,} events ({gpu_share:.0%} GPU samples), {args.hosts} hosts x 8 GPUs, "
          f"{args.minutes:g} min, {size_mb:.1f} MiB; best of {args.repeat} interleaved rounds (median round "
          "in brackets), CPU time of one core")
    base = results["baseline"]
    for name, secs in results.items():
        median = statistics.median(runs[name])
        print(f"  {name:13s} {n / secs:>12,.0f} events/s   {secs / n * 1e6:7.2f} us/event   "
              f"{secs / base:6.2f}x baseline time   [{n / median:,.0f} events/s]")
    rate = n / results["replay"]
    print(f"  alerts raised per replay: {alerts[-1]}; 'no-gpu' is replay with every detector but the gpu.* ones")
    print(f"  engine without detectors (dispatch + correlation): {bare / n * 1e6:.2f} us/event; each detector adds:")
    for rule, cost in sorted(per_detector.items(), key=lambda kv: -kv[1]):
        print(f"    {rule:34s} {cost * 1e6:8.2f} us/event")
    print(f"  the gpu.* detectors together add {gpu_together * 1e6:.2f} us/event (alone, each pays the per-sample "
          "parsing and windowing they share)")
    added = results["replay"] / results["no-sandbox"] - 1
    alone = sum(per_detector[rule] for rule in AGENTIC) / (results["replay"] / n)
    print(f"  the agent-sandbox detectors ({', '.join(sorted(AGENTIC))}) add {added:+.1%} to replay time "
          f"(replay against 'no-sandbox', same rounds) and {alone:.1%} measured one by one; budget "
          f"+{SANDBOX_BUDGET:.0%}")
    added = results["replay"] / results["no-allocation"] - 1
    alone = sum(per_detector[rule] for rule in ALLOCATION) / (results["replay"] / n)
    print(f"  the allocation detectors ({', '.join(sorted(ALLOCATION))}) add {added:+.1%} to replay time "
          f"(replay against 'no-allocation', same rounds) and {alone:.1%} measured one by one; budget "
          f"+{SANDBOX_BUDGET:.0%}")
    added = results["replay"] / results["no-campaign"] - 1
    alone = sum(per_detector[rule] for rule in CAMPAIGN) / (results["replay"] / n)
    print(f"  the campaign detectors ({', '.join(sorted(CAMPAIGN))}) add {added:+.1%} to replay time "
          f"(replay against 'no-campaign', same rounds) and {alone:.1%} measured one by one; budget "
          f"+{SANDBOX_BUDGET:.0%}")
    added = results["replay"] / results["no-agent-health"] - 1
    alone = sum(per_detector[rule] for rule in AGENT_HEALTH) / (results["replay"] / n)
    print(f"  the agent-health detectors ({', '.join(sorted(AGENT_HEALTH))}) add {added:+.1%} to replay time "
          f"(replay against 'no-agent-health', same rounds; alone each also parses every GPU sample, which the "
          f"GPU detectors otherwise share: {alone:.1%}); budget +{SANDBOX_BUDGET:.0%}")
    verdict = "meets" if rate >= TARGET_EVENTS_PER_S else "MISSES"
    print(f"replay {verdict} the {TARGET_EVENTS_PER_S:,} events/s target ({rate:,.0f} events/s, "
          f"{results['replay'] / base:.1f}x a bare orjson decode loop)")
    if rate < TARGET_EVENTS_PER_S:
        sys.exit(1)


if __name__ == "__main__":
    main()
