"""Real command lines, as published, replayed the way a new user would measure a detector: one host per case,
the process event alone (no GPU or network evidence).  Miner launches whose command line, path or name carries
evidence must reach high; every benign look-alike must stay at low or below.  The cases and their sources are
in tests/data/campaign_corpus.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from detectors.base import SEVERITIES
from detectors.engine import Engine
from detectors.examples import proc
from gpusentry import contract as c

CORPUS = Path(__file__).with_name("data") / "campaign_corpus.toml"
CASES = tomllib.loads(CORPUS.read_text())["case"]


def verdict(i: int, line: str) -> str:
    """The highest severity an incident of this one process start reaches ('none' without one)."""
    engine = Engine(strict=True)
    ev = proc(line, host=f"corpus-{i:03d}")
    alerts = engine.process(c.validate_or_raise(ev))
    return max((a["gpusentry"]["alert"]["severity"] for a in alerts), key=SEVERITIES.index, default="none")


def test_every_case_cites_its_source_and_says_what_it_is():
    assert CASES
    for case in CASES:
        assert case["label"] in ("miner", "benign") and case["command_line"].strip() and case["source"].strip()
        assert case["label"] == "benign" or case["evidence"] in ("cmdline", "path", "name", "image", "none")


@pytest.mark.parametrize("i", [i for i, case in enumerate(CASES) if case["label"] == "miner"
                               and case["evidence"] != "none"])
def test_a_real_miner_launch_with_evidence_is_high(i):
    case = CASES[i]
    assert verdict(i, case["command_line"]) in ("high", "critical"), (case["command_line"], case["source"])


@pytest.mark.parametrize("i", [i for i, case in enumerate(CASES) if case["label"] == "miner"
                               and case["evidence"] == "none"])
def test_a_real_miner_launch_without_evidence_still_leaves_a_trace(i):
    """A renamed binary with no arguments is caught by its GPU and network behaviour; its start alone still
    leaves a note (a staging path, a disguise) for the incident that follows."""
    case = CASES[i]
    assert verdict(i, case["command_line"]) != "none", (case["command_line"], case["source"])


def test_the_corpus_is_the_size_the_measurement_needs():
    """At least 100 real miner launches and 60 real look-alikes, so a percentage means something."""
    labels = [case["label"] for case in CASES]
    assert labels.count("miner") >= 100 and labels.count("benign") >= 60


@pytest.mark.parametrize("i", [i for i, case in enumerate(CASES) if case["label"] == "benign"])
def test_a_real_benign_look_alike_stays_quiet(i):
    case = CASES[i]
    assert verdict(i, case["command_line"]) in ("none", "low"), (case["command_line"], case["source"])
