"""What every output is, and the small shared pieces: errors, clock, alert accessors, secrets.

An output only **formats and sends** (after StreamAlert): ``send(batch)`` delivers a list of alerts in
one request, or raises :class:`DeliveryError` saying whether a retry can help and how long the service
asked us to wait.  Everything else (routing, rate limits, timeouts, retries, the circuit breaker, dead
letters) is the dispatcher's (:mod:`outputs.dispatcher`), so every destination gets it the same way.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from gpusentry.contract import get, parse_timestamp
from gpusentry.settings.outputs import DeliveryPolicy

Alert = dict[str, Any]
SEVERITY_ORDER = ("low", "medium", "high", "critical")


class DeliveryError(Exception):
    """One failed attempt.  ``retryable`` False means retrying cannot help (bad token, bad payload)."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class Clock:
    """Monotonic time, wall time and sleep, injectable so tests check waits without waiting."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Parse an HTTP ``Retry-After`` (delay in seconds, or an HTTP date) into seconds from ``now``."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def mask(secret: str | None) -> str:
    """How a secret appears anywhere a human could read it."""
    return "***" if secret else "(unset)"


class Output:
    """Base class of every destination: a name, a policy, ``send`` and the secrets to scrub."""

    kind: ClassVar[str]
    #: Largest number of alerts one ``send`` takes (HEC batches; chat and paging send one at a time).
    max_batch: int = 1
    #: Largest request body a batch may make (0: no limit); see :meth:`encoded_size`.
    max_batch_bytes: int = 0
    #: How long a partial batch waits for more alerts.
    linger_s: float = 0.0

    def __init__(self, policy: DeliveryPolicy, name: str | None = None, *, clock: Clock | None = None) -> None:
        self.policy = policy
        self.name = name or self.kind
        # Injectable so tests can check retry waits and rate limits without sleeping.
        self.clock = clock or Clock()

    async def send(self, batch: Sequence[Alert]) -> None:
        raise NotImplementedError

    def attempt_timeout_s(self) -> float:
        """Longest one ``send`` may take before the dispatcher abandons the attempt."""
        return self.policy.timeout_s

    def encoded_size(self, alert: Alert) -> int:
        """Bytes ``alert`` adds to a batch (only outputs with ``max_batch_bytes`` need it)."""
        return 0

    async def close(self) -> None:
        """Release connections."""

    def secrets(self) -> Iterable[str]:
        """Secret strings this output holds; the dispatcher scrubs them from every reason it logs."""
        return ()

    def __repr__(self) -> str:
        # Never the settings: they would show (masked) secrets and URLs that embed tokens.
        return f"<{type(self).__name__} {self.name}>"


# ---------------------------------------------------------------------------- alert accessors


def severity(alert: Mapping[str, Any]) -> str:
    value = get(alert, "gpusentry.alert.severity")
    return value if value in SEVERITY_ORDER else "low"


def status(alert: Mapping[str, Any]) -> str:
    return str(get(alert, "gpusentry.alert.status") or "open")


def dedup_key(alert: Mapping[str, Any]) -> str:
    return str(get(alert, "gpusentry.alert.dedup_key") or get(alert, "event.id") or "")


def alert_time(alert: Mapping[str, Any]) -> float:
    """Epoch seconds of the alert's ``@timestamp`` (the event time it was raised at)."""
    try:
        return parse_timestamp(alert["@timestamp"])
    except (KeyError, TypeError, ValueError):
        return 0.0


def first(alert: Mapping[str, Any], *paths: str) -> Any:
    """The first present, non-null value among dotted paths (ECS fields may be scalars or lists)."""
    for path in paths:
        value = get(alert, path)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and value != "":
            return value
    return None


def truncate(text: str, limit: int, marker: str = "…") -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut."""
    return text if len(text) <= limit else text[: max(0, limit - len(marker))] + marker
