"""Options of the detection engine (shared by `worker`, `replay` and `up`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from gpusentry.settings.base import Section
from gpusentry.settings.gpu_detection import GpuDetectionSettings
from gpusentry.settings.pools import PoolSettings
from gpusentry.settings.sandboxes import NetworkDetectionSettings, SandboxSettings


class PricingSettings(Section):
    """What a stolen GPU-hour and kWh cost, for the incident's cost fields (see docs/finance.md)."""

    table_file: Path | None = Field(
        None, description="A GPU price table to use instead of the one gpusentry ships "
                          "(gpusentry/data/gpu_prices.toml; same format, validated at start-up).")
    gpu_hour_usd: dict[str, float] = Field(
        default_factory=dict,
        description="Overrides of the price table, one entry at a time: model id or NVML name (e.g. `H100-SXM`, "
                    "`NVIDIA L40S`) -> price per GPU-hour in `currency`; a name the table lacks adds a model. "
                    "Models in neither are reported as unpriced, never priced at a default.")
    kwh_usd: float = Field(0.12, ge=0, description="Price per kWh of energy, in `currency`.")
    pue: float = Field(1.0, ge=1, le=3, description="Power usage effectiveness: facility energy per kWh the GPU "
                                                    "drew (1.0 prices the GPU's own draw).")
    currency: str = Field("USD", min_length=3, max_length=3, description="ISO 4217 code of every price and cost.")

    @field_validator("gpu_hour_usd")
    @classmethod
    def _non_negative(cls, prices: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in prices.items() if v < 0]
        if bad:
            raise ValueError(f"gpu_hour_usd: negative price for {', '.join(bad)}")
        return prices


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
    agent_silent_after_s: float = Field(
        120.0, ge=10, description="A GPU host whose agent sends no GPU sample for this long (event time, or ten of "
        "its sampling intervals if that is longer) was silent: `agent.silent` says so when it is heard from again. "
        "Live silence that never ends is Prometheus's to see (GpusentryAgentDown, docs/monitoring.md).")
    knowledge_dir: Path | None = Field(
        None, description="A directory of knowledge files (miners.toml, miner_options.toml, tunnels.toml, ...; "
        "`gpusentry knowledge list` names them) that replace the shipped ones of the same name; `gpusentry "
        "knowledge refresh` checks and installs them here. Read at start-up: restart workers after a refresh.")
    pricing: PricingSettings = Field(default_factory=PricingSettings, description="Cost of stolen GPU time.")
    gpu: GpuDetectionSettings = Field(default_factory=GpuDetectionSettings,
                                      description="GPU behaviour models, mining signature and GPU ownership.")
    pools: PoolSettings = Field(default_factory=PoolSettings,
                                description="Mining-pool intelligence: the pool list and how it matches.")
    sandboxes: SandboxSettings = Field(default_factory=SandboxSettings,
                                       description="Agent sandboxes: what else counts as one on this site.")
    network: NetworkDetectionSettings = Field(default_factory=NetworkDetectionSettings,
                                              description="Tunnels, internal probing and metadata-service reads.")
