"""The detection engine: events in, incident alerts out.  Plain Python, deterministic.

``Engine.process(event)`` runs every detector registered for the event's dataset with that
host's state, then hands the findings to the correlator, which returns alert events (the
``gpusentry.alert`` contract) for incidents that opened, grew or resolved.  The same engine runs
in ``gpusentry replay``, in the tests and inside the stream worker.

State is per host (:class:`HostState`); ``snapshot_host``/``restore_host`` move one host's state
as bytes (the worker checkpoints them in a changelog-backed table), ``snapshot``/``restore`` the
whole engine.  A detector that raises does not stop anything: the failure is counted and kept in
``failures`` for the caller to dead-letter (``strict=True`` re-raises, for tests).
"""

from __future__ import annotations

import importlib
import logging
import pickle
import pkgutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detectors.base import Detector, Finding, Signal
from detectors.correlation import Correlator, HostIncidents
from gpusentry.contract import Dataset, event_time
from gpusentry.settings.detection import DetectionSettings

if TYPE_CHECKING:
    from gpusentry.config import Config

log = logging.getLogger(__name__)

# Subpackages of ``detectors`` that hold one detector per module.
DETECTOR_PACKAGES = ("detectors.process", "detectors.network", "detectors.gpu", "detectors.sandbox")


def discover() -> list[type[Detector]]:
    """Every concrete Detector subclass defined in the detector packages, in a stable order."""
    found: dict[str, type[Detector]] = {}
    for package_name in DETECTOR_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError as exc:
            if exc.name != package_name:
                raise
            continue
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package_name}.{info.name}")
            for obj in vars(module).values():
                if (isinstance(obj, type) and issubclass(obj, Detector) and obj.__module__ == module.__name__
                        and not obj.__dict__.get("abstract", False)):
                    if obj.id in found and found[obj.id] is not obj:
                        raise TypeError(f"two detectors share the id {obj.id!r}")
                    found[obj.id] = obj
    return [found[k] for k in sorted(found)]


@dataclass
class HostState:
    detector_states: dict[str, Any] = field(default_factory=dict)
    incidents: HostIncidents = field(default_factory=HostIncidents)
    watermark: float | None = None  # the host's latest accepted event time
    pending_jump: float | None = None  # an event far ahead of the reference clock, held until a second confirms it
    # dataset -> [(detector, its state, its parse of the dataset or None)]: what Engine.process runs,
    # without a lookup per detector.  Derived from detector_states, so it is left out of checkpoints
    # and rebuilt on first use.
    runs: dict[str, list[tuple[Detector, Any, Any]]] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"detector_states": self.detector_states, "incidents": self.incidents, "watermark": self.watermark,
                "pending_jump": self.pending_jump}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"watermark": None, "pending_jump": None, **state})
        self.runs = {}


@dataclass(frozen=True)
class ClockReject:
    """An event refused for its time: more than ``clock_skew_s`` ahead of the reference clock."""

    reason: str
    event: dict[str, Any]


_NO_DATASET: dict[str, Any] = {"event": {"dataset": "clock"}}  # what a finding without an accepted event rides on
CLOCK_JUMP_RULE = ("agent.clock_jump", "Host clock jumped ahead",
                   "A host's events are dated ahead of the worker's clock by more than contract.max_future_skew_s "
                   "(they are dead-lettered as clock_skew; said once per jump), or, in replay, two in a row leap "
                   "past the file's time line by more than contract.max_replay_gap_s (the first is dead-lettered, "
                   "the host's new time accepted from the second): its clock was stepped (a bad NTP step, a "
                   "tampered agent). Low; medium while an incident is open on the host, which an attacker could "
                   "try to close or freeze by moving time.")


@dataclass(frozen=True)
class DetectorFailure:
    rule_id: str
    error: str
    event: dict[str, Any]


class DetectorError(RuntimeError):
    pass


class Engine:
    def __init__(self, settings: DetectionSettings | None = None, detectors: Iterable[Detector] | None = None,
                 *, strict: bool = False, clock_skew_s: float = 300.0, replay_gap_s: float = 7 * 86400.0,
                 clock: Callable[[], float] | None = None) -> None:
        """Clocks: with ``clock`` (a worker passes its wall clock) an event dated more than ``clock_skew_s``
        ahead of it is refused. Without one (replay), the reference is the file's own time line, the latest
        event time accepted from any host, and a file may skip ahead by up to ``replay_gap_s`` (fleets go
        quiet, captures have gaps); an event beyond that is refused unless the next one of its host
        confirms the new time."""
        self.settings = settings or DetectionSettings()
        self.detectors = list(detectors) if detectors is not None else [cls(self.settings) for cls in discover()]
        self.strict = strict
        rules = {d.id: (d.title, d.description) for d in self.detectors}
        rules[CLOCK_JUMP_RULE[0]] = CLOCK_JUMP_RULE[1:]
        self.correlator = Correlator(self.settings, rules)
        self.clock_skew_s = clock_skew_s
        self.clock = clock
        self.allowed_lead_s = clock_skew_s if clock is not None else max(clock_skew_s, replay_gap_s)
        self.fleet_watermark: float | None = None  # replay's reference: the latest event time of any host
        self.clock_rejects: list[ClockReject] = []
        self.late_events = 0
        self._by_dataset: dict[str, list[Detector]] = {d.value: [] for d in Dataset}
        for det in self.detectors:
            for ds in det.datasets:
                self._by_dataset[ds.value].append(det)
        self.hosts: dict[str, HostState] = {}
        self.failures: list[DetectorFailure] = []
        self.failure_counts: Counter[str] = Counter()
        self.findings_by_rule: Counter[str] = Counter()

    @classmethod
    def from_config(cls, cfg: Config, *, strict: bool = False, clock: Callable[[], float] | None = None) -> Engine:
        return cls(cfg.detection, strict=strict, clock_skew_s=cfg.contract.max_future_skew_s,
                   replay_gap_s=cfg.contract.max_replay_gap_s, clock=clock)

    def _host(self, name: str) -> HostState:
        state = self.hosts.get(name)
        if state is None:
            shared: dict[str, Any] = {}  # what this host's detectors compute once for all (Detector.new_host_state)
            state = self.hosts[name] = HostState(
                detector_states={d.id: d.new_host_state(shared) for d in self.detectors})
        return state

    def process(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one validated contract event; return the alerts it causes (often none)."""
        dataset = event["event"]["dataset"]
        detectors = self._by_dataset.get(dataset)
        if not detectors and dataset == Dataset.ALERT.value:
            return []
        host_name = event["host"]["name"]
        host = self.hosts.get(host_name) or self._host(host_name)
        ts = event_time(event)
        findings: list[Finding] = []
        # Clocks: an event dated far ahead of the reference is held back (dead-lettered) until a second event
        # confirms the host's new time; one bad timestamp can neither resolve nor freeze an incident.
        reference = self.clock() if self.clock is not None else self.fleet_watermark
        if reference is not None and ts > reference + self.allowed_lead_s:
            pending = host.pending_jump
            if pending is None or abs(ts - pending) > self.allowed_lead_s or self.clock is not None:
                first = pending is None
                host.pending_jump = ts
                self.clock_rejects.append(ClockReject(
                    f"event time {event['@timestamp']} is {ts - reference:,.0f} s ahead of "
                    f"{'this worker' if self.clock is not None else 'the latest event'}'s clock ("
                    f"{'contract.max_future_skew_s' if self.clock is not None else 'contract.max_replay_gap_s'} = "
                    f"{self.allowed_lead_s:g} s); fix the host's clock (NTP)", event))
                if self.clock is not None and first:
                    # Live, every event of a host ahead of the worker's clock is refused; the host says so
                    # once, as evidence dated by the worker's clock.
                    jump = self._clock_jump(event, ts, host, reference, at=reference)
                    host.pending_jump = ts
                    self.findings_by_rule[jump.rule_id] += 1
                    return self.correlator.observe(host_name, _NO_DATASET, reference, [jump], host.incidents)
                return []
            findings.append(self._clock_jump(event, ts, host, reference))
        elif host.pending_jump is not None:
            host.pending_jump = None  # the outlier stayed alone
        wm = host.watermark
        late = wm is not None and ts < wm - self.settings.resolve_after_s
        if wm is None or ts > wm:
            host.watermark = ts
            if self.clock is None and (self.fleet_watermark is None or ts > self.fleet_watermark):
                self.fleet_watermark = ts
        if late:
            self.late_events += 1
        runs = host.runs.get(dataset)
        if runs is None:
            states = host.detector_states
            runs = host.runs[dataset] = [(det, states[det.id], det.parses.get(dataset)) for det in detectors or ()]
        parsed_by = parsed = None  # detectors that read the same parse of the event get it parsed once
        for det, state, parse in runs:
            try:
                if parse is None:
                    found = det.process(event, state)
                else:
                    if parse is not parsed_by:
                        parsed, parsed_by = parse(event, ts), parse
                    found = det.process_parsed(event, parsed, state)
                if found:
                    findings.extend(found)
            except Exception as exc:
                # Counted and handed to the caller for the dead-letter topic; never silent.
                self.failure_counts[det.id] += 1
                self.failures.append(DetectorFailure(det.id, f"{type(exc).__name__}: {exc}", event))
                log.warning("detector %s failed on event %s: %s", det.id, event["event"].get("id"), exc)
                if self.strict:
                    raise DetectorError(f"detector {det.id} raised on event {event['event'].get('id')}") from exc
        for f in findings:
            self.findings_by_rule[f.rule_id] += 1
        return self.correlator.observe(host_name, event, ts, findings, host.incidents, late=late)

    def _clock_jump(self, event: dict[str, Any], ts: float, host: HostState, reference: float,
                    at: float | None = None) -> Finding:
        host.pending_jump = None
        open_incident = host.incidents.current is not None
        return Finding(rule_id=CLOCK_JUMP_RULE[0], signal=Signal.CLOCK, severity="medium" if open_incident else "low",
                       message=f"host clock jumped {ts - reference:,.0f} s ahead (to {event['@timestamp']})"
                               + ("; an incident is open on this host" if open_incident else ""),
                       event_id=event["event"]["id"], timestamp=ts if at is None else at, score=0.6,
                       technique="T1496")

    def new_timeline(self) -> None:
        """Judge what follows on its own time line (replay: each file), forgetting the times seen so far."""
        self.fleet_watermark = None
        for host in self.hosts.values():
            host.watermark = host.pending_jump = None

    def drain_clock_rejects(self) -> list[ClockReject]:
        out, self.clock_rejects = self.clock_rejects, []
        return out

    def finish(self) -> list[dict[str, Any]]:
        """End of input (replay): nothing is pending by default; incidents stay open as they were."""
        return []

    def expire(self, watermark: float) -> list[dict[str, Any]]:
        """Resolve every host's incident whose quiet period ended before ``watermark`` (event time).

        A host that stops sending events (miner killed and host switched off, agent gone) would
        otherwise never see the event that resolves its incident; a worker calls this with the
        lowest event time its partitions have reached.
        """
        alerts: list[dict[str, Any]] = []
        for name in sorted(self.hosts):
            alerts.extend(self.correlator.expire(name, watermark, self.hosts[name].incidents))
        return alerts

    def drain_failures(self) -> list[DetectorFailure]:
        out, self.failures = self.failures, []
        return out

    # ------------------------------------------------------------------ checkpoints

    def snapshot_host(self, host_name: str) -> bytes:
        return pickle.dumps(self.hosts.get(host_name) or HostState(), protocol=pickle.HIGHEST_PROTOCOL)

    def restore_host(self, host_name: str, blob: bytes) -> None:
        state = pickle.loads(blob)  # noqa: S301 - our own checkpoint, from our own changelog topic
        for det in self.detectors:  # detectors added since the checkpoint start empty
            state.detector_states.setdefault(det.id, det.new_state())
        self.hosts[host_name] = state

    def forget_host(self, host_name: str) -> None:
        self.hosts.pop(host_name, None)

    def snapshot(self) -> bytes:
        return pickle.dumps(self.hosts, protocol=pickle.HIGHEST_PROTOCOL)

    def restore(self, blob: bytes) -> None:
        self.hosts = {}
        for name, state in pickle.loads(blob).items():  # noqa: S301 - our own checkpoint
            self.hosts[name] = state
            for det in self.detectors:
                state.detector_states.setdefault(det.id, det.new_state())
