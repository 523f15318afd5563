"""The shared check suite of the GPU models (after river's estimator checks).

Every :class:`detectors.gpu._models.GpuModel` subclass is found and run through the same checks:
clone, pickle round trip, unseen and missing (None) features, scoring before any learning,
scores within [0, 1] that do not change the model, and bounded memory (the pickled size stays
bounded however many windows it learns: models are checkpointed per host).
"""

from __future__ import annotations

import math
import pickle
import random

import pytest

from detectors.engine import discover
from detectors.gpu._models import GpuModel, all_model_classes
from detectors.gpu._window import FEATURES

discover()  # imports every detector module, so every model class a detector uses is defined
MODELS = all_model_classes()
# Largest pickled size any GPU model may reach; a host with 8 GPUs checkpoints 8 of each.
MAX_PICKLED_BYTES = 64 * 1024


def window(rng: random.Random, busy: bool = True) -> dict[str, float | None]:
    """A plausible window feature dict."""
    util = rng.uniform(85, 100) if busy else rng.uniform(0, 5)
    return {"util_mean": util, "util_std": rng.uniform(0, 6), "util_min": max(0.0, util - rng.uniform(0, 20)),
            "util_max": min(100.0, util + 3), "mem_pct": rng.uniform(20, 95), "used_frac": rng.uniform(0.05, 0.95),
            "used_gib": rng.uniform(1, 70), "power_frac": rng.uniform(0.3, 1.0), "limit_frac": rng.uniform(0.6, 1.0),
            "sm_frac": rng.uniform(0.5, 1.0), "memclk_frac": rng.uniform(0.9, 1.05), "pcie_log": rng.uniform(3, 10),
            "busy_frac": 1.0 if busy else 0.0}


def trained(cls: type[GpuModel], n: int, seed: int = 1) -> GpuModel:
    model = cls()
    rng = random.Random(seed)
    for i in range(n):
        model.learn_one(window(rng, busy=i % 7 != 0))
    return model


def ids(classes):
    return [c.__name__ for c in classes]


def test_models_are_found():
    names = {c.__name__ for c in MODELS}
    assert {"HalfSpaceBehaviour", "MiningSignature", "DriftMonitor"} <= names


def test_window_features_cover_what_models_read():
    for key in ("util_mean", "util_std", "mem_pct", "used_frac", "power_frac", "sm_frac", "pcie_log"):
        assert key in FEATURES


@pytest.mark.parametrize("cls", MODELS, ids=ids(MODELS))
def test_score_before_any_learning(cls):
    score = cls().score_one(window(random.Random(2)))
    assert isinstance(score, float) and 0.0 <= score <= 1.0


@pytest.mark.parametrize("cls", MODELS, ids=ids(MODELS))
def test_clone_is_fresh_with_same_parameters(cls):
    model = trained(cls, 80)
    clone = model.clone()
    assert type(clone) is cls and clone is not model
    assert clone._params() == model._params()
    fresh = cls(**model._params())
    x = window(random.Random(3))
    assert clone.score_one(x) == fresh.score_one(x), "a clone must not carry learned state"


@pytest.mark.parametrize("cls", MODELS, ids=ids(MODELS))
def test_pickle_round_trip_keeps_behaviour(cls):
    model = trained(cls, 120)
    copy = pickle.loads(pickle.dumps(model))
    rng = random.Random(4)
    for _ in range(20):
        x = window(rng)
        assert copy.score_one(x) == model.score_one(x)
        copy.learn_one(x)
        model.learn_one(x)


@pytest.mark.parametrize("cls", MODELS, ids=ids(MODELS))
def test_scoring_does_not_change_the_model(cls):
    model = trained(cls, 60)
    before = pickle.dumps(model)
    for _ in range(5):
        model.score_one(window(random.Random(5)))
    assert pickle.dumps(model) == before


@pytest.mark.parametrize("cls", MODELS, ids=ids(MODELS))
def test_unseen_and_missing_features(cls):
    model = trained(cls, 60)
    rng = random.Random(6)
    full = window(rng)
    variants = [
        {**full, "gpu_fan_pct": 40.0, "something_new": 1e9},  # unseen keys are ignored
        dict.fromkeys(full, None),  # every value missing
        {},  # no keys at all
        {k: v for i, (k, v) in enumerate(full.items()) if i % 2},  # half the keys
        {**full, "util_mean": math.nan, "pcie_log": math.inf},  # non-finite values
    ]
    for x in variants:
        score = model.score_one(x)
        assert 0.0 <= score <= 1.0 and math.isfinite(score)
        model.learn_one(x)
    assert 0.0 <= model.score_one(full) <= 1.0


@pytest.mark.parametrize("cls", MODELS, ids=ids(MODELS))
def test_memory_stays_bounded(cls):
    small = len(pickle.dumps(trained(cls, 200)))
    large = len(pickle.dumps(trained(cls, 3000)))
    assert large <= MAX_PICKLED_BYTES, f"{cls.__name__} pickles to {large} bytes after 3000 windows"
    assert large <= small * 1.5 + 2048, f"{cls.__name__} grows with history: {small} -> {large} bytes"


def test_half_space_trees_flag_a_change_of_behaviour():
    from detectors.gpu._models import HalfSpaceBehaviour

    model = HalfSpaceBehaviour(seed=7)
    rng = random.Random(8)
    training = [{"util_mean": rng.gauss(95, 1.5), "util_std": 2.0, "mem_pct": 48.0, "used_frac": 0.9,
                 "power_frac": 0.85, "sm_frac": 0.98, "memclk_frac": 1.0, "pcie_log": 9.6} for _ in range(80)]
    for x in training:
        model.learn_one(x)
    usual = max(model.score_one(x) for x in training[-10:])
    miner = {"util_mean": 100.0, "util_std": 0.3, "mem_pct": 94.0, "used_frac": 0.07, "power_frac": 0.97,
             "sm_frac": 0.6, "memclk_frac": 1.0, "pcie_log": 4.0}
    assert model.score_one(miner) > max(0.7, usual + 0.3)


def test_mining_signature_separates_miners_from_burn_in():
    from detectors.gpu._models import MiningSignature

    sig = MiningSignature()
    miner = {"util_mean": 99.8, "util_std": 0.3, "util_min": 99.0, "mem_pct": 93.0, "used_gib": 5.5,
             "used_frac": 0.07, "pcie_log": 4.0, "limit_frac": 0.65, "sm_frac": 0.6, "power_frac": 0.97,
             "memclk_frac": 1.0}
    burn = {"util_mean": 99.6, "util_std": 0.4, "util_min": 99.0, "mem_pct": 30.0, "used_gib": 72.0,
            "used_frac": 0.9, "pcie_log": 3.8, "limit_frac": 1.0, "sm_frac": 0.88, "power_frac": 1.0,
            "memclk_frac": 1.0}
    for x in (miner, miner):
        sig.learn_one(x)
    assert sig.score_one(miner) >= 0.9
    burn_sig = MiningSignature()
    for x in (burn, burn):
        burn_sig.learn_one(x)
    assert burn_sig.score_one(burn) <= 0.55


def test_half_space_trees_score_exactly_as_river():
    """The flat-mass trees are river's algorithm: same splits, same scores, pivot for pivot."""
    from river import anomaly

    from detectors.gpu._models import BEHAVIOUR_SCALES, HalfSpaceTrees

    features = tuple(BEHAVIOUR_SCALES)
    # The last forest is too big for generated code and takes the loop walk.
    for n_trees, height, window_size, seed in ((10, 6, 20, 42), (3, 4, 7, 1), (5, 8, 30, 99), (20, 8, 10, 3)):
        ours = HalfSpaceTrees(features, n_trees=n_trees, height=height, window_size=window_size, seed=seed)
        theirs = anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed)
        rng = random.Random(seed)
        for i in range(8 * window_size):
            # Phases of different behaviour, so the reference masses differ between pivots.
            centre = 0.2 if (i // 25) % 3 else 0.75
            x = {k: min(1.0, max(0.0, rng.gauss(centre, 0.15))) for k in features}
            assert ours.score_one(x) == theirs.score_one(x), f"window {i}"
            if rng.random() < 0.9:  # flagged points are not learned: the paths must not go stale
                ours.learn_one(x)
                theirs.learn_one(x)


def test_half_space_trees_pickle_small_and_share_their_shapes():
    from detectors.gpu._models import HalfSpaceBehaviour

    model = trained(HalfSpaceBehaviour, 100)
    blob = pickle.dumps(model)
    assert len(blob) < 8 * 1024, f"{len(blob)} bytes: only the mass counts should be pickled"
    twin = pickle.loads(blob)
    x = window(random.Random(9))
    assert twin.score_one(x) == model.score_one(x)
