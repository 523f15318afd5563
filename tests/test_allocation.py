"""Allocation-aware ownership end to end: a fake kubelet (tests/fakes/fake_kubelet.py) speaking the real
PodResources gRPC proto over a unix socket, /proc- and cgroup-shaped trees for each runtime, Slurm trees with a fake ``scontrol``, Docker state files,
the GPU collector resolving every device-id form against a fake NVML, and the detectors' verdicts."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from agents.cgroups import PodNames, live_pod_uids, live_slurm_jobs
from agents.gpu import GpuCollector
from agents.procfs import ProcFS
from agents.scheduler import Allocation, Holder, SchedulerView, SourceError, build_source
from agents.scheduler.docker import DockerSource
from agents.scheduler.kubelet import KubeletSource
from agents.scheduler.podresources import api_pb2 as pb
from agents.scheduler.podresources import api_pb2_grpc as pb_grpc
from agents.scheduler.slurm import SlurmSource, expand_hostlist, parse_scontrol_job, read_devices_list
from detectors.engine import Engine
from gpusentry import contract as c
from gpusentry.config import Config
from gpusentry.settings.scheduler import SchedulerSettings
from tests.fakes.fake_kubelet import FakeKubelet, serve
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, FakeProcess, mig_gpu

pytestmark = pytest.mark.allocation

REPO = Path(__file__).resolve().parents[1]
UID_A = "11111111-aaaa-4aaa-8aaa-000000000001"
UID_B = "22222222-bbbb-4bbb-8bbb-000000000002"
UID_GONE = "33333333-cccc-4ccc-8ccc-000000000003"
UID_SHARE = "44444444-dddd-4ddd-8ddd-000000000004"
CID = "ab12" * 16
GPU0, GPU1, GPU2 = (f"GPU-00000000-0000-4000-8000-{i:012d}" for i in range(3))
MIG_PARENT = "GPU-00000000-0000-4000-8000-0000000000a1"


PODS = [
    ("team-a", "trainer-0", [("main", [("nvidia.com/gpu", [GPU0]), ("example.com/fpga", ["fpga0"])])]),
    ("team-b", "notebook-7", [("lab", [])]),  # requested no GPU
    ("team-c", "finished-job", [("main", [("nvidia.com/gpu", [GPU2])])]),  # its cgroup is gone
    ("team-s", "sliced-0", [("main", [("nvidia.com/gpu", [f"{GPU1}::0"])])]),
    ("team-s", "sliced-1", [("main", [("nvidia.com/gpu", [f"{GPU1}::1"])])]),
    ("team-m", "mig-0", [("main", [("nvidia.com/mig-1g.10gb", [f"MIG-{MIG_PARENT[4:]}-0"])])]),
    ("team-g", "gke-mig", [("main", [("nvidia.com/gpu", ["nvidia3/gi8"])])]),
]


@pytest.fixture
def node(tmp_path):
    """A node's filesystem: pod log directories, a cgroup v2 tree (systemd driver) and a short socket path."""
    logs = tmp_path / "pods"
    for ns, name, uid in [("team-a", "trainer-0", UID_A), ("team-b", "notebook-7", UID_B),
                          ("team-c", "finished-job", UID_GONE), ("team-s", "sliced-0", UID_SHARE),
                          ("team-s", "sliced-1", "55555555-eeee-4eee-8eee-000000000005"),
                          ("team-m", "mig-0", "66666666-ffff-4fff-8fff-000000000006"),
                          ("team-g", "gke-mig", "77777777-0000-4000-8000-000000000007")]:
        (logs / f"{ns}_{name}_{uid}" / "main").mkdir(parents=True)
    cg = tmp_path / "cgroup"
    for qos, uid in [("burstable", UID_A), ("besteffort", UID_B), ("burstable", UID_SHARE),
                     ("burstable", "55555555-eeee-4eee-8eee-000000000005"),
                     ("burstable", "66666666-ffff-4fff-8fff-000000000006"),
                     ("burstable", "77777777-0000-4000-8000-000000000007")]:
        (cg / "kubepods.slice" / f"kubepods-{qos}.slice" / f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice"
         / f"cri-containerd-{CID}.scope").mkdir(parents=True)
    (cg / "system.slice" / "kubelet.service").mkdir(parents=True)
    # A short directory for the socket: unix socket paths are limited to 108 bytes.
    sock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gs-kubelet-{os.getpid()}-{id(tmp_path) % 10000}"
    sock_dir.mkdir(exist_ok=True)
    yield tmp_path, logs, cg, sock_dir / "kubelet.sock"
    for p in sock_dir.iterdir():
        p.unlink()
    sock_dir.rmdir()


def kubelet_source(logs, cg, sock) -> KubeletSource:
    return KubeletSource(str(sock), gpu_resources=SchedulerSettings().gpu_resources, cgroup_root=str(cg),
                         pods=PodNames(str(logs)), timeout_s=2.0)


# ---------------------------------------------------------------------------- generated code


def test_committed_grpc_modules_are_what_grpcio_tools_generates(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a test dependency) builds the PodResources modules")
    rel = Path("agents/scheduler/podresources")
    (tmp_path / rel).mkdir(parents=True)
    (tmp_path / rel / "api.proto").write_bytes((REPO / rel / "api.proto").read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", str(rel / "api.proto")], cwd=tmp_path, check=True)
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        fresh, committed = ((d / rel / name).read_text() for d in (tmp_path, REPO))

        def body(text: str) -> list[str]:
            # Version stamps move with grpcio-tools; the descriptor, messages and methods must not.
            return [ln for ln in text.splitlines() if not re.search(r"Version|VERSION|^\s+\d+,$", ln)]

        assert body(fresh) == body(committed), f"{name} is stale: regenerate it (see api.proto's header)"
    assert pb.DESCRIPTOR.package == "v1"
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["PodResourcesLister"].methods] == \
        ["List", "GetAllocatableResources", "Get"]


# ---------------------------------------------------------------------------- Kubernetes


def test_kubelet_allocations_over_the_real_proto(node):
    _, logs, cg, sock = node
    kubelet = FakeKubelet(PODS, allocatable=[("nvidia.com/gpu", [GPU0, f"{GPU1}::0", f"{GPU1}::1", GPU2])])
    server = serve(sock, kubelet)
    source = kubelet_source(logs, cg, sock)
    try:
        answer = source.read()
        stub = pb_grpc.PodResourcesListerStub(source._channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Get(pb.GetPodResourcesRequest(pod_name="trainer-0", pod_namespace="team-a"), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        source.close()
        server.stop(None)
    assert answer.source == "kubernetes" and answer.judges_host_processes
    trainer = answer.devices[GPU0]
    assert trainer == [Holder("kubernetes", namespace="team-a", pod="trainer-0", pod_uid=UID_A, container="main",
                              resource="nvidia.com/gpu")]
    assert "fpga0" not in answer.devices, "only GPU resources count"
    assert GPU2 not in answer.devices, "a finished pod (no cgroup left) holds nothing"
    assert [h.pod for h in answer.devices[f"{GPU1}::0"] + answer.devices[f"{GPU1}::1"]] == ["sliced-0", "sliced-1"]
    assert answer.devices[f"MIG-{MIG_PARENT[4:]}-0"][0].resource == "nvidia.com/mig-1g.10gb"
    assert answer.devices["nvidia3/gi8"][0].pod == "gke-mig"
    assert answer.managed is not None and GPU0 in answer.managed


def test_old_kubelet_without_allocatable_counts_every_gpu_as_managed(node):
    _, logs, cg, sock = node
    server = serve(sock, FakeKubelet(PODS[:1], allocatable=None))
    source = kubelet_source(logs, cg, sock)
    try:
        assert source.read().managed is None
        assert source.read().devices[GPU0][0].pod == "trainer-0"  # asked once; not asked again
    finally:
        source.close()
        server.stop(None)


def test_kubelet_restart_is_said_once_marked_stale_and_survived_without_a_new_channel(node, caplog):
    _, logs, cg, sock = node
    now = [1000.0]
    server = serve(sock, FakeKubelet(PODS[:1], allocatable=None))
    source = kubelet_source(logs, cg, sock)
    view = SchedulerView(source, refresh_s=5, stale_after_s=30, clock=lambda: now[0])
    channel = source._channel
    try:
        assert view.refresh()
        assert view.snapshot()[1] == "current"
        server.stop(None).wait()
        if sock.exists():
            sock.unlink()  # the kubelet removes and recreates its socket
        with caplog.at_level(logging.WARNING, logger="agents.scheduler"):
            for _ in range(3):
                now[0] += 5
                assert not view.refresh()
        assert sum("did not answer" in r.getMessage() for r in caplog.records) == 1, "said once, not per refresh"
        answer, state, age = view.snapshot()
        assert answer is not None and answer.devices[GPU0][0].pod == "trainer-0", "the last answer is kept"
        assert state == "current" and age == 15
        now[0] += 20
        assert view.snapshot()[1] == "stale"
        server = serve(sock, FakeKubelet(PODS[:2], allocatable=None))
        for _ in range(100):  # gRPC reconnects with backoff (capped at 5 s); the channel stays the same object
            if view.refresh():
                break
            time.sleep(0.1)
        assert view.snapshot()[1] == "current" and source._channel is channel
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        view.close()
        server.stop(None)


def test_live_pods_from_the_cgroup_tree_every_driver(tmp_path):
    u = "88888888-1111-4111-8111-000000000008"
    (tmp_path / "v2" / "kubepods.slice" / "kubepods-pod" f"{u.replace('-', '_')}.slice").mkdir(parents=True)
    (tmp_path / "v1" / "memory" / "kubepods" / "besteffort" / f"pod{UID_A}" / CID).mkdir(parents=True)
    (tmp_path / "root" / "custom" / "kubepods" / f"pod{UID_B}").mkdir(parents=True)
    (tmp_path / "v1" / "memory" / "system.slice" / "sshd.service").mkdir(parents=True)
    assert live_pod_uids(str(tmp_path / "v2")) == {u}
    assert live_pod_uids(str(tmp_path / "v1")) == {UID_A}
    assert live_pod_uids(str(tmp_path / "root")) == {UID_B}
    assert live_pod_uids(str(tmp_path / "absent")) == set()


# ---------------------------------------------------------------------------- the collector


def write_proc(root: Path, pid: int, exe: str, cgroup: str, ppid: int = 1) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    name = exe.rsplit("/", 1)[-1][:15]
    (d / "stat").write_text(f"{pid} ({name}) S {ppid} " + " ".join(["0"] * 18) + " 100 0 0\n")
    (d / "comm").write_text(name + "\n")
    (d / "cmdline").write_bytes(exe.encode() + b"\0train.py\0")
    (d / "cgroup").write_text(cgroup)
    os.symlink(exe, d / "exe")


def pod_cgroup(uid: str, qos: str = "burstable") -> str:
    return f"0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid.replace('-', '_')}.slice/" \
           f"cri-containerd-{CID}.scope\n"


def fleet_nvml() -> FakeNvml:
    mig = mig_gpu(MIG_PARENT, 2)
    gke = mig_gpu("GPU-00000000-0000-4000-8000-0000000000b2", 2)
    gke.minor, mig.minor = 3, 5  # minor numbers need not follow NVML order
    return FakeNvml([FakeGpu(GPU0, gpu_pct=95, processes=[FakeProcess(2000)]),
                     FakeGpu(GPU1, gpu_pct=90, processes=[FakeProcess(2100), FakeProcess(2200)]),
                     FakeGpu(GPU2, gpu_pct=100, processes=[FakeProcess(3000)]), mig, gke])


def test_collector_resolves_every_device_id_form_and_tags_owners(node):
    tmp, logs, cg, sock = node
    proc = tmp / "proc"
    write_proc(proc, 2000, "/opt/conda/envs/llm/bin/python3.11", pod_cgroup(UID_A))
    write_proc(proc, 2100, "/usr/bin/python3", pod_cgroup(UID_SHARE))
    write_proc(proc, 2200, "/usr/bin/python3", pod_cgroup("55555555-eeee-4eee-8eee-000000000005"))
    write_proc(proc, 3000, "/usr/bin/python3", pod_cgroup(UID_B, "besteffort"))  # the notebook, on GPU2
    server = serve(sock, FakeKubelet(PODS, allocatable=None))
    pods = PodNames(str(logs))
    view = SchedulerView(kubelet_source(logs, cg, sock))
    col = GpuCollector("node-1", nvml=fleet_nvml().module(), procfs=ProcFS(proc), scheduler=view, pods=pods)
    try:
        assert col.start()
        events = [c.validate_or_raise(e) for e in col.collect(1_790_000_000.0)]
    finally:
        col.close()
        server.stop(None)
    by_uuid = {e["gpu"]["uuid"]: e for e in events}

    def holders(uuid):
        return [h.get("pod") for h in by_uuid[uuid]["gpusentry"]["allocation"]["owners"]]

    assert holders(GPU0) == ["trainer-0"]
    assert holders(GPU1) == ["sliced-0", "sliced-1"], "time-slicing replicas ::N name the same GPU"
    assert holders(GPU2) == [], "the finished pod's GPU is free"
    assert holders(f"MIG-{MIG_PARENT[4:]}-0") == ["mig-0"] and holders(f"MIG-{MIG_PARENT[4:]}-1") == []
    assert holders("MIG-00000000-0000-4000-8000-0000000000b2-1") == ["gke-mig"], "nvidia3/gi8: minor 3, instance 8"
    assert holders("MIG-00000000-0000-4000-8000-0000000000b2-0") == []
    alloc = by_uuid[GPU0]["gpusentry"]["allocation"]
    assert alloc["source"] == "kubernetes" and alloc["state"] == "current"
    owner = by_uuid[GPU2]["gpu"]["processes"][0]["owner"]
    assert owner == {"kind": "kubernetes", "pod_uid": UID_B, "namespace": "team-b", "pod": "notebook-7",
                     "container_id": CID}

    # The detectors' verdicts on exactly these events: the notebook that requested no GPU computes on GPU2
    # (held by nobody) -> high once the grace has passed; the trainer and the time-sliced pair are fine.
    engine = Engine(strict=True)
    alerts = []
    for step in range(4):
        for e in events:
            e2 = dict(e, **{"@timestamp": c.format_timestamp(1_790_000_000.0 + 10 * step),
                            "event": dict(e["event"], id=f"{e['event']['id']}-{step}")})
            alerts += engine.process(e2)
    opened = [a for a in alerts if a["gpusentry"]["alert"]["status"] == "open"]
    assert opened and {a["gpusentry"]["alert"]["severity"] for a in opened} >= {"high"}
    messages = " ".join(str(m.get("summary")) for a in alerts for m in a["gpusentry"]["alert"]["evidence"])
    assert "notebook-7" in messages and "trainer-0 holds" not in messages
    assert "sliced" not in messages.replace("GPU-", "")


def test_no_scheduler_source_leaves_samples_as_they_were(tmp_path):
    col = GpuCollector("h", nvml=FakeNvml([FakeGpu(GPU0)]).module(), procfs=ProcFS(tmp_path))
    assert col.start()
    [event] = col.collect(1_790_000_000.0)
    assert "gpusentry" not in event


# ---------------------------------------------------------------------------- Slurm

SCONTROL = """JobId=4242 JobName=llm-sft
   UserId=alice(1001) GroupId=alice(1001) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   NodeList=gpu[01-02]
   TRES=cpu=32,mem=256G,node=2,billing=32,gres/gpu=6
   JOB_GRES=gpu:a100:6
     Nodes=gpu01 CPU_IDs=0-15 Mem=131072 GRES=gpu:a100:4(IDX:0-3)
     Nodes=gpu02 CPU_IDs=0-15 Mem=131072 GRES=gpu:a100:2(IDX:1,3)
   MinCPUsNode=1 MinMemoryNode=128G
"""


def test_scontrol_parsing_and_hostlists():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    holder, ids = parse_scontrol_job(SCONTROL, "gpu02.cluster.example")
    assert (holder.job_id, holder.user, holder.job_name) == ("4242", "alice", "llm-sft")
    assert ids == ["index:1", "index:3"]
    assert parse_scontrol_job(SCONTROL, "gpu01")[1] == ["index:0", "index:1", "index:2", "index:3"]
    assert parse_scontrol_job(SCONTROL, "gpu09")[1] == []
    assert parse_scontrol_job("slurm_load_jobs error: Invalid job id specified", "gpu01") is None


def slurm_tree(root: Path) -> Path:
    cg = root / "cgroup"
    (cg / "system.slice" / "slurmstepd.scope" / "system").mkdir(parents=True)
    (cg / "system.slice" / "slurmstepd.scope" / "job_4242" / "step_0" / "user" / "task_0").mkdir(parents=True)
    (cg / "system.slice" / "slurmstepd.scope" / "job_4300" / "step_batch").mkdir(parents=True)  # no GPUs
    return cg


def fake_scontrol(root: Path) -> Path:
    bin_ = root / "scontrol"
    bin_.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show job -d' ] || exit 2\n"
                    f"case \"$4\" in 4242) cat <<'EOF'\n{SCONTROL}EOF\n;;\n"
                    "4300) printf 'JobId=4300 JobName=prep\\n   UserId=bob(1002)\\n'\n"
                    "printf '     Nodes=gpu02 CPU_IDs=0-3 Mem=1024 GRES=\\n';;\n"
                    "*) echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1;; esac\n")
    bin_.chmod(0o755)
    return bin_


def test_slurm_v2_jobs_from_cgroups_and_scontrol_asked_once_per_job(tmp_path):
    cg = slurm_tree(tmp_path)
    scontrol = fake_scontrol(tmp_path)
    source = SlurmSource(cgroup_root=str(cg), scontrol=str(scontrol), map_dir=str(tmp_path / "none"), node="gpu02")
    answer = source.read()
    assert answer.complete and answer.source == "slurm"
    assert [h.job_id for h in answer.devices["index:1"]] == ["4242"] and "index:0" not in answer.devices
    scontrol.write_text("#!/bin/sh\nexit 1\n")  # a job's GPUs do not change: not asked again
    assert source.read().devices["index:3"][0].user == "alice"
    # A new job whose GPUs cannot be read makes the whole answer incomplete (reported stale), not "free".
    (cg / "system.slice" / "slurmstepd.scope" / "job_9999").mkdir()
    assert not source.read().complete


def test_slurm_sluid_paths_prolog_map_and_v1_devices_list(tmp_path):
    cg = tmp_path / "cgroup"
    sluid = "sA7Bq2Xk9"
    (cg / "system.slice" / "slurmstepd.scope" / sluid / "step_0").mkdir(parents=True)
    v1 = cg / "devices" / "slurm" / "uid_1001" / "job_77" / "step_0"
    v1.mkdir(parents=True)
    (v1.parent / "devices.list").write_text("c 195:255 rwm\nc 195:1 rwm\nc 195:0 rwm\nb 8:0 r\n")
    jobs = live_slurm_jobs(str(cg))
    assert set(jobs) == {sluid, "77"} and jobs["77"].uid == 1001
    assert read_devices_list(str(v1.parent / "devices.list")) == ["minor:1", "minor:0"]

    maps = tmp_path / "map"
    env = dict(os.environ, SLURM_JOB_ID=sluid, SLURM_JOB_USER="carol", SLURM_JOB_NAME="eval run",
               SLURM_JOB_GPUS="0,2", GPUSENTRY_SLURM_MAP_DIR=str(maps),
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\n# --query-gpu=uuid --format=csv,noheader -i 0,2\n"
                   f"[ \"$4\" = '0,2' ] && printf '{GPU0}\\n{GPU2}\\n'\n")
    smi.chmod(0o755)
    subprocess.run([str(REPO / "deploy" / "slurm" / "prolog.sh")], env=env, check=True)
    source = SlurmSource(cgroup_root=str(cg), scontrol="/nonexistent/scontrol", map_dir=str(maps), node="n1")
    answer = source.read()
    assert [h.user for h in answer.devices[GPU0]] == ["carol"] and answer.devices[GPU0][0].job_id == sluid
    assert answer.devices[GPU2][0].job_name == "evalrun"
    assert [h.job_id for h in answer.devices["minor:0"]] == ["77"], "cgroup v1 devices.list, no scontrol"
    subprocess.run([str(REPO / "deploy" / "slurm" / "epilog.sh")], env=env, check=True)
    assert not any(maps.iterdir())


# ---------------------------------------------------------------------------- Docker


def docker_container(root: Path, cid: str, name: str, *, running: bool = True, requests=None, runtime="runc",
                     env=()) -> None:
    d = root / "containers" / cid
    d.mkdir(parents=True)
    import json

    (d / "config.v2.json").write_text(json.dumps({"Name": f"/{name}", "State": {"Running": running},
                                                  "Config": {"Image": "img", "Env": list(env)}}))
    (d / "hostconfig.json").write_text(json.dumps({"Runtime": runtime, "DeviceRequests": requests}))


def test_docker_gpus_from_device_requests_and_the_nvidia_runtime(tmp_path):
    gpu_cap = [["gpu"]]
    docker_container(tmp_path, "a" * 64, "all-gpus", requests=[{"Driver": "", "Count": -1, "Capabilities": gpu_cap}])
    docker_container(tmp_path, "b" * 64, "two", requests=[{"Count": 0, "DeviceIDs": ["0", GPU1],
                                                           "Capabilities": gpu_cap}])
    docker_container(tmp_path, "c" * 64, "env", runtime="nvidia", env=["NVIDIA_VISIBLE_DEVICES=2", "X=1"])
    docker_container(tmp_path, "d" * 64, "none", runtime="runc", env=["NVIDIA_VISIBLE_DEVICES=all"])
    docker_container(tmp_path, "e" * 64, "stopped", running=False, requests=[{"Count": -1, "Capabilities": gpu_cap}])
    answer = DockerSource(str(tmp_path)).read()
    assert not answer.judges_host_processes
    assert [h.container for h in answer.devices["all"]] == ["all-gpus"]
    assert [h.container for h in answer.devices["index:0"]] == ["two"] and answer.devices[GPU1][0].container == "two"
    assert answer.devices["index:2"][0].resource == "--runtime=nvidia"
    assert not any(h.container in ("none", "stopped") for hs in answer.devices.values() for h in hs), \
        "NVIDIA_VISIBLE_DEVICES without the nvidia runtime grants nothing; a stopped container holds nothing"


def test_auto_mode_picks_what_the_node_has(tmp_path):
    s = SchedulerSettings(kubelet_socket=str(tmp_path / "no.sock"), cgroup_root=str(tmp_path / "cg"),
                          scontrol="/nonexistent/scontrol")
    assert build_source(s, docker_root=str(tmp_path / "docker"), pods=None, node="n") is None
    (tmp_path / "docker" / "containers").mkdir(parents=True)
    assert isinstance(build_source(s, docker_root=str(tmp_path / "docker"), pods=None, node="n"), DockerSource)
    (tmp_path / "cg" / "system.slice" / "slurmstepd.scope").mkdir(parents=True)
    assert isinstance(build_source(s, docker_root=str(tmp_path / "docker"), pods=None, node="n"), SlurmSource)
    with pytest.raises(SourceError, match="docker_root"):
        build_source(s.model_copy(update={"mode": "docker"}), docker_root=None, pods=None, node="n")


def test_a_source_that_fails_unexpectedly_is_counted_and_logged_not_fatal(caplog):
    class Broken:
        name = "broken"

        def read(self) -> Allocation:
            raise KeyError("bug")

        def close(self) -> None:
            pass

    view = SchedulerView(Broken(), refresh_s=0.01)
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError):
        view.refresh()  # called directly, a bug surfaces
    view._thread = None
    import threading

    view._stop = threading.Event()
    t = threading.Thread(target=view._loop, daemon=True)
    t.start()
    time.sleep(0.1)
    view._stop.set()
    t.join(2)
    assert view.failures >= 1 and any("failed unexpectedly" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- --explain


def test_explain_prints_each_gpu_its_holders_processes_and_verdicts(node, monkeypatch):
    tmp, logs, cg, sock = node
    proc = tmp / "proc"
    write_proc(proc, 2000, "/opt/conda/envs/llm/bin/python3.11", pod_cgroup(UID_A))
    write_proc(proc, 3000, "/usr/bin/python3\x1b[2J", pod_cgroup(UID_B, "besteffort"))
    server = serve(sock, FakeKubelet(PODS, allocatable=None))
    cfg = Config.model_validate({"agent": {"host_name": "node-1", "pod_logs_dir": str(logs), "scheduler": {
        "mode": "kubernetes", "kubelet_socket": str(sock), "cgroup_root": str(cg)}}})
    from agents.explain import explain

    out = io.StringIO()
    nvml = FakeNvml([FakeGpu(GPU0, gpu_pct=95, processes=[FakeProcess(2000)]),
                     FakeGpu(GPU1, processes=[]), FakeGpu(GPU2, gpu_pct=99, processes=[FakeProcess(3000)])])
    try:
        assert explain(cfg, out, nvml=nvml.module(), procfs=ProcFS(proc)) == 0
    finally:
        server.stop(None)
    text = out.getvalue()
    assert "scheduler: kubernetes, current" in text
    assert "held by: pod team-a/trainer-0 (container main)  [kubernetes, current]" in text
    assert "pid 2000  /opt/conda/envs/llm/bin/python3.11  owner: pod team-a/trainer-0  -> inside" in text
    assert "OUTSIDE its allocation (pod team-b/notebook-7 was not allocated this GPU; no pod was)" in text
    assert "\x1b" not in text and "\\x1b[2J" in text, "host text never reaches the terminal as a control sequence"


def test_cli_explain_without_gpu_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gpusentry.cli", "agent", "--explain"], capture_output=True,
                          text=True, env=dict(os.environ, GPUSENTRY_AGENT__SCHEDULER__MODE="none"), timeout=60)
    assert done.returncode == 1 and "no GPU" in done.stdout, done.stdout + done.stderr
