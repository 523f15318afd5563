"""`gpusentry outputs test` and `gpusentry forward` from the command line."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from gpusentry.cli import app
from tests import outputs_receivers as rx

runner = CliRunner()


@pytest.fixture
def receivers():
    r = rx.Receivers().start()
    yield r
    r.stop()


def env_for(receivers) -> dict[str, str]:
    return {
        "GPUSENTRY_CONFIG": "/nonexistent-is-not-used",
        "GPUSENTRY_OUTPUTS__SLACK__ENABLED": "true",
        "GPUSENTRY_OUTPUTS__SLACK__WEBHOOK_URL": receivers.base + rx.SLACK_PATH,
        "GPUSENTRY_OUTPUTS__PAGERDUTY__ENABLED": "true",
        "GPUSENTRY_OUTPUTS__PAGERDUTY__URL": receivers.base + rx.PAGERDUTY_PATH,
        "GPUSENTRY_OUTPUTS__PAGERDUTY__ROUTING_KEY": rx.PD_ROUTING_KEY,
        "GPUSENTRY_OUTPUTS__HEC__ENABLED": "true", "GPUSENTRY_OUTPUTS__HEC__URL": receivers.base,
        "GPUSENTRY_OUTPUTS__HEC__TOKEN": rx.HEC_TOKEN, "GPUSENTRY_OUTPUTS__HEC__BATCH_LINGER_S": "0",
        "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
        "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET,
    }


def invoke(args, env, tmp_path):
    cfg = tmp_path / "gpusentry.toml"
    cfg.write_text("")
    return runner.invoke(app, [*args, "--config", str(cfg)], env={k: v for k, v in env.items()
                                                                  if k != "GPUSENTRY_CONFIG"})


def test_outputs_test_sends_a_sample_incident_everywhere(receivers, tmp_path):
    result = invoke(["outputs", "test"], env_for(receivers), tmp_path)
    assert result.exit_code == 0, result.output
    assert not receivers.violations
    for name in ("slack", "pagerduty", "hec", "webhook"):
        assert name in result.output
    assert result.output.count("delivered") == 8, result.output
    assert [e["event_action"] for e in receivers.received[rx.PAGERDUTY_PATH]] == ["trigger", "resolve"]
    assert receivers.received[rx.PAGERDUTY_PATH][0]["dedup_key"].startswith("test-")
    assert len(receivers.received[rx.HEC_PATH]) == 2 and len(receivers.received[rx.SLACK_PATH]) == 2
    sent_at = [e["time"] for e in receivers.received[rx.HEC_PATH]]
    assert all(abs(t - time.time()) < 120 for t in sent_at), "the sample carries the current time"
    for secret in (rx.PD_ROUTING_KEY, rx.HEC_TOKEN, rx.WEBHOOK_SECRET, "XXXXSECRETXXXX"):
        assert secret not in result.output


def test_outputs_test_reports_a_failing_output_and_exits_1(receivers, tmp_path):
    env = env_for(receivers)
    env["GPUSENTRY_OUTPUTS__HEC__TOKEN"] = "wrong-token-0000"
    result = invoke(["outputs", "test", "--no-resolve", "-o", "hec", "-o", "webhook"], env, tmp_path)
    assert result.exit_code == 1, result.output
    assert "Invalid token" in result.output and "FAILED" in result.output and "wrong-token-0000" not in result.output
    assert "delivered" in result.output  # the webhook still worked


def test_outputs_test_without_outputs_exits_2(tmp_path):
    result = invoke(["outputs", "test"], {}, tmp_path)
    assert result.exit_code == 2 and "no output is enabled" in result.output


def test_forward_without_outputs_exits_2_with_the_fix(tmp_path):
    result = invoke(["forward"], {"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}, tmp_path)
    assert result.exit_code == 2 and "outputs.<name>.enabled" in result.output


@pytest.mark.parametrize("args", [["forward"], ["outputs"], ["outputs", "test"]])
def test_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_replay_deliver_sends_the_replayed_alerts(receivers, tmp_path):
    import orjson

    from detectors.examples import proc

    events = tmp_path / "events.jsonl"
    events.write_bytes(orjson.dumps(proc("/dev/shm/.x/xmrig --donate-level 1 -o pool.example:3333")) + b"\n")
    out = tmp_path / "alerts.jsonl"
    env = {"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
           "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET}
    result = invoke(["replay", str(events), "--out", str(out), "--deliver"], env, tmp_path)
    assert result.exit_code == 0, result.output
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert written and receivers.received[rx.WEBHOOK_PATH] == written
    assert "webhook:delivered" in result.output

    receivers.plan(rx.WEBHOOK_PATH, (410, {}, "gone"))
    result = invoke(["replay", str(events), "--deliver"], {**env, "GPUSENTRY_OUTPUTS__WEBHOOK__MAX_ATTEMPTS": "1"},
                    tmp_path)
    assert result.exit_code == 1 and '"delivery_failed"' in result.output and "HTTP 410" in result.output


def test_forward_with_kafka_unreachable_says_so_in_one_line_and_exits_1():
    import os
    import subprocess
    import sys

    env = dict(os.environ, GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1", GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED="true",
               GPUSENTRY_OUTPUTS__WEBHOOK__URL="http://127.0.0.1:9/hook",
               GPUSENTRY_OUTPUTS__WEBHOOK__SECRET="a-secret-of-some-length")
    env.pop("GPUSENTRY_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "gpusentry.cli", "forward"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr
    assert "a-secret-of-some-length" not in done.stderr
