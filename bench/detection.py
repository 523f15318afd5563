"""Detection quality on labelled simulated hosts: gpusentry beside two baselines on the same events.

Every scenario of ``gpusentry simulate`` runs on ``--hosts`` hosts (GPU models drawn per host), at a
5 s sampling interval by default (``--interval 0`` draws 1-10 s per host).  Three methods see the
same events:

* **gpusentry**: the detection engine (all detectors and the correlator); a hijack is detected
  when an incident of high or critical severity opens after it started; on a benign host (or
  before the hijack) any alert of medium or above is a false alert;
* **util>=90%/10min**: a GPU at 90 % or more for 10 minutes (the usual DCGM alert);
* **Falco-style**: a known miner binary name, ``stratum+`` in a command line, or a listed pool name
  on a common pool port (Falco's stock rules and lists).

Then the campaign corpus (``tests/data/campaign_corpus.toml``: real miner launches and real look-alikes, each with
its source) replays one process start per host, the process event alone, through gpusentry and the Falco-style
rule. Targets there: at least 95 % of the launches that carry evidence at high, every launch at least low, no
look-alike at medium or above.

The GPU detectors alone are scored too (``gpu.*`` only: no process or network evidence), to show
what the GPU models catch without the rules.  Time to detect (TTD) runs from the hijack's first
event to the alert's event time.

Targets: every hijack detected at high or critical, no medium+ alert on benign hosts, median TTD
<= 30 s and worst <= 5 min at 5 s sampling, strictly better than both baselines; agentic attacks at high
within 60 s; allocation violations (the scheduler-aware rows) at high within 30 s.

    python bench/detection.py [--hosts 3] [--duration 1800] [--interval 5] [--seed 42] [--corpus-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpusentry.simulate import SCENARIOS  # noqa: E402
from gpusentry.simulate.evaluate import HostResult, falco_rule, median, run_scenarios, summarise  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "campaign_corpus.toml"

START = 1_793_491_200.0  # 2026-11-01T00:00:00Z
GROUP_TITLES = {"fleet": "GPU fleet: classic hijacks and their look-alikes",
                "agentic": "agentic RL cluster: sandboxes beside the trainer",
                "allocation": "scheduler-aware: GPU work judged against Kubernetes/Slurm allocations"}
AGENTIC_TTD_S = 60.0
ALLOCATION_TTD_S = 30.0


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}s"


def totals(results: list[HostResult]) -> dict[str, float | int | None]:
    hij = [r for r in results if r.hijack]
    ben = [r for r in results if not r.hijack]
    ttd = [t for r in hij if (t := r.ttd(r.detected_at)) is not None]
    util_ttd = [t for r in hij if (t := r.ttd(r.util_baseline_at)) is not None]
    falco_ttd = [t for r in hij if (t := r.ttd(r.falco_baseline_at)) is not None]
    return {
        "hijack_hosts": len(hij), "benign_hosts": len(ben),
        "detected": len(ttd), "median_ttd": median(ttd), "worst_ttd": max(ttd) if ttd else None,
        "false_alerts": sum(r.false_alerts for r in results),
        "false_hosts": sum(1 for r in results if r.false_alerts),
        "low_alerts": sum(r.low_alerts for r in results),
        "util_detected": len(util_ttd), "util_median": median(util_ttd),
        "util_false": sum(r.util_false for r in results),
        "util_false_hosts": sum(1 for r in results if r.util_false),
        "falco_detected": len(falco_ttd), "falco_median": median(falco_ttd),
        "falco_false": sum(r.falco_false for r in results),
        "falco_false_hosts": sum(1 for r in results if r.falco_false),
    }


def print_table(results: list[HostResult]) -> None:
    head = (f"{'scenario':20} {'label':6} {'hosts':>5} | {'detected':>8} {'median':>7} {'worst':>7} {'max sev':>8} "
            f"{'false':>5} {'low':>4} | {'util':>5} {'ttd':>6} {'false':>5} | {'falco':>5} {'ttd':>6} {'false':>5}")
    print(f"{'':34} | {'gpusentry':^50} | {'util>=90%/10min':^19} | {'Falco-style':^19}")
    print(head)
    group = None
    for s in summarise(results):
        if SCENARIOS[s.scenario].group != group:
            group = SCENARIOS[s.scenario].group
            print("-" * len(head) + f"\n{GROUP_TITLES.get(group, group)}")
        hij = s.label == "hijack"
        det = f"{s.detected}/{s.hosts}" if hij else "-"
        print(f"{s.scenario:20} {s.label:6} {s.hosts:>5} | {det:>8} {fmt_s(median(s.ttd)):>7} "
              f"{fmt_s(max(s.ttd) if s.ttd else None):>7} {s.max_severity:>8} {s.false_alerts:>5} {s.low_alerts:>4} | "
              f"{(f'{s.util_detected}/{s.hosts}' if hij else '-'):>5} {fmt_s(median(s.util_ttd)):>6} "
              f"{s.util_false:>5} | {(f'{s.falco_detected}/{s.hosts}' if hij else '-'):>5} "
              f"{fmt_s(median(s.falco_ttd)):>6} {s.falco_false:>5}")


def corpus_checks() -> dict[str, bool]:
    """Replay the campaign corpus through gpusentry and the Falco-style rule; print the table; the targets."""
    import tomllib

    from detectors.base import SEVERITIES
    from detectors.engine import Engine
    from detectors.examples import proc
    from gpusentry import contract as c

    cases = tomllib.loads(CORPUS.read_text())["case"]
    rank = SEVERITIES.index
    rows: list[tuple[dict, str, bool]] = []
    for i, case in enumerate(cases):
        event = c.validate_or_raise(proc(case["command_line"], host=f"corpus-{i:03d}"))
        alerts = Engine(strict=True).process(event)
        severity = max((a["gpusentry"]["alert"]["severity"] for a in alerts), key=rank, default="none")
        rows.append((case, severity, falco_rule(event)))
    miners = [(cs, sev, falco) for cs, sev, falco in rows if cs["label"] == "miner"]
    evident = [r for r in miners if r[0]["evidence"] != "none"]
    benign = [r for r in rows if r[0]["label"] == "benign"]
    high = sum(sev in ("high", "critical") for _, sev, _ in evident)
    traced = sum(sev != "none" for _, sev, _ in miners)
    loud = sum(sev not in ("none", "low") for _, sev, _ in benign)
    falco_evident = sum(falco for _, _, falco in evident)
    falco_all = sum(falco for _, _, falco in miners)
    falco_false = sum(falco for _, _, falco in benign)
    print(f"\ncampaign corpus ({CORPUS.relative_to(CORPUS.parents[2])}): {len(miners)} real miner launches "
          f"({len(evident)} with evidence in the command line, path, name or image), {len(benign)} real look-alikes; "
          "one process start per host")
    print(f"{'method':16} {'launches with evidence':>23} {'any launch':>11} {'look-alikes alerted':>20}")
    print(f"{'gpusentry':16} {f'{high}/{len(evident)} at high':>23} {f'{traced}/{len(miners)}':>11} "
          f"{f'{loud}/{len(benign)} at medium+':>20}")
    print(f"{'Falco-style rule':16} {f'{falco_evident}/{len(evident)} alerted':>23} {f'{falco_all}/{len(miners)}':>11} "
          f"{f'{falco_false}/{len(benign)}':>20}")
    missed = [cs["command_line"][:90] for cs, sev, _ in evident if sev not in ("high", "critical")]
    for line in missed:
        print(f"  below high: {line}")
    return {
        "corpus: >= 95 % of launches with evidence at high": high >= 0.95 * len(evident),
        "corpus: every miner launch at least low": traced == len(miners),
        "corpus: no look-alike at medium or above": loud == 0,
        "corpus: better than Falco-style (more launches, no more false alerts)":
            high > falco_evident and loud <= falco_false,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3, help="hosts per scenario")
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of event time per host")
    ap.add_argument("--interval", type=float, default=5.0, help="sampling interval (0: 1-10 s per host)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scenario", action="append", help="only these scenarios (repeatable)")
    ap.add_argument("--corpus-only", action="store_true", help="only the campaign corpus (seconds)")
    args = ap.parse_args()
    if args.corpus_only:
        only = corpus_checks()
        print()
        for name, ok in only.items():
            print(f"[{'PASS' if ok else 'FAIL'}] {name}")
        return 0 if all(only.values()) else 1
    names = args.scenario or list(SCENARIOS)

    t0 = time.perf_counter()
    full = run_scenarios(names, args.hosts, start=START, duration_s=args.duration, interval_s=args.interval or None,
                         seed=args.seed)
    t_full = time.perf_counter() - t0
    gpu_only = run_scenarios(names, args.hosts, start=START, duration_s=args.duration,
                             interval_s=args.interval or None, seed=args.seed, only="gpu.")
    events = sum(r.events for r in full)
    interval = f"{args.interval:g} s" if args.interval else "1-10 s per host"
    print(f"detection benchmark: {len(names)} scenarios x {args.hosts} hosts, {args.duration:.0f} s each, "
          f"sampling {interval}, seed {args.seed}; {events} events (generated and detected in {t_full:.1f} s)\n")
    print_table(full)

    t = totals(full)
    g = totals(gpu_only)
    print()
    print(f"{'method':28} {'hijacks detected':>17} {'median TTD':>11} {'worst TTD':>10} "
          f"{'false alerts (hosts)':>21}")
    rows = [
        ("gpusentry (all detectors)", t["detected"], t["median_ttd"], t["worst_ttd"], t["false_alerts"],
         t["false_hosts"]),
        ("gpusentry (GPU models only)", g["detected"], g["median_ttd"], g["worst_ttd"], g["false_alerts"],
         g["false_hosts"]),
        ("util >= 90% for 10 min", t["util_detected"], t["util_median"], None, t["util_false"],
         t["util_false_hosts"]),
        ("Falco-style rule", t["falco_detected"], t["falco_median"], None, t["falco_false"], t["falco_false_hosts"]),
    ]
    n_hijack = t["hijack_hosts"]
    for name, det, med, worst, false, hosts in rows:
        print(f"{name:28} {f'{det}/{n_hijack}':>17} {fmt_s(med):>11} {fmt_s(worst):>10} "
              f"{f'{false} ({hosts})':>21}")
    print(f"(low-severity notes on benign hosts, not paged: {t['low_alerts']})")

    agentic = [r for r in full if SCENARIOS[r.label.scenario].group == "agentic"]
    a = totals(agentic)
    if agentic:
        print(f"agentic rows: {a['detected']}/{a['hijack_hosts']} attacks at high or critical, worst TTD "
              f"{fmt_s(a['worst_ttd'])}, {a['false_alerts']} medium+ alerts on {a['benign_hosts']} benign hosts")
    allocation = [r for r in full if SCENARIOS[r.label.scenario].group == "allocation"]
    al = totals(allocation)
    if allocation:
        print(f"allocation rows: {al['detected']}/{al['hijack_hosts']} violations at high or critical, worst TTD "
              f"{fmt_s(al['worst_ttd'])}, {al['false_alerts']} medium+ alerts on {al['benign_hosts']} benign hosts")
    checks = {
        "every hijack detected at high or critical": t["detected"] == t["hijack_hosts"],
        "every allocation violation at high or critical within 30 s":
            not allocation or (al["detected"] == al["hijack_hosts"] and (al["worst_ttd"] or 0) <= ALLOCATION_TTD_S),
        "no medium+ alert on a benign allocation row": not allocation or al["false_alerts"] == 0,
        "every agentic attack at high or critical within 60 s":
            not agentic or (a["detected"] == a["hijack_hosts"] and (a["worst_ttd"] or 0) <= AGENTIC_TTD_S),
        "no medium+ alert on an agentic benign look-alike": not agentic or a["false_alerts"] == 0,
        "no medium+ alert on benign hosts": t["false_alerts"] == 0,
        "median time to detect <= 30 s": t["median_ttd"] is not None and t["median_ttd"] <= 30,
        "worst time to detect <= 5 min": t["worst_ttd"] is not None and t["worst_ttd"] <= 300,
        "better than util>=90%/10min (more detected, fewer false)":
            t["detected"] > t["util_detected"] and t["false_alerts"] <= t["util_false"],
        "better than Falco-style (more detected, fewer false)":
            t["detected"] > t["falco_detected"] and t["false_alerts"] <= t["falco_false"],
        **corpus_checks(),
    }
    print()
    for name, ok in checks.items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
