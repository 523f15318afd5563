"""The worker consumer's delivery fast path: a message skips faust's per-message ``wait_first`` only when
its delivery cannot wait; during a rebalance (flow suspended) or with a full buffer faust's own path runs."""

from __future__ import annotations

import asyncio

from gpusentry.config import load_config
from streams.app import build_app


def test_direct_delivery_only_when_nothing_can_make_it_wait():
    cfg = load_config(None, environ={"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "k1:9092"})

    async def check() -> None:
        app = build_app(cfg).app
        consumer = app.consumer
        assert not consumer.delivery_cannot_block(), "flow control starts suspended until the first assignment"
        app.flow_control.resume()
        assert consumer.delivery_cannot_block()

        channel = app.topic("t", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        app.topics.add(channel)
        for i in range(channel.queue.maxsize):
            channel.queue.put_nowait(i)
        assert not consumer.delivery_cannot_block(), "a full stream buffer makes the delivery wait"
        channel.queue.get_nowait()
        assert consumer.delivery_cannot_block()

        app.flow_control.suspend()  # what faust does when partitions are revoked
        assert not consumer.delivery_cannot_block()
        app.flow_control.resume()
        consumer.suspend_flow.set()
        assert not consumer.delivery_cannot_block()
        consumer.suspend_flow.clear()

        buffer = app.producer.buffer
        for i in range(buffer.max_messages + 1):
            buffer.pending.put_nowait(i)
        assert not consumer.delivery_cannot_block(), "an over-full producer buffer makes the delivery wait"
        while not buffer.pending.empty():
            buffer.pending.get_nowait()
        assert consumer.delivery_cannot_block()

    asyncio.run(check())


def test_the_copied_message_loop_runs_only_on_the_faust_release_it_was_copied_from():
    import importlib.metadata

    from streams import app

    installed = importlib.metadata.version("faust-streaming")
    assert app._faust_loop_matches == installed.startswith(app.FAUST_LOOP_COPIED_FROM)
