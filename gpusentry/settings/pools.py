"""Options of the mining-pool intelligence (`[detection.pools]`): where the pool list lives and how it matches."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from gpusentry.settings.base import Section


class PoolSettings(Section):
    """Mining-pool domain and IP list used on DNS answers, TLS SNI, destination domains and IPs."""

    file: str = Field(
        "~/.local/share/gpusentry/pools.txt",
        description="Pool list installed by `gpusentry pools refresh` (one domain, IP or CIDR per line). "
        "Read at start-up when it exists.")
    include_bundled: bool = Field(
        True, description="Also use the list shipped with gpusentry; `false` uses only `file`.")
    ignore: list[str] = Field(
        default_factory=list,
        description="Domains (and their subdomains) or IPs never reported, e.g. a sanctioned internal pool.")
    remember_resolved_s: float = Field(
        86400.0, gt=0, description="How long (event time) an IP learned from a pool's DNS answer keeps matching "
        "later flows to it.")
    repeat_after_s: float = Field(
        300.0, ge=0, description="The same pool on the same host is reported again only after this many seconds.")

    def path(self) -> Path:
        return Path(self.file).expanduser()
