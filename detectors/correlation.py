"""Correlation: a host's findings become one incident, updated as evidence grows, resolved when it stops.

One hijack is one incident, not fifty alerts.  Findings are grouped per host into the host's
current incident.  Its severity comes from the independent *kinds* of evidence (see
:class:`detectors.base.Signal`), never from the number of findings:

* the strongest kind's severity is the base;
* each further kind that is at least ``medium`` raises it one step (a GPU behaving like a miner
  *and* pool traffic is worse than either);
* three or more kinds, however weak each, make it at least ``medium``;
* tampering (the monitor stopped, defences killed, tracks covered) beside any other kind makes it at least
  ``high``: covering tracks right after other evidence is what a hijacker does;
* it never goes down while the incident is open.

So lone weak signals (an odd path, a GPU a little unlike its normal) stay ``low``, and a miner
flag set (``high``) plus pool contact (``high``) is ``critical``.

An alert (the ``gpusentry.alert`` contract, docs/alerts.md) is published when the incident
opens, when its severity rises or a new kind of evidence joins, at most every
``update_interval_s`` while evidence keeps coming, and once when it resolves:
``resolve_after_s`` of event time on that host without new evidence while no implicated process
is seen running on a GPU.  The incident also prices
itself: GPU-seconds, energy and money of the implicated GPUs from the first evidence on.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from detectors.base import SEVERITIES, SEVERITY_SCORE, Finding, Signal
from gpusentry.contract import Dataset, make_event
from gpusentry.pricing import price_list
from gpusentry.settings.detection import DetectionSettings
from gpusentry.timefmt import format_timestamp

TECHNIQUE_NAMES = {"T1496": "Resource Hijacking", "T1496.001": "Compute Hijacking"}
TECHNIQUE_REFERENCES = {"T1496": "https://attack.mitre.org/techniques/T1496/",
                        "T1496.001": "https://attack.mitre.org/techniques/T1496/001/"}
TACTIC = ("TA0040", "Impact", "https://attack.mitre.org/tactics/TA0040/")
# Gaps longer than this between two samples of a GPU are not counted as stolen time.
MAX_SAMPLE_GAP_S = 60.0
_GPU = Dataset.GPU.value  # an enum member's .value is a slow lookup, and this runs for every event
# rule.* of an incident whose strongest evidence comes from a rule the correlator has no metadata for.
RULE_ID = "gpusentry.incident"
RULE_NAME = "GPU/compute hijacking incident"
RULESET = "gpusentry"


@dataclass
class Incident:
    dedup_key: str
    opened_at: float
    last_evidence_at: float
    severity: str = "low"
    signals: set[str] = field(default_factory=set)
    signal_severity: dict[str, str] = field(default_factory=dict)  # kind -> strongest severity seen
    rules: set[str] = field(default_factory=set)
    top: tuple[int, float, str, str] | None = None  # (severity rank, score, rule id, message) of the strongest
    first_evidence: list[dict[str, Any]] = field(default_factory=list)
    latest_evidence: deque[dict[str, Any]] = field(default_factory=deque)
    evidence_count: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    gpus: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    technique: str = "T1496"
    published_severity: str | None = None
    published_signals: frozenset[str] = frozenset()
    last_published_at: float | None = None
    gpu_seconds: float = 0.0  # wall time of the implicated GPUs
    energy_kwh: float = 0.0  # the hijacker's share of their integrated draw, times PUE
    usd: float = 0.0  # compute + energy, in the price list's currency
    busy_gpu_seconds: float = 0.0  # the time those GPUs worked for the hijacker (what compute is billed on)
    compute_cost: float = 0.0
    energy_cost: float = 0.0
    unpriced_gpu_seconds: float = 0.0  # busy time on GPUs the price table does not know
    # GPU model (NVML name) -> [busy GPU-seconds, kWh, compute cost, energy cost, rate or None, table model]
    by_model: dict[str, list[Any]] = field(default_factory=dict)
    price_lists: list[str] = field(default_factory=list)  # versions of the price lists that priced it, in order
    last_sample_at: dict[str, float] = field(default_factory=dict)
    # Event time an implicated process was last seen running on a GPU: a miner found once, at its start,
    # keeps its incident open for as long as it runs.
    last_seen_running_at: float = 0.0
    # Recurrence: an episode that opens within detection.recurrence_horizon_s of the last one's end continues
    # its incident (same dedup key); first_opened_at is when the first episode opened.
    episode: int = 1
    first_opened_at: float = 0.0

    @property
    def last_active_at(self) -> float:
        return max(self.last_evidence_at, self.last_seen_running_at)

    @property
    def evidence(self) -> list[dict[str, Any]]:
        """The evidence list of the alert contract.  Entries keep their time as epoch seconds and are
        formatted here: most are replaced before any alert shows them."""
        return [{**entry, "@timestamp": format_timestamp(entry["@timestamp"])}
                for entry in (*self.first_evidence, *self.latest_evidence)]


@dataclass
class HostIncidents:
    """Per-host correlation state."""

    current: Incident | None = None
    gpu_names: dict[str, str] = field(default_factory=dict)
    # The last resolved incident: (dedup key, last activity, episodes, first opened), for recurrence.
    previous: tuple[str, float, int, float] | None = None
    # Incidents opened on the host so far, and the UTC day of its first event: the dedup key of the next one
    # is derived from these, not from whichever finding happened to be processed first, so a worker catching
    # up a backlog, a successor replaying from a snapshot and `replay` of the same events agree on it.
    # (Class-level defaults: states pickled before these fields existed read them as 0 / None.)
    opened: int = 0
    epoch: str | None = None


def incident_severity(signal_severity: Mapping[str, str]) -> str:
    """Severity of a set of evidence kinds (see the module docstring)."""
    ranks = sorted((SEVERITIES.index(s) for s in signal_severity.values()), reverse=True)
    if not ranks:
        return SEVERITIES[0]
    level = ranks[0] + sum(1 for r in ranks[1:] if r >= 1)
    if len(ranks) >= 3:
        level = max(level, 1)
    if Signal.TAMPERING in signal_severity and len(ranks) >= 2:
        level = max(level, SEVERITIES.index("high"))
    return SEVERITIES[min(level, len(SEVERITIES) - 1)]


class Correlator:
    def __init__(self, settings: DetectionSettings, rules: Mapping[str, tuple[str, str]] | None = None) -> None:
        """``rules`` maps rule ids to (name, description), for the ``rule.*`` fields of alerts."""
        self.settings = settings
        self.rules = dict(rules or {})
        self.prices = price_list(settings.pricing)

    def observe(self, host: str, event: dict[str, Any], ts: float, findings: list[Finding],
                state: HostIncidents, *, late: bool = False) -> list[dict[str, Any]]:
        """``late``: the event is far behind the host's latest time; it adds evidence to an open incident but
        neither resolves one nor opens (or reopens) one."""
        alerts: list[dict[str, Any]] = []
        if state.epoch is None:
            state.epoch = format_timestamp(ts)[:10]  # the day of the host's first event, the keys' namespace
        inc = state.current
        is_gpu = event["event"]["dataset"] == _GPU
        if is_gpu:
            gpu = event.get("gpu")
            if isinstance(gpu, dict):
                uuid, name = gpu.get("uuid"), gpu.get("name")
                if uuid and name and state.gpu_names.get(uuid) != name:
                    state.gpu_names[uuid] = name
            if inc is not None:
                self._account(inc, event, ts, state)
        if inc is not None and not findings and not late and ts - inc.last_active_at >= self.settings.resolve_after_s:
            alerts.extend(self._resolve(host, inc, ts, state))
            inc = None
        if not findings or (late and inc is None):
            return alerts
        if inc is None:
            inc = state.current = self._open(host, findings, ts, state)
        self._add(inc, findings, ts)
        if is_gpu:
            self._account(inc, event, ts, state)
        if self._should_publish(inc, ts):
            alerts.append(self._alert(host, inc, ts, "open", state))
        return alerts

    def _open(self, host: str, findings: list[Finding], ts: float, state: HostIncidents) -> Incident:
        prev = state.previous
        if prev is not None and 0 <= ts - prev[1] <= self.settings.recurrence_horizon_s:
            # The same host again soon after: an agent's violations come and go across episodes, and each
            # episode is an update of one incident history, not a new page.
            key, _, episodes, first_opened = prev
            return Incident(dedup_key=key, opened_at=ts, last_evidence_at=ts, episode=episodes + 1,
                            first_opened_at=first_opened)
        state.opened += 1
        if state.epoch is None:
            state.epoch = format_timestamp(ts)[:10]
        digest = hashlib.sha256(f"{host}|{state.epoch}|{state.opened}".encode()).hexdigest()[:16]
        return Incident(dedup_key=f"gpusentry-{host}-{digest}"[:255], opened_at=ts, last_evidence_at=ts,
                        first_opened_at=ts)

    def expire(self, host: str, watermark: float, state: HostIncidents) -> list[dict[str, Any]]:
        """Resolve the host's incident if ``watermark`` (event time) is past its quiet period."""
        inc = state.current
        if inc is None or watermark - inc.last_active_at < self.settings.resolve_after_s:
            return []
        return self._resolve(host, inc, watermark, state)

    def _resolve(self, host: str, inc: Incident, ts: float, state: HostIncidents) -> list[dict[str, Any]]:
        state.current = None
        if inc.published_severity is not None:  # only what was published has a history to continue
            state.previous = (inc.dedup_key, inc.last_active_at, inc.episode, inc.first_opened_at or inc.opened_at)
        if inc.published_severity is None:
            return []  # never published (below min_alert_severity): nothing to close downstream
        return [self._alert(host, inc, ts, "resolved", state)]

    def _add(self, inc: Incident, findings: list[Finding], ts: float) -> None:
        inc.last_evidence_at = max(inc.last_evidence_at, ts)
        max_evidence = self.settings.max_evidence
        keep_first = max(1, max_evidence // 2)
        if inc.latest_evidence.maxlen != max_evidence - keep_first:
            inc.latest_evidence = deque(inc.latest_evidence, maxlen=max(0, max_evidence - keep_first))
        for f in findings:
            inc.signals.add(f.signal)
            old = inc.signal_severity.get(f.signal)
            if old is None or SEVERITIES.index(f.severity) > SEVERITIES.index(old):
                inc.signal_severity[f.signal] = f.severity
            inc.rules.add(f.rule_id)
            inc.evidence_count += 1
            rank = (SEVERITIES.index(f.severity), f.score, f.rule_id, f.message)
            if inc.top is None or rank[:2] > inc.top[:2]:
                inc.top = rank
            if f.technique == "T1496.001":
                inc.technique = "T1496.001"
            entry = {"event.id": f.event_id, "@timestamp": f.timestamp, "rule.id": f.rule_id,
                     "signal": f.signal, "severity": f.severity, "summary": f.message}
            if len(inc.first_evidence) < keep_first:
                inc.first_evidence.append(entry)
            else:
                inc.latest_evidence.append(entry)
            for path, value in f.fields.items():
                if not path.startswith("_") and value is not None:
                    inc.fields.setdefault(path, value)
            uuid = f.fields.get("gpu.uuid")
            if isinstance(uuid, str) and uuid:
                inc.gpus.add(uuid)
            pid = f.fields.get("process.pid")
            if isinstance(pid, int) and not isinstance(pid, bool):
                inc.pids.add(pid)
        inc.severity = max(inc.severity, incident_severity(inc.signal_severity), key=SEVERITIES.index)

    def _should_publish(self, inc: Incident, ts: float) -> bool:
        if SEVERITIES.index(inc.severity) < SEVERITIES.index(self.settings.min_alert_severity):
            return False
        if inc.published_severity != inc.severity or not inc.signals <= inc.published_signals:
            return True
        return inc.last_published_at is None or ts - inc.last_published_at >= self.settings.update_interval_s

    def _account(self, inc: Incident, event: dict[str, Any], ts: float, state: HostIncidents) -> None:
        """Integrate GPU time and energy of the implicated GPUs (by uuid, or running an implicated pid)."""
        gpu = event.get("gpu")
        if not isinstance(gpu, dict):
            return
        uuid = gpu.get("uuid")
        if not isinstance(uuid, str):
            return
        procs = gpu.get("processes")
        mine = [p for p in procs if isinstance(p, dict) and p.get("pid") in inc.pids] \
            if inc.pids and isinstance(procs, list) else []
        running = bool(mine)
        if running:
            inc.last_seen_running_at = max(inc.last_seen_running_at, ts)
        if uuid not in inc.gpus:
            if not running:
                return
            inc.gpus.add(uuid)
        last = inc.last_sample_at.get(uuid)
        inc.last_sample_at[uuid] = ts
        if last is None or ts <= last:
            return
        dt = min(ts - last, MAX_SAMPLE_GAP_S)
        inc.gpu_seconds += dt
        share = self._busy_share(gpu, mine, procs)
        if share <= 0.0:
            return  # idle, or another job's time: a duty-cycled miner is billed for its bursts only
        busy = dt * share
        power_fields = gpu.get("power")
        power = power_fields.get("draw_watts") if type(power_fields) is dict else None
        kwh = (power * busy / 3.6e6 * self.prices.pue) if type(power) is float or type(power) is int else 0.0
        name = state.gpu_names.get(uuid) or "unknown model"
        quote = self.prices.quote(name)
        compute = busy / 3600 * quote.rate if quote is not None else 0.0
        energy = kwh * self.prices.kwh
        if not inc.price_lists or inc.price_lists[-1] != self.prices.version:
            inc.price_lists.append(self.prices.version)  # a worker with another price list took over
        inc.busy_gpu_seconds += busy
        inc.energy_kwh += kwh
        inc.compute_cost += compute
        inc.energy_cost += energy
        inc.usd += compute + energy
        if quote is None:
            inc.unpriced_gpu_seconds += busy
        entry = inc.by_model.get(name)
        if entry is None:
            entry = inc.by_model[name] = [0.0, 0.0, 0.0, 0.0, None, quote.model if quote else None, set()]
        entry[4] = quote.rate if quote else None
        entry[0] += busy
        entry[1] += kwh
        entry[2] += compute
        entry[3] += energy
        entry[6].add(uuid)

    def _busy_share(self, gpu: dict[str, Any], mine: list[dict[str, Any]], procs: Any) -> float:
        """The fraction of a sample interval the GPU worked for the hijacker: its processes' SM share when
        NVML reports it, else the GPU's busy time split evenly among the processes on it."""
        sm = [v for p in mine if isinstance(v := p.get("sm_pct"), int | float) and not isinstance(v, bool)]
        if mine and len(sm) == len(mine):
            return min(1.0, sum(sm) / 100.0)
        util = (gpu.get("utilization") or {}).get("gpu_pct") if type(gpu.get("utilization")) is dict else None
        if not isinstance(util, int | float) or isinstance(util, bool) or util < self.settings.gpu.busy_gpu_pct:
            return 0.0
        if not mine:
            return 1.0  # the GPU itself is the evidence (a mining signature): its busy time is the hijack's
        others = len(procs) if isinstance(procs, list) else len(mine)
        return len(mine) / max(others, len(mine))

    def _rule(self, inc: Incident) -> tuple[str, str, str]:
        rule_id = inc.top[2] if inc.top else RULE_ID
        name, description = self.rules.get(rule_id, (RULE_NAME, ""))
        return rule_id, name, description

    def _alert(self, host: str, inc: Incident, ts: float, status: str, state: HostIncidents) -> dict[str, Any]:
        inc.published_severity = inc.severity
        inc.published_signals = frozenset(inc.signals)
        inc.last_published_at = ts
        rule_id, rule_name, rule_description = self._rule(inc)
        kinds = ", ".join(sorted(inc.signals))
        lead = inc.top[3] if inc.top else kinds
        if status == "resolved":
            message = (f"Resolved: GPU/compute hijacking on {host} quiet since "
                       f"{format_timestamp(inc.last_active_at)} ({kinds}; {inc.evidence_count} findings, "
                       f"{inc.busy_gpu_seconds / 3600:.2f} busy GPU-hours, {inc.usd:.2f} {self.prices.currency})")
        else:
            message = (f"GPU/compute hijacking suspected on {host} [{inc.severity}]: {lead} "
                       f"({kinds}; {inc.evidence_count} findings, {inc.busy_gpu_seconds / 3600:.2f} busy GPU-hours so far)")
        fields: dict[str, Any] = {
            "rule.id": rule_id, "rule.name": rule_name,
            "rule.description": rule_description or ("Correlated evidence of cryptocurrency mining or other "
                                                     "unauthorised use of this host's GPUs/CPUs."),
            "rule.ruleset": RULESET,
            "event.severity": SEVERITY_SCORE[inc.severity],
            "event.start": format_timestamp(inc.opened_at),
            "threat.framework": "MITRE ATT&CK",
            "threat.tactic.id": [TACTIC[0]], "threat.tactic.name": [TACTIC[1]],
            "threat.tactic.reference": [TACTIC[2]],
            # ECS keeps sub-techniques apart: technique T1496, sub-technique T1496.001.
            "threat.technique.id": ["T1496"],
            "threat.technique.name": [TECHNIQUE_NAMES["T1496"]],
            "threat.technique.reference": [TECHNIQUE_REFERENCES["T1496"]],
            "message": message,
            "gpusentry.alert.severity": inc.severity,
            "gpusentry.alert.dedup_key": inc.dedup_key,
            "gpusentry.alert.status": status,
            "gpusentry.alert.signals": sorted(inc.signals),
            "gpusentry.alert.rules": sorted(inc.rules),
            "gpusentry.alert.evidence": inc.evidence,
            "gpusentry.alert.evidence_count": inc.evidence_count,
            "gpusentry.alert.last_evidence": format_timestamp(inc.last_evidence_at),
            "gpusentry.alert.episode": inc.episode,
            "gpusentry.alert.first_opened": format_timestamp(inc.first_opened_at or inc.opened_at),
            "gpusentry.alert.cost.gpu_seconds": round(inc.gpu_seconds, 3),
            "gpusentry.alert.cost.busy_gpu_seconds": round(inc.busy_gpu_seconds, 3),
            "gpusentry.alert.cost.energy_kwh": round(inc.energy_kwh, 6),
            "gpusentry.alert.cost.usd": round(inc.usd, 4),
            "gpusentry.alert.cost.compute": round(inc.compute_cost, 4),
            "gpusentry.alert.cost.energy": round(inc.energy_cost, 4),
            "gpusentry.alert.cost.currency": self.prices.currency,
            "gpusentry.alert.cost.price_list": self.prices.version,
            "gpusentry.alert.cost.price_lists": list(inc.price_lists) or [self.prices.version],
            "gpusentry.alert.cost.gpus": len(inc.gpus),
            "gpusentry.alert.cost.unpriced_gpu_seconds": round(inc.unpriced_gpu_seconds, 3),
            "gpusentry.alert.cost.by_model": [
                {"gpu_model": name, "price_model": e[5], "gpus": len(e[6]), "busy_gpu_seconds": round(e[0], 3),
                 "energy_kwh": round(e[1], 6), "rate_per_gpu_hour": e[4], "compute": round(e[2], 4),
                 "energy": round(e[3], 4)} for name, e in sorted(inc.by_model.items())],
        }
        if inc.technique == "T1496.001":
            fields["threat.technique.subtechnique.id"] = ["T1496.001"]
            fields["threat.technique.subtechnique.name"] = [TECHNIQUE_NAMES["T1496.001"]]
            fields["threat.technique.subtechnique.reference"] = [TECHNIQUE_REFERENCES["T1496.001"]]
        if status == "resolved":
            fields["event.end"] = format_timestamp(inc.last_active_at)
        for path, value in inc.fields.items():
            fields.setdefault(path, value)
        digest = hashlib.sha256(f"{inc.dedup_key}|{status}|{inc.evidence_count}|{ts}".encode()).hexdigest()[:32]
        # event.created (ECS: when the alert was published) is wall time: the publisher sets it, so that
        # replays of the same events give byte-identical alerts.
        return make_event(Dataset.ALERT, host, ts, fields, event_id=digest)
