"""Kafka connection, security and topic names: shared by the agent, the worker and the forwarder."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from gpusentry.settings.base import Section


class KafkaSettings(Section):
    bootstrap_servers: str = Field(
        "", description="Comma-separated `host:port` list of Kafka brokers. Empty means: start the embedded "
        "broker (`gpusentry up` only).")
    client_id: str = Field("gpusentry", description="Client id sent to the brokers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when `security_protocol` is `SASL_*`.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (secret: prefer `GPUSENTRY_KAFKA__SASL_PASSWORD`).")
    ssl_cafile: str | None = Field(None, description="CA bundle (PEM) that signs the brokers' certificates.")
    ssl_certfile: str | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: str | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    exact_high_watermark: bool = Field(
        False, description="Trust the broker's reported end of a partition when reading a topic to its end "
        "(checkpoints, alerts, reports). True is right for Apache Kafka and saves a confirming 250 ms poll per "
        "read (twice per partition a worker restores); the default re-checks, because some brokers (Tansu) report "
        "an end short of a multi-record batch.")
    partitions: int = Field(
        6, ge=1, description="Partitions given to topics gpusentry creates itself (the embedded broker and "
        "`--create-topics`). More partitions allow more workers.")

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username
                                                                and self.sasl_password):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username and "
                "sasl_password (set the password with GPUSENTRY_KAFKA__SASL_PASSWORD)")
        return self

    def confluent_config(self) -> dict[str, Any]:
        """librdkafka settings (confluent-kafka producers, consumers and admin clients)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, "client.id": self.client_id,
                                "security.protocol": self.security_protocol,
                                # librdkafka's lines through Python logging (rate-limited by gpusentry.logs)
                                # instead of straight to stderr, where a broker away printed one per retry.
                                "logger": logging.getLogger("librdkafka")}
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for ours, theirs in (("ssl_cafile", "ssl.ca.location"), ("ssl_certfile", "ssl.certificate.location"),
                             ("ssl_keyfile", "ssl.key.location")):
            if getattr(self, ours):
                conf[theirs] = getattr(self, ours)
        return conf

    def aiokafka_config(self) -> dict[str, Any]:
        """aiokafka / faust broker credentials, built from the same settings."""
        conf: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            conf["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                                     keyfile=self.ssl_keyfile)
        if self.sasl_mechanism:
            conf["sasl_mechanism"] = self.sasl_mechanism
            conf["sasl_plain_username"] = self.sasl_username
            conf["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return conf


class TopicSettings(Section):
    gpu: str = Field("gpusentry.gpu", description="GPU samples (`gpusentry.gpu` events).")
    process: str = Field("gpusentry.process", description="Process start/end events.")
    network: str = Field("gpusentry.network", description="New outbound flows.")
    dns: str = Field("gpusentry.dns", description="DNS answers.")
    alerts: str = Field("gpusentry.alerts", description="Incidents raised by the workers.")
    deadletter: str = Field("gpusentry.deadletter", description="Rejected messages and failed deliveries.")
    feedback: str = Field("gpusentry.feedback", description="Analyst verdicts (suppressions).")

    def event_topics(self) -> dict[str, str]:
        """Dataset name to topic, for the four event datasets."""
        return {"gpusentry.gpu": self.gpu, "gpusentry.process": self.process,
                "gpusentry.network": self.network, "gpusentry.dns": self.dns}

    def all(self) -> list[str]:
        return [self.gpu, self.process, self.network, self.dns, self.alerts, self.deadletter, self.feedback]
