"""RFC 3339 timestamps as the contract writes them: UTC, millisecond precision, ``Z``.

Event time drives every window and model, so parsing has to be fast (it runs once per
event) and exact.  The fast path handles the canonical form the agents emit; anything
else RFC 3339 allows (offsets, other fractions) falls back to ``datetime``.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime

_CANONICAL = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z\Z")


def format_timestamp(epoch_seconds: float) -> str:
    """Format epoch seconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    millis = round(epoch_seconds * 1000)
    seconds, ms = divmod(millis, 1000)
    t = datetime.fromtimestamp(seconds, UTC)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{ms:03d}Z"


# Timestamps repeat: validation and the engine parse the same event's, and the GPUs of one host share a
# collection cycle's.  Parsing costs microseconds, a dict lookup a few tens of nanoseconds.
_PARSED: dict[str, float] = {}
_PARSED_MAX = 8192


def parse_timestamp(text: str) -> float:
    """Parse an RFC 3339 timestamp to epoch seconds; raise ``ValueError`` naming the problem."""
    cached = _PARSED.get(text) if type(text) is str else None
    if cached is not None:
        return cached
    value = _parse_timestamp(text)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[text] = value
    return value


def _parse_timestamp(text: str) -> float:
    m = _CANONICAL.match(text)
    if m:
        y, mo, d, h, mi, s, frac = m.groups()
        if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31 and int(h) < 24 and int(mi) < 60 and int(s) < 61):
            raise ValueError(f"not a valid RFC 3339 time: {text!r}")
        base = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s), 0, 0, 0))
        return base + (int(frac) / 10 ** len(frac) if frac else 0.0)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r} (expected e.g. 2026-01-31T12:00:00.000Z)") from None
    if t.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset; append 'Z'")
    return t.timestamp()
