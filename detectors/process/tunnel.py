"""Tunnels started as processes: SSH forwards (whoever the parent is) and tunnel tools, judged by context."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.examples import proc
from detectors.network._addresses import split_destination
from detectors.process._cmdline import argv, basename, process_fields, redact, segments
from detectors.process.service_spawn import service_kind
from detectors.sandbox._base import LineageDetector
from detectors.sandbox._lineage import Lineage, Proc
from gpusentry.contract import Dataset, event_time, get
from gpusentry.knowledge import load_entries, resolve
from gpusentry.settings.detection import DetectionSettings

TUNNELS_FILE = Path(__file__).with_name("tunnels.toml")
# ssh's option letters that take an argument (OpenSSH ssh.c getopt string), so joined flags such as
# -fNR8080:localhost:22 or -oRemoteForward=... split the way ssh itself splits them.
SSH_ARG_FLAGS = frozenset("BbcDEeFIiJLlmOopQRSWw")
SSH_NAMES = frozenset({"ssh", "dbclient", "autossh", "plink"})
WIDE_OPEN = ("reverse", "dynamic", "vpn", "relay")
BASTION = {"network": {"bastions": ["bastion.example.com", "192.0.2.10/32"]}}  # the examples' site  # kinds that open the network, not just reach out of it


@dataclass(frozen=True)
class TunnelKnowledge:
    ssh_flags: dict[str, str]  # letter -> kind
    ssh_options: dict[str, str]  # lower-case option name -> kind
    tools: dict[str, tuple[str, str, tuple[str, ...], int]]  # name -> (tool id, kind, needs_args, min matches)


@lru_cache(maxsize=4)
def load_tunnels(path: Path | None = None) -> TunnelKnowledge:
    path = path or resolve(TUNNELS_FILE)
    flags = load_entries(path, "ssh_flag", required={"flag": str, "kind": str})
    options = load_entries(path, "ssh_option", required={"name": str, "kind": str})
    tools = load_entries(path, "tool", required={"id": str, "names": list, "kind": str},
                         optional={"needs_args": list, "min_matches": int})
    by_name: dict[str, tuple[str, str, tuple[str, ...], int]] = {}
    for t in tools:
        for n in t["names"]:
            by_name[n] = (t["id"], t["kind"], tuple(t.get("needs_args", ())), int(t.get("min_matches", 1)))
    return TunnelKnowledge({f["flag"]: f["kind"] for f in flags}, {o["name"].lower(): o["kind"] for o in options},
                           by_name)


def ssh_forwards(args: list[str], knowledge: TunnelKnowledge) -> tuple[list[tuple[str, str]], str | None]:
    """([(kind, spec)], destination host) of an ssh argument vector, parsed the way ssh parses it."""
    forwards: list[tuple[str, str]] = []
    destination = None
    i = 1
    while i < len(args):
        a = args[i]
        if a == "--":
            destination = args[i + 1] if i + 1 < len(args) else None
            break
        if not a.startswith("-") or len(a) < 2:
            destination = a
            break
        j = 1
        while j < len(a):
            letter = a[j]
            if letter in SSH_ARG_FLAGS:
                value = a[j + 1:]
                if not value and i + 1 < len(args):
                    i += 1
                    value = args[i]
                if letter == "o":
                    key, _, rest = value.replace("=", " ", 1).partition(" ")
                    kind = knowledge.ssh_options.get(key.strip().lower())
                    if kind and rest.strip().lower() not in ("no", "none", ""):
                        forwards.append((kind, f"-o {key}={rest.strip()}"))
                elif letter in knowledge.ssh_flags:
                    forwards.append((knowledge.ssh_flags[letter], f"-{letter} {value}"))
                break
            if letter in knowledge.ssh_flags and letter not in SSH_ARG_FLAGS:
                forwards.append((knowledge.ssh_flags[letter], f"-{letter}"))
            j += 1
        i += 1
    if destination is not None:
        destination = split_destination(destination)
    return forwards, destination


def context(lineage_proc: Proc | None, parent_name: str | None) -> tuple[str | None, dict[str, Any]]:
    """Where a process runs, as a phrase for high-severity contexts ('an agent sandbox (OpenHands runtime)',
    'a Jupyter service'), with the sandbox fields; (None, {}) for an ordinary user's shell."""
    if lineage_proc is not None and lineage_proc.sandbox is not None:
        return f"agent sandbox ({lineage_proc.sandbox.framework})", lineage_proc.fields()
    kind = service_kind(parent_name)
    if kind is not None:
        return f"{kind} service", {}
    return None, {}


class Tunnel(LineageDetector):
    id = "process.tunnel"
    title = "Tunnel started (SSH forward or tunnel tool)"
    description = ("An ssh (or autossh, dbclient, plink) with a remote, dynamic, local, tun or jump forward (-R, "
                   "-D, -L, -w, -J, -W, joined as in -fNR8080:... or as -o RemoteForward/DynamicForward/"
                   "LocalForward/Tunnel/ProxyCommand/GatewayPorts), whoever its parent is, or a tunnel tool "
                   "(chisel, frp, ngrok, cloudflared tunnel, bore, gost, ligolo, rathole, sshuttle, iodine, "
                   "dnscat2, code tunnel, devtunnel, socat relays). High from an agent sandbox, a Jupyter kernel, "
                   "a web or Ray service; medium for a reverse or dynamic forward or a tunnel tool reaching "
                   "outside from a user's shell; nothing for forwards through a configured bastion "
                   "([detection.network] bastions). Tools and options are data (detectors/process/tunnels.toml).")
    severity = "high"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1572/", "https://attack.mitre.org/techniques/T1090/",
                  "https://man.openbsd.org/ssh")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.TUNNEL

    examples: ClassVar[list[Example]] = [
        Example("reverse SSH tunnel from an OpenHands sandbox (joined flags, parent python)", True, [
            proc("/openhands/micromamba/bin/micromamba run -n openhands poetry run python -u -m "
                 "openhands.runtime.action_execution_server 30000 --working-dir /workspace", pid=100, parent="sh",
                 parent_pid=1, name="python", container_id="c0ffee" * 10 + "abcd"),
            proc("/bin/bash -lc 'ssh -fNR8022:localhost:22 tunnel@198.51.100.23'", pid=200, parent="python",
                 parent_pid=100, t=5, container_id="c0ffee" * 10 + "abcd"),
            proc("ssh -fNR8022:localhost:22 tunnel@198.51.100.23", pid=201, parent="bash", parent_pid=200, t=5.1,
                 container_id="c0ffee" * 10 + "abcd")]),
        Example("ssh -o RemoteForward from a Jupyter kernel", True, [
            proc("python -m ipykernel_launcher -f /root/.local/share/jupyter/runtime/kernel-1.json", pid=300,
                 parent="jupyter-lab", name="python"),
            proc("ssh -N -o RemoteForward=9000:127.0.0.1:8888 -o ServerAliveInterval=30 u@203.0.113.7", pid=301,
                 parent="python", parent_pid=300, t=2)]),
        Example("socks forward from a SWE-bench evaluation container (known by its name)", True, [
            {**proc("ssh -N -D 9050 x@203.0.113.8", pid=60, parent="bash", parent_pid=59, container_id="5e" * 32),
             "container": {"id": "5e" * 32, "name": "sweb.eval.django__django-11099.run7"}}]),
        Example("bore from a Ray worker's tool call", True, [
            proc("ray::RolloutWorker.run_episode", pid=70, parent="raylet", name="ray::RolloutWor"),
            proc("/bin/sh -c 'bore local 8888 --to bore.pub'", pid=71, parent="ray::RolloutWor", parent_pid=70, t=1),
            proc("bore local 8888 --to bore.pub", pid=72, parent="sh", parent_pid=71, t=1.1)]),
        Example("chisel client from a user's shell", True,
                [proc("/tmp/chisel client https://203.0.113.9:443 R:socks", parent="bash")]),
        Example("cloudflared quick tunnel", True,
                [proc("cloudflared tunnel --url http://localhost:8888", parent="bash")]),
        Example("dynamic forward from a user's shell to the outside", True,
                [proc("ssh -D 1080 -N ops@203.0.113.40", parent="zsh")]),
        Example("local forward through the bastion", False,
                [proc("ssh -L 5432:db.internal:5432 ops@bastion.example.com", parent="bash")], BASTION),
        Example("autossh local forward through the bastion", False,
                [proc("autossh -M 0 -N -L 3000:grafana.internal:3000 ops@bastion.example.com", parent="systemd")],
                BASTION),
        Example("local forward to an unknown outside host", True,
                [proc("ssh -L 5432:db.internal:5432 ops@203.0.113.99", parent="bash")]),
        Example("ssh -V in a sandbox", False, [
            proc("python -m ipykernel_launcher -f k.json", pid=300, parent="jupyter-lab", name="python"),
            proc("ssh -V", pid=301, parent="python", parent_pid=300, t=1)]),
        Example("plain ssh to run a command", False, [proc("ssh build@10.0.4.2 make -C /srv/app", parent="bash")]),
        Example("cloudflared as a DNS proxy", False, [proc("cloudflared proxy-dns --port 5053", parent="systemd")]),
        Example("grep for ssh -R in a repository", False, [proc("grep -rn 'ssh -R' docs/", parent="bash")]),
    ]

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        super().__init__(settings)
        self.knowledge = load_tunnels()

    def process(self, event: dict[str, Any], state: Lineage) -> Iterable[Finding]:
        ts = event_time(event)
        me = state.observe(event, self.matcher, ts)
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        args = argv(p)
        if not args:
            return ()
        # Only the process itself: a shell running `ssh -R` is reported when that ssh starts (the agent sees
        # every exec), and a shell that only mentions it (echo, grep) is not a tunnel.
        if len(segments(args)) > 1 or basename(args[0]) in ("sh", "bash", "dash", "zsh"):
            return ()
        name = basename(args[0])
        found = self._judge(name, args)
        if found is None:
            return ()
        tool, kind, spec, destination = found
        where, sandbox_fields = context(me, get(p, "parent.name"))
        dest_note = ""
        if destination:
            dest_note = f" to {destination}"
        if where is not None:
            severity = "high"
            why = f"from an {where}" if where.startswith("agent") else f"from a {where}"
        else:
            outside = destination is None or self.places.is_outside(destination)
            if destination and self.places.is_bastion(destination) and kind in ("local", "jump"):
                return ()
            if kind in WIDE_OPEN and outside:
                severity, why = "medium", "from a user's shell to an outside address"
            elif kind in WIDE_OPEN or (kind in ("local", "jump") and outside):
                severity, why = "low", "from a user's shell"
            else:
                return ()
        fields = process_fields(event)
        fields.update(sandbox_fields)
        fields["gpusentry.tunnel.tool"] = tool
        fields["gpusentry.tunnel.kind"] = kind
        if destination:
            fields["destination.address"] = destination
        line = redact(p.get("command_line") or " ".join(args)) or ""
        return [self.finding(event, f"{kind} tunnel ({tool}{', ' + spec if spec else ''}){dest_note} {why}: "
                             f"{line[:160]}", timestamp=ts, severity=severity,
                             score=0.9 if severity == "high" else 0.6, fields=fields)]

    def _judge(self, name: str, args: list[str]) -> tuple[str, str, str, str | None] | None:
        """(tool, kind, the option that makes it one, destination host) or None."""
        if name in SSH_NAMES:
            forwards, destination = ssh_forwards(args if name != "autossh" else _without_monitor(args),
                                                 self.knowledge)
            if not forwards:
                return None
            order = ("reverse", "vpn", "dynamic", "relay", "local", "jump")
            kind, spec = min(forwards, key=lambda f: order.index(f[0]) if f[0] in order else len(order))
            return name, kind, spec, destination
        tool = self.knowledge.tools.get(name)
        if tool is None or tool[1] == "ssh":
            return None
        tool_id, kind, needs, minimum = tool
        if needs:
            hits = sum(1 for a in args[1:] if any(a == n or (n.endswith(":") and a.upper().startswith(n))
                                                  for n in needs))
            if hits < minimum:
                return None
        destination = next((d for d in map(_url_host, args[1:]) if d), None)
        return tool_id, kind, "", destination


def _url_host(arg: str) -> str | None:
    """The host an argument names (``https://h:443``, ``h:port``, ``user@h``), or None (flags, ``R:socks``)."""
    if arg.startswith("-") or arg.startswith(("R:", "L:")):
        return None
    if "://" in arg:
        host = split_destination(arg.split("://", 1)[1])
    elif "." in arg or "@" in arg:
        host = split_destination(arg)
    else:
        return None
    return host if host and not host.startswith("localhost") else None


def _without_monitor(args: list[str]) -> list[str]:
    """autossh's own -M port, removed so the rest parses as ssh's arguments."""
    out, skip = [args[0]], False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a == "-M":
            skip = True
            continue
        if a.startswith("-M") and a[2:].isdigit():
            continue
        out.append(a)
    return out
