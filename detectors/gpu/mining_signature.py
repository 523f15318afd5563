"""A GPU whose windows look like cryptocurrency mining."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import burn_in, idle, mining, shared_training, training
from detectors.gpu._models import MiningSignature
from detectors.gpu._ownership import host_process_table
from detectors.gpu._window import GpuWindows, Sample, host_windows
from gpusentry.contract import Dataset

DIP_PCT = 30.0  # a busy window whose lowest sample is under this dipped
DAG_GIB = 2.0  # smallest allocation a GPU miner holds (kawpow/etchash DAGs are 3-6 GiB, autolykos about 2.5)
SOLO_HISTORY = 40  # busy windows of the lone job remembered for its dip rate (20 minutes at 30 s)
MIN_SHARED_WINDOWS = 10


@dataclass
class _GpuState:
    model: MiningSignature
    recent: deque[float]  # signature scores of the last busy windows
    pids: frozenset[int] = frozenset()  # the processes on the GPU, to notice a change of workload
    listed: tuple[int, ...] = ()  # the pids as last listed (the cheap same-as-before check)
    # Sharing: a job alone on the GPU shows dips (checkpoints, evaluation, data stalls); a miner squeezed in
    # beside it fills them. solo_dips: whether each busy window of the lone job dipped; shared_*: the same
    # since a second DAG-sized allocation joined it.
    solo_dips: deque[bool] = field(default_factory=lambda: deque(maxlen=SOLO_HISTORY))
    solo_busy: deque[bool] = field(default_factory=lambda: deque(maxlen=SOLO_HISTORY))
    shared_since: float | None = None
    newcomer_gib: float = 0.0
    shared_dips: list[bool] = field(default_factory=list)
    shared_reported: bool = False


@dataclass
class SignatureState:
    windows: GpuWindows
    gpus: dict[str, _GpuState] = field(default_factory=dict)


class GpuMiningSignature(GpuDetector):
    id = "gpu.mining_signature"
    title = "GPU behaves like a cryptocurrency miner"
    description = ("A GPU's windows show the mining signature: utilisation flat near 100 %, the memory "
                   "controller busy against a DAG-sized allocation, almost no PCIe traffic, a lowered power "
                   "limit or an underclocked core, and none of the dips training and inference show. When a "
                   "miner shares a busy job's GPU instead: a second DAG-sized allocation beside the job, and the "
                   "job's dips gone (medium; other evidence raises it).")
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
        Example("a miner squeezed in beside training fills its dips", True,
                training(0, 40, 30, dip_every=4) + shared_training(1200, 12, 30)),
        Example("a small helper process beside training", False,
                training(0, 40, 30, dip_every=4) + shared_training(1200, 12, 30, guest_gib=0.4)),
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
                self._sharing(event, gpu, gpu.pids, pids, sample.ts)
                gpu.pids = pids
        if window is None:
            return ()
        x = window.features
        shared = self._shared_signature(event, sample, window, gpu)
        parts = gpu.model.components(x)
        score = gpu.model.score_of(parts)
        gpu.model.learn_one(x)
        util = x.get("util_mean")
        if util is None or util < g.busy_gpu_pct:
            return shared
        gpu.recent.append(score)
        if score >= g.signature_high and sum(s >= g.signature_high for s in gpu.recent) >= g.signature_windows:
            severity = "high"
        elif score >= g.signature_medium and sum(s >= g.signature_medium for s in gpu.recent) >= g.signature_windows:
            severity = "medium"
        else:
            return shared
        why = ", ".join(k.replace("_", " ") for k, v in parts.items() if v >= 0.5)
        return shared + [self.finding(
            event, f"GPU {window.index} mining signature {score:.2f} ({why}) over {g.window_s:.0f} s",
            timestamp=sample.ts, score=score, severity=severity,
            fields={"gpu.index": window.index, "gpu.uuid": window.uuid})]

    @staticmethod
    def _sharing(event: dict[str, Any], gpu: _GpuState, before: frozenset[int], after: frozenset[int],
                 ts: float) -> None:
        """Notice a second allocation joining a lone job (and the GPU going back to one job or none)."""
        added = after - before
        if len(before) == 1 and before <= after and added:
            sizes = [p.get("used_memory_bytes") for p in (event.get("gpu") or {}).get("processes") or ()
                     if isinstance(p, dict) and p.get("pid") in added]
            gib = max((v for v in sizes if isinstance(v, int | float) and not isinstance(v, bool)), default=0) / 2**30
            gpu.shared_since, gpu.newcomer_gib, gpu.shared_dips, gpu.shared_reported = ts, gib, [], False
        elif len(after) <= 1:
            gpu.shared_since = None
            if after != before:
                gpu.solo_dips.clear()  # a different lone job: its dips are learned anew
                gpu.solo_busy.clear()

    def _shared_signature(self, event: dict[str, Any], sample: Sample, window: Any, gpu: _GpuState) -> list[Finding]:
        util_min = window.features.get("util_min")
        util_mean = window.features.get("util_mean")
        if util_min is None or util_mean is None:
            return []
        # A dip is a window whose lowest sample is low, busy or not (a whole window can be a checkpoint).
        dipped = util_min < DIP_PCT
        if gpu.shared_since is None:
            if len(gpu.pids) == 1:
                gpu.solo_dips.append(dipped)
                gpu.solo_busy.append(util_mean >= self.settings.gpu.busy_gpu_pct)
            return []
        gpu.shared_dips.append(dipped)
        solo = list(gpu.solo_dips)
        if gpu.shared_reported or gpu.newcomer_gib < DAG_GIB or len(solo) < MIN_SHARED_WINDOWS:
            return []
        solo_rate = sum(solo) / len(solo)
        if solo_rate == 0.0 or sum(gpu.solo_busy) < len(gpu.solo_busy) / 2:
            return []  # a job that never dipped, or a mostly idle one: nothing to compare
        # Long enough to have seen two of the lone job's dips, had they still come.
        needed = max(MIN_SHARED_WINDOWS, int(2 / solo_rate + 0.999))
        shared = gpu.shared_dips
        if len(shared) < needed or sum(shared) / len(shared) > solo_rate / 2:
            return []
        gpu.shared_reported = True
        return [self.finding(
            event, f"GPU {window.index}: a second {gpu.newcomer_gib:.1f} GiB allocation joined the job on it and "
            f"the job's dips stopped ({sum(solo)} of {len(solo)} windows dipped before, {sum(shared)} of "
            f"{len(shared)} since): a miner sharing the GPU", timestamp=sample.ts, score=0.75, severity="medium",
            fields={"gpu.index": window.index, "gpu.uuid": window.uuid})]
