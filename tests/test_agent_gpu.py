"""GPU collector against the faithful pynvml fake: every field, nulls, MIG, a lost GPU, a driver restart."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pynvml
import pytest

from agents.gpu import GpuCollector
from agents.metrics import AgentMetrics
from gpusentry import contract as c
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, FakeProcess, mig_gpu

HOST = "gpu-node-1"


def valid(events):
    for ev in events:
        checked = c.validate_event(ev)
        assert not isinstance(checked, c.Reject), checked
    return events


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def collector(lib: FakeNvml, **kw) -> GpuCollector:
    col = GpuCollector(HOST, nvml=lib.module(), metrics=AgentMetrics(), **kw)
    return col


# ------------------------------------------------------------------ the fake behaves like pynvml


def test_fake_fails_like_the_real_module_before_init():
    lib = FakeNvml([FakeGpu("GPU-a")])
    nv = lib.module()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nv.nvmlDeviceGetCount()
    # The real binding raises the same class when no driver is installed.
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    nv.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nv.nvmlDeviceGetUtilizationRates(h)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nv.nvmlShutdown()


def test_fake_shares_names_and_structs_with_the_real_module():
    nv = FakeNvml([FakeGpu("GPU-a", gpu_pct=42, memory_used=5)]).module()
    for name in [n for n in dir(nv) if n.startswith("nvml") and callable(getattr(nv, n))]:
        assert hasattr(pynvml, name), f"the fake has {name}, the real pynvml does not"
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    util = nv.nvmlDeviceGetUtilizationRates(h)
    assert isinstance(util, pynvml.c_nvmlUtilization_t) and util.gpu == 42
    assert isinstance(nv.nvmlDeviceGetMemoryInfo(h), pynvml.c_nvmlMemory_t)
    with pytest.raises(pynvml.NVMLError_NotFound):  # no process-utilization sample yet
        nv.nvmlDeviceGetProcessUtilization(h, 0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDeviceGetHandleByIndex(3)


# ------------------------------------------------------------------ sampling


def test_every_contract_field_per_gpu_with_processes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "train.py"])
    try:
        gpus = [FakeGpu(f"GPU-{i}", gpu_pct=90 + i, memory_pct=50, memory_used=5 << 30, power_mw=410_500,
                        power_limit_mw=700_000, temperature_c=63, sm_clock_mhz=1410, mem_clock_mhz=2619,
                        pcie_rx_kb=2, pcie_tx_kb=1) for i in range(2)]
        gpus[0].processes = [FakeProcess(child.pid, 5_000_000_000), FakeProcess(999_999, None, "graphics")]
        gpus[0].samples = [(child.pid, 10, 40), (child.pid, 20, 97)]
        col = collector(FakeNvml(gpus))
        assert col.start()
        events = valid(col.collect(1_795_000_000.25))
        assert [e["gpu"]["index"] for e in events] == [0, 1]
        g = events[0]["gpu"]
        assert events[0]["@timestamp"] == "2026-11-18T11:06:40.250Z"
        assert g["uuid"] == "GPU-0" and g["name"] == "NVIDIA H100 80GB HBM3"
        assert g["utilization"] == {"gpu_pct": 90, "memory_pct": 50}
        assert g["memory"] == {"used_bytes": 5 << 30, "total_bytes": 80 * 1024**3}
        assert g["power"] == {"draw_watts": 410.5, "limit_watts": 700.0}
        assert g["temperature_c"] == 63 and g["clocks"] == {"sm_mhz": 1410, "mem_mhz": 2619}
        assert g["pcie"] == {"rx_bytes_per_s": 2048, "tx_bytes_per_s": 1024}
        procs = {p["pid"]: p for p in g["processes"]}
        mine = procs[child.pid]
        assert mine["used_memory_bytes"] == 5_000_000_000 and mine["sm_pct"] == 97  # the newest sample
        assert mine["executable"] == os.path.realpath(sys.executable)
        assert mine["command_line"].endswith("train.py") and mine["name"]
        gone = procs[999_999]  # NVML lists a pid /proc no longer has: details null, not an error
        assert gone["name"] is None and gone["used_memory_bytes"] is None and gone["sm_pct"] is None
        # The next cycle asks only for samples newer than the last one seen.
        gpus[0].samples.append((child.pid, 30, 12))
        again = col.collect(1_795_000_001.0)
        assert {p["pid"]: p["sm_pct"] for p in again[0]["gpu"]["processes"]}[child.pid] == 12
        third = col.collect(1_795_000_002.0)  # no newer sample: SM share unknown, not stale
        assert {p["pid"]: p["sm_pct"] for p in third[0]["gpu"]["processes"]}[child.pid] is None
    finally:
        child.kill()
        child.wait()


def test_not_supported_fields_are_null_and_the_sample_goes_on(caplog):
    gpu = FakeGpu("GPU-geforce", name="NVIDIA GeForce RTX 4090", gpu_pct=77,
                  unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
                               "nvmlDeviceGetPcieThroughput", "nvmlDeviceGetComputeRunningProcesses"})
    col = collector(FakeNvml([gpu]))
    col.start()
    with caplog.at_level(logging.INFO, logger="agents.gpu"):
        ev = valid(col.collect(1.0))[0]
        col.collect(2.0)
    g = ev["gpu"]
    assert g["utilization"]["gpu_pct"] == 77
    assert g["power"] == {"draw_watts": None, "limit_watts": None}
    assert g["pcie"] == {"rx_bytes_per_s": None, "tx_bytes_per_s": None}
    assert g["processes"] == []
    # Said once per field, not every cycle.
    assert sum("power draw not available" in r.getMessage() for r in caplog.records) == 1


def test_mig_parent_and_instances():
    lib = FakeNvml([mig_gpu("GPU-mig0", 2), FakeGpu("GPU-plain")])
    inst = lib.gpus[0].mig_slots[1]
    assert inst is not None
    inst.memory_used = 3 << 30
    inst.processes = [FakeProcess(os.getpid(), 1 << 30)]
    col = collector(lib)
    col.start()
    events = valid(col.collect(5.0))
    uuids = [e["gpu"]["uuid"] for e in events]
    assert uuids == ["GPU-mig0", "MIG-mig0-0", "MIG-mig0-1", "GPU-plain"]
    parent, _, second, plain = events
    assert parent["gpu"]["utilization"]["gpu_pct"] is None  # MIG parents report no utilization
    assert parent["gpu"]["processes"] == []  # processes are reported on their instance, once
    assert second["gpu"]["index"] == 0  # an instance carries its parent's index
    assert second["gpu"]["memory"]["used_bytes"] == 3 << 30
    assert [p["pid"] for p in second["gpu"]["processes"]] == [os.getpid()]
    assert second["gpu"]["processes"][0]["sm_pct"] is None  # no per-process samples on MIG
    assert plain["gpu"]["index"] == 1
    # An instance destroyed and another created: followed without a restart.
    lib.gpus[0].mig_slots[0] = None
    lib.gpus[0].mig_slots.append(FakeGpu("MIG-mig0-new"))
    assert [e["gpu"]["uuid"] for e in col.collect(6.0)] == ["GPU-mig0", "MIG-mig0-1", "MIG-mig0-new", "GPU-plain"]


def test_lost_gpu_mid_run_is_reported_once_and_others_go_on(caplog):
    lib = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1"), FakeGpu("GPU-2")])
    col = collector(lib)
    col.start()
    assert len(col.collect(1.0)) == 3
    lib.gpus[1].lost = True  # Xid 79: fell off the bus
    with caplog.at_level(logging.ERROR, logger="agents.gpu"):
        second = valid(col.collect(2.0))
    assert [e["gpu"]["uuid"] for e in second] == ["GPU-0", "GPU-1", "GPU-2"]
    assert second[1]["gpusentry"]["gpu"]["status"] == "lost"
    assert second[1]["gpu"]["utilization"]["gpu_pct"] is None
    assert any("GPU 1 (GPU-1) is lost" in r.getMessage() for r in caplog.records)
    third = col.collect(3.0)
    assert [e["gpu"]["uuid"] for e in third] == ["GPU-0", "GPU-2"]
    assert col.metrics.value("gpusentry_agent_gpus", {"state": "lost"}) == 1
    assert col.metrics.value("gpusentry_agent_collector_errors_total", {"collector": "gpu", "reason": "gpu_lost"}) == 1


def test_driver_restart_reinitialises_and_reenumerates(caplog):
    lib = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    clock = Clock()
    col = collector(lib, retry_s=30, clock=clock)
    col.start()
    assert len(col.collect(1.0)) == 2
    lib.unload_driver()
    with caplog.at_level(logging.WARNING, logger="agents.gpu"):
        assert col.collect(2.0) == []
        assert any("driver was probably restarted" in r.getMessage() for r in caplog.records)
        clock.t += 31
        assert col.collect(3.0) == []  # still gone: retried, quietly
        lib.load_driver()
        lib.gpus.append(FakeGpu("GPU-2"))  # a GPU that came back with the driver
        assert col.collect(4.0) == []  # not yet time to retry
        clock.t += 31
        events = valid(col.collect(5.0))
    assert [e["gpu"]["uuid"] for e in events] == ["GPU-0", "GPU-1", "GPU-2"]
    assert col.metrics.value("gpusentry_agent_nvml_reinit_total") == 1
    assert any("NVML answers again: 3 GPU(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("library", "driver", "expected"), [
    (False, True, "NVMLError_LibraryNotFound"),
    (True, False, "NVMLError_DriverNotLoaded"),
])
def test_no_nvml_at_all_is_one_clear_line(caplog, library, driver, expected):
    col = collector(FakeNvml([], shared_object_present=library, driver_loaded=driver))
    with caplog.at_level(logging.WARNING, logger="agents.gpu"):
        assert col.start() is False
        assert col.collect(1.0) == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "GPU collector off" in lines[0] and expected in lines[0] and "Process and network collection go on" in lines[0]


def test_real_pynvml_on_this_machine_degrades_cleanly(caplog):
    """The real module: on a host without a driver it must switch itself off, not raise."""
    col = GpuCollector(HOST, metrics=AgentMetrics())
    with caplog.at_level(logging.WARNING, logger="agents.gpu"):
        started = col.start()
    try:
        if started:  # a real GPU host: the samples must be valid contract events
            valid(col.collect(1.0))
        else:
            assert "GPU collector off" in caplog.records[0].getMessage()
    finally:
        col.close()
