"""A GPU whose windows look like cryptocurrency mining."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import burn_in, idle, mining, training
from detectors.gpu._models import MiningSignature
from detectors.gpu._ownership import host_process_table
from detectors.gpu._window import GpuWindows, Sample, host_windows
from gpusentry.contract import Dataset


@dataclass
class _GpuState:
    model: MiningSignature
    recent: deque[float]  # signature scores of the last busy windows
    pids: frozenset[int] = frozenset()  # the processes on the GPU, to notice a change of workload
    listed: tuple[int, ...] = ()  # the pids as last listed (the cheap same-as-before check)


@dataclass
class SignatureState:
    windows: GpuWindows
    gpus: dict[str, _GpuState] = field(default_factory=dict)


class GpuMiningSignature(GpuDetector):
    id = "gpu.mining_signature"
    title = "GPU behaves like a cryptocurrency miner"
    description = ("A GPU's windows show the mining signature: utilisation flat near 100 %, the memory "
                   "controller busy against a DAG-sized allocation, almost no PCIe traffic, a lowered power "
                   "limit or an underclocked core, and none of the dips training and inference show.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",
                  "https://github.com/NVIDIA/DCGM",
                  "https://docs.nvidia.com/deploy/nvml-api/")
    datasets = frozenset({Dataset.GPU})
    signal = Signal.GPU_SIGNATURE

    examples: ClassVar[list[Example]] = [
        Example("power-capped ethash miner", True, mining(0, 12)),
        Example("miner starting on an idle gpu", True, idle(0, 6) + mining(60, 10)),
        Example("gpu-burn burn-in at 100 percent", False, burn_in(0, 20)),
        Example("training with checkpoint dips", False, training(0, 40, dip_every=12)),
        Example("idle gpu", False, idle(0, 10)),
    ]

    def new_state(self) -> SignatureState:
        return self.new_host_state({})

    def new_host_state(self, shared: dict[str, Any]) -> SignatureState:
        g = self.settings.gpu
        return SignatureState(host_windows(shared, g.window_s, g.busy_gpu_pct, host_process_table(shared)))

    def process_parsed(self, event: dict[str, Any], sample: Sample, state: SignatureState) -> Iterable[Finding]:
        window = state.windows.add(sample)
        if window is None and sample.steady:
            return ()  # the same processes as the last sample, and no window to score
        g = self.settings.gpu
        gpu = state.gpus.get(sample.uuid)
        if gpu is None:
            gpu = state.gpus[sample.uuid] = _GpuState(MiningSignature(g.signature_history, g.busy_gpu_pct),
                                                      deque(maxlen=g.signature_history))
        listed = sample.pids
        if listed and listed != gpu.listed:
            gpu.listed = listed
            pids = frozenset(listed)
            if pids != gpu.pids:
                if gpu.pids:
                    gpu.model.new_workload()
                gpu.pids = pids
        if window is None:
            return ()
        x = window.features
        parts = gpu.model.components(x)
        score = gpu.model.score_of(parts)
        gpu.model.learn_one(x)
        util = x.get("util_mean")
        if util is None or util < g.busy_gpu_pct:
            return ()
        gpu.recent.append(score)
        if score >= g.signature_high and sum(s >= g.signature_high for s in gpu.recent) >= g.signature_windows:
            severity = "high"
        elif score >= g.signature_medium and sum(s >= g.signature_medium for s in gpu.recent) >= g.signature_windows:
            severity = "medium"
        else:
            return ()
        why = ", ".join(k.replace("_", " ") for k, v in parts.items() if v >= 0.5)
        return [self.finding(
            event, f"GPU {window.index} mining signature {score:.2f} ({why}) over {g.window_s:.0f} s",
            timestamp=sample.ts, score=score, severity=severity,
            fields={"gpu.index": window.index, "gpu.uuid": window.uuid})]
