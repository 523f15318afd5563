"""The agent: every event-topic message to the pipeline; rebalance hooks restore and release state."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

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

    async def on_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs["revoked"]
        # Parked, not forgotten: faust's eager rebalance revokes everything, also what comes straight back.
        await pipeline.release({tp.partition for tp in revoked if tp.topic in event_topics}, park=True)

    async def on_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        assigned = args[0] if args else kwargs["assigned"]
        numbers = {tp.partition for tp in assigned if tp.topic in event_topics}
        split = sorted(n for n in numbers if {tp.topic for tp in assigned if tp.partition == n} != event_topics)
        if split:
            # A partition number's hosts must meet one engine on all four topics (faust's co-partitioning
            # assignor does this when the topics have equal partition counts).
            log.error("partitions %s of the event topics were not assigned together; check that the four "
                      "event topics have the same number of partitions", split)
        await pipeline.release(set(pipeline.partitions) - numbers)
        await pipeline.assign(numbers)

    # mode's signal stubs want a keyword-only `signal` parameter; faust passes it, these ignore it.
    app.on_partitions_revoked.connect(cast(Any, on_revoked))
    app.on_partitions_assigned.connect(cast(Any, on_assigned))
