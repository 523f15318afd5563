"""Helpers for the alert-delivery tests: an instant clock and alerts made by the real engine."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import orjson

from gpusentry.contract import set_path
from outputs.base import Clock
from outputs.sample import sample_incident

_OPEN, _RESOLVED = sample_incident(test_marker=False)


class FakeClock(Clock):
    """Sleeps return at once and advance the clock; every sleep is recorded for the tests to check."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall0 = time.time()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall0 + self.now - 1000.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def alert(i: int = 0, *, status: str = "open", **fields: Any) -> dict[str, Any]:
    """An engine-made incident alert, made distinct by ``i`` (event.id, dedup key, host), plus ``fields``."""
    out = copy.deepcopy(_RESOLVED if status == "resolved" else _OPEN)
    out["event"]["id"] = f"{out['event']['id'][:24]}{i:08d}"
    out["gpusentry"]["alert"]["dedup_key"] = f"{out['gpusentry']['alert']['dedup_key']}-{i}"
    for path, value in fields.items():
        set_path(out, path.replace("__", "."), value)
    return out


def incident(i: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(open, resolved) alerts of one incident, sharing its dedup key."""
    return alert(i), alert(i, status="resolved")


def with_network(a: dict[str, Any]) -> dict[str, Any]:
    """Add the flow fields a pool or protocol detector contributes to an incident."""
    for path, value in {"source.ip": "10.0.0.7", "source.port": 50512, "destination.ip": "203.0.113.9",
                        "destination.port": 3333, "destination.domain": "pool.example.net"}.items():
        set_path(a, path, value)
    return a


def original(dead_letter: dict[str, Any]) -> dict[str, Any]:
    """The alert a dead letter carries (``event.original`` is its JSON text, as ECS defines the field)."""
    return orjson.loads(dead_letter["event"]["original"])
