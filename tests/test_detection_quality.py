"""Detection quality on simulated hosts (a small, fast subset of bench/detection.py).

Not a timing test: it asserts *what* is detected.  Every hijack class must raise an incident of
high or critical severity within 5 minutes, no benign host may see an alert of medium or above, and
the GPU models alone must catch every hijack that leaves a GPU signature.
"""

from __future__ import annotations

import pytest

from detectors.base import SEVERITIES
from gpusentry.simulate import BENIGN, HIJACK, SCENARIOS
from gpusentry.simulate.evaluate import run_scenarios

T0 = 1_793_491_200.0
DURATION = 900.0  # hijacks start after 5 minutes of normal work
HIJACKS = [n for n, s in SCENARIOS.items() if s.label == HIJACK]
BENIGNS = [n for n, s in SCENARIOS.items() if s.label == BENIGN]
# A miner sharing a busy job's GPU shows on the GPU only once the job's dips fail to come (a dip period or two,
# longer than these 15 minutes): mining_signature's examples and bench/detection.py cover it.
GPU_HIJACKS = [n for n in HIJACKS if "gpu" in SCENARIOS[n].evidence.split(", ")]


def describe(r):
    return (f"{r.label.host} ({r.label.gpu_name}, {r.label.interval_s:g} s): alerts "
            f"{[(round(t - (r.label.attack_start or r.label.start)), SEVERITIES[s]) for t, s in r.alerts]}, "
            f"rules {sorted(r.rules)}")


@pytest.fixture(scope="module")
def results():
    return run_scenarios(HIJACKS + BENIGNS, 1, start=T0, duration_s=DURATION, interval_s=5, seed=11)


@pytest.fixture(scope="module")
def gpu_only_results():
    return run_scenarios(GPU_HIJACKS + BENIGNS, 1, start=T0, duration_s=DURATION, interval_s=5, seed=12,
                         only="gpu.")


def test_every_hijack_class_detected_at_high_or_above(results):
    for r in results:
        if r.hijack:
            assert r.detected_at is not None, describe(r)
            assert r.ttd(r.detected_at) <= 300, describe(r)


def test_no_medium_or_higher_alert_on_benign_hosts(results):
    for r in results:
        assert r.false_alerts == 0, describe(r)


def test_better_than_both_baselines(results):
    hijacks = [r for r in results if r.hijack]
    ours = sum(r.detected_at is not None for r in hijacks)
    util = sum(r.util_baseline_at is not None for r in hijacks)
    falco = sum(r.falco_baseline_at is not None for r in hijacks)
    assert ours > util and ours > falco


def test_gpu_models_alone_catch_gpu_hijacks_and_stay_quiet_on_benign_work(gpu_only_results):
    for r in gpu_only_results:
        if r.hijack:
            assert r.max_severity >= SEVERITIES.index("medium"), describe(r)
        else:
            assert r.false_alerts == 0, describe(r)
    caught_high = sum(r.detected_at is not None for r in gpu_only_results if r.hijack)
    assert caught_high >= len(GPU_HIJACKS) - 2, [describe(r) for r in gpu_only_results if r.hijack]
