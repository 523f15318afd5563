"""Builders of GPU sample series for the GPU detectors' examples and tests.

Each profile returns contract ``gpusentry.gpu`` events, one per ``interval_s``, with the numbers
the workload shows on real hardware (see the simulator for the full, randomised versions).
"""

from __future__ import annotations

from typing import Any

from detectors.examples import HOST, T0
from gpusentry import contract as c

GIB = 2**30
A100 = "NVIDIA A100-SXM4-80GB"
A100_UUID = "GPU-a100-0000-0000-0000-000000000000"


def gpu(t: float, *, util: float | None, mem_pct: float | None = None, used_gib: float | None = None,
        total_gib: float = 80, power: float | None = None, limit: float | None = 400, sm: float | None = 1410,
        memclk: float | None = 1593, pcie: float | None = 0.0, procs: list[dict[str, Any]] | None = None,
        index: int = 0, uuid: str = A100_UUID, name: str | None = A100, host: str = HOST,
        allocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """One GPU sample at ``T0 + t``; ``procs`` entries as in :func:`gpusentry.contract.gpu_process`;
    ``allocation`` as the agent reports it (:func:`allocated`)."""
    return c.gpu_event(host, T0 + t, index=index, uuid=uuid, name=name, gpu_pct=util, memory_pct=mem_pct,
                       memory_used_bytes=int(used_gib * GIB) if used_gib is not None else None,
                       memory_total_bytes=int(total_gib * GIB), power_draw_watts=power, power_limit_watts=limit,
                       temperature_c=60, sm_clock_mhz=sm, mem_clock_mhz=memclk,
                       pcie_rx_bytes_per_s=pcie / 2 if pcie is not None else None,
                       pcie_tx_bytes_per_s=pcie / 2 if pcie is not None else None, processes=procs,
                       allocation=allocation, event_id=f"gpu-{index}-{int(t * 1000)}")


def gproc(pid: int, exe: str | None, *, gib: float = 4.0, sm: float | None = 95.0,
          cmd: str | None = None, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    name = exe.rsplit("/", 1)[-1][:15] if exe else None
    return c.gpu_process(pid, int(gib * GIB), sm, name, exe, cmd or exe, owner)


def pod(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """``gpu.processes[].owner`` of a process in a Kubernetes pod."""
    return {"kind": "kubernetes", "pod_uid": uid, "namespace": namespace, "pod": name}


def job(job_id: str, step: str = "0") -> dict[str, Any]:
    """``gpu.processes[].owner`` of a process in a Slurm job step."""
    return {"kind": "slurm", "job_id": job_id, "step": step}


def allocated(source: str, *owners: dict[str, Any], state: str = "current") -> dict[str, Any]:
    """``gpusentry.allocation`` of a sample: the GPU's holders as ``pod()``/``job()`` dicts (no owner: nobody)."""
    return {"source": source, "state": state, "age_s": 1.0, "judges_host_processes": source != "docker",
            "owners": [dict(o) for o in owners]}


TRAINER = "/usr/bin/python3.10"
MINER_EXE = "/dev/shm/.x/kswapd0"


def _wobble(i: int, amp: float) -> float:
    # deterministic, patternless enough for examples: no random module in example data
    return amp * (((i * 7919) % 13) / 6.0 - 1.0)


def idle(start: float, n: int, interval: float = 10.0, **kw: Any) -> list[dict[str, Any]]:
    return [gpu(start + i * interval, util=0, mem_pct=0, used_gib=0.5, power=55 + _wobble(i, 2), sm=210,
                memclk=1593, pcie=2e4, procs=[], **kw) for i in range(n)]


def training(start: float, n: int, interval: float = 10.0, *, dip_every: int = 30, pid: int = 2000,
             exe: str = TRAINER, owner: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """PyTorch training: ~95 % busy, board nearly full, GB/s over PCIe, a checkpoint dip now and then."""
    out = []
    for i in range(n):
        dip = dip_every and i % dip_every in (dip_every - 2, dip_every - 1)
        out.append(gpu(start + i * interval, util=5 if dip else 94 + _wobble(i, 4), mem_pct=8 if dip else 45,
                       used_gib=71, power=120 if dip else 360 + _wobble(i, 20), sm=1410,
                       pcie=3e8 if dip else 4e9, procs=[gproc(pid, exe, gib=70, sm=None, owner=owner,
                                                              cmd="python3 train.py --config llama.yaml")], **kw))
    return out


def shared_training(start: float, n: int, interval: float = 10.0, *, pid: int = 2000, guest_pid: int = 31337,
                    guest_gib: float = 4.5, **kw: Any) -> list[dict[str, Any]]:
    """Training with a second process beside it that fills the job's dips (a miner squeezed in: the GPU never
    drops below the guest's share)."""
    out = []
    for i in range(n):
        out.append(gpu(start + i * interval, util=99 - abs(_wobble(i, 1)), mem_pct=60, used_gib=71 + guest_gib,
                       power=380 + _wobble(i, 10), sm=1410, pcie=4e9,
                       procs=[gproc(pid, TRAINER, gib=70, sm=None, cmd="python3 train.py --config llama.yaml"),
                              gproc(guest_pid, "/usr/local/bin/python3", gib=guest_gib, sm=None)], **kw))
    return out


def mining(start: float, n: int, interval: float = 10.0, *, pid: int = 31337, exe: str | None = MINER_EXE,
           limit: float = 260, extra: list[dict[str, Any]] | None = None, owner: dict[str, Any] | None = None,
           **kw: Any) -> list[dict[str, Any]]:
    """An ethash-family miner: flat 100 %, memory controller busy, 5 GiB DAG, no PCIe, power-capped."""
    return [gpu(start + i * interval, util=100, mem_pct=93 + _wobble(i, 2), used_gib=5.4, power=250 + _wobble(i, 5),
                limit=limit, sm=1095, memclk=1593, pcie=4e3,
                procs=[gproc(pid, exe, gib=5.3, cmd=f"{exe} -c /dev/shm/.x/c.json" if exe else None, owner=owner),
                       *(extra or [])], **kw)
            for i in range(n)]


def burn_in(start: float, n: int, interval: float = 10.0, **kw: Any) -> list[dict[str, Any]]:
    """gpu-burn: flat 100 %, board filled, stock power limit reached, no PCIe."""
    return [gpu(start + i * interval, util=100, mem_pct=35 + _wobble(i, 3), used_gib=72, power=398, sm=1275,
                pcie=3e3, procs=[gproc(7000, "/usr/local/bin/gpu_burn", gib=72, cmd="gpu_burn -tc 600")], **kw)
            for i in range(n)]
