"""Every detector, found by discovery, runs the same checks (after pypanther's and river's shared suites).

- metadata is complete (id, title, description, severity, MITRE technique, datasets, signal);
- it has named positive and negative examples, and each behaves as labelled;
- its per-host state survives a pickle round trip mid-stream and then behaves identically;
- null or missing optional fields (everything the contract lets through) never make it raise.
"""

from __future__ import annotations

import copy
import pickle

import pytest

from detectors.base import SEVERITIES, Detector, Signal
from detectors.engine import Engine, discover
from gpusentry import contract as c
from gpusentry.contract import Dataset

DETECTORS = discover()
SIGNALS = {v for k, v in vars(Signal).items() if k.isupper()}


def ids(classes):
    return [cls.id for cls in classes]


def run(det: Detector, events, state=None):
    state = det.new_state() if state is None else state
    findings = []
    for ev in events:
        checked = c.validate_event(copy.deepcopy(ev))
        assert not isinstance(checked, c.Reject), f"example event is not a valid contract event: {checked}"
        findings.extend(det.process(checked, state))
    return findings, state


def test_detectors_are_discovered():
    assert DETECTORS, "no detectors found"


@pytest.mark.parametrize("cls", DETECTORS, ids=ids(DETECTORS))
def test_metadata(cls):
    assert cls.id and "." in cls.id, "ids are namespaced, e.g. process.miner_flags"
    assert cls.title and cls.description and len(cls.description) > 20
    assert cls.severity in SEVERITIES
    assert cls.technique in ("T1496", "T1496.001"), "incidents are Resource Hijacking; related ATT&CK in references"
    assert isinstance(cls.references, tuple)
    assert cls.datasets and all(isinstance(d, Dataset) for d in cls.datasets)
    assert cls.signal in SIGNALS
    names = [e.name for e in cls.examples]
    assert len(names) == len(set(names)), "example names must be unique"
    assert any(e.hit for e in cls.examples), "needs at least one positive example"
    assert any(not e.hit for e in cls.examples), "needs at least one negative example"


EXAMPLES = [(cls, ex) for cls in DETECTORS for ex in cls.examples]


@pytest.mark.parametrize(("cls", "example"), EXAMPLES, ids=[f"{c.id}:{e.name}" for c, e in EXAMPLES])
def test_example(cls, example):
    findings, _ = run(example.detector(cls), example.events)
    floor = SEVERITIES.index(example.min_severity)
    counted = [f for f in findings if SEVERITIES.index(f.severity) >= floor]
    assert bool(counted) == example.hit, [(f.severity, f.message) for f in findings]
    for f in findings:
        assert f.rule_id == cls.id and f.severity in SEVERITIES and f.message
        assert 0.0 <= f.score <= 1.0


@pytest.mark.parametrize(("cls", "example"), EXAMPLES, ids=[f"{c.id}:{e.name}" for c, e in EXAMPLES])
def test_state_pickle_round_trip_mid_stream(cls, example):
    events = example.events
    half = max(1, len(events) // 2)
    det = example.detector(cls)
    _, state = run(det, events[:half])
    clone = pickle.loads(pickle.dumps(state))
    rest_a, _ = run(det, events[half:], state)
    rest_b, _ = run(det, events[half:], clone)
    assert [(f.rule_id, f.message, f.event_id) for f in rest_a] == [(f.rule_id, f.message, f.event_id) for f in rest_b]


def _nullable_and_optional(dataset: Dataset):
    return [s for s in c.DATASET_FIELDS[dataset] if s.nullable or not s.required]


@pytest.mark.parametrize(("cls", "example"), EXAMPLES, ids=[f"{c.id}:{e.name}" for c, e in EXAMPLES])
def test_null_and_missing_fields_never_raise(cls, example):
    det = example.detector(cls)
    for ev in example.events:
        dataset = Dataset(ev["event"]["dataset"])
        for spec in _nullable_and_optional(dataset):
            if c.get(ev, spec.path) is None:
                continue
            for mode in ("null", "missing"):
                bad = copy.deepcopy(ev)
                *parents, leaf = spec.path.split(".")
                node = c.get(bad, ".".join(parents)) if parents else bad
                if mode == "null" and spec.nullable:
                    node[leaf] = None
                elif mode == "missing" and not spec.required:
                    del node[leaf]
                else:
                    continue
                run(det, example.events[:-1] + [bad])  # must not raise
        if ev["event"]["dataset"] == Dataset.GPU.value and c.get(ev, "gpu.processes"):
            bad = copy.deepcopy(ev)
            bad["gpu"]["processes"] = [{"pid": p["pid"]} for p in ev["gpu"]["processes"]]
            run(det, example.events[:-1] + [bad])


def test_engine_runs_every_example_without_failures():
    engine = Engine(strict=True)
    for cls in DETECTORS:
        for ex in cls.examples:
            for ev in ex.events:
                engine.process(c.validate_or_raise(copy.deepcopy(ev)))
    assert not engine.failures
    blob = engine.snapshot()
    restored = Engine(strict=True)
    restored.restore(blob)
    assert restored.hosts.keys() == engine.hosts.keys()
