"""PagerDuty Events API v2: one PagerDuty incident per gpusentry incident.

Every alert of an incident is sent with the incident's dedup key (at most 255 characters), so PagerDuty
folds its updates into one incident, and the resolution (``gpusentry.alert.status = resolved``) resolves
it.  ``event_action`` is ``trigger`` for open incidents, ``resolve`` for resolved ones and
``acknowledge`` for an alert whose status says ``acknowledged``.  ``payload.summary`` is at most 1,024
characters; ``payload.severity`` maps ours: critical → critical, high → error, medium → warning,
low → info; ``custom_details`` carries the evidence, the cost and the rules.

Answers: 202 accepted; 400 the event is invalid (not retried, the error goes to the dead letter);
429 and 5xx retried with backoff.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gpusentry.contract import get
from gpusentry.settings.outputs import PagerDutyOutputSettings, read_secret
from outputs.base import Alert, Clock, DeliveryError, Output, dedup_key, first, severity, status, truncate
from outputs.http import check_response, json_object, make_client

SEVERITY_MAP = {"critical": "critical", "high": "error", "medium": "warning", "low": "info"}
ACTIONS = {"open": "trigger", "resolved": "resolve", "acknowledged": "acknowledge"}
SUMMARY_LIMIT = 1024
DEDUP_KEY_LIMIT = 255


def build_event(alert: Alert, routing_key: str, settings: PagerDutyOutputSettings) -> dict[str, Any]:
    action = ACTIONS.get(status(alert), "trigger")
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key(alert)[:DEDUP_KEY_LIMIT],
        "client": "gpusentry",
    }
    if action != "trigger":
        # PagerDuty ignores a payload on acknowledge/resolve; the dedup key says which incident.
        return event
    host = str(get(alert, "host.name") or "unknown")
    event["payload"] = {
        "summary": truncate(str(get(alert, "message") or get(alert, "rule.name") or "gpusentry incident"),
                            SUMMARY_LIMIT),
        "source": host,
        "severity": SEVERITY_MAP[severity(alert)],
        "timestamp": get(alert, "@timestamp"),
        "component": first(alert, "gpu.uuid", "process.name"),
        "group": first(alert, "container.id"),
        "class": "GPU/compute hijacking",
        "custom_details": {
            "rule": {"id": get(alert, "rule.id"), "name": get(alert, "rule.name"),
                     "description": get(alert, "rule.description")},
            "severity": severity(alert),
            "event_severity": get(alert, "event.severity"),
            "rules": get(alert, "gpusentry.alert.rules"),
            "signals": get(alert, "gpusentry.alert.signals"),
            "evidence": get(alert, "gpusentry.alert.evidence") or [],
            "evidence_count": get(alert, "gpusentry.alert.evidence_count"),
            "cost": get(alert, "gpusentry.alert.cost") or {},
            "process": get(alert, "process"),
            "destination": get(alert, "destination"),
            "user": first(alert, "user.name"),
            "technique": first(alert, "threat.technique.subtechnique.id", "threat.technique.id"),
            "event_id": get(alert, "event.id"),
        },
    }
    event["payload"] = {k: v for k, v in event["payload"].items() if v is not None}
    if settings.link_url:
        event["links"] = [{"href": settings.link_url.format(dedup_key=dedup_key(alert), host=host),
                           "text": settings.link_text}]
    return event


class PagerDutyOutput(Output):
    kind = "pagerduty"

    def __init__(self, settings: PagerDutyOutputSettings, name: str | None = None, *,
                 clock: Clock | None = None) -> None:
        super().__init__(settings, name, clock=clock)
        self.settings = settings
        key = read_secret(settings.routing_key, settings.routing_key_file, "outputs.pagerduty.routing_key")
        if not key:
            raise ValueError("outputs.pagerduty needs routing_key (GPUSENTRY_OUTPUTS__PAGERDUTY__ROUTING_KEY)")
        self._routing_key = key
        self.client = make_client(settings.timeout_s)

    def secrets(self) -> Iterable[str]:
        return (self._routing_key,)

    async def send(self, batch: Sequence[Alert]) -> None:
        for alert in batch:
            response = await self.client.post(self.settings.url,
                                              json=build_event(alert, self._routing_key, self.settings))
            if response.status_code == 400:
                raise DeliveryError(f"PagerDuty refused the event (HTTP 400): {_errors(response)}", retryable=False,
                                    status=400)
            check_response(response, "PagerDuty", self.clock)

    async def close(self) -> None:
        await self.client.aclose()


def _errors(response: Any) -> str:
    doc = json_object(response)
    if doc:
        return f"{doc.get('message', '')} {doc.get('errors', '')}".strip()
    return truncate(response.text, 300)
