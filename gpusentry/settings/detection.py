"""Options of the detection engine (shared by `worker`, `replay` and `up`)."""

from __future__ import annotations

from pydantic import Field

from gpusentry.settings.base import Section


class DetectionSettings(Section):
    seed: int = Field(42, description="Seed of every randomised model, so replays are deterministic.")
