"""A process computing on a GPU its pod or job was not allocated: the scheduler's truth, not a guess."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.gpu._allocation import GpuAllocation, judge
from detectors.gpu._base import GpuDetector
from detectors.gpu._examples import allocated, idle, job, mining, pod, training
from detectors.gpu._ownership import ProcessTable, describe, host_process_table, process_fields
from detectors.gpu._window import Sample
from gpusentry.contract import Dataset

REPEAT_S = 120.0  # while the process stays outside, its finding is repeated this often (keeps the incident open)
MAX_TRACKED = 256  # (GPU, pid) pairs remembered per host

TEAM_A = pod("team-a", "trainer-0", "6f1b2c3d-0000-4000-8000-00000000000a")
TEAM_B = pod("team-b", "notebook-7", "6f1b2c3d-0000-4000-8000-00000000000b")


@dataclass
class AllocationState:
    table: ProcessTable = field(default_factory=ProcessTable)
    since: dict[tuple[str, int], float] = field(default_factory=dict)  # (uuid, pid) -> first seen outside
    reported: dict[tuple[str, int], float] = field(default_factory=dict)  # (uuid, pid) -> last finding
    settled: dict[str, GpuAllocation] = field(default_factory=dict)  # uuid -> answer under which nothing was outside


class OutsideAllocation(GpuDetector):
    id = "gpu.outside_allocation"
    title = "GPU process outside its pod's or job's allocation"
    description = ("The scheduler (the kubelet's PodResources, Slurm, Docker) says who was allocated each GPU, "
                   "and the process's cgroup says which pod, job or container it belongs to. A process computing "
                   "on a GPU its pod/job was not given (another tenant's GPU, a GPU no pod holds, or any GPU from "
                   "a pod that requested none, e.g. through NVIDIA_VISIBLE_DEVICES=all) is high, after "
                   "`allocation_grace_s` of event time for pod start-up and device-plugin lag.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://kubernetes.io/docs/concepts/extend-kubernetes/compute-storage-net/device-plugins/"
                  "#monitoring-device-plugin-resources",
                  "https://slurm.schedmd.com/gres.html",
                  "https://attack.mitre.org/techniques/T1496/001/")
    datasets = frozenset({Dataset.GPU, Dataset.PROCESS})
    signal = Signal.ALLOCATION

    examples: ClassVar[list[Example]] = [
        Example("notebook pod computing on a GPU allocated to another pod", True,
                training(0, 3, owner=TEAM_B, allocation=allocated("kubernetes", TEAM_A))),
        Example("pod that requested no GPU mines on one nobody holds", True,
                mining(0, 3, exe="/usr/bin/python3", owner=TEAM_B, allocation=allocated("kubernetes"))),
        Example("Slurm job escapes to a GPU outside its allocation", True,
                training(0, 3, owner=job("4242"), allocation=allocated("slurm", job("4100")))),
        Example("pod on its own GPU", False, training(0, 4, owner=TEAM_A, allocation=allocated("kubernetes", TEAM_A))),
        Example("pod starting up: outside for less than the grace", False,
                training(0, 1, owner=TEAM_A, allocation=allocated("kubernetes"))
                + training(10, 2, owner=TEAM_A, allocation=allocated("kubernetes", TEAM_A))),
        Example("time-sliced GPU shared by two pods", False,
                [*training(0, 3, owner=TEAM_B, allocation=allocated("kubernetes", TEAM_A, TEAM_B))]),
        Example("stale answer: the allowlist decides instead", False,
                training(0, 3, owner=TEAM_B, allocation=allocated("kubernetes", TEAM_A, state="stale"))),
        Example("no scheduler at all", False, training(0, 3) + idle(30, 1)),
        Example("host process on a Docker host", False,
                [*training(0, 3, allocation=allocated("docker"))]),
    ]

    def new_state(self) -> AllocationState:
        return AllocationState()

    def new_host_state(self, shared: dict[str, Any]) -> AllocationState:
        return AllocationState(host_process_table(shared))

    def process_parsed(self, event: dict[str, Any], s: Sample, state: AllocationState) -> Iterable[Finding]:
        alloc = s.allocation
        if alloc is None or not alloc.decides or not s.procs:
            if state.settled or state.since:  # most hosts have no scheduler: nothing to forget, nothing to do
                self._forget(state, s.uuid)
            return ()
        if s.steady and state.settled.get(s.uuid) is alloc:
            return ()  # the same processes under the same answer, and nothing was outside it
        grace = self.settings.gpu.allocation_grace_s
        findings = []
        outside = set()
        for p in s.procs:
            inside, why = judge(alloc, p.owner)
            if inside is not False:
                continue
            key = (s.uuid, p.pid)
            outside.add(p.pid)
            first = state.since.setdefault(key, s.ts)
            if s.ts - first < grace:
                continue
            last = state.reported.get(key)
            if last is not None and s.ts - last < REPEAT_S:
                continue
            state.reported.pop(key, None)
            state.reported[key] = s.ts
            info = state.table.get(p.pid)
            fields = process_fields(p, info)
            fields.update({"gpu.index": s.index, "gpu.uuid": s.uuid, "gpusentry.allocation.source": alloc.source,
                           "gpusentry.allocation.holders": alloc.holders_text()})
            message = (f"{describe(p, info)} computes on GPU {s.index} ({s.uuid}): {why} "
                       f"(decided by {alloc.source})")
            findings.append(self.finding(event, message, timestamp=s.ts, fields=fields))
        for key in [k for k in state.since if k[0] == s.uuid and k[1] not in outside]:
            del state.since[key]
            state.reported.pop(key, None)
        for d in (state.since, state.reported):
            while len(d) > MAX_TRACKED:
                del d[next(iter(d))]
        if outside:
            state.settled.pop(s.uuid, None)
        else:
            state.settled[s.uuid] = alloc
        return findings

    @staticmethod
    def _forget(state: AllocationState, uuid: str) -> None:
        state.settled.pop(uuid, None)
        if state.since:
            for key in [k for k in state.since if k[0] == uuid]:
                del state.since[key]
                state.reported.pop(key, None)



