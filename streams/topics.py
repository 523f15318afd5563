"""The event topics, consumed as raw bytes: decoding and validation belong to the event contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.app import WorkerApp


def register(wa: WorkerApp) -> Any:
    """One faust topic object over the four event topics (one agent, one engine, in arrival order)."""
    names = list(wa.cfg.topics.event_topics().values())
    return wa.app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                        allow_empty=True)
