"""Options of the detection engine (shared by `worker`, `replay` and `up`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpusentry.settings.base import Section
from gpusentry.settings.gpu_detection import GpuDetectionSettings
from gpusentry.settings.pools import PoolSettings
from gpusentry.settings.sandboxes import NetworkDetectionSettings, SandboxSettings


class PricingSettings(Section):
    """What a stolen GPU-hour and kWh cost, for the incident's cost fields."""

    gpu_hour_usd: dict[str, float] = Field(
        default_factory=lambda: {"H200": 3.5, "H100": 2.5, "A100": 1.3, "L40S": 1.0, "L4": 0.7, "A10": 0.6,
                                 "T4": 0.35, "V100": 0.9},
        description="Price per GPU-hour by model: the first key found in `gpu.name` wins (longest keys first).")
    default_gpu_hour_usd: float = Field(1.0, ge=0, description="Price per GPU-hour of a model not listed.")
    kwh_usd: float = Field(0.12, ge=0, description="Price per kWh of integrated power draw.")


class DetectionSettings(Section):
    seed: int = Field(42, description="Seed of every randomised model, so replays are deterministic.")
    min_alert_severity: Literal["low", "medium", "high", "critical"] = Field(
        "low", description="Incidents below this severity are tracked but not published.")
    resolve_after_s: float = Field(
        600.0, gt=0, description="An incident resolves after this many seconds (event time) without new evidence.")
    update_interval_s: float = Field(
        300.0, ge=0, description="At most one 'more evidence' update per incident per this many seconds; "
        "severity changes are published at once.")
    recurrence_horizon_s: float = Field(
        86400.0, ge=0, description="An incident that opens on a host within this many seconds (event time) of "
        "its last resolved one continues it: same dedup key, the next `gpusentry.alert.episode` (0: never).")
    max_evidence: int = Field(50, ge=1, le=1000, description="Evidence entries kept per incident (first and latest).")
    pricing: PricingSettings = Field(default_factory=PricingSettings, description="Cost of stolen GPU time.")
    gpu: GpuDetectionSettings = Field(default_factory=GpuDetectionSettings,
                                      description="GPU behaviour models, mining signature and GPU ownership.")
    pools: PoolSettings = Field(default_factory=PoolSettings,
                                description="Mining-pool intelligence: the pool list and how it matches.")
    sandboxes: SandboxSettings = Field(default_factory=SandboxSettings,
                                       description="Agent sandboxes: what else counts as one on this site.")
    network: NetworkDetectionSettings = Field(default_factory=NetworkDetectionSettings,
                                              description="Tunnels, internal probing and metadata-service reads.")
