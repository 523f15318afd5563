"""Local HTTP receivers that stand in for Slack, PagerDuty, Splunk HEC and a webhook consumer.

Each validates every request against the service's published rules, written out here independently
of the code under test, and records what it accepted and every rule a request broke
(``violations``, which tests assert empty).  A test can script the next answers of a path
(``plan``): ``429`` with ``Retry-After``, ``500``, ``503``, an error body, or ``"hang"`` (no answer
for ``hang_s``), after which the receiver answers normally again.

Rules checked:
* Slack incoming webhook / chat.postMessage: JSON with ``text`` fallback and ``blocks``; ≤ 50 blocks;
  header plain_text ≤ 150; section text ≤ 3,000; ≤ 10 fields of ≤ 2,000; context ≤ 10 elements.
* PagerDuty Events API v2: ``routing_key`` (32 chars), ``event_action`` trigger/acknowledge/resolve,
  ``dedup_key`` ≤ 255; trigger needs ``payload.summary`` ≤ 1,024, ``payload.source``,
  ``payload.severity`` in critical/error/warning/info, ``payload.timestamp`` ISO 8601.
* Splunk HEC: ``Authorization: Splunk <token>``; body = JSON objects back to back, each with
  ``event``; ``time`` epoch seconds (number); ``host``/``source``/``sourcetype``/``index`` strings.
* Webhook: ``v1=`` HMAC-SHA256 over ``<timestamp>.<body>``, timestamp within 5 minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections import defaultdict
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLACK_PATH = "/services/T000/B000/XXXXSECRETXXXX"
SLACK_API = "/api/chat.postMessage"
PAGERDUTY_PATH = "/v2/enqueue"
HEC_PATH = "/services/collector/event"
HEC_ACK_PATH = "/services/collector/ack"
WEBHOOK_PATH = "/hook"
HEC_TOKEN = "11111111-2222-3333-4444-555555555555"
PD_ROUTING_KEY = "R0UT1NGK3YR0UT1NGK3YR0UT1NGK3Y00"  # 32 characters, like a real integration key
WEBHOOK_SECRET = "whsec-test-0123456789"
SLACK_BOT_TOKEN = "xoxb-test-bot-token-0000"


def _iter_json_objects(text: str) -> list[Any]:
    """HEC bodies are JSON objects back to back (whitespace between them allowed)."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def slack_block_violations(msg: Any) -> list[str]:
    v = []
    if not isinstance(msg, dict):
        return ["payload is not a JSON object"]
    if not isinstance(msg.get("text"), str) or not msg["text"]:
        v.append("no text fallback")
    blocks = msg.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        return [*v, "no blocks"]
    if len(blocks) > 50:
        v.append("more than 50 blocks")
    for b in blocks:
        t = b.get("type")
        if t == "header":
            if b["text"]["type"] != "plain_text" or len(b["text"]["text"]) > 150:
                v.append("header text not plain_text ≤ 150")
        elif t == "section":
            if "text" in b and len(b["text"]["text"]) > 3000:
                v.append("section text > 3000")
            if "fields" in b and (len(b["fields"]) > 10 or any(len(f["text"]) > 2000 for f in b["fields"])):
                v.append("section fields > 10 or a field > 2000")
            if "text" not in b and "fields" not in b:
                v.append("section without text or fields")
        elif t == "context":
            if not 1 <= len(b["elements"]) <= 10:
                v.append("context needs 1-10 elements")
        else:
            v.append(f"unexpected block type {t!r}")
    return v


def pagerduty_violations(ev: Any) -> list[str]:
    v = []
    if not isinstance(ev, dict):
        return ["event is not an object"]
    if not isinstance(ev.get("routing_key"), str) or len(ev["routing_key"]) != 32:
        v.append("routing_key must be the 32-character integration key")
    if ev.get("event_action") not in ("trigger", "acknowledge", "resolve"):
        v.append("event_action must be trigger, acknowledge or resolve")
    key = ev.get("dedup_key")
    if ev.get("event_action") != "trigger" and not key:
        v.append("acknowledge/resolve need dedup_key")
    if key is not None and (not isinstance(key, str) or len(key) > 255):
        v.append("dedup_key must be a string ≤ 255")
    if ev.get("event_action") == "trigger":
        p = ev.get("payload") or {}
        if not isinstance(p.get("summary"), str) or not 1 <= len(p["summary"]) <= 1024:
            v.append("payload.summary must be 1-1024 characters")
        if not isinstance(p.get("source"), str) or not p["source"]:
            v.append("payload.source required")
        if p.get("severity") not in ("critical", "error", "warning", "info"):
            v.append("payload.severity must be critical, error, warning or info")
        if "timestamp" in p:
            try:
                datetime.fromisoformat(p["timestamp"].replace("Z", "+00:00"))
            except (ValueError, AttributeError):
                v.append("payload.timestamp must be ISO 8601")
        if "custom_details" in p and not isinstance(p["custom_details"], dict | str):
            v.append("custom_details must be an object")
        for link in ev.get("links", []):
            if "href" not in link:
                v.append("links need href")
    return v


def hec_violations(obj: Any) -> list[str]:
    v = []
    if not isinstance(obj, dict) or "event" not in obj:
        return ["HEC event object needs 'event'"]
    if "time" in obj and (isinstance(obj["time"], bool) or not isinstance(obj["time"], int | float)):
        v.append("time must be epoch seconds (a number)")
    if "time" in obj and not 0 < obj["time"] < 1e11:
        v.append("time must be in seconds, not milliseconds")
    for k in ("host", "source", "sourcetype", "index"):
        if k in obj and not isinstance(obj[k], str):
            v.append(f"{k} must be a string")
    return v


class Receivers:
    """One threaded HTTP server answering as Slack, PagerDuty, HEC and a webhook consumer."""

    def __init__(self, hang_s: float = 2.0) -> None:
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.received: dict[str, list[Any]] = defaultdict(list)
        self.requests: list[tuple[str, int | str]] = []
        self.violations: list[str] = []
        self.plans: dict[str, list[Any]] = defaultdict(list)
        self.hec_acks: dict[int, bool] = {}
        self.hec_ack_after_polls = 0
        self.slack_threads: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._ack_id = 0
        self._ts = 0
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms per request.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                receivers._handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Receivers:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def plan(self, path: str, *answers: Any) -> None:
        """Script the next answers on ``path``: an int status, (status, headers, body), or "hang"."""
        with self.lock:
            self.plans[path].extend(answers)

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    # ------------------------------------------------------------------ request handling

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes | str = b"", headers: dict[str, str] | None
               = None, content_type: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, val in (headers or {}).items():
            h.send_header(k, val)
        h.end_headers()
        # The client may have given up (a "hang" answer outlives its timeout).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            h.wfile.write(data)

    def _json(self, h: BaseHTTPRequestHandler, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(h, status, json.dumps(doc), headers, "application/json")

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        path = h.path
        with self.lock:
            planned = self.plans[path].pop(0) if self.plans[path] else None
        if planned == "hang":
            with self.lock:
                self.requests.append((path, "hang"))
            time.sleep(self.hang_s)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._reply(h, 200, "late")
            return
        if planned is not None:
            status, headers, text = planned if isinstance(planned, tuple) else (planned, {}, "")
            with self.lock:
                self.requests.append((path, status))
            self._reply(h, status, text or "planned failure", headers)
            return
        handler = {SLACK_PATH: self._slack_webhook, SLACK_API: self._slack_api, PAGERDUTY_PATH: self._pagerduty,
                   HEC_PATH: self._hec, HEC_ACK_PATH: self._hec_ack, WEBHOOK_PATH: self._webhook}.get(path)
        if handler is None:
            self._reply(h, 404, "no_service")
            return
        status = handler(h, body)
        with self.lock:
            self.requests.append((path, status))

    def _violation(self, where: str, problems: list[str]) -> None:
        with self.lock:
            self.violations.extend(f"{where}: {p}" for p in problems)

    def _slack_webhook(self, h: BaseHTTPRequestHandler, body: bytes) -> int:
        try:
            msg = json.loads(body)
        except ValueError:
            self._reply(h, 400, "invalid_payload")
            return 400
        problems = slack_block_violations(msg)
        if problems:
            self._violation("slack", problems)
            self._reply(h, 400, "invalid_blocks")
            return 400
        with self.lock:
            self.received[SLACK_PATH].append(msg)
        self._reply(h, 200, "ok")
        return 200

    def _slack_api(self, h: BaseHTTPRequestHandler, body: bytes) -> int:
        if h.headers.get("Authorization") != f"Bearer {SLACK_BOT_TOKEN}":
            self._json(h, 200, {"ok": False, "error": "invalid_auth"})
            return 200
        msg = json.loads(body)
        problems = slack_block_violations(msg)
        if problems or not msg.get("channel"):
            self._violation("slack api", problems or ["no channel"])
            self._json(h, 200, {"ok": False, "error": "invalid_blocks"})
            return 200
        with self.lock:
            self._ts += 1
            ts = f"1790000000.{self._ts:06d}"
            thread = msg.get("thread_ts")
            self.slack_threads[thread or ts].append(msg)
            self.received[SLACK_API].append(msg)
        self._json(h, 200, {"ok": True, "channel": msg["channel"], "ts": ts})
        return 200

    def _pagerduty(self, h: BaseHTTPRequestHandler, body: bytes) -> int:
        try:
            ev = json.loads(body)
        except ValueError:
            self._json(h, 400, {"status": "invalid event", "message": "Event object is invalid", "errors": ["JSON"]})
            return 400
        problems = pagerduty_violations(ev)
        if problems:
            self._violation("pagerduty", problems)
            self._json(h, 400, {"status": "invalid event", "message": "Event object is invalid", "errors": problems})
            return 400
        with self.lock:
            self.received[PAGERDUTY_PATH].append(ev)
        self._json(h, 202, {"status": "success", "message": "Event processed", "dedup_key": ev.get("dedup_key")})
        return 202

    def _hec_auth(self, h: BaseHTTPRequestHandler) -> int | None:
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Splunk "):
            self._json(h, 401, {"text": "Token is required", "code": 2})
            return 401
        if auth != f"Splunk {HEC_TOKEN}":
            self._json(h, 403, {"text": "Invalid token", "code": 4})
            return 403
        return None

    def _hec(self, h: BaseHTTPRequestHandler, body: bytes) -> int:
        denied = self._hec_auth(h)
        if denied:
            return denied
        try:
            objs = _iter_json_objects(body.decode())
        except ValueError:
            self._json(h, 400, {"text": "Invalid data format", "code": 6})
            return 400
        problems = [p for o in objs for p in hec_violations(o)]
        if problems or not objs:
            self._violation("hec", problems or ["no events"])
            self._json(h, 400, {"text": "Invalid data format", "code": 6})
            return 400
        channel = h.headers.get("X-Splunk-Request-Channel")
        with self.lock:
            self.received[HEC_PATH].extend(objs)
            self.received["hec_requests"].append(len(objs))
            if channel:
                self._ack_id += 1
                ack_id = self._ack_id
                self.hec_acks[ack_id] = False
        if channel:
            self._json(h, 200, {"text": "Success", "code": 0, "ackId": ack_id})
        else:
            self._json(h, 200, {"text": "Success", "code": 0})
        return 200

    def _hec_ack(self, h: BaseHTTPRequestHandler, body: bytes) -> int:
        denied = self._hec_auth(h)
        if denied:
            return denied
        if not h.headers.get("X-Splunk-Request-Channel"):
            self._json(h, 400, {"text": "Data channel is missing", "code": 10})
            return 400
        acks = json.loads(body)["acks"]
        with self.lock:
            self.received["hec_ack_polls"].append(acks)
            ready = len(self.received["hec_ack_polls"]) > self.hec_ack_after_polls
            doc = {str(a): ready and a in self.hec_acks for a in acks}
        self._json(h, 200, {"acks": doc})
        return 200

    def _webhook(self, h: BaseHTTPRequestHandler, body: bytes) -> int:
        ts = h.headers.get("X-Gpusentry-Timestamp", "")
        sig = h.headers.get("X-Gpusentry-Signature", "")
        expected = "v1=" + hmac.new(WEBHOOK_SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300 or not hmac.compare_digest(expected, sig):
            self._violation("webhook", ["bad or stale signature"])
            self._reply(h, 401, "bad signature")
            return 401
        with self.lock:
            self.received[WEBHOOK_PATH].append(json.loads(body))
        self._reply(h, 204)
        return 204
