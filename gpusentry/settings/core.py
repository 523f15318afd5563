"""Sections every process uses: input limits and logging."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpusentry.contract import DEFAULT_MAX_MESSAGE_BYTES
from gpusentry.settings.base import Section


class ContractSettings(Section):
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=64 * 1024 * 1024,
        description="Largest message value accepted; larger ones go to the dead-letter topic.")
    max_future_skew_s: float = Field(
        300.0, ge=1, le=86400,
        description="An event dated more than this ahead of the worker's clock is dead-lettered as `clock_skew` "
                    "and the host's clock jump is a finding (`agent.clock_jump`).")
    max_replay_gap_s: float = Field(
        7 * 86400.0, ge=1, description="In `replay`, how far past the file's own time line (the latest event "
        "time of any host) an event may be dated; beyond it the event is `clock_skew` unless the next one of its "
        "host confirms the new time.")


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="`json` writes logs as JSON lines for log shippers.")
