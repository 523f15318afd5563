"""The command line: help everywhere, reliable exit codes, replay of JSONL and gzip files."""

from __future__ import annotations

import gzip
import subprocess
import sys

import orjson
import pytest
from typer.testing import CliRunner

from gpusentry import __version__
from gpusentry import contract as c
from gpusentry.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["up"], ["agent"], ["worker"], ["replay"], ["simulate"], ["version"],
                                  ["config"], ["config", "check"]])
def test_help_everywhere(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert __version__ in result.output and "contract v1" in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "gpusentry.cli", "version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("gpusentry ")


def test_bad_config_exits_2_with_the_fix(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\ninterval = 5\n")
    result = runner.invoke(app, ["config", "check", "--config", str(bad)])
    assert result.exit_code == 2
    assert "did you mean 'interval_s'" in result.output


def test_unknown_option_is_a_usage_error():
    assert runner.invoke(app, ["version", "--bogus"]).exit_code == 2


def test_replay_reports_bad_lines_with_numbers_and_goes_on(tmp_path):
    good = [c.dns_event("h1", 1_790_000_000 + i, question="a.example", resolved_ips=["10.0.0.1"]) for i in range(3)]
    path = tmp_path / "events.jsonl.gz"
    lines = [orjson.dumps(good[0]), b"{broken", b"", orjson.dumps(good[1]), b'{"host": {"name": "x"}}',
             orjson.dumps(good[2])]
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["replay", str(path), "--out", str(tmp_path / "alerts.jsonl")])
    assert result.exit_code == 0, result.output
    assert f"{path}:2: rejected: not valid JSON" in result.output
    assert f"{path}:5: rejected: required field '@timestamp' is missing" in result.output
    assert "3 events read, 2 rejected" in result.output
    strict = runner.invoke(app, ["replay", "--strict", str(path), "--out", str(tmp_path / "a.jsonl")])
    assert strict.exit_code == 4


def test_replay_missing_file_is_named_and_exits_1(tmp_path):
    result = runner.invoke(app, ["replay", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1 and "missing.jsonl: cannot be read" in result.output


def test_json_logs_are_one_valid_ecs_object_per_line(tmp_path):
    """logging.format = "json": every line parses, with ECS fields, whatever the message holds."""
    import subprocess
    import sys as _sys

    r = subprocess.run([_sys.executable, "-m", "gpusentry.cli", "agent", "--output", "stdout", "--cycles", "1",
                        "--interval", "0.2"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**__import__("os").environ, "GPUSENTRY_LOGGING__FORMAT": "json"})
    assert r.returncode == 0, r.stderr
    lines = [orjson.loads(line) for line in r.stderr.splitlines() if line.strip()]  # every line is JSON
    assert lines and all(d["service.name"] == "gpusentry-agent" and d["log.logger"] for d in lines)
    import logging

    from gpusentry.logs import EcsJsonFormatter

    record = logging.LogRecord("gpusentry.test", logging.WARNING, __file__, 1, 'cmd "%s"\n{"forged": 1}',
                               ("/tmp/x\\y",), None)
    line = EcsJsonFormatter("gpusentry-test").format(record)
    doc = orjson.loads(line)
    assert "\n" not in line and doc["message"] == 'cmd "/tmp/x\\y"\n{"forged": 1}' and "forged" not in doc
    assert doc["log.level"] == "warning" and doc["service.name"] == "gpusentry-test" and doc["@timestamp"]
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("g", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    doc = orjson.loads(EcsJsonFormatter("g").format(rec))
    assert doc["error.type"] == "ValueError" and "boom" in doc["error.stack_trace"]


def test_replay_names_unreadable_and_binary_files_and_replays_the_rest(tmp_path):
    import subprocess
    import sys as _sys

    from detectors.examples import proc

    good = tmp_path / "good.jsonl"
    good.write_bytes(orjson.dumps(proc("/tmp/x/xmrig -o stratum+tcp://pool.example.net:3333 -u 4AbC")) + b"\n")
    binary = tmp_path / "core.dump"
    binary.write_bytes(bytes(range(256)) * 40)
    r = subprocess.run([_sys.executable, "-m", "gpusentry.cli", "replay", str(binary), str(tmp_path / "gone.jsonl"),
                        str(good)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "core.dump: cannot be read: binary content" in r.stderr and "rejected:" not in r.stderr, \
        "refused whole, not read as hundreds of bad lines"
    assert "gone.jsonl: cannot be read" in r.stderr and "2 file(s) unreadable" in r.stderr
    assert orjson.loads(r.stdout.splitlines()[0])["gpusentry"]["alert"]["severity"] in ("high", "critical")


def test_ctrl_c_makes_the_agent_exit_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys as _sys
    import time as _time

    p = subprocess.Popen([_sys.executable, "-m", "gpusentry.cli", "agent", "--output", "stdout", "--interval", "0.5"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")})
    deadline = _time.monotonic() + 30
    seen = b""
    while b"every 0.5 s" not in seen and _time.monotonic() < deadline:  # the agent's start-up line
        seen += p.stderr.readline()
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 130, seen


def test_a_kafka_clients_repeated_complaint_is_said_once_a_minute_with_a_count():
    """A broker away for a minute made the worker print hundreds of aiokafka ERROR lines; now one, then a count."""
    import logging

    from gpusentry.logs import RepeatFilter

    f = RepeatFilter(window_s=60.0)

    def record(name: str, msg: str, at: float, *args: object) -> logging.LogRecord:
        r = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)
        r.created = at
        return r

    connect = "Unable connect to node with id %s: %s"
    shown = [f.filter(record("aiokafka", connect, t, 1, "refused")) for t in (0.0, 0.5, 1.0, 30.0)]
    assert shown == [True, False, False, False]
    assert f.filter(record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 2.0, 1)), \
        "another complaint is said too"
    assert f.filter(record("streams.kafka_io", "broker did not answer %s", 3.0, "x"))
    assert f.filter(record("streams.kafka_io", "broker did not answer %s", 3.1, "x")), "our own lines are never held"
    later = record("aiokafka", connect, 61.0, 1, "refused")
    assert f.filter(later) and "3 more like this" in later.getMessage() and "refused" in later.getMessage()
    assert not f.filter(record("aiokafka", connect, 62.0, 1, "refused"))
    info = record("aiokafka.consumer.group_coordinator", "Revoking previously assigned partitions %s", 63.0, "x")
    info.levelno = logging.INFO
    assert f.filter(info) and f.filter(info), "a rebalance's INFO lines are never held"


def test_a_refreshed_knowledge_file_is_checked_installed_atomically_and_read_by_replay(tmp_path):
    """The refresh an operator does when a new miner family appears: a bad file is refused with its line or entry
    and installs nothing; a good one lands in detection.knowledge_dir, and a replay then knows the family."""
    import os

    from detectors.examples import proc
    from gpusentry.knowledge import shipped_path

    events = tmp_path / "events.jsonl"
    events.write_bytes(orjson.dumps(proc("/opt/tools/zzhash-miner")) + b"\n")
    kdir = tmp_path / "knowledge"
    env = {**os.environ, "GPUSENTRY_DETECTION__KNOWLEDGE_DIR": str(kdir)}
    env.pop("GPUSENTRY_CONFIG", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpusentry.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)

    def severities() -> list[str]:
        r = cli("replay", str(events))
        assert r.returncode == 0, r.stderr
        return [orjson.loads(line)["gpusentry"]["alert"]["severity"] for line in r.stdout.splitlines()]

    assert severities() == [], "the shipped knowledge does not know the family"
    shipped = shipped_path("miners.toml").read_text()
    broken = tmp_path / "miners-broken.toml"
    broken.write_text(shipped.replace('id = "t-rex"', 'id = "t-rex" "trex"', 1))
    r = cli("knowledge", "refresh", "miners.toml", "--from", str(broken))
    assert r.returncode == 1 and f"{broken}: not valid TOML" in r.stderr and "nothing installed" in r.stderr
    line = shipped[:shipped.index('id = "t-rex"')].count("\n") + 1
    assert f"line {line}" in r.stderr, r.stderr
    unsourced = tmp_path / "miners-unsourced.toml"
    unsourced.write_text(shipped + '\n[[family]]\nid = "zzhash"\nnames = ["zzhash-miner"]\n')
    r = cli("knowledge", "check", str(unsourced), "--as", "miners.toml")
    assert r.returncode == 1 and "('zzhash'): `source` is missing" in r.stderr
    assert not kdir.exists() or not list(kdir.iterdir()), "nothing installed, not even a temporary file"

    good = tmp_path / "miners-new.toml"
    good.write_text(shipped + '\n[[family]]\nid = "zzhash"\nnames = ["zzhash-miner"]\nsource = "a test"\n')
    r = cli("knowledge", "refresh", "miners.toml", "--from", str(good))
    assert r.returncode == 0, r.stderr
    assert f"at {kdir / 'miners.toml'}" in r.stdout and [p.name for p in kdir.iterdir()] == ["miners.toml"]
    assert "installed" in cli("knowledge", "list").stdout.splitlines()[0]
    assert severities(), "a replay reads the installed file"


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 0), ("SIGINT", 130)])
def test_the_agent_says_when_it_starts_and_sends_a_last_event_when_a_signal_stops_it(tmp_path, sig, code):
    """Its own process event first (`started`) and last (`stopping` with the signal): a worker turns a stopped,
    restarted or silent agent into an incident (agent.tampered, agent.silent), and replay sees the same."""
    import os
    import signal
    import time as _time

    out = tmp_path / "events.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "agent", "--output", f"jsonl:{out}", "--interval",
                          "0.5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")})
    deadline = _time.monotonic() + 30
    seen = b""
    while b"every 0.5 s" not in seen and _time.monotonic() < deadline:
        seen += p.stderr.readline()
    _time.sleep(1.2)  # a couple of cycles
    p.send_signal(getattr(signal, sig))
    assert p.wait(30) == code, seen
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    own = [e for e in events if (e.get("gpusentry") or {}).get("agent")]
    assert [e["gpusentry"]["agent"]["lifecycle"] for e in own] == ["started", "stopping"]
    assert own[-1]["gpusentry"]["agent"]["stop_signal"] == sig and own[-1]["event"]["type"] == ["end"]
    assert own[-1] == events[-1], "the stop is the agent's last event"
    assert all(e["process"]["pid"] == p.pid for e in own)
    for e in own:
        c.validate_or_raise(e)


def test_an_unreachable_broker_is_one_line_per_complaint_not_a_librdkafka_flood(tmp_path):
    """The agent's librdkafka producer used to print `%3|...|FAIL|...` to stderr on every retry while Kafka was
    unreachable; its lines now go through logging and each complaint is said once a minute."""
    import os
    import signal
    import time as _time

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    env["GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS"] = "127.0.0.1:1"
    env["GPUSENTRY_AGENT__SPOOL_DIR"] = str(tmp_path / "spool")
    p = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "agent", "--output", "kafka", "--interval", "0.2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    _time.sleep(8)  # dozens of failed connects
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    text = err.decode()
    assert "%3|" not in text and "|FAIL|" not in text, "librdkafka printed to stderr itself"
    fails = [line for line in text.splitlines() if "librdkafka" in line and "FAIL" in line]
    assert 1 <= len(fails) <= 2, text[-3000:]
    # Forty cycles against a closed port: the sink's own complaint is said once, naming the address and the fix.
    sink = [line for line in text.splitlines() if "agents.sinks" in line]
    assert len(sink) == 2, text[-3000:]  # and once more at the stop, saying what stays in the spool
    assert "stay in the spool" in sink[1]
    assert "Kafka at 127.0.0.1:1" in sink[0] and "check kafka.bootstrap_servers" in sink[0]


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "forward"])
@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 0)])
def test_worker_and_forwarder_exit_130_on_ctrl_c_and_0_on_sigterm(bootstrap, command, sig, code):
    """Ctrl-C is an interruption (130) for every long-running command; SIGTERM is a service manager's stop (0).
    Each runs with a section it does not use invalid: it warns and goes on."""
    import os
    import signal
    import time as _time

    import httpx

    from gpusentry.broker import free_port
    from tests.streams_helpers import topic_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    env.update(topic_env(bootstrap, f"exit{command}"))
    port = free_port()
    if command == "worker":
        env.update({"GPUSENTRY_WORKER__METRICS_PORT": str(port),
                    "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true"})  # no url nor secret: not the worker's concern
        argv = ["worker", "--create-topics"]
    else:
        env.update({"GPUSENTRY_OUTPUTS__METRICS_PORT": str(port), "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",
                    "GPUSENTRY_OUTPUTS__WEBHOOK__URL": "http://127.0.0.1:9/hook",
                    "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": "s3cret-for-the-test",
                    "GPUSENTRY_DETECTION__NOPE": "1"})  # the forwarder does not detect
        argv = ["forward"]
    p = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", *argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env)
    try:
        deadline = _time.monotonic() + 60
        while _time.monotonic() < deadline and p.poll() is None:  # running: its metrics answer
            try:
                if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                _time.sleep(0.3)
        assert p.poll() is None, p.communicate()[1].decode()[-3000:]
        _time.sleep(1)
        p.send_signal(getattr(signal, sig))
        _, err_text = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    text = err_text.decode()
    assert p.returncode == code, text[-3000:]
    assert "is invalid; this command does not use it" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
