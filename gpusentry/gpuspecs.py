"""Reference figures of common data-centre GPUs: board power, clocks and memory.

The mining-signature detector compares a GPU's observed power limit and clocks with what its
model ships with (a miner lowers the power limit and the core clock and raises the memory
clock); the simulator uses the same figures to draw realistic samples.  A GPU not listed falls
back to the largest values seen on it (:func:`spec_for` returns ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuSpec:
    key: str  # matched case-insensitively inside NVML's product name
    product_name: str  # what NVML reports, e.g. "NVIDIA H100 80GB HBM3"
    tdp_watts: float  # default power limit
    max_sm_mhz: float  # maximum boost SM clock
    mem_mhz: float  # stock memory clock
    memory_bytes: int
    idle_watts: float


# Longest keys are matched first, so "H100 PCIe" wins over "H100".
SPECS: tuple[GpuSpec, ...] = (
    GpuSpec("H200", "NVIDIA H200", 700, 1980, 3201, 141 * GIB, 75),
    GpuSpec("H100 PCIe", "NVIDIA H100 PCIe", 350, 1755, 1593, 80 * GIB, 50),
    GpuSpec("H100", "NVIDIA H100 80GB HBM3", 700, 1980, 2619, 80 * GIB, 70),
    GpuSpec("A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", 400, 1410, 1593, 80 * GIB, 55),
    GpuSpec("A100", "NVIDIA A100-SXM4-40GB", 400, 1410, 1215, 40 * GIB, 50),
    GpuSpec("L40S", "NVIDIA L40S", 350, 2520, 9001, 48 * GIB, 35),
    GpuSpec("L4", "NVIDIA L4", 72, 2040, 6251, 24 * GIB, 16),
    GpuSpec("A10", "NVIDIA A10", 150, 1695, 6251, 24 * GIB, 20),
    GpuSpec("T4", "Tesla T4", 70, 1590, 5001, 16 * GIB, 10),
    GpuSpec("V100", "Tesla V100-SXM2-32GB", 300, 1530, 877, 32 * GIB, 40),
)
_BY_LENGTH = sorted(SPECS, key=lambda s: len(s.key), reverse=True)
_cache: dict[str, GpuSpec | None] = {}


def spec_for(gpu_name: str | None) -> GpuSpec | None:
    """The reference figures of the GPU whose NVML name is ``gpu_name``, or ``None`` if unknown."""
    if not gpu_name:
        return None
    try:
        return _cache[gpu_name]
    except KeyError:
        pass
    lowered = gpu_name.lower()
    found = next((s for s in _BY_LENGTH if s.key.lower() in lowered), None)
    if len(_cache) < 256:  # names come from input; keep the memo bounded
        _cache[gpu_name] = found
    return found
