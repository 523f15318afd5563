"""Score detection on labelled simulated hosts, beside two baselines run on the same events.

* **gpusentry**: the detection engine; a hijack counts as detected when an incident of high or
  critical severity opens on its host; time to detect runs from the hijack's first event to that
  alert's event time.  On a benign host every alert of medium or above is a false alert.
* **utilisation threshold**: a GPU at >= 90 % utilisation for 10 minutes (the usual DCGM alert).
* **Falco-style rule**: a process whose name is a known miner binary, ``stratum+`` in a command
  line, or a connection to a listed pool name on a common pool port (Falco's stock miner rules and
  their static lists).

Used by ``bench/detection.py`` (the full table) and by the test suite (a small, fast subset).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from detectors.base import SEVERITIES
from detectors.engine import Engine, discover
from gpusentry.contract import event_time
from gpusentry.settings.detection import DetectionSettings
from gpusentry.simulate import HostLabel, simulate_host

HIGH = SEVERITIES.index("high")
MEDIUM = SEVERITIES.index("medium")

# Falco's stock lists (rules/falco_rules.yaml, "Detect outbound connections to common miner pool
# ports" and the crypto-miner macros): exact host names, a port list, and binary names.
FALCO_MINER_DOMAINS = frozenset({
    "asia1.ethermine.org", "asia2.ethermine.org", "eu1.ethermine.org", "eu2.ethermine.org", "us1.ethermine.org",
    "us2.ethermine.org", "eth-asia.dwarfpool.com", "eth-eu.dwarfpool.com", "eth-us.dwarfpool.com",
    "xmr-asia1.nanopool.org", "xmr-eu1.nanopool.org", "xmr-eu2.nanopool.org", "xmr-us-east1.nanopool.org",
    "xmr-us-west1.nanopool.org", "eth-asia1.nanopool.org", "eth-eu1.nanopool.org", "eth-us-east1.nanopool.org",
    "pool.minexmr.com", "fr.minexmr.com", "de.minexmr.com", "sg.minexmr.com", "mine.moneropool.com",
    "mine.xmrpool.net", "pool.supportxmr.com", "xmr.pool.minergate.com", "xmr.crypto-pool.fr",
    "monero.crypto-pool.fr", "monerohash.com", "xmrpool.eu", "pool.xmr.pt",
})
FALCO_MINER_PORTS = frozenset({25, 3333, 3334, 3335, 3336, 3357, 4444, 5555, 5556, 5588, 5730, 6099, 6666, 7777,
                               7778, 8000, 8001, 8008, 8080, 8118, 8333, 8888, 8899, 9332, 9999, 14433, 14444,
                               45560, 45700})
FALCO_MINER_BINARIES = frozenset({"xmrig", "xmr-stak", "minerd", "cpuminer", "ccminer", "ethminer", "t-rex",
                                  "lolminer", "nbminer", "gminer", "teamredminer", "phoenixminer", "nanominer",
                                  "bzminer", "srbminer-multi", "cgminer", "bfgminer"})
UTIL_THRESHOLD_PCT = 90.0
UTIL_THRESHOLD_S = 600.0


@dataclass
class HostResult:
    """What each method raised on one host.  Before a hijack starts its host counts as benign."""

    label: HostLabel
    events: int = 0
    alerts: list[tuple[float, int]] = field(default_factory=list)  # (event time, severity index) of open alerts
    rules: set[str] = field(default_factory=set)
    util_hits: list[float] = field(default_factory=list)
    falco_hits: list[float] = field(default_factory=list)

    @property
    def hijack(self) -> bool:
        return self.label.attack_start is not None

    def _after(self, ts: float) -> bool:
        return self.label.attack_start is not None and ts >= self.label.attack_start

    @property
    def detected_at(self) -> float | None:
        return next((ts for ts, sev in self.alerts if sev >= HIGH and self._after(ts)), None)

    @property
    def max_severity(self) -> int:
        return max((sev for ts, sev in self.alerts if self._after(ts)), default=-1)

    @property
    def false_alerts(self) -> int:
        """Alerts of medium or above on a benign host, or before its hijack started."""
        return sum(1 for ts, sev in self.alerts if sev >= MEDIUM and not self._after(ts))

    @property
    def low_alerts(self) -> int:
        return sum(1 for ts, sev in self.alerts if sev < MEDIUM and not self._after(ts))

    @property
    def worst_benign_severity(self) -> int:
        return max((sev for ts, sev in self.alerts if not self._after(ts)), default=-1)

    @property
    def util_baseline_at(self) -> float | None:
        return next((ts for ts in self.util_hits if self._after(ts)), None)

    @property
    def falco_baseline_at(self) -> float | None:
        return next((ts for ts in self.falco_hits if self._after(ts)), None)

    @property
    def util_false(self) -> int:
        return sum(1 for ts in self.util_hits if not self._after(ts))

    @property
    def falco_false(self) -> int:
        return sum(1 for ts in self.falco_hits if not self._after(ts))

    def ttd(self, at: float | None) -> float | None:
        if at is None or self.label.attack_start is None:
            return None
        return at - self.label.attack_start


class UtilThreshold:
    """Baseline (a): any GPU at >= 90 % utilisation for 10 minutes of consecutive samples."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}
        self.fired: set[str] = set()

    def observe(self, event: dict[str, Any]) -> bool:
        if event["event"]["dataset"] != "gpusentry.gpu":
            return False
        uuid = event["gpu"]["uuid"]
        util = (event["gpu"].get("utilization") or {}).get("gpu_pct")
        ts = event_time(event)
        if util is None or util < UTIL_THRESHOLD_PCT:
            self.since.pop(uuid, None)
            self.fired.discard(uuid)
            return False
        start = self.since.setdefault(uuid, ts)
        if ts - start >= UTIL_THRESHOLD_S and uuid not in self.fired:
            self.fired.add(uuid)
            return True
        return False


def falco_rule(event: dict[str, Any]) -> bool:
    """Baseline (b): Falco's stock crypto-miner rules on one event."""
    dataset = event["event"]["dataset"]
    if dataset == "gpusentry.process" and event["event"]["type"] == ["start"]:
        proc = event["process"]
        names = {str(proc.get("name") or "").lower(), str(proc.get("executable") or "").rsplit("/", 1)[-1].lower()}
        if names & FALCO_MINER_BINARIES:
            return True
        return "stratum+" in str(proc.get("command_line") or "")
    if dataset == "gpusentry.network":
        dest = event["destination"]
        return dest.get("port") in FALCO_MINER_PORTS and dest.get("domain") in FALCO_MINER_DOMAINS
    return False


def evaluate(labels_and_events: Iterable[tuple[HostLabel, Iterable[dict[str, Any]]]],
             settings: DetectionSettings | None = None, *, only: str | None = None) -> list[HostResult]:
    """Run the engine and both baselines over each host's events.

    ``only`` keeps the detectors whose id starts with it (``"gpu."``: the GPU models alone).
    """
    results = []
    settings = settings or DetectionSettings()
    detectors = [cls(settings) for cls in discover() if only is None or cls.id.startswith(only)]
    engine = Engine(settings, detectors, strict=True)
    for label, events in labels_and_events:
        res = HostResult(label)
        util = UtilThreshold()
        for ev in events:
            res.events += 1
            ts = event_time(ev)
            if util.observe(ev):
                res.util_hits.append(ts)
            if falco_rule(ev):
                res.falco_hits.append(ts)
            for alert in engine.process(ev):
                fields = alert["gpusentry"]["alert"]
                if fields["status"] != "open":
                    continue
                res.alerts.append((event_time(alert), SEVERITIES.index(fields["severity"])))
                res.rules.update(fields.get("rules") or ())
        engine.forget_host(label.host)
        results.append(res)
    return results


def run_scenarios(scenarios: Iterable[str], hosts_per_scenario: int, *, start: float, duration_s: float,
                  interval_s: float | None, seed: int,
                  settings: DetectionSettings | None = None, only: str | None = None) -> list[HostResult]:
    def hosts() -> Iterable[tuple[HostLabel, Iterable[dict[str, Any]]]]:
        for name in scenarios:
            for n in range(hosts_per_scenario):
                yield simulate_host(name, f"sim-{name}-{n:02d}", start=start, duration_s=duration_s,
                                    interval_s=interval_s, seed=seed)

    return evaluate(hosts(), settings, only=only)


@dataclass
class ScenarioSummary:
    scenario: str
    label: str
    hosts: int
    detected: int
    ttd: list[float]
    max_severity: str
    false_alerts: int
    low_alerts: int
    util_detected: int
    util_ttd: list[float]
    util_false: int
    falco_detected: int
    falco_ttd: list[float]
    falco_false: int


def summarise(results: list[HostResult]) -> list[ScenarioSummary]:
    by: dict[str, list[HostResult]] = defaultdict(list)
    for r in results:
        by[r.label.scenario].append(r)
    out = []
    for name, rs in by.items():
        ttd = [t for r in rs if (t := r.ttd(r.detected_at)) is not None]
        util_ttd = [t for r in rs if (t := r.ttd(r.util_baseline_at)) is not None]
        falco_ttd = [t for r in rs if (t := r.ttd(r.falco_baseline_at)) is not None]
        top = max(r.max_severity if r.hijack else r.worst_benign_severity for r in rs)
        out.append(ScenarioSummary(
            name, rs[0].label.label, len(rs), sum(r.detected_at is not None for r in rs), ttd,
            SEVERITIES[top] if top >= 0 else "-", sum(r.false_alerts for r in rs), sum(r.low_alerts for r in rs),
            sum(r.util_baseline_at is not None for r in rs), util_ttd, sum(r.util_false for r in rs),
            sum(r.falco_baseline_at is not None for r in rs), falco_ttd, sum(r.falco_false for r in rs)))
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
