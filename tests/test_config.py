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
