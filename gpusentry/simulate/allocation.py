"""Scheduler-aware scenarios: GPU work judged against what Kubernetes or Slurm allocated.

The agent reports, on every GPU sample, who the scheduler says holds the GPU, and on every GPU process the pod or
job its cgroup names. The attacks are the ones allowlists cannot see, because they run as an allowed interpreter:
a pod that requested no GPU computing on one, a pod on another pod's GPU, a Slurm job escaping to a GPU outside
its allocation, a host process on a GPU nobody holds. The benign rows are what must stay quiet: pods and jobs on
their own GPUs (from interpreter paths no allowlist names), time-sliced sharing, MIG instances, a pod starting up
before its allocation is read, and a job started late from a conda environment on a node with no scheduler.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from gpusentry.simulate.host import HostSim
from gpusentry.simulate.workloads import GpuProgram, Miner, Notebook, Training

CONDA_PY = "/scratch/ml/miniforge3/envs/llm/bin/python3.11"  # a path no default allowlist names
VENV_PY = "/workspace/venv/bin/python3.11"
ALLOWED_PY = "/usr/local/bin/python3"  # an allowlisted interpreter: what the attacks run as


def attack_at(sim: HostSim) -> float:
    t = max(300.0, round(sim.duration_s * 0.25 / 10) * 10)
    return min(t, sim.duration_s * 0.6)


def pod(sim: HostSim, namespace: str, name: str) -> dict[str, Any]:
    h = f"{sim.rng.getrandbits(128):032x}"
    return {"kind": "kubernetes", "namespace": namespace, "pod": name,
            "pod_uid": f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:]}"}


def holder_of(owner: dict[str, Any], container: str = "main") -> dict[str, Any]:
    """The allocation entry (gpusentry.allocation.owners[]) of a pod or job owner."""
    if owner["kind"] == "kubernetes":
        return {"kind": "kubernetes", "namespace": owner["namespace"], "pod": owner["pod"],
                "pod_uid": owner["pod_uid"], "container": container, "resource": "nvidia.com/gpu"}
    return {"kind": "slurm", "job_id": owner["job_id"], "user": owner.get("user"), "resource": "gres/gpu"}


def in_pod(sim: HostSim, t: float, owner: dict[str, Any], command_line: str, exe: str,
           user: str = "1000") -> GpuProgram:
    cid = f"{sim.rng.getrandbits(256):064x}"
    proc_owner = {k: owner[k] for k in ("kind", "namespace", "pod", "pod_uid")} | {"container_id": cid}
    return sim.spawn(t, command_line, executable=exe, user=user, container=cid, owner=proc_owner,
                     cwd="/workspace")


def in_job(sim: HostSim, t: float, job_id: str, command_line: str, exe: str, user: str = "alice",
           step: str = "0") -> GpuProgram:
    return sim.spawn(t, command_line, executable=exe, user=user, cwd=f"/home/{user}",
                     owner={"kind": "slurm", "job_id": job_id, "step": step})


def train_on(sim: HostSim, start: float, end: float, gpu: int, prog: GpuProgram) -> None:
    sim.run(start, end, [gpu], partial(Training, sim.spec, program=prog, dip_period_s=sim.rng.uniform(420, 900),
                                       dip_len_s=sim.rng.uniform(30, 60), phase_s=sim.rng.uniform(0, 400)))


def trainer_pod(sim: HostSim, gpu: int = 0, exe: str = VENV_PY) -> dict[str, Any]:
    """A training pod holding ``gpu`` for the whole run, computing on it."""
    owner = pod(sim, "team-a", "trainer-0")
    sim.allocate(0, sim.duration_s, [gpu], holder_of(owner))
    prog = in_pod(sim, 2, owner, f"{exe} -u train.py --config llama.yaml", exe)
    train_on(sim, 5, sim.duration_s, gpu, prog)
    return owner


def _miner(sim: HostSim, t: float, gpu: int, prog: GpuProgram) -> None:
    sim.run(t + 2, sim.duration_s, [gpu], lambda r: Miner(sim.spec, r, prog, algorithm="kawpow", tuned=False))


# ---------------------------------------------------------------------------- attacks


def pod_without_gpu_request(sim: HostSim) -> float:
    """A notebook pod that requested no GPU reaches one (NVIDIA_VISIBLE_DEVICES=all) and mines on it."""
    sim.scheduler = "kubernetes"
    trainer_pod(sim)
    t = attack_at(sim)
    nb = pod(sim, "team-b", "notebook-7")
    prog = in_pod(sim, t, nb, f"{ALLOWED_PY} /workspace/notebooks/solver.py", ALLOWED_PY)
    _miner(sim, t, 1, prog)
    return t


def pod_on_another_pods_gpu(sim: HostSim) -> float:
    """A pod computes on a GPU the scheduler gave another pod (reserved for an inference server, idle)."""
    sim.scheduler = "kubernetes"
    trainer_pod(sim)
    reserved = pod(sim, "serving", "triton-1")
    sim.allocate(0, sim.duration_s, [1], holder_of(reserved, "triton"))
    t = attack_at(sim)
    intruder = pod(sim, "team-b", "batch-42")
    prog = in_pod(sim, t, intruder, f"{ALLOWED_PY} -u finetune.py", ALLOWED_PY)
    train_on(sim, t + 2, sim.duration_s, 1, prog)
    return t


def slurm_job_escape(sim: HostSim) -> float:
    """A Slurm job given GPU 0 starts a second program on GPU 1, which no job holds (no ConstrainDevices)."""
    sim.scheduler = "slurm"
    sim.allocate(0, sim.duration_s, [0], {"kind": "slurm", "job_id": "4242", "user": "alice", "resource": "gres/gpu"})
    prog = in_job(sim, 2, "4242", f"{CONDA_PY} train.py", CONDA_PY)
    train_on(sim, 5, sim.duration_s, 0, prog)
    t = attack_at(sim)
    side = in_job(sim, t, "4242", f"{ALLOWED_PY} /home/alice/.cache/ext.py", ALLOWED_PY)
    _miner(sim, t, 1, side)
    return t


def host_process_on_free_gpu(sim: HostSim) -> float:
    """On a Kubernetes node, a process outside every pod (started over SSH) computes on a GPU nobody holds."""
    sim.scheduler = "kubernetes"
    trainer_pod(sim)
    t = attack_at(sim)
    prog = sim.spawn(t, f"{ALLOWED_PY} /opt/tools/bench.py --loop", executable=ALLOWED_PY, user="root", cwd="/root")
    _miner(sim, t, 1, prog)
    return t


# ---------------------------------------------------------------------------- benign


def pods_on_their_gpus(sim: HostSim) -> None:
    """Every GPU held by its own pod, each computing from an interpreter path no allowlist names."""
    sim.scheduler = "kubernetes"
    for gpu in sim.gpus:
        owner = pod(sim, "team-a", f"trainer-{gpu}")
        start = 0.0 if gpu == 0 else sim.rng.uniform(200, 900)  # some start long after the agent did
        sim.allocate(start, sim.duration_s, [gpu], holder_of(owner))
        prog = in_pod(sim, start + 1, owner, f"{VENV_PY} -u train.py --rank {gpu}", VENV_PY)
        train_on(sim, start + 4, sim.duration_s, gpu, prog)


def time_sliced(sim: HostSim) -> None:
    """Two pods share GPU 0 through time-slicing (the device plugin hands each a replica GPU-…::N)."""
    sim.scheduler = "kubernetes"
    a, b = pod(sim, "lab", "nb-alice"), pod(sim, "lab", "nb-bob")
    sim.allocate(0, sim.duration_s, [0], holder_of(a))
    sim.allocate(0, sim.duration_s, [0], holder_of(b))
    for owner, t in ((a, 30.0), (b, 90.0)):
        prog = in_pod(sim, t, owner, f"{VENV_PY} -m ipykernel_launcher -f /tmp/k.json", VENV_PY)
        sim.run(t + 5, sim.duration_s, [0], partial(Notebook, sim.spec, program=prog))


def mig_instances(sim: HostSim) -> None:
    """A MIG-partitioned GPU: each instance (MIG-…) held by its own pod."""
    sim.scheduler = "kubernetes"
    sim.uuids = [f"MIG-{u[4:]}" for u in sim.uuids]
    for gpu in sim.gpus:
        owner = pod(sim, "infer", f"small-{gpu}")
        holder = holder_of(owner) | {"resource": "nvidia.com/mig-1g.10gb"}
        sim.allocate(0, sim.duration_s, [gpu], holder)
        prog = in_pod(sim, 10, owner, f"{VENV_PY} serve.py", VENV_PY)
        sim.run(15, sim.duration_s, [gpu], partial(Notebook, sim.spec, program=prog))


def pod_starting_up(sim: HostSim) -> None:
    """A pod's process reaches the GPU a few seconds before the agent reads its allocation (device-plugin lag)."""
    sim.scheduler = "kubernetes"
    trainer_pod(sim)
    t = attack_at(sim)
    owner = pod(sim, "team-c", "late-start")
    sim.allocate(t + 8, sim.duration_s, [1], holder_of(owner))
    prog = in_pod(sim, t, owner, f"{VENV_PY} -u train.py", VENV_PY)
    train_on(sim, t + 1, sim.duration_s, 1, prog)


def slurm_jobs_on_their_gpus(sim: HostSim) -> None:
    """Slurm jobs on their own GPUs, one of them started half-way through from a conda environment."""
    sim.scheduler = "slurm"
    for gpu in sim.gpus:
        job = str(5000 + gpu)
        start = 0.0 if gpu == 0 else sim.duration_s / 2
        sim.allocate(start, sim.duration_s, [gpu], {"kind": "slurm", "job_id": job, "user": "bob",
                                                    "resource": "gres/gpu"})
        prog = in_job(sim, start + 1, job, f"{CONDA_PY} train.py", CONDA_PY, user="bob")
        train_on(sim, start + 4, sim.duration_s, gpu, prog)


def late_conda_job_no_scheduler(sim: HostSim) -> None:
    """No scheduler at all: a training job started long after the agent, from a conda env no allowlist names."""
    t = attack_at(sim)
    launcher = sim.spawn(t, f"{CONDA_PY} -m torch.distributed.run --nproc_per_node=1 train.py", executable=CONDA_PY,
                         name="torchrun", user="ml", cwd="/home/ml/llm")
    rank = sim.spawn(t + 2, f"{CONDA_PY} -u train.py --local-rank=0", executable=CONDA_PY, parent=launcher.pid,
                     user="ml", cwd="/home/ml/llm")
    train_on(sim, t + 5, sim.duration_s, 0, rank)
