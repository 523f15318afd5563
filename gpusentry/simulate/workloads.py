"""What GPU workloads look like through NVML, sample by sample.

Each workload runs on one GPU and is asked for its load in time order (``sample``); it keeps its
own seeded random state, so a host's samples are reproducible.  The figures follow what these
programs show on real boards: training sits at 93-99 % with checkpoint dips and streams GB/s over
PCIe; LLM serving fills the board (KV cache) and bursts with requests; gpu-burn pins 100 % with
the board full at the power limit; NVENC transcoding keeps the SMs a third busy; miners pin
100 % on a DAG-sized allocation with the memory controller saturated, almost no PCIe traffic and,
when tuned, a lowered power limit and core clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from gpusentry.gpuspecs import GIB, GpuSpec


@dataclass(slots=True)
class Load:
    util: float = 0.0
    mem_pct: float = 0.0
    used_bytes: float = 0.0
    power_w: float = 0.0  # above idle
    sm_frac: float | None = None  # clock wanted, as a fraction of the maximum
    memclk_frac: float | None = None
    pcie: float = 0.0  # bytes/s both directions
    limit_frac: float | None = None  # power limit set by this workload (miners lower it)


@dataclass
class GpuProgram:
    """The process a workload shows in NVML's process list."""

    pid: int
    name: str
    executable: str
    command_line: str
    owner: dict[str, Any] | None = None  # the pod/job its cgroup names (gpu.processes[].owner)


def _clamp(v: float, lo: float = 0.0, hi: float = 100.0) -> float:
    return lo if v < lo else hi if v > hi else v


@dataclass
class Workload:
    spec: GpuSpec
    rng: random.Random
    program: GpuProgram | None = None

    def sample(self, t: float) -> Load:
        raise NotImplementedError


@dataclass
class Training(Workload):
    """Data-parallel training: busy, board nearly full, PCIe busy, checkpoint/eval dips."""

    dip_period_s: float = 600.0
    dip_len_s: float = 45.0
    phase_s: float = 0.0
    footprint: float = field(default=0.0)

    def __post_init__(self) -> None:
        if not self.footprint:
            self.footprint = self.rng.uniform(0.82, 0.94)

    def sample(self, t: float) -> Load:
        r = self.rng
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        used = self.footprint * self.spec.memory_bytes
        if (t + self.phase_s) % self.dip_period_s > self.dip_period_s - self.dip_len_s:
            return Load(util=r.uniform(0, 8), mem_pct=r.uniform(1, 8), used_bytes=used, power_w=0.15 * tdp,
                        sm_frac=1.0, pcie=r.uniform(1.5e9, 3e9))
        util = _clamp(r.gauss(96, 2.2))
        return Load(util=util, mem_pct=_clamp(r.gauss(48, 7)), used_bytes=used,
                    power_w=r.uniform(0.75, 0.95) * tdp, sm_frac=r.uniform(0.95, 1.0), pcie=r.uniform(1.5e9, 9e9))


@dataclass
class Inference(Workload):
    """Model serving under bursty request load (vLLM/Triton): KV cache fills the board."""

    footprint: float = 0.9
    _until: float = 0.0
    _on: bool = False
    _level: float = 0.0

    def sample(self, t: float) -> Load:
        r = self.rng
        while t >= self._until:
            self._on = not self._on
            self._until += r.expovariate(1 / (25.0 if self._on else 40.0)) + 2.0
            self._level = r.uniform(30, 90)
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        used = self.footprint * self.spec.memory_bytes
        if not self._on:
            return Load(util=r.uniform(0, 3), mem_pct=r.uniform(0, 2), used_bytes=used, power_w=0.05 * tdp,
                        sm_frac=r.uniform(0.6, 1.0), pcie=r.uniform(1e4, 1e5))
        util = _clamp(r.gauss(self._level, 9))
        return Load(util=util, mem_pct=_clamp(util * r.uniform(0.6, 0.9)), used_bytes=used,
                    power_w=util / 100 * r.uniform(0.6, 0.8) * tdp, sm_frac=r.uniform(0.95, 1.0),
                    pcie=r.uniform(5e6, 8e7))


@dataclass
class Notebook(Workload):
    """An interactive notebook: idle, with a cell that runs for a minute or two now and then."""

    _until: float = 0.0
    _on: bool = True
    _level: float = 0.0
    _used: float = 2.0 * GIB

    def sample(self, t: float) -> Load:
        r = self.rng
        while t >= self._until:
            self._on = not self._on
            self._until += r.uniform(20, 120) if self._on else r.expovariate(1 / 240.0) + 30
            self._level = r.uniform(20, 95)
            if self._on:
                self._used = min(self._used + r.uniform(0, 3) * GIB, 0.6 * self.spec.memory_bytes)
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        if not self._on:
            return Load(util=0, mem_pct=0, used_bytes=self._used, power_w=0.03 * tdp, pcie=r.uniform(1e4, 5e4))
        util = _clamp(r.gauss(self._level, 10))
        return Load(util=util, mem_pct=_clamp(util * r.uniform(0.3, 0.7)), used_bytes=self._used,
                    power_w=util / 100 * 0.7 * tdp, sm_frac=r.uniform(0.95, 1.0), pcie=r.uniform(1e7, 5e8))


@dataclass
class GpuBurn(Workload):
    """gpu-burn: DGEMM at 100 %, ~90 % of the memory, held at the stock power limit (clocks throttle)."""

    def sample(self, t: float) -> Load:
        r = self.rng
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        return Load(util=_clamp(r.gauss(99.6, 0.4)), mem_pct=_clamp(r.gauss(30, 4)),
                    used_bytes=0.9 * self.spec.memory_bytes, power_w=r.uniform(0.97, 1.02) * tdp,
                    sm_frac=r.uniform(0.84, 0.92), pcie=r.uniform(1e3, 1e4))


@dataclass
class DcgmDiag(Workload):
    """``dcgmi diag -r 3``: PCIe bandwidth, memory, targeted power and stress phases in turn."""

    def sample(self, t: float) -> Load:
        r = self.rng
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        phase = int(t // 60) % 4
        if phase == 0:  # PCIe bandwidth
            return Load(util=r.uniform(20, 45), mem_pct=r.uniform(10, 30), used_bytes=2 * GIB,
                        power_w=0.3 * tdp, sm_frac=1.0, pcie=r.uniform(1.2e10, 2.4e10))
        if phase == 1:  # memory test
            return Load(util=_clamp(r.gauss(99, 1)), mem_pct=_clamp(r.gauss(95, 3)),
                        used_bytes=0.92 * self.spec.memory_bytes, power_w=0.7 * tdp, sm_frac=1.0,
                        pcie=r.uniform(1e4, 1e6))
        if phase == 2:  # targeted power
            return Load(util=_clamp(r.gauss(99.5, 0.5)), mem_pct=r.uniform(20, 40),
                        used_bytes=0.5 * self.spec.memory_bytes, power_w=r.uniform(0.98, 1.02) * tdp,
                        sm_frac=r.uniform(0.8, 0.9), pcie=r.uniform(1e4, 1e5))
        return Load(util=_clamp(r.gauss(99, 1)), mem_pct=r.uniform(40, 70), used_bytes=0.8 * self.spec.memory_bytes,
                    power_w=r.uniform(0.9, 1.0) * tdp, sm_frac=r.uniform(0.85, 0.95), pcie=r.uniform(1e6, 1e8))


@dataclass
class NvBandwidth(Workload):
    """nvbandwidth: host<->device and device<->device copies, PCIe saturated."""

    def sample(self, t: float) -> Load:
        r = self.rng
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        return Load(util=r.uniform(5, 40), mem_pct=r.uniform(20, 60), used_bytes=4 * GIB, power_w=0.35 * tdp,
                    sm_frac=1.0, pcie=r.uniform(1.5e10, 2.6e10))


@dataclass
class Transcode(Workload):
    """ffmpeg with NVDEC/NVENC and CUDA scaling: SMs a third busy, a GB or two, frames over PCIe."""

    def sample(self, t: float) -> Load:
        r = self.rng
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        util = _clamp(r.gauss(32, 7))
        return Load(util=util, mem_pct=_clamp(r.gauss(18, 4)), used_bytes=r.uniform(1.2, 1.4) * GIB,
                    power_w=r.uniform(0.3, 0.45) * tdp, sm_frac=r.uniform(0.95, 1.0), pcie=r.uniform(3e7, 2e8))


# DAG / scratchpad sizes and memory-controller load by algorithm.
ALGORITHMS = {
    "etchash": (5.4, 6.2, 88, 98),
    "ethash": (5.8, 6.4, 90, 99),
    "kawpow": (4.0, 4.6, 75, 92),
    "autolykos2": (3.2, 4.0, 85, 95),
}


@dataclass
class Miner(Workload):
    """A GPU miner; ``tuned`` lowers the power limit and core clock and raises the memory clock.

    ``intensity`` below 1 throttles it (fewer, shorter kernels); ``on_s``/``off_s`` make it
    duty-cycled (paused, memory still held, between bursts); ``share`` is the fraction of the SMs
    it gets when it shares the GPU with another job.
    """

    algorithm: str = "etchash"
    tuned: bool = True
    intensity: float = 1.0
    on_s: float | None = None
    off_s: float | None = None
    share: float = 1.0
    phase_s: float = 0.0
    _dag: float = 0.0
    _mem: float = 0.0
    _limit: float = 1.0
    _sm: float = 1.0
    _memclk: float = 1.0

    def __post_init__(self) -> None:
        r = self.rng
        lo, hi, mlo, mhi = ALGORITHMS[self.algorithm]
        self._dag = r.uniform(lo, hi) * GIB
        self._mem = r.uniform(mlo, mhi)
        if self.tuned:
            self._limit, self._sm, self._memclk = r.uniform(0.6, 0.75), r.uniform(0.55, 0.78), r.uniform(1.0, 1.06)
        else:
            self._limit, self._sm, self._memclk = 1.0, r.uniform(0.92, 1.0), 1.0

    def sample(self, t: float) -> Load:
        r = self.rng
        tdp = self.spec.tdp_watts - self.spec.idle_watts
        if self.on_s and self.off_s and (t + self.phase_s) % (self.on_s + self.off_s) >= self.on_s:
            return Load(util=0, mem_pct=0, used_bytes=self._dag, power_w=0.04 * tdp, limit_frac=self._limit,
                        pcie=r.uniform(1e3, 5e3))
        full = _clamp(r.gauss(99.7, 0.3))
        util = full * self.intensity * self.share
        draw = (self._limit * r.uniform(0.93, 0.99) if self.tuned else r.uniform(0.75, 0.92)) * tdp
        return Load(util=util, mem_pct=_clamp(r.gauss(self._mem, 1.5) * self.intensity * self.share),
                    used_bytes=self._dag, power_w=draw * self.intensity * self.share, sm_frac=self._sm,
                    memclk_frac=self._memclk, pcie=r.uniform(2e3, 2e4), limit_frac=self._limit)


def combine(spec: GpuSpec, loads: list[Load], rng: random.Random) -> dict[str, float]:
    """One GPU's NVML numbers from the loads of the workloads running on it."""
    util = _clamp(sum(ld.util for ld in loads))
    mem_pct = _clamp(sum(ld.mem_pct for ld in loads))
    reserved = 0.45 * GIB
    used = min(reserved + sum(ld.used_bytes for ld in loads), 0.995 * spec.memory_bytes)
    limits = [ld.limit_frac for ld in loads if ld.limit_frac is not None]
    limit = spec.tdp_watts * (min(limits) if limits else 1.0)
    power = min(spec.idle_watts + sum(ld.power_w for ld in loads), limit * 1.01) + rng.gauss(0, 0.01 * spec.tdp_watts)
    power = max(power, spec.idle_watts * 0.8)
    busy = util >= 5
    sms = [ld.sm_frac for ld in loads if ld.sm_frac is not None]
    sm_frac = min(sms) if sms and busy else 0.11 + rng.uniform(0, 0.06)
    memclks = [ld.memclk_frac for ld in loads if ld.memclk_frac is not None]
    memclk = spec.mem_mhz * (max(memclks) if memclks else 1.0)
    pcie = sum(ld.pcie for ld in loads) + rng.uniform(1e3, 3e4)
    temp = 30 + 50 * power / spec.tdp_watts + rng.gauss(0, 0.5)
    return {"util": round(util), "mem_pct": round(mem_pct), "used": int(used), "power": round(power, 2),
            "limit": round(limit, 2), "sm": round(spec.max_sm_mhz * sm_frac / 15) * 15, "memclk": round(memclk),
            "pcie": round(pcie), "temp": round(temp), "busy": float(busy)}


def log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))
