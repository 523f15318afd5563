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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detectors.gpu._allocation import GpuAllocation, ProcOwner, read_allocation
from gpusentry.contract import event_time
from gpusentry.gpuspecs import spec_for

if TYPE_CHECKING:
    from detectors.gpu._ownership import ProcessTable

# The feature names a window summary carries; models pick the ones they use.
FEATURES = ("util_mean", "util_std", "util_min", "util_max", "mem_pct", "used_frac", "used_gib", "power_frac",
            "limit_frac", "sm_frac", "memclk_frac", "pcie_log", "busy_frac")


@dataclass(slots=True)
class GpuProc:
    """Who a process on a GPU is: what detectors read of it (not its memory or SM figures, which change
    from sample to sample and which no detector uses)."""

    pid: int
    name: str | None
    executable: str | None
    command_line: str | None
    owner: ProcOwner | None = None  # the pod, job or container its cgroup names


@dataclass(slots=True)
class Sample:
    """The numbers of one ``gpusentry.gpu`` event, with ``None`` for what was not reported."""

    ts: float
    event_id: str
    uuid: str
    index: int
    name: str | None
    util: float | None
    limit: float | None
    procs: list[GpuProc] | None  # None: not reported
    pids: tuple[int, ...] | None  # the pids of procs, in order (cheap to compare with the last sample's)
    # The numbers windows summarise (columns _UTIL.._TOTAL), as reported: only util and limit,
    # which detectors read per sample, are checked here; the window drops what is not a finite
    # number when it closes, once for all its samples.
    row: tuple[Any, ...]
    # Which of procs the allowlist owns, worked out by the first detector that asks and kept for
    # the others: (allowlist, process table, one verdict per process); see _ownership.owned_flags.
    owned: tuple[Any, Any, list[bool]] | None = None
    # Set by GpuWindows.add: this sample repeats what its GPU's previous sample said about everything but
    # the figures windows summarise (same process list, same busy or idle state, same power limit, no
    # process event since).  Detectors whose per-sample work depends only on those skip it.
    steady: bool = False
    # The scheduler's answer for this GPU, where the agent asked one (gpusentry.allocation.*).
    allocation: GpuAllocation | None = None


def _num(value: Any) -> float | None:
    # bool is an int; the contract rejects it, but a detector must not trust that blindly.
    kind = type(value)
    if kind is float:
        return value if value - value == 0.0 else None  # inf - inf and nan - nan are nan
    return value if kind is int else None


def _procs(raw: list[Any]) -> list[GpuProc]:
    out: list[GpuProc] = []
    for p in raw:
        if type(p) is not dict:
            continue
        pid = p.get("pid")
        if type(pid) is not int:
            continue
        name, exe, cmd = p.get("name"), p.get("executable"), p.get("command_line")
        owner = p.get("owner")
        out.append(GpuProc(pid, name if type(name) is str else None, exe if type(exe) is str else None,
                           cmd if type(cmd) is str else None, ProcOwner.of(owner) if owner is not None else None))
    return out


def _procs_key(raw: list[Any]) -> list[Any]:
    """What :func:`_procs` reads of a raw process list: equal keys parse to equal lists."""
    return [(p.get("pid"), p.get("name"), p.get("executable"), p.get("command_line"), p.get("owner"))
            if type(p) is dict else None for p in raw]


_EMPTY: dict[str, Any] = {}
# uuid -> (the raw process list of its last sample, its key, what it parsed to, its pids).  A GPU's
# processes rarely change between samples, though their memory and SM figures do: comparing the list
# (or, when a figure changed, its key) with the last one costs less than parsing it again, and
# handing out the same parsed list lets the detectors see at a glance that nothing changed
# (Sample.steady, the allowlist verdicts' memo).  Parsed lists are never changed once built.
_PROCS_SEEN: dict[str, tuple[list[Any], list[Any], list[GpuProc], tuple[int, ...]]] = {}
_PROCS_SEEN_MAX = 65536


def read_sample(event: dict[str, Any], ts: float | None = None) -> Sample:
    """The :class:`Sample` of a validated GPU event (``ts``: its event time, when the caller has it).

    In an engine this runs once per event for all the GPU detectors (``Detector.parses``).
    """
    g = event["gpu"]
    util = g.get("utilization") or _EMPTY
    mem = g.get("memory") or _EMPTY
    power = g.get("power") or _EMPTY
    clocks = g.get("clocks") or _EMPTY
    pcie = g.get("pcie") or _EMPTY
    name = g.get("name")
    gpu_pct, limit = _num(util.get("gpu_pct")), _num(power.get("limit_watts"))
    uuid = g["uuid"]
    raw = g.get("processes")
    seen = _PROCS_SEEN.get(uuid)
    procs: list[GpuProc] | None
    pids: tuple[int, ...] | None
    if seen is not None and seen[0] == raw:
        procs, pids = seen[2], seen[3]
    elif type(raw) is not list:
        procs = pids = None
    else:
        key = _procs_key(raw)
        if seen is not None and seen[1] == key:  # the same processes; only their figures changed
            procs, pids = seen[2], seen[3]
        else:
            procs = _procs(raw)
            pids = tuple([p.pid for p in procs])
            if len(_PROCS_SEEN) >= _PROCS_SEEN_MAX:
                _PROCS_SEEN.clear()
        _PROCS_SEEN[uuid] = (raw, key, procs, pids)
    return Sample(event_time(event) if ts is None else ts, event["event"]["id"], uuid, g["index"],
                  name if type(name) is str else None, gpu_pct, limit, procs, pids,
                  (gpu_pct, util.get("memory_pct"), power.get("draw_watts"), limit, clocks.get("sm_mhz"),
                   clocks.get("mem_mhz"), pcie.get("rx_bytes_per_s"), pcie.get("tx_bytes_per_s"),
                   mem.get("used_bytes"), mem.get("total_bytes")),
                  allocation=read_allocation(event, uuid) if "gpusentry" in event else None)


# Order of the numbers in Sample.row (the columns of an open window).
_UTIL, _MEM_PCT, _POWER, _LIMIT, _SM, _MEMCLK, _PCIE_RX, _PCIE_TX, _USED, _TOTAL = range(10)
# Samples an open window keeps (a window of 600 s sampled every second); any more in the same
# window count but are not summarised.
MAX_ROWS = 600


@dataclass(slots=True)
class _Acc:
    """One open window: the numbers of its samples, summarised when it closes.

    Keeping the rows (a tuple of ten numbers per sample) and summing them in bulk at the close
    costs less per sample than updating running sums, and stays small: a 30 s window sampled
    every 5 s holds six rows.
    """

    start: float
    n: int = 0
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    name: str | None = None  # the GPU's product name, as last reported in the window
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
    """Per-GPU tumbling windows; also remembers each GPU's reference maxima (clocks, power limit).

    It also tells whether a sample is *steady* (:attr:`Sample.steady`): whether it repeats what the
    GPU's previous sample said about its processes, busy or idle state and power limit, with no
    process event in ``table`` since.  A steady sample that closes no window changes nothing for the
    detectors that only react to those, so they skip it.
    """

    __slots__ = ("window_s", "busy_pct", "table", "_open", "_ref", "_last", "_inputs")

    def __init__(self, window_s: float, busy_pct: float, table: ProcessTable | None = None) -> None:
        self.window_s = window_s
        self.busy_pct = busy_pct
        self.table = table  # the host's process table (its version changes with every process event)
        self._open: dict[str, _Acc] = {}
        # uuid -> [max sm MHz, max mem MHz, max power limit, GPU name]
        self._ref: dict[str, list[Any]] = {}
        # The last sample added and the window it closed: the detectors of one host share one
        # GpuWindows (see host_windows), and each adds every sample; only the first add counts.
        self._last: tuple[Sample, Window | None] | None = None
        # uuid -> what its last sample said that detectors react to (see add).  Not checkpointed: after
        # a restore the first sample of each GPU is not steady, so every detector looks at it.
        self._inputs: dict[str, tuple[Any, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "busy_pct": self.busy_pct, "table": self.table, "_open": self._open,
                "_ref": self._ref}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last = None
        self._inputs = {}
        self.table = None
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
        util = s.util
        table = self.table
        # Equal process lists are usually the same object (read_sample reuses an unchanged list), so
        # comparing them costs an identity test.
        inputs = (s.procs, None if util is None else util >= self.busy_pct, s.limit,
                  -1 if table is None else table.version)
        uuid = s.uuid
        s.steady = self._inputs.get(uuid) == inputs
        self._inputs[uuid] = inputs
        ts = s.ts
        start = ts - (ts % self.window_s)
        acc = self._open.get(uuid)
        closed = None
        if acc is None or start > acc.start:
            if acc is not None and acc.n:
                closed = self._close(uuid, s.index, acc)
            acc = self._open[uuid] = _Acc(start)
        elif start < acc.start:
            self._last = (s, None)
            return None  # a late sample of a window already closed: too late to count
        if acc.n < MAX_ROWS:
            acc.rows.append(s.row)
        acc.n += 1
        acc.last_event_id = s.event_id
        if s.name:
            acc.name = s.name
        self._last = (s, closed)
        return closed

    def _close(self, uuid: str, index: int, acc: _Acc) -> Window:
        columns = list(zip(*acc.rows, strict=True))
        try:
            sums = [sum(column) for column in columns]
            total = sum(sums)
            complete = total - total == 0.0  # every sample reported every number, all finite
        except TypeError:  # a None (not reported) somewhere, or something that is not a number
            complete = False
        if complete:
            return self._close_complete(uuid, index, acc, columns, sums)
        return self._close_general(uuid, index, acc, columns)

    def _references(self, uuid: str, name: str | None, sm: Sequence[float], memclk: Sequence[float],
                    limit: Sequence[float]) -> tuple[float, float, float | None]:
        """The GPU's maximum core and memory clocks and its board power, against which a window's are fractions.

        The product's datasheet figures where ``name`` is a known GPU, raised by the highest values seen
        (finite ones: ``sm``, ``memclk``, ``limit``); the board power of an unknown GPU is its highest limit.
        """
        ref = self._ref.get(uuid)
        if ref is None:
            ref = self._ref[uuid] = [0.0, 0.0, 0.0, None]
        if name:
            ref[3] = name
        for slot, values in ((0, sm), (1, memclk), (2, limit)):
            if values:
                top = max(values)
                if top > ref[slot]:
                    ref[slot] = top
        spec = spec_for(ref[3])
        max_sm = max(spec.max_sm_mhz if spec else 0.0, ref[0])
        max_memclk = max(spec.mem_mhz if spec else 0.0, ref[1])
        return max_sm, max_memclk, spec.tdp_watts if spec else ref[2]

    def _close_general(self, uuid: str, index: int, acc: _Acc, columns: list[tuple[Any, ...]]) -> Window:
        """Summarise a window whose samples may lack numbers or carry non-finite ones."""
        limit, sm, memclk = _finite(columns[_LIMIT]), _finite(columns[_SM]), _finite(columns[_MEMCLK])
        max_sm, max_memclk, tdp = self._references(uuid, acc.name, sm, memclk, limit)
        util_mean = util_std = util_min = util_max = busy_frac = None
        utils = [u for u in columns[_UTIL] if u is not None]  # checked when read
        if utils:
            n_util = len(utils)
            util_mean = sum(utils) / n_util
            util_std = math.sqrt(max(0.0, sum([u * u for u in utils]) / n_util - util_mean * util_mean))
            util_min, util_max = min(utils), max(utils)
            busy_pct = self.busy_pct
            busy_frac = len([u for u in utils if u >= busy_pct]) / n_util
        power_mean, limit_mean, sm_mean, memclk_mean = _mean(columns[_POWER]), _mean(limit), _mean(sm), _mean(memclk)
        used, total = _mean(columns[_USED]), _mean(columns[_TOTAL])
        rx, tx = columns[_PCIE_RX], columns[_PCIE_TX]
        if _finite(rx) is rx and _finite(tx) is tx:  # both reported by every sample
            pcie = _mean([a + b for a, b in zip(rx, tx, strict=True)])
        else:
            rx_tx = [(_num(a), _num(b)) for a, b in zip(rx, tx, strict=True)]
            pcie = _mean([(a or 0.0) + (b or 0.0) for a, b in rx_tx if a is not None or b is not None])
        features: dict[str, float | None] = {
            "util_mean": util_mean, "util_std": util_std, "util_min": util_min, "util_max": util_max,
            "mem_pct": _mean(columns[_MEM_PCT]),
            "used_frac": used / total if used is not None and total else None,
            "used_gib": used / 2**30 if used is not None else None,
            "power_frac": power_mean / limit_mean if power_mean is not None and limit_mean else None,
            "limit_frac": limit_mean / tdp if limit_mean is not None and tdp else None,
            "sm_frac": sm_mean / max_sm if sm_mean is not None and max_sm else None,
            "memclk_frac": memclk_mean / max_memclk if memclk_mean is not None and max_memclk else None,
            "pcie_log": math.log10(1.0 + max(0.0, pcie)) if pcie is not None else None,
            "busy_frac": busy_frac,
        }
        return Window(uuid, index, acc.start, acc.start + self.window_s, acc.n, features, acc.last_event_id)

    def _close_complete(self, uuid: str, index: int, acc: _Acc, columns: list[tuple[Any, ...]],
                        sums: list[float]) -> Window:
        """:meth:`_close` when every sample reported every number: the same figures, from whole-column sums."""
        n = len(columns[0])
        max_sm, max_memclk, tdp = self._references(uuid, acc.name, columns[_SM], columns[_MEMCLK], columns[_LIMIT])
        utils = columns[_UTIL]
        util_mean = sums[_UTIL] / n
        busy_pct = self.busy_pct
        power, limit, sm, memclk = sums[_POWER] / n, sums[_LIMIT] / n, sums[_SM] / n, sums[_MEMCLK] / n
        used, total = sums[_USED] / n, sums[_TOTAL] / n
        pcie = sum([a + b for a, b in zip(columns[_PCIE_RX], columns[_PCIE_TX], strict=True)]) / n
        features: dict[str, float | None] = {
            "util_mean": util_mean,
            "util_std": math.sqrt(max(0.0, sum([u * u for u in utils]) / n - util_mean * util_mean)),
            "util_min": min(utils), "util_max": max(utils),
            "mem_pct": sums[_MEM_PCT] / n,
            "used_frac": used / total if total else None,
            "used_gib": used / 2**30,
            "power_frac": power / limit if limit else None,
            "limit_frac": limit / tdp if tdp else None,
            "sm_frac": sm / max_sm if max_sm else None,
            "memclk_frac": memclk / max_memclk if max_memclk else None,
            "pcie_log": math.log10(1.0 + max(0.0, pcie)),
            "busy_frac": len([u for u in utils if u >= busy_pct]) / n,
        }
        return Window(uuid, index, acc.start, acc.start + self.window_s, acc.n, features, acc.last_event_id)


def _finite(column: Sequence[Any]) -> Sequence[float]:
    """The finite numbers of a column (None, strings, nan and inf are not): the column itself when all are."""
    try:
        total = sum(column)
    except TypeError:  # a None (not reported) or something that is not a number
        pass
    else:
        if total - total == 0.0:
            return column
    return [v for v in column if (type(v) is float and v - v == 0.0) or type(v) is int]


def _mean(column: Sequence[Any]) -> float | None:
    values = _finite(column)
    return sum(values) / len(values) if values else None


def host_windows(shared: dict[str, Any], window_s: float, busy_pct: float, table: ProcessTable) -> GpuWindows:
    """The one :class:`GpuWindows` the GPU detectors of a host share (built by the first).

    Summing each sample into a window once per host rather than once per detector is most of
    what the GPU detectors cost per sample; the windows and their features are the same for all.
    ``table`` is the host's process table (``_ownership.host_process_table(shared)``).
    """
    key = f"gpu.windows/{window_s:g}/{busy_pct:g}"
    windows = shared.get(key)
    if not isinstance(windows, GpuWindows) or windows.table is not table:
        windows = shared[key] = GpuWindows(window_s, busy_pct, table)
    return windows
