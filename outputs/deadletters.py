"""``gpusentry deadletters list|redrive``: see what went to the dead-letter topic, and deliver it again.

The dead-letter topic holds two kinds of record: input the worker refused (``stage`` absent: a bad
message, a clock skew, a detector failure) and alerts an output could not take (``stage: output``, with
the output's name and the alert in ``event.original``). ``list`` shows both; ``redrive`` takes the
alerts of one output in a time range and sends them through the same dispatcher as the forwarder
(retries, rate limits, breaker), for instance once a webhook that was down has recovered. What fails
again goes back to the dead-letter topic with the new reason. Redriving the same range twice sends
its alerts twice: Slack threads and PagerDuty fold repeats by dedup key, other receivers can
deduplicate on ``event.id``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from gpusentry.config import Config
from gpusentry.contract import get
from gpusentry.topic_range import read_range
from outputs.dispatcher import DeadLetterSink, Dispatcher
from outputs.registry import build_outputs


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    time: float  # record time (when it was dead-lettered)
    record: dict[str, Any]

    @property
    def output(self) -> str | None:
        out = get(self.record, "gpusentry.deadletter.output")
        return out if isinstance(out, str) else None

    def row(self) -> dict[str, Any]:
        r = self.record
        return {"partition": self.partition, "offset": self.offset, "@timestamp": r.get("@timestamp"),
                "reason": get(r, "event.reason"), "output": self.output,
                "host": get(r, "host.name"), "dedup_key": get(r, "gpusentry.deadletter.dedup_key"),
                "topic": get(r, "gpusentry.deadletter.topic"), "attempts": get(r, "gpusentry.deadletter.attempts"),
                "message": str(get(r, "error.message") or "")[:300]}


def read_dead_letters(cfg: Config, since: float | None, until: float | None) -> tuple[list[DeadLetter], int]:
    """The dead letters of the range, and how many records were not readable JSON objects."""
    out, bad = [], 0
    for p, off, ts, value in read_range(cfg, cfg.topics.deadletter, since, until):
        try:
            doc = orjson.loads(value) if value else None
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            out.append(DeadLetter(p, off, ts, doc))
        else:
            bad += 1
    return out, bad


@dataclass
class Redrive:
    selected: int = 0
    delivered: int = 0
    failed: int = 0
    unreadable: list[str] = field(default_factory=list)  # "partition@offset: why"


def alerts_of(letters: list[DeadLetter], output: str) -> tuple[list[dict[str, Any]], list[str]]:
    alerts, unreadable = [], []
    for dl in letters:
        if dl.output != output:
            continue
        original = get(dl.record, "event.original")
        try:
            alert = orjson.loads(original) if isinstance(original, str) else None
        except orjson.JSONDecodeError:
            alert = None
        if isinstance(alert, dict) and get(alert, "event.dataset") == "gpusentry.alert":
            alerts.append(alert)
        else:
            unreadable.append(f"{dl.partition}@{dl.offset}: event.original is not an alert")
    return alerts, unreadable


async def redrive_async(cfg: Config, alerts: list[dict[str, Any]], output: str,
                        dead_letters: DeadLetterSink) -> Redrive:
    result = Redrive(selected=len(alerts))
    outputs = build_outputs(cfg, only=[output])
    dispatcher = await Dispatcher(outputs, dead_letters, seed=cfg.outputs.seed).start()
    try:
        tickets = [await dispatcher.submit(a) for a in alerts]
        for outcomes in await asyncio.gather(*tickets):
            for o in outcomes:
                if o.delivered:
                    result.delivered += 1
                else:
                    result.failed += 1
    finally:
        await dispatcher.close()
    return result


def redrive(cfg: Config, letters: list[DeadLetter], output: str, *, dead_letters: DeadLetterSink | None = None
            ) -> Redrive:
    """Deliver the alerts ``output`` could not take again; failures go to ``dead_letters`` (the dead-letter
    topic when None)."""
    alerts, unreadable = alerts_of(letters, output)
    if dead_letters is not None:
        result = asyncio.run(redrive_async(cfg, alerts, output, dead_letters))
    else:
        result = asyncio.run(_redrive_to_topic(cfg, alerts, output))
    result.unreadable = unreadable
    return result


async def _redrive_to_topic(cfg: Config, alerts: list[dict[str, Any]], output: str) -> Redrive:
    from outputs.kafka import KafkaDeadLetterSink, make_producer

    producer = make_producer(cfg.kafka)
    await producer.start()
    try:
        return await redrive_async(cfg, alerts, output, KafkaDeadLetterSink(producer, cfg.topics.deadletter))
    finally:
        await producer.stop()

