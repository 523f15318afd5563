"""GPU samples read once per event, and per-GPU event-time windows that summarise them.

The models run on windows (``[detection.gpu] window_s``, default 30 s of event time), not on every
raw sample: a window costs the models one update however fast the agent samples (1-10 s), which is
what lets a replay run tens of thousands of events per second, and window statistics (mean,
spread, minimum) describe behaviour better than single samples do.

Windows are tumbling and aligned to multiples of ``window_s`` since the epoch, so a replay cuts
them exactly where the live run did.  A window closes when the first sample of a later window
arrives; its summary is a plain dict of floats (``None`` where the hardware reported nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gpusentry.contract import event_time
from gpusentry.gpuspecs import spec_for

# The feature names a window summary carries; models pick the ones they use.
FEATURES = ("util_mean", "util_std", "util_min", "util_max", "mem_pct", "used_frac", "used_gib", "power_frac",
            "limit_frac", "sm_frac", "memclk_frac", "pcie_log", "busy_frac")


@dataclass(slots=True)
class GpuProc:
    pid: int
    used_bytes: int | None
    sm_pct: float | None
    name: str | None
    executable: str | None
    command_line: str | None


@dataclass(slots=True)
class Sample:
    """The numbers of one ``gpusentry.gpu`` event, with ``None`` for what was not reported."""

    ts: float
    event_id: str
    uuid: str
    index: int
    name: str | None
    util: float | None
    mem_pct: float | None
    used: float | None
    total: float | None
    power: float | None
    limit: float | None
    sm: float | None
    memclk: float | None
    pcie: float | None  # rx + tx bytes/s
    procs: list[GpuProc] | None  # None: not reported
    # Which of procs the allowlist owns, worked out by the first detector that asks and kept for
    # the others: (allowlist, process table, one verdict per process); see _ownership.owned_flags.
    owned: tuple[Any, Any, list[bool]] | None = None


def _num(value: Any) -> float | None:
    # bool is an int; the contract rejects it, but a detector must not trust that blindly.
    kind = type(value)
    if kind is float:
        return value if value - value == 0.0 else None  # inf - inf and nan - nan are nan
    return value if kind is int else None


def _procs(raw: Any) -> list[GpuProc] | None:
    if not isinstance(raw, list):
        return None
    out = []
    for p in raw:
        if not isinstance(p, dict) or type(p.get("pid")) is not int:
            continue
        name, exe, cmd = p.get("name"), p.get("executable"), p.get("command_line")
        used = p.get("used_memory_bytes")
        out.append(GpuProc(p["pid"], used if type(used) is int else None, _num(p.get("sm_pct")),
                           name if isinstance(name, str) else None, exe if isinstance(exe, str) else None,
                           cmd if isinstance(cmd, str) else None))
    return out


_last: tuple[dict[str, Any], str, Sample] | None = None


def read_sample(event: dict[str, Any]) -> Sample:
    """The :class:`Sample` of a validated GPU event.

    Every GPU detector sees the same event in turn, so the last one read is kept (keyed by the
    object and its event id) and parsed once.
    """
    global _last
    eid = event["event"]["id"]
    if _last is not None and _last[0] is event and _last[1] == eid:
        return _last[2]
    g = event["gpu"]
    util = g.get("utilization") or {}
    mem = g.get("memory") or {}
    power = g.get("power") or {}
    clocks = g.get("clocks") or {}
    pcie = g.get("pcie") or {}
    rx, tx = _num(pcie.get("rx_bytes_per_s")), _num(pcie.get("tx_bytes_per_s"))
    name = g.get("name")
    sample = Sample(
        ts=event_time(event), event_id=eid, uuid=g["uuid"], index=g["index"],
        name=name if isinstance(name, str) else None,
        util=_num(util.get("gpu_pct")), mem_pct=_num(util.get("memory_pct")),
        used=_num(mem.get("used_bytes")), total=_num(mem.get("total_bytes")),
        power=_num(power.get("draw_watts")), limit=_num(power.get("limit_watts")),
        sm=_num(clocks.get("sm_mhz")), memclk=_num(clocks.get("mem_mhz")),
        pcie=None if rx is None and tx is None else (rx or 0.0) + (tx or 0.0),
        procs=_procs(g.get("processes")),
    )
    _last = (event, eid, sample)
    return sample


# Order of the per-window sums in _Acc.sums / _Acc.counts.
_MEM_PCT, _POWER, _LIMIT, _SM, _MEMCLK, _PCIE, _USED, _TOTAL = range(8)


@dataclass(slots=True)
class _Acc:
    """Running sums of one open window (a few floats: it is pickled into checkpoints)."""

    start: float
    n: int = 0
    n_util: int = 0
    util_sum: float = 0.0
    util_sq: float = 0.0
    util_min: float = math.inf
    util_max: float = -math.inf
    busy: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0] * 8)
    counts: list[int] = field(default_factory=lambda: [0] * 8)
    last_event_id: str = ""


@dataclass(slots=True)
class Window:
    """A closed window of one GPU: its features and the last event in it (the evidence)."""

    uuid: str
    index: int
    start: float
    end: float
    samples: int
    features: dict[str, float | None]
    event_id: str


class GpuWindows:
    """Per-GPU tumbling windows; also remembers each GPU's reference maxima (clocks, power limit)."""

    __slots__ = ("window_s", "busy_pct", "_open", "_ref", "_last")

    def __init__(self, window_s: float, busy_pct: float) -> None:
        self.window_s = window_s
        self.busy_pct = busy_pct
        self._open: dict[str, _Acc] = {}
        # uuid -> [max sm MHz, max mem MHz, max power limit, GPU name]
        self._ref: dict[str, list[Any]] = {}
        # The last sample added and the window it closed: the detectors of one host share one
        # GpuWindows (see host_windows), and each adds every sample; only the first add counts.
        self._last: tuple[Sample, Window | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "busy_pct": self.busy_pct, "_open": self._open, "_ref": self._ref}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last = None
        for key, value in state.items():
            setattr(self, key, value)

    def add(self, s: Sample) -> Window | None:
        """Add a sample; return the window it closed, if it is the first of a new one.

        Adding the sample that was added last (the same object: another detector of the host
        passing on the event it just saw) changes nothing and returns the same answer.
        """
        last = self._last
        if last is not None and last[0] is s:
            return last[1]
        start = s.ts - (s.ts % self.window_s)
        acc = self._open.get(s.uuid)
        closed = None
        if acc is None or start > acc.start:
            if acc is not None and acc.n:
                closed = self._close(s.uuid, s.index, acc)
            acc = self._open[s.uuid] = _Acc(start)
        elif start < acc.start:
            self._last = (s, None)
            return None  # a late sample of a window already closed: too late to count
        self._accumulate(acc, s)
        self._last = (s, closed)
        return closed

    def _accumulate(self, acc: _Acc, s: Sample) -> None:
        acc.n += 1
        acc.last_event_id = s.event_id
        if s.util is not None:
            u = s.util
            acc.n_util += 1
            acc.util_sum += u
            acc.util_sq += u * u
            acc.util_min = min(acc.util_min, u)
            acc.util_max = max(acc.util_max, u)
            if u >= self.busy_pct:
                acc.busy += 1
        ref = self._ref.get(s.uuid)
        if ref is None:
            ref = self._ref[s.uuid] = [0.0, 0.0, 0.0, None]
        if s.name:
            ref[3] = s.name
        sums, counts = acc.sums, acc.counts
        # Unrolled: this runs for every sample of every GPU in every windowed detector.
        v = s.mem_pct
        if v is not None:
            sums[_MEM_PCT] += v
            counts[_MEM_PCT] += 1
        v = s.power
        if v is not None:
            sums[_POWER] += v
            counts[_POWER] += 1
        v = s.limit
        if v is not None:
            sums[_LIMIT] += v
            counts[_LIMIT] += 1
        v = s.sm
        if v is not None:
            sums[_SM] += v
            counts[_SM] += 1
        v = s.memclk
        if v is not None:
            sums[_MEMCLK] += v
            counts[_MEMCLK] += 1
        v = s.pcie
        if v is not None:
            sums[_PCIE] += v
            counts[_PCIE] += 1
        v = s.used
        if v is not None:
            sums[_USED] += v
            counts[_USED] += 1
        v = s.total
        if v is not None:
            sums[_TOTAL] += v
            counts[_TOTAL] += 1
        if s.sm is not None and s.sm > ref[0]:
            ref[0] = s.sm
        if s.memclk is not None and s.memclk > ref[1]:
            ref[1] = s.memclk
        if s.limit is not None and s.limit > ref[2]:
            ref[2] = s.limit

    def _close(self, uuid: str, index: int, acc: _Acc) -> Window:
        def mean(i: int) -> float | None:
            n = acc.counts[i]
            return acc.sums[i] / n if n else None

        ref = self._ref.get(uuid) or [0.0, 0.0, 0.0, None]
        spec = spec_for(ref[3])
        max_sm = max(spec.max_sm_mhz if spec else 0.0, ref[0])
        max_memclk = max(spec.mem_mhz if spec else 0.0, ref[1])
        tdp = spec.tdp_watts if spec else ref[2]
        util_mean = util_std = util_min = util_max = None
        if acc.n_util:
            util_mean = acc.util_sum / acc.n_util
            util_std = math.sqrt(max(0.0, acc.util_sq / acc.n_util - util_mean * util_mean))
            util_min, util_max = acc.util_min, acc.util_max
        power, limit, sm, memclk = mean(_POWER), mean(_LIMIT), mean(_SM), mean(_MEMCLK)
        used, total, pcie = mean(_USED), mean(_TOTAL), mean(_PCIE)
        features: dict[str, float | None] = {
            "util_mean": util_mean, "util_std": util_std, "util_min": util_min, "util_max": util_max,
            "mem_pct": mean(_MEM_PCT),
            "used_frac": used / total if used is not None and total else None,
            "used_gib": used / 2**30 if used is not None else None,
            "power_frac": power / limit if power is not None and limit else None,
            "limit_frac": limit / tdp if limit is not None and tdp else None,
            "sm_frac": sm / max_sm if sm is not None and max_sm else None,
            "memclk_frac": memclk / max_memclk if memclk is not None and max_memclk else None,
            "pcie_log": math.log10(1.0 + max(0.0, pcie)) if pcie is not None else None,
            "busy_frac": acc.busy / acc.n_util if acc.n_util else None,
        }
        return Window(uuid, index, acc.start, acc.start + self.window_s, acc.n, features, acc.last_event_id)


def host_windows(shared: dict[str, Any], window_s: float, busy_pct: float) -> GpuWindows:
    """The one :class:`GpuWindows` the windowed GPU detectors of a host share (built by the first).

    Summing each sample into a window once per host rather than once per detector is most of
    what the GPU detectors cost per sample; the windows and their features are the same for all.
    """
    key = f"gpu.windows/{window_s:g}/{busy_pct:g}"
    windows = shared.get(key)
    if not isinstance(windows, GpuWindows):
        windows = shared[key] = GpuWindows(window_s, busy_pct)
    return windows
