"""Where a cycle's events go: Kafka (through the spool), a JSONL file, or stdout.

Every sink gets the cycle as ``{dataset: [events]}``.  Kafka receives **one message per dataset
per cycle** (a JSON array of that host's events, keyed by ``host.name``), split only when it would
pass ``contract.max_message_bytes``.  Files and stdout get one event per line, the format
``gpusentry replay`` reads.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from agents.metrics import AgentMetrics
from agents.spool import Position, Spool
from gpusentry.contract import encode
from gpusentry.settings.kafka import KafkaSettings

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, host_name: str, batches: dict[str, list[dict[str, Any]]]) -> None: ...

    def close(self, timeout: float = 10.0) -> None: ...


def split_batch(events: list[dict[str, Any]], max_bytes: int, metrics: AgentMetrics | None = None) -> list[bytes]:
    """Encode events as one array, halving it until every part fits under ``max_bytes``."""
    value = encode(events)
    if len(value) <= max_bytes:
        return [value]
    if len(events) == 1:
        log.error("an event of %d bytes is over contract.max_message_bytes (%d) and is dropped: %s %s",
                  len(value), max_bytes, events[0]["event"]["dataset"], events[0]["event"]["id"])
        if metrics is not None:
            metrics.oversize_dropped.inc()
        return []
    mid = len(events) // 2
    return split_batch(events[:mid], max_bytes, metrics) + split_batch(events[mid:], max_bytes, metrics)


class JsonlSink:
    """One event per line, appended; for air-gapped hosts and for replay."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 - closed in close()

    def write(self, host_name: str, batches: dict[str, list[dict[str, Any]]]) -> None:
        for events in batches.values():
            for ev in events:
                self._fh.write(orjson.dumps(ev) + b"\n")
        self._fh.flush()

    def close(self, timeout: float = 10.0) -> None:
        self._fh.close()


class StdoutSink(JsonlSink):
    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._fh = stream if stream is not None else sys.stdout.buffer

    def close(self, timeout: float = 10.0) -> None:
        self._fh.flush()


# Delivery errors after which this producer's idempotence state (producer id, epoch, sequence numbers) is
# of no further use: a new producer, with a new id, resends from the spool cursor.
_NEW_PRODUCER_ERRORS = frozenset({"PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "UNKNOWN_PRODUCER_ID",
                                  "OUT_OF_ORDER_SEQUENCE_NUMBER", "INVALID_PRODUCER_ID_MAPPING", "_FATAL"})


@dataclass(slots=True)
class _InFlight:
    end: Position
    error: str | None = None
    done: bool = False


@dataclass(frozen=True, slots=True)
class SpoolRemoval:
    """The spool's files were removed from outside while the agent ran."""

    problem: str  # what is gone, in words
    removed_messages: int  # unsent messages that were in the removed files


class KafkaSink:
    """confluent-kafka producer fed from the spool, in order, acknowledged record by record.

    Every message is appended to the spool before it is produced; the spool cursor moves only past
    a contiguous run of acknowledged messages.  A failed delivery (``_MSG_TIMED_OUT`` after
    ``message.timeout.ms``, a purge, any error) stops sending: the messages queued behind it are
    purged, and once nothing is in flight the sender rewinds to the cursor and sends again from
    there.  ``BufferError`` (the client's queue is full) leaves the rest in the spool for the next
    cycle.  Nothing is lost under the spool cap and nothing is reordered.
    """

    def __init__(self, kafka: KafkaSettings, topics: dict[str, str], spool: Spool, metrics: AgentMetrics, *,
                 max_message_bytes: int, message_timeout_ms: int = 60_000, max_in_flight: int = 500,
                 extra_config: dict[str, Any] | None = None) -> None:
        from confluent_kafka import Producer

        self.topics = topics
        self.spool = spool
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self._fatal = False
        self._closed = False
        self._last_error_logged: str | None = None
        self.config: dict[str, Any] = {
            **kafka.confluent_config(),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 20,
            "message.timeout.ms": message_timeout_ms,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 2000,
            # The contract's size cap, plus room for the record framing.
            "message.max.bytes": max(max_message_bytes + 64 * 1024, 1_000_000),
            "error_cb": self._on_error,
            **(extra_config or {}),
        }
        self._producer_cls = Producer
        self.producer = Producer(self.config)
        self._inflight: deque[_InFlight] = deque()
        self._read_pos: Position = spool.head
        self._rewinding = False
        self._lock = threading.Lock()
        self.delivered = 0
        self._dropped_reported = 0

    # ------------------------------------------------------------------ callbacks

    def _on_error(self, err: Any) -> None:
        text = f"{err.name()}: {err.str()}"
        if err.fatal():
            self._fatal = True
            log.error("Kafka producer fatal error (%s); the producer is recreated and the spool resent", text)
        elif text != self._last_error_logged:
            # Said once a minute at most with a count (gpusentry.logs.RepeatFilter): an outage is one line, not
            # two per retry.
            self._last_error_logged = text
            log.warning("Kafka at %s: %s; messages wait in the spool and go out when it answers (check "
                        "kafka.bootstrap_servers and the security settings)", self.config.get("bootstrap.servers"),
                        text)

    def _on_delivery(self, entry: _InFlight) -> Any:
        def report(err: Any, msg: Any) -> None:
            entry.done = True
            if err is not None:
                entry.error = err.name()
                self.metrics.delivery_failures.labels(err.name()).inc()
                if err.fatal() or err.name() in _NEW_PRODUCER_ERRORS:
                    self._fatal = True
            else:
                self.metrics.messages_delivered.inc()
        return report

    # ------------------------------------------------------------------ the sink

    def write(self, host_name: str, batches: dict[str, list[dict[str, Any]]]) -> None:
        key = host_name.encode()
        with self._lock:
            for dataset, events in batches.items():
                if not events:
                    continue
                topic = self.topics[dataset]
                for value in split_batch(events, self.max_message_bytes, self.metrics):
                    self.spool.append(topic, key, value)
                    self.metrics.messages_spooled.inc()
            self.spool.flush()
            self.pump()

    def check_spool(self) -> SpoolRemoval | None:
        """Whether the spool's files were removed since the last cycle; when they were, carry on with what is left
        (:meth:`Spool.recover`) and say what was found, for the agent to report."""
        with self._lock:
            problem = self.spool.missing()
            if problem is None:
                return None
            in_flight = len(self._inflight)
            removed = self.spool.recover()
            self._read_pos = max(self._read_pos, self.spool.head)
            self.metrics.spool_removals.inc()
            log.error("%s: %d unsent message(s) were in the removed files (%d were already with the Kafka client and "
                      "may still arrive); the agent reports it and goes on with a new segment", problem, removed,
                      min(in_flight, removed))
            return SpoolRemoval(problem, removed)

    def pump(self) -> None:
        """Serve delivery reports, move the cursor, produce what is next.  Never blocks."""
        self.producer.poll(0)
        self._settle()
        if self._fatal:
            self._recreate()
        if not self._rewinding:
            self._produce_more()
        self.spool.commit()
        self.metrics.spool_messages.set(self.spool.pending)
        self.metrics.spool_bytes.set(self.spool.size_bytes)
        if self.spool.dropped > self._dropped_reported:
            self.metrics.spool_dropped.inc(self.spool.dropped - self._dropped_reported)
            self._dropped_reported = self.spool.dropped

    def _settle(self) -> None:
        acked, last = 0, None
        while self._inflight and self._inflight[0].done and self._inflight[0].error is None:
            last = self._inflight.popleft().end
            acked += 1
        if last is not None:
            self.spool.ack(last, acked)
            self.delivered += acked
        failed = next((e for e in self._inflight if e.error is not None), None)
        if failed is not None and not self._rewinding:
            self._rewinding = True
            if self._closed and failed.error == "_PURGE_QUEUE":
                return  # close() purged what waited: they stay in the spool, as close() then says
            log.warning("Kafka delivery failed (%s): %d message(s) go back to the spool and are resent in order",
                        failed.error, len(self._inflight))
            # Nothing queued behind the failure may overtake it.
            self.producer.purge(in_queue=True, in_flight=False, blocking=False)
        if self._rewinding and all(e.done for e in self._inflight):
            self._inflight.clear()
            self._read_pos = self.spool.head
            self._rewinding = False

    def _produce_more(self) -> None:
        room = self.max_in_flight - len(self._inflight)
        if room <= 0:
            return
        for msg in self.spool.read(self._read_pos, room):
            entry = _InFlight(msg.end)
            try:
                self.producer.produce(msg.topic, msg.value, msg.key, on_delivery=self._on_delivery(entry))
            except BufferError:
                # The client's queue is full: the rest stays in the spool for the next cycle.
                self.metrics.producer_queue_full.inc()
                break
            self._inflight.append(entry)
            self._read_pos = msg.end

    def _recreate(self) -> None:
        log.warning("Kafka producer state is unusable; starting a new producer and resending from the spool")
        self.producer.purge(in_queue=True, in_flight=True, blocking=False)
        self.producer.flush(1)
        self.producer.poll(0)
        self._inflight.clear()
        self.producer = self._producer_cls(self.config)
        self._fatal = False
        self._rewinding = False
        self._read_pos = self.spool.head

    def drain(self, timeout: float) -> bool:
        """Send what the spool holds until it is empty or ``timeout`` passes; True when empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                self.pump()
                if not self._inflight and self.spool.pending == 0:
                    return True
            self.producer.poll(0.05)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered in ``timeout``; the rest stays spooled for the next start."""
        if self._closed:
            return
        self._closed = True
        self.drain(timeout)
        with self._lock:
            self.producer.purge(in_queue=True, in_flight=False, blocking=False)
            self.producer.flush(min(timeout, 5.0))
            self.producer.poll(0)
            self._settle()
            self.spool.close()
            # The client holds our callbacks and we hold it: let it go now (its threads and sockets with it)
            # rather than whenever the garbage collector gets round to the cycle.
            del self.producer
        if self.spool.pending:
            log.warning("%d message(s) stay in the spool (%s) and are sent at the next start", self.spool.pending,
                        self.spool.dir)
