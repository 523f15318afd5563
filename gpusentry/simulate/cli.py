"""``gpusentry simulate``: write labelled scenarios as contract events (JSONL) and their labels."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from typing import IO

import orjson
from rich.console import Console
from rich.table import Table

from gpusentry.simulate import SCENARIOS, fleet
from gpusentry.timefmt import format_timestamp, parse_timestamp

DEFAULT_START = "2026-11-01T00:00:00.000Z"  # a fixed clock: the same seed gives the same file


def parse_start(text: str) -> float:
    """``now``, epoch seconds, or an RFC 3339 timestamp."""
    if text == "now":
        import time

        return float(int(time.time()))
    try:
        return float(text)
    except ValueError:
        return parse_timestamp(text)


def list_scenarios(console: Console) -> None:
    table = Table("scenario", "label", "what happens", "evidence", box=None)
    for sc in SCENARIOS.values():
        table.add_row(sc.name, sc.label, sc.description, sc.evidence or "-")
    console.print(table)


def run_simulate(scenarios: list[str], *, hosts: int, duration_s: float, interval_s: float, seed: int,
                 start: str, out: Path | None, labels: Path | None, progress: Console) -> int:
    """Write the events; return how many.  Raises ``ValueError`` with the fix for bad options."""
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; `gpusentry simulate --list` shows them")
    if hosts < 1:
        raise ValueError("--hosts must be at least 1")
    if duration_s <= 0:
        raise ValueError("--duration must be positive (seconds)")
    if interval_s < 0 or interval_s > 60:
        raise ValueError("--interval must be between 1 and 60 seconds (0: vary from host to host)")
    try:
        t0 = parse_start(start)
    except ValueError as exc:
        raise ValueError(f"--start: {exc}") from None
    names = scenarios or list(SCENARIOS)
    host_labels, events = fleet(names, hosts, start=t0, duration_s=duration_s, interval_s=interval_s or None,
                                seed=seed)
    sink: IO[bytes]
    if out is None:
        sink = sys.stdout.buffer
    elif out.suffix == ".gz":
        sink = gzip.GzipFile(out, "wb", compresslevel=5)  # type: ignore[assignment]  # a binary IO; closed below
    else:
        sink = out.open("wb")
    n = 0
    try:
        for ev in events:
            sink.write(orjson.dumps(ev) + b"\n")
            n += 1
            if n % 50_000 == 0:
                progress.print(f"simulate: {n} events, up to {ev['@timestamp']}", highlight=False)
    finally:
        if out is None:
            sink.flush()
        else:
            sink.close()
    if labels is not None:
        doc = {lb.host: {**lb.as_dict(), "attack_start": format_timestamp(lb.attack_start)
                         if lb.attack_start is not None else None, "start": format_timestamp(lb.start)}
               for lb in host_labels}
        labels.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    hijacked = sum(lb.label == "hijack" for lb in host_labels)
    progress.print(f"simulate: {n} events from {len(host_labels)} hosts ({hijacked} hijacked, "
                   f"{len(host_labels) - hijacked} benign){' to ' + str(out) if out else ''}"
                   f"{'; labels in ' + str(labels) if labels else ''}", highlight=False)
    return n
