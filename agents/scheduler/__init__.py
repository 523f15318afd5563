"""Who was allocated which GPU: the scheduler's answer, read in the background and reported on every GPU sample.

A :class:`Source` reads one scheduler (the kubelet's PodResources API, Slurm, Docker) and returns an
:class:`Allocation`: the device ids it names, each with its :class:`Holder` list.  A :class:`SchedulerView` calls
its source every ``refresh_s`` in a thread of its own, so a slow or absent scheduler never delays a collection
cycle: when a read fails the view says so once, keeps the last answer and marks it ``stale`` after
``stale_after_s``; when reads succeed again it says that once too.

Device ids stay as the scheduler spells them (``GPU-<uuid>``, ``MIG-<uuid>``, ``GPU-<uuid>::3``, GKE's
``nvidia0/gi7``, Slurm's NVML index, ...); the GPU collector, which knows each device's UUID, index, minor number
and MIG instance, resolves them (:func:`agents.gpu.GpuCollector.resolve`).  Everything is keyed on the UUID in the
end: NVML and Slurm number GPUs by PCI bus id, CUDA only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and minor numbers
match neither.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The scheduler did not answer this time (the message says why and what to check)."""


@dataclass(frozen=True, slots=True)
class Holder:
    """One owner of a GPU as the scheduler sees it: a pod's container, a Slurm job, a Docker container."""

    kind: str  # kubernetes | slurm | docker
    namespace: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    container: str | None = None  # the container's name (Kubernetes, Docker)
    container_id: str | None = None  # Docker
    job_id: str | None = None  # Slurm: the number, or the SLUID its cgroup is named by
    job_name: str | None = None
    user: str | None = None
    resource: str | None = None  # nvidia.com/gpu, nvidia.com/mig-1g.10gb, gres/gpu, --gpus, ...

    def to_event(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


@dataclass
class Allocation:
    """One complete answer of a source."""

    source: str  # kubernetes | slurm | docker
    devices: dict[str, list[Holder]] = field(default_factory=dict)  # device id, as the source names it -> holders
    # Device ids the scheduler manages (None: every GPU on the node). A GPU it does not manage is not judged.
    managed: set[str] | None = None
    # Whether processes outside any pod/job are the scheduler's business: on a Kubernetes or Slurm node a host
    # process computing on a GPU is outside every allocation; on a Docker host it is ordinary.
    judges_host_processes: bool = True
    # False when part of the answer is missing (a live job whose GPUs could not be read): reported stale.
    complete: bool = True


class Source(Protocol):
    name: str

    def read(self) -> Allocation: ...

    def close(self) -> None: ...


class SchedulerView:
    """The latest answer of ``source``, refreshed every ``refresh_s`` in a daemon thread."""

    def __init__(self, source: Source, *, refresh_s: float = 5.0, stale_after_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._latest: Allocation | None = None
        self._read_at = float("-inf")
        self._failing = False
        self.reads = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Read the source once (the thread's step; also called directly by ``agent --once`` and the tests)."""
        try:
            answer = self.source.read()
        except SourceError as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("scheduler %s did not answer (%s); keeping its last answer, reported stale after "
                            "%.0f s", self.source.name, exc, self.stale_after_s)
            return False
        with self._lock:
            self._latest = answer
            self._read_at = self.clock()
        self.reads += 1
        if self._failing:
            self._failing = False
            log.warning("scheduler %s answers again", self.source.name)
        return True

    def snapshot(self) -> tuple[Allocation | None, str, float]:
        """(the latest answer, ``current`` or ``stale``, its age in seconds)."""
        with self._lock:
            latest, read_at = self._latest, self._read_at
        age = self.clock() - read_at
        if latest is None:
            return None, "stale", age
        state = "current" if age <= self.stale_after_s and latest.complete else "stale"
        return latest, state, age

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.source.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from agents.procfs import name_this_thread

        name_this_thread("gs-scheduler")  # its CPU shows under its own name in /proc (and the agent benchmark)
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:
                # A bug in a source must not end the thread silently: counted, logged with its traceback.
                self.failures += 1
                log.exception("scheduler %s: reading it failed unexpectedly", self.source.name)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.source.close()


def build_source(settings: Any, *, docker_root: str | None, pods: Any, node: str) -> Any:
    """The configured source (``mode = "auto"``: the first this node has), or None."""
    from agents.scheduler.docker import DockerSource
    from agents.scheduler.kubelet import KubeletSource
    from agents.scheduler.slurm import SlurmSource

    mode = settings.mode
    if mode == "none":
        return None
    if mode == "auto":
        import shutil

        if os.path.exists(settings.kubelet_socket):
            mode = "kubernetes"
        elif (os.path.isdir(os.path.join(settings.cgroup_root, "system.slice", "slurmstepd.scope"))
              or shutil.which(settings.scontrol)):
            mode = "slurm"
        elif docker_root and os.path.isdir(os.path.join(docker_root, "containers")):
            mode = "docker"
        else:
            return None
    if mode == "kubernetes":
        return KubeletSource(settings.kubelet_socket, gpu_resources=settings.gpu_resources,
                             cgroup_root=settings.cgroup_root, pods=pods, timeout_s=settings.timeout_s)
    if mode == "slurm":
        return SlurmSource(cgroup_root=settings.cgroup_root, scontrol=settings.scontrol,
                           map_dir=settings.slurm_map_dir, node=node, timeout_s=settings.timeout_s)
    if not docker_root:
        raise SourceError("[agent.scheduler] mode = \"docker\" needs [agent] docker_root (Docker's state directory)")
    return DockerSource(docker_root)
