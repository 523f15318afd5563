"""Kafka: the alert itself (ECS JSON) on a topic for downstream consumers, and the dead-letter sink.

Both use one aiokafka producer with ``acks=all``; a send counts only once the broker confirmed it.
The producer is not idempotent on purpose: an idempotent producer cannot recover from a broker that
lost its state (the embedded broker keeps everything in memory), and the forwarder is at-least-once
anyway, so consumers dedupe on ``event.id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from gpusentry.settings.kafka import KafkaSettings
from gpusentry.settings.outputs import KafkaOutputSettings
from outputs.base import Alert, DeliveryError, Output, dedup_key

log = logging.getLogger(__name__)


def make_producer(kafka: KafkaSettings, bootstrap_servers: str | None = None) -> AIOKafkaProducer:
    servers = bootstrap_servers or kafka.bootstrap_servers
    if not servers:
        raise ValueError("kafka.bootstrap_servers is empty: set it (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS) "
                         "or run the forwarder inside `gpusentry up`")
    extra: dict[str, Any] = {} if bootstrap_servers else kafka.aiokafka_config()
    return AIOKafkaProducer(bootstrap_servers=servers, client_id=f"{kafka.client_id}-forwarder", acks="all",
                            enable_idempotence=False, linger_ms=5, **extra)


class KafkaOutput(Output):
    kind = "kafka"
    max_batch = 500

    def __init__(self, settings: KafkaOutputSettings, kafka: KafkaSettings, name: str | None = None) -> None:
        super().__init__(settings, name)
        self.settings = settings
        self.producer = make_producer(kafka, settings.bootstrap_servers or None)
        self._started = False

    async def send(self, batch: Sequence[Alert]) -> None:
        if not self._started:
            await self.producer.start()
            self._started = True
        try:
            futures = [await self.producer.send(self.settings.topic, orjson.dumps(a), key=dedup_key(a).encode())
                       for a in batch]
            for fut in futures:
                await fut
        except KafkaError as exc:
            raise DeliveryError(f"Kafka topic {self.settings.topic}: {type(exc).__name__}: {exc}",
                                retryable=bool(getattr(exc, "retriable", True))) from None

    async def close(self) -> None:
        if self._started:
            await self.producer.stop()
            self._started = False

    def secrets(self) -> Iterable[str]:
        return ()


class KafkaDeadLetterSink:
    """Writes dead letters to ``topics.deadletter`` and waits for the broker's confirmation."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.sent = 0

    async def send(self, record: dict[str, Any], key: str) -> None:
        reason = str(record.get("event", {}).get("reason", ""))
        await self.producer.send_and_wait(self.topic, orjson.dumps(record), key=key.encode() if key else None,
                                          headers=[("reason", reason.encode())])
        self.sent += 1


class KafkaThreadJournal:
    """Records Slack threads (:class:`outputs.slack.SlackThreads`) on a compacted topic: key = the incident's
    dedup key, value = ``{"channel", "ts"}``, a tombstone once the incident is resolved."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.failures = 0

    async def record(self, key: str, channel: str, ts: str | None) -> None:
        value = None if ts is None else orjson.dumps({"channel": channel, "ts": ts})
        try:
            await self.producer.send_and_wait(self.topic, value, key=key.encode())
        except KafkaError as exc:
            # The message is in Slack already; only a restart before the next record loses the thread.
            self.failures += 1
            log.warning("Slack thread of incident %s not recorded on %s (%s: %s); if the forwarder restarts "
                        "before the incident's next update, that update starts a new thread", key, self.topic,
                        type(exc).__name__, exc)


async def read_thread_journal(kafka: KafkaSettings, topic: str) -> list[tuple[str, str, str | None]]:
    """Every (dedup key, channel, ts or None) record on ``topic``, in the order each partition holds them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                client_id=f"{kafka.client_id}-forwarder", **kafka.aiokafka_config())
    await consumer.start()
    try:
        # Subscribing makes the client fetch the topic's metadata (a fresh group-less consumer knows no topic on
        # Apache Kafka, so partitions_for_topic() would say "none"); without a group it is assigned them all.
        consumer.subscribe([topic])
        deadline = time.monotonic() + 15
        while not consumer.assignment() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        if not partitions:
            log.warning("no partitions found for %s within 15 s: starting without recorded Slack threads", topic)
            return []
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[tuple[str, str, str | None]] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    key = r.key.decode("utf-8", "replace") if r.key else ""
                    if r.value is None:
                        out.append((key, "", None))
                        continue
                    try:
                        doc = orjson.loads(r.value)
                        out.append((key, str(doc["channel"]), str(doc["ts"])))
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        log.warning("skipped an unreadable record at %s[%d]@%d", topic, r.partition, r.offset)
        return out
    finally:
        await consumer.stop()
