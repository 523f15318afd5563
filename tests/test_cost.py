"""What stolen GPU time costs, against hand-computed incidents: busy time, MIG shares, several GPUs, prices
that change mid-incident, and models the table does not know."""

from __future__ import annotations

from typing import Any

import pytest

from detectors.engine import Engine
from detectors.examples import HOST, T0, proc
from detectors.process.miner_flags import MinerFlags
from gpusentry import contract as c
from gpusentry.pricing import normalise, price_list
from gpusentry.settings.detection import DetectionSettings, PricingSettings

MINER = "/tmp/x/xmrig -o stratum+tcp://pool.example.net:3333 -u 4AbC --donate-level 1"
PID = 4242


def engine(**pricing: Any) -> Engine:
    s = DetectionSettings(pricing=PricingSettings(**pricing))
    return Engine(s, detectors=[MinerFlags(s)], strict=True)


def sample(t: float, *, util: float = 100, watts: float = 300.0, name: str = "NVIDIA H100 80GB HBM3",
           uuid: str = "GPU-0", index: int = 0, procs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return c.gpu_event(HOST, T0 + t, index=index, uuid=uuid, name=name, gpu_pct=util, power_draw_watts=watts,
                       processes=procs if procs is not None else [{"pid": PID, "used_memory_bytes": 1 << 30}],
                       event_id=f"gpu-{uuid}-{int(t * 1000)}")


def cost_of(eng: Engine, events: list[dict[str, Any]]) -> dict[str, Any]:
    alerts = []
    for ev in [proc(MINER, pid=PID), *events]:
        alerts += eng.process(c.validate_or_raise(ev))
    alerts += eng.expire(T0 + 100_000)
    return alerts[-1]["gpusentry"]["alert"]["cost"]


def test_the_table_is_exact_and_ordered_with_no_default():
    prices = price_list(PricingSettings())
    assert prices.quote("NVIDIA L40").model == "L40" and prices.quote("NVIDIA L4").model == "L4"
    assert prices.quote("NVIDIA L40S").model == "L40S"
    assert prices.quote("NVIDIA H100 80GB HBM3").model == "H100-SXM"
    assert prices.quote("NVIDIA GH200 480GB").model == "GH200" and prices.quote("NVIDIA B200").model == "B200"
    assert prices.quote("NVIDIA A100-SXM4-80GB").model == "A100-80GB"
    assert prices.quote("NVIDIA Quadro K620") is None and prices.quote(None) is None
    assert normalise("  nvidia  h100   80gb hbm3 ") == "H100 80GB HBM3"


def test_one_override_changes_one_entry_and_the_version():
    base, changed = price_list(PricingSettings()), price_list(PricingSettings(gpu_hour_usd={"H100-SXM": 2.0}))
    assert changed.quote("NVIDIA H100 80GB HBM3").rate == 2.0
    assert changed.quote("NVIDIA L40S").rate == base.quote("NVIDIA L40S").rate, "the rest of the table stays"
    assert changed.version != base.version
    added = price_list(PricingSettings(gpu_hour_usd={"NVIDIA Quadro K620": 0.05}))
    assert added.quote("NVIDIA Quadro K620").rate == 0.05


def test_a_duty_cycled_miner_is_billed_for_its_bursts():
    # 10 s samples for an hour; the miner computes 60 s, pauses 60 s (util 0, memory still held).
    events = [sample(float(t), util=100 if (t // 60) % 2 == 0 else 0, watts=300 if (t // 60) % 2 == 0 else 60)
              for t in range(10, 3611, 10)]
    cost = cost_of(engine(), events)
    rate = price_list(PricingSettings()).quote("NVIDIA H100 80GB HBM3").rate
    busy = sum(10 for t in range(20, 3611, 10) if (t // 60) % 2 == 0)  # an interval is billed by the sample ending it
    assert cost["gpu_seconds"] == pytest.approx(3600)
    assert cost["busy_gpu_seconds"] == pytest.approx(busy)
    kwh = busy * 300 / 3.6e6
    assert cost["energy_kwh"] == pytest.approx(kwh)
    assert cost["compute"] == pytest.approx(busy / 3600 * rate, abs=1e-4)
    assert cost["usd"] == pytest.approx(busy / 3600 * rate + kwh * 0.12, abs=1e-4)


def test_a_mig_instance_is_priced_as_its_share_and_pue_scales_energy():
    events = [sample(float(t), name="NVIDIA H100 80GB HBM3 MIG 3g.40gb", uuid="MIG-1") for t in range(10, 1811, 10)]
    cost = cost_of(engine(pue=1.5), events)
    rate = price_list(PricingSettings()).quote("NVIDIA H100 80GB HBM3").rate
    assert cost["busy_gpu_seconds"] == pytest.approx(1800)
    assert cost["compute"] == pytest.approx(0.5 * rate * 3 / 7, abs=1e-4)
    assert cost["energy_kwh"] == pytest.approx(1800 * 300 / 3.6e6 * 1.5)
    [model] = cost["by_model"]
    assert model["rate_per_gpu_hour"] == pytest.approx(rate * 3 / 7) and model["price_model"] == "H100-SXM"


def test_several_gpus_of_two_models_and_an_unpriced_one():
    events = []
    for t in range(10, 1811, 10):
        events += [sample(float(t), uuid="GPU-a", index=0), sample(float(t), uuid="GPU-b", index=1),
                   sample(float(t), uuid="GPU-c", index=2, name="NVIDIA L40S"),
                   sample(float(t), uuid="GPU-d", index=3, name="NVIDIA Mystery 9000")]
    cost = cost_of(engine(), events)
    prices = price_list(PricingSettings())
    h100, l40s = prices.quote("NVIDIA H100 80GB HBM3").rate, prices.quote("NVIDIA L40S").rate
    assert cost["gpus"] == 4 and cost["busy_gpu_seconds"] == pytest.approx(4 * 1800)
    assert cost["compute"] == pytest.approx(2 * 0.5 * h100 + 0.5 * l40s, abs=1e-4)
    assert cost["unpriced_gpu_seconds"] == pytest.approx(1800)
    by = {m["gpu_model"]: m for m in cost["by_model"]}
    assert by["NVIDIA H100 80GB HBM3"]["gpus"] == 2 and by["NVIDIA Mystery 9000"]["price_model"] is None
    assert by["NVIDIA Mystery 9000"]["compute"] == 0


def test_a_shared_gpu_bills_the_miners_sm_share():
    procs = [{"pid": PID, "used_memory_bytes": 4 << 30, "sm_pct": 40}, {"pid": 2000, "used_memory_bytes": 60 << 30,
                                                                      "sm_pct": 60}]
    cost = cost_of(engine(), [sample(float(t), procs=procs) for t in range(10, 3611, 10)])
    assert cost["busy_gpu_seconds"] == pytest.approx(0.4 * 3600)


def test_a_price_change_mid_incident_prices_each_part_at_its_own_rate():
    first = engine(gpu_hour_usd={"H100-SXM": 2.0})
    for ev in [proc(MINER, pid=PID), *[sample(float(t)) for t in range(10, 1811, 10)]]:
        first.process(c.validate_or_raise(ev))
    second = engine(gpu_hour_usd={"H100-SXM": 4.0})  # a worker with a new price list takes the host over
    second.restore_host(HOST, first.snapshot_host(HOST))
    alerts = []
    for ev in [sample(float(t)) for t in range(1820, 3611, 10)]:
        alerts += second.process(c.validate_or_raise(ev))
    cost = (alerts + second.expire(T0 + 100_000))[-1]["gpusentry"]["alert"]["cost"]
    assert cost["compute"] == pytest.approx(0.5 * 2.0 + 0.5 * 4.0, abs=1e-3)
    assert cost["price_lists"] == [price_list(PricingSettings(gpu_hour_usd={"H100-SXM": 2.0})).version,
                                   price_list(PricingSettings(gpu_hour_usd={"H100-SXM": 4.0})).version]
