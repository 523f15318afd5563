"""A faithful fake of the ``pynvml`` module (nvidia-ml-py) for hosts without an NVIDIA GPU.

Fidelity first: the fake *re-uses* the real module's exception classes (``NVMLError`` and its
generated ``NVMLError_*`` subclasses), constants and ctypes structs, so code that catches
``pynvml.NVMLError_NotSupported`` or reads ``util.gpu`` behaves exactly as against the real
library.  Only the functions are replaced, with the same names and signatures, and they fail the
way the real ones do:

* any call before ``nvmlInit()`` (or after the last ``nvmlShutdown()``) raises
  ``NVMLError_Uninitialized``; ``nvmlInit`` without the library raises ``LibraryNotFound``, without
  the kernel driver ``DriverNotLoaded``;
* a counter the device lacks raises ``NVMLError_NotSupported``;
* a GPU that fell off the bus raises ``NVMLError_GpuIsLost`` from every call on it;
* process-utilization with no sample newer than ``timeStamp`` raises ``NVMLError_NotFound``;
* MIG: ``nvmlDeviceGetMigMode`` returns ``[current, pending]``, an empty instance slot raises
  ``NVMLError_NotFound``, a slot past the maximum ``NVMLError_InvalidArgument``; MIG parents and
  MIG instances do not report utilization (``NotSupported``), as on real A100/H100s.

``FakeNvml.module()`` returns a fresh module object to inject as ``nvml=``.
"""

from __future__ import annotations

import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pynvml as _real

# Function names a FakeGpu can be told not to support (via FakeGpu.unsupported).
MIG_INSTANCE_UNSUPPORTED = frozenset({
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo", "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetProcessUtilization", "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
})
MAX_MIG_DEVICES = 7


@dataclass
class FakeProcess:
    pid: int
    used_bytes: int | None = 1 << 30
    kind: str = "compute"  # compute | graphics


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    gpu_pct: int = 0
    memory_pct: int = 0
    memory_total: int = 80 * 1024**3
    memory_used: int = 0
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    temperature_c: int = 35
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    pcie_rx_kb: int = 10
    pcie_tx_kb: int = 5
    processes: list[FakeProcess] = field(default_factory=list)
    # (pid, timeStamp in microseconds, smUtil %)
    samples: list[tuple[int, int, int]] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    mig_capable: bool = False
    mig_enabled: bool = False
    mig_slots: list[FakeGpu | None] = field(default_factory=list)
    minor: int | None = None  # /dev/nvidiaN; None: the GPU's position in the fake's list
    gpu_instance_id: int | None = None  # MIG instances: the GPU instance id (GKE's nvidia0/gi7)


class FakeHandle:
    """Stands in for ``c_nvmlDevice_t``: opaque to callers."""

    __slots__ = ("gpu", "generation", "parent")

    def __init__(self, gpu: FakeGpu, generation: int, parent: FakeGpu | None = None) -> None:
        self.gpu, self.generation, self.parent = gpu, generation, parent

    def __repr__(self) -> str:
        return f"<c_nvmlDevice_t {self.gpu.uuid}>"


class FakeNvml:
    """The fake library state: GPUs, driver and library presence, init refcount, call log."""

    def __init__(self, gpus: list[FakeGpu] | None = None, *, shared_object_present: bool = True,
                 driver_loaded: bool = True) -> None:
        self.gpus = list(gpus or [])
        self.shared_object_present = shared_object_present
        self.driver_loaded = driver_loaded
        self.refcount = 0
        self.generation = 0  # bumped by a driver reload: old sessions and handles go stale
        self.session = -1
        self.calls: deque[str] = deque(maxlen=100_000)  # the latest calls, for tests that check call order

    # ---------------------------------------------------------------- test controls

    def unload_driver(self) -> None:
        self.driver_loaded = False

    def load_driver(self) -> None:
        """The driver comes back; the old NVML session is gone and must be initialised again."""
        self.driver_loaded = True
        self.generation += 1

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _raise(code: int) -> None:
        raise _real.NVMLError(code)

    def _check_init(self) -> None:
        if self.refcount <= 0 or self.session != self.generation:
            if self.refcount > 0 and not self.driver_loaded:
                self._raise(_real.NVML_ERROR_DRIVER_NOT_LOADED)
            self._raise(_real.NVML_ERROR_UNINITIALIZED)
        if not self.driver_loaded:
            self._raise(_real.NVML_ERROR_DRIVER_NOT_LOADED)

    def _gpu(self, handle: Any, fn: str) -> FakeGpu:
        self.calls.append(fn)
        self._check_init()
        if not isinstance(handle, FakeHandle):
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
        if handle.generation != self.generation:
            self._raise(_real.NVML_ERROR_UNINITIALIZED)
        owner = handle.parent or handle.gpu
        if owner.lost or handle.gpu.lost:
            self._raise(_real.NVML_ERROR_GPU_IS_LOST)
        if fn in handle.gpu.unsupported:
            self._raise(_real.NVML_ERROR_NOT_SUPPORTED)
        return handle.gpu

    # ---------------------------------------------------------------- the module

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml", "fake pynvml (tests.fakes.fake_pynvml)")
        for name in dir(_real):
            if name.startswith(("NVML_", "NVMLError", "c_nvml", "nvmlFriendlyObject", "nvmlStructToFriendlyObject",
                                "NVMLLibraryMismatchError")):
                setattr(mod, name, getattr(_real, name))
        lib = self

        def nvmlInit() -> None:
            lib.calls.append("nvmlInit")
            if not lib.shared_object_present:
                lib._raise(_real.NVML_ERROR_LIBRARY_NOT_FOUND)
            if not lib.driver_loaded:
                lib._raise(_real.NVML_ERROR_DRIVER_NOT_LOADED)
            if lib.session != lib.generation:
                lib.refcount = 0
                lib.session = lib.generation
            lib.refcount += 1

        def nvmlInitWithFlags(flags: int) -> None:
            nvmlInit()

        def nvmlShutdown() -> None:
            lib.calls.append("nvmlShutdown")
            if lib.refcount <= 0:
                lib._raise(_real.NVML_ERROR_UNINITIALIZED)
            lib.refcount -= 1

        def nvmlSystemGetDriverVersion() -> str:
            lib.calls.append("nvmlSystemGetDriverVersion")
            lib._check_init()
            return "570.86.15"

        def nvmlDeviceGetCount() -> int:
            lib.calls.append("nvmlDeviceGetCount")
            lib._check_init()
            return len(lib.gpus)

        def nvmlDeviceGetHandleByIndex(index: int) -> FakeHandle:
            lib.calls.append("nvmlDeviceGetHandleByIndex")
            lib._check_init()
            if not 0 <= index < len(lib.gpus):
                lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            gpu = lib.gpus[index]
            if gpu.lost:
                lib._raise(_real.NVML_ERROR_GPU_IS_LOST)
            return FakeHandle(gpu, lib.generation)

        def nvmlDeviceGetIndex(handle: Any) -> int:
            gpu = lib._gpu(handle, "nvmlDeviceGetIndex")
            return lib.gpus.index(handle.parent or gpu)

        def nvmlDeviceGetUUID(handle: Any) -> str:
            return lib._gpu(handle, "nvmlDeviceGetUUID").uuid

        def nvmlDeviceGetName(handle: Any) -> str:
            return lib._gpu(handle, "nvmlDeviceGetName").name

        def _no_util_on_mig(handle: FakeHandle, gpu: FakeGpu) -> None:
            if gpu.mig_enabled or handle.parent is not None:
                lib._raise(_real.NVML_ERROR_NOT_SUPPORTED)

        def nvmlDeviceGetUtilizationRates(handle: Any) -> Any:
            gpu = lib._gpu(handle, "nvmlDeviceGetUtilizationRates")
            _no_util_on_mig(handle, gpu)
            return _real.c_nvmlUtilization_t(gpu=gpu.gpu_pct, memory=gpu.memory_pct)

        def nvmlDeviceGetMemoryInfo(handle: Any, version: Any = None) -> Any:
            gpu = lib._gpu(handle, "nvmlDeviceGetMemoryInfo")
            return _real.c_nvmlMemory_t(total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used,
                                        used=gpu.memory_used)

        def nvmlDeviceGetPowerUsage(handle: Any) -> int:
            return lib._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

        def nvmlDeviceGetEnforcedPowerLimit(handle: Any) -> int:
            return lib._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

        def nvmlDeviceGetPowerManagementLimit(handle: Any) -> int:
            return lib._gpu(handle, "nvmlDeviceGetPowerManagementLimit").power_limit_mw

        def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
            gpu = lib._gpu(handle, "nvmlDeviceGetTemperature")
            if sensor != _real.NVML_TEMPERATURE_GPU:
                lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            return gpu.temperature_c

        def nvmlDeviceGetClockInfo(handle: Any, type: int) -> int:  # noqa: A002 - the real signature
            gpu = lib._gpu(handle, "nvmlDeviceGetClockInfo")
            if type == _real.NVML_CLOCK_SM:
                return gpu.sm_clock_mhz
            if type == _real.NVML_CLOCK_MEM:
                return gpu.mem_clock_mhz
            if type in (_real.NVML_CLOCK_GRAPHICS, _real.NVML_CLOCK_VIDEO):
                return gpu.sm_clock_mhz
            lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            return 0

        def nvmlDeviceGetPcieThroughput(device: Any, counter: int) -> int:
            gpu = lib._gpu(device, "nvmlDeviceGetPcieThroughput")
            if counter == _real.NVML_PCIE_UTIL_RX_BYTES:
                return gpu.pcie_rx_kb
            if counter == _real.NVML_PCIE_UTIL_TX_BYTES:
                return gpu.pcie_tx_kb
            lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            return 0

        def _procs(handle: Any, fn: str, kind: str) -> list[Any]:
            gpu = lib._gpu(handle, fn)
            out = []
            for p in gpu.processes:
                if p.kind != kind:
                    continue
                raw = _real.c_nvmlProcessInfo_v3_t(pid=p.pid, usedGpuMemory=0 if p.used_bytes is None else p.used_bytes,
                                                   gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                obj = _real.nvmlStructToFriendlyObject(raw)
                if p.used_bytes is None:  # what the real binding does for NVML_VALUE_NOT_AVAILABLE
                    obj.usedGpuMemory = None
                out.append(obj)
            return out

        def nvmlDeviceGetComputeRunningProcesses(handle: Any) -> list[Any]:
            return _procs(handle, "nvmlDeviceGetComputeRunningProcesses", "compute")

        def nvmlDeviceGetGraphicsRunningProcesses(handle: Any) -> list[Any]:
            return _procs(handle, "nvmlDeviceGetGraphicsRunningProcesses", "graphics")

        def nvmlDeviceGetProcessUtilization(handle: Any, timeStamp: int) -> list[Any]:  # noqa: N803
            gpu = lib._gpu(handle, "nvmlDeviceGetProcessUtilization")
            _no_util_on_mig(handle, gpu)
            newer = [s for s in gpu.samples if s[1] > timeStamp]
            if not newer:
                lib._raise(_real.NVML_ERROR_NOT_FOUND)
            return [_real.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=ts, smUtil=sm, memUtil=0, encUtil=0,
                                                           decUtil=0) for pid, ts, sm in newer]

        def nvmlDeviceGetMigMode(device: Any) -> list[int]:
            gpu = lib._gpu(device, "nvmlDeviceGetMigMode")
            if not gpu.mig_capable or device.parent is not None:
                lib._raise(_real.NVML_ERROR_NOT_SUPPORTED)
            mode = _real.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else _real.NVML_DEVICE_MIG_DISABLE
            return [mode, mode]

        def nvmlDeviceGetMaxMigDeviceCount(device: Any) -> int:
            gpu = lib._gpu(device, "nvmlDeviceGetMaxMigDeviceCount")
            if not gpu.mig_capable or device.parent is not None:
                lib._raise(_real.NVML_ERROR_NOT_SUPPORTED)
            return MAX_MIG_DEVICES

        def nvmlDeviceGetMigDeviceHandleByIndex(device: Any, index: int) -> FakeHandle:
            gpu = lib._gpu(device, "nvmlDeviceGetMigDeviceHandleByIndex")
            if not gpu.mig_enabled:
                lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            if not 0 <= index < MAX_MIG_DEVICES:
                lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            child = gpu.mig_slots[index] if index < len(gpu.mig_slots) else None
            if child is None:
                lib._raise(_real.NVML_ERROR_NOT_FOUND)
            assert child is not None
            return FakeHandle(child, lib.generation, parent=gpu)

        def nvmlDeviceGetMinorNumber(device: Any) -> int:
            gpu = lib._gpu(device, "nvmlDeviceGetMinorNumber")
            if device.parent is not None:
                lib._raise(_real.NVML_ERROR_NOT_SUPPORTED)  # MIG instances have no /dev/nvidiaN of their own
            return gpu.minor if gpu.minor is not None else lib.gpus.index(gpu)

        def nvmlDeviceGetGpuInstanceId(device: Any) -> int:
            gpu = lib._gpu(device, "nvmlDeviceGetGpuInstanceId")
            if device.parent is None or gpu.gpu_instance_id is None:
                lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            assert gpu.gpu_instance_id is not None
            return gpu.gpu_instance_id

        def nvmlDeviceIsMigDeviceHandle(device: Any) -> int:
            lib._gpu(device, "nvmlDeviceIsMigDeviceHandle")
            return int(device.parent is not None)

        def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migDevice: Any) -> FakeHandle:  # noqa: N803
            lib._gpu(migDevice, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
            if migDevice.parent is None:
                lib._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            return FakeHandle(migDevice.parent, lib.generation)

        for name, value in list(locals().items()):
            if name.startswith("nvml") and callable(value):
                setattr(mod, name, value)
        return mod


def mig_gpu(uuid: str, instances: int, *, name: str = "NVIDIA A100-SXM4-80GB") -> FakeGpu:
    """A MIG-enabled GPU with ``instances`` instances in the first slots."""
    slots: list[FakeGpu | None] = [
        FakeGpu(uuid=f"MIG-{uuid[4:]}-{i}", name=f"{name} MIG 1g.10gb", memory_total=10 * 1024**3,
                unsupported=set(MIG_INSTANCE_UNSUPPORTED), gpu_instance_id=7 + i)
        for i in range(instances)]
    return FakeGpu(uuid=uuid, name=name, mig_capable=True, mig_enabled=True, mig_slots=slots)
