"""Build the enabled outputs from the configuration."""

from __future__ import annotations

from gpusentry.config import Config
from gpusentry.settings.outputs import ConfigSecretError
from outputs.base import Clock, Output

OUTPUT_NAMES = ("kafka", "syslog", "hec", "slack", "pagerduty", "webhook")


class OutputConfigError(ValueError):
    """An enabled output cannot be built (missing secret, unreadable secret file)."""


def build_outputs(cfg: Config, *, clock: Clock | None = None, only: list[str] | None = None) -> list[Output]:
    """One output per enabled ``[outputs.<name>]`` section (or the ``only`` ones, enabled or not)."""
    from outputs.hec import HecOutput
    from outputs.kafka import KafkaOutput
    from outputs.pagerduty import PagerDutyOutput
    from outputs.slack import SlackOutput
    from outputs.syslog import SyslogOutput
    from outputs.webhook import WebhookOutput

    o = cfg.outputs
    wanted = only if only is not None else [n for n in OUTPUT_NAMES if getattr(o, n).enabled]
    unknown = [n for n in wanted if n not in OUTPUT_NAMES]
    if unknown:
        raise OutputConfigError(f"unknown output {unknown[0]!r}; known: {', '.join(OUTPUT_NAMES)}")
    outputs: list[Output] = []
    try:
        for name in wanted:
            if name == "kafka":
                outputs.append(KafkaOutput(o.kafka, cfg.kafka))
            elif name == "syslog":
                outputs.append(SyslogOutput(o.syslog, clock=clock))
            elif name == "hec":
                outputs.append(HecOutput(o.hec, clock=clock))
            elif name == "slack":
                outputs.append(SlackOutput(o.slack, clock=clock))
            elif name == "pagerduty":
                outputs.append(PagerDutyOutput(o.pagerduty, clock=clock))
            elif name == "webhook":
                outputs.append(WebhookOutput(o.webhook, clock=clock))
    except (ConfigSecretError, ValueError) as exc:
        raise OutputConfigError(str(exc)) from None
    return outputs


def enabled_output_names(cfg: Config) -> list[str]:
    """Names of the enabled outputs (e.g. for `gpusentry up` to decide whether to start `gpusentry forward`)."""
    return [n for n in OUTPUT_NAMES if getattr(cfg.outputs, n).enabled]
