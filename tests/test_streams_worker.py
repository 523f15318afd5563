"""The stream worker end to end on the real broker: agent (fake NVML) -> broker -> worker -> alerts topic,
the dead-letter path, and analyst suppressions from the feedback topic."""

from __future__ import annotations

import time

import orjson
import pytest

from agents.agent import Agent
from detectors.gpu._examples import mining
from gpusentry.config import load_config
from gpusentry.timefmt import format_timestamp, parse_timestamp
from streams.feedback import feedback_message, generate_key, load_signing_key
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, FakeProcess
from tests.streams_helpers import (
    WorkerProcess,
    alerts_of,
    gpu_batch,
    produce,
    producer,
    read_topic,
    topic_env,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HOST = "gpu-node-e2e"
QUIET = "gpu-node-audited"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def mining_gpu() -> FakeGpu:
    """What an ethash miner looks like through NVML: flat 100 %, DAG-sized memory, capped power, no PCIe."""
    return FakeGpu("GPU-e2e-0", name="NVIDIA A100-SXM4-80GB", gpu_pct=100, memory_pct=93,
                   memory_used=int(5.4 * 2**30), power_mw=250_000, power_limit_mw=260_000, sm_clock_mhz=1095,
                   mem_clock_mhz=1593, pcie_rx_kb=2, pcie_tx_kb=2, processes=[FakeProcess(31337, int(5.3 * 2**30))])


def _signature_alert(alert: dict) -> bool:
    return alert["host"]["name"] == HOST and "gpu.mining_signature" in alert["gpusentry"]["alert"]["rules"]


def test_agent_to_alerts_end_to_end_with_dead_letters_and_suppression(bootstrap, tmp_path):
    env = topic_env(bootstrap, "e2e", partitions=2)
    # The SOC's signing key: the worker trusts only its public half.
    pem, public = generate_key()
    (tmp_path / "soc.pem").write_bytes(pem)
    soc_key = load_signing_key(tmp_path / "soc.pem")
    env["GPUSENTRY_FEEDBACK__TRUSTED_KEYS"] = f'{{"soc-test" = "{public}"}}'
    # A shared config file with a half-written [outputs.webhook]: the forwarder's problem, not the worker's.
    worker = WorkerProcess({**env, "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true"}, "e2e").start()
    try:
        p = producer(bootstrap)
        start = time.time() - 300  # event time five minutes ago, so event.created (wall time) is later
        # An analyst has already marked mining-like load on the audit host benign, until next week.
        produce(p, env["GPUSENTRY_TOPICS__FEEDBACK"], None, feedback_message(
            soc_key, "soc-test", host=QUIET, expires=format_timestamp(time.time() + 7 * 86400),
            reason="hashcat audit", analyst="sec"))
        # The compromised node holds Kafka credentials and tries to silence itself: unsigned, then signed
        # with a key of its own. Both are refused.
        produce(p, env["GPUSENTRY_TOPICS__FEEDBACK"], None, feedback_message(host=HOST, reason="nothing to see"))
        rogue_pem, _ = generate_key()
        (tmp_path / "rogue.pem").write_bytes(rogue_pem)
        produce(p, env["GPUSENTRY_TOPICS__FEEDBACK"], None, feedback_message(
            load_signing_key(tmp_path / "rogue.pem"), "soc-test", host=HOST, reason="nothing to see"))
        # The host agent, with a fake NVML showing a miner, one cycle per 10 s of event time.
        cfg = load_config(None, environ={**env, "GPUSENTRY_AGENT__HOST_NAME": HOST,
                                         "GPUSENTRY_AGENT__COLLECTORS": '["gpu"]',
                                         "GPUSENTRY_AGENT__SPOOL_DIR": str(tmp_path / "spool")})
        clock = Clock(start)
        agent = Agent(cfg, outputs=["kafka"], nvml=FakeNvml([mining_gpu()]).module(), clock=clock, strict=True)
        agent.start()
        sample_times = []
        for _ in range(18):
            sample_times.append(clock.t)
            assert agent.run_cycle() == 1
            clock.t += 10
        agent.close()
        # The same load on the audited host, produced directly as agent-style batches.
        for ev in mining(0, 18, host=QUIET, uuid="GPU-quiet-0"):
            produce(p, env["GPUSENTRY_TOPICS__GPU"], QUIET, [ev])
        # Bad input: garbage, truncated JSON, a wrong type, a 10 MB message, a batch with one bad event.
        gpu_topic = env["GPUSENTRY_TOPICS__GPU"]
        good = gpu_batch("n-bad", start)
        wrong_type = gpu_batch("n-bad", start + 1)
        wrong_type[0]["gpu"]["index"] = "0"
        produce(p, gpu_topic, "n-bad", b"\x00\xffgarbage")
        produce(p, gpu_topic, "n-bad", orjson.dumps(good)[:150])
        produce(p, gpu_topic, "n-bad", [wrong_type[0]])
        produce(p, gpu_topic, "n-bad", b"[" + b" " * (10 * 1024 * 1024) + b"]")
        produce(p, gpu_topic, "n-bad", [good[0], {"not": "an event"}])
        p.flush(30)

        alerts = alerts_of(read_topic(bootstrap, env["GPUSENTRY_TOPICS__ALERTS"],
                                      until=lambda m: any(_signature_alert(a) for a in alerts_of(m)),
                                      timeout=90, settle=3.0))
        mine = [a for a in alerts if a["host"]["name"] == HOST]
        assert any(_signature_alert(a) for a in mine), f"no incident for {HOST}: {mine}\n{worker.log()[-3000:]}"
        # One incident: every update carries the same dedup key, and the latest holds all the evidence.
        assert len({a["gpusentry"]["alert"]["dedup_key"] for a in mine}) == 1
        incident = mine[-1]
        a = incident["gpusentry"]["alert"]
        assert incident["rule"]["id"] in (*a["rules"], "gpusentry.incident")
        assert "gpu.mining_signature" in a["rules"] and "gpu_signature" in a["signals"]
        assert a["status"] == "open" and a["severity"] in ("high", "critical")
        assert incident["gpu"]["uuid"] == "GPU-e2e-0"
        # Evidence points at the agent's own samples, by event time.
        ev_times = [parse_timestamp(e["@timestamp"]) for e in a["evidence"]]
        assert ev_times and all(any(abs(t - s) < 0.01 for s in sample_times) for t in ev_times)
        assert parse_timestamp(incident["event"]["start"]) == min(ev_times)
        assert parse_timestamp(incident["@timestamp"]) >= parse_timestamp(incident["event"]["start"])
        created = parse_timestamp(incident["event"]["created"])
        assert parse_timestamp(incident["@timestamp"]) < created <= time.time() + 1
        assert len({x["event"]["id"] for x in mine}) == len(mine), "an incident update was published twice"
        # Suppressed: the audited host's incident is withheld.
        assert not [x for x in alerts if x["host"]["name"] == QUIET]
        assert worker.metric("gpusentry_worker_alerts_suppressed_total") >= 1

        everything = [m["value"] for m in read_topic(bootstrap, env["GPUSENTRY_TOPICS__DEADLETTER"],
                                                      until=lambda m: len(m) >= 7, timeout=30, settle=1.0)]
        refused = [d for d in everything if d["event"]["reason"] == "bad_feedback"]
        assert sorted(d["error"]["message"].split(":")[0] for d in refused) == ["bad_signature", "unsigned"], refused
        assert worker.metric("gpusentry_worker_feedback_rejected_total", reason="unsigned") == 1
        letters = [d for d in everything if d not in refused]
        reasons = sorted(d["event"]["reason"] for d in letters)
        assert reasons == ["missing_field", "not_json", "not_json", "oversize", "wrong_type"], letters
        for d in letters:
            where = d["gpusentry"]["deadletter"]
            assert where["topic"] == gpu_topic and isinstance(where["partition"], int) and where["offset"] >= 0
            assert d["error"]["message"]
        oversize = next(d for d in letters if d["event"]["reason"] == "oversize")
        assert "original" not in oversize["event"] and oversize["gpusentry"]["deadletter"]["size_bytes"] > 10_000_000
        wrong = next(d for d in letters if d["event"]["reason"] == "wrong_type")
        assert "gpu.index" in wrong["error"]["message"]
        # The bad event of the last batch is named by its position; its good neighbour was processed.
        assert next(d for d in letters if d["event"]["reason"] == "missing_field")["gpusentry"]["deadletter"][
            "index"] == 1
        assert worker.metric("gpusentry_worker_deadletters_total") == 7
        assert worker.metric("gpusentry_worker_events_total", topic=gpu_topic) >= 18 + 18 + 1
        assert worker.metric("gpusentry_worker_alert_rules_total", rule="gpu.mining_signature") >= 1
        assert len(alerts) <= worker.metric("gpusentry_worker_alerts_total") <= \
            worker.metric("gpusentry_worker_alert_rules_total")
        deadline = time.monotonic() + 10
        while 'gpusentry_worker_consumer_lag{partition="0",topic="' + gpu_topic not in worker.metrics_text():
            assert time.monotonic() < deadline, worker.metrics_text()
            time.sleep(0.5)
        assert worker.metric("gpusentry_worker_consumer_lag", topic=gpu_topic) == 0  # all caught up
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        assert "[outputs] is invalid; this command does not use it" in worker.log()
