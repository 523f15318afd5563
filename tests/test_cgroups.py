"""Owners from /proc/PID/cgroup, as each runtime, driver and cgroup version writes it (the allocation work's join)."""

from __future__ import annotations

import pytest

from agents.cgroups import CgroupOwner, owner_of

pytestmark = pytest.mark.allocation

CID = "9f3c1b2a" * 8
UID = "5c7e0d2a-8b1f-4e3c-9a6d-1f2e3d4c5b6a"
U_ = UID.replace("-", "_")

CASES = [
    ("containerd, systemd driver, cgroup v2, burstable",
     f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/cri-containerd-{CID}.scope\n",
     CgroupOwner("kubernetes", pod_uid=UID, container_id=CID, qos="burstable", runtime="containerd")),
    ("CRI-O, systemd driver, cgroup v2, guaranteed",
     f"0::/kubepods.slice/kubepods-pod{U_}.slice/crio-{CID}.scope\n",
     CgroupOwner("kubernetes", pod_uid=UID, container_id=CID, qos="guaranteed", runtime="cri-o")),
    ("cri-dockerd, systemd driver, besteffort",
     f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/docker-{CID}.scope\n",
     CgroupOwner("kubernetes", pod_uid=UID, container_id=CID, qos="besteffort", runtime="docker")),
    ("containerd, cgroupfs driver, cgroup v1",
     f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:devices:/kubepods/burstable/pod{UID}/{CID}\n"
     f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n",
     CgroupOwner("kubernetes", pod_uid=UID, container_id=CID, qos="burstable")),
    ("cgroupfs driver, guaranteed, under a --cgroup-root",
     f"0::/custom-root/kubepods/pod{UID}/{CID}\n",
     CgroupOwner("kubernetes", pod_uid=UID, container_id=CID, qos="guaranteed")),
    ("seen from inside a cgroup namespace",
     f"0::/../../kubepods-besteffort-pod{U_}.slice/cri-containerd-{CID}.scope\n",
     CgroupOwner("kubernetes", pod_uid=UID, container_id=CID, qos="besteffort", runtime="containerd")),
    ("the pod's cgroup itself (a pause process or a pod-level path)",
     f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice\n",
     CgroupOwner("kubernetes", pod_uid=UID, qos="burstable")),
    ("Slurm, cgroup v2, job_<id>",
     "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
     CgroupOwner("slurm", job_id="4242", step="0")),
    ("Slurm, cgroup v2, batch step",
     "0::/system.slice/slurmstepd.scope/job_77/step_batch/user/task_0\n",
     CgroupOwner("slurm", job_id="77", step="batch")),
    ("Slurm 26.05, cgroup v2, a SLUID in place of job_<id>",
     "0::/system.slice/slurmstepd.scope/s7f3k2q9a/step_0/user/task_1\n",
     CgroupOwner("slurm", job_id="s7f3k2q9a", step="0")),
    ("Slurm, cgroup v1",
     "11:devices:/slurm/uid_1001/job_99/step_2/task_0\n7:memory:/slurm/uid_1001/job_99/step_2/task_0\n",
     CgroupOwner("slurm", job_id="99", step="2", uid=1001)),
    ("Docker outside Kubernetes, cgroupfs v1", f"4:memory:/docker/{CID}\n",
     CgroupOwner("docker", container_id=CID, runtime="docker")),
    ("Docker outside Kubernetes, systemd v2", f"0::/system.slice/docker-{CID}.scope\n",
     CgroupOwner("docker", container_id=CID, runtime="docker")),
]


@pytest.mark.parametrize(("text", "owner"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_owners_of_every_runtime_driver_and_version(text, owner):
    assert owner_of(text) == owner


@pytest.mark.parametrize("text", [
    "0::/user.slice/user-1000.slice/session-3.scope\n",  # a login session
    "0::/system.slice/nvidia-persistenced.service\n",  # a host service
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/crio-conmon-{CID}.scope\n",
    "", "garbage", "0::/\n",
], ids=["login session", "host service", "CRI-O conmon", "empty", "garbage", "root"])
def test_not_owned_by_a_pod_job_or_container(text):
    assert owner_of(text) is None


def test_pod_names_come_from_the_kubelets_log_directory(tmp_path):
    from agents.cgroups import PodNames, owner_fields

    (tmp_path / f"ml-team-a_trainer-7f9c_{UID}").mkdir()
    (tmp_path / "kube-system_coredns-5d78_00000000-0000-0000-0000-000000000001").mkdir()
    pods = PodNames(str(tmp_path))
    owner = owner_of(f"0::/kubepods.slice/kubepods-pod{U_}.slice/cri-containerd-{CID}.scope\n")
    assert owner_fields(owner, pods, now=0.0) == {
        "orchestrator.type": "kubernetes", "orchestrator.resource.type": "pod", "orchestrator.resource.id": UID,
        "orchestrator.namespace": "ml-team-a", "orchestrator.resource.name": "trainer-7f9c"}
    assert PodNames(str(tmp_path / "absent")).lookup(UID, 0.0) == (None, None)
    slurm = owner_of("0::/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0\n")
    assert owner_fields(slurm, None, 0.0) == {"orchestrator.type": "slurm", "orchestrator.resource.type": "job",
                                              "orchestrator.resource.id": "7", "gpusentry.owner.step": "batch"}


def test_process_events_carry_their_owner_into_the_incident():
    from detectors.engine import Engine
    from detectors.examples import proc
    from gpusentry import contract as c

    ev = proc("/tmp/x/xmrig -o stratum+tcp://pool.example.net:3333 -u 4AbC --donate-level 1", pid=31337)
    ev["orchestrator"] = {"type": "kubernetes", "namespace": "ml-team-a",
                          "resource": {"type": "pod", "name": "trainer-7f9c", "id": UID}}
    [alert] = Engine(strict=True).process(c.validate_or_raise(ev))
    assert alert["orchestrator"]["namespace"] == "ml-team-a"
    assert alert["orchestrator"]["resource"]["name"] == "trainer-7f9c"


def test_procfs_reads_the_owner_from_the_same_cgroup_text_as_the_container_id():
    import os

    from agents.procfs import ProcFS

    fs = ProcFS()
    text = fs.cgroup(os.getpid())
    info = fs.process(os.getpid())
    assert text and info is not None
    assert info.owner == owner_of(text) and info.container_id == fs.container_id(os.getpid(), text)
