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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detectors.base import Detector, Finding
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
    # dataset -> [(detector, its state, its parse of the dataset or None)]: what Engine.process runs,
    # without a lookup per detector.  Derived from detector_states, so it is left out of checkpoints
    # and rebuilt on first use.
    runs: dict[str, list[tuple[Detector, Any, Any]]] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"detector_states": self.detector_states, "incidents": self.incidents}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.runs = {}


@dataclass(frozen=True)
class DetectorFailure:
    rule_id: str
    error: str
    event: dict[str, Any]


class DetectorError(RuntimeError):
    pass


class Engine:
    def __init__(self, settings: DetectionSettings | None = None, detectors: Iterable[Detector] | None = None,
                 *, strict: bool = False) -> None:
        self.settings = settings or DetectionSettings()
        self.detectors = list(detectors) if detectors is not None else [cls(self.settings) for cls in discover()]
        self.strict = strict
        self.correlator = Correlator(self.settings, {d.id: (d.title, d.description) for d in self.detectors})
        self._by_dataset: dict[str, list[Detector]] = {d.value: [] for d in Dataset}
        for det in self.detectors:
            for ds in det.datasets:
                self._by_dataset[ds.value].append(det)
        self.hosts: dict[str, HostState] = {}
        self.failures: list[DetectorFailure] = []
        self.failure_counts: Counter[str] = Counter()
        self.findings_by_rule: Counter[str] = Counter()

    @classmethod
    def from_config(cls, cfg: Config, *, strict: bool = False) -> Engine:
        return cls(cfg.detection, strict=strict)

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
        return self.correlator.observe(host_name, event, ts, findings, host.incidents)

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
