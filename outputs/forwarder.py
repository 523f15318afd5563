"""`gpusentry forward`: consume the alerts topic and deliver every alert through the dispatcher.

At least once: the consumer commits a batch's offsets only after every alert in it was delivered to
every output that wanted it, or dead-lettered with the reason.  A message that is not a valid alert
is dead-lettered too (stage ``forwarder``) and never stops the stream.  A crash before the commit
means those alerts are delivered again after the restart (PagerDuty and Slack threads dedupe by key;
HEC and Kafka consumers by ``event.id``).

For other processes (``gpusentry up``): :func:`run_forwarder` runs it in the calling thread until a
``threading.Event`` is set; :func:`forward` is the same as a coroutine with an ``asyncio.Event``.
:func:`deliver_alerts` sends a finite list of alerts (``gpusentry replay``) through the same outputs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from gpusentry.broker import CLIENT_TUNING, BrokerUnavailable, create_topics, refuse_auto_create
from gpusentry.config import Config
from gpusentry.contract import Dataset, decode_message
from gpusentry.timefmt import format_timestamp
from outputs.base import Clock
from outputs.dispatcher import DeadLetterSink, Dispatcher, MemoryDeadLetterSink, Outcome
from outputs.kafka import KafkaDeadLetterSink, KafkaThreadJournal, make_producer, read_thread_journal
from outputs.registry import build_outputs
from outputs.slack import SlackOutput

log = logging.getLogger(__name__)


class ForwarderError(RuntimeError):
    """The forwarder cannot run (nothing to deliver to, no brokers)."""


class BrokerUnreachable(ForwarderError):
    """Kafka did not answer at start; nothing was consumed (exit 1: a service manager restarts it)."""


@dataclass
class ForwardSummary:
    messages: int = 0
    alerts: int = 0
    rejected: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "<output>:delivered" / "<output>:dead_lettered"
    stopped_by: str | None = None  # the signal that ended `gpusentry forward` (SIGINT, SIGTERM)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "nothing routed"
        return (f"forward: {self.messages} messages, {self.alerts} alerts, {self.rejected} rejected; "
                f"{parts}")


def reject_record(value: bytes | None, reason: str, code: str, now: float, where: dict[str, Any]) -> dict[str, Any]:
    """A message on the alerts topic that is not a valid alert (same shape as the worker's dead letters)."""
    ts = format_timestamp(now)
    return {
        "@timestamp": ts,
        "event": {"kind": "event", "dataset": "gpusentry.deadletter", "reason": code, "created": ts,
                  "original": (value or b"")[:65536].decode("utf-8", "replace")},
        "error": {"code": code, "message": reason},
        "gpusentry": {"deadletter": {"stage": "forwarder", **where}},
    }


async def forward(cfg: Config, stop: asyncio.Event, *, clock: Clock | None = None,
                  dead_letters: DeadLetterSink | None = None) -> ForwardSummary:
    """Run until ``stop`` is set; return what was done."""
    refuse_auto_create()  # reading a missing alerts topic must not create it
    clock = clock or Clock()
    outputs = build_outputs(cfg, clock=clock)
    if not outputs:
        raise ForwarderError("no output is enabled: set outputs.<name>.enabled = true (kafka, syslog, hec, slack, "
                             "pagerduty, webhook); see docs/config.md")
    if not cfg.kafka.bootstrap_servers:
        raise ForwarderError("kafka.bootstrap_servers is empty: set it (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS)")
    producer = make_producer(cfg.kafka)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise BrokerUnreachable(f"cannot reach Kafka at {cfg.kafka.bootstrap_servers} ({exc}); check "
                                "kafka.bootstrap_servers and that the brokers run. Nothing was consumed") from None
    for output in outputs:
        if isinstance(output, SlackOutput) and output.settings.mode == "bot":
            await _keep_slack_threads(cfg, output, producer)
    sink = dead_letters or KafkaDeadLetterSink(producer, cfg.topics.deadletter)
    dispatcher = await Dispatcher(outputs, sink, clock=clock, seed=cfg.outputs.seed).start()
    consumer = AIOKafkaConsumer(
        cfg.topics.alerts, bootstrap_servers=cfg.kafka.bootstrap_servers, client_id=f"{cfg.kafka.client_id}-forward",
        group_id=cfg.outputs.group_id, enable_auto_commit=False, auto_offset_reset=cfg.outputs.start_from,
        **CLIENT_TUNING, **cfg.kafka.aiokafka_config())
    summary = ForwardSummary()
    try:
        await consumer.start()
        log.info("forwarding %s to %s", cfg.topics.alerts, ", ".join(o.name for o in outputs))
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            if not batches:
                continue
            tickets: list[asyncio.Future[list[Outcome]]] = []
            for records in batches.values():
                for record in records:
                    summary.messages += 1
                    where = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
                    tickets.extend(await _submit(record.value, where, cfg, dispatcher, sink, clock, summary))
            for outcomes in await _deliveries(consumer, tickets):
                for o in outcomes:
                    summary.outcomes[f"{o.output}:{'delivered' if o.delivered else 'dead_lettered'}"] += 1
            await consumer.commit()
    finally:
        try:
            await dispatcher.close()
        finally:
            await consumer.stop()
            await producer.stop()
    log.info(summary.describe())
    return summary


def slack_threads_topic(cfg: Config) -> str:
    """The compacted topic on which forwarders of ``outputs.group_id`` record Slack threads."""
    return f"{cfg.outputs.group_id}-slack-threads"


async def _keep_slack_threads(cfg: Config, output: SlackOutput, producer: Any) -> None:
    """Bring back the Slack threads earlier forwarders of this group recorded, and record new ones."""
    topic = slack_threads_topic(cfg)
    client = {k: v for k, v in cfg.kafka.confluent_config().items() if k != "bootstrap.servers"}
    try:
        await asyncio.to_thread(create_topics, cfg.kafka.bootstrap_servers, [topic], client_config=client,
                                topic_config={"cleanup.policy": "compact"}, replication_factor=-1)
        output.threads.load(await read_thread_journal(cfg.kafka, topic))
    except (BrokerUnavailable, KafkaError) as exc:
        # Delivery works without it; only threading across restarts is lost, so say how to get it back.
        log.warning("Slack threads are kept in memory only: topic %s cannot be created or read (%s). Create it "
                    "(cleanup.policy=compact) or allow this client to, and restart the forwarder", topic, exc)
        return
    output.threads.journal = KafkaThreadJournal(producer, topic)
    log.info("Slack threads: %d open incident(s) found on %s", len(output.threads), topic)


# While a batch is being delivered, the consumer polls this often (with its partitions paused).
POLL_WHILE_DELIVERING_S = 1.0


async def _deliveries(consumer: AIOKafkaConsumer,
                      tickets: list[asyncio.Future[list[Outcome]]]) -> list[list[Outcome]]:
    """Wait for a batch's deliveries, polling the consumer meanwhile with every partition paused.

    An output that is down can hold a batch for many minutes (retries, a Retry-After of up to
    ``max_retry_after_s``, rate limits); a consumer that does not poll for ``max.poll.interval``
    leaves its group, its partitions move and the batch is forwarded twice.  Paused, a poll fetches
    nothing and only tells the group this forwarder is alive.
    """
    pending = asyncio.ensure_future(asyncio.gather(*tickets))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=POLL_WHILE_DELIVERING_S)
            if done:
                return pending.result()
            assigned = consumer.assignment()  # may have changed: a rebalance during the wait
            consumer.pause(*assigned)
            for tp, records in (await consumer.getmany(timeout_ms=0)).items():
                consumer.seek(tp, records[0].offset)  # not expected while paused; never skip a record
    finally:
        consumer.resume(*consumer.assignment())


async def _submit(value: bytes | None, where: dict[str, Any], cfg: Config, dispatcher: Dispatcher, sink: DeadLetterSink, clock: Clock,
                  summary: ForwardSummary) -> list[asyncio.Future[list[Outcome]]]:
    decoded = decode_message(value, max_bytes=cfg.contract.max_message_bytes)
    tickets = []
    for reject in decoded.rejects:
        summary.rejected += 1
        await sink.send(reject_record(value, str(reject), reject.code.value, clock.time(), where), "")
    for event in decoded.events:
        if event["event"]["dataset"] != Dataset.ALERT.value:
            summary.rejected += 1
            await sink.send(reject_record(value, f"event.dataset {event['event']['dataset']!r} on the alerts "
                                          "topic; only gpusentry.alert incidents are forwarded", "bad_value",
                                          clock.time(), where), "")
            continue
        summary.alerts += 1
        tickets.append(await dispatcher.submit(event))
    return tickets


async def deliver_alerts_async(cfg: Config, alerts: Iterable[dict[str, Any]], dead_letters: DeadLetterSink,
                               *, clock: Clock | None = None) -> ForwardSummary:
    """Deliver a finite sequence of alerts (e.g. from `gpusentry replay`) through the enabled outputs."""
    outputs = build_outputs(cfg, clock=clock)
    summary = ForwardSummary()
    if not outputs:
        return summary
    dispatcher = await Dispatcher(outputs, dead_letters, clock=clock, seed=cfg.outputs.seed).start()
    try:
        tickets = []
        for alert in alerts:
            summary.alerts += 1
            tickets.append(await dispatcher.submit(alert))
        for outcomes in await asyncio.gather(*tickets):
            for o in outcomes:
                summary.outcomes[f"{o.output}:{'delivered' if o.delivered else 'dead_lettered'}"] += 1
    finally:
        await dispatcher.close()
    return summary


def deliver_alerts(cfg: Config, alerts: Iterable[dict[str, Any]],
                   dead_letters: DeadLetterSink | None = None) -> tuple[ForwardSummary, list[dict[str, Any]]]:
    """Blocking form of :func:`deliver_alerts_async`; returns the summary and the dead letters it kept
    (when no ``dead_letters`` sink is given they are kept in memory for the caller to report or write)."""
    sink = dead_letters or MemoryDeadLetterSink()
    summary = asyncio.run(deliver_alerts_async(cfg, alerts, sink))
    return summary, sink.records if isinstance(sink, MemoryDeadLetterSink) else []


def run_forwarder(cfg: Config, stop_event: threading.Event | None = None) -> ForwardSummary:
    """Blocking: forward until ``stop_event`` is set (or forever).  For `gpusentry up` and scripts."""

    async def main() -> ForwardSummary:
        stop = asyncio.Event()

        async def watch() -> None:
            while stop_event is not None and not stop_event.is_set():
                await asyncio.sleep(0.2)
            if stop_event is not None:
                stop.set()

        watcher = asyncio.create_task(watch())
        try:
            return await forward(cfg, stop)
        finally:
            watcher.cancel()

    return asyncio.run(main())
