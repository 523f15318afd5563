"""Slack, PagerDuty, Splunk HEC and the webhook against local receivers that check every payload.

The receivers (tests/outputs_receivers.py) answer like the services, including 429 with
Retry-After, 5xx, error bodies and hanging; the dispatcher runs on an instant clock, so the waits it
honours are checked without waiting for them.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from gpusentry.settings.outputs import (
    HecOutputSettings,
    PagerDutyOutputSettings,
    SlackOutputSettings,
    WebhookOutputSettings,
)
from outputs.dispatcher import Dispatcher, MemoryDeadLetterSink
from outputs.hec import HecOutput
from outputs.pagerduty import PagerDutyOutput
from outputs.slack import SlackOutput, build_message
from outputs.webhook import WebhookOutput
from tests import outputs_receivers as rx
from tests.outputs_helpers import FakeClock, alert, incident, original, with_network

FAST = {"enabled": True, "timeout_s": 2.0, "backoff_initial_s": 1.0, "backoff_max_s": 8.0, "breaker_failures": 0}


@pytest.fixture
def receivers():
    r = rx.Receivers(hang_s=1.0).start()
    yield r
    r.stop()


def slack(receivers, **kw):
    return SlackOutputSettings(**{**FAST, "webhook_url": receivers.base + rx.SLACK_PATH, **kw})


def pagerduty(receivers, **kw):
    return PagerDutyOutputSettings(**{**FAST, "routing_key": rx.PD_ROUTING_KEY, "url": receivers.base + rx.PAGERDUTY_PATH,
                                      "rate_per_s": 0, **kw})


def hec(receivers, **kw):
    return HecOutputSettings(**{**FAST, "url": receivers.base, "token": rx.HEC_TOKEN, "index": "security",
                                "batch_linger_s": 0.05, **kw})


def webhook(receivers, **kw):
    return WebhookOutputSettings(**{**FAST, "url": receivers.base + rx.WEBHOOK_PATH, "secret": rx.WEBHOOK_SECRET, **kw})


async def deliver_all(outputs, alerts, clock):
    sink = MemoryDeadLetterSink()
    d = await Dispatcher(outputs, sink, clock=clock, seed=5, strict=True).start()
    try:
        tickets = [await d.submit(a) for a in alerts]
        outcomes = [o for t in tickets for o in await t]
    finally:
        await d.close()
    return d, sink, outcomes


def test_slack_block_kit_and_rate_limit(receivers):
    clock = FakeClock()
    out = SlackOutput(slack(receivers), clock=clock)
    alerts = [with_network(alert(i)) for i in range(3)]
    d, sink, outcomes = asyncio.run(deliver_all([out], alerts, clock))
    assert all(o.delivered for o in outcomes) and not receivers.violations
    assert len(receivers.received[rx.SLACK_PATH]) == 3
    assert sum(clock.sleeps) == pytest.approx(2.0), "1 message per second per webhook"
    msg = receivers.received[rx.SLACK_PATH][0]
    assert "pool.example.net:3333" in str(msg["blocks"]) and alerts[0]["gpusentry"]["alert"]["dedup_key"] in msg["text"]


def _update(opened: dict, severity: str) -> dict:
    import copy

    a = copy.deepcopy(opened)  # an update is another "open" alert of the same incident (dedup key)
    a["gpusentry"]["alert"]["severity"] = severity
    a["event"]["id"] = f"{a['event']['id'][:-8]}{severity[:8]:>8}"
    return a


def test_slack_webhook_folds_rapid_updates_of_an_incident_and_styles_its_resolution(receivers):
    """One message per incident per update_interval_s: an update sooner than that is folded into the next
    message (each carries the whole incident); the opening and the resolution always go out, the resolution
    marked as one. Another incident's messages are not held back by this one's."""
    import copy

    clock = FakeClock()
    out = SlackOutput(slack(receivers, rate_per_s=0, update_interval_s=300), clock=clock)
    opened, other = with_network(alert(1)), with_network(alert(2))
    key = opened["gpusentry"]["alert"]["dedup_key"]
    resolved = copy.deepcopy(opened)
    resolved["gpusentry"]["alert"]["status"] = "resolved"
    resolved["event"]["id"] = resolved["event"]["id"][:-8] + "resolved"

    async def go() -> None:
        d = await Dispatcher([out], MemoryDeadLetterSink(), clock=clock, seed=5, strict=True).start()
        try:
            async def deliver(*alerts: dict) -> None:
                for a in alerts:
                    assert all(o.delivered for o in await (await d.submit(a)))
            await deliver(opened, _update(opened, "high"), other)  # the update right after the opening: folded
            clock.now += 301
            await deliver(_update(opened, "critical"))  # past the interval: sent
            clock.now += 10
            await deliver(_update(opened, "medium"), resolved)  # folded; the resolution never is
        finally:
            await d.close()

    asyncio.run(go())
    texts = [m["text"] for m in receivers.received[rx.SLACK_PATH]]
    assert len(texts) == 4, texts
    assert key in texts[0] and other["gpusentry"]["alert"]["dedup_key"] in texts[1]
    assert key in texts[2] and texts[2].startswith("[CRITICAL]")
    assert key in texts[3] and texts[3].startswith("[RESOLVED]")
    assert ":white_check_mark:" in str(receivers.received[rx.SLACK_PATH][3]["blocks"])
    assert not receivers.violations


def test_slack_webhook_update_that_failed_is_retried_not_folded(receivers):
    clock = FakeClock()
    out = SlackOutput(slack(receivers, rate_per_s=0, update_interval_s=300), clock=clock)
    opened = with_network(alert(3))

    async def go() -> None:
        d = await Dispatcher([out], MemoryDeadLetterSink(), clock=clock, seed=5, strict=True).start()
        try:
            assert all(o.delivered for o in await (await d.submit(opened)))
            clock.now += 301
            receivers.plan(rx.SLACK_PATH, (500, {}, "server_error"))
            assert all(o.delivered for o in await (await d.submit(_update(opened, "critical"))))
        finally:
            await d.close()

    asyncio.run(go())
    assert [code for path, code in receivers.requests if path == rx.SLACK_PATH] == [200, 500, 200]


def test_slack_limits_hold_for_huge_alerts():
    big = alert(1, message="x<y>&" * 2000, host__name="h" * 300, process__command_line="a" * 5000,
                gpusentry__alert__evidence=[{"event.id": str(i), "@timestamp": "2026-01-01T00:00:00.000Z",
                                             "rule.id": "r", "severity": "high", "summary": "s" * 500}
                                            for i in range(50)])
    msg = build_message(big)
    assert rx.slack_block_violations(msg) == []
    assert "&lt;y&gt;&amp;" in msg["blocks"][1]["text"]["text"], "mrkdwn control characters are escaped"


def test_slack_429_retry_after_is_honoured(receivers):
    clock = FakeClock()
    receivers.plan(rx.SLACK_PATH, (429, {"Retry-After": "17"}, "rate_limited"))
    out = SlackOutput(slack(receivers, rate_per_s=0), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(1)], clock))
    assert outcomes[0].delivered and outcomes[0].attempts == 2
    assert clock.sleeps == [17.0]
    assert receivers.requests == [(rx.SLACK_PATH, 429), (rx.SLACK_PATH, 200)]


def test_slack_error_body_reaches_the_dead_letter_and_not_the_url(receivers):
    clock = FakeClock()
    receivers.plan(rx.SLACK_PATH, (404, {}, "channel_not_found"))
    out = SlackOutput(slack(receivers, rate_per_s=0), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(1)], clock))
    assert not outcomes[0].delivered and outcomes[0].attempts == 1, "a 404 is not retried"
    (record,) = sink.records
    assert "channel_not_found" in record["error"]["message"]
    assert "XXXXSECRETXXXX" not in str(record)


def test_slack_bot_mode_threads_updates(receivers):
    clock = FakeClock()
    settings = SlackOutputSettings(**{**FAST, "mode": "bot", "bot_token": rx.SLACK_BOT_TOKEN, "channel": "C0SOC",
                                      "api_url": receivers.base + "/api", "rate_per_s": 0})
    out = SlackOutput(settings, clock=clock)
    opened, resolved = incident(4)
    update = alert(4, message="more evidence")
    _, sink, outcomes = asyncio.run(deliver_all([out], [opened, update, resolved], clock))
    assert all(o.delivered for o in outcomes) and not receivers.violations
    ((parent_ts, thread),) = receivers.slack_threads.items()  # one thread: the parent and its two replies
    parent, *replies = thread
    assert "thread_ts" not in parent and len(replies) == 2
    assert all(m["thread_ts"] == parent_ts for m in replies)
    assert replies[-1]["reply_broadcast"] is True and replies[-1]["text"].startswith("[RESOLVED]")


def test_slack_thread_memory_is_bounded_per_channel_and_replays_its_journal(monkeypatch):
    import outputs.slack as slack

    class Journal:
        def __init__(self):
            self.records = []

        async def record(self, key, channel, ts):
            self.records.append((key, channel, ts))

    monkeypatch.setattr(slack, "THREADS_KEPT", 2)
    journal = Journal()
    threads = slack.SlackThreads(journal)

    async def steps():
        for i in range(3):
            await threads.remember(f"k{i}", "C1", f"1.{i}")
        await threads.forget("k2", "C1")
        await threads.forget("never-opened", "C1")  # nothing to forget: nothing recorded

    asyncio.run(steps())
    assert (threads.get("k0", "C1"), threads.get("k1", "C1"), threads.get("k2", "C1")) == (None, "1.1", None)
    assert threads.get("k1", "C2") is None, "a thread in another channel cannot be replied to"
    assert journal.records == [("k0", "C1", "1.0"), ("k1", "C1", "1.1"), ("k2", "C1", "1.2"), ("k2", "C1", None)]
    again = slack.SlackThreads()
    again.load(journal.records)
    assert (again.get("k1", "C1"), again.get("k2", "C1"), len(again), len(threads)) == ("1.1", None, 1, 1)


def test_pagerduty_trigger_then_resolve_the_same_incident(receivers):
    clock = FakeClock()
    out = PagerDutyOutput(pagerduty(receivers, link_url="https://siem.example/search?q={dedup_key}"), clock=clock)
    opened, resolved = incident(2)
    _, sink, outcomes = asyncio.run(deliver_all([out], [with_network(opened), resolved], clock))
    assert all(o.delivered for o in outcomes) and not receivers.violations
    trigger, resolve = receivers.received[rx.PAGERDUTY_PATH]
    key = opened["gpusentry"]["alert"]["dedup_key"]
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == key
    p = trigger["payload"]
    assert p["severity"] == "critical" and p["source"] == "gpu-node-7" and p["timestamp"] == opened["@timestamp"]
    assert p["custom_details"]["evidence"] == opened["gpusentry"]["alert"]["evidence"]
    assert p["custom_details"]["cost"] == opened["gpusentry"]["alert"]["cost"]
    assert trigger["links"][0]["href"].endswith(key)


@pytest.mark.parametrize(("ours", "theirs"), [("critical", "critical"), ("high", "error"), ("medium", "warning"),
                                               ("low", "info")])
def test_pagerduty_severity_mapping(ours, theirs):
    from outputs.pagerduty import build_event

    ev = build_event(alert(1, gpusentry__alert__severity=ours, message="m" * 5000), rx.PD_ROUTING_KEY,
                     PagerDutyOutputSettings(routing_key="x"))
    assert ev["payload"]["severity"] == theirs and len(ev["payload"]["summary"]) == 1024
    assert rx.pagerduty_violations(ev) == []


def test_pagerduty_500_and_429_retried_400_not(receivers):
    clock = FakeClock()
    receivers.plan(rx.PAGERDUTY_PATH, 500, (429, {}, "throttled"))
    out = PagerDutyOutput(pagerduty(receivers), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(1)], clock))
    assert outcomes[0].delivered and outcomes[0].attempts == 3 and len(clock.sleeps) == 2
    assert 0.5 <= clock.sleeps[0] <= 1.0 and 1.0 <= clock.sleeps[1] <= 2.0, "exponential backoff with jitter"

    receivers.plan(rx.PAGERDUTY_PATH, (400, {}, '{"status":"invalid event","errors":["dedup_key too long"]}'))
    clock = FakeClock()
    out = PagerDutyOutput(pagerduty(receivers), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(2)], clock))
    assert not outcomes[0].delivered and outcomes[0].attempts == 1 and not clock.sleeps
    assert "dedup_key too long" in sink.records[0]["error"]["message"]
    assert rx.PD_ROUTING_KEY not in str(sink.records)


def test_pagerduty_eu_endpoint_is_configurable():
    s = PagerDutyOutputSettings(routing_key="k", url="https://events.eu.pagerduty.com/v2/enqueue")
    assert PagerDutyOutput(s).settings.url.startswith("https://events.eu.")


def test_hec_batches_back_to_back_with_splunk_fields(receivers):
    clock = FakeClock()
    out = HecOutput(hec(receivers, batch_max_events=25), clock=clock)
    alerts = [alert(i) for i in range(60)]
    _, sink, outcomes = asyncio.run(deliver_all([out], alerts, clock))
    assert all(o.delivered for o in outcomes) and not receivers.violations
    events = receivers.received[rx.HEC_PATH]
    assert [e["event"]["event"]["id"] for e in events] == [a["event"]["id"] for a in alerts], "in order, none lost"
    assert max(receivers.received["hec_requests"]) <= 25 and len(receivers.received["hec_requests"]) < 60
    e = events[0]
    assert e["time"] == pytest.approx(1_790_000_000.0) and e["host"] == "gpu-node-7"
    assert (e["source"], e["sourcetype"], e["index"]) == ("gpusentry", "gpusentry:alert", "security")
    assert e["fields"]["dedup_key"] == alerts[0]["gpusentry"]["alert"]["dedup_key"]


def test_hec_503_retried_and_token_errors_fail_fast(receivers):
    clock = FakeClock()
    date = email.utils.formatdate(clock.time() + 30, usegmt=True)
    receivers.plan(rx.HEC_PATH, (503, {"Retry-After": date}, '{"text":"Server is busy","code":9}'))
    _, sink, outcomes = asyncio.run(deliver_all([HecOutput(hec(receivers), clock=clock)], [alert(1)], clock))
    assert outcomes[0].delivered and outcomes[0].attempts == 2
    assert clock.sleeps == [pytest.approx(30, abs=1.5)], "Retry-After as an HTTP date"

    clock = FakeClock()
    bad = HecOutput(hec(receivers, token="00000000-0000-0000-0000-000000000000"), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([bad], [alert(2)], clock))
    assert not outcomes[0].delivered and outcomes[0].attempts == 1 and not clock.sleeps
    msg = sink.records[0]["error"]["message"]
    assert "Invalid token (code 4)" in msg and "GPUSENTRY_OUTPUTS__HEC__TOKEN" in msg
    assert "00000000-0000-0000-0000-000000000000" not in str(sink.records)


def test_hec_indexer_acknowledgement(receivers):
    clock = FakeClock()
    receivers.hec_ack_after_polls = 2
    out = HecOutput(hec(receivers, ack=True, channel="5f1e3c2a-1111-4222-8333-444455556666"), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(1)], clock))
    assert outcomes[0].delivered
    assert len(receivers.received["hec_ack_polls"]) == 3 and clock.sleeps == [0.5, 0.5]


def test_webhook_is_signed_and_a_hang_times_out_and_is_retried(receivers):
    clock = FakeClock()
    receivers.plan(rx.WEBHOOK_PATH, "hang")
    out = WebhookOutput(webhook(receivers, timeout_s=0.3), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(1)], clock))
    assert outcomes[0].delivered and outcomes[0].attempts == 2 and not receivers.violations
    assert receivers.received[rx.WEBHOOK_PATH] == [alert(1)]


def test_webhook_signature_check():
    from outputs.webhook import sign, verify_signature

    sig = sign("k", 1000, b"{}")
    assert verify_signature("k", "1000", b"{}", sig, now=1100)
    assert not verify_signature("k", "1000", b"{ }", sig, now=1100)
    assert not verify_signature("other", "1000", b"{}", sig, now=1100)
    assert not verify_signature("k", "1000", b"{}", sig, now=5000), "stale timestamps are replays"


def test_outage_with_breaker_loses_nothing(receivers):
    """A receiver that fails for a while: every alert ends delivered or in the dead letters, never both; the
    open breaker pauses the output instead of dropping what arrives meanwhile."""
    clock = FakeClock()
    receivers.plan(rx.WEBHOOK_PATH, *([503] * 5))
    out = WebhookOutput(webhook(receivers, max_attempts=3, breaker_failures=4, breaker_reset_s=10), clock=clock)

    async def main():
        sink = MemoryDeadLetterSink()
        d = await Dispatcher([out], sink, clock=clock, seed=2, strict=True).start()
        outcomes = []
        for i in range(16):
            outcomes += await d.deliver(alert(i))
            clock.now += 2  # alerts arrive every 2 s
        await d.close()
        return sink, outcomes

    sink, outcomes = asyncio.run(main())
    delivered = {a["event"]["id"] for a in receivers.received[rx.WEBHOOK_PATH]}
    dead = {original(r)["event"]["id"] for r in sink.records}
    assert len(delivered) + len(dead) == 16 and delivered.isdisjoint(dead)
    assert sink.records and all("gave up after 3 attempts" in r["error"]["message"] for r in sink.records), \
        "only the alert that used up its max_attempts is dead-lettered, none for the open breaker"
    assert len(delivered) >= 15
    assert outcomes[-1].delivered, "the breaker closes again once the receiver recovers"
    # The receiver logs a request after it has answered it: let the last one land before counting.
    deadline = time.monotonic() + 5
    while receivers.count(rx.WEBHOOK_PATH) < 5 + len(delivered) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receivers.count(rx.WEBHOOK_PATH) == 5 + len(delivered), "the open breaker spared the failing receiver"


def test_hec_batches_respect_the_byte_limit(receivers):
    clock = FakeClock()
    out = HecOutput(hec(receivers, batch_max_events=100, batch_max_bytes=8000), clock=clock)
    size = out.encoded_size(alert(0))
    alerts = [alert(i) for i in range(20)]
    _, sink, outcomes = asyncio.run(deliver_all([out], alerts, clock))
    assert all(o.delivered for o in outcomes) and not receivers.violations
    per_request = receivers.received["hec_requests"]
    assert sum(per_request) == 20 and max(per_request) <= 8000 // size and len(per_request) < 20
    assert [e["event"]["event"]["id"] for e in receivers.received[rx.HEC_PATH]] == [a["event"]["id"] for a in alerts]


def test_hec_200_without_success_in_the_body_is_not_a_delivery(receivers):
    clock = FakeClock()
    receivers.plan(rx.HEC_PATH, (200, {"Content-Type": "application/json"}, b'{"text":"Server is busy","code":9}'),
                   (200, {"Content-Type": "application/json"}, b'{"text":"Incorrect index","code":7}'))
    out = HecOutput(hec(receivers, max_attempts=3), clock=clock)
    _, sink, outcomes = asyncio.run(deliver_all([out], [alert(1)], clock))
    assert not outcomes[0].delivered, "code 9 was retried, code 7 is permanent"
    assert "Incorrect index" in sink.records[0]["error"]["message"] and "code 7" in sink.records[0]["error"]["message"]
