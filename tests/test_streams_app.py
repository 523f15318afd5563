"""The faust app's wiring without a broker: security from the shared [kafka] settings, web off,
the low-latency transport, explicit registration of the agent."""

from __future__ import annotations

import faust
import pytest
from faust.transport.drivers import by_url

from gpusentry.config import load_config
from streams import app as streams_app
from streams.app import LowLatencyTransport, broker_credentials, build_app


def cfg(**env: str):
    return load_config(None, environ={"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092", **env})


def test_sasl_credentials_come_from_the_shared_kafka_settings():
    creds = broker_credentials(cfg(GPUSENTRY_KAFKA__SECURITY_PROTOCOL="SASL_PLAINTEXT",
                                   GPUSENTRY_KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
                                   GPUSENTRY_KAFKA__SASL_USERNAME="worker",
                                   GPUSENTRY_KAFKA__SASL_PASSWORD="s3cret"))
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "worker" and creds.password == "s3cret"
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.protocol.value == "SASL_PLAINTEXT"
    assert "s3cret" not in repr(creds)
    assert broker_credentials(cfg()) is None


def test_tls_credentials_use_an_ssl_context(monkeypatch):
    import ssl

    ctx = ssl.create_default_context()
    c = cfg(GPUSENTRY_KAFKA__SECURITY_PROTOCOL="SSL")
    monkeypatch.setattr(type(c.kafka), "aiokafka_config",
                        lambda self: {"security_protocol": "SSL", "ssl_context": ctx})
    creds = broker_credentials(c)
    assert isinstance(creds, faust.SSLCredentials) and creds.context is ctx


def test_app_is_built_with_web_off_low_fetch_wait_and_explicit_agents():
    wa = build_app(cfg(GPUSENTRY_WORKER__FETCH_MAX_WAIT_MS="80"))
    conf = wa.app.conf
    assert conf.web_enabled is False and conf.web_bind == "127.0.0.1"
    assert conf.stream_wait_empty is False
    assert [str(u) for u in conf.broker] == ["gpusentry-kafka://k1:9092", "gpusentry-kafka://k2:9092"]
    assert by_url("gpusentry-kafka://k1:9092") is LowLatencyTransport
    assert streams_app._fetch_max_wait_ms == 80
    assert set(wa.app.agents) == {"gpusentry.detect"}
    assert wa.pipeline.topics.events == ("gpusentry.gpu", "gpusentry.process", "gpusentry.network", "gpusentry.dns")


def test_a_worker_without_brokers_is_told_what_to_set():
    with pytest.raises(ValueError, match="GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS"):
        build_app(load_config(None, environ={}))
