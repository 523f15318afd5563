"""The agent: every event-topic message to the pipeline; rebalance hooks restore and release state."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.app import WorkerApp

log = logging.getLogger(__name__)


def register(wa: WorkerApp, event_topic: Any) -> None:
    app, pipeline = wa.app, wa.pipeline
    event_topics = set(pipeline.topics.events)

    # Acks are manual: a message is acknowledged (and its offset committable) only once a checkpoint
    # covers it.  concurrency=1: one engine, messages of one partition strictly in offset order.
    @app.agent(event_topic, name="gpusentry.detect", concurrency=1)
    async def detect(stream: Any) -> None:
        async for event in stream.noack().events():
            message = event.message
            await pipeline.handle(message.topic, message.partition, message.offset, message.key, message.value,
                                  event.ack)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        await pipeline.release({tp.partition for tp in revoked if tp.topic in event_topics})

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        numbers = {tp.partition for tp in assigned if tp.topic in event_topics}
        split = sorted(n for n in numbers if {tp.topic for tp in assigned if tp.partition == n} != event_topics)
        if split:
            # A partition number's hosts must meet one engine on all four topics (faust's co-partitioning
            # assignor does this when the topics have equal partition counts).
            log.error("partitions %s of the event topics were not assigned together; check that the four "
                      "event topics have the same number of partitions", split)
        await pipeline.release(set(pipeline.partitions) - numbers)
        await pipeline.assign(numbers)
