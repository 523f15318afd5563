"""`gpusentry report` over a month of incidents on a 1,000-GPU fleet, against reading the same file with orjson.

The incidents file is generated here (seeded): 125 hosts of 8 GPUs, incidents opening through a 30-day month,
each published as the worker publishes it (an opening update, more every 5 minutes while it lasts, a
resolution), with GPU models, teams and costs drawn per host. Figures, CPU time of one core, best of --repeat:

* read: ``orjson.loads`` of every line (the least any report must do);
* report: load and fold the updates, build the ledger and render it (csv by incident, csv by team and month,
  the HTML report with its charts).

Target: the whole month reports in seconds (under 10 s for every format).

    python bench/report.py [--incidents 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from gpusentry.report import incident_rows, load_files, render  # noqa: E402
from gpusentry.timefmt import format_timestamp  # noqa: E402
from outputs.sample import sample_incident  # noqa: E402

MONTH_START = 1_793_491_200.0  # 2026-11-01T00:00:00Z
MODELS = [("NVIDIA H100 80GB HBM3", "H100-SXM", 2.99), ("NVIDIA A100-SXM4-80GB", "A100-80GB", 1.79),
          ("NVIDIA L40S", "L40S", 1.25), ("NVIDIA H200", "H200", 3.5)]
TEAMS = ["vision", "nlp", "speech", "recsys", "infra", "research"]
TARGET_S = 10.0


def month_of_incidents(n: int, seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    template, resolved_template = sample_incident(test_marker=False)
    hosts = [(f"gpu-node-{h:03d}", MODELS[h % len(MODELS)], TEAMS[h % len(TEAMS)]) for h in range(125)]
    lines = []
    for i in range(n):
        host, (model, price_model, rate), team = rng.choice(hosts)
        start = MONTH_START + rng.uniform(0, 30 * 86400 - 7200)
        length = rng.uniform(600, 6 * 3600)
        gpus = rng.choice((1, 1, 2, 4, 8))
        key = f"gpusentry-{host}-{i:08x}"
        t = start
        while True:
            last = t >= start + length
            a = copy.deepcopy(resolved_template if last else template)
            a["host"]["name"] = host
            a["@timestamp"] = format_timestamp(t)
            a["event"]["start"] = format_timestamp(start)
            a["labels"] = {"team": team, "cost_centre": f"cc-{team}"}
            g = a["gpusentry"]["alert"]
            g["dedup_key"], g["first_opened"], g["last_evidence"] = key, format_timestamp(start), format_timestamp(t)
            busy = (t - start) * gpus * rng.uniform(0.5, 1.0)
            kwh = busy * 300 / 3.6e6
            compute, energy = busy / 3600 * rate, kwh * 0.12
            g["cost"] = {"gpu_seconds": (t - start) * gpus, "busy_gpu_seconds": busy, "energy_kwh": kwh,
                         "compute": compute, "energy": energy, "usd": compute + energy, "currency": "USD",
                         "price_list": "bench", "price_lists": ["bench"], "gpus": gpus, "unpriced_gpu_seconds": 0.0,
                         "by_model": [{"gpu_model": model, "price_model": price_model, "gpus": gpus,
                                       "busy_gpu_seconds": busy, "energy_kwh": kwh, "rate_per_gpu_hour": rate,
                                       "compute": compute, "energy": energy}]}
            lines.append(orjson.dumps(a))
            if last:
                break
            t = min(t + 300, start + length)
    lines.sort(key=lambda b: orjson.loads(b)["@timestamp"])
    return lines


def best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--incidents", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    lines = month_of_incidents(args.incidents)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "incidents.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        size = path.stat().st_size / 2**20

        def read() -> None:
            with path.open("rb") as fh:
                for line in fh:
                    orjson.loads(line)

        results = {"read (orjson)": best(read, args.repeat)}
        for label, by, fmt in (("report csv by incident", "incident", "csv"), ("report csv by team", "team", "csv"),
                               ("report csv by month", "month", "csv"), ("report html", "incident", "html")):
            results[label] = best(lambda by=by, fmt=fmt: render(incident_rows(load_files([path])), by=by, fmt=fmt),
                                  args.repeat)
    base = results["read (orjson)"]
    print(f"report benchmark: {args.incidents} incidents, {len(lines):,} updates ({size:.1f} MiB), 125 hosts x 8 GPUs, "
          f"one month; best of {args.repeat}, CPU time of one core")
    for label, secs in results.items():
        print(f"  {label:24s} {secs:7.2f} s   {secs / base:6.1f}x the orjson read")
    worst = max(v for k, v in results.items() if k.startswith("report"))
    ok = worst <= TARGET_S
    print(f"[{'PASS' if ok else 'FAIL'}] every report of the month in under {TARGET_S:.0f} s (slowest {worst:.2f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
