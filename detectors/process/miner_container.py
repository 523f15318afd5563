"""A miner started as a container: ``docker|podman|nerdctl run``, ``kubectl run|create``, ``ctr run``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import argv, basename, process_fields, segments
from detectors.process._miners import KNOWLEDGE
from detectors.process.miner_flags import POOL_URL, WALLET, miner_evidence
from gpusentry.contract import Dataset, event_time

_ENGINE_CLIS = frozenset({"docker", "podman", "nerdctl"})
# `docker run` options that take a value (the next argument unless written --opt=value).
_RUN_VALUE_OPTIONS = frozenset({
    "-e", "--env", "--env-file", "-v", "--volume", "-p", "--publish", "--name", "-w", "--workdir", "-u", "--user",
    "--entrypoint", "--network", "--net", "--runtime", "--gpus", "--device", "-m", "--memory", "--cpus",
    "--cpuset-cpus", "--cpu-shares", "-c", "--restart", "-l", "--label", "--mount", "--hostname", "-h", "--ulimit",
    "--cap-add", "--cap-drop", "--security-opt", "--pid", "--ipc", "--shm-size", "--log-driver", "--log-opt",
    "--add-host", "--dns", "--platform", "--pull", "--stop-signal", "--tmpfs", "--group-add", "-a", "--attach",
    "--cidfile", "--ip", "--mac-address", "--pids-limit", "--userns", "--uts", "--volumes-from", "--link",
    "--expose", "--cgroup-parent", "--cgroupns", "--memory-swap", "--health-cmd", "--label-file", "--annotation",
})
_ENGINE_GLOBAL_VALUE_OPTIONS = frozenset({"-H", "--host", "--context", "--config", "-l", "--log-level",
                                          "--namespace", "-n", "--address", "-a", "--url", "--connection"})
_KUBECTL_VALUE_OPTIONS = frozenset({"-n", "--namespace", "--context", "--kubeconfig", "--cluster", "--user", "-l",
                                    "--labels", "--overrides", "--restart", "--port", "--serviceaccount", "-o",
                                    "--output", "--requests", "--limits", "--annotations", "--pod-running-timeout"})
_CTR_VALUE_OPTIONS = frozenset({"--env", "--env-file", "--mount", "--label", "--runtime", "--snapshotter",
                                "--gpus", "--cpus", "--memory-limit", "--user", "--cwd", "--net-host-override",
                                "--device", "--cni-config", "--platform", "--runc-binary"})


@dataclass
class Launch:
    """What a container CLI was asked to start."""

    image: str
    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    gpu: str | None = None  # how GPUs were requested, if they were


def _value(args: list[str], i: int) -> tuple[str | None, int]:
    a = args[i]
    if "=" in a and a.startswith("--"):
        return a.split("=", 1)[1], i + 1
    return (args[i + 1], i + 2) if i + 1 < len(args) else (None, i + 1)


def _engine_run(args: list[str]) -> Launch | None:
    i = 1
    while i < len(args) and args[i].startswith("-"):  # global options before the subcommand
        i = _value(args, i)[1] if args[i].split("=", 1)[0] in _ENGINE_GLOBAL_VALUE_OPTIONS else i + 1
    sub = args[i:i + 2]
    if sub[:1] in (["run"], ["create"]):
        i += 1
    elif sub in (["container", "run"], ["container", "create"]):
        i += 2
    else:
        return None
    env: list[str] = []
    gpu: str | None = None
    entrypoint: str | None = None
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        opt = args[i].split("=", 1)[0]
        if opt in _RUN_VALUE_OPTIONS:
            value, i = _value(args, i)
            if value is None:
                return None
            if opt in ("-e", "--env"):
                env.append(value)
            elif opt == "--gpus" or (opt == "--runtime" and value == "nvidia") or (
                    opt == "--device" and ("nvidia" in value or "gpu" in value)):
                gpu = f"{opt} {value}"
            elif opt == "--entrypoint":
                entrypoint = value
        else:
            i += 1
    if i >= len(args):
        return None
    command = args[i + 1:]
    if entrypoint:
        command = [entrypoint, *command]
    return Launch(args[i], command, env, gpu)


def _kubectl(args: list[str]) -> Launch | None:
    rest = list(args[1:])
    if "--" in rest:
        k = rest.index("--")
        rest, command = rest[:k], rest[k + 1:]
    else:
        command = []
    # One pass: the subcommand words (without the values of options around them: -n ml run ...), the image and
    # the environment.
    words: list[str] = []
    image, env, i = None, [], 0
    while i < len(rest):
        a = rest[i]
        opt = a.split("=", 1)[0]
        if not a.startswith("-"):
            words.append(a)
            i += 1
        elif opt in ("--image", "--env"):
            value, i = _value(rest, i)
            if value is not None and opt == "--image":
                image = value
            elif value is not None:
                env.append(value)
        else:
            i = _value(rest, i)[1] if opt in _KUBECTL_VALUE_OPTIONS and "=" not in a else i + 1
    if not (words[:1] == ["run"] or words[:2] in (["create", "job"], ["create", "deployment"],
                                                   ["create", "cronjob"])):
        return None
    return Launch(image, command, env) if image else None


def _ctr(args: list[str]) -> Launch | None:
    i = 1
    while i < len(args) and args[i].startswith("-"):
        i = _value(args, i)[1] if args[i].split("=", 1)[0] in ("-n", "--namespace", "-a", "--address") else i + 1
    if args[i:i + 1] == ["run"]:
        i += 1
    elif args[i:i + 2] in (["c", "create"], ["containers", "create"], ["container", "create"]):
        i += 2
    else:
        return None
    env, gpu = [], None
    while i < len(args) and args[i].startswith("-"):
        opt = args[i].split("=", 1)[0]
        if opt in _CTR_VALUE_OPTIONS:
            value, i = _value(args, i)
            if opt == "--env" and value:
                env.append(value)
            elif opt == "--gpus" and value is not None:
                gpu = f"--gpus {value}"
        else:
            i += 1
    if i + 1 >= len(args):
        return None
    return Launch(args[i], args[i + 2:], env, gpu)  # ctr run IMAGE ID [COMMAND...]


def container_launch(args: list[str]) -> Launch | None:
    """The image, command, environment and GPU request of a container start on this command line, if any."""
    if not args:
        return None
    name = basename(args[0])
    if name in _ENGINE_CLIS:
        return _engine_run(args)
    if name == "kubectl":
        return _kubectl(args)
    if name == "ctr":
        return _ctr(args)
    return None


def launch_evidence(launch: Launch) -> tuple[list[str], list[str]]:
    """(strong, medium) reasons why this container start is a miner's."""
    strong: list[str] = []
    medium: list[str] = []
    why = KNOWLEDGE.image(launch.image)
    if why:
        strong.append(why)
    if launch.command:
        family = KNOWLEDGE.family(basename(launch.command[0]))
        if family is not None and not KNOWLEDGE.generic(basename(launch.command[0])):
            strong.append(f"runs the {family} miner")
        s, m, w = miner_evidence(["container", *launch.command])
        strong += s
        medium += m + ([f"with {', '.join(w[:2])}"] if m and w else [])
    for entry in launch.env:
        value = entry.split("=", 1)[1] if "=" in entry else entry
        if POOL_URL.match(value):
            strong.append(f"pool URL in its environment ({entry.split('=', 1)[0]})")
        elif WALLET.match(value):
            medium.append(f"wallet address in its environment ({entry.split('=', 1)[0]})")
    return strong, medium


class MinerContainer(Detector):
    id = "process.miner_container"
    title = "Miner started as a container"
    description = ("A container CLI (docker, podman, nerdctl, kubectl run/create, ctr run) started a container "
                   "whose image is a known miner image or is named after a miner family "
                   "(detectors/process/miners.toml), whose command runs a miner or carries miner flags, or whose "
                   "environment carries a pool URL or a wallet address. A GPU request (--gpus, "
                   "--runtime=nvidia, an nvidia device) is named in the finding.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1610/", "https://attack.mitre.org/techniques/T1496/001/")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.MINER_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("xmrig image with GPUs", True,
                [proc("docker run -d --gpus all --restart always xmrig/xmrig:6.21.0 -o pool.example.org:3333")]),
        Example("Kubeflow campaign image", True, [proc("kubectl run svc --image=ddsfdfsaadfs/dfsdf:99")]),
        Example("ubuntu image running a renamed miner with a pool URL", True,
                [proc("podman run --rm -e POOL=stratum+tcp://pool.example.net:4444 ubuntu:22.04 /opt/w/run")]),
        Example("kubectl job with miner flags after --", True,
                [proc("kubectl create job gpu-burn --image=nvidia/cuda:12.2.0-base-ubuntu22.04 -- /w/agent "
                      "--algo kawpow -o stratum+ssl://rvn.example.org:5555")]),
        Example("ctr run of a miner image", True,
                [proc("ctr -n k8s.io run --gpus 0 docker.io/someone/t-rex:latest job1 t-rex -a kawpow")]),
        Example("training container on the GPUs", False,
                [proc("docker run --gpus all --rm -v /data:/data nvcr.io/nvidia/pytorch:24.01-py3 "
                      "python train.py --epochs 10")]),
        Example("pulling a miner image to scan it", False, [proc("docker pull xmrig/xmrig:latest")]),
        Example("a scanner run on a miner image", False,
                [proc("docker run --rm aquasec/trivy image xmrig/xmrig:latest")]),
        Example("inspecting a miner container", False, [proc("docker logs xmrig")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        for seg in segments(argv(p)):
            launch = container_launch(seg)
            if launch is None:
                continue
            strong, medium = launch_evidence(launch)
            if not strong and not medium:
                continue
            high = bool(strong) or launch.gpu is not None or len(medium) >= 2
            gpu = f"; GPUs requested ({launch.gpu})" if launch.gpu else ""
            return [self.finding(event, f"{basename(seg[0])} starts a miner container from {launch.image} (pid "
                                 f"{p['pid']}): {'; '.join((strong + medium)[:3])}{gpu}",
                                 timestamp=event_time(event), severity="high" if high else "medium",
                                 score=0.95 if high else 0.6,
                                 fields={**process_fields(event), "container.image.name": launch.image})]
        return ()
