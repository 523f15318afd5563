"""The scheduler's truth about a GPU, as the agent reported it on the sample (``gpusentry.allocation.*``), and
whether a process on the GPU is inside that allocation.

Everything here came from a monitored host, so every value is type-checked and anything odd reads as absent.
Parsed once per distinct answer per GPU (an unchanged answer is the same object on the next sample, which lets
detectors see at a glance that nothing changed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNITS = {"kubernetes": "pod", "slurm": "job", "docker": "container"}


def _s(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return v if type(v) is str and v else None


@dataclass(frozen=True, slots=True)
class Holder:
    kind: str
    namespace: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    container: str | None = None
    container_id: str | None = None
    job_id: str | None = None
    job_name: str | None = None
    user: str | None = None

    @classmethod
    def of(cls, d: dict[str, Any]) -> Holder | None:
        kind = _s(d, "kind")
        if kind not in UNITS:
            return None
        return cls(kind, _s(d, "namespace"), _s(d, "pod"), _s(d, "pod_uid"), _s(d, "container"),
                   _s(d, "container_id"), _s(d, "job_id"), _s(d, "job_name"), _s(d, "user"))

    def describe(self) -> str:
        if self.kind == "kubernetes":
            pod = f"{self.namespace}/{self.pod}" if self.pod else (self.pod_uid or "?")
            return f"pod {pod}" + (f" (container {self.container})" if self.container else "")
        if self.kind == "slurm":
            return f"Slurm job {self.job_id}" + (f" ({self.job_name}, user {self.user})" if self.job_name else
                                                 (f" (user {self.user})" if self.user else ""))
        return f"container {self.container or (self.container_id or '?')[:12]}"

    def fields(self) -> dict[str, Any]:
        """ECS ``orchestrator.*`` (and ``user.name``) of the holder, for the incident."""
        out: dict[str, Any] = {}
        if self.kind == "kubernetes":
            out.update({"orchestrator.type": "kubernetes", "orchestrator.resource.type": "pod",
                        "orchestrator.namespace": self.namespace, "orchestrator.resource.name": self.pod,
                        "orchestrator.resource.id": self.pod_uid})
        elif self.kind == "slurm":
            out.update({"orchestrator.type": "slurm", "orchestrator.resource.type": "job",
                        "orchestrator.resource.id": self.job_id, "orchestrator.resource.name": self.job_name,
                        "user.name": self.user})
        else:
            out.update({"container.id": self.container_id, "container.name": self.container})
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True, slots=True)
class ProcOwner:
    """What a GPU process's cgroup names (``gpu.processes[].owner``)."""

    kind: str
    pod_uid: str | None = None
    namespace: str | None = None
    pod: str | None = None
    container_id: str | None = None
    job_id: str | None = None
    step: str | None = None

    @classmethod
    def of(cls, raw: Any) -> ProcOwner | None:
        if type(raw) is not dict:
            return None
        kind = _s(raw, "kind")
        if kind not in UNITS:
            return None
        return cls(kind, _s(raw, "pod_uid"), _s(raw, "namespace"), _s(raw, "pod"), _s(raw, "container_id"),
                   _s(raw, "job_id"), _s(raw, "step"))

    def describe(self) -> str:
        if self.kind == "kubernetes":
            return f"pod {self.namespace}/{self.pod}" if self.pod else f"pod {self.pod_uid}"
        if self.kind == "slurm":
            return f"Slurm job {self.job_id}" + (f" step {self.step}" if self.step else "")
        return f"container {(self.container_id or '?')[:12]}"

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind == "kubernetes":
            out.update({"orchestrator.type": "kubernetes", "orchestrator.resource.type": "pod",
                        "orchestrator.namespace": self.namespace, "orchestrator.resource.name": self.pod,
                        "orchestrator.resource.id": self.pod_uid, "container.id": self.container_id})
        elif self.kind == "slurm":
            out.update({"orchestrator.type": "slurm", "orchestrator.resource.type": "job",
                        "orchestrator.resource.id": self.job_id, "gpusentry.owner.step": self.step})
        else:
            out["container.id"] = self.container_id
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True, slots=True)
class GpuAllocation:
    source: str  # kubernetes | slurm | docker
    state: str  # current | stale | unmanaged
    judges_host_processes: bool
    holders: tuple[Holder, ...]

    @property
    def decides(self) -> bool:
        """Whether this answer replaces the allowlist and the learned job for the GPU."""
        return self.state == "current"

    def holders_text(self) -> str:
        return ", ".join(h.describe() for h in self.holders) or "nobody"


_SEEN: dict[str, tuple[dict[str, Any], GpuAllocation | None]] = {}
_SEEN_MAX = 65536


def read_allocation(event: dict[str, Any], uuid: str) -> GpuAllocation | None:
    ext = event.get("gpusentry")
    raw = ext.get("allocation") if type(ext) is dict else None
    if type(raw) is not dict:
        return None
    seen = _SEEN.get(uuid)
    if seen is not None and seen[0] == raw:
        return seen[1]
    source, state = _s(raw, "source"), _s(raw, "state")
    parsed: GpuAllocation | None = None
    if source in UNITS and state in ("current", "stale", "unmanaged"):
        owners = raw.get("owners")
        holders = tuple(h for h in (Holder.of(o) for o in owners if type(o) is dict) if h is not None) \
            if type(owners) is list else ()
        judges = raw.get("judges_host_processes")
        parsed = GpuAllocation(source, state, judges if type(judges) is bool else source != "docker", holders)
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    _SEEN[uuid] = (raw, parsed)
    return parsed


def holds(h: Holder, owner: ProcOwner) -> bool | None:
    """Whether holder ``h`` is the pod/job/container ``owner`` (None: too little is known to tell)."""
    if h.kind != owner.kind:
        return False
    if h.kind == "kubernetes":
        if h.pod_uid and owner.pod_uid:
            return h.pod_uid == owner.pod_uid
        if h.pod and owner.pod:
            return (h.namespace, h.pod) == (owner.namespace, owner.pod)
        return None
    if h.kind == "slurm":
        return h.job_id is not None and h.job_id == owner.job_id
    return h.container_id is not None and h.container_id == owner.container_id


def judge(alloc: GpuAllocation, owner: ProcOwner | None) -> tuple[bool | None, str]:
    """(inside the allocation?, why): True inside, False outside, None when the scheduler cannot say."""
    unit = UNITS[alloc.source]
    if owner is None or owner.kind != alloc.source:
        if not alloc.judges_host_processes:
            return None, f"not in any {unit}: {alloc.source} does not schedule it"
        if alloc.holders:
            return False, f"runs outside any {unit}, on a GPU allocated to {alloc.holders_text()}"
        return False, f"runs outside any {unit}, on a GPU no {unit} was allocated"
    unknown = False
    for h in alloc.holders:
        verdict = holds(h, owner)
        if verdict:
            return True, f"{owner.describe()} holds this GPU"
        if verdict is None:
            unknown = True
    if unknown:
        return None, f"cannot tell {owner.describe()} from the GPU's holders (pod names unreadable)"
    if alloc.holders:
        return False, f"{owner.describe()} was not allocated this GPU; {alloc.holders_text()} was"
    return False, f"{owner.describe()} was not allocated this GPU; no {unit} was"
