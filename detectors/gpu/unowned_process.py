"""GPU work that no known job or allowlisted program owns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.examples import proc
from detectors.gpu._allocation import judge
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import TRAINER, gproc, idle, mining, training
from detectors.gpu._ownership import (
    Allowlist,
    ProcessTable,
    describe,
    host_process_table,
    ordinary_launcher,
    process_fields,
    program_of,
)
from detectors.gpu._window import Sample
from gpusentry.contract import Dataset

# While an unowned process stays on a GPU its finding is repeated this often (event time), so the
# incident stays open (it resolves after [detection] resolve_after_s without evidence).
REPEAT_S = 120.0
MAX_TRACKED = 64  # unowned pids remembered per host
MAX_LEARNED = 1024  # programs learned per host during the learning period


@dataclass
class _Gpu:
    job: set[int] = field(default_factory=set)  # pids of the job learned when the GPU came into use
    job_program: str | None = None
    # The last sample needed nothing (no process on the GPU, or only its job): a steady sample, which
    # repeats its processes with no process event since, needs nothing either.
    settled: bool = False


@dataclass
class OwnershipState:
    table: ProcessTable = field(default_factory=ProcessTable)
    gpus: dict[str, _Gpu] = field(default_factory=dict)
    first_seen: float | None = None
    learned_programs: set[str] = field(default_factory=set)
    reported: dict[tuple[str, int], float] = field(default_factory=dict)  # (uuid, pid) -> last finding time


class UnownedGpuProcess(GpuDetector):
    id = "gpu.unowned_process"
    title = "GPU process that no known job or allowed program owns"
    description = ("A process is using a GPU but is neither an allowlisted program, user or container, nor "
                   "part of the job that was running when the GPU came into use. A second process on a GPU a "
                   "training job already uses is reported at high severity.")
    severity = "medium"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",
                  "https://docs.nvidia.com/deploy/nvml-api/group__nvmlDeviceQueries.html")
    datasets = frozenset({Dataset.GPU, Dataset.PROCESS})
    signal = Signal.GPU_UNOWNED

    examples: ClassVar[list[Example]] = [
        Example("miner from /dev/shm on an idle gpu", True, idle(0, 3) + mining(30, 3)),
        Example("second process on a training job's gpu", True,
                training(0, 3) + mining(30, 3, exe="/home/ml/.cache/pt_worker",
                                        extra=[gproc(2000, TRAINER, gib=70, sm=None)])),
        Example("training job", False, training(0, 6)),
        Example("dataloader worker spawned by the training job", False,
                training(0, 2) + [proc("/usr/bin/python3.10 -c from multiprocessing.spawn import spawn_main",
                                       t=20, pid=2001, parent="python3", parent_pid=2000)]
                + training(30, 3, pid=2001)),
        Example("idle gpu", False, idle(0, 5)),
        Example("job started late from a conda env the allowlist does not name (low, not medium)", False,
                idle(0, 2) + training(20, 3, exe="/scratch/ml/miniforge3/envs/llm/bin/python3.11"),
                min_severity="medium"),
    ]

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.allowlist = Allowlist.of(self.settings.gpu)

    def new_state(self) -> OwnershipState:
        return OwnershipState()

    def new_host_state(self, shared: dict[str, Any]) -> OwnershipState:
        return OwnershipState(host_process_table(shared))

    def process_parsed(self, event: dict[str, Any], s: Sample, state: OwnershipState) -> Iterable[Finding]:
        if state.first_seen is None:
            state.first_seen = s.ts
        gpu = state.gpus.get(s.uuid)
        if gpu is None:
            gpu = state.gpus[s.uuid] = _Gpu()
        elif gpu.settled and s.steady:
            # Only then: while a process nobody owns stays, its finding is repeated every REPEAT_S.
            return ()
        procs = s.procs
        if not procs:
            gpu.job.clear()  # nothing on the GPU: its job has ended
            gpu.settled = True
            return ()
        job = gpu.job
        if len(procs) == len(job) and job.issuperset(s.pids or ()):
            # The GPU's job and nothing else (NVML lists a pid once per GPU): nothing to learn or report.
            gpu.settled = True
            return ()
        gpu.settled = False
        g = self.settings.gpu
        learning = g.learn_jobs_for_s > 0 and s.ts - state.first_seen < g.learn_jobs_for_s
        table = state.table
        present = {p.pid for p in procs}
        gpu.job &= present
        had_job = bool(gpu.job)
        unowned = []
        alloc = s.allocation if s.allocation is not None and s.allocation.decides else None
        for p in procs:
            if p.pid in gpu.job:
                continue
            if alloc is not None and judge(alloc, p.owner)[0] is not None:
                continue  # the scheduler's answer decides (gpu.outside_allocation)
            info = table.get(p.pid)
            program = program_of(p, info)
            if learning and program and len(state.learned_programs) < MAX_LEARNED:
                state.learned_programs.add(program)
            if gpu.job and any(a in gpu.job for a in table.ancestors(p.pid)):
                gpu.job.add(p.pid)  # a child of the job (dataloader worker, rank): part of it
                continue
            if self.allowlist.allows(p, info) or (program is not None and program in state.learned_programs):
                if not had_job:
                    gpu.job.add(p.pid)  # the GPU comes into use: this is its job
                    gpu.job_program = program
                continue
            launcher = not had_job and ordinary_launcher(p, info)
            if launcher:
                # An interpreter or launcher from an ordinary path (a conda env, a venv, a module tree) on a GPU
                # nobody uses: most likely a job started after the learning period. Said once, low; it becomes
                # the GPU's job, so a second process beside it is still reported high.
                gpu.job.add(p.pid)
                gpu.job_program = program
            unowned.append((p, info, launcher))
        findings = []
        for p, info, launcher in unowned:
            key = (s.uuid, p.pid)
            last = state.reported.get(key)
            if last is not None and s.ts - last < REPEAT_S:
                continue
            state.reported.pop(key, None)
            state.reported[key] = s.ts
            if len(state.reported) > MAX_TRACKED:
                del state.reported[next(iter(state.reported))]
            identified = p.executable or p.name or (info is not None and (info.executable or info.name))
            if not identified:  # e.g. gone before the agent could read /proc: too little to go on
                severity = "low"
                message = f"an unidentified process (pid {p.pid}) uses GPU {s.index}"
            elif launcher:
                severity = "low"
                message = (f"{describe(p, info)} uses GPU {s.index}: an interpreter or launcher no allowlist names "
                           "and no scheduler vouches for (add its path to [detection.gpu] allowed_executables, or "
                           "set [agent.scheduler] so allocations decide)")
            elif gpu.job:
                severity = "high"
                message = (f"{describe(p, info)} shares GPU {s.index} with the job {gpu.job_program} "
                           f"(pid {min(gpu.job)}) and is not part of it")
            else:
                severity = "medium"
                message = f"{describe(p, info)} uses GPU {s.index}; no known job or allowed program owns it"
            fields = process_fields(p, info)
            fields.update({"gpu.index": s.index, "gpu.uuid": s.uuid})
            findings.append(self.finding(event, message, timestamp=s.ts, severity=severity, fields=fields))
        return findings

