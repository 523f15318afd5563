"""A miner told by its flags, whatever the binary is called: pool URLs, algorithms, wallets, miner options."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import argv, basename, is_text_tool, process_fields, redact, segments
from detectors.process._miner_options import OPTIONS
from gpusentry.contract import Dataset, event_time

# The vocabulary is data (miner_options.toml, each fact with its source); these names are what the code reads.
POOL_URL = OPTIONS.pool_url
POOL_OPTIONS = OPTIONS.options["pool"]
USER_OPTIONS = OPTIONS.options["user"]
ALGO_OPTIONS = OPTIONS.options["algorithm"]
MINING_ALGOS = OPTIONS.algorithms
MINER_ONLY_OPTIONS = OPTIONS.options["miner_only"]  # each alone says "miner"
WEAK_OPTIONS = OPTIONS.options["weak"]  # only beside other evidence
WALLET = OPTIONS.wallet
# Rigel numbers the pools and users of a multi-algorithm launch: -o [1]stratum+tcp://... -u [1]WALLET.
_SLOT = re.compile(r"^\[\d{1,2}\]")
# Interpreters running a module that only fetches or inspects packages (``python -m pip download xmrig``).
_PACKAGE_MODULES = frozenset({"pip", "pipx", "ensurepip", "venv", "uv"})


def _options(args: list[str]) -> Iterable[tuple[str, str | None]]:
    """(option, value) pairs: ``-o VALUE``, ``--url=VALUE``, and bare positional tokens as ("", token)."""
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("-") and "=" in tok:
            opt, _, value = tok.partition("=")
            yield opt, value
        elif tok.startswith("-"):
            nxt = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
            yield tok, nxt
            if nxt is not None:
                i += 1
                yield "", nxt
        else:
            yield "", tok
        i += 1


def _is_package_tool(args: list[str]) -> bool:
    return (len(args) >= 3 and basename(args[0]).startswith("python") and args[1] == "-m"
            and args[2] in _PACKAGE_MODULES)


def miner_evidence(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(strong, medium, weak) reasons why this simple command looks like a miner."""
    strong: list[str] = []
    medium: list[str] = []
    weak: list[str] = []
    if not args or is_text_tool(args) or _is_package_tool(args):
        return strong, medium, weak
    for opt, value in _options(args[1:]):
        if value is not None and value.startswith("["):
            value = _SLOT.sub("", value)
        if value is not None and POOL_URL.match(value):
            reason = f"pool URL {(redact(value) or '')[:80]}"
            if reason not in strong:
                strong.append(reason)
            continue
        if opt in MINER_ONLY_OPTIONS:
            strong.append(f"miner option {opt}")
        elif opt in ALGO_OPTIONS and value and (value.lower() in MINING_ALGOS or (
                "+" in value and all(part in MINING_ALGOS for part in value.lower().split("+")))):  # dual mining
            medium.append(f"mining algorithm {opt} {value}")
        elif opt in USER_OPTIONS and value and WALLET.match(value):
            medium.append(f"wallet-like {opt} {value[:12]}...")
        elif opt in POOL_OPTIONS and value and re.match(r"^[\w.-]+\.[a-z]{2,}:\d{2,5}$", value):
            weak.append(f"pool-like {opt} {value}")
        elif opt in WEAK_OPTIONS:
            weak.append(f"option {opt}")
    return strong, medium, weak


class MinerFlags(Detector):
    id = "process.miner_flags"
    title = "Process started with cryptocurrency-miner flags"
    description = ("A process started with the command-line flags of a miner: a pool URL "
                   "(stratum+tcp/ssl/tls, stratum1+tcp, stratum2+tcp, ethproxy+tcp, nicehash+tcp, zmp+tcp), "
                   "miner-only options (--donate-level, --randomx-*, --cuda-loader, ...), a mining algorithm "
                   "(-a kawpow|etchash|autolykos2|kheavyhash|randomx|...) or a wallet address as the user. "
                   "The executable's name does not matter, so renamed miners are caught; commands that only "
                   "mention a miner (grep, editors, package tools) are not.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/", "https://xmrig.com/docs/miner/command-line-options")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.MINER_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("renamed xmrig with stratum pool", True,
                [proc("/home/u/.cache/systemd-helper -o stratum+tcp://pool.example.net:3333 -u 4AdUndXHHZ6cfufTMvpp"
                      "Y6JwXNouMBzSkbLYfpAV5Usx3skxNgYeYTRj5UzqtReoS44qo9mtmXCqY45DJ852K5Jv2684Rge.rig1 -k")]),
        Example("t-rex kawpow with wallet", True,
                [proc("/opt/bin/worker -a kawpow -u RN9pYWZR2QXEUYGq1u2FGmFJz2BcePTEeg.w1 "
                      "--url pool.example.org:5555")]),
        Example("stratum1+tcp via sh -c", True,
                [proc("sh -c './gpu-svc --algo etchash --pool stratum1+tcp://etc.example.org:1010'")]),
        Example("miner-only donate option", True, [proc("/srv/app/agent --donate-level 1 -c cfg.json")]),
        Example("nicehash scheme", True, [proc("/usr/local/bin/svc -P nicehash+tcp://daggerhashimoto.example:3353")]),
        Example("grep for a stratum URL", False, [proc("grep -r stratum+tcp:// /var/log/")]),
        Example("vim on an xmrig config", False, [proc("vim /home/u/xmrig.json")]),
        Example("pip download of xmrig", False, [proc("/usr/bin/python3 -m pip download xmrig")]),
        Example("training script with --cuda", False,
                [proc("/usr/bin/python3 train.py --cuda --epochs 10 -o /data/out")]),
        Example("ssh with -o option", False, [proc("ssh -o StrictHostKeyChecking=no -p 2222 user@host")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        best: tuple[int, list[str]] | None = None
        for seg in segments(argv(p)):
            strong, medium, weak = miner_evidence(seg)
            if strong or len(medium) >= 2 or (medium and weak):
                rank, reasons = 2, strong + medium + weak
            elif medium:
                rank, reasons = 1, medium
            else:
                continue
            if best is None or rank > best[0]:
                best = (rank, reasons)
        if best is None:
            return ()
        rank, reasons = best
        return [self.finding(event, f"miner flags on pid {p['pid']} ({p['name']}): {'; '.join(reasons[:4])}",
                             timestamp=event_time(event), severity="high" if rank == 2 else "medium",
                             score=0.95 if rank == 2 else 0.6, fields=process_fields(event))]
