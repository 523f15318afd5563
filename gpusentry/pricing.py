"""What stolen GPU time costs: an exact, ordered price table of GPU models, energy, PUE and currency.

The table ships as data (``gpusentry/data/gpu_prices.toml``, each entry with its source). A GPU's
``gpu.name`` is normalised (upper case, without the ``NVIDIA`` prefix, single spaces, without a MIG
profile) and matched exactly against each model's names, in order: no substring matching (an L40 is
not an L4) and no default price (a model not listed is *unpriced*, and counted as such). A MIG instance
(``… MIG 3g.40gb``) is priced as its share of the full GPU (3 of the model's ``mig_slices``).

``[detection.pricing] gpu_hour_usd`` overrides entries one at a time (by model id or any of its names; an
unknown name adds a model), never replacing the table. Every incident carries the price list's
``version``, a digest of everything that prices it, so a figure can be reproduced from the same list.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import orjson

from gpusentry.knowledge import load_entries
from gpusentry.settings.detection import PricingSettings

PRICES_FILE = Path(__file__).resolve().parent / "data" / "gpu_prices.toml"
_MIG = re.compile(r"\s+MIG\s+(\d+)g\.\S+$", re.IGNORECASE)


def normalise(name: str) -> str:
    out = " ".join(name.upper().split())
    return out.removeprefix("NVIDIA ").strip()


@dataclass(frozen=True)
class ModelPrice:
    id: str
    names: tuple[str, ...]  # normalised
    gpu_hour: float
    mig_slices: int | None
    source: str


@dataclass(frozen=True)
class Quote:
    """The price of one GPU (or MIG instance) for an hour of its time."""

    model: str  # the table's model id
    rate: float  # per GPU-hour of this device, in the list's currency (a MIG instance's share applied)
    share: float  # 1 for a whole GPU; slices / mig_slices for a MIG instance
    source: str


@dataclass(frozen=True)
class PriceList:
    models: tuple[ModelPrice, ...]
    kwh: float
    pue: float
    currency: str
    version: str

    def quote(self, gpu_name: str | None) -> Quote | None:
        """The price of a GPU by its NVML name, or None when no model of the table is that GPU."""
        if not gpu_name:
            return None
        return _quote(self, gpu_name)


@lru_cache(maxsize=4096)
def _quote(prices: PriceList, gpu_name: str) -> Quote | None:
    share, name = 1.0, gpu_name
    mig = _MIG.search(gpu_name)
    if mig:
        name = gpu_name[:mig.start()]
    wanted = normalise(name)
    for model in prices.models:
        if wanted in model.names:
            if mig:
                if not model.mig_slices:
                    return None  # a MIG profile on a model the table does not know to slice
                share = min(1.0, int(mig.group(1)) / model.mig_slices)
            return Quote(model.id, model.gpu_hour * share, share, model.source)
    return None


def _table(path: Path) -> tuple[ModelPrice, ...]:
    entries = load_entries(path, "model", required={"id": str, "names": list, "gpu_hour": (int, float)},
                           optional={"mig_slices": int})
    return tuple(ModelPrice(e["id"], tuple(normalise(n) for n in e["names"]), float(e["gpu_hour"]),
                            e.get("mig_slices"), e["source"]) for e in entries)


@lru_cache(maxsize=16)
def _price_list(table_file: Path, overrides: tuple[tuple[str, float], ...], kwh: float, pue: float,
                currency: str) -> PriceList:
    models = list(_table(table_file))
    for key, price in overrides:
        wanted = normalise(key)
        for i, m in enumerate(models):
            if wanted == normalise(m.id) or wanted in m.names:
                models[i] = ModelPrice(m.id, m.names, float(price), m.mig_slices, "site override ([detection.pricing])")
                break
        else:  # a model the table lacks: priced as the site says, matched by that name
            models.append(ModelPrice(key, (wanted,), float(price), None, "site override ([detection.pricing])"))
    canonical = orjson.dumps({"models": [(m.id, m.names, m.gpu_hour, m.mig_slices) for m in models], "kwh": kwh,
                              "pue": pue, "currency": currency})
    return PriceList(tuple(models), kwh, pue, currency, hashlib.sha256(canonical).hexdigest()[:12])


def price_list(settings: PricingSettings) -> PriceList:
    return _price_list(settings.table_file or PRICES_FILE, tuple(sorted(settings.gpu_hour_usd.items())),
                       settings.kwh_usd, settings.pue, settings.currency)
