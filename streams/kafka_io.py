"""The worker's own Kafka clients (aiokafka), beside faust's consumer.

faust consumes the event topics.  Everything whose timing the delivery guarantees depend on goes
through these clients instead, because the pipeline must know when a send is on the broker: the
alert, dead-letter and checkpoint producer (``acks=all``), a group-less reader for checkpoints and
the alerts topic, and the feedback reader that every worker runs over all feedback partitions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError

from gpusentry.config import Config
from streams.pipeline import EndOffsetsUnavailable

log = logging.getLogger(__name__)

# Reading "to the end": keep fetching until a fetch comes back empty.  Some brokers (Tansu) report a
# high watermark short of the last records of a multi-record batch, so the reported end alone is not
# trusted.
_EMPTY_POLL_MS = 250


# Called (no arguments) each time the broker answers again after failed attempts: the worker then checks its topics.
broker_back: list[Callable[[], object]] = []


# Errors that mean "the broker is not there right now" (restarting, a network cut): wait and ask again.
_TRANSIENT = (KafkaTimeoutError, KafkaConnectionError, NodeNotReadyError)
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0
# The pipeline's end-offset queries (for the event-time hold) are a hint, not a guarantee: asked again soon, so a
# query the broker does not answer in this long is given up rather than waited for.
END_QUERY_S = 5.0


async def until_answered(what: str, call: Callable[[], Awaitable[Any]], *,
                         sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> Any:
    """``call()`` until the broker answers: a broker restart pauses the worker instead of ending it (it used to
    exit 1 with KafkaTimeoutError about 90 s after the broker went away). Said once per outage."""
    delay, failures = RETRY_FIRST_S, 0
    while True:
        try:
            result = await call()
        except _TRANSIENT as exc:
            failures += 1
            if failures == 1:
                log.warning("broker did not answer %s (%s: %s); waiting for it, retrying every <= %.0f s",
                            what, type(exc).__name__, exc, RETRY_MAX_S)
            await sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)
            continue
        if failures:
            log.warning("broker answers %s again after %d failed attempt(s)", what, failures)
            for callback in broker_back:
                callback()
        return result


def checkpoint_topic(cfg: Config) -> str:
    return f"{cfg.worker.app_id}-checkpoints"


def bootstrap_list(cfg: Config) -> list[str]:
    return [s.strip() for s in cfg.kafka.bootstrap_servers.split(",") if s.strip()]


class KafkaClients:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.alerts_topic = cfg.topics.alerts
        self.checkpoint_topic = checkpoint_topic(cfg)
        self._common: dict[str, Any] = {
            "bootstrap_servers": bootstrap_list(cfg), "client_id": f"{cfg.kafka.client_id}-worker",
            **cfg.kafka.aiokafka_config()}
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._reader_lock = asyncio.Lock()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("KafkaClients.start() was not awaited")
        return self._producer

    @property
    def reader(self) -> AIOKafkaConsumer:
        if self._reader is None:
            raise RuntimeError("KafkaClients.start() was not awaited")
        return self._reader

    async def start(self) -> None:
        """Create and start the clients (aiokafka needs the running event loop)."""
        if self._producer is not None:
            return
        biggest = self.cfg.worker.checkpoint_max_bytes + 65536
        # No idempotence: an idempotent producer cannot recover after a memory broker restarts, and
        # a resent alert is dropped by its dedup key downstream anyway.
        self._producer = AIOKafkaProducer(**self._common, acks="all", enable_idempotence=False, linger_ms=5,
                                          max_request_size=biggest)
        self._reader = AIOKafkaConsumer(**self._common, group_id=None, enable_auto_commit=False,
                                        fetch_max_wait_ms=self.cfg.worker.fetch_max_wait_ms,
                                        max_partition_fetch_bytes=biggest, auto_offset_reset="earliest")
        await self._producer.start()
        await self._reader.start()

    async def stop(self) -> None:
        producer, reader, self._producer, self._reader = self._producer, self._reader, None, None
        if producer is not None:
            await producer.stop()
        if reader is not None:
            await reader.stop()

    async def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> Awaitable[Any]:
        return await self.producer.send(topic, value, key=key, partition=partition, headers=headers)

    async def flush(self) -> None:
        await self.producer.flush()

    async def write_checkpoint(self, partition: int, blob: bytes) -> int:
        # One record per send, so a batch never holds two checkpoints (see _EMPTY_POLL_MS).
        written = await until_answered("a checkpoint write", lambda: self.producer.send_and_wait(
            self.checkpoint_topic, blob, key=str(partition).encode(), partition=partition))
        return int(written.offset)

    async def checkpoint_end(self, partition: int) -> int:
        tp = TopicPartition(self.checkpoint_topic, partition)
        async with self._reader_lock:
            self.reader.assign([tp])
            end = (await until_answered("the checkpoint's end offset", lambda: self.reader.end_offsets([tp])))[tp]
            self.reader.assign([])
        return int(end)

    async def partitions(self, topic: str) -> list[int]:
        return await self._partitions(topic)

    async def _partitions(self, topic: str) -> list[int]:
        parts = await until_answered(f"the partitions of {topic}", lambda: self.producer.partitions_for(topic))
        if not parts:
            raise RuntimeError(f"topic {topic!r} does not exist; run `gpusentry worker --create-topics` once")
        return sorted(parts)

    async def _read(self, starts: dict[TopicPartition, int]) -> list[tuple[TopicPartition, bytes | None]]:
        """Every record from ``starts`` to the end of each partition, in offset order per partition."""
        out: list[tuple[TopicPartition, bytes | None]] = []
        async with self._reader_lock:
            self.reader.assign(list(starts))
            for tp, offset in starts.items():
                self.reader.seek(tp, offset)
            ends = await until_answered("end offsets", lambda: self.reader.end_offsets(list(starts)))
            reached = {tp for tp in starts if starts[tp] >= ends[tp]}
            empty = 0
            while True:
                if self.cfg.kafka.exact_high_watermark and len(reached) == len(starts):
                    break  # the reported ends are exact (Apache Kafka): no confirming empty poll
                batch = await self.reader.getmany(timeout_ms=_EMPTY_POLL_MS)
                if not batch and len(reached) == len(starts):
                    break
                if not batch:
                    empty += 1
                    if self.cfg.kafka.exact_high_watermark and empty < 40:
                        continue  # the records the broker reported are on their way (10 s at most)
                    # Nothing came although the broker reported more: fetch once more, then trust it.
                    reached = set(starts)
                    continue
                for tp, records in batch.items():
                    out.extend((tp, r.value) for r in records)
                    if records and records[-1].offset + 1 >= ends[tp]:
                        reached.add(tp)
            self.reader.assign([])
        return out

    async def read_checkpoint(self, partition: int) -> bytes | None:
        tp = TopicPartition(self.checkpoint_topic, partition)
        end = await self.checkpoint_end(partition)
        records = await self._read({tp: max(0, end - 2)})
        if not records and end > 0:
            records = await self._read({tp: 0})
        return records[-1][1] if records else None

    async def alert_end_offsets(self) -> dict[int, int]:
        tps = [TopicPartition(self.alerts_topic, p) for p in await self._partitions(self.alerts_topic)]
        async with self._reader_lock:
            ends = await until_answered("the alerts topic's end offsets", lambda: self.reader.end_offsets(tps))
        return {tp.partition: off for tp, off in ends.items()}

    async def end_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Where each (topic, partition) ends on the broker now; :class:`EndOffsetsUnavailable` if it does not say
        within ``END_QUERY_S``."""
        tps = [TopicPartition(topic, number) for topic, number in partitions]

        async def ask() -> dict[TopicPartition, int]:
            async with self._reader_lock:
                return await self.reader.end_offsets(tps)

        try:
            ends = await asyncio.wait_for(ask(), END_QUERY_S)
        except (KafkaError, TimeoutError) as exc:
            raise EndOffsetsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}

    async def read_alerts_since(self, marks: dict[int, int]) -> list[bytes]:
        starts = {TopicPartition(self.alerts_topic, p): marks.get(p, 0)
                  for p in await self._partitions(self.alerts_topic)}
        return [v for _, v in await self._read(starts) if v is not None]


async def follow_feedback(cfg: Config, on_message: Callable[[bytes | None, int, int], Awaitable[None]],
                          stop: asyncio.Event, caught_up: asyncio.Event, partitions: list[int]) -> None:
    """Read every partition of the feedback topic from the beginning, for ever (each worker does).

    ``caught_up`` is set once everything that was on the topic at start has been applied, so a
    worker publishes nothing before it knows the suppressions in force.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_list(cfg), client_id=f"{cfg.kafka.client_id}-feedback",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=max(cfg.worker.fetch_max_wait_ms, 100),
                                **cfg.kafka.aiokafka_config())
    await consumer.start()
    try:
        tps = [TopicPartition(cfg.topics.feedback, p) for p in partitions]
        consumer.assign(tps)
        if tps:
            await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps) if tps else {}
        pending = {tp for tp in tps if ends[tp] > 0}
        empty_polls = 0
        while not stop.is_set():
            try:
                batch = await consumer.getmany(timeout_ms=250 if not caught_up.is_set() else 500)
            except KafkaError as exc:
                log.warning("feedback reader: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batch.items():
                for r in records:
                    await on_message(r.value, tp.partition, r.offset)
                if records and records[-1].offset + 1 >= ends.get(tp, 0):
                    pending.discard(tp)
            if not caught_up.is_set():
                empty_polls = empty_polls + 1 if not batch else 0
                # Reported ends can be short (see _EMPTY_POLL_MS): caught up after an empty fetch.
                if not pending and empty_polls >= 1 or empty_polls >= 2:
                    caught_up.set()
    finally:
        caught_up.set()
        await consumer.stop()
