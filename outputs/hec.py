"""Splunk HTTP Event Collector: ``POST /services/collector/event``, events batched back to back.

Each alert becomes ``{"time": <epoch seconds>, "host", "source", "sourcetype", "index", "event": <alert>,
"fields": {...}}``; a batch is those objects concatenated in one body, as HEC expects.
``Authorization: Splunk <token>``.  With ``ack = true`` the request carries the
``X-Splunk-Request-Channel`` GUID and the batch counts as delivered only when
``/services/collector/ack`` confirms its ``ackId``.

HEC answers JSON ``{"text", "code"}``: token errors (401, 403: codes 1-4) and data errors (400) are
permanent; 503 (server busy, code 9), other 5xx and 429 are retried.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
import orjson

from gpusentry.contract import get
from gpusentry.settings.outputs import HecOutputSettings, read_secret
from outputs.base import Alert, Clock, DeliveryError, Output, alert_time, dedup_key, severity, status
from outputs.http import check_response, json_object, make_client

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
ACK_POLL_S = 0.5


def hec_event(alert: Alert, settings: HecOutputSettings) -> dict[str, Any]:
    event: dict[str, Any] = {
        "time": round(alert_time(alert), 3),
        "host": get(alert, "host.name") or "unknown",
        "source": settings.source,
        "sourcetype": settings.sourcetype,
        "event": alert,
        # Indexed fields: searchable without extracting JSON at search time.
        "fields": {"severity": severity(alert), "status": status(alert), "dedup_key": dedup_key(alert),
                   "rule_id": get(alert, "rule.id")},
    }
    if settings.index:
        event["index"] = settings.index
    return event


class HecOutput(Output):
    kind = "hec"

    def __init__(self, settings: HecOutputSettings, name: str | None = None, *,
                 clock: Clock | None = None) -> None:
        super().__init__(settings, name, clock=clock)
        self.settings = settings
        self.max_batch = settings.batch_max_events
        self.max_batch_bytes = settings.batch_max_bytes
        self.linger_s = settings.batch_linger_s
        token = read_secret(settings.token, settings.token_file, "outputs.hec.token")
        if not token:
            raise ValueError("outputs.hec needs token (GPUSENTRY_OUTPUTS__HEC__TOKEN) or token_file")
        self._token = token
        self.channel = settings.channel or str(uuid.uuid4())
        self.url = settings.url.rstrip("/") + EVENT_PATH
        self.client = make_client(settings.timeout_s, verify=settings.verify_tls, ca_file=settings.ca_file)
        self.requests = 0

    def secrets(self) -> Iterable[str]:
        return (self._token,)

    def attempt_timeout_s(self) -> float:
        # With acknowledgement an attempt includes waiting for the indexer, not just the POST.
        return self.settings.timeout_s + (self.settings.ack_timeout_s if self.settings.ack else 0.0)

    def encode(self, alert: Alert) -> bytes:
        return orjson.dumps(hec_event(alert, self.settings))

    def encoded_size(self, alert: Alert) -> int:
        return len(self.encode(alert)) + 1

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Splunk {self._token}", "Content-Type": "application/json"}
        if self.settings.ack:
            headers["X-Splunk-Request-Channel"] = self.channel
        return headers

    async def send(self, batch: Sequence[Alert]) -> None:
        body = b"\n".join(self.encode(a) for a in batch)
        self.requests += 1
        response = await self.client.post(self.url, content=body, headers=self._headers())
        check_response(response, "Splunk HEC", self.clock, detail=_hec_detail(response))
        doc = json_object(response)
        code = doc.get("code", 0)
        if code != 0:  # HTTP 200 is not enough: HEC says in the body whether it took the events
            raise DeliveryError(f"Splunk HEC answered HTTP {response.status_code} with {doc.get('text')!r} "
                                f"(code {code}) instead of Success (code 0)", retryable=code == 9,
                                status=response.status_code)
        if self.settings.ack:
            ack_id = json_object(response).get("ackId")
            if not isinstance(ack_id, int):
                raise DeliveryError("Splunk HEC gave no ackId although ack = true: enable indexer "
                                    "acknowledgement on the token or set outputs.hec.ack = false", retryable=False)
            await self._wait_for_ack(ack_id)

    async def _wait_for_ack(self, ack_id: int) -> None:
        deadline = self.clock.monotonic() + self.settings.ack_timeout_s
        url = self.settings.url.rstrip("/") + ACK_PATH
        while True:
            response = await self.client.post(url, content=orjson.dumps({"acks": [ack_id]}), headers=self._headers())
            check_response(response, "Splunk HEC ack", self.clock, detail=_hec_detail(response))
            if json_object(response).get("acks", {}).get(str(ack_id)) is True:
                return
            if self.clock.monotonic() >= deadline:
                raise DeliveryError(f"Splunk HEC did not acknowledge ackId {ack_id} within "
                                    f"{self.settings.ack_timeout_s:g}s (ack_timeout_s)", retryable=True)
            await self.clock.sleep(ACK_POLL_S)

    async def close(self) -> None:
        await self.client.aclose()


def _hec_detail(response: httpx.Response) -> str | None:
    doc = json_object(response)
    if "text" not in doc:
        return None
    hint = ""
    if response.status_code in (401, 403):
        hint = "; check outputs.hec.token (GPUSENTRY_OUTPUTS__HEC__TOKEN)"
    elif doc.get("code") == 7:
        hint = "; check outputs.hec.index exists and the token may write to it"
    return f"{doc['text']} (code {doc.get('code')}){hint}"
