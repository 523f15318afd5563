"""Labelled fleet scenarios in the event contract: benign AI work and GPU/compute hijacks.

Python API::

    from gpusentry.simulate import SCENARIOS, generate, simulate_host

    for event in generate("miner-renamed", "gpu-node-3", start=1.79e9, duration_s=1800, interval_s=5, seed=7):
        ...  # contract events in time order

    label, events = simulate_host("training", "gpu-node-4", start=1.79e9, duration_s=1800, interval_s=5, seed=7)
    label.attack_start  # None for benign scenarios

``SCENARIOS`` maps a name to its :class:`~gpusentry.simulate.scenarios.Scenario` (``label`` is
``benign`` or ``hijack``).  Everything is deterministic for a given seed and host name.  Labels
never appear in the events: the CLI writes them to a separate file.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from gpusentry.gpuspecs import SPECS, GpuSpec
from gpusentry.simulate.host import HostSim
from gpusentry.simulate.scenarios import BENIGN, HIJACK, SCENARIOS, Scenario

# GPU models the fleet is drawn from, and the agent sampling intervals (seconds).
FLEET_GPUS = ("H100", "A100-SXM4-80GB", "A100", "L40S", "L4", "A10", "T4", "H200")
INTERVALS = (1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class HostLabel:
    """The ground truth of one simulated host (kept out of the events)."""

    host: str
    scenario: str
    label: str  # benign | hijack
    description: str
    attack_start: float | None  # epoch seconds of the hijack's first event
    gpu_name: str
    gpus: int
    interval_s: float
    start: float
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spec(key: str) -> GpuSpec:
    for s in SPECS:
        if s.key == key:
            return s
    raise ValueError(f"unknown GPU model {key!r}; choose one of {', '.join(s.key for s in SPECS)}")


def _pick(seed: int, host: str, salt: str, options: tuple[Any, ...]) -> Any:
    digest = hashlib.sha256(f"{seed}|{host}|{salt}".encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def plan_host(scenario: str, host: str, *, start: float, duration_s: float, interval_s: float | None, seed: int,
              gpu_model: str | None = None, gpus: int | None = None) -> tuple[HostLabel, HostSim]:
    """Build a host's simulation (nothing generated yet) and its label."""
    try:
        sc: Scenario = SCENARIOS[scenario]
    except KeyError:
        raise ValueError(f"unknown scenario {scenario!r}; `gpusentry simulate --list` shows them") from None
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    spec = _spec(gpu_model or _pick(seed, host, "gpu", FLEET_GPUS))
    interval = interval_s or _pick(seed, host, "interval", INTERVALS)
    n_gpus = gpus or max(sc.min_gpus, _pick(seed, host, "count", (1, 2, 2, 4)))
    sim = HostSim(host, start, duration_s, interval, seed, spec, n_gpus)
    attack = sc.build(sim)
    label = HostLabel(host, sc.name, sc.label, sc.description, start + attack if attack is not None else None,
                      spec.product_name, n_gpus, interval, start, duration_s)
    return label, sim


def simulate_host(scenario: str, host: str, *, start: float, duration_s: float, interval_s: float | None = 5.0,
                  seed: int = 42, gpu_model: str | None = None,
                  gpus: int | None = None) -> tuple[HostLabel, Iterator[dict[str, Any]]]:
    label, sim = plan_host(scenario, host, start=start, duration_s=duration_s, interval_s=interval_s, seed=seed,
                           gpu_model=gpu_model, gpus=gpus)
    return label, sim.events()


def generate(scenario: str, host: str, start: float, duration_s: float, interval_s: float | None = 5.0,
             seed: int = 42) -> Iterator[dict[str, Any]]:
    """The events of one host running ``scenario``, in time order."""
    return simulate_host(scenario, host, start=start, duration_s=duration_s, interval_s=interval_s, seed=seed)[1]


def host_name(scenario: str, n: int) -> str:
    return f"sim-{scenario}-{n:02d}"


def fleet(scenarios: Iterable[str], hosts_per_scenario: int, *, start: float, duration_s: float,
          interval_s: float | None, seed: int) -> tuple[list[HostLabel], Iterator[dict[str, Any]]]:
    """Several hosts per scenario; the events of all hosts merged in time order."""
    labels: list[HostLabel] = []
    streams = []
    for name in scenarios:
        for n in range(hosts_per_scenario):
            label, events = simulate_host(name, host_name(name, n), start=start, duration_s=duration_s,
                                          interval_s=interval_s, seed=seed)
            labels.append(label)
            streams.append(events)
    merged = heapq.merge(*streams, key=lambda ev: ev["@timestamp"])
    return labels, merged


__all__ = ["BENIGN", "HIJACK", "SCENARIOS", "HostLabel", "Scenario", "fleet", "generate", "plan_host",
           "simulate_host"]
