"""`gpusentry forward` end to end: alerts topic on a real broker, local receivers, Kafka dead letters, commits."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from gpusentry import contract as c
from gpusentry.config import load_config
from outputs.forwarder import forward
from tests import outputs_receivers as rx
from tests.outputs_helpers import alert, incident, original

pytestmark = pytest.mark.broker


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 20.0) -> list[dict]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(topic, 0, 0)])
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.3)
            if msg is not None and msg.error() is None:
                got.append(orjson.loads(msg.value()))
    finally:
        consumer.close()
    return got


@pytest.fixture
def receivers():
    r = rx.Receivers().start()
    yield r
    r.stop()


def test_forward_delivers_dead_letters_and_commits(bootstrap, topic_factory, receivers):
    alerts_topic, dead_topic, ecs_topic = topic_factory("alerts"), topic_factory("dl"), topic_factory("ecs")
    group = f"fwd-{os.getpid()}-{time.time_ns()}"
    env = {
        "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "GPUSENTRY_TOPICS__ALERTS": alerts_topic, "GPUSENTRY_TOPICS__DEADLETTER": dead_topic,
        "GPUSENTRY_OUTPUTS__GROUP_ID": group, "GPUSENTRY_OUTPUTS__SEED": "1",
        "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",
        "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
        "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET,
        "GPUSENTRY_OUTPUTS__PAGERDUTY__ENABLED": "true",
        "GPUSENTRY_OUTPUTS__PAGERDUTY__MIN_SEVERITY": "critical",
        "GPUSENTRY_OUTPUTS__PAGERDUTY__URL": receivers.base + rx.PAGERDUTY_PATH,
        "GPUSENTRY_OUTPUTS__PAGERDUTY__ROUTING_KEY": rx.PD_ROUTING_KEY,
        "GPUSENTRY_OUTPUTS__KAFKA__ENABLED": "true", "GPUSENTRY_OUTPUTS__KAFKA__TOPIC": ecs_topic,
    }
    cfg = load_config(environ=env)
    opened, resolved = incident(1)
    medium = alert(2, gpusentry__alert__severity="medium")
    receivers.plan(rx.PAGERDUTY_PATH, (400, {}, '{"status":"invalid event","errors":["test refusal"]}'))
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for value, key in [(c.encode(opened), "k1"), (b"{not json", "bad"), (c.encode(medium), "k2"),
                       (c.encode(c.dns_event("h", 1.0, question="x.org", resolved_ips=[])), "h"),
                       (c.encode(resolved), "k1")]:
        producer.produce(alerts_topic, value, key=key)
    producer.flush(10)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(forward(cfg, stop))
        deadline = time.monotonic() + 40
        while len(receivers.received[rx.WEBHOOK_PATH]) < 3 and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.1)
        stop.set()
        return await asyncio.wait_for(task, 20)

    summary = asyncio.run(main())
    assert not receivers.violations
    assert [a["event"]["id"] for a in receivers.received[rx.WEBHOOK_PATH]] == \
        [opened["event"]["id"], medium["event"]["id"], resolved["event"]["id"]]
    # PagerDuty wants critical only: the open alert was refused (400), the resolve went through.
    assert [e["event_action"] for e in receivers.received[rx.PAGERDUTY_PATH]] == ["resolve"]
    assert summary.alerts == 3 and summary.rejected == 2 and summary.messages == 5
    assert summary.outcomes["pagerduty:dead_lettered"] == 1 and summary.outcomes["webhook:delivered"] == 3

    dead = read_topic(bootstrap, dead_topic, 3)
    stages = sorted((d["gpusentry"]["deadletter"]["stage"], d["event"]["reason"]) for d in dead)
    assert stages == [("forwarder", "bad_value"), ("forwarder", "not_json"), ("output", "delivery_failed")]
    bad = next(d for d in dead if d["event"]["reason"] == "not_json")
    assert bad["event"]["original"] == "{not json" and bad["gpusentry"]["deadletter"]["topic"] == alerts_topic
    failed = next(d for d in dead if d["gpusentry"]["deadletter"]["stage"] == "output")
    assert original(failed) == opened and "test refusal" in failed["error"]["message"]
    assert rx.PD_ROUTING_KEY not in str(dead)

    ecs = read_topic(bootstrap, ecs_topic, 3)
    assert [a["event"]["id"] for a in ecs] == [opened["event"]["id"], medium["event"]["id"], resolved["event"]["id"]]

    check = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        (committed,) = check.committed([TopicPartition(alerts_topic, 0)], timeout=10)
    finally:
        check.close()
    assert committed.offset == 5, "offsets are committed once every alert is delivered or dead-lettered"


def test_deliver_alerts_for_replay(receivers):
    from outputs.forwarder import deliver_alerts

    cfg = load_config(environ={"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",
                               "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
                               "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET,
                               "GPUSENTRY_OUTPUTS__WEBHOOK__MAX_ATTEMPTS": "1"})
    receivers.plan(rx.WEBHOOK_PATH, 500)
    summary, dead = deliver_alerts(cfg, [alert(1), alert(2)])
    assert summary.outcomes == {"webhook:dead_lettered": 1, "webhook:delivered": 1}
    assert original(dead[0]) == alert(1)
    assert receivers.received[rx.WEBHOOK_PATH] == [alert(2)]


def test_forward_command_stops_cleanly_on_sigterm(bootstrap, topic_factory, receivers, tmp_path):
    import signal
    import subprocess
    import sys

    alerts_topic = topic_factory("alerts")
    env = {**os.environ, "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_TOPICS__ALERTS": alerts_topic,
           "GPUSENTRY_TOPICS__DEADLETTER": topic_factory("dl"), "GPUSENTRY_OUTPUTS__GROUP_ID": f"cmd-{time.time_ns()}",
           "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
           "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET}
    cfg_file = tmp_path / "gpusentry.toml"
    cfg_file.write_text("")
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(alerts_topic, c.encode(alert(7)), key="k")
    producer.flush(10)
    proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "forward", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 40
        while not receivers.received[rx.WEBHOOK_PATH] and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert receivers.received[rx.WEBHOOK_PATH] == [alert(7)]
    assert proc.returncode == 0, stderr
    assert "webhook:delivered 1" in stderr and rx.WEBHOOK_SECRET not in stderr


@pytest.mark.slow
def test_a_delivery_longer_than_the_poll_interval_keeps_the_group_and_forwards_once(bootstrap, topic_factory,
                                                                                     receivers, monkeypatch):
    """A webhook that answers 503 with Retry-After: 5 holds the batch for 5 s; the consumer may go 2.5 s without a poll."""
    import outputs.forwarder as fwd

    monkeypatch.setattr(fwd, "CLIENT_TUNING", {**fwd.CLIENT_TUNING, "max_poll_interval_ms": 2500})
    alerts_topic = topic_factory("alerts")
    group = f"fwd-slow-{os.getpid()}-{time.time_ns()}"
    cfg = load_config(environ={
        "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_TOPICS__ALERTS": alerts_topic,
        "GPUSENTRY_TOPICS__DEADLETTER": topic_factory("dl"), "GPUSENTRY_OUTPUTS__GROUP_ID": group,
        "GPUSENTRY_OUTPUTS__SEED": "1", "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",
        "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
        "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET})
    receivers.plan(rx.WEBHOOK_PATH, (503, {"Retry-After": "5"}, "busy"))
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce(alerts_topic, c.encode(alert(1)), key="k1")
    producer.flush(10)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(forward(cfg, stop))
        deadline = time.monotonic() + 40
        while not receivers.received[rx.WEBHOOK_PATH] and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.1)
        producer.produce(alerts_topic, c.encode(alert(2)), key="k2")  # the next batch, after the long one
        producer.flush(10)
        while len(receivers.received[rx.WEBHOOK_PATH]) < 2 and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.1)
        stop.set()
        return await asyncio.wait_for(task, 20)

    started = time.monotonic()
    summary = asyncio.run(main())
    assert time.monotonic() - started >= 5, "the Retry-After was not honoured"
    assert [a["event"]["id"] for a in receivers.received[rx.WEBHOOK_PATH]] == \
        [alert(1)["event"]["id"], alert(2)["event"]["id"]]
    assert summary.outcomes["webhook:delivered"] == 2 and receivers.count(rx.WEBHOOK_PATH) == 3
    check = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        (committed,) = check.committed([TopicPartition(alerts_topic, 0)], timeout=10)
    finally:
        check.close()
    assert committed.offset == 2


def test_slack_threads_survive_a_forwarder_restart(bootstrap, topic_factory, receivers):
    """Bot mode: each forwarder run is a fresh process state; the incident's updates still go to its thread."""
    from outputs.forwarder import slack_threads_topic
    from outputs.kafka import read_thread_journal

    alerts_topic = topic_factory("alerts")
    cfg = load_config(environ={
        "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_TOPICS__ALERTS": alerts_topic,
        "GPUSENTRY_TOPICS__DEADLETTER": topic_factory("dl"),
        "GPUSENTRY_OUTPUTS__GROUP_ID": f"fwd-slack-{os.getpid()}-{time.time_ns()}",
        "GPUSENTRY_OUTPUTS__SLACK__ENABLED": "true", "GPUSENTRY_OUTPUTS__SLACK__MODE": "bot",
        "GPUSENTRY_OUTPUTS__SLACK__BOT_TOKEN": rx.SLACK_BOT_TOKEN, "GPUSENTRY_OUTPUTS__SLACK__CHANNEL": "C0SOC",
        "GPUSENTRY_OUTPUTS__SLACK__API_URL": receivers.base + "/api", "GPUSENTRY_OUTPUTS__SLACK__RATE_PER_S": "0"})
    opened, resolved = incident(5)
    update = alert(5, message="more evidence")
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})

    def forward_run(*alerts):  # a forwarder run that delivers these alerts, then stops
        for a in alerts:
            producer.produce(alerts_topic, c.encode(a), key=a["gpusentry"]["alert"]["dedup_key"])
        producer.flush(10)
        wanted = len(receivers.received[rx.SLACK_API]) + len(alerts)

        async def main():
            stop = asyncio.Event()
            task = asyncio.create_task(forward(cfg, stop))
            deadline = time.monotonic() + 30
            while len(receivers.received[rx.SLACK_API]) < wanted and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.1)
            stop.set()
            return await asyncio.wait_for(task, 20)

        return asyncio.run(main())

    assert forward_run(opened).outcomes == {"slack:delivered": 1}
    assert forward_run(update, resolved).outcomes == {"slack:delivered": 2}
    assert not receivers.violations
    ((parent_ts, thread),) = receivers.slack_threads.items()
    parent, *replies = thread
    assert len(replies) == 2 and all(m["thread_ts"] == parent_ts for m in replies)
    key = opened["gpusentry"]["alert"]["dedup_key"]
    records = asyncio.run(read_thread_journal(cfg.kafka, slack_threads_topic(cfg)))
    assert records == [(key, "C0SOC", parent_ts), (key, "", None)], "recorded when opened, tombstoned when resolved"


def test_slack_threads_stay_in_memory_when_their_topic_cannot_be_created(monkeypatch, caplog):
    import outputs.forwarder as fwd
    from gpusentry.broker import BrokerUnavailable
    from outputs.slack import SlackOutput

    def refused(*args, **kwargs):
        raise BrokerUnavailable("could not create topic 'x-slack-threads': TOPIC_AUTHORIZATION_FAILED")

    monkeypatch.setattr(fwd, "create_topics", refused)
    cfg = load_config(environ={
        "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "GPUSENTRY_OUTPUTS__SLACK__ENABLED": "true",
        "GPUSENTRY_OUTPUTS__SLACK__MODE": "bot", "GPUSENTRY_OUTPUTS__SLACK__BOT_TOKEN": rx.SLACK_BOT_TOKEN,
        "GPUSENTRY_OUTPUTS__SLACK__CHANNEL": "C0SOC"})
    output = SlackOutput(cfg.outputs.slack)
    with caplog.at_level("WARNING"):
        asyncio.run(fwd._keep_slack_threads(cfg, output, producer=None))
    assert output.threads.journal is None
    assert "kept in memory only" in caplog.text and "cleanup.policy=compact" in caplog.text
    assert rx.SLACK_BOT_TOKEN not in caplog.text


@pytest.mark.slow
def test_a_forwarder_killed_mid_batch_loses_nothing_and_its_successor_resends_only_that_batch(bootstrap, topic_factory,
                                                                                           tmp_path):
    """SIGKILL while a batch is half delivered: offsets are committed only after a whole batch was delivered, so the
    successor (same group) delivers the rest; what arrives twice is part of the killed batch, nothing is missing."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[str] = []
    lock = threading.Lock()

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.3)  # a slow endpoint: the kill lands inside a batch
            with lock:
                received.append(json.loads(body)["event"]["id"])
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    alerts_topic = topic_factory("alerts")
    env = {**os.environ, "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GPUSENTRY_TOPICS__ALERTS": alerts_topic,
           "GPUSENTRY_TOPICS__DEADLETTER": topic_factory("dl"), "GPUSENTRY_OUTPUTS__GROUP_ID": f"kill-{time.time_ns()}",
           "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",
           "GPUSENTRY_OUTPUTS__WEBHOOK__URL": f"http://127.0.0.1:{server.server_address[1]}/hook",
           "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET}
    env.pop("GPUSENTRY_CONFIG", None)
    (tmp_path / "gpusentry.toml").write_text("")
    producer = Producer({"bootstrap.servers": bootstrap})
    sent = [alert(1000 + i) for i in range(40)]

    def forwarder() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "forward", "--config",
                                 str(tmp_path / "gpusentry.toml")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    first = forwarder()
    try:
        for group in range(4):  # four batches of ten, each delivered before the next arrives
            for a in sent[10 * group:10 * group + 10]:
                producer.produce(alerts_topic, c.encode(a), key=a["gpusentry"]["alert"]["dedup_key"])
            producer.flush(10)
            deadline = time.monotonic() + 60
            while len(received) < 10 * group + (5 if group == 2 else 10) and time.monotonic() < deadline:
                time.sleep(0.02)
            if group == 2:
                break  # half of the third batch is delivered: kill now
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = len(received)
        assert 20 <= before < 30, "the kill did not land in the third batch"
        for a in sent[30:]:
            producer.produce(alerts_topic, c.encode(a), key=a["gpusentry"]["alert"]["dedup_key"])
        producer.flush(10)
        second = forwarder()
        try:
            deadline = time.monotonic() + 90
            while not {a["event"]["id"] for a in sent} <= set(received) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        server.shutdown()
        server.server_close()
    assert {a["event"]["id"] for a in sent} <= set(received), "alerts lost by the kill"
    twice = {i for i in set(received) if received.count(i) > 1}
    third_batch = {a["event"]["id"] for a in sent[20:30]}
    assert twice <= third_batch, "only the batch in flight at the kill may come again (earlier ones were committed)"
