"""`gpusentry deadletters list|redrive` on the broker: an outage's dead letters re-driven to the recovered endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest

from outputs.dispatcher import dead_letter_record
from tests import outputs_receivers as rx
from tests.outputs_helpers import alert
from tests.streams_helpers import produce, producer, topic_env

pytestmark = [pytest.mark.broker]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpusentry.cli", "deadletters", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def test_list_and_redrive_to_a_recovered_endpoint(bootstrap):
    receivers = rx.Receivers().start()
    try:
        env = topic_env(bootstrap, "deadletters")
        env.update({"GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
                    "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET})
        p = producer(bootstrap)
        topic = env["GPUSENTRY_TOPICS__DEADLETTER"]
        undelivered = [alert(i) for i in range(3)] + [alert(3, status="resolved")]
        for a in undelivered:  # what the forwarder wrote during the outage
            produce(p, topic, None, dead_letter_record(a, "webhook", "HTTP 503 (gave up after 5 attempts)", 5,
                                                       time.time(), 503))
        produce(p, topic, None, dead_letter_record(alert(9), "slack", "invalid_blocks", 1, time.time(), 400))
        produce(p, topic, "n1", {"@timestamp": "2026-11-01T00:00:00.000Z", "event": {"reason": "not_json"},
                                 "error": {"message": "not valid JSON"}, "host": {"name": "n1"}})
        produce(p, topic, None, b"\x00garbage")
        p.flush(30)

        listed = _cli("list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert sorted(str(r["output"]) for r in rows) == ["None", "slack", "webhook", "webhook", "webhook", "webhook"]
        assert _cli("list", "--output", "webhook", "--json", env=env).stdout.count("\n") == 4

        dry = _cli("redrive", "--output", "webhook", "--dry-run", env=env)
        assert "would send 4 alerts to webhook" in dry.stdout and not receivers.received[rx.WEBHOOK_PATH]
        again = _cli("redrive", "--output", "webhook", env=env)
        assert again.returncode == 0, again.stderr
        assert "4 delivered, 0 dead-lettered again" in again.stdout
        got = receivers.received[rx.WEBHOOK_PATH]
        assert sorted(a["event"]["id"] for a in got) == sorted(a["event"]["id"] for a in undelivered)
        assert not receivers.violations, "signed, well-formed deliveries"
    finally:
        receivers.stop()


def test_redrive_names_an_output_that_is_not_configured(bootstrap):
    env = topic_env(bootstrap, "deadletters-bad")
    r = _cli("redrive", "--output", "carrier-pigeon", env=env)
    assert r.returncode == 1 and "unknown output 'carrier-pigeon'" in r.stderr
