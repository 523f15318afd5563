"""``gpusentry waste``: GPU time the scheduler allocated and nobody used, per owner, priced like stolen time.

Allocated-but-idle GPUs are not alerts (nothing was stolen), but finance wants them beside the hijacks: the same
price list (gpusentry/data/gpu_prices.toml and ``[detection.pricing]``) prices them. Read from GPU samples that
carry the scheduler's answer (``gpusentry.allocation``, docs/scheduler.md): the agent's JSONL output, a
``gpusentry simulate`` file, or anything ``gpusentry replay`` reads. A sample is idle below ``[detection.gpu]
busy_gpu_pct``; each sample counts the time since the GPU's previous one (at most 60 s, as incidents do), split
evenly between the GPU's holders (time-sliced pods share it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detectors.correlation import MAX_SAMPLE_GAP_S
from gpusentry.contract import Dataset, Reject, event_time, validate_event
from gpusentry.pricing import price_list
from gpusentry.settings.detection import DetectionSettings
from gpusentry.timefmt import format_timestamp

GROUPS = ("owner", "namespace", "user", "host", "gpu-model", "day")


class WasteError(ValueError):
    """The input cannot be read; the message names the file and the fix."""


@dataclass
class Tally:
    cells: dict[tuple[str, str, str, str, str, str], list[float]] = field(default_factory=dict)
    last: dict[tuple[str, str], float] = field(default_factory=dict)  # (host, uuid) -> previous sample time
    samples: int = 0
    skipped: list[str] = field(default_factory=list)


def _owner(h: dict[str, Any]) -> tuple[str, str, str]:
    """(owner, namespace, user) of an allocation holder."""
    kind = h.get("kind")
    if kind == "kubernetes":
        ns = str(h.get("namespace") or "?")
        return f"pod {ns}/{h.get('pod') or h.get('pod_uid') or '?'}", ns, "-"
    if kind == "slurm":
        user = str(h.get("user") or "?")
        return f"job {h.get('job_id') or '?'}", "-", user
    return f"container {h.get('container') or str(h.get('container_id') or '?')[:12]}", "-", "-"


def tally(lines: Iterable[tuple[str, bytes]], settings: DetectionSettings, out: Tally | None = None) -> Tally:
    """Add ``(where, line)`` JSONL lines of events to ``out``."""
    t = out or Tally()
    busy_pct = settings.gpu.busy_gpu_pct
    for where, line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            t.skipped.append(f"{where}: not JSON ({exc})")
            continue
        for obj in raw if isinstance(raw, list) else [raw]:
            event = validate_event(obj)
            if isinstance(event, Reject):
                t.skipped.append(f"{where}: {event.code.value}: {event}")
                continue
            if event["event"]["dataset"] != Dataset.GPU.value:
                continue
            _add(t, event, busy_pct)
    return t


def _add(t: Tally, event: dict[str, Any], busy_pct: float) -> None:
    alloc = (event.get("gpusentry") or {}).get("allocation")
    g = event["gpu"]
    key = (event["host"]["name"], g["uuid"])
    ts = event_time(event)
    last = t.last.get(key)
    t.last[key] = ts if last is None else max(ts, last)
    if not isinstance(alloc, dict) or alloc.get("state") != "current" or last is None or ts <= last:
        return
    holders = [h for h in alloc.get("owners") or () if isinstance(h, dict)]
    if not holders:
        return
    t.samples += 1
    dt = min(ts - last, MAX_SAMPLE_GAP_S)
    util = (g.get("utilization") or {}).get("gpu_pct")
    idle = isinstance(util, int | float) and util < busy_pct
    day = format_timestamp(ts)[:10]
    for h in holders:
        owner, ns, user = _owner(h)
        cell = t.cells.setdefault((owner, ns, user, key[0], str(g.get("name") or "unknown model"), day), [0.0, 0.0])
        cell[0] += dt / len(holders)
        if idle:
            cell[1] += dt / len(holders)


def rows(t: Tally, settings: DetectionSettings, by: str) -> list[dict[str, Any]]:
    """The ledger grouped ``by`` one of :data:`GROUPS`, priced; largest waste first."""
    import pandas as pd

    if by not in GROUPS:
        raise WasteError(f"--by {by!r}: choose one of {', '.join(GROUPS)}")
    prices = price_list(settings.pricing)
    records = []
    for (owner, ns, user, host, model, day), (allocated_s, idle_s) in t.cells.items():
        quote = prices.quote(model)
        records.append({"owner": owner, "namespace": ns, "user": user, "host": host, "gpu-model": model, "day": day,
                        "allocated_gpu_hours": allocated_s / 3600, "idle_gpu_hours": idle_s / 3600,
                        "waste": idle_s / 3600 * quote.rate if quote is not None else 0.0,
                        "unpriced_gpu_hours": idle_s / 3600 if quote is None else 0.0})
    if not records:
        return []
    frame = pd.DataFrame(records).groupby(by, as_index=False)[
        ["allocated_gpu_hours", "idle_gpu_hours", "waste", "unpriced_gpu_hours"]].sum()
    frame["idle_share"] = frame["idle_gpu_hours"] / frame["allocated_gpu_hours"].where(frame["allocated_gpu_hours"] > 0)
    frame["currency"] = prices.currency
    frame["price_list"] = prices.version
    frame = frame.sort_values(["waste", "idle_gpu_hours", by], ascending=[False, False, True])
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            for r in frame.fillna(0.0).to_dict("records")]


def tally_files(paths: Iterable[Path], settings: DetectionSettings) -> Tally:
    from gpusentry.replay import open_text

    t = Tally()
    for path in paths:
        try:
            with open_text(path) as fh:
                tally(((f"{path}:{n}", line) for n, line in enumerate(fh, 1)), settings, t)
        except OSError as exc:
            raise WasteError(f"{path}: cannot read ({exc.strerror or exc}); check the path") from None
    return t
