"""GPU collector: one ``gpusentry.gpu`` event per GPU (and per MIG instance) per cycle, from NVML.

NVML is reached through the ``pynvml`` module (NVIDIA's nvidia-ml-py); tests pass a fake module
with the same functions, structs and exceptions.  How failures are handled, field by field:

* ``NVMLError_NotSupported`` / ``NoPermission`` on one field: that field is ``null``, the sample
  goes on (consumer GPUs, vGPUs and MIG parents lack many counters).
* ``NVMLError_GpuIsLost`` (fell off the bus, Xid 79) on one device: reported once (log, metric, one
  event with ``gpusentry.gpu.status = "lost"``), the device is skipped until NVML is re-initialised.
* ``Uninitialized`` / ``DriverNotLoaded`` / ``LibRmVersionMismatch`` / ``Unknown`` anywhere: the
  driver went away (restart, upgrade).  NVML is shut down and initialised again every
  ``nvml_retry_s`` until it answers; devices are then enumerated afresh.
* No NVML at all (no driver, no GPU, no library): one clear log line, the collector is off, the
  other collectors keep running.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from agents.cgroups import CgroupOwner, PodNames
from agents.metrics import AgentMetrics
from agents.procfs import ProcessInfo, ProcFS
from agents.scheduler import Holder, SchedulerView
from gpusentry.contract import gpu_event

log = logging.getLogger(__name__)

# Errors that mean "this counter does not exist here": the field becomes null.
_FIELD_ABSENT = ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound",
                 "NVMLError_NotFound", "NVMLError_NoData")
# Errors that mean "the driver is gone": re-initialise NVML.
_DRIVER_GONE = ("NVMLError_Uninitialized", "NVMLError_DriverNotLoaded", "NVMLError_LibRmVersionMismatch",
                "NVMLError_Unknown", "NVMLError_LibraryNotFound")
_GKE_DEVICE = re.compile(r"nvidia(\d+)(?:/(gi|vgpu)(\d+))?")
_DEVICE_GONE = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired", "NVMLError_GpuNotFound")


class _DriverGone(Exception):
    pass


class _DeviceGone(Exception):
    pass


@dataclass
class Device:
    """One NVML device: a whole GPU, or a MIG instance (``parent_index`` set, ``mig=True``)."""

    index: int
    handle: Any
    uuid: str
    name: str | None
    mig: bool = False
    mig_enabled: bool = False  # a parent GPU in MIG mode: its processes live on the instances
    lost: bool = False
    last_sample_us: int = 0  # newest process-utilization sample seen (NVML's microsecond clock)
    children: list[Device] = field(default_factory=list)
    minor: int | None = None  # /dev/nvidiaN (whole GPUs): how GKE's device plugin names it
    gpu_instance: int | None = None  # MIG instances: the GPU instance id (GKE's nvidia0/gi7)


@dataclass
class GpuHolders:
    """What the scheduler says about one GPU in one cycle."""

    source: str
    state: str  # current | stale | unmanaged
    age_s: float
    holders: list[Holder]
    judges_host_processes: bool


def load_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuCollector:
    name = "gpu"

    def __init__(self, host_name: str, *, nvml: ModuleType | None = None, procfs: ProcFS | None = None,
                 metrics: AgentMetrics | None = None, retry_s: float = 30.0,
                 clock: Any = time.monotonic, scheduler: SchedulerView | None = None,
                 pods: PodNames | None = None) -> None:
        self.host_name = host_name
        self.nvml = nvml if nvml is not None else load_nvml()
        self.procfs = procfs or ProcFS()
        self.metrics = metrics or AgentMetrics()
        self.retry_s = retry_s
        self.clock = clock
        self.enabled = False  # False: no NVML on this host at all, the collector is off
        self.ready = False  # NVML initialised and devices enumerated
        self.devices: list[Device] = []
        self._next_retry = 0.0
        self._absent_logged: set[tuple[str, str]] = set()
        self._proc_cache: dict[int, ProcessInfo] = {}
        self.scheduler = scheduler
        self.pods = pods
        self._holders: dict[str, GpuHolders] = {}  # uuid -> this cycle's allocation

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        """Initialise NVML; False (and one log line) when this host has none."""
        nv = self.nvml
        if nv is None:
            log.warning("GPU collector off: the pynvml module (nvidia-ml-py) is not installed; "
                        "process and network collection go on")
            return False
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            log.warning("GPU collector off: NVML is not available here (%s: %s); this host has no NVIDIA "
                        "driver or GPU, or the agent cannot see /dev/nvidia* and libnvidia-ml.so.1. "
                        "Process and network collection go on", type(exc).__name__, exc)
            return False
        self.enabled = True
        try:
            self._enumerate()
        except _DriverGone as exc:
            self._lost_driver(exc)
        if self.scheduler is not None:
            self.scheduler.start()
        return True

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        if self.ready and self.nvml is not None:
            self.ready = False
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)

    def _call(self, fn: Any, *args: Any) -> Any:
        """Call NVML, turning driver-level and device-level failures into our two exceptions."""
        nv = self.nvml
        assert nv is not None
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            kind = type(exc).__name__
            if kind in _DRIVER_GONE:
                raise _DriverGone(f"{kind}: {exc}") from exc
            if kind in _DEVICE_GONE:
                raise _DeviceGone(f"{kind}: {exc}") from exc
            raise

    def _optional(self, device: Device, what: str, fn: Any, *args: Any) -> Any:
        """A field that may be unsupported here: None instead of an error."""
        nv = self.nvml
        assert nv is not None
        try:
            return self._call(fn, *args)
        except nv.NVMLError as exc:
            kind = type(exc).__name__
            if kind not in _FIELD_ABSENT:
                self.metrics.collector_errors.labels(self.name, kind).inc()
            if (device.uuid, what) not in self._absent_logged:
                self._absent_logged.add((device.uuid, what))
                log.info("GPU %s (%s): %s not available (%s); reported as null", device.index, device.uuid,
                         what, exc)
            return None

    def _enumerate(self) -> None:
        nv = self.nvml
        assert nv is not None
        devices: list[Device] = []
        for index in range(self._call(nv.nvmlDeviceGetCount)):
            try:
                handle = self._call(nv.nvmlDeviceGetHandleByIndex, index)
                uuid = self._call(nv.nvmlDeviceGetUUID, handle)
            except _DeviceGone as exc:
                log.error("GPU %d is lost (%s) and is skipped; it needs a reset or a reboot", index, exc)
                self.metrics.collector_errors.labels(self.name, "gpu_lost").inc()
                continue
            dev = Device(index, handle, _text(uuid), None)
            dev.name = _text(self._optional(dev, "name", nv.nvmlDeviceGetName, handle))
            mode = self._optional(dev, "MIG mode", nv.nvmlDeviceGetMigMode, handle)
            dev.mig_enabled = bool(mode) and mode[0] == nv.NVML_DEVICE_MIG_ENABLE
            dev.minor = self._optional(dev, "minor number", nv.nvmlDeviceGetMinorNumber, handle)
            devices.append(dev)
        self.devices = devices
        self.ready = True
        n_mig = 0
        for dev in devices:
            if dev.mig_enabled:
                self._enumerate_mig(dev)
                n_mig += len(dev.children)
        log.info("GPU collector: %d GPU(s)%s", len(devices), f", {n_mig} MIG instance(s)" if n_mig else "")

    def _enumerate_mig(self, parent: Device) -> None:
        nv = self.nvml
        assert nv is not None
        known = {c.uuid: c for c in parent.children}
        children = []
        count = self._optional(parent, "MIG device count", nv.nvmlDeviceGetMaxMigDeviceCount, parent.handle) or 0
        for slot in range(count):
            try:
                handle = self._call(nv.nvmlDeviceGetMigDeviceHandleByIndex, parent.handle, slot)
            except nv.NVMLError_NotFound:
                continue  # an empty slot: no instance created there
            uuid = _text(self._call(nv.nvmlDeviceGetUUID, handle))
            child = known.get(uuid) or Device(parent.index, handle, uuid, None, mig=True)
            child.handle = handle
            if child.name is None:
                child.name = _text(self._optional(child, "name", nv.nvmlDeviceGetName, handle))
                child.gpu_instance = self._optional(child, "GPU instance id", nv.nvmlDeviceGetGpuInstanceId, handle)
            children.append(child)
        parent.children = children

    def _lost_driver(self, exc: Exception) -> None:
        log.error("NVML stopped answering (%s): the NVIDIA driver was probably restarted or upgraded; "
                  "retrying every %.0f s", exc, self.retry_s)
        self.metrics.collector_errors.labels(self.name, "driver_gone").inc()
        self.close()
        self.ready = False
        self.devices = []
        self._next_retry = self.clock() + self.retry_s

    def _reinit(self) -> bool:
        nv = self.nvml
        assert nv is not None
        if self.clock() < self._next_retry:
            return False
        try:
            nv.nvmlInit()
            self._enumerate()
        except (nv.NVMLError, _DriverGone) as exc:
            log.debug("NVML still unavailable: %s", exc)
            self._next_retry = self.clock() + self.retry_s
            return False
        self.metrics.nvml_reinit.inc()
        log.warning("NVML answers again: %d GPU(s) found", len(self.devices))
        return True

    # ------------------------------------------------------------------ sampling

    def collect(self, now: float) -> list[dict[str, Any]]:
        if not self.enabled:
            return []
        if not self.ready and not self._reinit():
            self.metrics.gpus.labels("ok").set(0)
            return []
        events: list[dict[str, Any]] = []
        try:
            # Resolved against the MIG instances known so far (a reconfiguration shows one cycle later).
            self._holders = self.allocations()
            for dev in self.devices:
                if dev.lost:
                    continue
                try:
                    if dev.mig_enabled:
                        self._enumerate_mig(dev)
                    events.append(self._sample(dev, now))
                    for child in dev.children:
                        events.append(self._sample(child, now))
                except _DeviceGone as exc:
                    dev.lost = True
                    log.error("GPU %d (%s) is lost (%s): no more samples until it is reset; other GPUs go on",
                              dev.index, dev.uuid, exc)
                    self.metrics.collector_errors.labels(self.name, "gpu_lost").inc()
                    events.append(self._lost_event(dev, now))
        except _DriverGone as exc:
            self._lost_driver(exc)
            return events
        ok = sum(1 + len(d.children) for d in self.devices if not d.lost)
        self.metrics.gpus.labels("ok").set(ok)
        self.metrics.gpus.labels("lost").set(sum(1 for d in self.devices if d.lost))
        self.metrics.events.labels(self.name).inc(len(events))
        return events

    def _lost_event(self, dev: Device, now: float) -> dict[str, Any]:
        event = gpu_event(self.host_name, now, index=dev.index, uuid=dev.uuid, name=dev.name)
        event["gpusentry"] = {"gpu": {"status": "lost"}}
        return event

    def _sample(self, dev: Device, now: float) -> dict[str, Any]:
        nv = self.nvml
        assert nv is not None
        h = dev.handle
        opt = self._optional
        util = opt(dev, "utilization", nv.nvmlDeviceGetUtilizationRates, h)
        mem = opt(dev, "memory", nv.nvmlDeviceGetMemoryInfo, h)
        power_mw = opt(dev, "power draw", nv.nvmlDeviceGetPowerUsage, h)
        limit_mw = opt(dev, "power limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
        temp = opt(dev, "temperature", nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        sm_clock = opt(dev, "SM clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
        mem_clock = opt(dev, "memory clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
        # NVML reports PCIe throughput in KB/s over a 20 ms window.
        rx_kb = opt(dev, "PCIe rx", nv.nvmlDeviceGetPcieThroughput, h, nv.NVML_PCIE_UTIL_RX_BYTES)
        tx_kb = opt(dev, "PCIe tx", nv.nvmlDeviceGetPcieThroughput, h, nv.NVML_PCIE_UTIL_TX_BYTES)
        processes = [] if dev.mig_enabled else self._processes(dev)
        return gpu_event(
            self.host_name, now, index=dev.index, uuid=dev.uuid, name=dev.name,
            gpu_pct=util.gpu if util is not None else None,
            memory_pct=util.memory if util is not None else None,
            memory_used_bytes=mem.used if mem is not None else None,
            memory_total_bytes=mem.total if mem is not None else None,
            power_draw_watts=power_mw / 1000 if power_mw is not None else None,
            power_limit_watts=limit_mw / 1000 if limit_mw is not None else None,
            temperature_c=temp, sm_clock_mhz=sm_clock, mem_clock_mhz=mem_clock,
            pcie_rx_bytes_per_s=rx_kb * 1024 if rx_kb is not None else None,
            pcie_tx_bytes_per_s=tx_kb * 1024 if tx_kb is not None else None,
            processes=processes, allocation=self._allocation_fields(dev))

    # ------------------------------------------------------------------ allocation

    def _allocation_fields(self, dev: Device) -> dict[str, Any] | None:
        held = self._holders.get(dev.uuid)
        if held is None:
            return None
        return {"source": held.source, "state": held.state, "age_s": round(held.age_s, 3),
                "judges_host_processes": held.judges_host_processes,
                "owners": [h.to_event() for h in held.holders]}

    def allocations(self) -> dict[str, GpuHolders]:
        """This cycle's scheduler answer, per device UUID (empty without a scheduler or an answer yet)."""
        if self.scheduler is None:
            return {}
        answer, state, age = self.scheduler.snapshot()
        if answer is None:
            return {}
        holders: dict[str, list[Holder]] = {}
        for device_id, hs in answer.devices.items():
            for uuid in self.resolve(device_id):
                known = holders.setdefault(uuid, [])
                known.extend(h for h in hs if h not in known)
        managed = None
        if answer.managed is not None:
            managed = {u for d in answer.managed for u in self.resolve(d)}
        out = {}
        for dev in self.devices:
            for d in (dev, *dev.children):
                s = state if managed is None or d.uuid in managed else "unmanaged"
                out[d.uuid] = GpuHolders(answer.source, s, age, holders.get(d.uuid, []), answer.judges_host_processes)
        return out

    def resolve(self, device_id: str) -> list[str]:
        """UUIDs of the devices a scheduler's device id names; a whole GPU in MIG mode stands for its instances.

        ``GPU-…``/``MIG-…`` (``::N`` time-slicing replicas stripped), ``index:N`` (NVML index: Slurm, Docker),
        ``minor:N`` (device minor number: cgroup v1 ``devices.list``), GKE's ``nvidiaN``, ``nvidiaN/giM`` and
        ``nvidiaN/vgpuM``, and ``all``."""
        base = device_id.split("::", 1)[0]
        whole: list[Device] = []
        if base == "all":
            whole = list(self.devices)
        elif base.startswith(("GPU-", "MIG-")):
            for dev in self.devices:
                if dev.uuid == base:
                    whole = [dev]
                    break
                for child in dev.children:
                    if child.uuid == base:
                        return [child.uuid]
        elif base.startswith("index:") and base[6:].isdigit():
            whole = [d for d in self.devices if d.index == int(base[6:])]
        elif base.startswith("minor:") and base[6:].isdigit():
            whole = [d for d in self.devices if d.minor == int(base[6:])]
        elif base.startswith("nvidia"):
            m = _GKE_DEVICE.fullmatch(base)
            if m:
                whole = [d for d in self.devices if d.minor == int(m.group(1))]
                if m.group(2) == "gi":
                    return [c.uuid for d in whole for c in d.children if c.gpu_instance == int(m.group(3))]
        out = []
        for dev in whole:
            out.append(dev.uuid)
            out.extend(c.uuid for c in dev.children)
        return out

    def _process_info(self, pid: int) -> ProcessInfo | None:
        """/proc details of a GPU process, cached while the pid keeps its start time (one read per cycle)."""
        st = self.procfs.stat(pid)
        if st is None:
            self._proc_cache.pop(pid, None)
            return None
        cached = self._proc_cache.get(pid)
        if cached is not None and cached.start_time == st[2]:
            return cached
        info = self.procfs.process(pid)
        if info is not None:
            if len(self._proc_cache) > 4096:
                self._proc_cache.clear()
            self._proc_cache[pid] = info
        return info

    def _processes(self, dev: Device) -> list[dict[str, Any]]:
        nv = self.nvml
        assert nv is not None
        by_pid: dict[int, int | None] = {}
        for fn, what in ((nv.nvmlDeviceGetComputeRunningProcesses, "compute processes"),
                         (nv.nvmlDeviceGetGraphicsRunningProcesses, "graphics processes")):
            for p in self._optional(dev, what, fn, dev.handle) or ():
                used = p.usedGpuMemory
                prev = by_pid.get(p.pid)
                by_pid[p.pid] = used if prev is None else prev + (used or 0)
        sm: dict[int, int] = {}
        if by_pid:
            samples = self._optional(dev, "per-process utilization", nv.nvmlDeviceGetProcessUtilization,
                                     dev.handle, dev.last_sample_us)
            newest: dict[int, int] = {}
            for s in samples or ():
                # Several samples per pid since the last call: keep the newest one's SM share.
                if s.timeStamp >= newest.get(s.pid, -1):
                    newest[s.pid] = s.timeStamp
                    sm[s.pid] = s.smUtil
                dev.last_sample_us = max(dev.last_sample_us, s.timeStamp)
        out = []
        for pid, used in sorted(by_pid.items()):
            info = self._process_info(pid)
            entry: dict[str, Any] = {"pid": pid, "used_memory_bytes": used, "sm_pct": sm.get(pid),
                     "name": info.name if info else None, "executable": info.executable if info else None,
                     "command_line": info.command_line if info else None}
            if info is not None and info.owner is not None:
                entry["owner"] = self._owner(info.owner)
            out.append(entry)
        return out

    def _owner(self, owner: CgroupOwner) -> dict[str, Any]:
        """The pod, job or container a GPU process's cgroup names (``gpu.processes[].owner``)."""
        fields: dict[str, Any] = {"kind": owner.kind}
        if owner.kind == "kubernetes":
            fields["pod_uid"] = owner.pod_uid
            if self.pods is not None:
                namespace, pod = self.pods.lookup(owner.pod_uid, time.time())
                if namespace:
                    fields["namespace"], fields["pod"] = namespace, pod
        if owner.container_id:
            fields["container_id"] = owner.container_id
        if owner.job_id:
            fields["job_id"] = owner.job_id
        if owner.step:
            fields["step"] = owner.step
        return fields


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
