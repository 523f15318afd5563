"""The worker's processing core: messages in, engine, alerts and dead letters out, checkpoints.

No faust here (the faust agent in :mod:`streams.agents` only feeds messages in), and no detection
logic (that is :class:`detectors.engine.Engine`).  What this module owns is delivery:

* **State per input partition.**  All of a host's events share a partition number across the four
  event topics (keyed by ``host.name``, co-partitioned), so partition *p*'s hosts form one checkpoint,
  written as one record to partition *p* of the checkpoint topic every ``worker.checkpoint_interval_s``
  and on rebalance and shutdown.  Each host's snapshot is taken right after one of its own messages (at
  most once per interval) and records the input offsets it covers, so no checkpoint stalls the stream
  to snapshot every host at once.
* **Event-time order across topics.**  With ``reorder_hold_s`` (the worker's ``[worker] reorder_hold_s``), a
  partition's messages are held per topic and released earliest event time first, while no topic that is
  delivering to the partition (it delivered within ``DELIVERING_S`` and has records left on the broker) is behind.
  A held message waits at most ``reorder_hold_s`` for such a topic, and up to ``STALLED_WAIT_S`` for one whose
  end offset, asked of the broker, shows records not received yet (its fetches stalled); ``reorder_max_held``
  bounds what is held.  So a worker catching up a backlog meets a host's events in the order ``replay`` does.
  Messages less than ``BACKLOG_AFTER_S`` behind the wall clock (a live fleet) are not held.
* **Offsets after state.**  A message is acknowledged to faust (and so becomes committable) only
  after a checkpoint that covers it is on the broker, and that checkpoint is written only after every
  alert and dead letter sent before it is acknowledged by the broker.  A killed worker therefore
  loses nothing: its successor restores the checkpoint, skips each host's input its snapshot already
  covers, and replays the rest.
* **No doubled incident updates.**  Replaying regenerates the alerts a host sent after its snapshot
  (event time drives the engine, and an alert's ``event.id`` is a digest of its incident, status,
  evidence count and event time).  The checkpoint records where the alerts topic stood no later than the
  oldest snapshot that will be replayed (the hosts with events after their snapshot), and on restore the
  alerts topic is read from there: a regenerated alert already on it is not sent again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import pickle
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from detectors.engine import DetectorFailure, Engine
from gpusentry.contract import Decoded, Reject, RejectCode, decode_message
from gpusentry.timefmt import format_timestamp, parse_timestamp
from streams.feedback import Suppressions
from streams.metrics import WorkerMetrics

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 6  # 4: detectors share per-host GPU windows (Detector.new_host_state); 5: and steadiness;
# 6: sandbox lineage, recurrence and busy-time cost accounting in the host state
# Event-time ordering holds messages only when they are this far behind the wall clock (a backlog being caught up).
BACKLOG_AFTER_S = 30.0
# A topic that delivered here within this long, and still has records on the broker, is one the others wait for
# (each held message at most reorder_hold_s). Longer than a broker restart: during one nothing is delivered, and
# afterwards one topic's records must not run ahead of another's merely because both were silent meanwhile.
DELIVERING_S = 120.0
# Past reorder_hold_s a held message still waits, up to this long, for a topic the broker says has records this
# worker has not received yet: after a broker restart one topic's fetches can resume tens of seconds after
# another's (seen on a loaded machine), and without the wait the other topic's events would run ahead of them.
STALLED_WAIT_S = DELIVERING_S
# A view of a partition's end (the consumer's last fetch response, or the broker's answer) this old or younger says
# whether the topic is drained. The consumer refreshes its view of a drained partition with every fetch (faust's
# aiokafka consumer waits 1.5 s at most for one); a view older than this is of a partition whose fetches stalled.
VIEW_FRESH_S = 5.0
# Dead letters carry the original message up to this size (enough to debug, never a 10 MB copy).
MAX_ORIGINAL_BYTES = 64 * 1024


class DeadLetterReason:
    """Reasons beside the contract's reject codes (``oversize``, ``not_json``, ``wrong_type``, ...)."""

    DETECTOR_FAILED = "detector_failed"
    BAD_FEEDBACK = "bad_feedback"


class EndOffsetsUnavailable(RuntimeError):
    """The broker did not say where the asked partitions end (restarting, cut off); the caller goes on without."""


class KafkaIO(Protocol):
    """What the pipeline needs from Kafka (``streams.kafka_io.KafkaClients`` on a real broker)."""

    async def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> Awaitable[Any]: ...

    async def flush(self) -> None: ...

    async def write_checkpoint(self, partition: int, blob: bytes) -> int: ...  # the record's offset

    async def read_checkpoint(self, partition: int) -> bytes | None: ...

    async def checkpoint_end(self, partition: int) -> int: ...  # the checkpoint partition's end offset

    async def alert_end_offsets(self) -> dict[int, int]: ...

    # Where each (topic, partition) ends on the broker; raises EndOffsetsUnavailable when the broker does not say.
    async def end_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]: ...

    async def read_alerts_since(self, marks: dict[int, int]) -> Iterable[bytes]: ...


@dataclass
class PartitionState:
    number: int
    offsets: dict[str, int] = field(default_factory=dict)  # topic -> next offset processed here
    # Each host's last snapshot (zlib-compressed pickle) and the offsets of its partition it covers.
    # Hosts are snapshotted one at a time, at most once per checkpoint interval, right after one of
    # their messages, so the cost is spread over the stream instead of stalling it at checkpoints.
    blobs: dict[str, bytes] = field(default_factory=dict)
    covered: dict[str, dict[str, int]] = field(default_factory=dict)
    snapshot_at: dict[str, float] = field(default_factory=dict)  # monotonic time of the host's snapshot
    changed: set[str] = field(default_factory=set)  # hosts with events after their snapshot
    # Where the alerts topic stood (end offsets per partition) no later than each host's snapshot: everything
    # the host published after its snapshot lies at or after these marks. last_marks: the latest known marks.
    snap_marks: dict[str, dict[int, int]] = field(default_factory=dict)
    last_marks: dict[int, int] | None = None
    # (hosts of the message, topic, offset, ack): acknowledged once a written checkpoint covers them.
    pending: list[tuple[tuple[str, ...], str, int, Callable[[], Any]]] = field(default_factory=list)
    dirty: bool = False
    last_checkpoint: float = 0.0  # monotonic
    # Event-time order across topics: messages received but not processed yet, per topic in offset order, as
    # (event time, arrival, offset, key, value, ack, decoded: each message is decoded once); and when each topic
    # last delivered a message here.
    held: dict[str, deque[tuple[float, float, int, bytes | None, bytes | None, Callable[[], Any], Decoded]]] = field(
        default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    delivered_to: dict[str, float] = field(default_factory=dict)  # topic -> latest event time it delivered here
    next_offset: dict[str, int] = field(default_factory=dict)  # topic -> offset after the last one delivered here
    # Digests of each host's latest messages (any topic): a resend of one of them is a copy, not new evidence.
    # recent_snap: as of the host's snapshot, so a restored host drops only copies its snapshot already holds.
    recent: dict[str, deque[bytes]] = field(default_factory=dict)
    recent_snap: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    written_at_offset: int | None = None  # where this worker's last checkpoint of the partition landed
    stalled: set[str] = field(default_factory=set)  # topics waited for past the hold, until they deliver again


@dataclass(frozen=True)
class Topics:
    events: tuple[str, ...]
    alerts: str
    deadletter: str
    feedback: str


# An agent resends a batch when it cannot confirm its delivery (the request may have landed before a cut): a copy
# arrives after at most the few batches in flight with it, so a short per-host memory finds every one.
RECENT_MESSAGES = 64


def _message_time(decoded: Decoded) -> float:
    """The event time a message is ordered by: its latest event's (an agent's batch is one cycle); a message with
    no valid event (it is only dead letters) sorts first, so it never holds others back."""
    return max((parse_timestamp(ev["@timestamp"]) for ev in decoded.events), default=float("-inf"))


def alert_signature(alert: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two incident updates the same update, even when batches interleaved differently."""
    a = alert.get("gpusentry", {}).get("alert", {})
    return (a.get("dedup_key"), a.get("status"), a.get("severity"), tuple(a.get("signals") or ()),
            alert.get("@timestamp"))


class Pipeline:
    def __init__(self, engine: Engine, io: KafkaIO, topics: Topics, *, max_message_bytes: int,
                 checkpoint_interval_s: float, metrics: WorkerMetrics | None = None,
                 suppressions: Suppressions | None = None, worker_id: str = "gpusentry",
                 on_alert: Callable[[dict[str, Any]], None] | None = None, snapshot_cpu_share: float = 0.15,
                 checkpoint_max_bytes: int = 16 * 1024 * 1024, reorder_hold_s: float = 0.0,
                 reorder_max_held: int = 20_000) -> None:
        self.engine = engine
        # > 0: each partition's messages are processed in event-time order across the event topics (a host's
        # GPU samples and process events meet the engine in the order they happened, whichever topic the
        # consumer fetched first), waiting at most this long for a topic that is delivering to catch up.
        self.reorder_hold_s = reorder_hold_s
        self.reorder_max_held = reorder_max_held
        # (topic, partition) -> the broker's end offset as the consumer last saw it (set by the worker), or None.
        self.highwater: Callable[[str, int], int | None] | None = None
        # (topic, partition) -> its end offset as the broker last answered an end_offsets query (asked while
        # messages wait in the hold): fresher than the consumer's view of a topic whose fetches have stalled.
        self._broker_ends: dict[tuple[str, int], tuple[int, float]] = {}  # (end offset, monotonic time asked)
        # (topic, partition) -> monotonic time of the consumer's last fetch response for it (its highwater is as
        # of then), or None where the consumer does not say (set by the worker).
        self.polled_at: Callable[[str, int], float | None] | None = None
        self.io = io
        self.topics = topics
        self.max_message_bytes = max_message_bytes
        self.checkpoint_interval_s = checkpoint_interval_s
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.suppressions = suppressions if suppressions is not None else Suppressions()
        self.worker_id = worker_id
        self.on_alert = on_alert
        self.partitions: dict[int, PartitionState] = {}
        self._parked: dict[int, PartitionState] = {}  # revoked by a rebalance that may give them back
        self._revoked_at: float | None = None  # when the current rebalance stopped this worker's detection
        self.lock = asyncio.Lock()
        # Snapshot cost grows with the number of hosts, not events (a host's models have a fixed size), so
        # it is rationed: snapshots may use this share of the time; beyond it they wait (oldest first, as
        # hosts send messages), which lengthens the replay after a crash instead of the alert latency.
        self.snapshot_cpu_share = snapshot_cpu_share
        self.checkpoint_max_bytes = checkpoint_max_bytes
        self._snapshot_credit = 0.0  # seconds of snapshot work currently allowed
        self._credit_at = time.monotonic()
        # Already on the alerts topic (found when restoring): event ids and update signatures.
        self._published_ids: set[str] = set()
        self._published_signatures: set[tuple[Any, ...]] = set()
        self._inflight: list[Awaitable[Any]] = []
        self._topic_counters: dict[str, tuple[Any, Any]] = {}
        self.stats = {"messages": 0, "events": 0, "alerts": 0, "deadletters": 0, "duplicates": 0,
                      "suppressed": 0, "skipped": 0, "resent": 0}

    # ------------------------------------------------------------------ messages

    async def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                     ack: Callable[[], Any]) -> None:
        """Process one message (in event-time order across topics, with ``reorder_hold_s``); ``ack`` is called once
        a checkpoint covers it."""
        async with self.lock:
            part = self.partitions.get(partition)
            if part is None:
                part, _ = await self._claim(partition)
            decoded = self._decode(key, value)
            if self.reorder_hold_s <= 0:
                await self._process(part, topic, offset, key, value, ack, decoded)
                return
            now = time.monotonic()
            at = _message_time(decoded)
            part.held.setdefault(topic, deque()).append((at, now, offset, key, value, ack, decoded))
            part.last_seen[topic] = now
            part.stalled.discard(topic)
            part.next_offset[topic] = offset + 1
            if at > part.delivered_to.get(topic, float("-inf")):
                part.delivered_to[topic] = at
            await self._release(part, now)

    def _topic_rank(self, topic: str) -> int:
        events = self.topics.events
        return events.index(topic) if topic in events else len(events)

    async def _release(self, part: PartitionState, now: float, *, force: bool = False) -> None:
        """Process held messages, earliest event time first, while no topic that is delivering here is still
        behind (or the earliest has waited ``reorder_hold_s``, or too much is held)."""
        hold = self.reorder_hold_s
        while True:
            heads = [(q[0][0], self._topic_rank(t), t) for t, q in part.held.items() if q]
            if not heads:
                return
            ts, _, topic = min(heads)
            first = part.held[topic][0]
            # Only a backlog needs holding: fresh events (a live fleet, seconds behind the wall clock) are never
            # "late" to one another, and incident keys do not depend on their order, so they are not delayed.
            waited = now - first[1]
            if not force and waited < max(hold, STALLED_WAIT_S) and time.time() - ts > BACKLOG_AFTER_S:
                # Behind: a topic still delivering here, with nothing held, that has not yet delivered this far.
                behind = [t for t, seen in part.last_seen.items() if now - seen < max(hold, DELIVERING_S)
                          and not part.held.get(t) and part.delivered_to.get(t, float("-inf")) < ts
                          and not self._drained(t, part, first[1], now)]
                if waited >= hold:
                    # Past the hold, only a topic the broker says has records not received yet is waited for.
                    behind = [t for t in behind if self._undelivered(t, part)]
                    # A stall: the topic has delivered nothing here for the whole hold (counted once until it does).
                    for t in {t for t in behind if now - part.last_seen[t] >= hold} - part.stalled:
                        part.stalled.add(t)
                        self.metrics.stalled_topics.labels(t).inc()
                        log.info("partition %d: %s has records on the broker not received yet; its other topics "
                                 "wait for them (at most %.0f s per message)", part.number, t, STALLED_WAIT_S)
                if behind and sum(len(q) for q in part.held.values()) < self.reorder_max_held:
                    return  # a topic that is delivering may still bring something earlier
            _, _, offset, key, value, ack, decoded = part.held[topic].popleft()
            await self._process(part, topic, offset, key, value, ack, decoded)

    def _drained(self, topic: str, part: PartitionState, since: float, now: float) -> bool:
        """Whether ``topic`` has delivered here everything the broker holds for this partition, as a view from after
        ``since`` (when the message that would wait for it arrived) or from the last ``VIEW_FRESH_S`` shows: an
        older one may be stale (the topic's fetches stalled, and records came meanwhile), so it proves nothing."""
        # Called for every waiting topic of every held message: the consumer's clock is read only when needed.
        number = part.number
        position = max(self._position(topic, part), 0)
        asked = self._broker_ends.get((topic, number))
        end = self.highwater(topic, number) if self.highwater is not None else None
        # End offsets only grow: any view beyond the position, fresh or not, shows records still to come. An empty
        # partition has nothing to wait for, delivered here or not.
        if (asked is None and end is None) or (asked is not None and asked[0] > position) or (
                end is not None and end > position):
            return False
        if asked is not None and (asked[1] >= since or now - asked[1] <= VIEW_FRESH_S):
            return True
        if end is None:
            return False
        at = self.polled_at(topic, number) if self.polled_at is not None else None
        return at is None or at >= since or now - at <= VIEW_FRESH_S

    @staticmethod
    def _position(topic: str, part: PartitionState) -> int:
        """Where the consumer stands in the topic's partition: after the last message delivered here, or else at
        the restored checkpoint's offset, from where it resumes (-1: not known)."""
        return max(part.next_offset.get(topic, -1), part.offsets.get(topic, -1))

    def _undelivered(self, topic: str, part: PartitionState) -> bool:
        """Whether the broker holds records of ``topic`` for this partition beyond what reached this worker (so
        they are on their way, however slowly)."""
        position = self._position(topic, part)
        asked = self._broker_ends.get((topic, part.number))
        end = self.highwater(topic, part.number) if self.highwater is not None else None
        ends = [e for e in (asked[0] if asked is not None else None, end) if e is not None]
        return position >= 0 and bool(ends) and max(ends) > position

    async def _refresh_ends(self, now: float) -> None:
        """Ask the broker where the event topics end, for the partitions whose earliest held message has waited
        half the hold (so the answer is there when the hold runs out)."""
        half = self.reorder_hold_s / 2
        wanted = sorted({(topic, number) for number, part in self.partitions.items()
                         if any(q and now - q[0][1] >= half for q in part.held.values())
                         for topic in self.topics.events})
        if not wanted:
            return
        asked = time.monotonic()  # the answer is true at least from when it was asked
        try:
            ends = await self.io.end_offsets(wanted)
        except EndOffsetsUnavailable as exc:
            # Asked again at the next tick; meanwhile the hold goes by what the consumer last saw.
            self.metrics.end_offset_failures.inc()
            log.debug("end offsets of the held partitions not known: %s", exc)
            return
        for tp, end in ends.items():
            self._broker_ends[tp] = (end, asked)

    async def release_due(self) -> None:
        """Process the held messages that have waited long enough (the worker's timer)."""
        if self.reorder_hold_s <= 0:
            return
        # Outside the lock: the query waits for the broker, processing need not.
        await self._refresh_ends(time.monotonic())
        async with self.lock:
            now = time.monotonic()
            for part in list(self.partitions.values()):
                await self._release(part, now)

    def _decode(self, key: bytes | None, value: bytes | None) -> Decoded:
        if not key:
            # A keyless message would spread a host over partitions and workers (each with half its state).
            return Decoded(rejects=[Reject(RejectCode.MISSING_KEY, "message has no key; agents key every "
                                           "message by host.name (the producer's key)")])
        return decode_message(value, key=key.decode("utf-8", "replace"), max_bytes=self.max_message_bytes)

    async def _process(self, part: PartitionState, topic: str, offset: int, key: bytes | None,
                       value: bytes | None, ack: Callable[[], Any], decoded: Decoded) -> None:
        partition = part.number
        started = time.perf_counter()
        counters = self._topic_counters.get(topic)
        if counters is None:  # label lookups cost as much as the increments: once per topic
            counters = self._topic_counters[topic] = (self.metrics.messages.labels(topic),
                                                      self.metrics.events.labels(topic))
        counters[0].inc()
        self.stats["messages"] += 1
        for reject in decoded.rejects:
            await self._dead_letter_reject(reject, topic, partition, offset, key, value)
        if key and value and decoded.events:
            # Recorded when processed, not when received: a snapshot then covers exactly the digests it holds.
            sender = key.decode("utf-8", "replace")
            digest = hashlib.blake2b(value, digest_size=16).digest()
            recent = part.recent.get(sender)
            if recent is None:
                recent = part.recent[sender] = deque(maxlen=RECENT_MESSAGES)
            if digest in recent:
                # Offsets and acks go on as for any message; its events do not reach the engine twice.
                self.metrics.resent_messages.labels(topic).inc()
                self.stats["resent"] += 1
                decoded = Decoded()
            else:
                recent.append(digest)
        engine = self.engine
        last_ts = None
        hosts: list[str] = []
        covered = part.covered
        for event in decoded.events:
            host = event["host"]["name"]
            upto = covered.get(host)
            if upto is not None and offset < upto.get(topic, 0):
                # Already in this host's restored snapshot: replaying it would count it twice.
                self.stats["skipped"] += 1
                continue
            if not hosts or hosts[-1] != host:
                hosts.append(host)
            alerts = engine.process(event)
            if engine.failures:
                for failure in engine.drain_failures():
                    await self._dead_letter_failure(failure, topic, partition, offset, key)
            if engine.clock_rejects:
                for late in engine.drain_clock_rejects():
                    await self.dead_letter(RejectCode.CLOCK_SKEW.value, late.reason, topic=topic,
                                           partition=partition, offset=offset, key=key,
                                           original=orjson.dumps(late.event).decode())
            for alert in alerts:
                await self._publish(alert)
            last_ts = event["@timestamp"]
        if decoded.events:
            counters[1].inc(len(decoded.events))
            self.stats["events"] += len(decoded.events)
        part.offsets[topic] = offset + 1
        unique = tuple(dict.fromkeys(hosts))
        part.pending.append((unique, topic, offset, ack))
        part.dirty = True
        now = time.monotonic()
        for host in unique:
            part.changed.add(host)
            if now - part.snapshot_at.get(host, -1e18) >= self.checkpoint_interval_s and self._may_snapshot(now):
                self._snapshot(part, host, now)
        if last_ts is not None:
            self.metrics.event_delay.observe(max(0.0, time.time() - parse_timestamp(last_ts)))
        self.metrics.processing.observe(time.perf_counter() - started)
        if now - part.last_checkpoint >= self.checkpoint_interval_s:
            await self._checkpoint(part)

    def _may_snapshot(self, now: float) -> bool:
        # Credit accrues at snapshot_cpu_share of wall time, capped at one checkpoint interval's worth.
        cap = self.snapshot_cpu_share * self.checkpoint_interval_s
        self._snapshot_credit = min(cap, self._snapshot_credit + (now - self._credit_at) * self.snapshot_cpu_share)
        self._credit_at = now
        return self._snapshot_credit > 0

    def _snapshot(self, part: PartitionState, host: str, now: float) -> None:
        started = time.perf_counter()
        part.blobs[host] = zlib.compress(self.engine.snapshot_host(host), 1)
        part.covered[host] = dict(part.offsets)
        part.snapshot_at[host] = now
        part.changed.discard(host)
        part.recent_snap[host] = tuple(part.recent.get(host, ()))
        # The marks of the last checkpoint were read before this snapshot: a safe (early) bound for it.
        part.snap_marks[host] = dict(part.last_marks or {})
        self._snapshot_credit -= time.perf_counter() - started

    async def _publish(self, alert: dict[str, Any]) -> None:
        alert_id = alert["event"]["id"]
        if self._published_ids or self._published_signatures:
            signature = alert_signature(alert)
            if alert_id in self._published_ids or signature in self._published_signatures:
                self.stats["duplicates"] += 1
                self.metrics.duplicates.inc()
                return
        a = alert["gpusentry"]["alert"]
        at = parse_timestamp(alert["@timestamp"])
        suppression = self.suppressions.matching(alert, at)
        rules = a.get("rules") or [alert["rule"]["id"]]
        if suppression is not None:
            self.stats["suppressed"] += 1
            for rule in rules:
                self.metrics.suppressed.labels(rule).inc()
            log.info("incident update %s withheld by suppression %s", a["dedup_key"], suppression.scope)
            return
        alert["event"]["created"] = format_timestamp(time.time())  # ECS: when the pipeline published it
        self._inflight.append(await self.io.send(self.topics.alerts, orjson.dumps(alert),
                                                 key=a["dedup_key"].encode()))
        self.stats["alerts"] += 1
        self.metrics.alerts.labels(a["severity"], a["status"]).inc()
        for rule in rules:
            self.metrics.alert_rules.labels(rule, a["status"]).inc()
        if self.on_alert is not None:
            self.on_alert(alert)

    # ------------------------------------------------------------------ dead letters

    async def _dead_letter_reject(self, reject: Reject, topic: str, partition: int, offset: int,
                                  key: bytes | None, value: bytes | None) -> None:
        original = None
        if value is not None and len(value) <= MAX_ORIGINAL_BYTES:
            original = value.decode("utf-8", "replace")
        await self.dead_letter(reject.code.value, reject.reason, topic=topic, partition=partition, offset=offset,
                               key=key, original=original, size=len(value) if value is not None else 0,
                               index=reject.index)

    async def _dead_letter_failure(self, failure: DetectorFailure, topic: str, partition: int, offset: int,
                                   key: bytes | None) -> None:
        self.metrics.detector_failures.labels(failure.rule_id).inc()
        await self.dead_letter(DeadLetterReason.DETECTOR_FAILED, f"detector {failure.rule_id} raised "
                               f"{failure.error}", topic=topic, partition=partition, offset=offset, key=key,
                               original=orjson.dumps(failure.event).decode(), rule_id=failure.rule_id)

    async def dead_letter(self, reason: str, message: str, *, topic: str, partition: int, offset: int,
                          key: bytes | None, original: str | None = None, size: int | None = None,
                          index: int | None = None, rule_id: str | None = None) -> None:
        """Send one dead letter: ECS ``event.reason``/``error.*`` plus where the input sat."""
        now = format_timestamp(time.time())
        where: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset, "worker": self.worker_id}
        if index is not None:
            where["index"] = index
        if size is not None:
            where["size_bytes"] = size
        if key is not None:
            where["key_b64"] = base64.b64encode(key).decode()
        doc: dict[str, Any] = {
            "@timestamp": now,
            "event": {"kind": "event", "dataset": "gpusentry.deadletter", "reason": reason, "created": now},
            "error": {"code": reason, "message": message},
            "gpusentry": {"deadletter": where},
        }
        if rule_id:
            doc["rule"] = {"id": rule_id}
        if original is not None:
            doc["event"]["original"] = original
        headers = [("reason", reason.encode()), ("topic", topic.encode()), ("partition", str(partition).encode()),
                   ("offset", str(offset).encode())]
        self._inflight.append(await self.io.send(self.topics.deadletter, orjson.dumps(doc), key=key,
                                                 headers=headers))
        self.stats["deadletters"] += 1
        self.metrics.deadletters.labels(reason).inc()
        log.warning("dead letter (%s) from %s[%d]@%d: %s", reason, topic, partition, offset, message[:300])

    # ------------------------------------------------------------------ checkpoints

    async def _await_inflight(self) -> None:
        inflight, self._inflight = self._inflight, []
        if inflight:
            await asyncio.gather(*inflight)

    async def _checkpoint(self, part: PartitionState, *, complete: bool = False) -> None:
        """Write partition ``part``'s snapshots; ``complete`` first re-snapshots every changed host."""
        # 1. everything sent so far is on the broker; 2. the snapshots and what they cover; 3. the acks.
        started = time.perf_counter()
        await self._await_inflight()
        now = time.monotonic()
        fresh = []
        for host in sorted(part.changed, key=lambda h: part.snapshot_at.get(h, -1e18)):
            # Busy hosts are snapshotted after their own messages; these went quiet since (oldest first).
            if complete or (now - part.snapshot_at.get(host, -1e18) >= self.checkpoint_interval_s
                            and self._may_snapshot(now)):
                self._snapshot(part, host, now)
                fresh.append(host)
        marks = await self.io.alert_end_offsets()
        for host in fresh:  # nothing was published since these snapshots (the lock is held): exact marks
            part.snap_marks[host] = dict(marks)
        part.last_marks = dict(marks)
        record = {"format": CHECKPOINT_FORMAT, "partition": part.number, "offsets": part.offsets,
                  "hosts": part.blobs, "covered": part.covered, "alert_marks": self._replay_marks(part, marks),
                  "host_marks": {h: part.snap_marks[h] for h in part.changed if h in part.snap_marks},
                  "recent": {h: part.recent_snap[h] for h in part.blobs if h in part.recent_snap},
                  "written_at": time.time(), "worker": self.worker_id}
        blob = pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
        if len(blob) > self.checkpoint_max_bytes:
            # Not written and nothing acknowledged: the worker goes on, but a successor would replay more.
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint of partition %d is %d bytes, over worker.checkpoint_max_bytes=%d (%d hosts): "
                      "add partitions to the event topics (fewer hosts each) or raise the limit together with "
                      "the brokers' message.max.bytes", part.number, len(blob), self.checkpoint_max_bytes,
                      len(part.blobs))
            part.last_checkpoint = time.monotonic()
            return
        part.written_at_offset = await self.io.write_checkpoint(part.number, blob)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        waiting = []
        for item in part.pending:
            hosts, topic, offset, ack = item
            if all(offset < part.covered.get(h, {}).get(topic, 0) for h in hosts):
                ack()
            else:
                waiting.append(item)
        part.pending = waiting
        part.dirty = False
        part.last_checkpoint = time.monotonic()

    @staticmethod
    def _replay_marks(part: PartitionState, marks: dict[int, int]) -> dict[int, int]:
        """Where a successor must start reading the alerts topic to know every update it could regenerate: the
        hosts with events after their snapshot are replayed from it, so their updates since that snapshot may
        already be on the topic, before the marks of this checkpoint."""
        floor = dict(marks)
        for host in part.changed:
            bound = part.snap_marks.get(host)
            if bound is None:
                continue
            for p, end in floor.items():
                floor[p] = min(end, bound.get(p, 0))
        return floor

    async def checkpoint_due(self, *, force: bool = False) -> int:
        """Checkpoint every partition with unsaved work whose interval has passed (all, when ``force``)."""
        written = 0
        async with self.lock:
            now = time.monotonic()
            for part in list(self.partitions.values()):
                if force and part.held:
                    await self._release(part, now, force=True)  # shutting down: process what is held first
                if (part.dirty or part.pending) and (
                        force or now - part.last_checkpoint >= self.checkpoint_interval_s):
                    await self._checkpoint(part, complete=force)
                    written += 1
        return written

    async def _restore(self, number: int) -> PartitionState:
        """Load partition ``number``'s checkpoint before its first message is processed."""
        blob = await self.io.read_checkpoint(number)
        part = PartitionState(number)
        marks: dict[int, int] | None = None
        if blob is not None:
            record = pickle.loads(blob)  # noqa: S301 - written by a worker of this app, to its own topic
            if record.get("format") != CHECKPOINT_FORMAT:
                raise RuntimeError(f"checkpoint of partition {number} has format {record.get('format')}; "
                                   f"this worker reads format {CHECKPOINT_FORMAT}: delete the checkpoint topic "
                                   "to start from scratch")
            now = time.monotonic()
            for host, host_blob in record["hosts"].items():
                self.engine.restore_host(host, zlib.decompress(host_blob))
                part.blobs[host] = host_blob
                part.covered[host] = dict(record["covered"][host])
                part.snapshot_at[host] = now
            part.offsets = dict(record["offsets"])
            for host, digests in (record.get("recent") or {}).items():  # absent in checkpoints of older workers
                part.recent_snap[host] = tuple(digests)
                part.recent[host] = deque(digests, maxlen=RECENT_MESSAGES)
            marks = record["alert_marks"]
            part.last_marks = dict(marks)
            host_marks = record.get("host_marks") or {}
            for host in part.blobs:  # a restored snapshot is as old as the marks it was written with
                part.snap_marks[host] = dict(host_marks.get(host, marks))
            self.metrics.restores.inc()
            log.info("restored partition %d: %d hosts, offsets %s (checkpoint by %s)", number, len(part.blobs),
                     part.offsets, record.get("worker"))
        if marks is not None:
            await self._load_published(marks)
        self.partitions[number] = part
        if self.reorder_hold_s > 0:
            # Until each event topic has delivered (or stayed silent for reorder_hold_s), none runs ahead: the
            # first fetch of a backlog may bring one topic's messages before another's.
            part.last_seen = dict.fromkeys(self.topics.events, time.monotonic())
        # A first, empty checkpoint records where the alerts topic stood, so that even a worker killed
        # before its first regular checkpoint is succeeded without doubled alerts.
        if blob is None:
            part.dirty = True
            await self._checkpoint(part)
        else:
            part.last_checkpoint = time.monotonic()
        return part

    async def _load_published(self, marks: dict[int, int]) -> None:
        for value in await self.io.read_alerts_since(marks):
            try:
                alert = orjson.loads(value)
                self._published_ids.add(alert["event"]["id"])
                self._published_signatures.add(alert_signature(alert))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("unreadable record on the alerts topic ignored for deduplication: %s", exc)

    # ------------------------------------------------------------------ rebalance

    async def assign(self, numbers: Iterable[int]) -> None:
        """Take the newly assigned partitions: one this worker held until the rebalance and whose latest checkpoint
        is still its own is kept as it is in memory; any other is restored now, so its first message meets its
        state.  Held partitions that went elsewhere are forgotten."""
        wanted = set(numbers)
        kept: list[int] = []
        restored: list[int] = []
        async with self.lock:
            for n in sorted(wanted):
                if n not in self.partitions:
                    _, was_kept = await self._claim(n)
                    (kept if was_kept else restored).append(n)
            for n in sorted(set(self._parked) - wanted):
                self._forget(self._parked.pop(n))
            self._clear_published_if_idle()
        if self._revoked_at is not None:
            log.info("rebalance: partitions %s kept, %s restored; this worker's detection paused %.2f s", kept,
                     restored, time.monotonic() - self._revoked_at)
            self._revoked_at = None

    async def _claim(self, number: int) -> tuple[PartitionState, bool]:
        """Partition ``number``'s state: the parked one if it is still ours (True), else restored from its checkpoint."""
        parked = self._parked.pop(number, None)
        if parked is not None and await self._still_ours(parked):
            self._keep(parked)
            return parked, True
        if parked is not None:
            self._forget(parked)
        return await self._restore(number), False

    async def _still_ours(self, part: PartitionState) -> bool:
        # Eager rebalancing revokes every partition, also those that come straight back.  If nobody wrote a
        # checkpoint of it since ours (the end of its checkpoint partition is right after our record), nobody
        # else processed it in between (a worker that lost the group meanwhile would find someone's record).
        if part.written_at_offset is None:
            return False
        return await self.io.checkpoint_end(part.number) == part.written_at_offset + 1

    def _keep(self, part: PartitionState) -> None:
        self.partitions[part.number] = part
        self.metrics.kept.inc()
        if self.reorder_hold_s > 0:
            part.last_seen = dict.fromkeys(self.topics.events, time.monotonic())
        log.info("kept partition %d through the rebalance: %d hosts, offsets %s (its latest checkpoint is this "
                 "worker's)", part.number, len(part.blobs), part.offsets)

    def _forget(self, part: PartitionState) -> None:
        for host in set(part.blobs) | part.changed:
            self.engine.forget_host(host)

    def _clear_published_if_idle(self) -> None:
        if not self.partitions and not self._parked:
            self._published_ids.clear()
            self._published_signatures.clear()

    async def release(self, numbers: Iterable[int], *, park: bool = False) -> None:
        """Checkpoint partitions that are revoked; with ``park`` (a rebalance, which may give them back), keep
        their state in memory until :meth:`assign` knows, else forget it."""
        if park and self.partitions:
            self._revoked_at = time.monotonic()
        async with self.lock:
            for n in sorted(set(numbers)):
                part = self.partitions.get(n)
                if part is None:
                    continue
                if part.held:  # processed here, so the checkpoint below covers them
                    await self._release(part, time.monotonic(), force=True)
                del self.partitions[n]
                if part.dirty or part.pending or part.changed:
                    await self._checkpoint(part, complete=True)
                if park:
                    self._parked[n] = part
                else:
                    self._forget(part)
            self._clear_published_if_idle()

    def lag(self, highwater: Callable[[str, int], int | None]) -> None:
        """Update the lag gauges from the consumer's high watermarks."""
        for part in self.partitions.values():
            for topic in self.topics.events:
                hw = highwater(topic, part.number)
                if hw is not None:
                    done = part.offsets.get(topic, 0)
                    self.metrics.lag.labels(topic, str(part.number)).set(max(0, hw - done))
