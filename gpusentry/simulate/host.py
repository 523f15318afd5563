"""One simulated host: its GPUs, the workloads scheduled on them, and its process/network/DNS events.

A scenario describes what happens on a host by calling :meth:`HostSim.run` (a workload on some
GPUs for a time span), :meth:`HostSim.spawn` / :meth:`HostSim.exit` (process events),
:meth:`HostSim.connect` (an outbound flow with its first bytes) and :meth:`HostSim.resolve` (a DNS
answer).  :meth:`HostSim.events` then yields every event in time order: GPU samples every
``interval_s`` (one per GPU per agent cycle) merged with the discrete events.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gpusentry import contract as c
from gpusentry.contract import MAX_PAYLOAD_BYTES
from gpusentry.gpuspecs import GpuSpec
from gpusentry.simulate.workloads import GpuProgram, Workload, combine


@dataclass
class _Run:
    start: float  # seconds from the host's start
    end: float
    workload: Workload


def _ecs_owner(owner: dict[str, Any] | None) -> dict[str, Any] | None:
    """``orchestrator.*`` of a process event, from the owner a GPU process entry carries."""
    if not owner:
        return None
    fields: dict[str, Any] = {}
    if owner["kind"] == "kubernetes":
        fields = {"orchestrator.type": "kubernetes", "orchestrator.resource.type": "pod",
                  "orchestrator.resource.id": owner.get("pod_uid"), "orchestrator.namespace": owner.get("namespace"),
                  "orchestrator.resource.name": owner.get("pod")}
    elif owner["kind"] == "slurm":
        fields = {"orchestrator.type": "slurm", "orchestrator.resource.type": "job",
                  "orchestrator.resource.id": owner.get("job_id"), "gpusentry.owner.step": owner.get("step")}
    return {k: v for k, v in fields.items() if v is not None}


class HostSim:
    def __init__(self, host: str, start: float, duration_s: float, interval_s: float, seed: int,
                 spec: GpuSpec, n_gpus: int) -> None:
        self.host = host
        self.start = start
        self.duration_s = duration_s
        self.interval_s = interval_s
        digest = hashlib.sha256(f"{seed}|{host}".encode()).digest()
        self.rng = random.Random(int.from_bytes(digest[:8], "big"))
        self.spec = spec
        self.uuids = [self._uuid() for _ in range(n_gpus)]
        self.runs: list[list[_Run]] = [[] for _ in range(n_gpus)]
        self._discrete: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = 0
        self._next_pid = self.rng.randrange(2000, 30000)
        self.ip = f"10.{self.rng.randrange(0, 64)}.{self.rng.randrange(0, 256)}.{self.rng.randrange(2, 250)}"
        self.processes: dict[int, dict[str, Any]] = {}
        # The scheduler the agent asks (kubernetes | slurm | None) and who it says holds which GPU when:
        # (start, end, GPU index, holder as gpusentry.allocation.owners[] carries it).
        self.scheduler: str | None = None
        self.holdings: list[tuple[float, float, int, dict[str, Any]]] = []

    # ------------------------------------------------------------------ building blocks

    def _uuid(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def event_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def new_pid(self) -> int:
        self._next_pid += self.rng.randrange(1, 40)
        return self._next_pid

    @property
    def gpus(self) -> range:
        return range(len(self.uuids))

    def sub_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def run(self, start: float, end: float, gpus: range | list[int], make: Callable[[random.Random], Workload]) -> None:
        """Run a workload (a fresh one per GPU, from ``make(rng)``) on ``gpus`` between two offsets."""
        for i in gpus:
            self.runs[i].append(_Run(max(0.0, start), min(self.duration_s, end), make(self.sub_rng())))

    def allocate(self, start: float, end: float, gpus: range | list[int], holder: dict[str, Any]) -> None:
        """The scheduler gives ``gpus`` to ``holder`` between two offsets."""
        for i in gpus:
            self.holdings.append((start, end, i, holder))

    def _add(self, t: float, event: dict[str, Any]) -> None:
        if 0 <= t <= self.duration_s:
            self._seq += 1
            self._discrete.append((t, self._seq, event))

    def spawn(self, t: float, command_line: str, *, parent: int | None = None, user: str = "ml",
              cwd: str | None = None, executable: str | None = None, name: str | None = None,
              container: str | None = None, pid: int | None = None, args: list[str] | None = None,
              owner: dict[str, Any] | None = None) -> GpuProgram:
        """A process start; returns the program (for a workload's NVML process entry).  ``args``: the argument
        vector when it is not the command line split on spaces (a quoted ``bash -lc '...'`` script)."""
        pid = pid or self.new_pid()
        args = args or command_line.split()
        exe = executable or args[0]
        comm = (name or exe.rsplit("/", 1)[-1])[:15]
        parent_info = self.processes.get(parent) if parent else None
        self.processes[pid] = {"name": comm, "user": user, "container": container}
        self._add(t, c.process_event(
            self.host, self.start + t, action="start", pid=pid, name=comm, executable=exe,
            command_line=command_line, args=args, working_directory=cwd or (f"/home/{user}" if user != "root"
                                                                              else "/root"),
            start=self.start + t, parent_pid=parent, parent_name=parent_info["name"] if parent_info else None,
            user_name=user, container_id=container, owner=_ecs_owner(owner), event_id=self.event_id()))
        return GpuProgram(pid, comm, exe, command_line, owner)

    def exit(self, t: float, program: GpuProgram) -> None:
        info = self.processes.get(program.pid, {})
        self._add(t, c.process_event(self.host, self.start + t, action="end", pid=program.pid, name=program.name,
                                     executable=program.executable, command_line=program.command_line,
                                     user_name=info.get("user"), container_id=info.get("container"),
                                     event_id=self.event_id()))

    def connect(self, t: float, dst: str, dport: int, *, program: GpuProgram | None = None,
                payload: bytes | None = None, sni: str | None = None, domain: str | None = None) -> None:
        b64 = base64.b64encode(payload[:MAX_PAYLOAD_BYTES]).decode() if payload else None
        self._add(t, c.network_event(
            self.host, self.start + t, source_ip=self.ip, source_port=self.rng.randrange(32768, 60999),
            destination_ip=dst, destination_port=dport, pid=program.pid if program else None,
            process_name=program.name if program else None, executable=program.executable if program else None,
            destination_domain=domain, server_name=sni, payload_b64=b64, event_id=self.event_id()))

    def resolve(self, t: float, name: str, ips: list[str], program: GpuProgram | None = None) -> None:
        self._add(t, c.dns_event(self.host, self.start + t, question=name, resolved_ips=ips,
                                 pid=program.pid if program else None,
                                 process_name=program.name if program else None, event_id=self.event_id()))

    # ------------------------------------------------------------------ output

    def _gpu_samples(self) -> Iterator[tuple[float, int, dict[str, Any]]]:
        spec = self.spec
        noise = self.sub_rng()
        n_ticks = int(self.duration_s // self.interval_s) + 1
        total = spec.memory_bytes
        for k in range(n_ticks):
            t = k * self.interval_s
            for i, uuid in enumerate(self.uuids):
                active = [r for r in self.runs[i] if r.start <= t < r.end]
                loads = [r.workload.sample(t - r.start) for r in active]
                m = combine(spec, loads, noise)
                procs = []
                for r, ld in zip(active, loads, strict=True):
                    prog = r.workload.program
                    if prog is not None:
                        procs.append({"pid": prog.pid, "used_memory_bytes": int(ld.used_bytes),
                                      "sm_pct": round(ld.util) if len(active) > 1 else None, "name": prog.name,
                                      "executable": prog.executable, "command_line": prog.command_line,
                                      "owner": prog.owner})
                ts = t  # one collection cycle: every GPU of the host carries the cycle's time
                yield ts, 0, c.gpu_event(
                    self.host, self.start + ts, index=i, uuid=uuid, name=spec.product_name, gpu_pct=m["util"],
                    memory_pct=m["mem_pct"], memory_used_bytes=int(m["used"]), memory_total_bytes=total,
                    power_draw_watts=m["power"], power_limit_watts=m["limit"], temperature_c=m["temp"],
                    sm_clock_mhz=m["sm"], mem_clock_mhz=m["memclk"], pcie_rx_bytes_per_s=m["pcie"] * 0.6,
                    pcie_tx_bytes_per_s=m["pcie"] * 0.4, processes=procs, allocation=self._allocation(t, i),
                    event_id=self.event_id())

    def _allocation(self, t: float, gpu: int) -> dict[str, Any] | None:
        if self.scheduler is None:
            return None
        holders = [h for start, end, i, h in self.holdings if i == gpu and start <= t < end]
        return {"source": self.scheduler, "state": "current", "age_s": round(t % 5.0, 3),
                "judges_host_processes": self.scheduler != "docker", "owners": holders}

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event of the host, in time order (discrete events before samples of the same instant)."""
        discrete = sorted(self._discrete, key=lambda e: (e[0], e[1]))
        merged = heapq.merge(((t, -1, seq, ev) for t, seq, ev in discrete),
                             ((t, 0, n, ev) for n, (t, _, ev) in enumerate(self._gpu_samples())),
                             key=lambda x: (x[0], x[1], x[2]))
        for _, _, _, ev in merged:
            yield ev
