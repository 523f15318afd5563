"""Write deploy/grafana/gpusentry-dashboard.json: gpusentry's fleet view and its own health, for Grafana.

    python scripts/grafana_dashboard.py [--check]

The panels are listed below as (title, panel type, unit, [(PromQL, legend)], description); tests/test_monitoring.py
checks that every query parses (promtool) and names only metrics gpusentry exports, and that the file is current
(``--check`` exits 1 when it is not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "gpusentry-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

PANELS = [
    ("Fleet GPUs seen by the agents", "timeseries", "short",
     [("sum by (state) (gpusentry_agent_gpus)", "{{state}}")],
     "GPUs and MIG instances the agents see over NVML; `lost` ones vanished from NVML while the agent ran."),
    ("Agents answering", "stat", "short",
     [('count(up{job="gpusentry-agent"} == 1)', "up"), ('count(up{job="gpusentry-agent"} == 0)', "down")],
     "Agents Prometheus can scrape. A GPU node whose agent is down is unwatched (GpusentryAgentDown)."),
    ("Incidents opened, by severity", "timeseries", "short",
     [('sum by (severity) (increase(gpusentry_worker_alerts_total{status="open"}[1h]))', "{{severity}}")],
     "New incidents per hour (each incident once, whatever its rules)."),
    ("Incident updates by rule (top 10)", "timeseries", "short",
     [("topk(10, sum by (rule) (increase(gpusentry_worker_alert_rules_total[1h])))", "{{rule}}")],
     "Which detectors drive the incidents: an update of three rules counts once for each."),
    ("Consumer lag", "timeseries", "short",
     [("sum by (topic) (gpusentry_worker_consumer_lag)", "{{topic}}")],
     "Messages behind the high watermark, per event topic: detection is this far behind (GpusentryWorkerLagging)."),
    ("Events processed per second", "timeseries", "ops",
     [("sum by (topic) (rate(gpusentry_worker_events_total[5m]))", "{{topic}}")],
     "Events through the detection engine, per event topic."),
    ("Event delay, p50 and p99", "timeseries", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(gpusentry_worker_event_delay_seconds_bucket[5m])))", "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(gpusentry_worker_event_delay_seconds_bucket[5m])))", "p99")],
     "Wall time at processing minus the event's @timestamp: how late detection runs."),
    ("Dead letters, by reason", "timeseries", "short",
     [("sum by (reason) (increase(gpusentry_worker_deadletters_total[1h]))", "{{reason}}")],
     "Events refused or failed, per hour; `gpusentry deadletters list` shows them."),
    ("Alert delivery, per output", "timeseries", "ops",
     [("sum by (output) (rate(gpusentry_output_delivered_total[5m]))", "delivered {{output}}"),
      ("sum by (output) (rate(gpusentry_output_attempt_failures_total[5m]))", "failed attempts {{output}}")],
     "What the forwarder delivered to each SIEM, chat and paging output, and the attempts that failed."),
    ("Output dead letters and open breakers", "timeseries", "short",
     [("sum by (output) (increase(gpusentry_output_dead_letters_total[1h]))", "dead letters {{output}}"),
      ("max by (output) (gpusentry_output_breaker_open)", "breaker open {{output}}")],
     "Alerts given up on after every retry (GpusentryOutputDeadLetters), and outputs paused by their breaker."),
    ("Agent spools", "timeseries", "short",
     [("max by (instance) (gpusentry_agent_spool_messages)", "{{instance}}")],
     "Messages an agent keeps on disk because Kafka did not confirm them: a growing spool means no broker."),
    ("Agent errors", "timeseries", "short",
     [("sum by (instance, collector) (increase(gpusentry_agent_collector_errors_total[1h]))",
       "collector {{collector}} {{instance}}"),
      ("sum by (instance) (increase(gpusentry_agent_delivery_failures_total[1h]))", "delivery {{instance}}"),
      ("sum by (instance) (increase(gpusentry_agent_spool_dropped_messages_total[1h]))", "spool dropped {{instance}}")],
     "Collector failures, failed deliveries and events dropped from a full spool, per hour."),
    ("Checkpoints", "timeseries", "s",
     [("histogram_quantile(0.99, sum by (le) (rate(gpusentry_worker_checkpoint_seconds_bucket[15m])))", "p99 write"),
      ("sum(increase(gpusentry_worker_checkpoints_too_large_total[1h]))", "too large")],
     "Time to write a partition checkpoint (processing waits for it) and checkpoints refused for their size."),
    ("Refused analyst verdicts", "stat", "short",
     [("sum(increase(gpusentry_worker_feedback_rejected_total[24h]))", "refused")],
     "Verdicts that were unsigned or badly signed in the last day: attempts to suppress incidents without the key."),
]


def dashboard() -> dict:
    panels = []
    for i, (title, kind, unit, targets, description) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {},
            "targets": [{"refId": chr(65 + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "gpusentry", "uid": "gpusentry-health", "editable": True, "schemaVersion": 39, "version": 1,
        "tags": ["gpusentry"], "time": {"from": "now-24h", "to": "now"}, "refresh": "1m",
        "description": "gpusentry's fleet view and its own health: GPUs, incidents, lag, dead letters, deliveries, "
                       "agents. Generated by scripts/grafana_dashboard.py.",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed file is not what this writes")
    args = ap.parse_args()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != render():
            print(f"{OUT} is out of date: run python scripts/grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    print(f"wrote {OUT} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
