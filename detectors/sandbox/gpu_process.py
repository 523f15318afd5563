"""An agent's own GPU work: a process of a sandbox (or detached from one) computing on a GPU."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.examples import proc
from detectors.gpu._examples import TRAINER, gproc, gpu
from detectors.sandbox._base import LineageDetector
from detectors.sandbox._lineage import Lineage, shared_lineage
from gpusentry.contract import Dataset, as_dict, event_time

REPEAT_S = 300.0
_PROCESS = Dataset.PROCESS.value


@dataclass
class SandboxGpuState:
    lineage: Lineage
    reported: dict[tuple[int, str], float] = field(default_factory=dict)


class SandboxGpuProcess(LineageDetector):
    id = "sandbox.gpu_process"
    title = "Agent sandbox process computing on a GPU"
    description = ("A process that belongs to an agent sandbox (a tool call, or anything it started, however "
                   "detached: nohup, setsid, double fork) appears in a GPU's process list. It is not the training "
                   "job, even when it runs as an allowed interpreter such as /usr/local/bin/python3. High on a GPU "
                   "a non-sandbox process (the trainer) holds at the same time; low on a spare GPU (a sandbox "
                   "running a CUDA test suite). The finding names the sandbox, the tool call and the chain.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",)
    datasets = frozenset({Dataset.GPU, Dataset.PROCESS})
    signal = Signal.GPU_UNOWNED

    examples: ClassVar[list[Example]] = [
        Example("sandbox python fills the trainer's GPU, detached with setsid", True, [
            proc(f"{TRAINER} -u train.py --local-rank=0", pid=2000, parent="torchrun"),
            gpu(0, util=95, used_gib=60, power=380, procs=[gproc(2000, TRAINER, gib=60)]),
            proc("python -m ipykernel_launcher -f kernel-7.json", pid=300, parent="jupyter-lab", name="python",
                 t=30),
            proc("/bin/sh -c 'setsid nohup /usr/local/bin/python3 /tmp/.w/run.py &'", pid=301, parent="python",
                 parent_pid=300, t=40),
            # The agent reports the parent it was forked from, not init that adopted it.
            proc("/usr/local/bin/python3 /tmp/.w/run.py", pid=302, parent="sh", parent_pid=301, t=40.2),
            gpu(60, util=100, used_gib=66, power=395, procs=[gproc(2000, TRAINER, gib=60),
                                                            gproc(302, "/usr/local/bin/python3", gib=6)])]),
        Example("sandbox CUDA tests on a spare GPU (low)", True, [
            proc("/tmp/rocklet-venv/bin/rocklet --port 8000", pid=50, parent="sh", name="rocklet"),
            proc("/bin/bash", pid=51, parent="rocklet", parent_pid=50, t=1),
            proc("python -m pytest tests/cuda -q", pid=52, parent="bash", parent_pid=51, t=2),
            gpu(10, util=60, used_gib=3, power=150, index=3, uuid="GPU-spare-3", procs=[gproc(52, TRAINER, gib=3)])]),
        Example("the trainer alone", False, [
            proc(f"{TRAINER} -u train.py --local-rank=0", pid=2000, parent="torchrun"),
            gpu(0, util=95, used_gib=60, power=380, procs=[gproc(2000, TRAINER, gib=60)])]),
        Example("a notebook's own kernel on its GPU", False, [
            proc("python -m ipykernel_launcher -f kernel-1.json", pid=300, parent="jupyter-lab", name="python"),
            gpu(10, util=40, used_gib=12, power=200, procs=[gproc(300, TRAINER, gib=12)])]),
    ]

    def new_state(self) -> SandboxGpuState:
        return SandboxGpuState(Lineage())

    def new_host_state(self, shared: dict[str, Any]) -> SandboxGpuState:
        return SandboxGpuState(shared_lineage(shared))

    def process(self, event: dict[str, Any], state: SandboxGpuState) -> Iterable[Finding]:
        lineage = state.lineage
        if event["event"]["dataset"] == _PROCESS:
            lineage.observe(event, self.matcher, event_time(event))
            return ()
        if not lineage.sandboxed:  # GPU samples are most events: nothing to look up until a sandbox started
            return ()
        g = as_dict(event.get("gpu"))
        procs = g.get("processes")
        if not procs or not isinstance(procs, list):
            return ()
        mine, owners = [], False
        for gp in procs:
            entry = lineage.of_pid(gp.get("pid")) if isinstance(gp, dict) else None
            if entry is not None and entry.sandbox is not None:
                mine.append((gp, entry))
            else:
                owners = True  # the trainer (or any non-sandbox job) holds this GPU now
        if not mine:
            return ()
        ts = event_time(event)
        uuid = str(g.get("uuid"))
        out = []
        for gp, entry in mine:
            key = (entry.pid, uuid)
            last = state.reported.get(key)
            if last is not None and 0 <= ts - last < REPEAT_S:
                continue
            state.reported[key] = ts
            sb = entry.sandbox
            assert sb is not None
            where = "the trainer's GPU" if owners else "a spare GPU"
            mem = gp.get("used_memory_bytes")
            mem_note = f", {mem / 2**30:.1f} GiB" if isinstance(mem, int | float) else ""
            out.append(self.finding(
                event, f"{entry.name} (pid {entry.pid}{mem_note}) from an agent sandbox ({sb.framework}) computes on "
                f"{where} {g.get('index')} ({g.get('name') or uuid}); tool call: {sb.tool_call[:120]}",
                timestamp=ts, severity="high" if owners else "low", score=0.9 if owners else 0.4,
                fields={"gpu.uuid": uuid, "gpu.index": g.get("index"), "process.pid": entry.pid,
                        "process.name": entry.name, "process.command_line": entry.command_line, **entry.fields()}))
        if len(state.reported) > 4096:
            state.reported = {k: v for k, v in state.reported.items() if ts - v < REPEAT_S}
        return out
