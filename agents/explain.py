"""``gpusentry agent --explain``: one collection, printed for a person: each GPU, who the scheduler says holds it,
the processes on it with the pod/job their cgroup names, and the verdict the detectors will reach."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any, TextIO

from agents.agent import scheduler_view
from agents.cgroups import PodNames
from agents.gpu import GpuCollector
from agents.procfs import ProcFS
from detectors.gpu._allocation import judge
from detectors.gpu._window import read_sample
from gpusentry.config import Config
from gpusentry.contract import event_time
from gpusentry.terminal import plain


def explain(cfg: Config, out: TextIO, *, nvml: ModuleType | None = None, procfs: ProcFS | None = None) -> int:
    """Print one cycle's explanation to ``out``; 0, or 1 when this host has no GPU the agent can read."""
    s = cfg.agent
    pods = PodNames(s.pod_logs_dir)
    view = scheduler_view(s, pods, s.host_name)
    collector = GpuCollector(s.host_name, nvml=nvml, procfs=procfs or ProcFS(), scheduler=view, pods=pods)
    try:
        if not collector.start():
            print("no GPU: NVML is not available on this host (see the log line above)", file=out)
            return 1
        if view is None:
            print(f"scheduler: none (mode {s.scheduler.mode}); ownership is judged by [detection.gpu] "
                  "allowed_executables and learned jobs", file=out)
        else:
            answer, state, age = view.snapshot()
            print(f"scheduler: {view.source.name}, {state}" +
                  (f" (read {age:.1f} s ago)" if answer is not None else " (no answer yet: see the warning above)"),
                  file=out)
        events = collector.collect(time.time())
        for event in events:
            _explain_gpu(event, out)
        return 0 if events else 1
    finally:
        collector.close()


def _explain_gpu(event: dict[str, Any], out: TextIO) -> None:
    sample = read_sample(event, event_time(event))
    g = event["gpu"]
    util = (g.get("utilization") or {}).get("gpu_pct")
    print(f"GPU {sample.index}  {plain(sample.uuid)}  {plain(sample.name or '?')}  busy "
          f"{'?' if util is None else f'{util:.0f} %'}", file=out)
    alloc = sample.allocation
    if alloc is None:
        print("  held by: (no scheduler answer)", file=out)
    else:
        print(f"  held by: {plain(alloc.holders_text())}  [{alloc.source}, {alloc.state}]", file=out)
    if not sample.procs:
        print("  processes: none", file=out)
    for p in sample.procs or ():
        owner = p.owner.describe() if p.owner else "the host (no pod, job or container)"
        if alloc is not None and alloc.decides:
            inside, why = judge(alloc, p.owner)
            verdict = {True: "inside its allocation", False: "OUTSIDE its allocation",
                       None: "undecided: allowlist applies"}[inside] + f" ({why})"
        else:
            verdict = "judged by allowlist and learned jobs"
        print(f"  pid {p.pid}  {plain(p.executable or p.name or '?')}  owner: {plain(owner)}  -> {plain(verdict)}",
              file=out)
