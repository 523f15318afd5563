"""A GPU behaving unlike its own normal (per-GPU online half-space trees)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import idle, mining, training
from detectors.gpu._models import HalfSpaceBehaviour
from detectors.gpu._ownership import Allowlist, ProcessTable, host_process_table, owned_flags
from detectors.gpu._window import GpuWindows, Sample, host_windows
from gpusentry.contract import Dataset


@dataclass
class _Gpu:
    model: HalfSpaceBehaviour
    owned: bool = True  # every busy sample of the open window ran only allowlisted programs
    lists_processes: bool = False  # the GPU has listed a process before (vGPU guests and MIG parents never do)


@dataclass
class BehaviourState:
    windows: GpuWindows
    table: ProcessTable = field(default_factory=ProcessTable)
    gpus: dict[str, _Gpu] = field(default_factory=dict)


class GpuBehaviourAnomaly(GpuDetector):
    id = "gpu.behaviour_anomaly"
    title = "GPU behaves unlike its own normal"
    description = ("Each GPU has an online half-space-trees model of its windowed NVML features (utilisation "
                   "and spread, memory-controller load, footprint, power, clocks, PCIe); a window far from what "
                   "the GPU usually does is reported unless allowlisted programs did the work. Flagged windows "
                   "are kept out of training so a long hijack does not become the new normal.")
    severity = "low"
    technique = "T1496.001"
    references = ("https://riverml.xyz/latest/api/anomaly/HalfSpaceTrees/",
                  "https://www.ijcai.org/Proceedings/11/Papers/254.pdf")
    datasets = frozenset({Dataset.GPU, Dataset.PROCESS})
    signal = Signal.GPU_ANOMALY

    # One sample per 30 s window (a slow agent): 20 warm-up windows, then the change.
    examples: ClassVar[list[Example]] = [
        Example("training gpu taken over by a miner", True,
                training(0, 22, interval=30, dip_every=0) + mining(660, 3, interval=30)),
        Example("training keeps training", False, training(0, 25, interval=30, dip_every=0)),
        Example("idle gpu starts an allowlisted training job", False,
                idle(0, 22, interval=30) + training(660, 3, interval=30, dip_every=0)),
    ]

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.allowlist = Allowlist.of(self.settings.gpu)

    def new_state(self) -> BehaviourState:
        return self.new_host_state({})

    def new_host_state(self, shared: dict[str, Any]) -> BehaviourState:
        g = self.settings.gpu
        table = host_process_table(shared)
        return BehaviourState(host_windows(shared, g.window_s, g.busy_gpu_pct, table), table)

    def process_parsed(self, event: dict[str, Any], s: Sample, state: BehaviourState) -> Iterable[Finding]:
        window = state.windows.add(s)
        if window is None and s.steady:
            return ()  # the ownership verdict below would repeat the last sample's
        g = self.settings.gpu
        gpu = state.gpus.get(s.uuid)
        if gpu is None:
            gpu = state.gpus[s.uuid] = _Gpu(HalfSpaceBehaviour(g.anomaly_trees, g.anomaly_tree_height,
                                                               g.anomaly_reference_windows, self.settings.seed))
        findings: list[Finding] | tuple[()] = ()
        if window is not None:  # the sample closed a window: score it, then learn it unless it is flagged
            x = window.features
            model = gpu.model
            score = model.score_one(x)
            flagged = model.n_learned >= g.anomaly_warmup_windows and score >= g.anomaly_threshold
            if not flagged or gpu.owned:
                model.learn_one(x)  # a new allowlisted job is the GPU's new normal
            if flagged and not gpu.owned:
                findings = [self.finding(
                    event, f"GPU {window.index} window unlike its normal (score {score:.2f}, "
                    f"utilisation {x.get('util_mean') or 0:.0f} %, memory controller {x.get('mem_pct') or 0:.0f} %)",
                    timestamp=s.ts, score=score, fields={"gpu.index": window.index, "gpu.uuid": window.uuid})]
            gpu.owned = True
        procs = s.procs
        if procs:
            gpu.lists_processes = True
        if gpu.owned and s.util is not None and s.util >= g.busy_gpu_pct:
            if procs and not all(owned_flags(s, self.allowlist, state.table)):
                gpu.owned = False
            elif procs == [] and gpu.lists_processes:
                gpu.owned = False  # busy with no visible process on a GPU that lists them: nobody we know owns it
        return findings
