"""What every detector is: metadata as class attributes, a ``process`` method, examples beside it.

A detector is plain Python (no faust, no I/O, no wall clock).  Its state is **per host**:
``new_state()`` makes an empty one and the engine keeps one per host and detector, so a host's
whole detection state can be checkpointed and moved between workers on its own
(:meth:`detectors.engine.Engine.snapshot_host`).  Everything in a state object must pickle.

``process(event, state)`` sees one validated contract event of a dataset the detector declared
and returns the :class:`Finding` objects it raises (usually none).  Findings are signals, not
alerts: the correlator (:mod:`detectors.correlation`) turns a host's findings into one incident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gpusentry.contract import Dataset
from gpusentry.settings.detection import DetectionSettings

SEVERITIES = ("low", "medium", "high", "critical")
SEVERITY_SCORE = {"low": 25, "medium": 50, "high": 75, "critical": 95}


class Signal:
    """Correlation classes: independent kinds of evidence a hijack leaves on a host."""

    MINER_PROCESS = "miner_process"  # a process that is a miner by name, flags or config
    SUSPICIOUS_PROCESS = "suspicious_process"  # odd path, masquerading, service spawning shells
    POOL = "pool"  # contact with a known mining pool (DNS, SNI, domain, IP)
    PROTOCOL = "protocol"  # a mining protocol in a flow payload
    GPU_SIGNATURE = "gpu_signature"  # a GPU behaving like a miner
    GPU_ANOMALY = "gpu_anomaly"  # a GPU behaving unlike its own normal
    GPU_UNOWNED = "gpu_unowned"  # GPU work that no known job or allowed service owns
    ALLOCATION = "allocation"  # GPU work outside what the scheduler (Kubernetes, Slurm, Docker) allocated
    TUNNEL = "tunnel"  # remote access out of the host: SSH forwards, tunnel tools, reverse shells
    PROBING = "probing"  # reaching into the network: sweeps, control-plane ports, scanners, metadata services
    CLOCK = "clock"  # the host's clock moved in a way that could hide or freeze an incident
    TAMPERING = "tampering"  # defences stopped or tracks covered: security agents, process hiders, history


@dataclass(frozen=True, slots=True)
class Finding:
    """One detector's verdict on one event."""

    rule_id: str
    signal: str
    severity: str  # low | medium | high | critical
    message: str  # one line, for the evidence list
    event_id: str
    timestamp: float  # event time of the evidence
    score: float = 1.0  # confidence 0..1
    technique: str = "T1496"  # MITRE ATT&CK: T1496 Resource Hijacking, T1496.001 Compute Hijacking
    # ECS fields the incident should carry (dotted paths): gpu.index, gpu.uuid, process.*, destination.*, ...
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Example:
    """A named example: run ``events`` through a fresh detector; ``hit`` says whether it must raise.

    ``settings`` is a ``[detection]`` table the example runs under (a site's bastion, say), for behaviour
    that depends on configuration; empty means the defaults.  ``min_severity``: only findings at or above it
    count (a negative example may then allow a low, informational finding)."""

    name: str
    hit: bool
    events: list[dict[str, Any]]
    settings: Mapping[str, Any] = field(default_factory=dict)
    min_severity: str = "low"

    def detector(self, cls: type[Detector]) -> Detector:
        """A fresh detector of ``cls`` configured for this example."""
        return cls(DetectionSettings.model_validate(dict(self.settings))) if self.settings else cls()


class Detector:
    """Base class.  Subclasses set the metadata and implement :meth:`process`."""

    id: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str]
    severity: ClassVar[str]
    technique: ClassVar[str] = "T1496"  # MITRE ATT&CK Resource Hijacking
    references: ClassVar[tuple[str, ...]] = ()
    datasets: ClassVar[frozenset[Dataset]]
    signal: ClassVar[str]
    examples: ClassVar[list[Example]] = []
    # dataset -> a parse of its events that several detectors read, called as parse(event, event_time)
    # (the GPU detectors' Sample).  An engine runs each parse once per event for every detector that
    # names the same function and hands the result to process_parsed; on its own, a detector's
    # process() parses for itself.
    parses: ClassVar[Mapping[str, Callable[[dict[str, Any], float], Any]]] = {}

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        self.settings = settings or DetectionSettings()

    def new_state(self) -> Any:
        """Empty per-host state (``None`` for stateless detectors)."""
        return None

    def new_host_state(self, shared: dict[str, Any]) -> Any:
        """Empty per-host state inside an engine: ``shared`` is one dict per host, passed to every detector.

        Detectors that summarise the same input the same way (the GPU detectors' per-GPU windows
        and process table) keep one object in ``shared`` and reference it from their states, so
        the work is done once per host; pickling the host's state keeps the sharing.  A shared
        object must give every detector the same answer however many of them feed it the same
        event.  Default: :meth:`new_state`, nothing shared.
        """
        return self.new_state()

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        raise NotImplementedError

    def process_parsed(self, event: dict[str, Any], parsed: Any, state: Any) -> Iterable[Finding]:
        """:meth:`process` for an event of a dataset in :attr:`parses`, given its parse."""
        raise NotImplementedError

    def finding(self, event: Mapping[str, Any], message: str, *, timestamp: float, score: float = 1.0,
                severity: str | None = None, fields: Mapping[str, Any] | None = None) -> Finding:
        """Build a finding for ``event`` with this detector's metadata."""
        return Finding(rule_id=self.id, signal=self.signal, severity=severity or self.severity, message=message,
                       event_id=event["event"]["id"], timestamp=timestamp, score=score, technique=self.technique,
                       fields=dict(fields or {}))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):  # a base class for detectors, not one (not inherited)
            return
        missing = [a for a in ("id", "title", "description", "severity", "datasets", "signal")
                   if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"detector {cls.__name__} lacks {', '.join(missing)}")
        if cls.severity not in SEVERITIES:
            raise TypeError(f"detector {cls.__name__}: severity {cls.severity!r} not in {SEVERITIES}")
