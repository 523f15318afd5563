"""Drift in a GPU's utilisation or power, and changes of its power limit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import gpu, idle, mining, training
from detectors.gpu._models import DriftMonitor
from detectors.gpu._ownership import host_process_table
from detectors.gpu._window import GpuWindows, Sample, host_windows
from gpusentry.contract import Dataset


@dataclass
class DriftState:
    windows: GpuWindows
    monitors: dict[str, DriftMonitor] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)  # uuid -> last enforced power limit


class GpuDrift(GpuDetector):
    id = "gpu.drift"
    title = "GPU utilisation or power drifted, or its power limit changed"
    description = ("ADWIN watches each GPU's windowed utilisation and power draw and reports when their "
                   "distribution shifts; a change of the enforced power limit (miners lower it to mine "
                   "efficiently and quietly) is reported as it happens.")
    severity = "low"
    technique = "T1496.001"
    references = ("https://riverml.xyz/latest/api/drift/ADWIN/",
                  "https://doi.org/10.1137/1.9781611972771.42")
    datasets = frozenset({Dataset.GPU})
    signal = Signal.GPU_ANOMALY

    examples: ClassVar[list[Example]] = [
        Example("idle gpu starts mining", True, idle(0, 16, interval=30) + mining(480, 8, interval=30)),
        Example("power limit lowered from 400 W to 260 W", True,
                [gpu(0, util=0, power=60, limit=400), gpu(10, util=0, power=60, limit=260)]),
        Example("steady training", False, training(0, 24, interval=30, dip_every=0)),
        Example("power limit unchanged", False, [gpu(t, util=0, power=60, limit=400) for t in (0, 10, 20)]),
    ]

    def new_state(self) -> DriftState:
        return self.new_host_state({})

    def new_host_state(self, shared: dict[str, Any]) -> DriftState:
        g = self.settings.gpu
        return DriftState(host_windows(shared, g.window_s, g.busy_gpu_pct, host_process_table(shared)))

    def process_parsed(self, event: dict[str, Any], s: Sample, state: DriftState) -> Iterable[Finding]:
        window = state.windows.add(s)
        if window is None and s.steady:
            return ()  # the same power limit as the last sample, and no window to learn
        g = self.settings.gpu
        findings: list[Finding] = []
        limit = s.limit
        if limit is not None and limit > 0:
            before = state.limits.get(s.uuid)
            if before != limit:
                state.limits[s.uuid] = limit
                if before and abs(limit - before) / before * 100 > g.power_limit_change_pct:
                    verb = "lowered" if limit < before else "raised"
                    findings.append(self.finding(
                        event, f"GPU {s.index} power limit {verb} from {before:.0f} W to {limit:.0f} W",
                        timestamp=s.ts, fields={"gpu.index": s.index, "gpu.uuid": s.uuid}))
        if window is not None:
            monitor = state.monitors.get(window.uuid)
            if monitor is None:
                monitor = state.monitors[window.uuid] = DriftMonitor(g.drift_delta)
            monitor.learn_one(window.features)
            for key in monitor.drifted:
                # util_mean is in percent already; power_frac is a fraction of the limit
                factor = 1.0 if key == "util_mean" else 100.0
                unit = "% utilisation" if key == "util_mean" else "% of the power limit"
                now = window.features.get(key) or 0.0
                findings.append(self.finding(
                    event, f"GPU {window.index} drift: {monitor.before.get(key, 0.0) * factor:.0f} {unit} before, "
                    f"{now * factor:.0f} now", timestamp=s.ts,
                    fields={"gpu.index": window.index, "gpu.uuid": window.uuid}))
        return findings
