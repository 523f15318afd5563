"""What the agent-health detectors read: when a GPU counts as busy, lost GPUs, and the agent's lifecycle events."""

from __future__ import annotations

from typing import Any

from detectors.base import Detector, Signal
from detectors.gpu._window import read_sample
from gpusentry.contract import Dataset

# A GPU at this utilisation or more is doing work: an agent that stops or goes quiet then leaves it unwatched.
BUSY_PCT = 20.0
# GPU work this recent (event time) makes the agent's disappearance high rather than medium.
BUSY_WINDOW_S = 600.0


def gpu_lost(event: dict[str, Any]) -> bool:
    return ((event.get("gpusentry") or {}).get("gpu") or {}).get("status") == "lost"


def agent_fields(event: dict[str, Any]) -> dict[str, Any]:
    """The ``gpusentry.agent`` fields of an event (empty on all but the agent's own process events)."""
    if event["event"]["dataset"] != Dataset.PROCESS.value:
        return {}
    agent = (event.get("gpusentry") or {}).get("agent")
    return agent if isinstance(agent, dict) else {}


def lifecycle(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """(``started`` / ``spool_removed`` / ``stopping`` / None, the stop signal) of an agent's own process event."""
    agent = agent_fields(event)
    return agent.get("lifecycle"), agent.get("stop_signal")


class AgentHealthDetector(Detector):
    """What agent.silent and agent.tampered share: they read the agent's own events and every GPU sample (through
    the GPU detectors' parse, done once per sample for all), and a monitor switched off is tampering."""

    abstract = True
    severity = "medium"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1562/001/", "https://attack.mitre.org/techniques/T1496/")
    datasets = frozenset({Dataset.PROCESS, Dataset.GPU})
    signal = Signal.TAMPERING
    parses = {Dataset.GPU.value: read_sample}
