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


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="`json` writes logs as JSON lines for log shippers.")
