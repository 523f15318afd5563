"""Who owns a process, from its ``/proc/PID/cgroup``: a Kubernetes pod and container, a Slurm job and step, or a
plain Docker container. The first piece of allocation-aware ownership: the scheduler's allocation names pods
and jobs, the GPU's process list names pids, and the cgroup joins the two.

Shapes recognised (cgroup v1 lines ``N:controllers:/path`` and the v2 line ``0::/path`` alike):

* Kubernetes, cgroupfs driver: ``…/kubepods[/burstable|/besteffort]/pod<uid>/<container id>``;
* Kubernetes, systemd driver: ``…/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/
  <runtime>-<container id>.scope`` for containerd (``cri-containerd-``), CRI-O (``crio-``) and Docker or
  cri-dockerd (``docker-``); CRI-O's ``crio-conmon-`` monitor is not the container;
* any ``--cgroup-root`` prefix before ``kubepods``, and the ``/../`` prefixes a path shows from inside a
  cgroup namespace;
* Slurm, cgroup v2: ``/system.slice/slurmstepd.scope/<job>/step_<id>/…`` where ``<job>`` is ``job_<id>`` or, from
  Slurm 26.05, the job's SLUID (unless ``CgroupJobIdPaths=yes``); cgroup v1:
  ``…/slurm/uid_<uid>/job_<id>/step_<id>/…``;
* Docker outside Kubernetes: ``/docker/<id>`` and ``/system.slice/docker-<id>.scope``.

Nothing here reads the environment (``SLURM_*``, ``CUDA_VISIBLE_DEVICES``): the user controls it, the
cgroup is the kernel's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CID = r"([0-9a-f]{64})"
_POD_CGROUPFS = re.compile(r"/kubepods(?:/(burstable|besteffort))?/pod([0-9a-f-]{36})(?:/" + _CID + r")?(?:/|$)")
_POD_SYSTEMD = re.compile(r"kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_]{36})\.slice"
                          r"(?:/(cri-containerd|crio|docker|crio-conmon)-" + _CID + r"\.scope)?")
_SLURM_V2 = re.compile(r"/slurmstepd\.scope/(job_(\d+)|(?!step_)([A-Za-z0-9]+))(?:/step_([A-Za-z0-9_]+))?")
_SLURM_V1 = re.compile(r"/slurm/uid_(\d+)/job_(\d+)(?:/step_([A-Za-z0-9_]+))?")
_DOCKER = re.compile(r"(?:^|/)(?:docker/|docker-)" + _CID + r"(?:\.scope)?(?:/|$)")


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    kind: str  # kubernetes | slurm | docker
    pod_uid: str | None = None
    container_id: str | None = None
    qos: str | None = None  # guaranteed | burstable | besteffort
    runtime: str | None = None  # containerd | cri-o | docker (systemd driver only)
    job_id: str | None = None  # the number, or the SLUID
    step: str | None = None  # 0, batch, extern, interactive, ...
    uid: int | None = None  # Slurm cgroup v1 names the user


def _paths(cgroup_text: str) -> list[str]:
    out = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2]:
            out.append(parts[2])
    return out


_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


def owner_of(cgroup_text: str) -> CgroupOwner | None:
    """The owner a ``/proc/PID/cgroup`` names, or None (a host process, a systemd service, unknown)."""
    paths = _paths(cgroup_text)
    for path in paths:
        m = _POD_SYSTEMD.search(path)
        if m:
            runtime = m.group(3)
            if runtime == "crio-conmon":
                return None  # CRI-O's container monitor: not the container, and never on a GPU
            return CgroupOwner("kubernetes", pod_uid=m.group(2).replace("_", "-"), container_id=m.group(4),
                               qos=m.group(1) or "guaranteed", runtime=_RUNTIMES.get(runtime or ""))
        m = _POD_CGROUPFS.search(path)
        if m:
            return CgroupOwner("kubernetes", pod_uid=m.group(2), container_id=m.group(3),
                               qos=m.group(1) or "guaranteed")
    for path in paths:
        m = _SLURM_V2.search(path)
        if m:
            return CgroupOwner("slurm", job_id=m.group(2) or m.group(3), step=m.group(4))
        m = _SLURM_V1.search(path)
        if m:
            return CgroupOwner("slurm", job_id=m.group(2), step=m.group(3), uid=int(m.group(1)))
    for path in paths:
        m = _DOCKER.search(path)
        if m:
            return CgroupOwner("docker", container_id=m.group(1), runtime="docker")
    return None


class PodNames:
    """Pod UID -> (namespace, name), from the kubelet's log directory ``/var/log/pods/<ns>_<pod>_<uid>/``:
    readable on every node without API access (mount it read-only into the agent). Listed again when a UID
    is unknown, at most every ``min_interval_s``."""

    def __init__(self, root: str | None = "/var/log/pods", min_interval_s: float = 5.0) -> None:
        self.root = root
        self.min_interval_s = min_interval_s
        self._names: dict[str, tuple[str, str]] = {}
        self._listed_at = float("-inf")

    def lookup(self, pod_uid: str | None, now: float) -> tuple[str | None, str | None]:
        if not pod_uid or not self.root:
            return None, None
        hit = self._names.get(pod_uid)
        if hit is None and now - self._listed_at >= self.min_interval_s:
            self._listed_at = now
            self._names = self._list()
            hit = self._names.get(pod_uid)
        return hit if hit is not None else (None, None)

    def all(self, refresh: bool = False) -> dict[str, tuple[str, str]]:
        """Every pod UID the directory names (listed again first when ``refresh``)."""
        if refresh:
            self._names = self._list()
        return self._names

    def _list(self) -> dict[str, tuple[str, str]]:
        import os

        try:
            entries = os.listdir(self.root or "")
        except OSError:
            return {}
        out: dict[str, tuple[str, str]] = {}
        for entry in entries:
            parts = entry.rsplit("_", 2)  # namespaces and pod names contain no "_"; the UID is last
            if len(parts) == 3 and len(parts[2]) == 36:
                out[parts[2]] = (parts[0], parts[1])
        return out


def owner_fields(owner: CgroupOwner | None, pods: PodNames | None, now: float) -> dict[str, object]:
    """ECS ``orchestrator.*`` fields (and the Slurm step) for a process event."""
    if owner is None or owner.kind == "docker":
        return {}
    if owner.kind == "kubernetes":
        namespace, name = pods.lookup(owner.pod_uid, now) if pods is not None else (None, None)
        fields: dict[str, object] = {"orchestrator.type": "kubernetes", "orchestrator.resource.type": "pod",
                                     "orchestrator.resource.id": owner.pod_uid}
        if namespace:
            fields["orchestrator.namespace"] = namespace
        if name:
            fields["orchestrator.resource.name"] = name
        return fields
    fields = {"orchestrator.type": "slurm", "orchestrator.resource.type": "job", "orchestrator.resource.id": owner.job_id}
    if owner.step:
        fields["gpusentry.owner.step"] = owner.step
    return fields


_POD_DIR = re.compile(r"^(?:kubepods(?:-(?:burstable|besteffort))?-)?pod([0-9a-f_-]{36})(?:\.slice)?$")
_WALK_DEPTH = 6


def live_pod_uids(cgroup_root: str) -> set[str]:
    """UIDs of the pods whose cgroup still exists (the kubelet's List also reports finished pods).

    Walks the cgroup filesystem: every directory down to two levels (``--cgroup-root`` prefixes, cgroup v1's
    controller directories), and below that only the ``kubepods`` branches."""
    import os

    found: set[str] = set()

    def walk(path: str, depth: int, inside: bool = False) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            m = _POD_DIR.match(entry.name)
            if m:
                found.add(m.group(1).replace("_", "-"))
                continue  # below a pod: its containers
            below = inside or "kubepods" in entry.name
            if depth < _WALK_DEPTH and (depth < 2 or below):
                walk(entry.path, depth + 1, below)

    walk(cgroup_root, 0)
    return found


@dataclass(frozen=True, slots=True)
class SlurmJobCgroup:
    job: str  # the number or the SLUID, as the cgroup directory names it
    uid: int | None = None  # cgroup v1 names the user
    devices_list: str | None = None  # cgroup v1: the job's devices.list (allowed device numbers)


def live_slurm_jobs(cgroup_root: str) -> dict[str, SlurmJobCgroup]:
    """The Slurm jobs that have a cgroup on this node (v2 under ``slurmstepd.scope``, v1 under ``slurm*/uid_*``)."""
    import glob
    import os

    jobs: dict[str, SlurmJobCgroup] = {}
    for path in glob.glob(os.path.join(glob.escape(cgroup_root), "system.slice", "slurmstepd.scope", "*")):
        name = os.path.basename(path)
        if name == "system" or not os.path.isdir(path):
            continue  # slurmstepd's own processes
        job = name[4:] if name.startswith("job_") else name
        jobs.setdefault(job, SlurmJobCgroup(job))
    for path in glob.glob(os.path.join(glob.escape(cgroup_root), "*", "slurm*", "uid_*", "job_*")):
        parts = path.split(os.sep)
        job, uid_dir, controller = parts[-1][4:], parts[-2][4:], parts[-4]
        devices = os.path.join(path, "devices.list") if controller == "devices" else None
        known = jobs.get(job)
        if known is None or (devices and known.devices_list is None):
            jobs[job] = SlurmJobCgroup(job, int(uid_dir) if uid_dir.isdigit() else None, devices)
    return jobs
