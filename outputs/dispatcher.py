"""The one delivery core: routing, rate limits, timeouts, retries, circuit breakers, dead letters.

Every output gets a :class:`Lane`: a bounded queue and one task that takes alerts in order, batches
them when the output can take batches (HEC), waits for the output's rate limit, sends with a
timeout, and on failure retries with exponential backoff and jitter, honouring the service's
``Retry-After``.  Delivery holds rather than drops: while the output's circuit breaker is open the
lane pauses (nothing is sent, alerts wait in order) and tries again when it half-opens; an alert goes
to the dead-letter sink only for a permanent error (bad token, rejected payload), after
``max_attempts`` (when set) or once it has waited ``max_age_s`` for a retryable outage to end.  An alert
is therefore always either delivered or dead-lettered: :meth:`Dispatcher.submit` returns a ticket that
completes only then, and the forwarder commits its Kafka offset only after that (at least once).

Reasons are scrubbed of every secret the outputs hold before they reach a log or a dead letter.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import random
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from gpusentry.contract import get
from gpusentry.settings.outputs import DeliveryPolicy
from gpusentry.timefmt import format_timestamp
from outputs.base import SEVERITY_ORDER, Alert, Clock, DeliveryError, Output, dedup_key, severity, status

log = logging.getLogger(__name__)
DELIVERY_FAILED = "delivery_failed"

DELIVERED = PromCounter("gpusentry_output_delivered", "Alerts delivered, by output", ["output"])
ATTEMPT_FAILURES = PromCounter("gpusentry_output_attempt_failures", "Failed delivery attempts, by output",
                               ["output", "retryable"])
DEAD_LETTERS = PromCounter("gpusentry_output_dead_letters", "Alerts sent to the dead-letter topic, by output",
                           ["output"])
OUTPUT_BUGS = PromCounter("gpusentry_output_errors_unexpected",
                          "Unexpected exceptions raised by an output (bugs), by output", ["output"])
BREAKER_OPEN = Gauge("gpusentry_output_breaker_open", "1 while the output's circuit breaker is open", ["output"])


class DeadLetterSink(Protocol):
    """Where undeliverable alerts go (Kafka ``gpusentry.deadletter`` in production)."""

    async def send(self, record: dict[str, Any], key: str) -> None: ...


@dataclass
class MemoryDeadLetterSink:
    """Keeps dead letters in a list: tests and ``gpusentry outputs test``."""

    records: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, record: dict[str, Any], key: str) -> None:
        self.records.append(record)


def dead_letter_record(alert: Alert, output: str, reason: str, attempts: int, now: float,
                       status_code: int | None = None) -> dict[str, Any]:
    """A dead letter in the same shape as the worker's: ECS ``event.reason``/``error.*``, the alert as
    ``event.original`` (JSON text), and which output failed after how many attempts."""
    ts = format_timestamp(now)
    record: dict[str, Any] = {
        "@timestamp": ts,
        "event": {"kind": "event", "dataset": "gpusentry.deadletter", "reason": DELIVERY_FAILED, "created": ts,
                  "original": orjson.dumps(alert).decode()},
        "error": {"code": DELIVERY_FAILED, "message": reason},
        "host": {"name": get(alert, "host.name")},
        "rule": {"id": get(alert, "rule.id")},
        "gpusentry": {"deadletter": {"stage": "output", "output": output, "attempts": attempts,
                                     "dedup_key": dedup_key(alert)}},
    }
    if status_code is not None:
        record["http"] = {"response": {"status_code": status_code}}
    return record


# ---------------------------------------------------------------------------- policy pieces


class Route:
    """Which alerts an output wants: minimum severity, incident states, host and rule globs."""

    def __init__(self, policy: DeliveryPolicy) -> None:
        self.min_rank = SEVERITY_ORDER.index(policy.min_severity)
        self.statuses = frozenset(policy.statuses)
        self.hosts = list(policy.hosts)
        self.exclude_hosts = list(policy.exclude_hosts)
        self.rules = list(policy.rules)

    def matches(self, alert: Alert) -> bool:
        if SEVERITY_ORDER.index(severity(alert)) < self.min_rank or status(alert) not in self.statuses:
            return False
        host = str(get(alert, "host.name") or "")
        if self.hosts and not any(fnmatch.fnmatchcase(host, p) for p in self.hosts):
            return False
        if any(fnmatch.fnmatchcase(host, p) for p in self.exclude_hosts):
            return False
        if self.rules:
            ids = [str(get(alert, "rule.id") or ""), *(get(alert, "gpusentry.alert.rules") or ())]
            if not any(fnmatch.fnmatchcase(i, p) for i in ids for p in self.rules):
                return False
        return True


class TokenBucket:
    """``rate`` requests per second with ``burst`` back to back; rate 0 means unlimited."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.updated = clock.monotonic()

    async def acquire(self) -> float:
        """Take one token, waiting for it; return how long we waited."""
        if self.rate <= 0:
            return 0.0
        waited = 0.0
        while True:
            now = self.clock.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return waited
            wait = (1.0 - self.tokens) / self.rate
            waited += wait
            await self.clock.sleep(wait)


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failed attempts; after ``reset_s`` lets one trial through."""

    def __init__(self, threshold: int, reset_s: float) -> None:
        self.threshold, self.reset_s = threshold, reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self.last_error = ""

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self, now: float) -> bool:
        return self.opened_at is None or now - self.opened_at >= self.reset_s

    def success(self) -> None:
        self.failures, self.opened_at = 0, None

    def failure(self, now: float, reason: str) -> bool:
        """Record a failed attempt; return True when this opened (or re-opened) the breaker."""
        self.failures += 1
        self.last_error = reason
        if self.threshold and (self.failures >= self.threshold or self.opened_at is not None):
            self.opened_at = now
            return True
        return False


def backoff_delay(attempt: int, policy: DeliveryPolicy, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so retries spread but still grow."""
    ceiling = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------- outcome and lanes


@dataclass(frozen=True)
class Outcome:
    output: str
    delivered: bool
    attempts: int
    reason: str | None = None

    def describe(self) -> str:
        tries = f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}"
        if self.delivered:
            return f"delivered ({tries})"
        return f"FAILED: {self.reason}"


@dataclass
class _Item:
    alert: Alert
    future: asyncio.Future[Outcome]
    size: int
    queued_at: float  # dispatcher clock (monotonic) when the alert reached the lane: max_age_s counts from here


class Lane:
    """One output's queue and delivery loop."""

    def __init__(self, output: Output, dispatcher: Dispatcher) -> None:
        self.output = output
        self.policy = output.policy
        self.route = Route(output.policy)
        self.dispatcher = dispatcher
        self.clock = dispatcher.clock
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=self.policy.queue_size)
        self.bucket = TokenBucket(self.policy.rate_per_s, self.policy.burst, self.clock)
        self.breaker = CircuitBreaker(self.policy.breaker_failures, self.policy.breaker_reset_s)
        self.stats: Counter[str] = Counter()
        self.waits: list[float] = []  # retry waits, for operators' logs and the tests
        self.task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.output.name

    async def run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._deliver(batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _next_batch(self) -> list[_Item]:
        first = await self.queue.get()
        batch, size = [first], first.size
        limit, max_bytes = self.output.max_batch, self.output.max_batch_bytes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.output.linger_s
        while len(batch) < limit:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if max_bytes and size + item.size > max_bytes:
                # Too big for this batch: deliver what we have, then this one first in the next.
                await self._deliver(batch)
                for _ in batch:
                    self.queue.task_done()
                batch, size = [item], item.size
                continue
            batch.append(item)
            size += item.size
        return batch

    async def _deliver(self, batch: list[_Item]) -> None:
        alerts = [i.alert for i in batch]
        secrets = list(self.output.secrets())
        attempts = 0
        while True:
            now = self.clock.monotonic()
            if not self.breaker.allow(now):
                # Paused, not dropped: wait for the half-open trial (the forwarder keeps polling meanwhile).
                wait = self.breaker.reset_s - (now - (self.breaker.opened_at or now))
                if self._too_old(batch, now + wait):
                    await self._dead_letter(batch, f"circuit breaker open for output {self.name} (last: "
                                            f"{self.breaker.last_error}); not delivered within max_age_s "
                                            f"{self.policy.max_age_s:g}s", attempts, None)
                    return
                self.stats["breaker_waits"] += 1
                await self.clock.sleep(max(wait, 0.0))
                continue
            await self.bucket.acquire()
            attempts += 1
            self.stats["attempts"] += 1
            try:
                await asyncio.wait_for(self.output.send(alerts), self.output.attempt_timeout_s())
            except DeliveryError as exc:
                error = exc
            except (TimeoutError, httpx.TimeoutException):
                error = DeliveryError(f"no answer within {self.output.attempt_timeout_s():g}s (timeout_s)",
                                      retryable=True)
            except (httpx.TransportError, OSError) as exc:
                error = DeliveryError(f"connection failed: {type(exc).__name__}: {exc}", retryable=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug in an output: counted, logged with its traceback and dead-lettered; strict re-raises.
                self.stats["bugs"] += 1
                OUTPUT_BUGS.labels(self.name).inc()
                reason = scrub(f"output {self.name} raised {type(exc).__name__}: {exc}", secrets)
                trace = scrub("".join(traceback.format_exception(exc)), secrets)  # scrubbed like the reason
                log.error("%s (alert dead-lettered)\n%s", reason, trace)
                await self._dead_letter(batch, reason, attempts, None)
                if self.dispatcher.strict:
                    raise
                return
            else:
                self.breaker.success()
                BREAKER_OPEN.labels(self.name).set(0)
                self.stats["delivered"] += len(batch)
                DELIVERED.labels(self.name).inc(len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_result(Outcome(self.name, True, attempts))
                return
            reason = scrub(error.reason, secrets)
            self.stats["failures"] += 1
            ATTEMPT_FAILURES.labels(self.name, str(error.retryable).lower()).inc()
            if error.retryable and self.breaker.failure(self.clock.monotonic(), reason):
                self.stats["breaker_opened"] += 1
                BREAKER_OPEN.labels(self.name).set(1)
                log.warning("output %s: circuit breaker open for %gs after %d failures: %s", self.name,
                            self.policy.breaker_reset_s, self.breaker.failures, reason)
            if not error.retryable or (self.policy.max_attempts and attempts >= self.policy.max_attempts):
                why = reason if not error.retryable else f"{reason} (gave up after {attempts} attempts)"
                await self._dead_letter(batch, why, attempts, error.status)
                return
            if error.retry_after is not None:
                delay = min(error.retry_after, self.policy.max_retry_after_s)
                self.stats["retry_after_honoured"] += 1
            else:
                delay = backoff_delay(attempts, self.policy, self.dispatcher.rng)
            if self._too_old(batch, self.clock.monotonic() + delay):
                await self._dead_letter(batch, f"{reason} (not delivered within max_age_s "
                                        f"{self.policy.max_age_s:g}s, {attempts} attempts)", attempts, error.status)
                return
            self.stats["retries"] += 1
            self.waits.append(delay)
            log.info("output %s: attempt %d failed (%s); retrying in %.2fs", self.name, attempts, reason, delay)
            await self.clock.sleep(delay)

    def _too_old(self, batch: list[_Item], at: float) -> bool:
        """True when the oldest alert of ``batch`` would have waited longer than ``max_age_s`` by ``at``."""
        return bool(self.policy.max_age_s) and at - min(i.queued_at for i in batch) > self.policy.max_age_s

    async def _dead_letter(self, batch: list[_Item], reason: str, attempts: int, code: int | None) -> None:
        now = self.clock.time()
        for item in batch:
            record = dead_letter_record(item.alert, self.name, reason, attempts, now, code)
            try:
                await self.dispatcher.dead_letters.send(record, dedup_key(item.alert))
            except Exception as exc:  # noqa: BLE001 - not swallowed: the ticket fails with it
                # Nowhere left to put it: the ticket fails, so the forwarder does not commit the offset.
                if not item.future.done():
                    item.future.set_exception(exc)
                continue
            self.stats["dead_lettered"] += 1
            DEAD_LETTERS.labels(self.name).inc()
            log.warning("output %s: alert %s dead-lettered: %s", self.name, dedup_key(item.alert), reason)
            if not item.future.done():
                item.future.set_result(Outcome(self.name, False, attempts, reason))


class Dispatcher:
    """Routes each alert to the outputs that want it and completes its ticket when all are done."""

    def __init__(self, outputs: Sequence[Output], dead_letters: DeadLetterSink, *, clock: Clock | None = None,
                 seed: int | None = None, strict: bool = False) -> None:
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique, got {names}")
        self.clock = clock or Clock()
        self.rng = random.Random(seed)
        self.dead_letters = dead_letters
        self.strict = strict
        self.lanes = [Lane(o, self) for o in outputs]
        self.routed: Counter[str] = Counter()

    def lane(self, name: str) -> Lane:
        return next(lane for lane in self.lanes if lane.name == name)

    async def start(self) -> Dispatcher:
        for lane in self.lanes:
            if lane.task is None:
                lane.task = asyncio.create_task(lane.run(), name=f"output-{lane.name}")
        return self

    async def submit(self, alert: Alert) -> asyncio.Future[list[Outcome]]:
        """Queue ``alert`` for every output whose route matches; the returned future ends with the outcomes."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for lane in self.lanes:
            if not lane.route.matches(alert):
                continue
            if lane.task is None or lane.task.done():
                self._raise_if_lane_died(lane)
            fut: asyncio.Future[Outcome] = loop.create_future()
            await lane.queue.put(_Item(alert, fut, lane.output.encoded_size(alert), self.clock.monotonic()))
            futures.append(fut)
            self.routed[lane.name] += 1
        return asyncio.ensure_future(_gather(futures))

    async def deliver(self, alert: Alert) -> list[Outcome]:
        return await (await self.submit(alert))

    def _raise_if_lane_died(self, lane: Lane) -> None:
        if lane.task is None:
            raise RuntimeError("dispatcher not started: call await dispatcher.start()")
        exc = lane.task.exception() if not lane.task.cancelled() else None
        raise RuntimeError(f"output {lane.name} stopped: {exc!r}")

    async def drain(self) -> None:
        """Wait until every queued alert is delivered or dead-lettered."""
        for lane in self.lanes:
            if lane.task is not None and not lane.task.done():
                join = asyncio.ensure_future(lane.queue.join())
                await asyncio.wait({join, lane.task}, return_when=asyncio.FIRST_COMPLETED)
                join.cancel()
            if lane.task is not None and lane.task.done() and not lane.task.cancelled() and lane.task.exception():
                raise RuntimeError(f"output {lane.name} stopped") from lane.task.exception()

    async def close(self) -> None:
        try:
            await self.drain()
        finally:
            for lane in self.lanes:
                if lane.task is not None:
                    lane.task.cancel()
                    await asyncio.gather(lane.task, return_exceptions=True)
                await lane.output.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {lane.name: dict(lane.stats) for lane in self.lanes}


async def _gather(futures: list[asyncio.Future[Outcome]]) -> list[Outcome]:
    return list(await asyncio.gather(*futures))
