"""Known miner families by executable name."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import process_fields
from gpusentry.contract import Dataset, event_time

# Lower-cased executable base names of GPU and CPU miner families (and their usual release spellings).
MINER_NAMES = frozenset({
    "xmrig", "xmrig-cuda", "xmrig-nvidia", "xmr-stak", "xmr-stak-rx", "t-rex", "trex", "lolminer", "nbminer",
    "gminer", "miner", "teamredminer", "bzminer", "rigel", "srbminer-multi", "srbminer", "ethminer",
    "nanominer", "phoenixminer", "claymore", "ethdcrminer64", "ccminer", "cpuminer", "cpuminer-opt",
    "minerd", "cgminer", "bfgminer", "sgminer", "kawpowminer", "nheqminer", "excavator", "wildrig",
    "wildrig-multi", "onezerominer", "danila-miner", "z-enemy", "cryptodredge", "miniz", "ttminer",
})
_VERSION_SUFFIX = re.compile(r"[-_.]?(v?\d+(\.\d+)*)?(\.exe)?$")


class MinerBinary(Detector):
    id = "process.miner_binary"
    title = "Known cryptocurrency miner started"
    description = ("A process started whose executable or process name is a known mining program "
                   "(XMRig, T-Rex, lolMiner, NBMiner, GMiner, TeamRedMiner, BzMiner, Rigel, SRBMiner, ...).")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",)
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.MINER_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("xmrig from a home directory", True, [proc("/home/u/xmrig-6.21.0/xmrig --config=c.json")]),
        Example("versioned t-rex", True, [proc("/opt/t-rex-0.26.8 -a kawpow")]),
        Example("grep for xmrig in logs", False, [proc("/usr/bin/grep xmrig /var/log/syslog")]),
        Example("pytorch training", False, [proc("/usr/bin/python3 train.py --epochs 10")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        names = {p["name"].lower()}
        if p.get("executable"):
            names.add(p["executable"].rsplit("/", 1)[-1].lower())
        for raw in names:
            base = _VERSION_SUFFIX.sub("", raw) or raw
            if raw in MINER_NAMES or base in MINER_NAMES:
                if raw == "miner" or base == "miner":
                    continue  # "miner" alone is too common a word to page on; flags decide instead
                return [self.finding(event, f"known miner {raw!r} started (pid {p['pid']})",
                                     timestamp=event_time(event),
                                     fields=process_fields(event))]
        return ()
