"""Online models of one GPU's windowed behaviour, all on river's contract.

Every model here follows river's anomaly-detector interface so the same check suite
(tests/test_gpu_models.py) runs over all of them:

* ``learn_one(x)`` updates the model in place and returns nothing;
* ``score_one(x)`` returns a float in [0, 1], higher = more anomalous (or more miner-like), and
  never changes the model, so a caller scores *before* it learns and can keep flagged windows out
  of training;
* ``x`` is a window's feature dict (:data:`detectors.gpu._window.FEATURES`): unknown keys are
  ignored, missing keys and ``None`` values are tolerated;
* ``clone()`` returns a fresh, untrained model with the same parameters;
* state is small and bounded (it is pickled per host into worker checkpoints).
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from river import drift
from river.tree.padded import PaddedBranch, make_padded_tree

Features = Mapping[str, float | None]

GIB = 2**30


class GpuModel:
    """Base of the GPU models (the check suite finds every subclass)."""

    def learn_one(self, x: Features) -> None:
        raise NotImplementedError

    def score_one(self, x: Features) -> float:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {}

    def clone(self) -> GpuModel:
        return type(self)(**self._params())


def _clip01(v: float) -> float:
    return 0.0 if v < 0.0 else 1.0 if v > 1.0 else v


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and v - v == 0.0 else None


def _ramp(v: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi``, linear between (``lo > hi`` ramps downwards)."""
    return _clip01((v - lo) / (hi - lo))


# --------------------------------------------------------------------- behaviour (half-space trees)

# Feature -> scale to [0, 1].  Fixed scales (rather than a learned min-max scaler) make scores
# meaningful from the first window and keep the state down to the trees themselves.
BEHAVIOUR_SCALES: dict[str, float] = {
    "util_mean": 100.0, "util_std": 50.0, "mem_pct": 100.0, "used_frac": 1.0, "power_frac": 1.0,
    "sm_frac": 1.0, "memclk_frac": 1.0, "pcie_log": 11.0,
}
_BEHAVIOUR_ORDER = tuple(sorted(BEHAVIOUR_SCALES.items()))  # the order HalfSpaceTrees keeps features in


# Tree shapes by (n_trees, height, seed, features): for each tree, the split feature and threshold
# of every inner node in heap order (children of node i at 2i+1 and 2i+2).  They depend on nothing
# else, so every GPU with the same settings has the same shapes: built once per process, never
# pickled.
TreeShape = tuple[list[int], list[float]]
ShapeKey = tuple[int, int, int, tuple[str, ...]]
_SHAPES: dict[ShapeKey, list[TreeShape]] = {}
_FORESTS: dict[ShapeKey, _Forest] = {}
# Trees up to this many inner nodes in all are walked by generated code (nested comparisons, a
# few thousand lines); larger forests take the loop.
_GENERATED_MAX_NODES = 4096


def _tree_shapes(key: ShapeKey) -> list[TreeShape]:
    """The inner nodes of river's half-space trees for these parameters, one (features, thresholds) per tree.

    Built by river's own ``make_padded_tree`` with the random draws ``HalfSpaceTrees`` makes
    (one ``Random(seed)`` for all trees, features in sorted order, 15 % padding), so the splits are
    exactly those river would pick.
    """
    shapes = _SHAPES.get(key)
    if shapes is None:
        n_trees, height, seed, features = key
        rng = random.Random(seed)
        index = {name: i for i, name in enumerate(features)}
        inner = 2**height - 1
        shapes = []
        for _ in range(n_trees):
            root = make_padded_tree(limits={name: (0.0, 1.0) for name in features}, height=height, padding=0.15,
                                    rng=rng, r_mass=0, l_mass=0)
            split_feature, split_at = [0] * inner, [0.0] * inner
            todo = [(root, 0)]
            while todo:
                node, i = todo.pop()
                if isinstance(node, PaddedBranch):
                    split_feature[i], split_at[i] = index[node.feature], node.threshold
                    todo += [(node.children[0], 2 * i + 1), (node.children[1], 2 * i + 2)]
            shapes.append((split_feature, split_at))
        _SHAPES[key] = shapes
    return shapes


def _walker(key: ShapeKey) -> Callable[[tuple[float, ...]], tuple[int, ...]]:
    """A function from feature values to the mass index of the leaf they reach in each tree.

    Walking ten trees node by node in a Python loop costs about as much as everything else a
    window does; so the trees are turned into nested comparisons against their thresholds, once
    per process (the generated source is built from our own numbers only).
    """
    n_trees, height, _, _ = key
    shapes = _tree_shapes(key)
    inner, nodes = 2**height - 1, 2 ** (height + 1) - 1
    if n_trees * inner > _GENERATED_MAX_NODES:
        def walker(values: tuple[float, ...]) -> tuple[int, ...]:
            leaves = []
            for tree, (split_feature, split_at) in enumerate(shapes):
                i = 0
                while i < inner:
                    i = 2 * i + 1 if values[split_feature[i]] < split_at[i] else 2 * i + 2
                leaves.append(tree * nodes + i)
            return tuple(leaves)
    else:
        lines = ["def walk(v):"]

        def emit(tree: int, i: int, depth: int) -> None:
            pad = " " * (4 + 4 * depth)
            if i >= inner:
                lines.append(f"{pad}l{tree} = {tree * nodes + i}")
                return
            split_feature, split_at = shapes[tree]
            lines.append(f"{pad}if v[{split_feature[i]}] < {split_at[i]!r}:")
            emit(tree, 2 * i + 1, depth + 1)
            lines.append(f"{pad}else:")
            emit(tree, 2 * i + 2, depth + 1)

        for tree in range(n_trees):
            emit(tree, 0, 0)
        lines.append("    return (" + "".join(f"l{t}, " for t in range(n_trees)) + ")")
        namespace: dict[str, Any] = {}
        exec(compile("\n".join(lines), f"<half-space trees {key[:3]}>", "exec"), namespace)  # noqa: S102
        walker = namespace["walk"]
    return walker


class _Forest:
    """What every model with the same tree parameters shares: how to walk the trees, and their paths."""

    def __init__(self, key: ShapeKey) -> None:
        self.walk = _walker(key)
        self.nodes = 2 ** (key[1] + 1) - 1  # per tree
        self._paths: dict[int, tuple[int, ...]] = {}

    @classmethod
    def of(cls, key: ShapeKey) -> _Forest:
        forest = _FORESTS.get(key)
        if forest is None:
            forest = _FORESTS[key] = cls(key)
        return forest

    def path(self, leaf: int) -> tuple[int, ...]:
        """Mass indices from the root of ``leaf``'s tree down to ``leaf``."""
        path = self._paths.get(leaf)
        if path is None:
            base, i = divmod(leaf, self.nodes)
            base *= self.nodes
            out = [base + i]
            while i:
                i = (i - 1) // 2
                out.append(base + i)
            path = self._paths[leaf] = tuple(reversed(out))
        return path


class HalfSpaceTrees:
    """river's ``HalfSpaceTrees`` with the masses in two flat lists and the tree shapes shared.

    The algorithm is river's, step for step (same splits, same mass walk, same early stop at
    ``0.1 * window_size``, same pivot of the masses every ``window_size`` learned points), so it
    scores exactly as ``river.anomaly.HalfSpaceTrees`` does on inputs that carry every feature
    (tests/test_gpu_models.py checks that).  What changes is the cost: river builds ten linked
    trees of node objects per GPU (about 4 ms, 60 KB pickled) and walks them node by node; here
    a GPU's model is its reference mass counts (a list of ints, a few KB) and the leaves of the
    points learned since the last pivot, the shapes are built and compiled once per process, the
    learned points' masses are added up at the pivot (a GPU doing its usual work lands in the same
    few leaves, so that is a few paths, not one per point), and a leaf's score against the
    reference masses is remembered until the next pivot.

    ``x`` must carry every feature (the model's caller fills gaps); ``*_values`` take the
    features as a tuple in sorted-name order, which is what the hot path uses.
    """

    def __init__(self, features: tuple[str, ...], n_trees: int = 10, height: int = 6, window_size: int = 20,
                 seed: int = 42) -> None:
        self.features, self.n_trees, self.height, self.window_size, self.seed = (
            tuple(sorted(features)), n_trees, height, window_size, seed)
        self.r_mass = [0] * (n_trees * (2 ** (height + 1) - 1))  # mass of the last complete window (the reference)
        self.learned: list[tuple[int, ...]] = []  # leaves of the points learned since (river's l_mass)
        self.first_window = True
        self._walked: tuple[tuple[float, ...], tuple[int, ...]] | None = None  # last values and their leaves
        self._leaf_scores: dict[int, int] = {}  # leaf -> river's raw score of its path, until the next pivot
        self._forest = _Forest.of((n_trees, height, seed, self.features))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_forest"]
        state["_walked"] = None
        state["_leaf_scores"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forest = _Forest.of((self.n_trees, self.height, self.seed, self.features))

    def _leaves(self, values: tuple[float, ...]) -> tuple[int, ...]:
        walked = self._walked
        if walked is not None and walked[0] == values:
            return walked[1]
        leaves = self._forest.walk(values)
        self._walked = (values, leaves)
        return leaves

    def _leaf_score(self, leaf: int) -> int:
        """river's ``_walk_score`` down to ``leaf``: reference mass times 2**depth, stopping at a thin node."""
        r_mass, size_limit = self.r_mass, 0.1 * self.window_size
        score, depth_pow = 0, 1
        for node in self._forest.path(leaf):
            r = r_mass[node]
            score += r * depth_pow
            if r < size_limit:
                break
            depth_pow <<= 1
        self._leaf_scores[leaf] = score
        return score

    def values(self, x: Mapping[str, float]) -> tuple[float, ...]:
        return tuple([x[name] for name in self.features])

    def learn_values(self, values: tuple[float, ...]) -> None:
        self.learned.append(self._leaves(values))
        if len(self.learned) == self.window_size:
            self._pivot()

    def _pivot(self) -> None:
        """The window's masses become the reference: each leaf's count, added along its path."""
        mass, path = [0] * len(self.r_mass), self._forest.path
        for leaf, count in Counter(leaf for leaves in self.learned for leaf in leaves).items():
            for node in path(leaf):
                mass[node] += count
        self.r_mass, self.learned = mass, []
        self.first_window = False
        self._leaf_scores = {}  # scored against the old reference masses

    def score_values(self, values: tuple[float, ...]) -> float:
        if self.first_window:
            return 0.0
        scores = self._leaf_scores
        score = 0
        for leaf in self._leaves(values):
            leaf_score = scores.get(leaf)
            score += self._leaf_score(leaf) if leaf_score is None else leaf_score
        max_score = self.n_trees * self.window_size * (2 ** (self.height + 1) - 1)
        return 1 - score / max_score

    def learn_one(self, x: Mapping[str, float]) -> None:
        self.learn_values(self.values(x))

    def score_one(self, x: Mapping[str, float]) -> float:
        return self.score_values(self.values(x))


class HalfSpaceBehaviour(GpuModel):
    """What is normal for this GPU: half-space trees (river's algorithm) over the scaled window features.

    A feature a window lacks takes the last value seen for it (or the middle of its range), so
    a sensor that stops reporting does not look like a change of behaviour.
    """

    def __init__(self, n_trees: int = 10, height: int = 6, window_size: int = 20, seed: int = 42) -> None:
        self.n_trees, self.height, self.window_size, self.seed = n_trees, height, window_size, seed
        self.trees = HalfSpaceTrees(tuple(BEHAVIOUR_SCALES), n_trees=n_trees, height=height,
                                    window_size=window_size, seed=seed)
        self.last: tuple[float, ...] = ()  # the scaled features last learned, in the trees' order
        self.n_learned = 0
        self._scaled_for: tuple[Features, tuple[float, ...], tuple[float, ...]] | None = None  # x, last, scaled

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_scaled_for"] = None
        return state

    def _params(self) -> dict[str, Any]:
        return {"n_trees": self.n_trees, "height": self.height, "window_size": self.window_size, "seed": self.seed}

    def _scaled(self, x: Features) -> tuple[float, ...]:
        # The window is scored, then learned: scale it once (the same dict, the same fallbacks).
        last = self.last
        cached = self._scaled_for
        if cached is not None and cached[0] is x and cached[1] is last:
            return cached[2]
        out = []
        for k, (key, scale) in enumerate(_BEHAVIOUR_ORDER):
            v = x.get(key)
            if v is None or v - v != 0.0:  # missing, nan or inf
                out.append(last[k] if last else 0.5)
            else:
                v /= scale
                out.append(0.0 if v < 0.0 else 1.0 if v > 1.0 else v)
        scaled = tuple(out)
        self._scaled_for = (x, last, scaled)
        return scaled

    def learn_one(self, x: Features) -> None:
        scaled = self._scaled(x)
        self.trees.learn_values(scaled)
        self.last = scaled
        self.n_learned += 1

    def score_one(self, x: Features) -> float:
        if self.n_learned < self.window_size:
            return 0.0  # the trees have no reference mass before their first full window
        return _clip01(float(self.trees.score_values(self._scaled(x))))


# --------------------------------------------------------------------- mining signature


class MiningSignature(GpuModel):
    """How much a busy window looks like cryptocurrency mining (0..1), and why.

    Components (weights sum to 1), each from what miners do and AI work does not:

    * ``flat`` (0.2): utilisation on a plateau (85 % or more for full credit, throttled miners sit
      lower) with little spread; training dips, inference bursts, notebooks idle;
    * ``small_footprint`` (0.15): a DAG-sized allocation (ethash ~5-6 GiB, kawpow ~4 GiB, autolykos
      ~3-4 GiB; under 10 GiB and under half the board) on a busy GPU; training and LLM serving fill
      the board;
    * ``memory_bound`` (0.15): the memory controller busy (>= 60 %) against that small footprint;
    * ``quiet_pcie`` (0.15): almost no host traffic (a miner receives a job header a few times a
      minute; training and inference stream data);
    * ``tuned`` (0.2): power limit lowered below the board default, or the core clock held well
      under its maximum while power is not the limit, with the memory clock at or above stock;
    * ``no_dips`` (0.15): no checkpoint or evaluation dips over the remembered busy windows.

    Burn-in tests at 100 % (gpu-burn, dcgmi diag) are flat, quiet and dip-free but fill the
    memory and run at the stock power limit: they score about 0.5.
    """

    WEIGHTS = {"flat": 0.2, "small_footprint": 0.15, "memory_bound": 0.15, "quiet_pcie": 0.15, "tuned": 0.2,
               "no_dips": 0.15}

    def __init__(self, history: int = 6, busy_pct: float = 20.0) -> None:
        self.history = history
        self.busy_pct = busy_pct
        self.recent_min_util: deque[float] = deque(maxlen=history)
        self.was_busy = False

    def _params(self) -> dict[str, Any]:
        return {"history": self.history, "busy_pct": self.busy_pct}

    def components(self, x: Features) -> dict[str, float]:
        """Each component's value in [0, 1] (0 when its inputs are missing)."""
        out = dict.fromkeys(self.WEIGHTS, 0.0)
        util_mean = _finite_or_none(x.get("util_mean"))
        if util_mean is None or util_mean < self.busy_pct:
            return out  # an idle window says nothing (and most windows of most GPUs stop here)
        f = _finite_or_none
        get = x.get
        util_std, util_min = f(get("util_std")), f(get("util_min"))
        used_gib, used_frac, mem_pct = f(get("used_gib")), f(get("used_frac")), f(get("mem_pct"))
        if util_std is not None:
            # A plateau: throttled miners flatten at the intensity they are set to, not only at 100 %.
            out["flat"] = _ramp(util_mean, 50, 85) * _ramp(util_std, 8, 3)
        small = False
        if used_gib is not None:
            small = 1.0 <= used_gib <= 10.0 and (used_frac is None or used_frac <= 0.5)
            out["small_footprint"] = 1.0 if small else 0.0
        if small and mem_pct is not None:
            out["memory_bound"] = _ramp(mem_pct, 40, 70)
        pcie_log = f(get("pcie_log"))
        if pcie_log is not None:
            out["quiet_pcie"] = _ramp(pcie_log, 8.0, 7.0)  # 100 MB/s -> 0, 10 MB/s -> 1
        limit_frac, sm_frac = f(get("limit_frac")), f(get("sm_frac"))
        power_frac, memclk = f(get("power_frac")), f(get("memclk_frac"))
        capped = limit_frac is not None and limit_frac <= 0.85
        underclocked = (sm_frac is not None and sm_frac <= 0.8 and power_frac is not None and power_frac <= 0.85
                        and (memclk is None or memclk >= 0.97))
        out["tuned"] = 1.0 if capped or underclocked else 0.0
        mins = list(self.recent_min_util)
        if util_min is not None and self.was_busy:
            mins.append(util_min)
        if len(mins) >= 1:
            out["no_dips"] = _ramp(min(mins), 50, 80)
        return out

    def score_one(self, x: Features) -> float:
        return self.score_of(self.components(x))

    def score_of(self, parts: Mapping[str, float]) -> float:
        """The score of components already worked out (what a caller that shows them uses)."""
        return _clip01(sum(self.WEIGHTS[k] * v for k, v in parts.items()))

    def new_workload(self) -> None:
        """The GPU's processes changed: dips of the previous work say nothing about the new one."""
        self.recent_min_util.clear()
        self.was_busy = False

    def learn_one(self, x: Features) -> None:
        util_mean, util_min = x.get("util_mean"), x.get("util_min")
        if util_mean is None or util_min is None or not math.isfinite(util_min):
            return
        busy = util_mean >= self.busy_pct
        if self.was_busy:
            # A window after a busy one: its low point is a dip (an idle window is the deepest dip).
            # The window in which an idle GPU comes into use is not: the work had not begun.
            self.recent_min_util.append(util_min)
        self.was_busy = busy


# --------------------------------------------------------------------- drift (ADWIN)

DRIFT_FEATURES = ("util_mean", "power_frac")


class DriftMonitor(GpuModel):
    """ADWIN on each window's mean utilisation and power draw (as a fraction of the limit).

    ``score_one`` is how far a window sits from the current ADWIN estimates (0..1, in units of
    the feature's range); ``learn_one`` feeds the detectors and leaves ``drifted`` naming the
    features whose distribution just changed.
    """

    SCALES = {"util_mean": 100.0, "power_frac": 1.0}

    def __init__(self, delta: float = 0.002) -> None:
        self.delta = delta
        # clock=1: check for drift on every window (windows are few; the default checks every 32nd)
        self.adwins = {k: drift.ADWIN(delta=delta, clock=1) for k in DRIFT_FEATURES}
        self.drifted: tuple[str, ...] = ()
        self.before: dict[str, float] = {}

    def _params(self) -> dict[str, Any]:
        return {"delta": self.delta}

    def score_one(self, x: Features) -> float:
        dist = 0.0
        for key, adwin in self.adwins.items():
            v = x.get(key)
            if v is None or not math.isfinite(v) or adwin.width == 0:
                continue
            dist = max(dist, abs(v / self.SCALES[key] - adwin.estimation / self.SCALES[key]))
        return _clip01(dist)

    def learn_one(self, x: Features) -> None:
        drifted = []
        for key, adwin in self.adwins.items():
            v = x.get(key)
            if v is None or not math.isfinite(v):
                continue
            before = adwin.estimation
            adwin.update(_clip01(v / self.SCALES[key]) * self.SCALES[key])
            if adwin.drift_detected:
                drifted.append(key)
                self.before[key] = before
        self.drifted = tuple(drifted)


def all_model_classes() -> list[type[GpuModel]]:
    """Every GpuModel subclass (for the shared check suite)."""
    out: list[type[GpuModel]] = []
    todo = list(GpuModel.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
