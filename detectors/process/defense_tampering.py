"""Tampering that comes before mining: security agents stopped or removed, process hiders installed, files locked
against removal, shell history wiped, competing miners killed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import argv, basename, process_fields, segments
from detectors.process._miners import KNOWLEDGE
from gpusentry.contract import Dataset, event_time
from gpusentry.knowledge import load_entries, resolve

TAMPERING_FILE = Path(__file__).with_name("tampering.toml")


def load_tampering(path: Path | None = None) -> tuple[dict[str, str], tuple[tuple[str, str], ...], frozenset[str]]:
    """(security agent name -> agent id, (install path, agent id), process-hider names) from ``tampering.toml``."""
    path = path or resolve(TAMPERING_FILE)
    agents = load_entries(path, "security_agent", required={"id": str, "names": list}, optional={"paths": list})
    hiders = load_entries(path, "hider", required={"id": str, "names": list})
    return ({n.lower(): a["id"] for a in agents for n in a["names"]},
            tuple((p, a["id"]) for a in agents for p in a.get("paths", [])),
            frozenset(n.lower() for h in hiders for n in h["names"]))


AGENT_NAMES, AGENT_PATHS, HIDER_NAMES = load_tampering()

_STOP_VERBS = frozenset({"stop", "disable", "mask", "kill"})
_REMOVE_VERBS = frozenset({"remove", "purge", "erase", "-e", "-r", "--remove", "--purge", "uninstall"})
_PACKAGE_TOOLS = frozenset({"apt", "apt-get", "yum", "dnf", "zypper", "rpm", "dpkg", "apk"})
_KILLERS = frozenset({"pkill", "killall"})
_WRITERS = frozenset({"tee", "cp", "mv", "install", "ln", "dd"})
_HISTORY_FILES = (".bash_history", ".zsh_history", ".history", ".sh_history")


def _agent(word: str) -> str | None:
    w = basename(word).lower().removesuffix(".service")
    return AGENT_NAMES.get(w)


def tampering(seg: list[str]) -> tuple[str, str] | None:
    """(severity, reason) when this simple command tampers with the host's defences or covers tracks."""
    if not seg:
        return None
    cmd, rest = basename(seg[0]).lower(), seg[1:]
    words = [w for w in rest if not w.startswith("-")]
    if cmd in ("systemctl", "service", "chkconfig", "rc-service", "update-rc.d") or seg[0].startswith("/etc/init.d/"):
        names = [seg[0]] + rest if seg[0].startswith("/etc/init.d/") else rest
        agents = [a for a in (_agent(w) for w in names) if a]
        if agents and (set(rest) & (_STOP_VERBS | {"off", "remove"})):
            return "medium", f"stops the {agents[0]} security agent ({' '.join(seg[:4])})"
    if cmd in _KILLERS and words:
        agent = _agent(words[-1])
        if agent:
            return "medium", f"kills the {agent} security agent"
        target = words[-1]
        if KNOWLEDGE.family(target) or any(basename(target).lower() in m.names for m in KNOWLEDGE.malware):
            return "low", f"kills competing miners ({cmd} {target})"
    if cmd in _PACKAGE_TOOLS and set(rest) & _REMOVE_VERBS:
        agents = [a for a in (_agent(w) for w in words) if a]
        if agents:
            return "medium", f"uninstalls the {agents[0]} security agent"
    for w in seg:
        for path, agent in AGENT_PATHS:
            if w.startswith(path) and (cmd in ("rm", "shred") or "uninstall" in w):
                return "medium", f"removes the {agent} security agent ({w})"
    low = [w.lower() for w in seg]
    if "/etc/ld.so.preload" in low and (">" in seg or ">>" in seg or cmd in _WRITERS):
        return "medium", "writes /etc/ld.so.preload (a library loaded into every program: a process hider)"
    if any(basename(w) in HIDER_NAMES for w in low):
        return "medium", "installs a process hider"
    if cmd == "chattr" and any(w.startswith("+") and ("i" in w or "a" in w) for w in rest):
        return "medium", f"locks files against removal ({' '.join(seg[:4])})"
    if cmd == "history" and "-c" in rest:
        return "medium", "clears the shell history"
    if cmd in ("unset", "export") and any(w.split("=", 1)[0] in ("HISTFILE", "HISTSIZE") for w in rest):
        return "medium", "turns the shell history off"
    if any(w.endswith(_HISTORY_FILES) for w in rest) and (cmd in ("rm", "shred", "ln", "truncate") or ">" in seg):
        return "medium", "wipes the shell history"
    return None


class DefenseTampering(Detector):
    id = "process.defense_tampering"
    title = "Security tools stopped or tracks covered"
    description = ("What cryptojacking scripts do before they mine: stop, kill or uninstall host security agents "
                   "(Alibaba Cloud's Aegis, Tencent's YunJing, Falco, osquery, auditd: "
                   "detectors/process/tampering.toml), write /etc/ld.so.preload or install a process hider, "
                   "chattr +i their files, clear or disable the shell history (medium), and kill competing miners "
                   "(low: anti-miner scripts do it too). Evidence that raises the host's incident.")
    severity = "medium"
    technique = "T1496.001"  # the incident is compute hijacking; the tampering techniques are in references
    references = ("https://attack.mitre.org/techniques/T1562/001/", "https://attack.mitre.org/techniques/T1070/003/",
                  "https://attack.mitre.org/techniques/T1574/006/")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.TAMPERING

    examples: ClassVar[list[Example]] = [
        Example("Aegis uninstalled", True, [proc("sh -c 'rm -rf /usr/local/aegis; systemctl stop aliyun.service'",
                                                 executable="/bin/sh")]),
        Example("YunJing agent killed", True, [proc("pkill -9 YDService")]),
        Example("Falco stopped", True, [proc("systemctl stop falco-modern-bpf.service")]),
        Example("process hider preloaded", True,
                [proc("sh -c 'echo /usr/local/lib/libnetwork.so > /etc/ld.so.preload'", executable="/bin/sh")]),
        Example("miner files locked", True, [proc("chattr +i /tmp/.x/config.json")]),
        Example("history wiped", True, [proc("bash -c 'history -c; rm -f /root/.bash_history'",
                                             executable="/bin/bash")]),
        Example("an admin restarting falco", False, [proc("systemctl restart falco")]),
        Example("reading ld.so.preload", False, [proc("cat /etc/ld.so.preload")]),
        Example("removing immutability to clean up", False, [proc("chattr -i /etc/resolv.conf")]),
        Example("package update", False, [proc("apt-get install -y osquery")]),
        Example("history listing", False, [proc("bash -c 'history | tail'", executable="/bin/bash")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        found = [f for f in map(tampering, segments(argv(p))) if f]
        if not found:
            return ()
        severity, reason = next((f for f in found if f[0] == "medium"), found[0])  # the strongest, first
        return [self.finding(event, f"pid {p['pid']} ({p['name']}) {reason}", timestamp=event_time(event),
                             severity=severity, score=0.6 if severity == "medium" else 0.3,
                             fields=process_fields(event))]
