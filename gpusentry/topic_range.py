"""Read one topic between two record times (Kafka timestamps), every partition, to its current end."""

from __future__ import annotations

import time
from collections.abc import Iterator

from gpusentry.config import Config


class TopicReadError(RuntimeError):
    """The topic cannot be read; the message names the address and the fix."""


def read_range(cfg: Config, topic: str, since: float | None = None, until: float | None = None, *,
               timeout_s: float = 30.0) -> Iterator[tuple[int, int, float, bytes | None]]:
    """(partition, offset, record time in seconds, value) from the offsets of ``since`` (all when None) to
    the end each partition had when the read began, stopping a partition at ``until``; in offset order per
    partition."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    if not cfg.kafka.bootstrap_servers:
        raise TopicReadError("kafka.bootstrap_servers is empty; set it (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS=host:9092)")
    consumer = Consumer({**cfg.kafka.confluent_config(), "group.id": f"gpusentry-read-{topic}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest", "log.connection.close": False})
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise TopicReadError(f"topic {topic} not found at {cfg.kafka.bootstrap_servers}; create the topics "
                                 "first (`gpusentry worker --create-topics`)")
        parts = sorted(meta.partitions)
        start_ms = int(since * 1000) if since is not None else 0
        starts = consumer.offsets_for_times([TopicPartition(topic, p, start_ms) for p in parts], timeout=timeout_s)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1] for p in parts}
        assigned = {tp.partition: tp.offset for tp in starts if tp.offset >= 0}
        consumer.assign([TopicPartition(topic, p, off) for p, off in assigned.items()])
        # "The end" is each partition's high watermark, but some brokers (Tansu) report it short of the last
        # records of a multi-record batch: a partition counts as done once its watermark is reached *and* a
        # poll comes back empty (as streams.kafka_io reads its checkpoints).
        reached = {p for p, off in assigned.items() if off >= ends[p]}
        stop_ms = int(until * 1000) if until is not None else None
        deadline = time.monotonic() + timeout_s
        last_record = time.monotonic()
        while assigned:
            if cfg.kafka.exact_high_watermark and len(reached) == len(assigned):
                break  # the reported ends are exact (Apache Kafka)
            if time.monotonic() > deadline:
                raise TopicReadError(f"could not read {topic} to its end in {timeout_s:.0f} s; is the broker slow?")
            msg = consumer.poll(0.25)
            if msg is None:
                if len(reached) == len(assigned) or time.monotonic() - last_record > 2.0:
                    break  # at every watermark, or nothing for 2 s although the broker reported more
                continue
            if msg.error():
                continue
            last_record = time.monotonic()
            p, off = int(msg.partition() or 0), int(msg.offset() or 0)
            _, ts_ms = msg.timestamp()
            if stop_ms is None or ts_ms < stop_ms:
                yield p, off, ts_ms / 1000.0, msg.value()
            if off + 1 >= ends.get(p, 0) or (stop_ms is not None and ts_ms >= stop_ms):
                reached.add(p)
    except KafkaException as exc:
        raise TopicReadError(f"cannot read {topic} at {cfg.kafka.bootstrap_servers}: {exc}") from None
    finally:
        consumer.close()
