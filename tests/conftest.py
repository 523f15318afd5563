"""Shared fixtures: the brokers (Apache Kafka, the embedded Tansu) and small helpers around them."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

from gpusentry.apache_kafka import KafkaCluster, KafkaUnavailable
from gpusentry.broker import BrokerUnavailable, EmbeddedBroker, create_topics

_topic_counter = itertools.count()


BROKERS = ("kafka", "tansu")


def selected_broker() -> str:
    """TEST_BROKER=kafka (default: Apache Kafka, resolved with Maven) or tansu (the embedded broker of `make run`).

    Not a GPUSENTRY_ variable: those are configuration, and the CLI subprocesses of the tests would refuse it."""
    which = os.environ.get("TEST_BROKER", "kafka")
    if which not in BROKERS:
        raise pytest.UsageError(f"TEST_BROKER={which!r}: use one of {', '.join(BROKERS)}")
    return which


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by the broker it talks to: ``kafka`` (Apache Kafka, the default broker of the broker-facing
    suites), ``tansu`` (the embedded broker's smoke set), and ``broker`` for either, so ``-m`` selects them."""
    which = selected_broker()
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"broker", "bootstrap", "topic_factory", "proxied"}:  # proxied: tests/agent_helpers.py
            item.add_marker(pytest.mark.broker)
            item.add_marker(pytest.mark.kafka if which == "kafka" else pytest.mark.tansu)
        if "embedded_broker" in fixtures:
            item.add_marker(pytest.mark.broker)
            item.add_marker(pytest.mark.tansu)


@pytest.fixture(scope="session")
def broker() -> Iterator[Any]:
    """The broker of the broker-facing suites, for the whole session: Apache Kafka unless TEST_BROKER=tansu.

    Set TEST_BOOTSTRAP=host:port to run them against an existing cluster instead.  Without Java or Maven the
    Apache Kafka suites skip, saying what to install."""
    external = os.environ.get("TEST_BOOTSTRAP")
    if external:
        host, _, port = external.rpartition(":")
        yield EmbeddedBroker(host=host, port=int(port))
        return
    if selected_broker() == "tansu":
        yield from _tansu()
        return
    try:
        cluster = KafkaCluster(nodes=1, progress=lambda line: print(line, file=sys.stderr, flush=True)).start()
    except KafkaUnavailable as exc:
        kafka_missing(exc)
    try:
        yield cluster
    finally:
        cluster.stop()


def kafka_missing(exc: KafkaUnavailable) -> NoReturn:
    """Skip a test that needs Apache Kafka where it cannot be had, with the reason; fail instead under
    TEST_REQUIRE_KAFKA=1 (CI sets it: there a missing Kafka is a broken set-up, not a reason to test less)."""
    if os.environ.get("TEST_REQUIRE_KAFKA") == "1":
        pytest.fail(f"Apache Kafka is required here (TEST_REQUIRE_KAFKA=1) and unavailable: {exc}")
    pytest.skip(f"Apache Kafka unavailable: {exc}")


@pytest.fixture
def own_kafka(tmp_path):
    """Start Apache Kafka clusters of this test's own (it may kill their nodes): ``own_kafka(nodes=3, ...)`` takes
    :class:`KafkaCluster`'s arguments; all are stopped when the test ends."""
    started: list[KafkaCluster] = []

    def start(nodes: int = 1, **kwargs: Any) -> KafkaCluster:
        try:
            cluster = KafkaCluster(nodes=nodes, workdir=tmp_path / f"kafka-{len(started)}", **kwargs).start()
        except KafkaUnavailable as exc:
            kafka_missing(exc)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The embedded Tansu broker that `make run` starts (memory storage), for the smoke set that keeps it working."""
    yield from _tansu()


def _tansu() -> Iterator[EmbeddedBroker]:
    try:
        b = EmbeddedBroker().start()
    except BrokerUnavailable as exc:
        pytest.fail(f"the test broker did not start: {exc}")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def bootstrap(broker: Any) -> str:
    return broker.bootstrap_servers


@pytest.fixture
def topic_factory(bootstrap: str):
    """Create uniquely named topics so tests never see each other's messages."""

    def make(stem: str = "t", partitions: int = 1) -> str:
        name = f"test.{stem}.{os.getpid()}.{next(_topic_counter)}.{int(time.time() * 1000) % 100000}"
        create_topics(bootstrap, [name], partitions=partitions)
        return name

    return make
