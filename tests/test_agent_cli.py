"""`gpusentry agent` end to end, as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from gpusentry import contract as c


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpusentry.cli", "agent", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_agent_writes_jsonl_for_a_number_of_cycles(tmp_path):
    out = tmp_path / "events.jsonl"
    done = run("--output", f"jsonl:{out}", "--cycles", "2", "--interval", "0.2", "--host-name", "cli-host",
               env={"GPUSENTRY_AGENT__SPOOL_DIR": str(tmp_path / "spool"), "GPUSENTRY_AGENT__CAPTURE": "off"})
    assert done.returncode == 0, done.stderr
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert events
    for ev in events:
        assert not isinstance(c.validate_event(ev), c.Reject)
        assert ev["host"]["name"] == "cli-host"
    assert any(e["event"]["dataset"] == "gpusentry.process" and e["process"]["pid"] == os.getpid() for e in events)
    if not any(e["event"]["dataset"] == "gpusentry.gpu" for e in events):
        # No GPU on this machine: said once, and everything else ran.
        assert done.stderr.count("GPU collector off") == 1


def test_agent_refuses_kafka_without_brokers_and_names_the_fix(tmp_path):
    done = run("--output", "kafka", "--cycles", "1", env={"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": ""})
    assert done.returncode == 2
    assert "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS" in done.stderr


def test_agent_rejects_an_unknown_output(tmp_path):
    done = run("--output", "carrier-pigeon", "--cycles", "1")
    assert done.returncode == 2
    assert "jsonl:PATH" in done.stderr


def test_agent_config_errors_name_the_key(tmp_path):
    done = run("--cycles", "1", env={"GPUSENTRY_AGENT__PROCESS_SOURCE": "ebpf"})
    assert done.returncode == 2
    assert "agent.process_source" in done.stderr
