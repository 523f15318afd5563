"""The worker's delivery core without a broker: ordering of sends, checkpoints and acks; restore and dedup;
dead letters for bad input and failing detectors; suppressions.  (The broker versions of these are in
test_streams_worker.py and test_streams_recovery.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import orjson
import pytest

from detectors.base import Detector, Signal
from detectors.engine import Engine, discover
from gpusentry import contract as c
from gpusentry.contract import Dataset
from streams.feedback import FeedbackError, Suppressions, Verifier, feedback_message, parse_feedback
from streams.pipeline import Pipeline, Topics
from tests.streams_helpers import T0, benign_start, miner_start

TOPICS = Topics(events=("gpu", "process", "network", "dns"), alerts="alerts", deadletter="dead", feedback="fb")


class FakeIO:
    """Records what the pipeline sends, in order; sends complete only when ``settle`` is called."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.topics: dict[str, list[bytes]] = {"alerts": [], "dead": []}
        self.checkpoints: dict[int, list[bytes]] = {}
        self.pending: list[asyncio.Future[None]] = []

    async def send(self, topic, value, key=None, partition=None, headers=None):
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.topics.setdefault(topic, []).append(value)
        self.log.append(("send", topic))

        def done(_: Any) -> None:
            self.log.append(("acked", topic))

        fut.add_done_callback(done)
        self.pending.append(fut)
        asyncio.get_running_loop().call_later(0.01, lambda: fut.done() or fut.set_result(None))
        return fut

    async def flush(self) -> None:
        await asyncio.gather(*self.pending)

    async def write_checkpoint(self, partition, blob):
        self.log.append(("checkpoint", partition))
        self.checkpoints.setdefault(partition, []).append(blob)
        return len(self.checkpoints[partition]) - 1

    async def checkpoint_end(self, partition):
        return len(self.checkpoints.get(partition, []))

    async def read_checkpoint(self, partition):
        return (self.checkpoints.get(partition) or [None])[-1]

    async def alert_end_offsets(self):
        return {0: len(self.topics["alerts"])}

    # Where the event topics end on the "broker": set by a test that feeds the pipeline its messages.
    event_ends: dict[tuple[str, int], int] | None = None
    end_queries = 0

    async def end_offsets(self, partitions):
        from streams.pipeline import EndOffsetsUnavailable

        self.end_queries += 1
        if self.event_ends is None:
            raise EndOffsetsUnavailable("the fake broker does not answer")
        return {tp: self.event_ends[tp] for tp in partitions if tp in self.event_ends}

    async def read_alerts_since(self, marks):
        return self.topics["alerts"][marks.get(0, 0):]


def pipeline(io: FakeIO, *, engine: Engine | None = None, interval: float = 3600.0,
             suppressions: Suppressions | None = None) -> Pipeline:
    return Pipeline(engine or Engine(strict=False), io, TOPICS, max_message_bytes=1_048_576,
                    checkpoint_interval_s=interval, suppressions=suppressions)


def msg(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(events)


HOST = "gpu-node-9"


def stream(n: int) -> list[bytes]:
    """n process batches; a miner at 3 (open), resolved 650 s later, a second miner after that."""
    out = []
    for k in range(n):
        batch = [benign_start(HOST, T0 + 10 * k, pid=1000 + k)]
        if k in (3, 75):
            batch.append(miner_start(HOST, T0 + 10 * k + 1, pid=31_000 + k))
        out.append(msg(batch))
    return out


def run(coro):
    return asyncio.run(coro)


def test_acks_follow_the_checkpoint_which_follows_the_sends():
    async def go() -> tuple[FakeIO, list[int]]:
        io = FakeIO()
        p = pipeline(io)
        acked: list[int] = []
        for off, value in enumerate(stream(5)):
            await p.handle("process", 0, off, HOST.encode(), value, ack=lambda o=off: acked.append(o))
        assert io.topics["alerts"], "the miner opened no incident"
        # Before a checkpoint nothing is acknowledged, so nothing is committable.
        acked_before = list(acked)
        await p.checkpoint_due(force=True)
        assert acked_before == []
        return io, acked

    io, acked = run(go())
    assert acked == [0, 1, 2, 3, 4]
    last_checkpoint = max(i for i, e in enumerate(io.log) if e == ("checkpoint", 0))
    alert_acked = max(i for i, e in enumerate(io.log) if e == ("acked", "alerts"))
    assert alert_acked < last_checkpoint, "a checkpoint was written before the alerts it covers were on the broker"


def test_restore_skips_covered_input_and_does_not_republish():
    values = stream(90)
    expected = []
    engine = Engine()
    for v in values:
        for ev in orjson.loads(v):
            expected += [a["event"]["id"] for a in engine.process(c.validate_or_raise(ev))]
    assert len(expected) >= 3

    async def go() -> FakeIO:
        io = FakeIO()
        first = pipeline(io)
        for off, v in enumerate(values[:40]):
            await first.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
            if off == 20:
                await first.checkpoint_due(force=True)
        await io.flush()  # alerts after the checkpoint reached the broker; then the worker dies
        second = pipeline(io)  # a fresh engine: everything comes from the checkpoint
        for off, v in enumerate(values):  # the consumer restarts from an older committed offset
            await second.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        await io.flush()
        # Covered input is not processed again: the snapshot's latest messages are recognised as copies (all 21
        # here), anything older event by event through the offsets the snapshot covers.
        assert second.stats["resent"] == 21 and second.stats["skipped"] == 0
        return io

    io = run(go())
    published = [orjson.loads(v)["event"]["id"] for v in io.topics["alerts"]]
    assert published == expected


def test_bad_messages_and_failing_detectors_are_dead_lettered_and_processing_goes_on():
    class Exploding(Detector):
        id = "test.exploding"
        title = "raises on pid 666"
        description = "A detector with a bug, to check failures are dead-lettered, not swallowed."
        severity = "low"
        datasets = frozenset({Dataset.PROCESS})
        signal = Signal.SUSPICIOUS_PROCESS
        examples: ClassVar = []
        abstract = True  # never discovered

        def process(self, event: dict[str, Any], state: Any) -> Iterable[Any]:
            if event["process"]["pid"] == 666:
                raise ZeroDivisionError("division by zero")
            return ()

    engine = Engine(detectors=[*(cls() for cls in discover()), Exploding()])

    async def go() -> tuple[FakeIO, Pipeline]:
        io = FakeIO()
        p = pipeline(io, engine=engine)
        bad_type = benign_start(HOST, T0, pid=1)
        bad_type["process"]["pid"] = "1"
        inputs = [b"\xff\xfe", b'[{"@timestamp": "2026', msg([bad_type]), b"x" * 2_000_000, None,
                  msg([benign_start(HOST, T0, pid=666), miner_start(HOST, T0 + 1)]),
                  msg([benign_start("other-host", T0, pid=5)])]
        for off, v in enumerate(inputs):
            await p.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        await io.flush()
        return io, p

    io, p = run(go())
    letters = [orjson.loads(v) for v in io.topics["dead"]]
    assert [d["event"]["reason"] for d in letters] == [
        "not_json", "not_json", "wrong_type", "oversize", "not_json", "detector_failed", "host_mismatch"]
    assert [d["gpusentry"]["deadletter"]["offset"] for d in letters] == [0, 1, 2, 3, 4, 5, 6]
    failed = letters[5]
    assert failed["rule"]["id"] == "test.exploding" and "ZeroDivisionError" in failed["error"]["message"]
    assert orjson.loads(failed["event"]["original"])["process"]["pid"] == 666
    assert "original" not in letters[3]["event"]  # a 2 MB message is not copied
    # The miner in the same batch as the failing event still raised its incident.
    assert [orjson.loads(v)["host"]["name"] for v in io.topics["alerts"]] == [HOST]
    assert p.metrics.deadletters.labels("detector_failed")._value.get() == 1


# Scope and expiry rules; signatures are tested in test_feedback.py.
UNSIGNED_OK = Verifier({}, require_signature=False)


def test_feedback_scopes_and_expiry():
    supp = Suppressions()
    supp.apply(*parse_feedback(feedback_message(host=HOST, rule="process.miner_binary",
                                                expires="2026-09-21T15:00:00Z"), UNSIGNED_OK))
    alert = {"@timestamp": "x", "host": {"name": HOST}, "rule": {"id": "gpusentry.incident"},
             "gpusentry": {"alert": {"rules": ["process.miner_binary"], "dedup_key": "k"}}}
    assert supp.matching(alert, T0) is not None
    assert supp.matching(alert, T0 + 3600) is None  # expired by event time
    assert supp.matching({**alert, "host": {"name": "elsewhere"}}, T0) is None
    assert supp.matching({**alert, "gpusentry": {"alert": {"rules": ["gpu.mining_signature"]}}}, T0) is None
    supp.apply(*parse_feedback(feedback_message(verdict="revoke", host=HOST, rule="process.miner_binary"),
                               UNSIGNED_OK))
    assert len(supp) == 0
    supp.apply(*parse_feedback(feedback_message(executable="/opt/audit/hashcat"), UNSIGNED_OK))
    assert supp.matching({**alert, "process": {"executable": "/opt/audit/hashcat"}}, T0) is not None
    assert supp.matching(alert, T0) is None


@pytest.mark.parametrize(("value", "fix"), [
    (b"", "no value"), (b"{", "not valid JSON"), (b"[]", "JSON object"),
    (orjson.dumps({"gpusentry": {"feedback": {"verdict": "ok"}}}), "verdict"),
    (orjson.dumps({"gpusentry": {"feedback": {"verdict": "benign"}}}), "needs a scope"),
    (orjson.dumps({"gpusentry": {"feedback": {"verdict": "benign", "expires": "soon"}}, "host": {"name": "a"}}),
     "RFC 3339"),
])
def test_bad_feedback_says_what_is_expected(value, fix):
    with pytest.raises(FeedbackError, match=fix):
        parse_feedback(value, UNSIGNED_OK)


def test_suppressed_updates_are_not_published():
    supp = Suppressions()
    supp.apply(*parse_feedback(feedback_message(host=HOST), UNSIGNED_OK))

    async def go() -> tuple[FakeIO, Pipeline]:
        io = FakeIO()
        p = pipeline(io, suppressions=supp)
        for off, v in enumerate(stream(10)):
            await p.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        await io.flush()
        return io, p

    io, p = run(go())
    assert io.topics["alerts"] == [] and p.stats["suppressed"] >= 1


def test_the_alerts_metric_counts_updates_once_and_rules_apart():
    async def go() -> tuple[FakeIO, Pipeline]:
        io = FakeIO()
        p = pipeline(io)
        for off, v in enumerate(stream(10)):
            await p.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        await io.flush()
        return io, p

    io, p = run(go())
    published = [orjson.loads(v)["gpusentry"]["alert"] for v in io.topics["alerts"]]
    total = sum(s.get() for s in [m._value for m in p.metrics.alerts._metrics.values()])
    per_rule = sum(s.get() for s in [m._value for m in p.metrics.alert_rules._metrics.values()])
    assert total == len(published)
    assert per_rule == sum(len(a["rules"]) for a in published) and per_rule > total


def test_a_successor_resends_nothing_published_after_an_older_host_snapshot():
    """The checkpoint's alert marks must be as old as the oldest snapshot that will be replayed: a host snapshotted
    early in the interval and busy since has alerts on the topic from before the checkpoint was written, which the
    successor regenerates when it replays the host from its snapshot. They must be recognised, not sent again."""
    values = stream(90)

    async def go() -> tuple[FakeIO, Pipeline, int, int]:
        io = FakeIO()
        first = pipeline(io)
        before = 0
        for off, v in enumerate(values[:80]):
            await first.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
            if off == 2:
                part = first.partitions[0]
                first._snapshot(part, HOST, 0.0)  # a snapshot after one of the host's own messages, early on
                before = len(io.topics["alerts"])
        await first._checkpoint(first.partitions[0])  # a regular checkpoint: the host's snapshot is still the old one
        await io.flush()
        sent = len(io.topics["alerts"])
        assert sent - before >= 2, "the stream must publish updates between the snapshot and the checkpoint"
        second = pipeline(io)
        for off, v in enumerate(values[:80]):
            await second.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        await io.flush()
        assert len(io.topics["alerts"]) == sent, "updates already on the topic were sent again"
        return io, second, sent, before

    io, second, sent, before = run(go())
    assert sent - before >= 2 and second.stats["duplicates"] >= 2


def test_broker_calls_wait_for_a_restarting_broker_and_say_so_once(caplog):
    """A broker restart used to end the worker (KafkaTimeoutError from the alerts topic's end offsets, exit 1)."""
    import logging

    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, UnknownTopicOrPartitionError

    from streams.kafka_io import until_answered

    calls, slept = [], []

    async def flaky():
        calls.append(1)
        if len(calls) <= 3:
            raise (KafkaTimeoutError if len(calls) % 2 else KafkaConnectionError)("broker gone")
        return {0: 42}

    async def fake_sleep(s):
        slept.append(s)

    with caplog.at_level(logging.WARNING, logger="streams.kafka_io"):
        assert run(until_answered("end offsets", flaky, sleep=fake_sleep)) == {0: 42}
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]
    said = [r.getMessage() for r in caplog.records]
    assert sum("did not answer" in m for m in said) == 1 and sum("answers end offsets again" in m for m in said) == 1

    async def broken():
        raise UnknownTopicOrPartitionError("no such topic")

    with pytest.raises(UnknownTopicOrPartitionError):  # not a broker outage: the caller decides
        run(until_answered("end offsets", broken, sleep=fake_sleep))


def two_topic_backlog(host: str) -> tuple[list[bytes], list[bytes], list[str]]:
    """160 ten-second steps of one host's GPU samples and process starts (a miner at steps 5 and 90), as the two
    topics' messages, and the alert ids replay's order (each step's GPU message, then its process one) produces."""
    from tests.streams_helpers import gpu_batch

    gpu_msgs, proc_msgs = [], []
    for k in range(160):
        t = T0 + 10 * k
        batch = [benign_start(host, t, pid=10_000 + k)]
        if k in (5, 90):
            batch.append(miner_start(host, t + 1, pid=31_000 + k))
        gpu_msgs.append(msg(gpu_batch(host, t)))
        proc_msgs.append(msg(batch))
    engine = Engine()
    expected = []
    for g, pr in zip(gpu_msgs, proc_msgs, strict=True):
        for v in (g, pr):
            for ev in orjson.loads(v):
                expected += [a["event"]["id"] for a in engine.process(c.validate_or_raise(ev))]
    return gpu_msgs, proc_msgs, expected


def test_held_messages_meet_the_engine_in_event_time_order_whichever_topic_came_first():
    """A worker catching up a backlog may be handed one topic's messages long before another's. Out of order, the
    host's process events would arrive far behind its GPU samples and count as late: the second episode of the
    incident would never open. Held and merged by event time, the worker decides what replay decides."""
    host = "gpu-node-3"
    gpu_msgs, proc_msgs, expected = two_topic_backlog(host)

    async def go(hold: float) -> list[str]:
        io = FakeIO()
        p = Pipeline(Engine(), io, TOPICS, max_message_bytes=1_048_576, checkpoint_interval_s=3600.0,
                     reorder_hold_s=hold)
        # The backlog as a catching-up consumer may see it: every GPU message first, then the process ones.
        for off, v in enumerate(gpu_msgs):
            await p.handle("gpu", 0, off, host.encode(), v, ack=lambda: None)
        for off, v in enumerate(proc_msgs):
            await p.handle("process", 0, off, host.encode(), v, ack=lambda: None)
        await asyncio.sleep(hold + 0.05)
        await p.release_due()
        await p.checkpoint_due(force=True)
        await io.flush()
        return [orjson.loads(v)["event"]["id"] for v in io.topics["alerts"]]

    # The hold must outlast feeding the whole GPU backlog (0.2 s did not, on a loaded machine): 2 s.
    assert run(go(2.0)) == expected
    in_arrival_order = run(go(0.0))
    assert in_arrival_order != expected, "the test must show what arrival order gets wrong"


def test_a_topic_whose_fetches_stall_past_the_hold_is_waited_for_while_the_broker_says_it_has_more():
    """After a broker restart one topic's fetches can resume long after another's (more than reorder_hold_s, on a
    loaded machine). The broker's end offsets show the stalled topic's records are there: the other topic's held
    messages wait for them, and the incidents are replay's. A broker that says nothing more is there (or does not
    answer) gets the plain hold, and the GPU samples run ahead: the comparison that shows the wait matters."""
    host = "gpu-node-7"
    gpu_msgs, proc_msgs, expected = two_topic_backlog(host)
    hold, cut = 0.3, 40

    async def go(ends: str) -> tuple[list[str], FakeIO, float]:
        io = FakeIO()
        p = Pipeline(Engine(), io, TOPICS, max_message_bytes=1_048_576, checkpoint_interval_s=3600.0,
                     reorder_hold_s=hold)
        # Before the restart both topics deliver in step.
        for off in range(cut):
            await p.handle("gpu", 0, off, host.encode(), gpu_msgs[off], ack=lambda: None)
            await p.handle("process", 0, off, host.encode(), proc_msgs[off], ack=lambda: None)
        # After it, the GPU topic's fetches resume at once; the process topic's only after four holds.
        if ends == "consumer view stale":
            # The consumer's last fetch of the process topic, from before the restart (half a minute ago), says it
            # is all delivered; its fetches of the empty network and dns topics go on (each answer is fresh).
            polled = time.monotonic() - 30
            p.highwater = lambda topic, number: {"process": cut, "network": 0, "dns": 0}.get(topic)
            p.polled_at = lambda topic, number: polled if topic == "process" else time.monotonic()
        if ends in ("all there", "consumer view stale"):
            io.event_ends = {("gpu", 0): len(gpu_msgs), ("process", 0): len(proc_msgs)}
        elif ends == "nothing more":
            io.event_ends = {("gpu", 0): len(gpu_msgs), ("process", 0): cut}
        for off in range(cut, len(gpu_msgs)):
            await p.handle("gpu", 0, off, host.encode(), gpu_msgs[off], ack=lambda: None)
        for _ in range(16):
            await asyncio.sleep(hold / 4)
            await p.release_due()  # the worker's timer
        for off in range(cut, len(proc_msgs)):
            await p.handle("process", 0, off, host.encode(), proc_msgs[off], ack=lambda: None)
        await asyncio.sleep(hold + 0.05)
        await p.release_due()
        await p.checkpoint_due(force=True)
        await io.flush()
        stalls = p.metrics.registry.get_sample_value("gpusentry_worker_stalled_topic_waits_total",
                                                      {"topic": "process"})
        return [orjson.loads(v)["event"]["id"] for v in io.topics["alerts"]], io, stalls or 0.0

    for ends in ("all there", "consumer view stale"):
        waited, io, stalls = run(go(ends))
        assert io.end_queries > 0 and stalls == 1.0, ends  # one stall, counted once however long it lasted
        assert waited == expected, ends
    for ends in ("nothing more", "no answer"):
        ran_ahead, io, stalls = run(go(ends))
        assert ran_ahead != expected, f"{ends}: the test must show what running ahead gets wrong"
        assert io.end_queries > 0 and stalls == 0.0


def test_a_resent_copy_of_a_message_reaches_the_engine_once_and_a_restore_keeps_that():
    """An agent resends a batch whose delivery it could not confirm (on Apache Kafka a TCP cut mid-request lands
    the first copy too): the copy is dropped and counted; offsets and acks go on; a restored host drops only the
    copies of messages its snapshot already holds."""
    values = stream(12)
    offsets = [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]  # 3 and 4 arrive twice (the resend follows the originals)
    once = [values[i] for i in range(8)]

    async def feed(p: Pipeline, which: list[int], acked: list[int], base: int = 0) -> None:
        for n, i in enumerate(which):
            await p.handle("process", 0, base + n, HOST.encode(), values[i], ack=lambda o=base + n: acked.append(o))

    async def go() -> tuple[FakeIO, FakeIO, Pipeline, list[int]]:
        with_copies, without = FakeIO(), FakeIO()
        p, acked = pipeline(with_copies), []
        await feed(p, offsets, acked)
        await p.checkpoint_due(force=True)
        q = pipeline(without)
        for n, v in enumerate(once):
            await q.handle("process", 0, n, HOST.encode(), v, ack=lambda: None)
        await with_copies.flush()
        await without.flush()
        return with_copies, without, p, acked

    with_copies, without, p, acked = run(go())
    assert p.stats["resent"] == 2 and p.stats["events"] == sum(len(orjson.loads(v)) for v in once)
    assert p.metrics.resent_messages.labels("process")._value.get() == 2
    assert acked == list(range(len(offsets))), "a dropped copy must still be acknowledged, in order"
    strip = [{k: v for k, v in orjson.loads(a).items() if k != "event"} for a in with_copies.topics["alerts"]]
    assert strip == [{k: v for k, v in orjson.loads(a).items() if k != "event"} for a in without.topics["alerts"]]

    async def restored() -> Pipeline:
        io = FakeIO()
        first = pipeline(io, interval=0.0)  # each host snapshotted right after its message
        await feed(first, [0, 1, 2], [])
        await first.checkpoint_due(force=True)
        second = pipeline(io)  # the successor reads the checkpoint
        await feed(second, [2, 3], [], base=3)  # 2: a copy its snapshot holds; 3: new
        return second

    second = run(restored())
    assert second.stats["resent"] == 1 and second.stats["events"] == len(orjson.loads(values[3]))


def test_a_partition_a_rebalance_gives_straight_back_is_kept_in_memory_unless_someone_else_checkpointed_it():
    """faust's eager rebalance revokes every partition, also the survivor's own: those come back without a restore
    (a partition move used to pause them all while each was read back from its checkpoint)."""
    values = stream(40)

    async def go() -> tuple[FakeIO, FakeIO]:
        io = FakeIO()
        p = pipeline(io)
        for off, v in enumerate(values[:20]):
            await p.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
            await p.handle("process", 1, off, b"other-host", v.replace(HOST.encode(), b"other-host"), ack=lambda: None)
        await p.release({0, 1}, park=True)  # a rebalance begins
        await p.assign({0})  # partition 0 comes back, 1 went to another worker
        assert p.metrics.kept._value.get() == 1 and p.metrics.restores._value.get() == 0
        assert 1 not in p.partitions and not p._parked
        for off, v in enumerate(values[20:], start=20):
            await p.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        # Another rebalance, and meanwhile another worker wrote a checkpoint of partition 0: that one wins.
        await p.release({0}, park=True)
        io.checkpoints[0].append(io.checkpoints[0][-1])
        await p.assign({0})
        assert p.metrics.kept._value.get() == 1 and p.metrics.restores._value.get() == 1
        whole = FakeIO()
        q = pipeline(whole)
        for off, v in enumerate(values):
            await q.handle("process", 0, off, HOST.encode(), v, ack=lambda: None)
        await io.flush()
        await whole.flush()
        return io, whole

    io, whole = run(go())
    mine = [a for a in io.topics["alerts"] if orjson.loads(a)["host"]["name"] == HOST]
    assert mine, "the miner opened no incident"
    assert [orjson.loads(a)["gpusentry"]["alert"]["status"] for a in mine] == \
        [orjson.loads(a)["gpusentry"]["alert"]["status"] for a in whole.topics["alerts"]]
