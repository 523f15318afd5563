"""Analyst feedback: scoped suppressions read from the feedback topic by every worker.

A feedback message (value: one JSON object, key: the incident's dedup key or anything) says an incident
is benign and how widely to believe it:

    {"@timestamp": "2026-11-29T21:35:00.000Z",
     "gpusentry": {"feedback": {"verdict": "benign", "expires": "2026-12-06T00:00:00.000Z",
                                "dedup_key": "gpusentry-gpu-node-7-…", "reason": "nightly hashcat audit"}},
     "host": {"name": "gpu-node-7"}, "process": {"executable": "/opt/audit/hashcat"},
     "rule": {"id": "process.miner_binary"}, "user": {"name": "analyst@example.com"}}

The scope is every one of ``host.name``, ``process.executable``, ``rule.id`` and
``gpusentry.feedback.dedup_key`` that is given (at least one must be); an incident update matching the
whole scope before ``expires`` (compared with the update's own ``@timestamp``, so replays agree) is not
published. ``verdict: "revoke"`` lifts earlier suppressions of exactly that scope. This is a filter on
publication only: detection and the incident's state go on, so an expired suppression lets the next
update through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from gpusentry.contract import get
from gpusentry.timefmt import format_timestamp, parse_timestamp

VERDICTS = ("benign", "revoke")
SCOPE_FIELDS = ("host.name", "process.executable", "rule.id", "gpusentry.feedback.dedup_key")


class FeedbackError(ValueError):
    """A feedback message that cannot be understood; the message says what was expected."""


@dataclass(frozen=True, slots=True)
class Suppression:
    scope: tuple[tuple[str, str], ...]  # (field, value) pairs, sorted
    expires: float | None  # epoch seconds; None = until revoked
    reason: str = ""
    analyst: str = ""

    def matches(self, alert: dict[str, Any], at: float) -> bool:
        if self.expires is not None and at >= self.expires:
            return False
        for path, value in self.scope:
            if path == "rule.id":
                rules = get(alert, "gpusentry.alert.rules") or []
                if value != get(alert, "rule.id") and value not in rules:
                    return False
            elif path == "gpusentry.feedback.dedup_key":
                if value != get(alert, "gpusentry.alert.dedup_key"):
                    return False
            elif get(alert, path) != value:
                return False
        return True


def parse_feedback(value: bytes | None) -> tuple[str, Suppression]:
    """(verdict, suppression) from one feedback message, or :class:`FeedbackError`."""
    if not value:
        raise FeedbackError("feedback message has no value; expected a JSON object")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise FeedbackError(f"feedback is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FeedbackError("feedback must be a JSON object")
    verdict = get(doc, "gpusentry.feedback.verdict")
    if verdict not in VERDICTS:
        raise FeedbackError(f"gpusentry.feedback.verdict is {verdict!r}; expected one of {list(VERDICTS)}")
    scope = []
    for path in SCOPE_FIELDS:
        v = get(doc, path)
        if v is None:
            v = doc.get(path)  # a flat dotted key is accepted too
        if v is not None:
            if not isinstance(v, str) or not v:
                raise FeedbackError(f"{path} must be a non-empty string")
            scope.append((path, v))
    if not scope:
        raise FeedbackError(f"feedback needs a scope: at least one of {', '.join(SCOPE_FIELDS)}")
    expires_raw = get(doc, "gpusentry.feedback.expires")
    expires = None
    if expires_raw is not None:
        try:
            expires = parse_timestamp(expires_raw)
        except (ValueError, TypeError) as exc:
            raise FeedbackError(f"gpusentry.feedback.expires: {exc}; expected RFC 3339") from None
    return verdict, Suppression(tuple(sorted(scope)), expires, str(get(doc, "gpusentry.feedback.reason") or ""),
                                str(get(doc, "user.name") or ""))


class Suppressions:
    """The suppressions in force, built from the whole feedback topic."""

    def __init__(self) -> None:
        self._by_scope: dict[tuple[tuple[str, str], ...], Suppression] = {}

    def apply(self, verdict: str, suppression: Suppression) -> None:
        if verdict == "revoke":
            self._by_scope.pop(suppression.scope, None)
        else:
            self._by_scope[suppression.scope] = suppression

    def matching(self, alert: dict[str, Any], at: float) -> Suppression | None:
        for s in self._by_scope.values():
            if s.matches(alert, at):
                return s
        return None

    def __len__(self) -> int:
        return len(self._by_scope)


def feedback_message(*, verdict: str = "benign", host: str | None = None, executable: str | None = None,
                     rule: str | None = None, dedup_key: str | None = None, expires: str | None = None,
                     reason: str = "", analyst: str = "", timestamp: str | None = None) -> bytes:
    """Build a feedback message value (for tools and tests)."""
    doc: dict[str, Any] = {"@timestamp": timestamp or format_timestamp(time.time()),
                           "gpusentry": {"feedback": {"verdict": verdict, "reason": reason}}}
    if expires:
        doc["gpusentry"]["feedback"]["expires"] = expires
    if dedup_key:
        doc["gpusentry"]["feedback"]["dedup_key"] = dedup_key
    if host:
        doc["host"] = {"name": host}
    if executable:
        doc["process"] = {"executable": executable}
    if rule:
        doc["rule"] = {"id": rule}
    if analyst:
        doc["user"] = {"name": analyst}
    return orjson.dumps(doc)
