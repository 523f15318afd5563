"""The dispatcher's policy: routing, rate limits, backoff with jitter, Retry-After, breaker, dead letters.

An in-process output scripted to fail isolates the policy from any network; the HTTP tests
(test_outputs_http.py) show the same behaviour against local service receivers.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
from collections.abc import Sequence

import pytest

from gpusentry.settings.outputs import DeliveryPolicy, OutputSettings
from outputs.base import DeliveryError, Output, retry_after_seconds
from outputs.dispatcher import (
    CircuitBreaker,
    Dispatcher,
    MemoryDeadLetterSink,
    Route,
    TokenBucket,
    backoff_delay,
)
from tests.outputs_helpers import FakeClock, alert, original


class Scripted(Output):
    """Fails as scripted (DeliveryError or exception instances, consumed in order), then succeeds."""

    kind = "scripted"

    def __init__(self, policy: DeliveryPolicy, script: Sequence[BaseException] = (), name: str = "scripted",
                 secret: str = "") -> None:
        super().__init__(policy, name)
        self.script = list(script)
        self.delivered: list[dict] = []
        self.calls = 0
        self.secret = secret

    async def send(self, batch):
        self.calls += 1
        if self.script:
            raise self.script.pop(0)
        self.delivered.extend(batch)

    def secrets(self):
        return [self.secret] if self.secret else []


def policy(**kw) -> DeliveryPolicy:
    base = {"enabled": True, "backoff_initial_s": 1.0, "backoff_max_s": 8.0, "max_attempts": 5, "breaker_failures": 0}
    return DeliveryPolicy(**{**base, **kw})


async def run(outputs, alerts, clock=None, strict=True):
    sink = MemoryDeadLetterSink()
    d = await Dispatcher(outputs, sink, clock=clock or FakeClock(), seed=7, strict=strict).start()
    try:
        results = [await d.deliver(a) for a in alerts]
    finally:
        await d.close()
    return d, sink, results


def retryable(reason="HTTP 503", retry_after=None):
    return DeliveryError(reason, retryable=True, retry_after=retry_after, status=503)


def test_routing_by_severity_status_host_and_rule():
    route = Route(policy(min_severity="high", statuses=["open"], hosts=["gpu-*"], exclude_hosts=["gpu-node-9"],
                         rules=["process.miner_*"]))
    a = alert(1)  # critical, open, gpu-node-7, rules include process.miner_binary
    assert route.matches(a)
    assert not route.matches(alert(1, status="resolved"))
    assert not route.matches(alert(1, gpusentry__alert__severity="medium"))
    assert not route.matches(alert(1, host__name="cpu-1"))
    assert not route.matches(alert(1, host__name="gpu-node-9"))
    assert not route.matches(alert(1, rule__id="gpu.mining_signature", gpusentry__alert__rules=["gpu.mining_signature"]))


def test_alerts_only_reach_outputs_that_route_them():
    async def main():
        pager = Scripted(policy(min_severity="critical"), name="pager")
        chat = Scripted(policy(), name="chat")
        _, sink, results = await run([pager, chat], [alert(1, gpusentry__alert__severity="medium"), alert(2)])
        return pager, chat, sink, results

    pager, chat, sink, results = asyncio.run(main())
    assert [o.output for o in results[0]] == ["chat"]
    assert [o.output for o in results[1]] == ["pager", "chat"]
    assert len(pager.delivered) == 1 and len(chat.delivered) == 2 and not sink.records


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    rng = random.Random(1)
    p = policy(backoff_initial_s=0.5, backoff_max_s=10)
    for attempt, ceiling in [(1, 0.5), (2, 1), (3, 2), (4, 4), (5, 8), (6, 10), (9, 10)]:
        delays = [backoff_delay(attempt, p, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4, "jitter spreads the retries"


def test_retry_after_seconds_and_http_date():
    now = 1_790_000_000.0
    assert retry_after_seconds("7", now) == 7.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(42, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 100, usegmt=True), now) == 0.0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


def test_retries_wait_backoff_then_deliver():
    async def main():
        clock = FakeClock()
        out = Scripted(policy(), [retryable(), retryable(), retryable()])
        d, sink, results = await run([out], [alert(1)], clock)
        return clock, out, d, sink, results

    clock, out, d, sink, results = asyncio.run(main())
    assert results[0][0].delivered and results[0][0].attempts == 4
    assert out.calls == 4 and not sink.records
    assert len(clock.sleeps) == 3
    for n, waited in enumerate(clock.sleeps, 1):
        assert 2 ** (n - 1) / 2 <= waited <= 2 ** (n - 1)
    assert d.stats()["scripted"]["retries"] == 3


def test_retry_after_is_honoured_exactly_and_capped():
    async def main():
        clock = FakeClock()
        out = Scripted(policy(max_retry_after_s=60), [retryable(retry_after=7), retryable(retry_after=3600)])
        await run([out], [alert(1)], clock)
        return clock

    assert asyncio.run(main()).sleeps == [7, 60]


def test_permanent_error_is_not_retried_and_dead_lettered_with_reason():
    async def main():
        out = Scripted(policy(), [DeliveryError("Slack webhook answered HTTP 400: invalid_blocks", retryable=False,
                                                status=400)])
        return await run([out], [alert(1)])

    d, sink, results = asyncio.run(main())
    assert not results[0][0].delivered and results[0][0].attempts == 1
    (record,) = sink.records
    assert record["error"]["message"].endswith("invalid_blocks") and record["http"]["response"]["status_code"] == 400
    assert record["gpusentry"]["deadletter"]["output"] == "scripted"
    assert original(record) == alert(1)
    assert record["event"]["dataset"] == "gpusentry.deadletter"


def test_last_attempt_dead_letters():
    async def main():
        clock = FakeClock()
        out = Scripted(policy(max_attempts=3), [retryable("connection refused")] * 3)
        d, sink, results = await run([out], [alert(1)], clock)
        return clock, sink, results

    clock, sink, results = asyncio.run(main())
    assert results[0][0].attempts == 3 and not results[0][0].delivered
    assert "gave up after 3 attempts" in sink.records[0]["error"]["message"]
    assert len(clock.sleeps) == 2


def test_an_open_breaker_pauses_the_output_and_every_alert_is_delivered_when_it_recovers():
    """The webhook trouble of a real outage: 429 with Retry-After, then 500s and timeouts. The breaker opens,
    nothing is sent while it is open, and once the endpoint answers again every alert, resolutions included,
    is delivered; none is dead-lettered."""
    async def main():
        clock = FakeClock()
        script = [retryable("HTTP 429", retry_after=20.0)] + [retryable("HTTP 500")] * 6 + \
            [DeliveryError("no answer within 10s (timeout_s)", retryable=True)] * 3
        out = Scripted(policy(max_attempts=0, breaker_failures=3, breaker_reset_s=30), script)
        sink = MemoryDeadLetterSink()
        d = await Dispatcher([out], sink, clock=clock, seed=1, strict=True).start()
        tickets = [await d.submit(alert(i)) for i in range(1, 7)] + [await d.submit(alert(7, status="resolved"))]
        results = [await t for t in tickets]
        await d.close()
        return clock, out, sink, d, results

    clock, out, sink, d, results = asyncio.run(main())
    assert all(r[0].delivered for r in results), [r[0].reason for r in results]
    assert not sink.records, "nothing dead-lettered: the output recovered"
    stats = d.stats()["scripted"]
    assert stats["breaker_opened"] >= 2 and stats["breaker_waits"] >= 2
    assert out.calls == 10 + 7, "one batch at a time: the first alert waited out the outage, then all seven went"
    # Backoff is capped at 8 s (policy); the longer waits are the pauses until the breaker half-opens.
    assert any(8 < w <= 30 and w != 20.0 for w in clock.sleeps), clock.sleeps


def test_a_retryable_outage_longer_than_max_age_dead_letters_with_the_reason():
    async def main():
        clock = FakeClock()
        out = Scripted(policy(max_attempts=0, breaker_failures=2, breaker_reset_s=60, max_age_s=300),
                       [retryable("HTTP 503")] * 100)
        d, sink, results = await run([out], [alert(1)], clock)
        return clock, sink, results

    clock, sink, results = asyncio.run(main())
    assert not results[0][0].delivered
    assert "max_age_s 300s" in sink.records[0]["error"]["message"]
    assert clock.now - 1000 <= 300 + 60, "gave up at the age limit, not long after"


def test_rate_limit_spaces_requests():
    async def main():
        clock = FakeClock()
        bucket = TokenBucket(rate=2.0, burst=2, clock=clock)
        waits = [await bucket.acquire() for _ in range(6)]
        return clock, waits

    clock, waits = asyncio.run(main())
    assert waits[:2] == [0.0, 0.0]
    assert all(w == pytest.approx(0.5) for w in waits[2:])
    assert clock.now - 1000.0 == pytest.approx(2.0)


def test_rate_limit_applies_in_the_dispatcher():
    async def main():
        clock = FakeClock()
        out = Scripted(policy(rate_per_s=1.0, burst=1))
        await run([out], [alert(i) for i in range(4)], clock)
        return clock, out

    clock, out = asyncio.run(main())
    assert len(out.delivered) == 4 and sum(clock.sleeps) == pytest.approx(3.0)


def test_breaker_counts():
    b = CircuitBreaker(threshold=2, reset_s=10)
    assert b.allow(0) and not b.failure(0, "x") and b.failure(1, "x")
    assert not b.allow(5) and b.allow(11)
    b.success()
    assert b.allow(11) and not b.is_open


def test_timeout_is_a_retryable_failure():
    class Hangs(Scripted):
        async def send(self, batch):
            self.calls += 1
            if self.calls == 1:
                await asyncio.sleep(10)
            self.delivered.extend(batch)

    async def main():
        out = Hangs(policy(timeout_s=0.05))
        return out, await run([out], [alert(1)])

    out, (_, sink, results) = asyncio.run(main())
    assert results[0][0].delivered and results[0][0].attempts == 2 and out.calls == 2


def test_a_bug_in_an_output_is_counted_dead_lettered_and_raised_in_strict_mode(caplog):
    async def lenient():
        out = Scripted(policy(), [KeyError("payload")])
        return await run([out], [alert(1), alert(2)], strict=False)

    with caplog.at_level(logging.ERROR):
        d, sink, results = asyncio.run(lenient())
    assert d.stats()["scripted"]["bugs"] == 1
    assert not results[0][0].delivered and "KeyError" in results[0][0].reason
    assert results[1][0].delivered, "a bug in one alert does not stop the next"
    assert len(sink.records) == 1 and "raised KeyError" in caplog.text

    async def strict():
        out = Scripted(policy(), [KeyError("payload")])
        sink = MemoryDeadLetterSink()
        d = await Dispatcher([out], sink, clock=FakeClock(), strict=True).start()
        await d.deliver(alert(1))
        with pytest.raises(RuntimeError, match="output scripted stopped"):
            await d.drain()

    asyncio.run(strict())


def test_secrets_never_reach_dead_letters_logs_or_reprs(caplog):
    secret = "xoxb-very-secret-token-value"

    async def main():
        out = Scripted(policy(max_attempts=2), [retryable(f"POST https://hooks.example/{secret} refused")] * 2,
                       secret=secret)
        return out, await run([out], [alert(1)])

    async def bug():
        out = Scripted(policy(), [ValueError(f"bad header Bearer {secret}")], secret=secret)
        return await run([out], [alert(2)], strict=False)

    with caplog.at_level(logging.DEBUG):
        out, (_, sink, results) = asyncio.run(main())
        _, bug_sink, _ = asyncio.run(bug())
    assert "Traceback" in caplog.text and "ValueError" in caplog.text
    assert secret not in str(bug_sink.records)
    assert secret not in str(sink.records) and secret not in caplog.text and secret not in results[0][0].reason
    assert "***" in sink.records[0]["error"]["message"]
    assert secret not in repr(out)
    settings = OutputSettings(slack={"enabled": True, "webhook_url": f"https://hooks.slack.com/{secret}"},
                              pagerduty={"enabled": True, "routing_key": secret},
                              hec={"enabled": True, "token": secret},
                              webhook={"enabled": True, "url": "http://x", "secret": secret})
    assert secret not in repr(settings) and secret not in settings.model_dump_json()


def test_secret_files(tmp_path):
    from gpusentry.settings.outputs import ConfigSecretError, read_secret

    f = tmp_path / "token"
    f.write_text("s3cr3t-from-file\n")
    assert read_secret(None, f, "outputs.hec.token") == "s3cr3t-from-file"
    with pytest.raises(ConfigSecretError, match="cannot be read"):
        read_secret(None, tmp_path / "missing", "outputs.hec.token")


def test_enabled_output_without_its_secret_is_a_config_error():
    from gpusentry.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="GPUSENTRY_OUTPUTS__PAGERDUTY__ROUTING_KEY"):
        load_config(environ={"GPUSENTRY_OUTPUTS__PAGERDUTY__ENABLED": "true"})


def test_every_submitted_alert_is_delivered_or_dead_lettered():
    """Mixed failures over many alerts: none is lost, none is counted twice."""

    async def main():
        clock = FakeClock()
        script = [retryable(retry_after=1), retryable(), DeliveryError("bad", retryable=False)] * 10
        out = Scripted(policy(max_attempts=2), script)
        sink = MemoryDeadLetterSink()
        d = await Dispatcher([out], sink, clock=clock, seed=3, strict=True).start()
        tickets = [await d.submit(alert(i)) for i in range(60)]
        outcomes = [o for t in tickets for o in await t]
        await d.close()
        return out, sink, outcomes

    out, sink, outcomes = asyncio.run(main())
    delivered = {a["event"]["id"] for a in out.delivered}
    dead = {original(r)["event"]["id"] for r in sink.records}
    assert len(outcomes) == 60
    assert delivered.isdisjoint(dead) and len(delivered | dead) == 60
    assert len(sink.records) == sum(not o.delivered for o in outcomes)


def test_prometheus_counters_follow_the_outcomes():
    from prometheus_client import REGISTRY

    def value(name, output):
        return REGISTRY.get_sample_value(name, {"output": output}) or 0.0

    before = (value("gpusentry_output_delivered_total", "metrics-probe"),
              value("gpusentry_output_dead_letters_total", "metrics-probe"))

    async def main():
        out = Scripted(policy(max_attempts=1), [DeliveryError("no", retryable=False)], name="metrics-probe")
        return await run([out], [alert(1), alert(2), alert(3)])

    asyncio.run(main())
    assert value("gpusentry_output_delivered_total", "metrics-probe") == before[0] + 2
    assert value("gpusentry_output_dead_letters_total", "metrics-probe") == before[1] + 1
