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

With ``--broker kafka`` (Apache Kafka, its data on disk) a third fault joins them in turn: the broker SIGKILLed
and started again with its data while the worker runs ("restart"); the worker must ride through it.

Then, unless ``--no-outputs``:

* a webhook outage: a `gpusentry forward` process delivers one alert a second to an endpoint that answers 429
  with Retry-After, then 500s, then hangs past the output's timeout (20 s each) before it recovers: every alert
  must arrive once, none may become a dead letter;
* a clock-poisoned replay: half the hosts get an idle GPU sample and a piece of miner evidence dated 2999 inside an
  incident, and a sample an hour behind; every incident must open, update and resolve as in the clean replay.

Targets: all zero, in every run.

    python bench/faults.py [--runs 6] [--seed 1] [--broker tansu|kafka] [--faults single,move,restart]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def survivor_pause(log_text: str, after: float) -> float | None:
    """Seconds the surviving worker's detection stood still in the rebalance after ``after`` (a wall time): from
    its consumer revoking its partitions to the last partition it kept or restored.  Read from its log, so the
    same measure applies to builds that keep partitions through a rebalance and to builds that restore them all."""
    revoked = last = None
    for line in log_text.splitlines():
        try:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if at < after:
            continue
        if revoked is None and "Revoking previously assigned partitions" in line:
            revoked = at
        elif revoked is not None and ("kept partition" in line or "restored partition" in line):
            last = at
        elif last is not None and "Revoking previously assigned partitions" in line:
            break
    return None if revoked is None or last is None else last - revoked


def one_run(broker: Any, kind: str, rng: random.Random, messages: dict[str, Any],
            want: dict[str, dict[str, str]], updates: int) -> dict[str, Any]:
    bootstrap = broker.bootstrap_servers
    # On Apache Kafka the workers trust its exact partition ends (docs/brokers.md), as a deployment there should.
    env = topic_env(bootstrap, f"fault{kind}", partitions=4, exact_high_watermark=isinstance(broker, KafkaCluster))
    split = rng.randrange(50, 150)
    workers = [WorkerProcess(env, f"{kind}-a").start()]
    if kind == "move":
        workers.append(WorkerProcess(env, f"{kind}-b").start())
    idempotent = isinstance(broker, KafkaCluster)
    killed_at = time.time()
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
            killed_at = time.time()
            workers[0].kill()
        if kind == "single":
            workers.append(WorkerProcess(env, f"{kind}-c").start())
        publish(bootstrap, env, messages, range(split, CYCLES), idempotent=idempotent)
        got = alerts_of(read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"], until=lambda m: len(m) >= updates,
                                   timeout=300, settle=6.0))
        survived = all(w.proc is not None and w.proc.poll() is None for w in workers[-1:])
        pause = survivor_pause(workers[1].log(), killed_at) if kind == "move" else None
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
            "worker_exited": 0 if survived else 1, "pause": pause}


class TroubledWebhook:
    """A webhook endpoint in trouble for a while, then well: 429 with Retry-After, then 500s, then hanging past the
    output's timeout, then 204 for good.  Phases are seconds from start(); what it accepted is kept by event.id."""

    def __init__(self, phase_s: float, hang_s: float) -> None:
        self.phase_s, self.hang_s = phase_s, hang_s
        self.accepted: list[tuple[float, str]] = []  # (seconds from start, event.id)
        self.answers: Counter[str] = Counter()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                at = time.monotonic() - hook.started
                phase = int(at // hook.phase_s)
                status, headers = (429, {"Retry-After": "5"}) if phase == 0 else (500, {}) if phase == 1 else \
                    (0, {}) if phase == 2 else (204, {})
                with hook.lock:
                    hook.answers[{429: "429", 500: "500", 0: "hang", 204: "204"}[status]] += 1
                if status == 0:
                    time.sleep(hook.hang_s)  # longer than the output's timeout: the attempt fails
                    status = 503
                if status == 204:
                    with hook.lock:
                        hook.accepted.append((at, json.loads(body)["event"]["id"]))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.started = time.monotonic()

    def start(self) -> TroubledWebhook:
        self.started = time.monotonic()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def recovered_at(self) -> float:
        return 3 * self.phase_s

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook_run(bootstrap: str, phase_s: float = 20.0) -> dict[str, Any]:
    """The forwarder (a `gpusentry forward` process) through a webhook outage of 3 x ``phase_s``: one alert a second
    from before the outage to after it.  Every alert must arrive once, none may end as a dead letter."""
    from tests.outputs_helpers import alert

    env = topic_env(bootstrap, "faultwebhook", partitions=2)
    hook = TroubledWebhook(phase_s, hang_s=12.0)
    env.update({"GPUSENTRY_OUTPUTS__GROUP_ID": f"faults-webhook-{time.time_ns()}",
                "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_OUTPUTS__WEBHOOK__URL": hook.url,
                "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": "bench-secret", "GPUSENTRY_OUTPUTS__WEBHOOK__TIMEOUT_S": "5"})
    workdir = Path(tempfile.mkdtemp(prefix="gpusentry-faults-"))
    (workdir / "gpusentry.toml").write_text("")
    log = open(workdir / "forward.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "forward", "--config",
                             str(workdir / "gpusentry.toml")], cwd=ROOT, env={**os.environ, **env}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    p = producer(bootstrap, idempotent=True)
    sent: dict[str, float] = {}
    try:
        hook.start()
        total_s = 3 * phase_s + 15
        for i in range(int(total_s)):
            a = alert(i, **{"@timestamp": c.format_timestamp(time.time())})
            p.produce(env["GPUSENTRY_TOPICS__ALERTS"], c.encode(a), key=a["gpusentry"]["alert"]["dedup_key"])
            p.poll(0)
            sent[a["event"]["id"]] = time.monotonic() - hook.started
            time.sleep(1.0)
        assert p.flush(30) == 0
        deadline = time.monotonic() + 120
        while len({i for _, i in hook.accepted}) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.5)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        hook.stop()
    dead = read_topic(bootstrap, env["GPUSENTRY_TOPICS__DEADLETTER"], until=lambda m: False, timeout=3)
    got = Counter(i for _, i in hook.accepted)
    last = max((at for at, _ in hook.accepted), default=float("nan"))
    return {"kind": "webhook", "alerts": len(sent), "during": sum(1 for at in sent.values() if at < hook.recovered_at),
            "answers": dict(hook.answers), "delivered": len(set(got) & set(sent)),
            "twice": sum(n - 1 for n in got.values() if n > 1), "dead_letters": len(dead),
            "after_recovery": sum(1 for at, _ in hook.accepted if at >= hook.recovered_at),
            "drained_s": last - hook.recovered_at, "forwarder_exited": 0 if alive else 1}


def clock_run(messages: dict[str, list[tuple[str, list[dict[str, Any]]]]]) -> dict[str, Any]:
    """The fleet replayed with poisoned clocks on half the hosts, against the same fleet clean: one idle GPU
    sample dated 2999 while the miner runs, one piece of miner evidence dated 2999, and a sample an hour
    behind.  Every incident must still open, update and resolve as in the clean replay."""
    def poisoned(host: str, msgs: list[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, list[dict[str, Any]]]]:
        out = list(msgs)
        far = c.format_timestamp(32_503_680_000.0)  # 2999-12-31
        idle = copy.deepcopy(gpu_batch(host, T0 + 10 * 30)[0])
        idle["@timestamp"] = far
        evidence = copy.deepcopy(miner_start(host, T0 + 10 * 31, pid=41_000))
        evidence["@timestamp"] = far
        behind = copy.deepcopy(gpu_batch(host, T0 + 10 * 120)[0])
        behind["@timestamp"] = c.format_timestamp(T0 + 10 * 120 - 3600)
        # Inside the first episode (the miner runs from cycle 20 + 2i), and during the second.
        for at, batch in ((2 * 34, [idle]), (2 * 35 + 1, [evidence]), (2 * 130, [behind])):
            out.insert(at, ("gpu" if batch[0]["event"]["dataset"] == "gpusentry.gpu" else "process", batch))
        return out

    bad = {h: poisoned(h, m) if i % 2 == 0 else m for i, (h, m) in enumerate(messages.items())}
    want, _ = expected(messages)
    engine = Engine(strict=True)
    got: dict[str, dict[str, str]] = defaultdict(dict)
    for host, msgs in bad.items():
        for _, batch in msgs:
            for ev in batch:
                for a in engine.process(c.validate_or_raise(c.expand_dotted(ev))):
                    got[host][a["gpusentry"]["alert"]["dedup_key"]] = a["gpusentry"]["alert"]["status"]
    rejects = len(engine.drain_clock_rejects())
    lost = sum(max(0, len(want[h]) - len(got.get(h, {}))) for h in want)
    doubled = sum(max(0, len(got.get(h, {})) - len(want[h])) for h in want)
    unresolved = sum(1 for h in want for k, s in want[h].items() if s == "resolved" and got.get(h, {}).get(k) != s)
    return {"kind": "clock", "poisoned_hosts": len(HOSTS) // 2, "poisoned_events": 3 * (len(HOSTS) // 2),
            "clock_skew": rejects, "lost": lost, "doubled": doubled, "unresolved": unresolved,
            "clock_jumps": engine.findings_by_rule.get("agent.clock_jump", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                    help="the embedded broker, or Apache Kafka (resolved with Maven; adds broker-restart runs)")
    ap.add_argument("--faults", default="", help="comma-separated subset of single,move,restart (default: all the "
                    "broker allows, in turn)")
    ap.add_argument("--no-outputs", action="store_true", help="skip the webhook-outage and clock-poisoning runs")
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
              f"{'re-sent':>7} {'unresolved':>10} {'hosts with replay keys':>22} {'worker exited':>13} "
              f"{'survivor paused':>15}")
        for n in range(args.runs):
            r = one_run(broker, kinds[n % len(kinds)], rng, messages, want, updates)
            rows.append(r)
            print(f"{n + 1:>3} {r['kind']:7} {r['split']:>7} {r['updates']:>7} {r['missing']:>7} {r['lost']:>5} "
                  f"{r['doubled']:>7} "
                  f"{r['resent']:>7} {r['unresolved']:>10} {r['same_keys']:>19}/{len(HOSTS)} {r['worker_exited']:>13} "
                  f"{'' if r['pause'] is None else format(r['pause'], '.2f') + ' s':>15}", flush=True)
        if not args.no_outputs:
            print("webhook outage: 429 + Retry-After, then 500s, then hanging past the timeout (20 s each), "
                  "then well; one alert a second throughout", flush=True)
            w = webhook_run(broker.bootstrap_servers)
            print(f"    alerts {w['alerts']} ({w['during']} during the outage), endpoint answers {w['answers']}, "
                  f"delivered {w['delivered']}/{w['alerts']} ({w['after_recovery']} after recovery, the last "
                  f"{w['drained_s']:.0f} s after it), delivered twice {w['twice']}, dead letters "
                  f"{w['dead_letters']}, forwarder exited {w['forwarder_exited']}", flush=True)
    finally:
        broker.stop()
    bad = [r for r in rows if r["lost"] or r["doubled"] or r["resent"] or r["unresolved"] or r["missing"]
           or r["worker_exited"]]
    if not args.no_outputs:
        k = clock_run(messages)
        print(f"clock-poisoned replay: {k['poisoned_events']} events on {k['poisoned_hosts']} hosts dated 2999 or an "
              f"hour behind; {k['clock_skew']} refused as clock_skew, {k['clock_jumps']} agent.clock_jump findings; "
              f"lost {k['lost']}, doubled {k['doubled']}, unresolved {k['unresolved']} incidents against the clean "
              "replay", flush=True)
        if w["delivered"] < w["alerts"] or w["twice"] or w["dead_letters"] or w["forwarder_exited"]:
            bad.append(w)
        if k["lost"] or k["doubled"] or k["unresolved"]:
            bad.append(k)
    print(f"{'PASS' if not bad else 'FAIL'}: {len(rows) - len([r for r in bad if r in rows])}/{len(rows)} worker "
          "runs with no lost or doubled incident, no re-sent or missing update, every incident resolved and no worker "
          "exit" + ("" if args.no_outputs else f"; webhook outage {'clean' if w not in bad else 'FAILED'}; "
                                                  f"clock poisoning {'clean' if k not in bad else 'FAILED'}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
