"""Watching gpusentry itself: the Prometheus alert rules and the Grafana dashboard in deploy/.

Real tools check them: promtool (Debian's `prometheus` package) checks the rules, runs their unit tests
(deploy/prometheus/gpusentry-rules.test.yml: each alert fires on the series that should raise it) and parses every
dashboard query. Both may name only metrics gpusentry exports: a renamed metric would otherwise leave an alert
that can never fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "gpusentry-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "gpusentry-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "gpusentry-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: apt-get install prometheus "
                                                             "(listed in tests/debian-packages.txt)")
pytestmark = pytest.mark.deploy
# Series Prometheus makes itself, not gpusentry.
PROMETHEUS_OWN = {"up"}


def exported_names() -> set[str]:
    """Every series name gpusentry's agent, worker and forwarder expose (with the suffixes the exposition adds)."""
    from prometheus_client import REGISTRY

    import outputs.dispatcher  # noqa: F401  (its metrics live in the default registry)
    from agents.metrics import AgentMetrics
    from streams.metrics import WorkerMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    names = set()
    for registry in (AgentMetrics().registry, WorkerMetrics().registry, REGISTRY):
        for family in registry.collect():
            if family.name.startswith("gpusentry_"):
                names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def queries() -> dict[str, str]:
    """Every PromQL expression in the rules and the dashboard, by where it is."""
    out = {f"rule {r['alert']}": r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            out[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return out


def test_every_query_names_only_metrics_gpusentry_exports():
    exported = exported_names()
    assert {"gpusentry_worker_consumer_lag", "gpusentry_agent_spool_messages", "gpusentry_output_dead_letters_total",
            "gpusentry_worker_event_delay_seconds_bucket"} <= exported, "the collection must see all three components"
    unknown = {}
    for where, expr in queries().items():
        names = set(re.findall(r"\b(gpusentry_[a-z0-9_]+)", expr))
        assert names or re.search(r"\bup\b", expr), f"{where} names no metric"
        missing = names - exported
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"queries name metrics nothing exports: {unknown}"


def test_the_rules_cover_what_an_operator_must_hear_about():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for needed in ("GpusentryWorkerLagging", "GpusentryWorkerDeadLetters", "GpusentryOutputDeadLetters",
                   "GpusentryOutputFailing", "GpusentryAgentDown", "GpusentryCheckpointsStalled",
                   "GpusentryFeedbackRejected"):
        assert needed in alerts
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@needs_promtool
def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60,
                          cwd=RULE_TESTS.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr


@needs_promtool
def test_the_rule_unit_tests_fail_when_an_alert_would_not_fire(tmp_path):
    """The unit tests are not vacuous: delay the agent-down alert past its test's evaluation and they fail."""
    for f in (RULES, RULE_TESTS):
        (tmp_path / f.name).write_text(f.read_text())
    rules = tmp_path / RULES.name
    text = rules.read_text()
    head, _, tail = text.partition("alert: GpusentryAgentDown")
    rules.write_text(head + "alert: GpusentryAgentDown" + tail.replace("for: 5m", "for: 30m", 1))
    unit = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert unit.returncode != 0 and "GpusentryAgentDown" in unit.stdout + unit.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (a typo would show as an empty panel, never an error)."""
    panels = {k: v for k, v in queries().items() if k.startswith("panel ")}
    records = [{"record": f"gpusentry:dashboard_query_{i}", "expr": expr} for i, expr in enumerate(panels.values())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_is_well_formed_and_current():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "grafana_dashboard.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
