"""`gpusentry report`: the ledger from incidents, grouped, reproducible, self-contained, seen in a browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from gpusentry.report import group, incident_rows, load_files, load_verdicts, render
from tests.outputs_helpers import alert

REPO = Path(__file__).resolve().parent.parent


def incident(i: int, *, host: str = "gpu-node-1", month: str = "2026-11", team: str | None = None,
             total: float = 10.0, status: str = "open", ts: str | None = None, models=None) -> dict[str, Any]:
    a = alert(i, status=status)
    a["host"]["name"] = host
    a["@timestamp"] = ts or f"{month}-03T01:00:00.000Z"
    a["event"]["start"] = f"{month}-03T00:00:00.000Z"
    g = a["gpusentry"]["alert"]
    g["first_opened"] = a["event"]["start"]
    g["last_evidence"] = a["@timestamp"]
    g["cost"] = {"gpu_seconds": 3600.0, "busy_gpu_seconds": 1800.0, "energy_kwh": 0.5, "compute": total - 0.06,
                 "energy": 0.06, "usd": total, "currency": "USD", "price_list": "abc123", "price_lists": ["abc123"],
                 "gpus": 1, "unpriced_gpu_seconds": 0.0,
                 "by_model": models or [{"gpu_model": "NVIDIA H100 80GB HBM3", "price_model": "H100-SXM", "gpus": 1,
                                         "busy_gpu_seconds": 1800.0, "energy_kwh": 0.5, "rate_per_gpu_hour": 2.99,
                                         "compute": total - 0.06, "energy": 0.06}]}
    if team:
        a["labels"] = {"team": team, "cost_centre": f"cc-{team}"}
    return a


def write(path: Path, alerts: list[dict[str, Any]], extra: bytes = b"") -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(a) for a in alerts) + b"\n" + extra)
    return path


def test_the_last_update_of_each_incident_counts_and_a_resolution_closes_it(tmp_path):
    first = incident(1, total=1.0, ts="2026-11-03T00:10:00.000Z")
    later = incident(1, total=5.0, ts="2026-11-03T00:20:00.000Z")
    resolved = incident(1, total=5.0, status="resolved", ts="2026-11-03T00:20:00.000Z")
    loaded = load_files([write(tmp_path / "a.jsonl", [later, first, resolved])])
    [row] = incident_rows(loaded)
    assert row["total"] == 5.0 and row["status"] == "resolved" and loaded.updates == 3


def test_groups_sum_where_the_money_went(tmp_path):
    alerts = [incident(1, team="vision", total=10), incident(2, team="vision", total=5, host="gpu-node-2"),
              incident(3, team="nlp", total=2, month="2026-12"),
              incident(4, total=3, models=[
                  {"gpu_model": "NVIDIA L40S", "price_model": "L40S", "gpus": 1, "busy_gpu_seconds": 3600.0,
                   "energy_kwh": 0.2, "rate_per_gpu_hour": 1.25, "compute": 1.25, "energy": 0.02},
                  {"gpu_model": "NVIDIA Mystery", "price_model": None, "gpus": 1, "busy_gpu_seconds": 3600.0,
                   "energy_kwh": 0.2, "rate_per_gpu_hour": None, "compute": 0.0, "energy": 0.02}])]
    rows = incident_rows(load_files([write(tmp_path / "a.jsonl", alerts)]))
    by_team = {r["team"]: r for r in group(rows, "team")}
    assert by_team["vision"]["total"] == 15 and by_team["vision"]["incidents"] == 2 and by_team["nlp"]["total"] == 2
    assert by_team["(unattributed)"]["incidents"] == 1
    assert {r["month"]: r["total"] for r in group(rows, "month")} == {"2026-11": 18, "2026-12": 2}
    assert {r["cost_centre"] for r in group(rows, "cost-centre")} == {"cc-vision", "cc-nlp", "(unattributed)"}
    by_model = {r["gpu_model"]: r for r in group(rows, "gpu-model")}
    assert by_model["NVIDIA Mystery"]["unpriced_gpu_hours"] == 1.0 and by_model["NVIDIA L40S"]["total"] == 1.27
    assert sum(r["incidents"] for r in group(rows, "host")) == 4
    since = incident_rows(load_files([tmp_path / "a.jsonl"]), since=1_796_083_200.0)  # 2026-12-01
    assert [r["incident_id"] for r in since] == [alerts[2]["gpusentry"]["alert"]["dedup_key"]]


@pytest.mark.parametrize("fmt", ["csv", "json", "html"])
def test_the_same_input_gives_the_same_bytes(tmp_path, fmt):
    alerts = [incident(i, team=("a", "b")[i % 2], total=float(i)) for i in range(1, 8)]
    path = write(tmp_path / "a.jsonl", alerts)
    one = render(incident_rows(load_files([path])), by="team" if fmt != "html" else "incident", fmt=fmt)
    write(path, list(reversed(alerts)))  # another order of the same updates
    two = render(incident_rows(load_files([path])), by="team" if fmt != "html" else "incident", fmt=fmt)
    assert one == two and one


def test_html_is_self_contained_and_shows_host_text_as_text(tmp_path):
    hostile = incident(1, host="<script>alert(1)</script>", team="<b>x</b>")
    hostile["gpusentry"]["alert"]["evidence"][0]["summary"] = "<img src=x onerror=alert(2)>"
    page = render(incident_rows(load_files([write(tmp_path / "a.jsonl", [hostile])])), by="incident",
                  fmt="html").decode()
    assert not re.search(r"<(script|img|iframe)\b", page) and "&lt;script&gt;" in page
    assert not re.search(r"<link\b|\ssrc=\"|@import|url\((?!#)", page), "opens offline: no CDN, no external file"
    assert page.count("<svg") == 3  # cost by month, by team, the timeline


def test_bad_input_is_named_and_the_rest_is_kept(tmp_path):
    good = write(tmp_path / "a.jsonl", [incident(1)], extra=b'{"not": "an alert"}\n{broken\n')
    binary = tmp_path / "capture.pcap"
    binary.write_bytes(b"\xd4\xc3\xb2\xa1" + b"\0" * 64)
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "report", str(good)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "a.jsonl:2: not a gpusentry.alert" in r.stderr and "a.jsonl:3" in r.stderr
    assert r.stdout.count("\n") == 2  # header and the one incident
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "report", str(binary)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "not a JSONL file of alerts" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "report", str(good), "--by", "planet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cost-centre" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "report", str(tmp_path / "missing.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "missing.jsonl: cannot read" in r.stderr


def test_analyst_verdicts_join_by_incident_and_by_host(tmp_path):
    a, b = incident(1), incident(2, host="gpu-node-9")
    verdicts = tmp_path / "v.jsonl"
    verdicts.write_bytes(b"\n".join(orjson.dumps(v) for v in [
        {"verdict_id": "v1", "timestamp": "2026-11-04T00:00:00.000Z", "verdict": "benign", "analyst": "alice",
         "state": "in force", "reason": "hashcat audit", "scope": {"dedup_key": a["gpusentry"]["alert"]["dedup_key"]}},
        {"verdict_id": "v2", "timestamp": "2026-11-04T00:00:00.000Z", "verdict": "benign", "analyst": "bob",
         "state": "expired", "reason": "burn-in", "scope": {"host.name": "gpu-node-9"}}]))
    rows = {r["host"]: r for r in incident_rows(load_files([write(tmp_path / "a.jsonl", [a, b])]),
                                                 load_verdicts(verdicts))}
    assert rows["gpu-node-1"]["analyst_verdict"] == "benign by alice (in force): hashcat audit"
    assert rows["gpu-node-9"]["analyst_verdict"].startswith("benign by bob (expired)")


def test_a_replayed_fleet_reports_what_its_incidents_cost(tmp_path):
    env = {**os.environ, "GPUSENTRY_CONFIG": ""}
    events, alerts = tmp_path / "ev.jsonl", tmp_path / "alerts.jsonl"
    subprocess.run([sys.executable, "-m", "gpusentry.cli", "simulate", "-s", "duty-cycled", "-s", "training",
                    "--duration", "1200", "-o", str(events)], check=True, capture_output=True, env=env, timeout=120)
    subprocess.run([sys.executable, "-m", "gpusentry.cli", "replay", str(events), "-o", str(alerts)], check=True,
                   capture_output=True, env=env, timeout=120)
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "report", str(alerts), "--format", "json"],
                       check=True, capture_output=True, env=env, timeout=120)
    [row] = orjson.loads(r.stdout)
    assert row["host"].startswith("sim-duty-cycled") and row["price_source"] and row["total"] > 0
    assert row["busy_gpu_hours"] < row["duration_h"] * row["gpus"], "a duty-cycled miner is billed for its bursts"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (tests/debian-packages.txt)")
def test_the_html_report_renders_in_a_real_browser(tmp_path):
    from PIL import Image

    alerts = [incident(i, team=("vision", "nlp", "infra")[i % 3], total=float(10 * i), month=("2026-10", "2026-11")[i % 2],
                       host=f"gpu-node-{i}") for i in range(1, 10)]
    page = tmp_path / "report.html"
    page.write_bytes(render(incident_rows(load_files([write(tmp_path / "a.jsonl", alerts)])), by="incident",
                            fmt="html"))
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", "--disable-extensions", "--blink-settings=imagesEnabled=true",
                    f"--screenshot={shot}", "--window-size=1400,1800", f"file://{page}"],
                   check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    img = Image.open(shot).convert("L")
    assert img.size == (1400, 1800)
    colours = img.getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 50, "the page rendered (charts and text), not a blank screen"
    dark = sum(n for n, v in colours if v < 128)
    assert dark > 0.005 * 1400 * 1800, "text and chart bars are visible"
    if os.environ.get("GPUSENTRY_REPORT_SCREENSHOT"):  # the report picture in docs/reference.md is refreshed this way
        shutil.copy(shot, os.environ["GPUSENTRY_REPORT_SCREENSHOT"])


@pytest.mark.broker
def test_report_reads_the_alerts_topic_for_a_time_range(bootstrap):
    from tests.streams_helpers import produce, producer, topic_env

    env = topic_env(bootstrap, "report")
    p = producer(bootstrap)
    updates = [incident(1, total=1.0, ts="2026-11-03T00:10:00.000Z"), incident(1, total=4.0, ts="2026-11-03T00:20:00.000Z"),
               incident(2, total=2.0, host="gpu-node-2")]
    for a in updates:
        produce(p, env["GPUSENTRY_TOPICS__ALERTS"], a["gpusentry"]["alert"]["dedup_key"], a)
    p.flush(30)
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "report", "--from-kafka", "--format", "json",
                        "--since", "2026-01-01T00:00:00Z"], capture_output=True, env={**os.environ, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row["host"]: row for row in orjson.loads(r.stdout)}
    assert rows["gpu-node-1"]["total"] == 4.0 and rows["gpu-node-2"]["total"] == 2.0
