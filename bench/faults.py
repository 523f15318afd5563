"""Incident integrity under worker faults: repeated SIGKILLs and partition moves, counted from the outside.

Each run publishes a 16-host fleet on two event topics (GPU samples and process events, one batch of each per
host per 10 s cycle, as agents publish them), on 4 partitions of the embedded broker. Every host opens an
incident, resolves it ~11 minutes of event time later and opens a second. Mid-stream, at a point drawn from the
seed, a worker is SIGKILLed: either the only worker (a successor starts later, the "single" runs) or one of two
(its partitions move to the survivor, the "move" runs); the rest of the stream follows. The alerts topic is then
compared with `gpusentry replay`'s engine run over the same messages:

* missing updates: fewer distinct updates than the engine's run (within 300 s of the end of the stream);
* lost incidents: expected incidents with no alert at all;
* doubled incidents: more incidents on a host than expected (an incident opened twice; one copy never resolves);
* re-sent updates: an update on the topic more than once (same `event.id`);
* unresolved: incidents whose last update is not `resolved` although the replay resolves them;
* hosts with replay keys: hosts whose incidents carry exactly the dedup keys `replay` gives them.

Targets: all zero, in every run.

    python bench/faults.py [--runs 6] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors.engine import Engine  # noqa: E402
from gpusentry import contract as c  # noqa: E402
from gpusentry.apache_kafka import KafkaCluster, KafkaUnavailable  # noqa: E402
from gpusentry.broker import BrokerUnavailable, EmbeddedBroker  # noqa: E402
from tests.streams_helpers import (  # noqa: E402
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

HOSTS = [f"gpu-node-{i:02d}" for i in range(16)]
CYCLES = 200  # both episodes of every host's incident resolve within the stream


def fleet() -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    """Per host, its messages in publishing order: (dataset, batch), a GPU batch and a process batch per cycle."""
    out: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for i, host in enumerate(HOSTS):
        first, second = 20 + 2 * i, 20 + 2 * i + 80
        msgs = []
        for k in range(CYCLES):
            t = T0 + 10 * k
            batch = [benign_start(host, t, pid=10_000 + k)]
            if k in (first, second):
                batch.append(miner_start(host, t + 1, pid=31_000 + k))
            msgs.append(("gpu", gpu_batch(host, t)))
            msgs.append(("process", batch))
        out[host] = msgs
    return out


def expected(messages: dict[str, list[tuple[str, list[dict[str, Any]]]]]) -> tuple[dict[str, dict[str, str]], int]:
    """(host -> dedup key -> final status, number of updates), as the engine decides over the same messages in the
    same per-host order."""
    engine = Engine(strict=True)
    final: dict[str, dict[str, str]] = defaultdict(dict)
    updates = 0
    for host, msgs in messages.items():
        for _, batch in msgs:
            for ev in batch:
                for a in engine.process(c.validate_or_raise(c.expand_dotted(ev))):
                    final[host][a["gpusentry"]["alert"]["dedup_key"]] = a["gpusentry"]["alert"]["status"]
                    updates += 1
    return final, updates


def publish(bootstrap: str, env: dict[str, str], messages: dict[str, list[tuple[str, list[dict[str, Any]]]]],
            cycles: range, *, idempotent: bool = False) -> None:
    # Idempotent on Apache Kafka, as agents publish (a retry after a broker restart must not reorder a host's
    # batches); not on the embedded broker, whose idempotent producers cannot resume after it restarts.
    p = producer(bootstrap, idempotent=idempotent)
    topics = {"gpu": env["GPUSENTRY_TOPICS__GPU"], "process": env["GPUSENTRY_TOPICS__PROCESS"]}
    for k in cycles:
        for host, msgs in messages.items():
            for dataset, batch in msgs[2 * k:2 * k + 2]:
                produce(p, topics[dataset], host, batch)
    assert p.flush(30) == 0


def one_run(broker: Any, kind: str, rng: random.Random, messages: dict[str, Any],
            want: dict[str, dict[str, str]], updates: int) -> dict[str, Any]:
    bootstrap = broker.bootstrap_servers
    env = topic_env(bootstrap, f"fault{kind}", partitions=4)
    split = rng.randrange(50, 150)
    workers = [WorkerProcess(env, f"{kind}-a").start()]
    if kind == "move":
        workers.append(WorkerProcess(env, f"{kind}-b").start())
    idempotent = isinstance(broker, KafkaCluster)
    try:
        publish(bootstrap, env, messages, range(split), idempotent=idempotent)
        read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= 8, timeout=90)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere between two checkpoints
        if kind == "restart":
            # The broker, not the worker: SIGKILL, a pause, the same node back with its data.
            broker.kill_node(1)
            time.sleep(rng.uniform(1.0, 5.0))
            broker.start_node(1)
        else:
            workers[0].kill()
        if kind == "single":
            workers.append(WorkerProcess(env, f"{kind}-c").start())
        publish(bootstrap, env, messages, range(split, CYCLES), idempotent=idempotent)
        got = alerts_of(read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= updates,
                                   timeout=300, settle=6.0))
        survived = all(w.proc is not None and w.proc.poll() is None for w in workers[-1:])
    finally:
        for w in workers:
            w.kill()
    ids = Counter(a["event"]["id"] for a in got)
    seen: dict[str, dict[str, str]] = defaultdict(dict)
    for a in got:
        al = a["gpusentry"]["alert"]
        seen[a["host"]["name"]][al["dedup_key"]] = al["status"]
    lost = doubled = unresolved = 0
    for host, incidents in want.items():
        mine = seen.get(host, {})
        lost += max(0, len(incidents) - len(mine))
        doubled += max(0, len(mine) - len(incidents))
        unresolved += max(0, sum(1 for s in incidents.values() if s == "resolved")
                          - sum(1 for s in mine.values() if s == "resolved"))
    return {"kind": kind, "split": split, "updates": len(got), "expected_updates": updates,
            "missing": max(0, updates - len(ids)), "lost": lost, "doubled": doubled,
            "resent": sum(n - 1 for n in ids.values() if n > 1), "unresolved": unresolved,
            "same_keys": sum(1 for h in want if set(want[h]) == set(seen.get(h, {}))),
            "worker_exited": 0 if survived else 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                    help="the embedded broker, or Apache Kafka (resolved with Maven; adds broker-restart runs)")
    ap.add_argument("--faults", default="", help="comma-separated subset of single,move,restart (default: all the "
                    "broker allows, in turn)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    messages = fleet()
    want, updates = expected(messages)
    kinds: tuple[str, ...] = ("single", "move")
    try:
        if args.broker == "kafka":
            # Its data on disk, so that a restart is a restart and not a new, empty broker.
            broker: Any = KafkaCluster(nodes=1, progress=lambda line: print(line, file=sys.stderr)).start()
            kinds += ("restart",)
        else:
            broker = EmbeddedBroker().start()
    except (BrokerUnavailable, KafkaUnavailable) as exc:
        print(f"no {args.broker} broker: {exc}")
        return 2
    if args.faults:
        wanted = tuple(args.faults.split(","))
        if not set(wanted) <= set(kinds):
            broker.stop()
            print(f"--faults {args.faults}: choose from {','.join(kinds)} on this broker")
            return 2
        kinds = wanted
    rows = []
    try:
        print(f"{args.broker}: {len(HOSTS)} hosts, {CYCLES} cycles, 2 topics x 4 partitions; expected "
              f"{sum(len(v) for v in want.values())} incidents, {updates} updates; {args.runs} runs, seed {args.seed}")
        print(f"{'run':>3} {'fault':7} {'kill at':>7} {'updates':>7} {'missing':>7} {'lost':>5} {'doubled':>7} "
              f"{'re-sent':>7} {'unresolved':>10} {'hosts with replay keys':>22} {'worker exited':>13}")
        for n in range(args.runs):
            r = one_run(broker, kinds[n % len(kinds)], rng, messages, want, updates)
            rows.append(r)
            print(f"{n + 1:>3} {r['kind']:7} {r['split']:>7} {r['updates']:>7} {r['missing']:>7} {r['lost']:>5} "
                  f"{r['doubled']:>7} "
                  f"{r['resent']:>7} {r['unresolved']:>10} {r['same_keys']:>19}/{len(HOSTS)} {r['worker_exited']:>13}",
                  flush=True)
    finally:
        broker.stop()
    bad = [r for r in rows if r["lost"] or r["doubled"] or r["resent"] or r["unresolved"] or r["missing"]
           or r["worker_exited"]]
    print(f"{'PASS' if not bad else 'FAIL'}: {len(rows) - len(bad)}/{len(rows)} runs with no lost or doubled "
          "incident, no re-sent or missing update, every incident resolved and no worker exit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
