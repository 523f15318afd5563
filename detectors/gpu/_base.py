"""What the GPU detectors have in common: the parsed sample, and the host's process events.

Every GPU detector reads a ``gpusentry.gpu`` event as a :class:`~detectors.gpu._window.Sample`
(:attr:`GpuDetector.parses`), so an engine parses each sample once for all five.  Process events
only feed the host's process table, which the detectors share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from detectors.base import Detector, Finding
from detectors.gpu._window import Sample, read_sample
from gpusentry.contract import Dataset, event_time

_GPU = Dataset.GPU.value
_PROCESS = Dataset.PROCESS.value


class GpuDetector(Detector):
    abstract = True
    parses = {_GPU: read_sample}

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        dataset = event["event"]["dataset"]
        if dataset == _GPU:
            return self.process_parsed(event, read_sample(event, event_time(event)), state)
        if dataset == _PROCESS:
            state.table.observe(event)
        return ()

    def process_parsed(self, event: dict[str, Any], parsed: Sample, state: Any) -> Iterable[Finding]:
        """The findings of one GPU sample (``parsed``, the Sample of ``event``)."""
        raise NotImplementedError
