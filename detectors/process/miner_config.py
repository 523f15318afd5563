"""A renamed miner run with a config file: judged by its flags and where it runs, not by its name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import (
    argv,
    basename,
    is_text_tool,
    odd_hidden_dir,
    process_fields,
    segments,
    staging_dir,
)
from detectors.process.masquerade import DAEMONS, KERNEL_THREAD
from gpusentry.contract import Dataset, event_time

CONFIG_OPTIONS = frozenset({"-c", "--config", "--config-file", "-config", "--cfg", "-C"})
# Options XMRig-family miners take beside a config file (run in the background, quiet output).
MINER_STYLE_OPTIONS = frozenset({"-B", "--background", "--no-color", "--print-time", "--log-file", "--syslog",
                                 "--pause-on-battery", "--pause-on-active", "--http-enabled", "--http-port",
                                 "--cpu-priority", "--threads", "--no-huge-pages", "--api-worker-id"})
CONFIG_SUFFIXES = (".json", ".conf", ".cfg", ".txt", ".ini", ".yaml", ".yml")
# Interpreters and ordinary tools take `-c`: python -c CODE, bash -c SCRIPT, gunicorn -c conf.py, ...
_NOT_MINERS = frozenset({"python", "python3", "bash", "sh", "dash", "zsh", "gunicorn", "uvicorn", "nginx", "perl",
                         "ruby", "node", "java", "ssh", "git", "tmux", "screen", "supervisord", "redis-server",
                         "celery", "docker", "podman", "kubectl", "helm", "ansible", "jupyter", "ray", "env"})


def _config_file(args: list[str]) -> str | None:
    for i, tok in enumerate(args[1:], 1):
        opt, eq, value = tok.partition("=")
        if eq and opt in CONFIG_OPTIONS:
            candidate: str | None = value
        elif tok in CONFIG_OPTIONS and i + 1 < len(args):
            candidate = args[i + 1]
        else:
            continue
        if candidate and candidate.lower().endswith(CONFIG_SUFFIXES):
            return candidate
    return None


class MinerConfig(Detector):
    id = "process.miner_config"
    title = "Unknown binary run with a config file from a staging or disguised location"
    description = ("A process started with only a config file (-c config.json, --config=...) whose "
                   "executable sits in /tmp, /dev/shm, /var/tmp or a hidden directory, or carries a kernel-thread "
                   "or daemon name: how droppers run renamed miners so that no pool URL or miner name shows on "
                   "the command line. Medium; high with XMRig-style options (-B, --no-color, ...) or a disguised "
                   "name.")
    severity = "medium"
    technique = "T1496.001"
    references = ("https://xmrig.com/docs/miner/config", "https://attack.mitre.org/techniques/T1496/001/")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.MINER_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("kworker with conf.json from /dev/shm", True,
                [proc("/dev/shm/.k/kworker -c conf.json", name="kworker")]),
        Example("dropper in /tmp with config and -B", True, [proc("/tmp/.ssh-agent/sshd-update -c ./c.json -B")]),
        Example("hidden dir with --config=", True, [proc("/home/ml/.dbus-x/helper --config=/home/ml/.dbus-x/h.json")]),
        Example("gunicorn with a config file", False,
                [proc("/usr/local/bin/gunicorn -c /etc/gunicorn/conf.py app:app")]),
        Example("trainer with a json config", False,
                [proc("/opt/conda/bin/torchrun --nproc-per-node 8 train.py -c configs/llama.json")]),
        Example("vim on a config in tmp", False, [proc("/usr/bin/vim -c 'set nu' /tmp/config.json")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        args = argv(p)
        for seg in segments(args):
            if is_text_tool(seg):
                continue
            # The process's own executable, or the program a `sh -c` script runs.
            exe = p.get("executable") if seg[0] == args[0] else seg[0]
            exe_name = basename(exe or seg[0]).lower()
            if exe_name.rstrip("0123456789.") in _NOT_MINERS:
                continue
            config = _config_file(seg)
            if config is None:
                continue
            place = staging_dir(exe) or (odd_hidden_dir(exe) and f"hidden directory {odd_hidden_dir(exe)}")
            disguised = bool(KERNEL_THREAD.match(p["name"]) or KERNEL_THREAD.match(exe_name)
                             or p["name"].lower() in DAEMONS or exe_name in DAEMONS)
            if not place and not disguised:
                continue
            style = sorted(set(seg[1:]) & MINER_STYLE_OPTIONS)
            high = disguised or bool(style)
            why = ", ".join(filter(None, [f"from {place}" if place else "", "disguised name" if disguised else "",
                                          f"options {' '.join(style)}" if style else ""]))
            return [self.finding(event, f"pid {p['pid']} {exe or seg[0]} runs with config {config} ({why})",
                                 timestamp=event_time(event), severity="high" if high else "medium",
                                 score=0.8 if high else 0.5, fields=process_fields(event))]
        return ()
