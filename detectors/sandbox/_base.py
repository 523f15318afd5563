"""The base of detectors that judge a process by its sandbox: lineage, sandbox shapes and where addresses are."""

from __future__ import annotations

from typing import Any, ClassVar

from detectors.base import Detector
from detectors.network._addresses import Places, places
from detectors.sandbox._lineage import Lineage, Matcher, matcher, shared_lineage
from gpusentry.settings.detection import DetectionSettings


class LineageDetector(Detector):
    """Keeps the host's shared :class:`Lineage` as its state (subclasses with more state wrap it)."""

    abstract: ClassVar[bool] = True

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        super().__init__(settings)
        self.matcher: Matcher = matcher(self.settings.sandboxes)
        self.places: Places = places(self.settings.network)

    def new_state(self) -> Any:
        return Lineage()

    def new_host_state(self, shared: dict[str, Any]) -> Any:
        return shared_lineage(shared)


def first_in(reported: dict[str, float], key: str, ts: float, window_s: float, cap: int = 1024) -> bool:
    """True (and ``key`` marked at ``ts``) unless ``key`` was reported in the last ``window_s`` of event time;
    ``reported`` is pruned to the window when it reaches ``cap`` keys. A finding once per window, not per event."""
    last = reported.get(key)
    if last is not None and 0 <= ts - last < window_s:
        return False
    if len(reported) >= cap:
        for k in [k for k, v in reported.items() if ts - v >= window_s]:
            del reported[k]
        while len(reported) >= cap:  # all recent: forget the oldest (dicts keep insertion order)
            del reported[next(iter(reported))]
    reported[key] = ts
    return True

