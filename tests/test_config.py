"""Configuration: file, environment overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpusentry.config import ConfigError, config_docs, load_config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpusentry.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(environ={})
    assert cfg.topics.gpu == "gpusentry.gpu"
    assert cfg.kafka.security_protocol == "PLAINTEXT"
    assert cfg.agent.host_name


def test_file_values_and_env_overrides(tmp_path):
    path = write(tmp_path, '[kafka]\nbootstrap_servers = "k1:9092"\n[agent]\ninterval_s = 2\n')
    cfg = load_config(path, environ={"GPUSENTRY_AGENT__INTERVAL_S": "1", "GPUSENTRY_TOPICS__ALERTS": "my.alerts",
                                     "GPUSENTRY_CONFIG": "ignored", "OTHER": "x"})
    assert cfg.kafka.bootstrap_servers == "k1:9092"
    assert cfg.agent.interval_s == 1.0
    assert cfg.topics.alerts == "my.alerts"


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, '[topics]\ngpu = "fleet.gpu"\n')
    assert load_config(environ={"GPUSENTRY_CONFIG": str(path)}).topics.gpu == "fleet.gpu"


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = write(tmp_path, '[kafka]\nbootstrap_server = "k:9092"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    msg = str(info.value)
    assert "unknown key 'kafka.bootstrap_server'" in msg
    assert "did you mean 'bootstrap_servers'" in msg
    assert str(path) in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'kafak'.*did you mean 'kafka'"):
        load_config(write(tmp_path, "[kafak]\n"), environ={})


def test_bad_value_from_env_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), environ={"GPUSENTRY_AGENT__INTERVAL_S": "-1"})
    msg = str(info.value)
    assert "agent.interval_s" in msg and "GPUSENTRY_AGENT__INTERVAL_S" in msg and "greater than 0" in msg


def test_every_problem_is_listed_at_once(tmp_path):
    path = write(tmp_path, '[kafka]\nsecurity_protocol = "TLS"\n[agent]\ninterval_s = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    msg = str(info.value)
    assert "kafka.security_protocol" in msg and "agent.interval_s" in msg


def test_sasl_needs_credentials_and_hides_the_password(tmp_path):
    path = write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\n'
                           'sasl_username = "svc"\n')
    with pytest.raises(ConfigError, match="GPUSENTRY_KAFKA__SASL_PASSWORD"):
        load_config(path, environ={})
    cfg = load_config(path, environ={"GPUSENTRY_KAFKA__SASL_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(cfg) and "hunter2" not in cfg.model_dump_json()
    conf = cfg.kafka.confluent_config()
    assert conf["sasl.password"] == "hunter2" and conf["sasl.mechanism"] == "SCRAM-SHA-512"


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[kafka\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_config_reference_is_current():
    assert DOCS.read_text() == config_docs() + "\n", "docs/config.md is stale: run `make docs`"


def test_every_option_is_documented():
    from gpusentry.config import Config

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            sub = getattr(field.annotation, "model_fields", None)
            if sub is not None:
                walk(field.annotation)

    walk(Config)


# ------------------------------------------------------------------ each command validates what it uses


def test_a_command_runs_with_a_section_it_does_not_use_invalid_and_learns_it_if_it_reads_it_after_all():
    from gpusentry.config import UnusedInvalidSection, load_config_for

    env = {"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",  # no url nor secret: the forwarder would refuse it
           "GPUSENTRY_AGENT__INTERVL_S": "5", "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "k1:9092"}
    cfg, unused = load_config_for(("logging", "kafka", "worker"), environ=env)
    assert cfg.kafka.bootstrap_servers == "k1:9092" and cfg.worker.app_id  # what it uses is as configured
    assert cfg.detection.resolve_after_s > 0  # a valid section it does not use is there too
    assert sorted(unused) == ["agent", "outputs"]
    assert "'agent.intervl_s' (from GPUSENTRY_AGENT__INTERVL_S): did you mean 'interval_s'?" in unused["agent"]
    assert isinstance(cfg.outputs, UnusedInvalidSection)
    with pytest.raises(ConfigError, match=r"(?s)\[outputs\] is used by this command after all.*webhook needs url"):
        cfg.outputs.webhook  # noqa: B018 - reading it is the test
    import copy
    import pickle

    copy.copy(cfg.outputs), pickle.dumps(cfg.kafka)  # the stand-in does not break copying or pickling


def test_a_problem_in_a_used_section_or_an_unknown_section_still_stops_the_command():
    from gpusentry.config import load_config_for

    env = {"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_WORKER__CHECKPOINT_INTERVAL_S": "soon",
           "GPUSENTRY_WORKR__X": "1"}
    with pytest.raises(ConfigError) as err:
        load_config_for(("logging", "kafka", "worker"), environ=env)
    text = str(err.value)
    assert "worker.checkpoint_interval_s" in text and "unknown key 'workr'" in text
    assert "webhook" not in text  # not this command's problem
    with pytest.raises(ConfigError, match="webhook needs url"):
        load_config_for(None, environ={"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true"})  # all sections: config check
    with pytest.raises(ValueError, match="not config sections"):
        load_config_for(("outptus",), environ={"GPUSENTRY_AGENT__X": "1"})


@pytest.mark.parametrize(("env", "code", "said"), [
    ({"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_AGENT__NOPE": "1", "GPUSENTRY_FEEDBACK__NOPE": "1",
      "GPUSENTRY_WORKER__NOPE": "1"}, 0, "[agent] is invalid; this command does not use it"),
    ({"GPUSENTRY_DETECTION__NOPE": "1"}, 2, "unknown key 'detection.nope'"),
    ({"GPUSENTRY_CONTRACT__MAX_FUTURE_SKEW_S": "soon"}, 2, "contract.max_future_skew_s"),
])
def test_replay_validates_only_detection_contract_and_logging(tmp_path, env, code, said):
    import os
    import subprocess
    import sys

    import orjson

    from detectors.examples import proc

    events = tmp_path / "events.jsonl"
    events.write_bytes(orjson.dumps(proc("/tmp/x/xmrig -o stratum+tcp://pool.example.net:3333 -u 4AbC")) + b"\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "replay", str(events)], capture_output=True, text=True,
                       env={**base, **env}, cwd=tmp_path, timeout=120)
    assert r.returncode == code, r.stderr
    assert said in r.stderr
    if code == 0:
        assert orjson.loads(r.stdout.splitlines()[0])["gpusentry"]["alert"]["severity"] in ("high", "critical")


def test_the_agent_runs_with_the_worker_and_outputs_sections_invalid(tmp_path):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    bad = {"GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true", "GPUSENTRY_WORKER__NOPE": "1",
           "GPUSENTRY_DETECTION__GPU__NOPE": "1", "GPUSENTRY_AGENT__COLLECTORS": '["process"]',
           "GPUSENTRY_AGENT__PROCESS_SOURCE": "poll"}
    out = tmp_path / "events.jsonl"
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "agent", "--once", "--output", f"jsonl:{out}"],
                       capture_output=True, text=True, env={**base, **bad}, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0 and "[outputs] is invalid" in r.stderr and "[detection] is invalid" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "agent", "--once", "--output", f"jsonl:{out}"],
                       capture_output=True, text=True, env={**base, **bad, "GPUSENTRY_AGENT__INTERVAL_S": "-1"},
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "agent.interval_s" in r.stderr, r.stderr
