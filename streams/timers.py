"""Timers: checkpoint idle partitions (so their messages get acknowledged), release messages held for event-time
order, and refresh the lag gauges."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError

if TYPE_CHECKING:
    from streams.app import WorkerApp


def register(wa: WorkerApp) -> None:
    app, pipeline = wa.app, wa.pipeline
    interval = wa.cfg.worker.checkpoint_interval_s

    @app.timer(interval, name="gpusentry.checkpoint")
    async def checkpoint() -> None:
        await pipeline.checkpoint_due()

    def consumer_highwater(topic: str, partition: int) -> int | None:
        from faust.types import TP

        try:
            return int(app.consumer.highwater(TP(topic, partition)))
        except (KeyError, TypeError, ValueError, AssertionError):
            return None  # not fetched yet

    pipeline.highwater = consumer_highwater  # a topic with nothing left to fetch holds nothing back

    def consumer_polled_at(topic: str, partition: int) -> float | None:
        """When the consumer last had a fetch response for the partition (its highwater is as of then), on the
        monotonic clock; None where it does not say. The consumer of faust's aiokafka driver keeps it."""
        try:
            consumer = app.consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
            ms = consumer.last_poll_timestamp(TopicPartition(topic, partition))
        except (AttributeError, AssertionError, KeyError, IllegalStateError):
            return None  # not assigned, not fetched yet, or another driver
        if ms is None:
            return None
        return time.monotonic() - (time.time() - ms / 1000.0)

    pipeline.polled_at = consumer_polled_at  # a view from before a message arrived proves nothing about it

    if wa.cfg.worker.reorder_hold_s > 0:
        @app.timer(max(0.1, wa.cfg.worker.reorder_hold_s / 4), name="gpusentry.reorder")
        async def reorder() -> None:
            await pipeline.release_due()  # messages held for event-time order, once they have waited enough

    @app.timer(5.0, name="gpusentry.lag")
    async def lag() -> None:
        consumer: Any = app.consumer

        def highwater(topic: str, partition: int) -> int | None:
            from faust.types import TP

            try:
                return int(consumer.highwater(TP(topic, partition)))
            except (KeyError, TypeError, ValueError, AssertionError):
                return None  # not fetched yet

        pipeline.lag(highwater)
