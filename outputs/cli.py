"""The bodies of `gpusentry forward` and `gpusentry outputs test` (the CLI module only parses options)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from gpusentry.config import Config
from gpusentry.timefmt import format_timestamp
from outputs.base import Output
from outputs.dispatcher import Dispatcher, MemoryDeadLetterSink
from outputs.forwarder import BrokerUnreachable, ForwarderError, ForwardSummary, deliver_alerts, forward
from outputs.registry import OutputConfigError, build_outputs
from outputs.sample import sample_incident

console_log = logging.getLogger("outputs.forward")


class CommandError(RuntimeError):
    """Failure the CLI reports with an exit code: ``code`` 1 ran and failed, 2 bad configuration."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def run_forward(cfg: Config) -> ForwardSummary:
    """`gpusentry forward`: until SIGINT/SIGTERM, then drain and commit."""

    if cfg.outputs.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.outputs.metrics_port, addr=cfg.outputs.metrics_host)
        console_log.info("metrics on http://%s:%d/metrics", cfg.outputs.metrics_host, cfg.outputs.metrics_port)

    async def main() -> ForwardSummary:
        stop = asyncio.Event()
        stopped_by: list[str] = []
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            stopped_by.append(sig.name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        summary = await forward(cfg, stop)
        summary.stopped_by = stopped_by[0] if stopped_by else None
        return summary

    try:
        return asyncio.run(main())
    except BrokerUnreachable as exc:
        raise CommandError(str(exc), 1) from None
    except (ForwarderError, OutputConfigError) as exc:
        raise CommandError(str(exc), 2) from None


def replay_and_deliver(files: list[Path], cfg: Config, *, out: Path | None, console: Console,
                       **replay_options: Any) -> tuple[Any, int]:
    """`gpusentry replay --deliver`: replay, write the alerts as usual, then send them to the enabled outputs.

    Returns the replay summary and how many deliveries failed (their dead letters are printed as JSONL
    on stderr, since a replay need not have a Kafka cluster to put them on).
    """
    from gpusentry.replay import run_replay

    try:
        build_outputs(cfg)  # fail on a bad output setup before the (possibly long) replay
    except OutputConfigError as exc:
        raise CommandError(str(exc), 2) from None
    with tempfile.TemporaryDirectory(prefix="gpusentry-replay-") as tmp:
        target = out or Path(tmp) / "alerts.jsonl"
        summary = run_replay(files, cfg, out=target, progress_console=console, **replay_options)
        data = target.read_bytes()
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    alerts = [orjson.loads(line) for line in data.splitlines() if line.strip()]
    delivered, dead = deliver_alerts(cfg, alerts)
    console.print(delivered.describe().replace("forward:", "deliver:"), highlight=False)
    for record in dead:
        console.print(orjson.dumps(record).decode(), highlight=False, markup=False, soft_wrap=True)
    return summary, len(dead)


@dataclass
class TestResult:
    output: str
    step: str
    ok: bool
    detail: str


async def _test_outputs(outputs: list[Output], resolve: bool) -> list[TestResult]:
    # The sample carries the current time, so receivers file it now, not in the past (or the future).
    now = time.time()
    open_alert, resolved_alert = sample_incident(test_marker=True, t0=now)
    for sample in (open_alert, resolved_alert):
        sample["@timestamp"] = sample["event"]["created"] = format_timestamp(now)
    sink = MemoryDeadLetterSink()
    dispatcher = await Dispatcher(outputs, sink).start()
    results: list[TestResult] = []
    try:
        steps = [("open", open_alert)] + ([("resolve", resolved_alert)] if resolve else [])
        for step, alert in steps:
            for outcome in await dispatcher.deliver(alert):
                results.append(TestResult(outcome.output, step, outcome.delivered, outcome.describe()))
    finally:
        await dispatcher.close()
    return results


def test_outputs(cfg: Config, *, only: list[str] | None, resolve: bool, attempts: int,
                 console: Console) -> list[TestResult]:
    """Send a sample incident (and its resolution) to every enabled output; print and return each result."""
    try:
        outputs = build_outputs(cfg, only=only or None)
    except OutputConfigError as exc:
        raise CommandError(str(exc), 2) from None
    if not outputs:
        raise CommandError("no output is enabled: set outputs.<name>.enabled = true in the config file", 2)
    for out in outputs:
        # A quick verdict for the operator: few attempts, no long Retry-After waits.
        out.policy = out.policy.model_copy(update={"max_attempts": attempts, "max_retry_after_s": 5.0, "breaker_failures": 0,
                                                   "min_severity": "low", "statuses": ["open", "resolved"],
                                                   "hosts": [], "exclude_hosts": [], "rules": []})
    console.print(f"sending a sample incident to {', '.join(o.name for o in outputs)} ...")
    results = asyncio.run(_test_outputs(outputs, resolve))
    table = Table("output", "step", "result")
    for r in results:
        table.add_row(r.output, r.step, ("[green]" if r.ok else "[red]") + r.detail)
    console.print(table)
    return results
