"""Replay a real NVML capture (taken with scripts/capture_nvml.sh on a GPU machine) through the detectors.

Skips when no capture is present under tests/data/; the fake-driven tests cover the collector itself.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import orjson
import pytest

from detectors.engine import Engine
from gpusentry import contract as c

DATA = Path(__file__).resolve().parent / "data"
CAPTURES = sorted(DATA.glob("nvml_capture_*.jsonl*"))


def read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


@pytest.mark.skipif(not CAPTURES, reason="no real NVML capture under tests/data/ yet: run scripts/capture_nvml.sh "
                    "on a machine with an NVIDIA GPU and commit the file it writes")
@pytest.mark.parametrize("path", CAPTURES, ids=[p.name for p in CAPTURES])
def test_real_capture_is_valid_and_runs_through_the_gpu_detectors(path):
    check_capture(path)


def test_the_replay_check_on_a_capture_written_by_the_agent_with_the_fake(tmp_path):
    """The same check on a capture the agent wrote from the pynvml fake, so the check itself is exercised."""
    from agents.agent import Agent
    from gpusentry.config import Config
    from tests.fakes.fake_pynvml import FakeGpu, FakeNvml

    cfg = Config()
    cfg.agent.collectors = ["gpu"]
    cfg.agent.host_name = "capture-host"
    out = tmp_path / "nvml_capture_fake.jsonl"
    lib = FakeNvml([FakeGpu("GPU-a", gpu_pct=0), FakeGpu("GPU-b", gpu_pct=100, power_mw=650_000)])
    agent = Agent(cfg, outputs=[f"jsonl:{out}"], nvml=lib.module(), strict=True,
                  clock=iter(range(1_795_000_000, 1_795_000_100)).__next__)
    agent.start()
    for _ in range(40):
        agent.run_cycle()
    agent.close()
    with gzip.open(tmp_path / "nvml_capture_fake.jsonl.gz", "wb") as fh:
        fh.write(out.read_bytes())
    check_capture(tmp_path / "nvml_capture_fake.jsonl.gz")


def check_capture(path: Path) -> None:
    events = []
    for raw in read(path):
        event = c.validate_event(raw)
        assert not isinstance(event, c.Reject), event
        events.append(event)
    per_gpu = Counter(e["gpu"]["uuid"] for e in events)
    assert per_gpu and min(per_gpu.values()) >= 30, f"expected about a minute of samples per GPU, got {per_gpu}"
    # A real GPU reports at least utilization and memory; other fields may be null (not supported).
    assert any(e["gpu"]["utilization"]["gpu_pct"] is not None for e in events)
    assert all(e["gpu"]["memory"]["total_bytes"] for e in events)
    engine = Engine(strict=True)  # a detector raising on real data fails the test
    alerts = [a for e in events for a in engine.process(e)]
    assert not engine.failures
    for alert in alerts:
        assert not isinstance(c.validate_event(alert), c.Reject)
