"""Who owns the work on a GPU: the configured allowlist, learned jobs, and the host's process table.

A GPU process is *owned* when

* its executable matches ``[detection.gpu] allowed_executables`` (globs on the full path; the
  process name is checked against ``allowed_process_names`` only when the path is unknown), or
  its user / container is allowlisted (both known from the host's process events); or
* it belongs to the *job* learned on that GPU: the owned processes found on the GPU when it came
  into use, and their descendants (a training script's dataloader workers, torchrun's ranks); or
* its program was seen on the host's GPUs during ``learn_jobs_for_s`` after the host was first seen.

Where the agent reports the scheduler's current answer for a GPU (``gpusentry.allocation``), that answer
decides instead: a process is owned when its pod, job or container was allocated the GPU
(:mod:`detectors.gpu._allocation`); the allowlist then only speaks for processes the scheduler cannot place.

The process table remembers what process events said about each pid (parent, user, container),
bounded, so it can be pickled into checkpoints.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from detectors.gpu._allocation import judge
from detectors.gpu._window import GpuProc, Sample
from detectors.process._cmdline import odd_hidden_dir, staging_dir
from gpusentry.knowledge import load_entries, resolve
from gpusentry.settings.gpu_detection import GpuDetectionSettings

MAX_PROCESSES = 4096  # process-table entries kept per host (oldest dropped first)
MAX_ANCESTRY = 12


@dataclass(slots=True)
class ProcInfo:
    ppid: int | None
    name: str | None
    executable: str | None
    user: str | None
    container: str | None
    command_line: str | None


class ProcessTable:
    """pid -> what the last process ``start`` event said about it (ended pids are dropped)."""

    __slots__ = ("procs", "_last", "version", "verdicts")

    def __init__(self) -> None:
        self.procs: dict[int, ProcInfo] = {}
        self._last: dict[str, Any] | None = None  # the event observed last (detectors of a host share a table)
        self.version = 0  # changes whenever procs does
        # uuid -> (allowlist, process list, version, verdicts): owned_flags' memo (not checkpointed)
        self.verdicts: dict[str, tuple[Allowlist, list[GpuProc], int, list[bool]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"procs": self.procs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.procs = state["procs"]
        self._last = None
        self.version = 0
        self.verdicts = {}

    def observe(self, event: dict[str, Any]) -> None:
        if event is self._last:
            return  # another detector of this host passed the same event on
        self._last = event
        self.version += 1
        p = event.get("process") or {}
        pid = p.get("pid")
        if type(pid) is not int:
            return
        if event["event"]["type"] == ["end"]:
            self.procs.pop(pid, None)
            return
        parent = p.get("parent") or {}
        ppid = parent.get("pid")
        self.procs.pop(pid, None)  # re-insert: dict order is age order
        self.procs[pid] = ProcInfo(ppid if type(ppid) is int else None, p.get("name"), p.get("executable"),
                                   (event.get("user") or {}).get("name"), (event.get("container") or {}).get("id"),
                                   p.get("command_line"))
        if len(self.procs) > MAX_PROCESSES:
            del self.procs[next(iter(self.procs))]

    def get(self, pid: int) -> ProcInfo | None:
        return self.procs.get(pid)

    def ancestors(self, pid: int) -> list[int]:
        out: list[int] = []
        seen = {pid}
        info = self.procs.get(pid)
        while info is not None and info.ppid is not None and info.ppid not in seen and len(out) < MAX_ANCESTRY:
            out.append(info.ppid)
            seen.add(info.ppid)
            info = self.procs.get(info.ppid)
        return out


def host_process_table(shared: dict[str, Any]) -> ProcessTable:
    """The one :class:`ProcessTable` the GPU detectors of a host share (built by the first)."""
    table = shared.get("gpu.process_table")
    if not isinstance(table, ProcessTable):
        table = shared["gpu.process_table"] = ProcessTable()
    return table


class Allowlist:
    """The configured allowlist, compiled once (:meth:`of` shares one per distinct configuration)."""

    _compiled: dict[tuple[tuple[str, ...], ...], Allowlist] = {}

    @classmethod
    def of(cls, settings: GpuDetectionSettings) -> Allowlist:
        """The allowlist of ``settings``: one object per distinct list of globs, names, users and containers.

        Detectors with the same configuration then hold the same object, which lets the verdicts on
        one sample's processes be worked out once for all of them (:func:`owned_flags`).
        """
        key = (tuple(settings.allowed_executables), tuple(settings.allowed_process_names),
               tuple(settings.allowed_users), tuple(settings.allowed_container_ids))
        allowlist = cls._compiled.get(key)
        if allowlist is None:
            if len(cls._compiled) >= 64:
                cls._compiled.clear()
            allowlist = cls._compiled[key] = cls(settings)
        return allowlist

    def __init__(self, settings: GpuDetectionSettings) -> None:
        pattern = "|".join(fnmatch.translate(g) for g in settings.allowed_executables) or r"(?!)"
        self._exe = re.compile(pattern)
        self._names = frozenset(settings.allowed_process_names)
        self._users = frozenset(settings.allowed_users)
        self._containers = tuple(settings.allowed_container_ids)
        self._exe_verdicts: dict[str, bool] = {}  # the same few programs show up in every sample

    def _exe_allowed(self, exe: str) -> bool:
        verdict = self._exe_verdicts.get(exe)
        if verdict is None:
            verdict = self._exe.match(exe) is not None
            if len(self._exe_verdicts) >= 4096:
                self._exe_verdicts.clear()
            self._exe_verdicts[exe] = verdict
        return verdict

    def allows(self, proc: GpuProc, info: ProcInfo | None) -> bool:
        exe = proc.executable or (info.executable if info else None)
        if exe:
            verdict = self._exe_verdicts.get(exe)
            if verdict or (verdict is None and self._exe_allowed(exe)):
                return True
        else:
            name = proc.name or (info.name if info else None)
            if name and name in self._names:
                return True
        if info is not None and (self._users or self._containers):
            if info.user and info.user in self._users:
                return True
            if info.container and any(info.container.startswith(c) for c in self._containers if c):
                return True
        return False


def owned_flags(sample: Sample, allowlist: Allowlist, table: ProcessTable) -> list[bool]:
    """For each of the sample's processes, whether ``allowlist`` owns it (given what ``table`` knows).

    Kept on the sample, so the detectors of a host that share the allowlist and the table (the
    usual case in an engine) ask the allowlist once per sample rather than once each.
    """
    cached = sample.owned
    if cached is not None and cached[0] is allowlist and cached[1] is table:
        return cached[2]
    listed = sample.procs or []
    alloc = sample.allocation
    if alloc is not None and alloc.decides:
        # The scheduler's truth replaces the allowlist; the allowlist only speaks where the scheduler cannot.
        flags = []
        for p in listed:
            verdict = judge(alloc, p.owner)[0]
            if verdict is None:
                info = table.procs.get(p.pid)
                verdict = allowlist.allows(p, info) or ordinary_launcher(p, info)
            flags.append(verdict)
        sample.owned = (allowlist, table, flags)
        return flags
    # A GPU's unchanged process list (read_sample reuses the parsed list) with an unchanged
    # process table has the verdicts it had on the last sample.
    memo = table.verdicts.get(sample.uuid)
    if memo is not None and memo[0] is allowlist and memo[1] is listed and memo[2] == table.version:
        flags = memo[3]
    else:
        procs = table.procs
        # An interpreter or launcher from an ordinary path counts as owned work for the behaviour models, as an
        # allowlisted interpreter does: without a scheduler nothing better is known (gpu.unowned_process still
        # notes it, low, and a second process beside it is still high).
        flags = [allowlist.allows(p, info) or ordinary_launcher(p, info) for p in listed
                 for info in (procs.get(p.pid),)]
        if len(table.verdicts) >= MAX_PROCESSES:
            table.verdicts.clear()
        table.verdicts[sample.uuid] = (allowlist, listed, table.version, flags)
    sample.owned = (allowlist, table, flags)
    return flags


LAUNCHERS_FILE = Path(__file__).with_name("launchers.toml")


@lru_cache(maxsize=4)
def load_launchers(path: Path | None = None) -> re.Pattern[str]:
    """One pattern matching the basenames of interpreters and launchers ordinary GPU work runs as."""
    path = path or resolve(LAUNCHERS_FILE)
    entries = load_entries(path, "launcher", required={"id": str, "names": list})
    return re.compile("|".join(fnmatch.translate(n) for e in entries for n in e["names"]))


def ordinary_launcher(proc: GpuProc, info: ProcInfo | None) -> bool:
    """An interpreter or job launcher (launchers.toml) run from an ordinary place: not a staging directory, not
    an odd hidden one."""
    exe = proc.executable or (info.executable if info else None)
    names = [n for n in (proc.name, info.name if info else None) if n]
    if exe:
        if staging_dir(exe) or odd_hidden_dir(exe):
            return False
        names.append(exe.rsplit("/", 1)[-1])
    pattern = load_launchers()
    return any(pattern.match(n) for n in names)


def program_of(proc: GpuProc, info: ProcInfo | None) -> str | None:
    """The program identity used for learned jobs: executable path, else name."""
    return proc.executable or (info.executable if info else None) or proc.name or (info.name if info else None)


def describe(proc: GpuProc, info: ProcInfo | None) -> str:
    exe = proc.executable or (info.executable if info else None)
    name = proc.name or (info.name if info else None)
    what = exe or name or "an unidentified process"
    return f"{what} (pid {proc.pid})"


def process_fields(proc: GpuProc, info: ProcInfo | None) -> dict[str, Any]:
    """ECS fields of a GPU process for the incident."""
    fields: dict[str, Any] = {"process.pid": proc.pid,
                              "process.name": proc.name or (info.name if info else None),
                              "process.executable": proc.executable or (info.executable if info else None),
                              "process.command_line": proc.command_line or (info.command_line if info else None)}
    if info is not None:
        fields["user.name"] = info.user
        fields["container.id"] = info.container
        fields["process.parent.pid"] = info.ppid
    if proc.owner is not None:
        fields.update(proc.owner.fields())
    return fields
