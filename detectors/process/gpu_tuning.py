"""Commands that retune a GPU the way miners do: power limit, locked clocks, memory overclock."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import argv, basename, process_fields, segments
from gpusentry.contract import Dataset, event_time

# nvidia-smi options that change a GPU's power or clocks (a reset, -rgc / -rmc / -rac, restores them).
SMI_SETTERS = {"-pl": "power limit", "--power-limit": "power limit", "-lgc": "locked core clocks",
               "--lock-gpu-clocks": "locked core clocks", "-lmc": "locked memory clocks",
               "--lock-memory-clocks": "locked memory clocks", "-ac": "application clocks",
               "--applications-clocks": "application clocks"}
# nvidia-settings attributes that overclock or underclock (a miner's memory offset, above all).
SETTINGS_ATTRIBUTES = ("GPUMemoryTransferRateOffset", "GPUGraphicsClockOffset", "GPUPowerMizerMode")


def tuning_in(args: list[str]) -> list[str]:
    """What a simple command changes on a GPU: e.g. ``["power limit 200"]``; empty when it changes nothing."""
    if not args:
        return []
    program = basename(args[0])
    found: list[str] = []
    if program == "nvidia-smi":
        for i, arg in enumerate(args[1:], 1):
            option, _, inline = arg.partition("=")
            what = SMI_SETTERS.get(option)
            if what is not None:
                value = inline or (args[i + 1] if i + 1 < len(args) else "")
                found.append(f"{what} {value}".strip())
    elif program == "nvidia-settings":
        for i, arg in enumerate(args[1:], 1):
            if arg in ("-a", "--assign") and i + 1 < len(args):
                assignment = args[i + 1]
            elif arg.startswith("--assign="):
                assignment = arg.removeprefix("--assign=")
            else:
                continue
            if any(attribute in assignment for attribute in SETTINGS_ATTRIBUTES):
                found.append(assignment)
    return found


class GpuTuning(Detector):
    id = "process.gpu_tuning"
    title = "GPU power limit or clocks changed from the command line"
    description = ("nvidia-smi setting a power limit or locking core, memory or application clocks, or "
                   "nvidia-settings offsetting clocks: how miners make a GPU mine efficiently and quietly (lower "
                   "power, memory clock up, core clock down). Administrators tune GPUs too, so alone it is low; "
                   "it names who changed the GPU when the drift detector sees the limit move.")
    severity = "low"
    technique = "T1496.001"
    references = ("https://docs.nvidia.com/deploy/nvidia-smi/index.html",
                  "https://attack.mitre.org/techniques/T1496/001/")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.SUSPICIOUS_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("power limit lowered", True, [proc("nvidia-smi -i 0 -pl 200")]),
        Example("clocks locked inside a shell script", True,
                [proc("sh -c 'nvidia-smi --lock-gpu-clocks=1100,1100 && ./run'")]),
        Example("memory overclock with nvidia-settings", True,
                [proc("nvidia-settings -a [gpu:0]/GPUMemoryTransferRateOffset[3]=1200")]),
        Example("power limit queried", False, [proc("nvidia-smi --query-gpu=power.limit --format=csv")]),
        Example("clocks reset", False, [proc("nvidia-smi -rgc")]),
        Example("a log searched for the option", False, [proc("grep -e -pl /var/log/gpu-admin.log")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        changes = [change for seg in segments(argv(p)) for change in tuning_in(seg)]
        if not changes:
            return ()
        return [self.finding(event, f"pid {p['pid']} ({p['name']}) retunes a GPU: {'; '.join(changes[:4])}",
                             timestamp=event_time(event), score=0.4, fields=process_fields(event))]
