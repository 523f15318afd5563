"""Reaching into the network: sweeps of internal hosts and ports, control-plane ports, scanners, metadata services."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.examples import flow, proc
from detectors.network._payload import decode_payload, flow_fields
from detectors.process._cmdline import argv, basename, process_fields, redact
from detectors.process.tunnel import context
from detectors.sandbox._base import LineageDetector, first_in
from detectors.sandbox._lineage import Lineage, shared_lineage
from gpusentry.contract import Dataset, as_dict, event_time, get
from gpusentry.knowledge import load_entries, resolve
from gpusentry.settings.detection import DetectionSettings

PROBING_FILE = Path(__file__).with_name("probing.toml")
# Programs whose contact with a control-plane port is someone typing, not a component doing its job.
GENERIC_CLIENTS = frozenset({"curl", "wget", "nc", "ncat", "netcat", "socat", "telnet", "bash", "sh", "python",
                             "python3", "perl", "ruby", "node", "redis-cli", "etcdctl", "docker"})
MAX_TRACKED_PIDS = 2048
MAX_PROGRAMS = 1024
REPEAT_S = 600.0
# The examples' site: sweeps of 5 targets, a 2-minute learning period (short examples, same logic).
SMALL_SITE = {"network": {"sweep_min_targets": 5, "sweep_warmup_s": 120}}


@dataclass(frozen=True)
class Probing:
    metadata_ips: dict[str, str]  # address -> provider id
    metadata_domains: dict[str, str]
    credential_paths: tuple[str, ...]
    control_ports: dict[int, str]
    scanners: dict[str, str]


@lru_cache(maxsize=4)
def load_probing(path: Path | None = None) -> Probing:
    path = path or resolve(PROBING_FILE)
    meta = load_entries(path, "metadata", required={"id": str, "addresses": list},
                        optional={"domains": list, "credential_paths": list})
    ports = load_entries(path, "control_port", required={"port": int, "service": str})
    scanners = load_entries(path, "scanner", required={"id": str, "names": list})
    ips: dict[str, str] = {}
    for m in meta:
        for a in m["addresses"]:
            ips.setdefault(str(ipaddress.ip_address(a)), m["id"])
    return Probing(ips, {d: m["id"] for m in meta for d in m.get("domains", ())},
                   tuple(p for m in meta for p in m.get("credential_paths", ())),
                   {p["port"]: p["service"] for p in ports}, {n: s["id"] for s in scanners for n in s["names"]})


def http_target(data: bytes | None) -> tuple[str, str] | None:
    """(method, path) of an HTTP/1.x request's first line."""
    if not data:
        return None
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) == 3 and parts[2].startswith(b"HTTP/") and parts[0].isalpha() and parts[0].isupper():
        return parts[0].decode("ascii", "replace"), parts[1][:256].decode("ascii", "replace")
    return None


@dataclass
class Window:
    start: float
    targets: set[tuple[str, int]] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    flagged: bool = False


@dataclass
class ProbeState:
    lineage: Lineage
    windows: dict[int, tuple[str, Window]] = field(default_factory=dict)  # pid -> (program, window)
    fanout: dict[str, int] = field(default_factory=dict)  # program -> largest unflagged window it reached
    first_flow_at: float | None = None  # the host's first flow (event time): the learning period starts here
    reported: dict[str, float] = field(default_factory=dict)


class InternalProbe(LineageDetector):
    id = "network.internal_probe"
    title = "Internal probing or cloud-metadata access"
    description = ("One process reaching many distinct internal hosts or ports within `sweep_window_s` (a sweep: "
                   "a Python or Node loop counts the same as nmap), connection attempts to control-plane ports "
                   "(kubelet, etcd, the Docker and Kubernetes APIs, Redis, Ray), network scanners (nmap, masscan, "
                   "zmap, rustscan, naabu, ...) and cloud metadata services (169.254.169.254, fd00:ec2::254, "
                   "100.100.100.200, metadata.google.internal, Azure IMDS), credential paths above all. Each "
                   "program's normal fan-out is learned (Prometheus scraping, a mesh sidecar, an inventory job): it "
                   "sweeps only past `sweep_learned_factor` times its largest window, and flagged windows are not "
                   "learned. From an agent sandbox any sweep, control-plane attempt, scanner or metadata read is "
                   "high; elsewhere a sweep is medium, a credential read, scanner or hand-made control-plane "
                   "contact low. Knowledge is data (detectors/network/probing.toml).")
    severity = "high"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1046/", "https://attack.mitre.org/techniques/T1552/005/",
                  "https://kubernetes.io/docs/reference/networking/ports-and-protocols/")
    datasets = frozenset({Dataset.NETWORK, Dataset.PROCESS})
    signal = Signal.PROBING

    examples: ClassVar[list[Example]] = [
        Example("metadata credentials read from a sandbox", True, [
            proc("python -m ipykernel_launcher -f kernel-2.json", pid=300, parent="jupyter-lab", name="python"),
            proc("curl -s http://169.254.169.254/latest/meta-data/iam/security-credentials/", pid=301,
                 parent="python", parent_pid=300, t=1),
            flow(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
                 dst="169.254.169.254", dport=80, pid=301, process_name="curl", t=1.2)]),
        Example("Alibaba metadata from a sandbox", True, [
            proc("/tmp/rocklet-venv/bin/rocklet --port 8000", pid=50, parent="sh", name="rocklet"),
            proc("python3 probe.py", pid=52, parent="rocklet", parent_pid=50, t=2),
            flow(b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n", dst="100.100.100.200", dport=80, pid=52, t=3)]),
        Example("python sweep of the subnet's SSH ports", True, [
            flow(None, dst="10.0.0.2", dport=443, pid=1, process_name="kubelet"),  # the host's first flow
            *[flow(None, dst=f"10.0.7.{i}", dport=22, sport=40000 + i, pid=777, process_name="python3",
                   t=900 + i * 0.5) for i in range(1, 7)]], SMALL_SITE),
        Example("kubelet API from a sandbox", True, [
            proc("python -m ipykernel_launcher -f kernel-9.json", pid=300, parent="jupyter-lab", name="python"),
            proc("curl -sk https://10.0.0.1:10250/pods", pid=310, parent="python", parent_pid=300, t=1),
            flow(None, dst="10.0.0.1", dport=10250, pid=310, process_name="curl", t=1.1)]),
        Example("nmap from a sandbox", True, [
            proc("/usr/bin/envd", pid=10, parent="init", name="envd"),
            proc("/bin/bash -l -c 'nmap -sT -p 22,2375,10250 10.0.0.0/24'", pid=11, parent="envd", parent_pid=10),
            proc("nmap -sT -p 22,2375,10250 10.0.0.0/24", pid=12, parent="bash", parent_pid=11, t=0.1)]),
        Example("Prometheus scraping its usual targets, past the learning period", False, [
            flow(None, dst=f"10.1.0.{i + 2}", dport=9100, sport=30000 + i + 20 * w, pid=900,
                 process_name="prometheus", t=w * 120 + i * 0.2) for w in range(3) for i in range(8)], SMALL_SITE),
        Example("cloud agent reading instance metadata", False,
                [flow(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n", dst="169.254.169.254", dport=80,
                      process_name="amazon-ssm-agen")]),
        Example("kubelet talking to the API server", False,
                [flow(None, dst="10.0.0.1", dport=6443, process_name="kubelet")]),
        Example("a few connections to internal services", False,
                [flow(None, dst=f"10.2.0.{i}", dport=5432, sport=41000 + i, pid=555, t=i) for i in range(1, 6)]),
    ]

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        super().__init__(settings)
        self.knowledge = load_probing()
        net = self.settings.network
        self.window_s, self.min_targets, self.factor = net.sweep_window_s, net.sweep_min_targets, net.sweep_learned_factor

    def new_state(self) -> ProbeState:
        return ProbeState(Lineage())

    def new_host_state(self, shared: dict[str, Any]) -> ProbeState:
        return ProbeState(shared_lineage(shared))

    def process(self, event: dict[str, Any], state: ProbeState) -> Iterable[Finding]:
        ts = event_time(event)
        if event["event"]["dataset"] == Dataset.PROCESS.value:
            return self._process(event, state, ts)
        p = as_dict(event.get("process"))
        pid = p.get("pid")
        me = state.lineage.of_pid(pid)
        sandboxed = me is not None and me.sandbox is not None
        dst, port = event["destination"]["ip"], event["destination"]["port"]
        program = str(basename(p.get("executable")) or p.get("name") or "?")
        out: list[Finding] = []
        meta = self._metadata(event, dst)
        if meta is not None:
            provider, path = meta
            credential = path is not None and any(path.startswith(c) for c in self.knowledge.credential_paths)
            if sandboxed or credential:
                sev = "high" if sandboxed else "low"
                what = f"{'credential' if credential else 'metadata'} read from {provider} ({dst}{path or ''})"
                out += self._report(event, state, ts, f"{what} by {program}", sev, f"meta|{pid}|{credential}")
            return out
        if not self.places.is_internal(dst) or self.places.is_local(dst):
            return out
        service = self.knowledge.control_ports.get(port)
        if service is not None and (sandboxed or program in GENERIC_CLIENTS):
            out += self._report(event, state, ts, f"{service} at {dst}:{port} contacted by {program}",
                                "high" if sandboxed else "low", f"ctl|{pid}|{port}")
        if state.first_flow_at is None:
            state.first_flow_at = ts
        if isinstance(pid, int):
            out += self._sweep(event, state, ts, pid, program, sandboxed, dst, port)
        return out

    def _metadata(self, event: dict[str, Any], dst: str) -> tuple[str, str | None] | None:
        provider = self.knowledge.metadata_ips.get(dst)
        domain = get(event, "destination.domain")
        if provider is None and isinstance(domain, str):
            provider = self.knowledge.metadata_domains.get(domain.lower().rstrip("."))
        if provider is None:
            return None
        target = http_target(decode_payload(get(event, "gpusentry.flow.payload_b64")))
        return provider, target[1] if target else None

    def _sweep(self, event: dict[str, Any], state: ProbeState, ts: float, pid: int, program: str, sandboxed: bool,
               dst: str, port: int) -> list[Finding]:
        known = state.windows.get(pid)
        if known is None or known[0] != program or ts - known[1].start > self.window_s or ts < known[1].start:
            if known is not None:
                self._learn(state, *known)
            if len(state.windows) >= MAX_TRACKED_PIDS:
                oldest = min(state.windows, key=lambda k: state.windows[k][1].start)
                self._learn(state, *state.windows.pop(oldest))
            known = state.windows[pid] = (program, Window(ts))
        window = known[1]
        learned = state.fanout.get(program, 0)
        threshold = max(3, self.min_targets // 4) if sandboxed else max(self.min_targets, int(learned * self.factor))
        if len(window.targets) <= 2 * threshold:
            window.targets.add((dst, port))
            window.hosts.add(dst)
        if window.flagged or len(window.targets) < threshold:
            return []
        if not sandboxed and state.first_flow_at is not None and \
                ts - state.first_flow_at < self.settings.network.sweep_warmup_s:
            return []  # still learning what this host's programs fan out to
        window.flagged = True  # scored before learning: a flagged window never becomes the program's normal
        ports = sorted({p for _, p in window.targets})
        sev = "high" if sandboxed else "medium"
        return self._report(event, state, ts, f"{program} (pid {pid}) swept {len(window.hosts)} internal hosts / "
                            f"{len(window.targets)} targets in {ts - window.start:.0f} s (ports "
                            f"{', '.join(map(str, ports[:8]))}{'…' if len(ports) > 8 else ''}; its normal: "
                            f"{learned or 'none seen'})", sev, f"sweep|{pid}|{window.start}")

    def _learn(self, state: ProbeState, program: str, window: Window) -> None:
        if window.flagged:
            return
        if program in state.fanout or len(state.fanout) < MAX_PROGRAMS:
            state.fanout[program] = max(state.fanout.get(program, 0), len(window.targets))

    def _process(self, event: dict[str, Any], state: ProbeState, ts: float) -> list[Finding]:
        me = state.lineage.observe(event, self.matcher, ts)
        if event["event"]["type"] != ["start"]:
            return []
        p = event["process"]
        args = argv(p)
        scanner = self.knowledge.scanners.get(basename(args[0]) if args else "")
        if scanner is None:
            return []
        user = get(event, "user.name")
        where, sandbox_fields = context(me, get(p, "parent.name"))
        if where is None and user in self.settings.network.scanner_users:
            return []
        line = redact(p.get("command_line") or " ".join(args)) or ""
        return [self.finding(event, f"network scanner {scanner}{' from an ' + where if where else ''}: {line[:160]}",
                             timestamp=ts, severity="high" if where else "low", score=0.7,
                             fields={**process_fields(event), **sandbox_fields})]

    def _report(self, event: dict[str, Any], state: ProbeState, ts: float, message: str, severity: str,
                key: str) -> list[Finding]:
        if not first_in(state.reported, key, ts, REPEAT_S):
            return []
        me = state.lineage.of_pid(get(event, "process.pid"))
        where, sandbox_fields = context(me, None)
        if where is not None:
            message += f" from an {where}"
        return [self.finding(event, message, timestamp=ts, severity=severity, score=0.8,
                             fields={**flow_fields(event), **sandbox_fields})]
