"""Generic webhook: the alert JSON, signed so the receiver knows it came from us and is fresh.

Headers: ``X-Gpusentry-Timestamp: <epoch seconds>`` and ``X-Gpusentry-Signature: v1=<hex>`` where
``<hex>`` is HMAC-SHA256 with the shared secret over ``<timestamp>.<body>`` (the raw body bytes).
Binding the timestamp into the signature lets receivers refuse replays of old requests
(:func:`verify_signature` checks both, with a constant-time comparison).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

import orjson

from gpusentry.settings.outputs import WebhookOutputSettings, read_secret
from outputs.base import Alert, Clock, Output, dedup_key
from outputs.http import check_response, make_client

SIGNATURE_VERSION = "v1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={mac}"


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *, now: float,
                     tolerance_s: float = 300) -> bool:
    """True when ``signature`` is ours for this body and timestamp, and the timestamp is recent."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


class WebhookOutput(Output):
    kind = "webhook"

    def __init__(self, settings: WebhookOutputSettings, name: str | None = None, *,
                 clock: Clock | None = None) -> None:
        super().__init__(settings, name, clock=clock)
        self.settings = settings
        secret = read_secret(settings.secret, settings.secret_file, "outputs.webhook.secret")
        if not (settings.url and secret):
            raise ValueError("outputs.webhook needs url and secret (GPUSENTRY_OUTPUTS__WEBHOOK__SECRET)")
        self._secret = secret
        self.url = settings.url
        self.client = make_client(settings.timeout_s)

    def secrets(self) -> Iterable[str]:
        return (self._secret,)

    async def send(self, batch: Sequence[Alert]) -> None:
        for alert in batch:
            body = orjson.dumps(alert)
            ts = int(self.clock.time())
            headers = {"Content-Type": "application/json", self.settings.timestamp_header: str(ts),
                       self.settings.signature_header: sign(self._secret, ts, body),
                       "X-Gpusentry-Dedup-Key": dedup_key(alert)}
            response = await self.client.post(self.url, content=body, headers=headers)
            check_response(response, "webhook", self.clock)

    async def close(self) -> None:
        await self.client.aclose()
