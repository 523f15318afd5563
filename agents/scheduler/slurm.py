"""Slurm: the jobs that have a cgroup on this node, and the GPUs each was given.

Per job, in this order: the mapping file the shipped prolog writes as root when the job starts
(``deploy/slurm/prolog.sh``: the job's GPU UUIDs, read from NVML by index of ``SLURM_JOB_GPUS``); else
``scontrol show job -d`` (``GRES=gpu:…(IDX:0-1)`` on this node's line: NVML indices, since Slurm and NVML both
number GPUs by PCI bus id); else, on cgroup v1, the job's ``devices.list`` (the NVIDIA device minor numbers the
job may open).  A job's GPUs do not change while it runs, so each job is asked once.  ``SLURM_*_GPUS`` and
``CUDA_VISIBLE_DEVICES`` in a process's environment are set by the user's own shell and are never read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess

from agents.cgroups import SlurmJobCgroup, live_slurm_jobs
from agents.scheduler import Allocation, Holder, SourceError

NVIDIA_MAJOR = 195  # /dev/nvidiaN; minors 254 (modeset) and 255 (nvidiactl) are not GPUs
_GRES_IDX = re.compile(r"gpu(?::[^:(,\s]+)*(?::\d+)?\(IDX:([0-9,\-]+)\)")
_NODE_LINE = re.compile(r"^\s*Nodes=(\S+)\s.*?GRES=(\S+)", re.MULTILINE)


def expand_hostlist(expr: str) -> list[str]:
    """Slurm's hostlist syntax: ``gpu[01-03,07],login1`` -> gpu01, gpu02, gpu03, gpu07, login1."""
    out: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", expr):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            out.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if hi and lo.isdigit() and hi.isdigit():
                out.extend(f"{prefix}{n:0{len(lo)}d}{suffix}" for n in range(int(lo), int(hi) + 1))
            else:
                out.append(f"{prefix}{lo}{suffix}")
    return out


def _indices(text: str) -> list[int]:
    out: list[int] = []
    for r in text.split(","):
        lo, _, hi = r.partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi) + 1) if hi.isdigit() else [int(lo)])
    return out


def parse_scontrol_job(text: str, node: str) -> tuple[Holder, list[str]] | None:
    """The holder and the device ids (``index:N``) of one ``scontrol show job -d`` answer, for ``node``."""
    job = re.search(r"\bJobId=(\S+)", text)
    if not job:
        return None
    name = re.search(r"\bJobName=(\S+)", text)
    user = re.search(r"\bUserId=([^(\s]+)", text)
    short = node.split(".")[0]
    devices: list[str] = []
    for nodes, gres in _NODE_LINE.findall(text):
        if short not in {n.split(".")[0] for n in expand_hostlist(nodes)}:
            continue
        for idx in _GRES_IDX.findall(gres):
            devices.extend(f"index:{i}" for i in _indices(idx))
    holder = Holder("slurm", job_id=job.group(1), job_name=name.group(1) if name else None,
                    user=user.group(1) if user else None, resource="gres/gpu")
    return holder, devices


def read_devices_list(path: str) -> list[str] | None:
    """``minor:N`` ids of the NVIDIA GPUs a cgroup v1 ``devices.list`` allows (None: unreadable)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"c (\d+|\*):(\d+|\*) [rwm]+", line.strip())
        if not m:
            continue
        if m.group(1) == "*" or (m.group(1) == str(NVIDIA_MAJOR) and m.group(2) == "*"):
            return ["all"]  # a job that may open every character device
        if m.group(1) == str(NVIDIA_MAJOR) and int(m.group(2)) < 254:
            out.append(f"minor:{m.group(2)}")
    return out


class SlurmSource:
    name = "slurm"

    def __init__(self, *, cgroup_root: str, scontrol: str = "scontrol", map_dir: str | None = None,
                 node: str | None = None, timeout_s: float = 2.0) -> None:
        self.cgroup_root = cgroup_root
        self.scontrol = shutil.which(scontrol)  # None: not installed here (prolog map and devices.list remain)
        self.map_dir = map_dir
        self.node = node or socket.gethostname()
        self.timeout_s = timeout_s
        self._known: dict[str, tuple[Holder, list[str]]] = {}  # a job's GPUs do not change while it runs

    def read(self) -> Allocation:
        jobs = live_slurm_jobs(self.cgroup_root)
        for gone in set(self._known) - set(jobs):
            del self._known[gone]
        complete = True
        devices: dict[str, list[Holder]] = {}
        for job, cg in jobs.items():
            answer = self._known.get(job) or self._lookup(cg)
            if answer is None:
                complete = False  # a live job whose GPUs are unknown: no GPU can be called free
                continue
            self._known[job] = answer
            holder, ids = answer
            for device_id in ids:
                devices.setdefault(device_id, []).append(holder)
        return Allocation("slurm", devices, None, judges_host_processes=True, complete=complete)

    def _lookup(self, cg: SlurmJobCgroup) -> tuple[Holder, list[str]] | None:
        mapped = self._from_map(cg.job)
        if mapped is not None:
            return mapped
        if self.scontrol:
            try:
                done = subprocess.run([self.scontrol, "show", "job", "-d", cg.job], capture_output=True, text=True,
                                      timeout=self.timeout_s, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SourceError(f"{self.scontrol} show job -d {cg.job}: {exc}") from exc
            if done.returncode == 0:
                parsed = parse_scontrol_job(done.stdout, self.node)
                if parsed is not None:
                    holder, ids = parsed
                    return Holder("slurm", job_id=cg.job, job_name=holder.job_name, user=holder.user,
                                  resource=holder.resource), ids
        if cg.devices_list:
            allowed = read_devices_list(cg.devices_list)
            if allowed is not None:
                return Holder("slurm", job_id=cg.job, user=str(cg.uid) if cg.uid is not None else None,
                              resource="devices.list"), allowed
        return None

    def _from_map(self, job: str) -> tuple[Holder, list[str]] | None:
        if not self.map_dir:
            return None
        try:
            with open(os.path.join(self.map_dir, f"{job}.json"), "rb") as f:
                data = json.loads(f.read())
        except (OSError, ValueError):
            return None
        uuids = data.get("gpu_uuids") if isinstance(data, dict) else None
        if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
            return None
        user, name = data.get("user"), data.get("job_name")
        return Holder("slurm", job_id=job, job_name=name if isinstance(name, str) else None,
                      user=user if isinstance(user, str) else None, resource="prolog"), list(uuids)

    def close(self) -> None:
        pass
