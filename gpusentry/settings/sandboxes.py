"""Options of the agent-sandbox and network-behaviour detectors (``[detection.sandboxes]``, ``[detection.network]``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator

from gpusentry.settings.base import Section


class SandboxSettings(Section):
    """What is an agent sandbox on this site, beside the shapes gpusentry ships (detectors/sandbox/sandboxes.toml)."""

    shapes_file: Path | None = Field(
        None, description="A sandbox-shapes file to use instead of the one gpusentry ships (same format; "
                          "validated at start-up).")
    tool_servers: list[str] = Field(
        default_factory=list, description="Process names (comm or executable basename) of your own tool servers: "
                                          "whatever they start is an agent's tool call.")
    container_ids: list[str] = Field(
        default_factory=list, description="Container-id patterns (shell-style, e.g. `3f2a*`) whose processes are "
                                          "all sandbox processes.")
    container_names: list[str] = Field(default_factory=list,
                                       description="Container-name patterns of sandboxes (e.g. `agent-sbx-*`).")
    images: list[str] = Field(default_factory=list,
                              description="Container-image patterns of sandboxes (e.g. `registry.local/sandbox:*`).")
    users: list[str] = Field(default_factory=list,
                             description="Users whose processes are sandbox processes (e.g. a dedicated `sandbox`).")
    max_processes: int = Field(8192, ge=256, le=1_000_000,
                               description="Processes remembered per host for lineage (oldest exited first).")


class NetworkDetectionSettings(Section):
    """How tunnels, probing and metadata reads are judged."""

    bastions: list[str] = Field(
        default_factory=list, description="SSH bastions and jump hosts (addresses, CIDRs or host names): SSH to "
                                          "them, and local forwards through them, are ordinary.")
    internal_networks: list[str] = Field(
        default_factory=lambda: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"],
        description="Address ranges that count as internal for probing (sweeps) and as not outside for tunnels.")
    sweep_window_s: float = Field(60.0, gt=0, le=3600,
                                  description="Window (event time) in which one process's distinct targets count.")
    sweep_min_targets: int = Field(
        20, ge=3, le=100_000, description="Distinct internal (address, port) targets in a window that make a "
                                          "sweep for a program with no history (sandbox processes: a quarter).")
    sweep_warmup_s: float = Field(
        600.0, ge=0, le=86400, description="Event time after a host's first flow during which fan-out is only "
                                           "learned (outside sandboxes), so services that scan by design are known.")
    sweep_learned_factor: float = Field(
        3.0, ge=1, le=100, description="A program that has fanned out before (Prometheus, a mesh sidecar, an "
                                       "inventory job) sweeps only beyond this multiple of its largest window.")
    scanner_users: list[str] = Field(
        default_factory=list, description="Service accounts whose scanner runs (inventory `nmap -sn` from cron) "
                                          "are ordinary.")

    @field_validator("internal_networks")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        for n in nets:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"internal_networks: {n!r} is not a network (use CIDR, e.g. 10.0.0.0/8)") from None
        return nets
