"""Slack: Block Kit messages through an incoming webhook, or through chat.postMessage with a bot token.

Block Kit limits the message is built to (checked by :func:`check_blocks` before sending): at most 50
blocks, a header's plain text at most 150 characters, a section's text at most 3,000, at most 10 section
fields of at most 2,000 each; plus a ``text`` fallback for notifications and screen readers.  Text is
mrkdwn with ``&``, ``<`` and ``>`` escaped, as Slack requires.

**Threads.**  Incoming webhooks cannot thread: Slack returns no message ``ts`` to reply to, so in
``webhook`` mode every update of an incident is a new message that carries the incident's dedup key.
In ``bot`` mode the first message of an incident is remembered (dedup key to ``ts``) and its updates
and resolution are replies in that thread (the resolution also shown in the channel).  The map
(:class:`SlackThreads`) lives in memory; ``gpusentry forward`` also records it on a compacted topic
and reads it back when it starts, so an incident keeps its thread across forwarder restarts and
partition moves.

Slack allows one message per second per webhook (the default ``rate_per_s = 1``) and answers 429
with ``Retry-After``.  Webhook errors come back as plain text (``invalid_payload``, ``invalid_blocks``,
``channel_not_found``, ``channel_is_archived``, ``action_prohibited``, ``no_service``); the Web API
answers HTTP 200 with ``{"ok": false, "error": ...}``.  Both end up verbatim in the dead letter.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import Counter as PromCounter

from gpusentry.contract import get
from gpusentry.settings.outputs import SlackOutputSettings, read_secret
from outputs.base import Alert, Clock, DeliveryError, Output, dedup_key, first, severity, status, truncate
from outputs.http import check_response, json_object, make_client

MAX_BLOCKS = 50
HEADER_LIMIT = 150
SECTION_TEXT_LIMIT = 3000
FIELD_LIMIT = 2000
MAX_FIELDS = 10
FALLBACK_LIMIT = 3000
THREADS_KEPT = 10_000
RESOLVED_ICON = ":white_check_mark:"
# Updates folded into an incident's next message in webhook mode (outputs.slack.update_interval_s).
FOLDED = PromCounter("gpusentry_output_folded", "Slack webhook updates folded into the incident's next message, "
                     "by output", ["output"])
SEVERITY_ICON = {"low": ":large_blue_circle:", "medium": ":large_yellow_circle:", "high": ":large_orange_circle:",
                 "critical": ":red_circle:"}
# Web API errors worth retrying; every other error is about the request or the token.
RETRYABLE_API_ERRORS = {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited"}


# Slack's broadcast mentions also work without angle brackets where link_names is on.
_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)


def escape(text: Any) -> str:
    """Host text as inert mrkdwn: ``&<>`` escaped as Slack requires (so ``<!channel>``, ``<@U1>`` and
    ``<http://x|label>`` links are shown, not acted on), bare ``@channel``/``@here`` broken with a
    zero-width joiner, and backticks (which mrkdwn cannot escape) replaced by a look-alike so a
    command line cannot close our code spans."""
    out = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "\u02cb")
    return _BROADCAST.sub("@\u2060\\1", out)


def _cost_text(cost: dict[str, Any]) -> str:
    """Busy GPU-hours, the amount in its currency, kWh, and the GPU models that were priced."""
    busy = cost.get("busy_gpu_seconds", cost.get("gpu_seconds", 0)) or 0
    models = ", ".join(f"{m.get('gpus')}x {m.get('gpu_model')}" for m in cost.get("by_model") or []
                       if isinstance(m, dict))
    return (f"{busy / 3600:.2f} busy GPU-h, {cost.get('usd', 0):.2f} {cost.get('currency', 'USD')}, "
            f"{cost.get('energy_kwh', 0):.3f} kWh" + (f" ({models})" if models else ""))


def _field(label: str, value: Any) -> dict[str, str]:
    return {"type": "mrkdwn", "text": truncate(f"*{label}*\n{escape(value)}", FIELD_LIMIT)}


def build_message(alert: Alert) -> dict[str, Any]:
    """The Block Kit message for one alert (``text`` fallback + ``blocks``)."""
    sev, state, host, key = severity(alert), status(alert), get(alert, "host.name") or "?", dedup_key(alert)
    verb = "RESOLVED" if state == "resolved" else sev.upper()
    icon = RESOLVED_ICON if state == "resolved" else SEVERITY_ICON[sev]  # a resolution reads as one at a glance
    title = truncate(f"{verb}: {get(alert, 'rule.name') or 'GPU/compute hijacking'} on {host}", HEADER_LIMIT)
    message = str(get(alert, "message") or "")
    cost = get(alert, "gpusentry.alert.cost") or {}
    fields = [
        _field("Severity", f"{sev} ({get(alert, 'event.severity')})"),
        _field("Status", state),
        _field("Host", host),
        _field("Rules", ", ".join(get(alert, "gpusentry.alert.rules") or [get(alert, "rule.id")])),
    ]
    optional = [
        ("Process", first(alert, "process.command_line", "process.executable", "process.name")),
        ("Destination", _destination(alert)),
        ("GPU", first(alert, "gpu.uuid")),
        ("User", first(alert, "user.name")),
        ("Cost so far", _cost_text(cost) if cost else None),
    ]
    fields += [_field(label, value) for label, value in optional if value is not None]
    fields.append(_field("Dedup key", key))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title, "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": truncate(f"{icon} {escape(message)}", SECTION_TEXT_LIMIT)}},
        {"type": "section", "fields": fields[:MAX_FIELDS]},
    ]
    evidence = [e for e in get(alert, "gpusentry.alert.evidence") or [] if isinstance(e, dict)]
    if evidence:
        lines = [f"• `{escape(e.get('@timestamp'))}` *{escape(e.get('rule.id'))}* ({escape(e.get('severity'))}): "
                 f"{escape(e.get('summary'))}" for e in evidence]
        text = "*Evidence*\n" + "\n".join(lines)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, SECTION_TEXT_LIMIT)}})
    technique = first(alert, "threat.technique.subtechnique.id", "threat.technique.id")
    context = f"gpusentry · event time {get(alert, '@timestamp')} · MITRE ATT&CK {technique or 'T1496'}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": escape(context)}]})
    # The fallback is what notifications show, and Slack parses it as mrkdwn too.
    fallback = truncate(escape(f"[{verb}] {message} (incident {key})"), FALLBACK_LIMIT)
    return {"text": fallback, "blocks": blocks[:MAX_BLOCKS]}


def _destination(alert: Alert) -> str | None:
    ip, port, domain = (first(alert, "destination.ip"), first(alert, "destination.port"),
                        first(alert, "destination.domain"))
    if ip is None and domain is None:
        return None
    where = domain or ip
    return f"{where}:{port}" if port is not None else str(where)


def check_blocks(message: dict[str, Any]) -> list[str]:
    """Every Block Kit rule ``message`` breaks (empty when it is valid)."""
    problems = []
    blocks = message.get("blocks", [])
    if not message.get("text"):
        problems.append("no text fallback")
    if len(blocks) > MAX_BLOCKS:
        problems.append(f"{len(blocks)} blocks > {MAX_BLOCKS}")
    for i, block in enumerate(blocks):
        text = block.get("text", {}).get("text", "")
        if block["type"] == "header" and (len(text) > HEADER_LIMIT or block["text"]["type"] != "plain_text"):
            problems.append(f"block {i}: header must be plain_text ≤ {HEADER_LIMIT}")
        if block["type"] == "section":
            if len(text) > SECTION_TEXT_LIMIT:
                problems.append(f"block {i}: section text {len(text)} > {SECTION_TEXT_LIMIT}")
            fields = block.get("fields", [])
            if len(fields) > MAX_FIELDS or any(len(f["text"]) > FIELD_LIMIT for f in fields):
                problems.append(f"block {i}: more than {MAX_FIELDS} fields or a field over {FIELD_LIMIT}")
            if not text and not fields:
                problems.append(f"block {i}: section without text or fields")
    return problems


class ThreadJournal(Protocol):
    async def record(self, key: str, channel: str, ts: str | None) -> None:
        """Record that incident ``key``'s thread in ``channel`` is ``ts`` (None: the incident is over).

        A journal reports its own failures (logged and counted) and never raises them: the message
        it records is already in Slack, and sending it again would post it twice.
        """


class SlackThreads:
    """Which thread holds each open incident: dedup key -> (channel, ts of the incident's first message).

    Bounded (``THREADS_KEPT``, the oldest forgotten first).  With a ``journal``, every change is also
    recorded there, and :meth:`load` brings back what an earlier forwarder recorded.
    """

    def __init__(self, journal: ThreadJournal | None = None) -> None:
        self.journal = journal
        self._threads: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._threads)

    def get(self, key: str, channel: str) -> str | None:
        """The thread of incident ``key`` in ``channel`` (a thread in another channel cannot be replied to)."""
        entry = self._threads.get(key)
        return entry[1] if entry is not None and entry[0] == channel else None

    def load(self, entries: Iterable[tuple[str, str, str | None]]) -> None:
        """Replay (key, channel, ts or None) records in the order they were made."""
        for key, channel, ts in entries:
            self._set(key, channel, ts)

    async def remember(self, key: str, channel: str, ts: str) -> None:
        self._set(key, channel, ts)
        if self.journal is not None:
            await self.journal.record(key, channel, ts)

    async def forget(self, key: str, channel: str) -> None:
        if self._threads.pop(key, None) is not None and self.journal is not None:
            await self.journal.record(key, channel, None)

    def _set(self, key: str, channel: str, ts: str | None) -> None:
        self._threads.pop(key, None)
        if ts is None:
            return
        self._threads[key] = (channel, ts)
        if len(self._threads) > THREADS_KEPT:
            self._threads.popitem(last=False)


class SlackOutput(Output):
    kind = "slack"

    def __init__(self, settings: SlackOutputSettings, name: str | None = None, *,
                 clock: Clock | None = None) -> None:
        super().__init__(settings, name, clock=clock)
        self.settings = settings
        self.threads = SlackThreads()
        # webhook mode: dedup key -> when the incident's last message went out (clock.monotonic), for folding.
        self._last_message: OrderedDict[str, float] = OrderedDict()
        self._webhook_url = read_secret(settings.webhook_url, settings.webhook_url_file, "outputs.slack.webhook_url")
        self._bot_token = read_secret(settings.bot_token, settings.bot_token_file, "outputs.slack.bot_token")
        if settings.mode == "webhook" and not self._webhook_url:
            raise ValueError("outputs.slack needs webhook_url (GPUSENTRY_OUTPUTS__SLACK__WEBHOOK_URL)")
        if settings.mode == "bot" and not (self._bot_token and settings.channel):
            raise ValueError("outputs.slack mode=bot needs bot_token and channel")
        self.client = make_client(settings.timeout_s)

    def secrets(self) -> Iterable[str]:
        return [s for s in (self._webhook_url, self._bot_token) if s]

    def _fold(self, alert: Alert) -> bool:
        """Whether this webhook update is folded into the incident's next message (too soon after its last)."""
        interval, last = self.settings.update_interval_s, self._last_message.get(dedup_key(alert))
        if status(alert) == "resolved" or interval <= 0 or last is None:
            return False  # the incident's first message and its resolution always go out
        if self.clock.monotonic() - last < interval:
            FOLDED.labels(self.name).inc()
            return True
        return False

    def _sent(self, alert: Alert) -> None:
        """Remember when the incident's message went out (only once it did: a retried update is not folded)."""
        key = dedup_key(alert)
        self._last_message.pop(key, None)
        if status(alert) != "resolved":
            self._last_message[key] = self.clock.monotonic()
            if len(self._last_message) > THREADS_KEPT:
                self._last_message.popitem(last=False)

    async def send(self, batch: Sequence[Alert]) -> None:
        for alert in batch:
            if self.settings.mode == "webhook" and self._fold(alert):
                continue
            message = build_message(alert)
            problems = check_blocks(message)
            if problems:
                raise DeliveryError(f"message breaks Block Kit limits: {'; '.join(problems)}", retryable=False)
            if self.settings.mode == "webhook":
                assert self._webhook_url is not None
                response = await self.client.post(self._webhook_url, json=message)
                check_response(response, "Slack webhook", self.clock)
                self._sent(alert)
            else:
                await self._post_in_thread(alert, message)

    async def _post_in_thread(self, alert: Alert, message: dict[str, Any]) -> None:
        key = dedup_key(alert)
        channel = self.settings.channel or ""  # bot mode has one (checked when the output is built)
        body: dict[str, Any] = {"channel": channel, **message}
        thread = self.threads.get(key, channel)
        if thread is not None:
            body["thread_ts"] = thread
            if status(alert) == "resolved" and self.settings.broadcast_resolved:
                body["reply_broadcast"] = True
        response = await self.client.post(f"{self.settings.api_url.rstrip('/')}/chat.postMessage", json=body,
                                          headers={"Authorization": f"Bearer {self._bot_token}"})
        check_response(response, "Slack chat.postMessage", self.clock)
        doc = json_object(response)
        if not doc.get("ok"):
            error = str(doc.get("error") or "unknown_error")
            raise DeliveryError(f"Slack chat.postMessage refused the message: {error}",
                                retryable=error in RETRYABLE_API_ERRORS)
        if status(alert) == "resolved":
            await self.threads.forget(key, channel)
        elif thread is None and isinstance(doc.get("ts"), str):
            await self.threads.remember(key, channel, doc["ts"])

    async def close(self) -> None:
        await self.client.aclose()


