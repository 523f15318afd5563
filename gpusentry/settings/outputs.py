"""Alert destinations (SIEMs, chat, paging) and their delivery policy.

One section per destination (``[outputs.slack]``, ``[outputs.pagerduty]``, ...).  Each carries the
same routing and delivery policy fields (:class:`DeliveryPolicy`) with defaults that suit that
service, plus its own connection options.  Secrets are :class:`~pydantic.SecretStr` (masked in
reprs, ``config show`` and logs) and can come from the environment
(``GPUSENTRY_OUTPUTS__SLACK__WEBHOOK_URL``) or from a file (``webhook_url_file``), never the config file.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from gpusentry.settings.base import Section

Severity = Literal["low", "medium", "high", "critical"]
Status = Literal["open", "resolved"]
STATUSES: tuple[Status, ...] = ("open", "resolved")


class ConfigSecretError(ValueError):
    """A secret is neither set nor readable from its file."""


def read_secret(value: SecretStr | None, file: Path | None, key: str) -> str | None:
    """The secret from the environment/config value, else from ``*_file``; ``None`` when neither is set."""
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigSecretError(f"{key}_file {file} cannot be read ({exc.strerror}); fix the path or "
                                    f"set the secret with its environment variable") from None
        if not text:
            raise ConfigSecretError(f"{key}_file {file} is empty")
        return text
    return None


class DeliveryPolicy(Section):
    """Routing and delivery policy shared by every output."""

    enabled: bool = Field(False, description="Send alerts to this output.")
    min_severity: Severity = Field("low", description="Alerts below this severity are not sent here.")
    statuses: list[Status] = Field(default_factory=lambda: list(STATUSES),
                                   description="Incident states sent here (`open` updates, `resolved`).")
    hosts: list[str] = Field(default_factory=list,
                             description="Only alerts whose `host.name` matches one of these globs (empty: all).")
    exclude_hosts: list[str] = Field(default_factory=list,
                                     description="Never alerts whose `host.name` matches one of these globs.")
    rules: list[str] = Field(default_factory=list,
                             description="Only alerts with a `rule.id` or contributing rule "
                             "(`gpusentry.alert.rules`) matching one of these globs (empty: all).")
    rate_per_s: float = Field(0.0, ge=0, description="Most requests per second to this output (0: unlimited).")
    burst: int = Field(1, ge=1, description="Requests allowed back to back before `rate_per_s` applies.")
    timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout of one attempt (connect + send + answer).")
    max_attempts: int = Field(0, ge=0, le=1000,
                              description="Attempts per alert before a retryable failure goes to the dead-letter "
                              "topic (0: no limit; `max_age_s` decides).")
    max_age_s: float = Field(
        3600.0, ge=0, description="How long an alert may wait for a retryable outage (errors, timeouts, an open "
        "breaker) to end before it goes to the dead-letter topic (0: for ever).")
    backoff_initial_s: float = Field(0.5, gt=0, description="Wait before the first retry (doubles each retry).")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between retries.")
    max_retry_after_s: float = Field(
        300.0, gt=0, description="Longest `Retry-After` honoured; a longer one is cut to this.")
    breaker_failures: int = Field(
        5, ge=0, description="Consecutive failed attempts that open the circuit breaker (0: never). While "
        "open, nothing is sent to the output and its alerts wait; it half-opens after `breaker_reset_s`.")
    breaker_reset_s: float = Field(30.0, gt=0,
                                   description="Seconds the breaker stays open before one trial request.")
    queue_size: int = Field(1000, ge=1, description="Alerts waiting for this output before intake pauses.")


class KafkaOutputSettings(DeliveryPolicy):
    """The alert as ECS JSON on a Kafka topic, for downstream consumers."""

    topic: str = Field("gpusentry.incidents", description="Topic the alerts are written to (key: dedup key).")
    bootstrap_servers: str = Field(
        "", description="Brokers of the target cluster; empty: the `[kafka]` cluster and its security settings.")


class SyslogOutputSettings(DeliveryPolicy):
    """RFC 5424 syslog to a SIEM: UDP (RFC 5426), TCP with octet counting (RFC 6587) or TLS (RFC 5425)."""

    host: str = Field("127.0.0.1", description="Syslog receiver host.")
    port: int | None = Field(None, ge=1, le=65535, description="Receiver port; default 514 (udp, tcp) or 6514 (tls).")
    transport: Literal["udp", "tcp", "tls"] = Field("tcp", description="`tls` is RFC 5425 (octet counting over TLS).")
    format: Literal["cef", "leef", "json"] = Field("cef", description="Message body: ArcSight CEF, QRadar LEEF 2.0 "
                                                    "or the alert as JSON.")
    facility: int = Field(13, ge=0, le=23, description="Syslog facility number (13: log audit, 4: auth, "
                          "16-23: local0-local7).")
    app_name: str = Field("gpusentry", max_length=48, description="RFC 5424 APP-NAME.")
    hostname: str = Field(default_factory=socket.gethostname, description="RFC 5424 HOSTNAME of the sender; "
                          "default: this machine's hostname.")
    leef_delimiter: str = Field("^", min_length=1, max_length=1, description="LEEF 2.0 attribute delimiter "
                                "(declared in the header).")
    max_message_bytes: int = Field(8192, ge=480, le=65000, description="Longest message; longer ones are cut "
                                   "(UDP datagrams and receivers' limits).")
    tls_ca_file: Path | None = Field(None, description="CA bundle (PEM) that signs the receiver's certificate; "
                                     "default: the system store.")
    tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key_file: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    tls_server_name: str | None = Field(None, description="Name expected in the receiver's certificate; "
                                        "default: `host`.")

    @property
    def effective_port(self) -> int:
        return self.port or (6514 if self.transport == "tls" else 514)


class HecOutputSettings(DeliveryPolicy):
    """Splunk HTTP Event Collector."""

    url: str = Field("https://127.0.0.1:8088", description="HEC base URL (`/services/collector/event` is added).")
    token: SecretStr | None = Field(None, description="HEC token (secret: `GPUSENTRY_OUTPUTS__HEC__TOKEN`).")
    token_file: Path | None = Field(None, description="File holding the HEC token.")
    index: str | None = Field(None, description="Target index; default: the token's default index.")
    source: str = Field("gpusentry", description="Splunk `source` of the events.")
    sourcetype: str = Field("gpusentry:alert", description="Splunk `sourcetype` of the events.")
    batch_max_events: int = Field(100, ge=1, le=10000, description="Events per request (sent back to back).")
    batch_max_bytes: int = Field(800_000, ge=1024, description="Largest request body (HEC default limit is 1 MB).")
    batch_linger_s: float = Field(0.2, ge=0, description="How long a partial batch waits for more alerts.")
    ack: bool = Field(False, description="Use indexer acknowledgement: wait until Splunk confirms each batch.")
    channel: str | None = Field(None, description="Request channel GUID for acknowledgement; default: random.")
    ack_timeout_s: float = Field(30.0, gt=0, description="How long to wait for an acknowledgement.")
    verify_tls: bool = Field(True, description="Check the HEC server's certificate.")
    ca_file: Path | None = Field(None, description="CA bundle (PEM) for the HEC server.")


class SlackOutputSettings(DeliveryPolicy):
    """Slack: an incoming webhook, or a bot token (chat.postMessage) that threads incident updates."""

    rate_per_s: float = Field(1.0, ge=0, description="Slack allows 1 message per second per webhook/channel.")
    mode: Literal["webhook", "bot"] = Field(
        "webhook", description="`webhook`: incoming webhook (cannot thread: each update is a new message). "
        "`bot`: chat.postMessage with a bot token; updates reply in the incident's thread.")
    webhook_url: SecretStr | None = Field(None, description="Incoming webhook URL (secret: "
                                          "`GPUSENTRY_OUTPUTS__SLACK__WEBHOOK_URL`).")
    webhook_url_file: Path | None = Field(None, description="File holding the webhook URL.")
    bot_token: SecretStr | None = Field(None, description="Bot token `xoxb-...` (secret: "
                                        "`GPUSENTRY_OUTPUTS__SLACK__BOT_TOKEN`).")
    bot_token_file: Path | None = Field(None, description="File holding the bot token.")
    channel: str | None = Field(None, description="Channel id for `bot` mode.")
    api_url: str = Field("https://slack.com/api", description="Slack Web API base URL (`bot` mode).")
    broadcast_resolved: bool = Field(True, description="`bot` mode: also show the resolve reply in the channel.")
    update_interval_s: float = Field(
        300.0, ge=0, description="`webhook` mode: at most one message per incident per this many seconds. An update "
        "sooner than that is folded into the incident's next message (every message carries the incident's whole "
        "state: severity, rules, evidence, cost); its opening and its resolution always go out. 0: every update. "
        "(`bot` mode threads updates instead.)")


class PagerDutyOutputSettings(DeliveryPolicy):
    """PagerDuty Events API v2: one PagerDuty incident per gpusentry incident (dedup key)."""

    rate_per_s: float = Field(2.0, ge=0, description="PagerDuty accepts about 120 events per minute per "
                              "integration key.")
    burst: int = Field(10, ge=1, description="Events allowed back to back before `rate_per_s` applies.")
    routing_key: SecretStr | None = Field(None, description="Integration (routing) key (secret: "
                                          "`GPUSENTRY_OUTPUTS__PAGERDUTY__ROUTING_KEY`).")
    routing_key_file: Path | None = Field(None, description="File holding the routing key.")
    url: str = Field("https://events.pagerduty.com/v2/enqueue", description="Events API endpoint "
                     "(EU service region: https://events.eu.pagerduty.com/v2/enqueue).")
    link_url: str | None = Field(None, description="Link added to each event; `{dedup_key}` and `{host}` "
                                 "are filled in (e.g. your SIEM search).")
    link_text: str = Field("Incident in the SIEM", description="Text of `link_url`.")


class WebhookOutputSettings(DeliveryPolicy):
    """Generic webhook: the alert JSON, signed with HMAC-SHA256 over timestamp and body."""

    url: str | None = Field(None, description="Receiver URL.")
    secret: SecretStr | None = Field(None, description="HMAC key (secret: `GPUSENTRY_OUTPUTS__WEBHOOK__SECRET`).")
    secret_file: Path | None = Field(None, description="File holding the HMAC key.")
    signature_header: str = Field("X-Gpusentry-Signature", description="Header carrying `v1=<hex HMAC>` of "
                                  "`<timestamp>.<body>`.")
    timestamp_header: str = Field("X-Gpusentry-Timestamp", description="Header carrying the signing time "
                                  "(epoch seconds); receivers reject old ones to stop replays.")


class OutputSettings(Section):
    group_id: str = Field("gpusentry-forwarder", description="Consumer group of `gpusentry forward` on the "
                          "alerts topic; forwarders with the same id share the partitions.")
    start_from: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new forwarder group starts on the alerts topic.")
    seed: int | None = Field(None, description="Seed of the retry jitter (tests); default: random.")
    metrics_port: int = Field(0, ge=0, le=65535, description="`gpusentry forward` serves Prometheus metrics "
                              "(deliveries, failed attempts, dead letters, breaker state per output) at this port; "
                              "0 turns them off.")
    metrics_host: str = Field("127.0.0.1", description="Address the forwarder's metrics endpoint binds to.")
    kafka: KafkaOutputSettings = Field(default_factory=KafkaOutputSettings, description="Kafka topic output.")
    syslog: SyslogOutputSettings = Field(default_factory=SyslogOutputSettings, description="Syslog output.")
    hec: HecOutputSettings = Field(default_factory=HecOutputSettings, description="Splunk HEC output.")
    slack: SlackOutputSettings = Field(default_factory=SlackOutputSettings, description="Slack output.")
    pagerduty: PagerDutyOutputSettings = Field(default_factory=PagerDutyOutputSettings,
                                               description="PagerDuty output.")
    webhook: WebhookOutputSettings = Field(default_factory=WebhookOutputSettings, description="Webhook output.")

    @model_validator(mode="after")
    def _enabled_outputs_are_complete(self) -> OutputSettings:
        problems = []
        if self.slack.enabled:
            if self.slack.mode == "webhook" and not (self.slack.webhook_url or self.slack.webhook_url_file):
                problems.append("outputs.slack needs webhook_url (GPUSENTRY_OUTPUTS__SLACK__WEBHOOK_URL) "
                                "or webhook_url_file")
            if self.slack.mode == "bot" and not ((self.slack.bot_token or self.slack.bot_token_file)
                                                 and self.slack.channel):
                problems.append("outputs.slack mode=bot needs bot_token (GPUSENTRY_OUTPUTS__SLACK__BOT_TOKEN) "
                                "or bot_token_file, and channel")
        if self.pagerduty.enabled and not (self.pagerduty.routing_key or self.pagerduty.routing_key_file):
            problems.append("outputs.pagerduty needs routing_key (GPUSENTRY_OUTPUTS__PAGERDUTY__ROUTING_KEY) "
                            "or routing_key_file")
        if self.hec.enabled and not (self.hec.token or self.hec.token_file):
            problems.append("outputs.hec needs token (GPUSENTRY_OUTPUTS__HEC__TOKEN) or token_file")
        if self.webhook.enabled and not (self.webhook.url and (self.webhook.secret or self.webhook.secret_file)):
            problems.append("outputs.webhook needs url and secret (GPUSENTRY_OUTPUTS__WEBHOOK__SECRET) "
                            "or secret_file")
        if problems:
            raise ValueError("; ".join(problems))
        return self
