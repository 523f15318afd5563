"""Correlation: a host's findings become one incident, updated as evidence grows, resolved when it stops.

One hijack is one incident, not fifty alerts.  Findings are grouped per host; the incident's
severity is the strongest finding's, raised one step for each further independent kind of
evidence (a GPU behaving like a miner *and* pool traffic is worse than either).  An alert is
published when the incident opens, when its severity rises or a new kind of evidence joins, and
otherwise at most every ``update_interval_s`` while evidence keeps coming; ``resolve_after_s`` of
event time without evidence resolves it.  The incident also prices itself: GPU-seconds and energy
of the implicated GPUs from the first evidence on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from detectors.base import SEVERITIES, SEVERITY_SCORE, Finding
from gpusentry.contract import Dataset, get, make_event
from gpusentry.settings.detection import DetectionSettings, PricingSettings
from gpusentry.timefmt import format_timestamp

TECHNIQUE_NAMES = {"T1496": "Resource Hijacking", "T1496.001": "Compute Hijacking"}
# Gaps longer than this between two samples of a GPU are not counted as stolen time.
MAX_SAMPLE_GAP_S = 60.0
RULE_ID = "gpusentry.incident"
RULE_NAME = "GPU/compute hijacking incident"


@dataclass
class Incident:
    dedup_key: str
    opened_at: float
    last_evidence_at: float
    severity: str = "low"
    signals: set[str] = field(default_factory=set)
    rules: set[str] = field(default_factory=set)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    evidence_count: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    gpus: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    technique: str = "T1496"
    published_severity: str | None = None
    published_signals: frozenset[str] = frozenset()
    last_published_at: float | None = None
    gpu_seconds: float = 0.0
    energy_kwh: float = 0.0
    usd: float = 0.0
    last_sample_at: dict[str, float] = field(default_factory=dict)


@dataclass
class HostIncidents:
    """Per-host correlation state."""

    current: Incident | None = None
    gpu_names: dict[str, str] = field(default_factory=dict)


def _raise(severity: str, steps: int) -> str:
    return SEVERITIES[min(len(SEVERITIES) - 1, SEVERITIES.index(severity) + steps)]


def gpu_hour_price(pricing: PricingSettings, gpu_name: str | None) -> float:
    if gpu_name:
        for key in sorted(pricing.gpu_hour_usd, key=len, reverse=True):
            if key.lower() in gpu_name.lower():
                return pricing.gpu_hour_usd[key]
    return pricing.default_gpu_hour_usd


class Correlator:
    def __init__(self, settings: DetectionSettings) -> None:
        self.settings = settings

    def observe(self, host: str, event: dict[str, Any], ts: float, findings: list[Finding],
                state: HostIncidents) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = []
        inc = state.current
        if inc is not None and not findings and ts - inc.last_evidence_at >= self.settings.resolve_after_s:
            self._account(inc, event, ts, state)
            if inc.published_severity is not None:
                alerts.append(self._alert(host, inc, ts, "resolved", state))
            state.current = inc = None
        if event["event"]["dataset"] == Dataset.GPU.value:
            uuid = get(event, "gpu.uuid")
            if uuid and get(event, "gpu.name"):
                state.gpu_names[uuid] = event["gpu"]["name"]
            if inc is not None:
                self._account(inc, event, ts, state)
        if not findings:
            return alerts
        if inc is None:
            first = min(findings, key=lambda f: f.event_id)
            key = hashlib.sha256(f"{host}|{first.event_id}".encode()).hexdigest()[:16]
            inc = state.current = Incident(dedup_key=f"gpusentry-{host}-{key}"[:255], opened_at=ts,
                                           last_evidence_at=ts)
        self._add(inc, findings, ts)
        if event["event"]["dataset"] == Dataset.GPU.value:
            self._account(inc, event, ts, state)
        if self._should_publish(inc, ts):
            alerts.append(self._alert(host, inc, ts, "open", state))
        return alerts

    def _add(self, inc: Incident, findings: list[Finding], ts: float) -> None:
        inc.last_evidence_at = max(inc.last_evidence_at, ts)
        for f in findings:
            inc.signals.add(f.signal)
            inc.rules.add(f.rule_id)
            inc.evidence_count += 1
            if f.technique == "T1496.001":
                inc.technique = "T1496.001"
            entry = {"event.id": f.event_id, "@timestamp": format_timestamp(f.timestamp), "rule.id": f.rule_id,
                     "severity": f.severity, "summary": f.message}
            if len(inc.evidence) < self.settings.max_evidence:
                inc.evidence.append(entry)
            else:  # keep the first half as found, the rest as the latest
                keep = self.settings.max_evidence // 2
                inc.evidence = inc.evidence[:keep] + inc.evidence[keep + 1:] + [entry]
            for path, value in f.fields.items():
                if not path.startswith("_") and value is not None:
                    inc.fields.setdefault(path, value)
            if f.fields.get("gpu.uuid"):
                inc.gpus.add(f.fields["gpu.uuid"])
            pid = f.fields.get("process.pid")
            if isinstance(pid, int):
                inc.pids.add(pid)
        strongest = max(SEVERITY_SCORE[f.severity] for f in findings)
        base = max([s for s in SEVERITIES if SEVERITY_SCORE[s] <= strongest] + [inc.severity],
                   key=SEVERITIES.index)
        inc.severity = max(inc.severity, _raise(base, len(inc.signals) - 1), key=SEVERITIES.index)

    def _should_publish(self, inc: Incident, ts: float) -> bool:
        if SEVERITIES.index(inc.severity) < SEVERITIES.index(self.settings.min_alert_severity):
            return False
        if inc.published_severity != inc.severity or not inc.signals <= inc.published_signals:
            return True
        return inc.last_published_at is None or ts - inc.last_published_at >= self.settings.update_interval_s

    def _account(self, inc: Incident, event: dict[str, Any], ts: float, state: HostIncidents) -> None:
        """Integrate GPU time and energy of the implicated GPUs (by uuid, or running an implicated pid)."""
        if event["event"]["dataset"] != Dataset.GPU.value:
            return
        uuid = get(event, "gpu.uuid")
        pids = {p.get("pid") for p in get(event, "gpu.processes") or ()}
        if uuid not in inc.gpus and not (pids & inc.pids):
            return
        inc.gpus.add(uuid)
        last = inc.last_sample_at.get(uuid)
        inc.last_sample_at[uuid] = ts
        if last is None or ts <= last:
            return
        dt = min(ts - last, MAX_SAMPLE_GAP_S)
        inc.gpu_seconds += dt
        power = get(event, "gpu.power.draw_watts")
        if isinstance(power, int | float):
            inc.energy_kwh += power * dt / 3.6e6
        pricing = self.settings.pricing
        inc.usd += dt / 3600 * gpu_hour_price(pricing, state.gpu_names.get(uuid)) + \
            (power * dt / 3.6e6 * pricing.kwh_usd if isinstance(power, int | float) else 0.0)

    def _alert(self, host: str, inc: Incident, ts: float, status: str, state: HostIncidents) -> dict[str, Any]:
        inc.published_severity = inc.severity
        inc.published_signals = frozenset(inc.signals)
        inc.last_published_at = ts
        kinds = ", ".join(sorted(inc.signals))
        verb = "resolved" if status == "resolved" else "suspected"
        message = (f"GPU/compute hijacking {verb} on {host}: {kinds} "
                   f"({inc.evidence_count} findings, {inc.gpu_seconds / 3600:.2f} GPU-hours so far)")
        fields: dict[str, Any] = {
            "rule.id": RULE_ID, "rule.name": RULE_NAME,
            "rule.description": "Correlated evidence of cryptocurrency mining or other unauthorised use of "
                                "this host's GPUs/CPUs: " + ", ".join(sorted(inc.rules)),
            "event.severity": SEVERITY_SCORE[inc.severity],
            "event.created": None,  # filled with wall time by whoever publishes (not part of the replay)
            "event.start": format_timestamp(inc.opened_at),
            "threat.framework": "MITRE ATT&CK",
            # ECS keeps sub-techniques apart: technique T1496, sub-technique T1496.001.
            "threat.technique.id": ["T1496"],
            "threat.technique.name": [TECHNIQUE_NAMES["T1496"]],
            "message": message,
            "gpusentry.alert.severity": inc.severity,
            "gpusentry.alert.dedup_key": inc.dedup_key,
            "gpusentry.alert.status": status,
            "gpusentry.alert.signals": sorted(inc.signals),
            "gpusentry.alert.rules": sorted(inc.rules),
            "gpusentry.alert.evidence": list(inc.evidence),
            "gpusentry.alert.evidence_count": inc.evidence_count,
            "gpusentry.alert.cost.gpu_seconds": round(inc.gpu_seconds, 3),
            "gpusentry.alert.cost.energy_kwh": round(inc.energy_kwh, 6),
            "gpusentry.alert.cost.usd": round(inc.usd, 4),
        }
        if inc.technique == "T1496.001":
            fields["threat.technique.subtechnique.id"] = ["T1496.001"]
            fields["threat.technique.subtechnique.name"] = [TECHNIQUE_NAMES["T1496.001"]]
        if status == "resolved":
            fields["event.end"] = format_timestamp(ts)
        for path, value in inc.fields.items():
            fields.setdefault(path, value)
        digest = hashlib.sha256(f"{inc.dedup_key}|{status}|{inc.evidence_count}|{ts}".encode()).hexdigest()[:32]
        alert = make_event(Dataset.ALERT, host, ts, fields,
                           event_id=digest)
        # ECS event.created is the wall time; a replay must not depend on it, so it stays unset here.
        del alert["event"]["created"]
        return alert
