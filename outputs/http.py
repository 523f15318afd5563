"""What the HTTP outputs share: one pooled httpx client each, and the status-code rules.

* 2xx: delivered.
* 408, 429 and 5xx: retryable; ``Retry-After`` (seconds or an HTTP date) is passed to the dispatcher.
* any other 4xx: permanent (bad credentials or a payload the service refuses); retrying cannot help,
  so the alert goes to the dead-letter topic at once with the service's own error text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx

from outputs.base import Clock, DeliveryError, retry_after_seconds, truncate

USER_AGENT = "gpusentry-forwarder"

# httpx logs every request URL at INFO, and a Slack webhook URL *is* a secret: keep its request log quiet.
logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))


def make_client(timeout_s: float, *, verify: bool | str = True, ca_file: Path | None = None) -> httpx.AsyncClient:
    verify_arg: bool | str = str(ca_file) if ca_file else verify
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), verify=verify_arg,
                             headers={"User-Agent": USER_AGENT}, follow_redirects=False)


def check_response(response: httpx.Response, service: str, clock: Clock, *, detail: str | None = None) -> None:
    """Raise :class:`DeliveryError` unless ``response`` is a success."""
    code = response.status_code
    if 200 <= code < 300:
        return
    body = detail if detail is not None else truncate(response.text.strip().replace("\n", " "), 300)
    reason = f"{service} answered HTTP {code}: {body or response.reason_phrase}"
    retryable = code in (408, 429) or code >= 500
    retry_after = retry_after_seconds(response.headers.get("Retry-After"), clock.time()) if retryable else None
    raise DeliveryError(reason, retryable=retryable, retry_after=retry_after, status=code)


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The response body as a JSON object; an empty dict when it is not one (HTML error pages, plain text)."""
    try:
        doc = response.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
