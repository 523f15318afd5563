"""Known miner families by executable name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import argv, basename, is_text_tool, process_fields, segments
from detectors.process._miners import KNOWLEDGE
from gpusentry.contract import Dataset, event_time


class MinerBinary(Detector):
    id = "process.miner_binary"
    title = "Known cryptocurrency miner started"
    description = ("A process started whose executable or process name is a known mining program "
                   "(XMRig, T-Rex, lolMiner, NBMiner, GMiner, TeamRedMiner, BzMiner, Rigel, SRBMiner, ...: the "
                   "families in detectors/process/miners.toml, each with its source), or any file in a miner's "
                   "unpacked release directory. Names other software uses too (`miner`, `excavator`, `rigel`) "
                   "count only beside the miner's flags (process.miner_flags).")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",)
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.MINER_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("xmrig from a home directory", True, [proc("/home/u/xmrig-6.21.0/xmrig --config=c.json")]),
        Example("versioned t-rex", True, [proc("/opt/t-rex-0.26.8 -a kawpow")]),
        Example("xmrig inside a detached screen session", True,
                [proc("screen -dmS sys ./xmrig -c config.json", executable="/usr/bin/screen")]),
        Example("t-rex under timeout and taskset", True,
                [proc("timeout 36000 taskset -c 0-7 /opt/t-rex -a kawpow", executable="/usr/bin/timeout")]),
        Example("a renamed binary in an unpacked xmrig release", True,
                [proc("nohup /tmp/xmrig/xmrig-6.22.2/kqpzmdtqwe", executable="/usr/bin/nohup")]),
        Example("a build step inside a checkout of xmrig's source", False,
                [proc("/home/u/src/xmrig/scripts/build_deps.sh")]),
        Example("removing an unpacked release", False, [proc("rm -rf /tmp/xmrig-6.22.2/xmrig")]),
        Example("Cisco's TRex traffic generator, not the T-Rex miner", False, [proc("/opt/trex/v3.02/t-rex-64 -i")]),
        Example("a robotics runtime called excavator (a name NiceHash's miner shares)", False,
                [proc("/opt/ros/excavator --params site.yaml")]),
        Example("grep for xmrig in logs", False, [proc("/usr/bin/grep xmrig /var/log/syslog")]),
        Example("screen running a log pager on the miner's log", False,
                [proc("screen -dmS logs less /var/log/xmrig.log", executable="/usr/bin/screen")]),
        Example("pytorch training", False, [proc("/usr/bin/python3 train.py --epochs 10")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        names = {p["name"].lower()}
        if p.get("executable"):
            names.add(p["executable"].rsplit("/", 1)[-1].lower())
        for raw in sorted(names):
            family = KNOWLEDGE.family(raw)
            if family is not None:
                if KNOWLEDGE.generic(raw):
                    continue  # "miner" alone is too common a word to page on; flags decide instead
                return [self.finding(event, f"known miner {raw!r} ({family}) started (pid {p['pid']})",
                                     timestamp=event_time(event),
                                     fields=process_fields(event))]
        release = KNOWLEDGE.release_dir(p.get("executable"))
        if release is not None:
            return [self.finding(event, f"pid {p['pid']} ({p['name']}) runs from the {release[0]} release directory "
                                 f"{release[1]!r}", timestamp=event_time(event), fields=process_fields(event))]
        # A wrapper that forks what it runs (screen -dmS, tmux new -d, timeout, systemd-run, sh -c): look inside.
        for seg in segments(argv(p)):
            if not seg or is_text_tool(seg):
                continue
            inner = basename(seg[0])
            family = KNOWLEDGE.family(inner)
            if family is not None and not KNOWLEDGE.generic(inner) and inner.lower() not in names:
                return [self.finding(event, f"pid {p['pid']} ({p['name']}) starts the known miner {inner!r} "
                                     f"({family})", timestamp=event_time(event), fields=process_fields(event))]
            release = KNOWLEDGE.release_dir(seg[0])
            if release is not None and seg[0] != p.get("executable"):
                return [self.finding(event, f"pid {p['pid']} ({p['name']}) starts {inner!r} from the {release[0]} "
                                     f"release directory {release[1]!r}", timestamp=event_time(event),
                                     fields=process_fields(event))]
        return ()
