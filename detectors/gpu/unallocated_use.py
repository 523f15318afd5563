"""A GPU doing work while, by the scheduler's own answer, nothing holds it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import allocated, gpu, idle, job, training
from detectors.gpu._ownership import ProcessTable, host_process_table
from detectors.gpu._window import Sample
from gpusentry.contract import Dataset

REPEAT_S = 120.0


def _busy_unseen(start: float, n: int, **kw: Any) -> list[dict[str, Any]]:
    """A GPU at full load with no process the agent can see (another PID namespace, a passthrough VM)."""
    return [gpu(start + i * 10, util=100, mem_pct=90, used_gib=6, power=260, procs=[], **kw) for i in range(n)]


@dataclass
class UnallocatedState:
    table: ProcessTable = field(default_factory=ProcessTable)
    busy_since: dict[str, float] = field(default_factory=dict)  # uuid -> first busy sample with no holder
    reported: dict[str, float] = field(default_factory=dict)


class UnallocatedUse(GpuDetector):
    id = "gpu.unallocated_use"
    title = "GPU busy while the scheduler says nothing holds it"
    description = ("On a node whose scheduler answers (Kubernetes, Slurm), a GPU that stays busy for "
                   "`allocation_grace_s` while no pod or job holds it: whatever runs there was never scheduled. "
                   "Medium alone (the processes may be out of the agent's sight); with a mining signature or any "
                   "second kind of evidence the incident is high.")
    severity = "medium"
    technique = "T1496.001"
    references = ("https://kubernetes.io/docs/concepts/extend-kubernetes/compute-storage-net/device-plugins/"
                  "#monitoring-device-plugin-resources",
                  "https://github.com/NVIDIA/DCGM/issues/241")
    datasets = frozenset({Dataset.GPU, Dataset.PROCESS})
    signal = Signal.ALLOCATION

    examples: ClassVar[list[Example]] = [
        Example("node GPU busy with no owner and no visible process", True,
                _busy_unseen(0, 3, allocation=allocated("kubernetes"))),
        Example("Slurm node GPU busy between jobs", True, _busy_unseen(0, 3, allocation=allocated("slurm"))),
        Example("GPU held by a job", False, training(0, 4, owner=job("7"), allocation=allocated("slurm", job("7")))),
        Example("idle GPU nobody holds", False, idle(0, 4, allocation=allocated("kubernetes"))),
        Example("Docker host: nobody schedules host work", False, _busy_unseen(0, 4, allocation=allocated("docker"))),
        Example("stale answer", False, _busy_unseen(0, 4, allocation=allocated("slurm", state="stale"))),
    ]

    def new_state(self) -> UnallocatedState:
        return UnallocatedState()

    def new_host_state(self, shared: dict[str, Any]) -> UnallocatedState:
        return UnallocatedState(host_process_table(shared))

    def process_parsed(self, event: dict[str, Any], s: Sample, state: UnallocatedState) -> Iterable[Finding]:
        alloc = s.allocation
        if alloc is None and not state.busy_since:
            return ()  # the common case: no scheduler answers for this GPU
        busy = s.util is not None and s.util >= self.settings.gpu.busy_gpu_pct
        if (alloc is None or not alloc.decides or not alloc.judges_host_processes or alloc.holders or not busy):
            if state.busy_since:
                state.busy_since.pop(s.uuid, None)
                state.reported.pop(s.uuid, None)
            return ()
        first = state.busy_since.setdefault(s.uuid, s.ts)
        last = state.reported.get(s.uuid)
        if s.ts - first < self.settings.gpu.allocation_grace_s or (last is not None and s.ts - last < REPEAT_S):
            return ()
        state.reported[s.uuid] = s.ts
        seen = ", ".join(f"{p.executable or p.name or '?'} (pid {p.pid})" for p in s.procs or ()) or \
            "no process the agent can see"
        message = (f"GPU {s.index} ({s.uuid}) has been {s.util:.0f} % busy for {s.ts - first:.0f} s while "
                   f"{alloc.source} allocates it to nobody; on it: {seen}")
        return [self.finding(event, message, timestamp=s.ts,
                             fields={"gpu.index": s.index, "gpu.uuid": s.uuid,
                                     "gpusentry.allocation.source": alloc.source})]
