"""Tunnels seen on the wire, whatever the binary is called: SSH banners, chisel's WebSocket, tunnel services."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.examples import dns, flow, proc
from detectors.network._payload import decode_payload, flow_fields
from detectors.process.tunnel import context
from detectors.sandbox._base import LineageDetector, first_in
from detectors.sandbox._lineage import Lineage, shared_lineage
from gpusentry.contract import Dataset, as_dict, event_time, get
from gpusentry.knowledge import load_entries, resolve
from gpusentry.settings.detection import DetectionSettings

SERVICES_FILE = Path(__file__).with_name("tunnel_services.toml")
# RFC 4253 4.2: each side first sends "SSH-protoversion-softwareversion"; 1.99 is the compatibility form.
SSH_BANNERS = (b"SSH-2.0-", b"SSH-1.99-")
# chisel asks for its own WebSocket subprotocol when it upgrades (jpillora/chisel share/settings: "chisel-v3").
CHISEL_SUBPROTOCOL = b"sec-websocket-protocol: chisel-"
SSH_CLIENTS = frozenset({"ssh", "scp", "sftp", "autossh", "dbclient", "plink", "rsync", "sshpass", "mosh-client"})
REPEAT_S = 3600.0


@lru_cache(maxsize=4)
def load_services(path: Path | None = None) -> dict[str, str]:
    """Tunnel-service domain -> service id."""
    path = path or resolve(SERVICES_FILE)
    return {d.lower(): e["id"] for e in load_entries(path, "service", required={"id": str, "domains": list})
            for d in e["domains"]}


def service_of(name: str | None, services: dict[str, str]) -> tuple[str, str] | None:
    """(service, matched domain) when ``name`` is a tunnel-service domain or under one (whole labels)."""
    if not isinstance(name, str) or not name:
        return None
    labels = name.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        suffix = ".".join(labels[i:])
        if suffix in services:
            return services[suffix], suffix
    return None


@dataclass
class WireState:
    lineage: Lineage
    reported: dict[str, float] = field(default_factory=dict)


class TunnelWire(LineageDetector):
    id = "network.tunnel_wire"
    title = "Tunnel on the wire (SSH banner, chisel, tunnel service)"
    description = ("A new outbound flow whose first bytes are an SSH version banner (RFC 4253) to a destination "
                   "that is not a configured bastion, a chisel WebSocket upgrade, or a DNS question, TLS SNI or "
                   "destination domain of a tunnel service (TryCloudflare, ngrok, serveo, localhost.run, bore.pub, "
                   "...; data: detectors/network/tunnel_services.toml). Whatever the program is called: a Python "
                   "paramiko client or a renamed ssh count the same. High from an agent sandbox or a service; "
                   "medium for a program that is not an SSH client, chisel or a tunnel service; low for an SSH "
                   "client reaching an outside address on an unusual port.")
    severity = "high"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1572/", "https://www.rfc-editor.org/rfc/rfc4253#section-4.2")
    datasets = frozenset({Dataset.NETWORK, Dataset.DNS, Dataset.PROCESS})
    signal = Signal.TUNNEL

    examples: ClassVar[list[Example]] = [
        Example("SSH banner from a sandbox's python to an outside address", True, [
            proc("/tmp/rocklet-venv/bin/rocklet --port 8000", pid=50, parent="sh", name="rocklet"),
            proc("/bin/bash", pid=51, parent="rocklet", parent_pid=50, t=1),
            proc("python3 tunnel.py", pid=52, parent="bash", parent_pid=51, t=2),
            flow(b"SSH-2.0-paramiko_3.4.0\r\n", dst="198.51.100.23", dport=22, pid=52, t=3)]),
        Example("SSH banner from a renamed binary on 443", True,
                [flow(b"SSH-2.0-OpenSSH_9.6\r\n", dst="203.0.113.44", dport=443, process_name="kworker")]),
        Example("chisel WebSocket upgrade", True, [flow(
            b"GET / HTTP/1.1\r\nHost: 203.0.113.9\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Protocol: chisel-v3\r\n\r\n", dst="203.0.113.9", dport=443, process_name="x")]),
        Example("DNS question for a quick tunnel", True, [dns("random-words-here.trycloudflare.com", ["198.41.200.1"])]),
        Example("ssh to the bastion", False,
                [flow(b"SSH-2.0-OpenSSH_9.6\r\n", dst="192.0.2.10", dport=22, process_name="ssh")],
                {"network": {"bastions": ["192.0.2.10/32"]}}),
        Example("ssh to an internal build host", False,
                [flow(b"SSH-2.0-OpenSSH_9.6\r\n", dst="10.0.4.2", dport=22, process_name="ssh")]),
        Example("git over ssh to a code host on 22", False,
                [flow(b"SSH-2.0-OpenSSH_9.6\r\n", dst="140.82.112.3", dport=22, process_name="ssh")]),
        Example("an ordinary WebSocket", False, [flow(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: graphql-ws\r\n\r\n",
            dst="203.0.113.9", dport=443)]),
        Example("a domain that only ends like one", False, [dns("notngrok.io", ["198.51.100.9"])]),
    ]

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        super().__init__(settings)
        self.services = load_services()

    def new_state(self) -> WireState:
        return WireState(Lineage())

    def new_host_state(self, shared: dict[str, Any]) -> WireState:
        return WireState(shared_lineage(shared))

    def process(self, event: dict[str, Any], state: WireState) -> Iterable[Finding]:
        ts = event_time(event)
        dataset = event["event"]["dataset"]
        if dataset == Dataset.PROCESS.value:
            state.lineage.observe(event, self.matcher, ts)  # lineage only: flows name their process by pid
            return ()
        if dataset == Dataset.DNS.value:
            hit = service_of(event["dns"]["question"]["name"], self.services)
            if hit is None:
                return ()
            pid = get(event, "process.pid")
            return self._service(event, state, ts, hit, pid, f"DNS question {event['dns']['question']['name']}")
        p = as_dict(event.get("process"))
        name_hit = service_of(get(event, "tls.client.server_name"), self.services) or \
            service_of(get(event, "destination.domain"), self.services)
        if name_hit is not None:
            return self._service(event, state, ts, name_hit, p.get("pid"), "flow")
        data = decode_payload(get(event, "gpusentry.flow.payload_b64"))
        if not data:
            return ()
        if data.startswith(SSH_BANNERS):
            return self._ssh(event, state, ts, data)
        if CHISEL_SUBPROTOCOL in data[:512].lower():
            return self._report(event, state, ts, "chisel WebSocket tunnel", "medium", key=f"chisel|{p.get('pid')}")
        return ()

    def _ssh(self, event: dict[str, Any], state: WireState, ts: float, data: bytes) -> list[Finding]:
        dst, port = event["destination"]["ip"], event["destination"]["port"]
        if self.places.is_bastion(dst) or self.places.is_local(dst):
            return []
        p = as_dict(event.get("process"))
        program = str(p.get("name") or "?")
        banner = data.split(b"\r", 1)[0].split(b"\n", 1)[0][:64].decode("ascii", "replace")
        outside = self.places.is_outside(dst)
        me = state.lineage.of_pid(p.get("pid"))
        if me is not None and me.sandbox is not None:
            severity = "high"
        elif program not in SSH_CLIENTS:
            severity = "medium" if outside else "low"
        elif outside and port != 22:
            severity = "low"
        else:
            return []
        return self._report(event, state, ts, f"SSH session ({banner}) by {program} to {dst}:{port}", severity,
                            key=f"ssh|{p.get('pid')}|{dst}")

    def _service(self, event: dict[str, Any], state: WireState, ts: float, hit: tuple[str, str], pid: Any,
                 what: str) -> list[Finding]:
        service, domain = hit
        return self._report(event, state, ts, f"tunnel service {service} ({domain}) in a {what}", "medium",
                            key=f"svc|{service}|{pid}", pid=pid)

    def _report(self, event: dict[str, Any], state: WireState, ts: float, message: str, severity: str, *,
                key: str, pid: Any = None) -> list[Finding]:
        if not first_in(state.reported, key, ts, REPEAT_S):
            return []
        p = as_dict(event.get("process"))
        me = state.lineage.of_pid(pid if pid is not None else p.get("pid"))
        where, sandbox_fields = context(me, None)
        if where is not None:
            severity = "high"
            message += f" from an {where}"
        fields = flow_fields(event) if event["event"]["dataset"] == Dataset.NETWORK.value else {
            "dns.question.name": event["dns"]["question"]["name"], "process.pid": p.get("pid")}
        return [self.finding(event, message, timestamp=ts, severity=severity, score=0.8,
                             fields={**fields, **sandbox_fields})]
