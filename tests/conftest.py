"""Shared fixtures: the real Kafka-protocol broker and small helpers around it."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import pytest

from gpusentry.broker import BrokerUnavailable, EmbeddedBroker, create_topics

_topic_counter = itertools.count()


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker on a free loopback port for the whole session (memory storage).

    Set GPUSENTRY_TEST_BOOTSTRAP to run the broker tests against an existing cluster instead.
    """
    external = os.environ.get("GPUSENTRY_TEST_BOOTSTRAP")
    if external:
        host, _, port = external.rpartition(":")
        yield EmbeddedBroker(host=host, port=int(port))
        return
    try:
        b = EmbeddedBroker().start()
    except BrokerUnavailable as exc:
        pytest.fail(f"the test broker did not start: {exc}")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def bootstrap(broker: EmbeddedBroker) -> str:
    return broker.bootstrap_servers


@pytest.fixture
def topic_factory(bootstrap: str):
    """Create uniquely named topics so tests never see each other's messages."""

    def make(stem: str = "t", partitions: int = 1) -> str:
        name = f"test.{stem}.{os.getpid()}.{next(_topic_counter)}.{int(time.time() * 1000) % 100000}"
        create_topics(bootstrap, [name], partitions=partitions)
        return name

    return make
