"""Publishing: the spool on its own, the sinks, and outages against a real broker behind a cuttable proxy."""

from __future__ import annotations

import os
import time

import orjson
import pytest

from agents.agent import Agent, AgentError
from agents.gpu import GpuCollector
from agents.metrics import AgentMetrics
from agents.sinks import split_batch
from agents.spool import Spool
from gpusentry import contract as c
from gpusentry.broker import create_topics
from gpusentry.config import Config
from tests.agent_helpers import ProxiedBroker, consume_all
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml

HOST = "gpu-node-7"


# ------------------------------------------------------------------ spool


def test_spool_is_ordered_and_resumes_after_restart(tmp_path):
    spool = Spool(tmp_path, 10 * 1024 * 1024, segment_bytes=4096)
    for i in range(100):
        spool.append("t", b"h", f"msg-{i}".encode() * 20)
    first = spool.read(spool.head, 30)
    assert [m.value[:6] for m in first[:2]] == [b"msg-0m", b"msg-1m"]
    spool.ack(first[-1].end, 30)
    spool.close()
    again = Spool(tmp_path, 10 * 1024 * 1024, segment_bytes=4096)
    assert again.pending == 70
    rest = again.read(again.head, 1000)
    assert [m.value for m in rest] == [f"msg-{i}".encode() * 20 for i in range(30, 100)]
    again.ack(rest[-1].end, 70)
    assert again.pending == 0
    assert len(list(tmp_path.glob("*.seg"))) == 1  # fully sent segments are deleted
    again.close()


def test_spool_drops_the_oldest_beyond_its_cap_and_counts_them(tmp_path, caplog):
    spool = Spool(tmp_path, 1024 * 1024, segment_bytes=64 * 1024)
    value = b"x" * 1000
    for i in range(2000):  # about 2 MB into a 1 MB spool
        spool.append("t", b"h", i.to_bytes(4, "big") + value)
    assert spool.size_bytes <= 1024 * 1024
    assert spool.dropped > 0 and spool.pending + spool.dropped == 2000
    left = spool.read(spool.head, 10_000)
    numbers = [int.from_bytes(m.value[:4], "big") for m in left]
    assert numbers == list(range(spool.dropped, 2000))  # the newest kept, in order
    assert "dropped the" in caplog.text
    spool.close()


def test_spool_cuts_a_torn_tail(tmp_path):
    spool = Spool(tmp_path, 1024 * 1024)
    spool.append("t", b"h", b"one")
    spool.append("t", b"h", b"two")
    spool.close()
    seg = next(tmp_path.glob("*.seg"))
    seg.write_bytes(seg.read_bytes()[:-2])  # the agent died in the middle of a write
    again = Spool(tmp_path, 1024 * 1024)
    assert [m.value for m in again.read(again.head, 10)] == [b"one"]
    again.append("t", b"h", b"three")
    assert [m.value for m in again.read(again.head, 10)] == [b"one", b"three"]
    again.close()


def test_unwritable_spool_names_the_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="agent.spool_dir"):
        Spool(blocker / "spool", 1024 * 1024)


def test_a_spool_removed_while_running_is_found_and_the_spool_goes_on(tmp_path):
    import shutil

    spool = Spool(tmp_path / "spool", 10 * 1024 * 1024, segment_bytes=4096)
    for i in range(100):
        spool.append("t", b"h", f"msg-{i}".encode() * 20)
    spool.ack(spool.read(spool.head, 30)[-1].end, 30)
    spool.commit()
    assert spool.missing() is None
    shutil.rmtree(tmp_path / "spool")
    assert spool.missing() == f"the spool directory {tmp_path / 'spool'} was removed"
    assert spool.recover() == 70  # the unsent ones were in the removed files
    assert spool.missing() is None and spool.pending == 0
    spool.append("t", b"h", b"after")
    assert [m.value for m in spool.read(spool.head, 10)] == [b"after"]
    spool.close()
    again = Spool(tmp_path / "spool", 10 * 1024 * 1024, segment_bytes=4096)
    assert [m.value for m in again.read(again.head, 10)] == [b"after"] and not again.created
    again.close()


def test_an_older_spool_segment_removed_keeps_the_others(tmp_path):
    spool = Spool(tmp_path, 10 * 1024 * 1024, segment_bytes=4096)
    for i in range(100):
        spool.append("t", b"h", i.to_bytes(4, "big") + b"v" * 200)
    spool.flush()
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) > 3
    in_first = sum(1 for m in spool.read(spool.head, 1000) if m.end[0] == int(segments[0].stem))
    segments[0].unlink()
    assert spool.missing() == "1 older spool segment(s) were removed"
    assert spool.recover() == in_first
    left = [int.from_bytes(m.value[:4], "big") for m in spool.read(spool.head, 1000)]
    assert left == list(range(in_first, 100)) and spool.pending == 100 - in_first
    spool.close()


def test_a_spool_segment_replaced_by_another_file_is_found(tmp_path):
    spool = Spool(tmp_path, 10 * 1024 * 1024)
    spool.append("t", b"h", b"one")
    spool.flush()
    seg = next(tmp_path.glob("*.seg"))
    seg.rename(tmp_path / "aside")
    seg.write_bytes(b"")
    assert spool.missing() == f"the spool segment {seg.name} was replaced by another file"
    assert spool.recover() == 1
    assert not seg.exists() and spool.missing() is None
    spool.close()


def test_a_spool_left_alone_is_never_reported_removed(tmp_path_factory):
    """Rotation, acknowledgement (which deletes sent segments), drops over the cap and restarts are the spool's own
    doing: none of them may look like a removal."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(1, 3000)),
                             st.tuples(st.just("ack"), st.integers(0, 20)),
                             st.tuples(st.just("restart"), st.just(0))), max_size=60)

    @settings(max_examples=40, deadline=None)
    @given(ops)
    def check(steps):
        d = tmp_path_factory.mktemp("spool")
        spool = Spool(d, 64 * 1024, segment_bytes=4096)
        for op, arg in steps:
            if op == "append":
                spool.append("t", b"k", b"v" * arg)
            elif op == "ack":
                batch = spool.read(spool.head, arg)
                if batch:
                    spool.ack(batch[-1].end, len(batch))
            else:
                spool.close()
                spool = Spool(d, 64 * 1024, segment_bytes=4096)
            assert spool.missing() is None, (op, arg)
        spool.close()

    check()


def test_the_agent_reports_its_spool_removed_and_a_worker_raises_agent_tampered(tmp_path):
    """End to end without a broker: the Kafka sink holds every message (its broker does not answer), the spool is
    deleted, and the next cycle's own event says so; replayed, it is a high agent.tampered finding."""
    import shutil

    from gpusentry.replay import run_replay

    cfg = config(tmp_path, collectors=["gpu"])
    cfg.kafka.bootstrap_servers = "127.0.0.1:1"
    out = tmp_path / "events.jsonl"
    agent = Agent(cfg, outputs=["kafka", f"jsonl:{out}"], nvml=fake_gpus(2).module(), strict=True)
    try:
        agent.start()
        agent.announce("started")
        for _ in range(3):
            agent.run_cycle()
        sink = agent.kafka_sink()
        assert sink is not None and sink.spool.pending == 4
        shutil.rmtree(tmp_path / "spool")
        agent.run_cycle()
        agent.run_cycle()  # a second check finds the new spool whole: reported once
        assert agent.metrics.value("gpusentry_agent_spool_removals_total") == 1
        assert sink.spool.pending == 3  # the report and two cycles, in the new spool
    finally:
        agent.close(timeout=0.2)
    own = [e for e in map(orjson.loads, out.read_bytes().splitlines()) if (e.get("gpusentry") or {}).get("agent")]
    assert [e["gpusentry"]["agent"]["lifecycle"] for e in own] == ["started", "spool_removed"]
    assert own[0]["gpusentry"]["agent"]["spool_new"] is True
    report = own[1]["gpusentry"]["agent"]
    assert report["spool_removed_messages"] == 4 and "was removed" in report["spool_problem"]
    assert not isinstance(c.validate_event(own[1]), c.Reject)
    alerts = tmp_path / "alerts.jsonl"
    run_replay([out], Config(), out=alerts)
    found = [a for a in map(orjson.loads, alerts.read_bytes().splitlines())
             if "agent.tampered" in a["gpusentry"]["alert"]["rules"]]
    assert found and found[-1]["gpusentry"]["alert"]["severity"] == "high"
    assert "4 unsent message(s)" in found[-1]["message"]


def test_started_says_whether_the_spool_was_new(tmp_path):
    cfg = config(tmp_path, collectors=[])
    cfg.kafka.bootstrap_servers = "127.0.0.1:1"
    news = []
    for run in range(2):
        out = tmp_path / f"run{run}.jsonl"
        agent = Agent(cfg, outputs=["kafka", f"jsonl:{out}"], strict=True)
        agent.announce("started")
        agent.close(timeout=0.1)
        news.append(orjson.loads(out.read_bytes())["gpusentry"]["agent"]["spool_new"])
    assert news == [True, False]


def test_split_batch_keeps_messages_under_the_cap():
    events = [c.gpu_event(HOST, 1.0, index=i, uuid=f"GPU-{i}", name="x" * 300) for i in range(40)]
    parts = split_batch(events, 4096)
    assert len(parts) > 1 and all(len(p) <= 4096 for p in parts)
    assert [e["gpu"]["index"] for p in parts for e in orjson.loads(p)] == list(range(40))
    metrics = AgentMetrics()
    assert split_batch(events[:1], 100, metrics) == []
    assert metrics.value("gpusentry_agent_oversize_events_dropped_total") == 1


# ------------------------------------------------------------------ sinks and the agent loop


def config(tmp_path, **agent) -> Config:
    cfg = Config()
    cfg.agent.host_name = HOST
    cfg.agent.spool_dir = str(tmp_path / "spool")
    for k, v in agent.items():
        setattr(cfg.agent, k, v)
    return cfg


def fake_gpus(n: int = 8) -> FakeNvml:
    return FakeNvml([FakeGpu(f"GPU-{i}", gpu_pct=i) for i in range(n)])


def test_jsonl_output_is_replayable_contract_events(tmp_path):
    out = tmp_path / "events.jsonl"
    cfg = config(tmp_path, collectors=["gpu", "process", "network"], capture="off", process_source="poll")
    agent = Agent(cfg, outputs=[f"jsonl:{out}"], nvml=fake_gpus(2).module(), strict=True)
    agent.start()
    try:
        assert agent.run_cycle() > 0
        agent.run_cycle()
    finally:
        agent.close()
    lines = out.read_bytes().splitlines()
    datasets = set()
    for line in lines:
        ev = c.validate_event(orjson.loads(line))
        assert not isinstance(ev, c.Reject), ev
        assert ev["host"]["name"] == HOST
        datasets.add(ev["event"]["dataset"])
    assert {"gpusentry.gpu", "gpusentry.process"} <= datasets
    assert sum(1 for line in lines if b'"gpusentry.gpu"' in line) == 4  # 2 GPUs x 2 cycles


def test_stdout_output(tmp_path, capfdbinary):
    cfg = config(tmp_path, collectors=["gpu"])
    agent = Agent(cfg, outputs=["stdout"], nvml=fake_gpus(1).module(), strict=True)
    agent.start()
    agent.run_cycle()
    agent.close()
    out = capfdbinary.readouterr().out.splitlines()
    assert len(out) == 1 and orjson.loads(out[0])["gpu"]["uuid"] == "GPU-0"


def test_kafka_output_without_brokers_names_the_fix(tmp_path):
    with pytest.raises(AgentError, match="GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS"):
        Agent(config(tmp_path), outputs=["kafka"])


def test_a_failing_collector_is_counted_and_the_others_still_publish(tmp_path):
    class Broken:
        name = "broken"

        def start(self) -> bool:
            return True

        def collect(self, now):
            raise RuntimeError("boom")

        def close(self) -> None:
            pass

    out = tmp_path / "e.jsonl"
    cfg = config(tmp_path)
    metrics_agent = Agent(cfg, outputs=[f"jsonl:{out}"], collectors=[])
    gpu = GpuCollector(HOST, nvml=fake_gpus(1).module(), metrics=metrics_agent.metrics)
    metrics_agent.collectors = [Broken(), gpu]
    metrics_agent.start()
    assert metrics_agent.run_cycle() == 1
    metrics_agent.close()
    assert metrics_agent.metrics.value("gpusentry_agent_collector_errors_total",
                                       {"collector": "broken", "reason": "RuntimeError"}) == 1
    strict = Agent(cfg, outputs=[f"jsonl:{out}"], collectors=[Broken()], strict=True)
    strict.start()
    with pytest.raises(RuntimeError):
        strict.run_cycle()
    strict.close()


def test_metrics_endpoint_on_localhost(tmp_path):
    import httpx

    from gpusentry.broker import free_port

    port = free_port()
    cfg = config(tmp_path, metrics_port=port)
    agent = Agent(cfg, outputs=[f"jsonl:{tmp_path / 'e.jsonl'}"], collectors=[])
    agent.collectors = [GpuCollector(HOST, nvml=fake_gpus(3).module(), metrics=agent.metrics)]
    agent.start()
    try:
        agent.run_cycle()
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        agent.close()
    assert 'gpusentry_agent_events_total{collector="gpu"} 3.0' in body
    assert "process_resident_memory_bytes" in body and "process_cpu_seconds_total" in body
    assert "gpusentry_agent_spool_messages" in body


# ------------------------------------------------------------------ outages on a real broker


@pytest.fixture
def proxied():
    broker = ProxiedBroker()
    try:
        yield broker
    finally:
        broker.stop()


def kafka_agent(tmp_path, bootstrap: str, topic: str, log_name: str, nvml: FakeNvml,
                kafka_extra: dict | None = None) -> Agent:
    cfg = config(tmp_path, collectors=["gpu"], message_timeout_ms=1500, interval_s=0.1)
    cfg.kafka.bootstrap_servers = bootstrap
    cfg.topics.gpu = topic
    agent = Agent(cfg, outputs=["kafka", f"jsonl:{tmp_path / log_name}"], nvml=nvml.module(), strict=True,
                  kafka_extra=kafka_extra)
    agent.start()
    return agent


def cycles(agent: Agent, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        agent.run_cycle()
        time.sleep(0.1)


def produced_ids(*paths) -> list[str]:
    return [orjson.loads(line)["event"]["id"] for p in paths for line in p.read_bytes().splitlines()]


def consumed_ids(bootstrap: str, topic: str, expected_events: int) -> list[str]:
    """The event ids on ``topic`` in order, each message once: a message may arrive twice (the agent resends what
    it could not confirm, and on Apache Kafka a request cut mid-flight may have landed), but only as an exact copy
    soon after its original, which the worker drops (streams.pipeline.RECENT_MESSAGES)."""
    from streams.pipeline import RECENT_MESSAGES

    ids: list[str] = []
    seen: dict[bytes, int] = {}
    # One message per cycle holds 8 GPU events; ask for at least that many messages.
    for n, (key, value) in enumerate(consume_all(bootstrap, topic, expected_events // 8)):
        if value in seen:
            assert n - seen[value] <= RECENT_MESSAGES, "a copy too late for the worker to recognise"
            continue
        seen[value] = n
        decoded = c.decode_message(value, key=key)
        assert not decoded.rejects, decoded.rejects
        ids.extend(e["event"]["id"] for e in decoded.events)
    return ids


@pytest.mark.broker
@pytest.mark.slow
def test_outage_longer_than_the_producer_buffer_loses_nothing_and_keeps_order(tmp_path, proxied):
    topic = "agent.outage"
    create_topics(proxied.bootstrap, [topic], partitions=1)
    # A tiny client queue, so the outage also fills it (BufferError) and the spool has to hold the rest.
    agent = kafka_agent(tmp_path, proxied.bootstrap, topic, "sent.jsonl", fake_gpus(),
                        kafka_extra={"queue.buffering.max.messages": 8})
    try:
        cycles(agent, 1.0)
        proxied.proxy.cut()
        cycles(agent, 4.0)  # well past message.timeout.ms (1.5 s): the client gives messages back
        sink = agent.kafka_sink()
        assert sink is not None
        assert sink.spool.pending > 0
        proxied.proxy.restore()
        cycles(agent, 1.0)
        assert sink.drain(30), "the spool did not empty after the broker came back"
        failures = agent.metrics.value("gpusentry_agent_delivery_failures_total", {"error": "_MSG_TIMED_OUT"})
        queue_full = agent.metrics.value("gpusentry_agent_producer_queue_full_total")
    finally:
        agent.close()
    assert failures > 0, "the outage never outlasted the producer's own buffering"
    assert queue_full > 0, "the client's queue never filled up"
    sent = produced_ids(tmp_path / "sent.jsonl")
    got = consumed_ids(proxied.bootstrap, topic, len(sent))
    assert len(got) == len(set(got)), "duplicates arrived"
    assert got == sent, "events were lost or reordered"


@pytest.mark.broker
@pytest.mark.slow
def test_agent_restarted_while_the_broker_is_unreachable_resends_its_spool(tmp_path, proxied):
    topic = "agent.restart"
    create_topics(proxied.bootstrap, [topic], partitions=1)
    proxied.proxy.cut()
    first = kafka_agent(tmp_path, proxied.bootstrap, topic, "first.jsonl", fake_gpus())
    cycles(first, 1.0)
    first.close(timeout=0.5)
    left = Spool(tmp_path / "spool", 1 << 30)
    pending = left.pending
    left.close()
    assert pending > 0, "nothing was spooled while the broker was unreachable"
    proxied.proxy.restore()
    second = kafka_agent(tmp_path, proxied.bootstrap, topic, "second.jsonl", fake_gpus())
    try:
        cycles(second, 0.5)
        sink = second.kafka_sink()
        assert sink is not None and sink.drain(30)
    finally:
        second.close()
    sent = produced_ids(tmp_path / "first.jsonl", tmp_path / "second.jsonl")
    got = consumed_ids(proxied.bootstrap, topic, len(sent))
    assert len(got) == len(set(got)), "duplicates arrived"
    assert got == sent, "the spooled events did not arrive first, once each, in order"


def test_producer_settings_and_secrets_stay_out_of_logs(tmp_path, caplog):
    from gpusentry.config import load_config

    cfg = load_config(None, environ={
        "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",  # nothing listens there
        "GPUSENTRY_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "GPUSENTRY_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "GPUSENTRY_KAFKA__SASL_USERNAME": "agent", "GPUSENTRY_KAFKA__SASL_PASSWORD": "s3cret-pw",
        "GPUSENTRY_AGENT__COLLECTORS": '["gpu"]', "GPUSENTRY_AGENT__MESSAGE_TIMEOUT_MS": "1000",
        "GPUSENTRY_AGENT__HOST_NAME": HOST, "GPUSENTRY_AGENT__SPOOL_DIR": str(tmp_path / "spool")})
    with caplog.at_level("DEBUG"):
        agent = Agent(cfg, outputs=["kafka"], nvml=fake_gpus(1).module(), strict=True)
        agent.start()
        agent.run_cycle()
        sink = agent.kafka_sink()
        assert sink is not None
        conf = sink.config
        assert conf["enable.idempotence"] is True and conf["acks"] == "all" and conf["compression.type"] == "lz4"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["sasl.username"] == "agent"
        assert conf["security.protocol"] == "SASL_PLAINTEXT"
        agent.close(timeout=1)
    assert "s3cret-pw" not in caplog.text
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in cfg.model_dump_json()
    # The undelivered cycle stays spooled for the next start.
    left = Spool(tmp_path / "spool", 1 << 30)
    assert left.pending == 1
    left.close()


def test_spool_model_based_order_and_resume(tmp_path_factory):
    """Any mix of appends, partial sends, acknowledgements and restarts: what is unacknowledged comes back in
    order, nothing acknowledged comes back, and nothing is lost under the cap."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.one_of(
        st.tuples(st.just("append"), st.integers(1, 400)),
        st.tuples(st.just("ack"), st.integers(0, 20)),
        st.tuples(st.just("restart"), st.just(0)),
    ), max_size=60)

    @settings(max_examples=60, deadline=None)
    @given(ops)
    def check(steps):
        d = tmp_path_factory.mktemp("spool")
        spool = Spool(d, 64 * 1024 * 1024, segment_bytes=2048)
        expected: list[bytes] = []  # unacknowledged, in order
        n = 0
        for op, arg in steps:
            if op == "append":
                value = n.to_bytes(4, "big") + b"v" * arg
                n += 1
                spool.append("t", b"k", value)
                expected.append(value)
            elif op == "ack":
                batch = spool.read(spool.head, arg)
                assert [m.value for m in batch] == expected[:len(batch)]
                if batch:
                    spool.ack(batch[-1].end, len(batch))
                    del expected[:len(batch)]
            else:
                spool.close()
                spool = Spool(d, 64 * 1024 * 1024, segment_bytes=2048)
            assert spool.pending == len(expected)
        assert [m.value for m in spool.read(spool.head, 10_000)] == expected
        spool.close()

    check()


def test_closing_the_kafka_sink_releases_its_client_at_once_and_twice_is_harmless(tmp_path):
    """The client's threads must go with close(), not with a later collection of a reference cycle."""
    import gc

    from gpusentry.config import load_config

    def threads() -> int:  # librdkafka's threads are the process's: they exist while the client does
        return len(os.listdir("/proc/self/task"))

    cfg = load_config(None, environ={
        "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "GPUSENTRY_AGENT__COLLECTORS": '["gpu"]',
        "GPUSENTRY_AGENT__HOST_NAME": HOST, "GPUSENTRY_AGENT__SPOOL_DIR": str(tmp_path / "spool")})
    gc.collect()
    gc.disable()
    try:
        before = threads()
        agent = Agent(cfg, outputs=["kafka"], nvml=fake_gpus(1).module(), strict=True)
        assert threads() > before
        agent.close(timeout=0.5)
        assert threads() == before, "the Kafka client outlived close(): its threads keep reconnecting"
        agent.close(timeout=0.5)
    finally:
        gc.enable()
