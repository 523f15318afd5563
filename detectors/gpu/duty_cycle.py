"""Duty-cycled use of a GPU that no job owns: the on/off pattern of a throttled miner."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import idle, mining, training
from detectors.gpu._ownership import Allowlist, ProcessTable, host_process_table, owned_flags
from detectors.gpu._window import GpuWindows, Sample, host_windows
from gpusentry.contract import Dataset

REPEAT_S = 120.0  # least event time between two findings on one GPU while the pattern lasts
MAX_CYCLES = 64


@dataclass
class _Gpu:
    busy: bool = False
    phase_owned: bool = False  # an owned process was seen during the current busy phase
    phase_visible: bool = False  # the current busy phase reported its processes at all
    cycles: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_CYCLES))  # ends of unowned busy phases
    last_report: float | None = None
    lists_processes: bool = False  # this GPU has listed a process before: an empty list then means none


@dataclass
class DutyCycleState:
    windows: GpuWindows  # not for its windows: it says which samples are steady
    table: ProcessTable
    gpus: dict[str, _Gpu] = field(default_factory=dict)


def _on_off(start: float, cycles: int, on: int, off: int, interval: float = 10.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    t = start
    for _ in range(cycles):
        out += mining(t, on, interval, limit=400)
        t += on * interval
        out += idle(t, off, interval)
        t += off * interval
    return out


class DutyCycledGpu(GpuDetector):
    id = "gpu.duty_cycle"
    title = "Duty-cycled use of a GPU no job owns"
    description = ("A GPU that no allowlisted program or known job owns keeps switching between busy and idle "
                   "(busy phases with no owned process, or with none listed on a GPU that does list its processes): the pattern of a "
                   "miner throttled to stay under utilisation alerts.")
    severity = "medium"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",)
    datasets = frozenset({Dataset.GPU, Dataset.PROCESS})
    signal = Signal.GPU_UNOWNED

    examples: ClassVar[list[Example]] = [
        Example("miner 60 s on, 60 s off", True, _on_off(0, 4, 3, 3, interval=20)),
        Example("bursty allowlisted inference", False,
                [ev for i in range(4) for ev in training(i * 120, 3, 20, dip_every=0) + idle(i * 120 + 60, 3, 20)]),
        Example("miner running steadily", False, mining(0, 15, 20)),
    ]

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.allowlist = Allowlist.of(self.settings.gpu)

    def new_state(self) -> DutyCycleState:
        return self.new_host_state({})

    def new_host_state(self, shared: dict[str, Any]) -> DutyCycleState:
        g = self.settings.gpu
        table = host_process_table(shared)
        return DutyCycleState(host_windows(shared, g.window_s, g.busy_gpu_pct, table), table)

    def process_parsed(self, event: dict[str, Any], s: Sample, state: DutyCycleState) -> Iterable[Finding]:
        state.windows.add(s)
        if s.steady or s.util is None:
            return ()  # steady: still busy or still idle, with the processes and verdicts of the last sample
        g = self.settings.gpu
        gpu = state.gpus.get(s.uuid)
        if gpu is None:
            gpu = state.gpus[s.uuid] = _Gpu()
        busy = s.util >= g.busy_gpu_pct
        if s.procs:
            gpu.lists_processes = True
        if busy:
            if gpu.phase_owned and gpu.busy:
                return ()  # an owned busy phase stays owned until it ends
            if not gpu.busy:
                gpu.busy, gpu.phase_owned, gpu.phase_visible = True, False, False
            # An empty list counts only on a GPU known to list its processes (vGPU guests and MIG
            # parents list none at all).
            if s.procs is not None and (s.procs or gpu.lists_processes):
                gpu.phase_visible = True
                if any(owned_flags(s, self.allowlist, state.table)):
                    gpu.phase_owned = True
            return ()
        if not gpu.busy:
            return ()
        gpu.busy = False
        if gpu.phase_owned or not gpu.phase_visible:
            return ()  # an owned job's burst, or a GPU whose processes are not reported: nothing to say
        gpu.cycles.append(s.ts)
        while gpu.cycles and s.ts - gpu.cycles[0] > g.duty_cycle_horizon_s:
            gpu.cycles.popleft()
        if len(gpu.cycles) < g.duty_cycle_min_cycles:
            return ()
        if gpu.last_report is not None and s.ts - gpu.last_report < REPEAT_S:
            return ()
        gpu.last_report = s.ts
        span = s.ts - gpu.cycles[0]
        return [self.finding(
            event, f"GPU {s.index} used in {len(gpu.cycles)} on/off cycles over {span:.0f} s by processes no job "
            "owns", timestamp=s.ts, fields={"gpu.index": s.index, "gpu.uuid": s.uuid})]
