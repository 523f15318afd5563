"""Rule, protocol and pool detectors plus correlation, alone, on the simulated fleet (`gpusentry simulate`).

The GPU models are left out on purpose: this checks that the process and network evidence every
hijack scenario leaves is enough for a high incident, quickly, and that none of the benign scenarios
(including services on ports miners use and a language server on 3333) raises anything.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from detectors.base import SEVERITIES
from detectors.engine import Engine, discover
from gpusentry.contract import parse_timestamp, validate_or_raise
from gpusentry.simulate import SCENARIOS, fleet

START = 1_793_500_000.0


@pytest.fixture(scope="module")
def outcome():
    labels, events = fleet(sorted(SCENARIOS), 2, start=START, duration_s=1200, interval_s=None,
                           seed=11)
    engine = Engine(detectors=[cls() for cls in discover() if not cls.id.startswith("gpu.")], strict=True)
    alerts = defaultdict(list)
    for ev in events:
        for alert in engine.process(validate_or_raise(ev)):
            alerts[alert["host"]["name"]].append(alert)
    return {label.host: label for label in labels}, alerts


def test_benign_hosts_raise_nothing(outcome):
    labels, alerts = outcome
    benign = [h for h, label in labels.items() if label.label == "benign" and SCENARIOS[label.scenario].group == "fleet"]
    assert benign
    noisy = {h: [a["message"] for a in alerts[h]] for h in benign if alerts[h]}
    assert not noisy


def test_agentic_look_alikes_raise_at_most_low_notes(outcome):
    """A sandbox's CUDA tests on a spare GPU, or a tool server that lives in /tmp (rocklet), are worth a low
    note on the incident view; nothing of theirs may page."""
    labels, alerts = outcome
    benign = [h for h, label in labels.items() if label.label == "benign" and SCENARIOS[label.scenario].group != "fleet"]
    assert benign
    loud = {h: [a["message"] for a in alerts[h] if a["gpusentry"]["alert"]["severity"] != "low"] for h in benign}
    assert not any(loud.values()), loud


def test_every_hijack_is_high_or_critical_within_a_minute(outcome):
    labels, alerts = outcome
    missed, slow = [], []
    for host, label in labels.items():
        kinds = {k.strip() for k in SCENARIOS[label.scenario].evidence.split(",")}
        if label.label != "hijack" or not kinds & {"process", "network"}:
            continue  # the scheduler-aware rows leave GPU evidence only: the gpu.* detectors judge them
        high = [a for a in alerts[host] if SEVERITIES.index(a["gpusentry"]["alert"]["severity"]) >= 2]
        if not high:
            missed.append((host, [a["gpusentry"]["alert"]["severity"] for a in alerts[host]]))
            continue
        delay = parse_timestamp(high[0]["@timestamp"]) - (label.attack_start or label.start)
        if not 0 <= delay <= 60:
            slow.append((host, delay))
        assert len({a["gpusentry"]["alert"]["dedup_key"] for a in alerts[host]}) == 1, "one hijack, one incident"
    assert not missed and not slow
