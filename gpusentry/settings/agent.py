"""Options of the host agent (`gpusentry agent`)."""

from __future__ import annotations

import socket

from pydantic import Field

from gpusentry.settings.base import Section


class AgentSettings(Section):
    host_name: str = Field(default_factory=socket.gethostname,
                           description="`host.name` of every event; default: this machine's hostname.")
    interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between collection cycles.")
