"""The agent itself stopped, restarted without stopping, had its spool removed, or lost a GPU from NVML: a monitor
switched off or its unsent evidence deleted."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding
from detectors.examples import gpu, proc
from detectors.gpu._window import Sample, read_sample
from detectors.process._agent_health import (
    BUSY_PCT,
    BUSY_WINDOW_S,
    AgentHealthDetector,
    agent_fields,
    gpu_lost,
    lifecycle,
)
from gpusentry import contract as c
from gpusentry.contract import Dataset, event_time


def _agent(t: float, lifecycle_: str, stop_signal: str | None = None, **fields: Any) -> dict[str, Any]:
    """The agent's own process event, as `gpusentry agent` sends it."""
    ev = proc("/usr/bin/python3 -m gpusentry.cli agent", t=t, pid=777, action="end" if lifecycle_ == "stopping"
              else "start", event_id=f"agent-{lifecycle_}-{int(t)}")
    c.set_path(ev, "gpusentry.agent.lifecycle", lifecycle_)
    if stop_signal:
        c.set_path(ev, "gpusentry.agent.stop_signal", stop_signal)
    for name, value in fields.items():
        c.set_path(ev, f"gpusentry.agent.{name}", value)
    return ev


def _removed(t: float, messages: int) -> dict[str, Any]:
    return _agent(t, "spool_removed", spool_problem="the spool directory /var/lib/gpusentry/spool was removed",
                  spool_removed_messages=messages)


def _lost(t: float) -> dict[str, Any]:
    ev = gpu(t, util=None)
    c.set_path(ev, "gpusentry.gpu.status", "lost")
    return ev


@dataclass
class AgentState:
    running: bool = False  # a `started` seen and no `stopping` since
    last_busy: float | None = None  # event time of the latest busy GPU sample
    lost: set[str] = field(default_factory=set)  # GPUs reported lost (said once until they answer again)


class AgentTampered(AgentHealthDetector):
    id = "agent.tampered"
    title = "gpusentry agent stopped, restarted unexpectedly or lost a GPU"
    description = ("The host's agent sent its last event because a signal stopped it, started again without "
                   "having stopped (it was killed: SIGKILL, an OOM kill, a crash; the finding says when its spool "
                   "was new too, so the last run's unsent events are gone), found its spool's files removed while "
                   "it ran, or a GPU it watched stopped answering NVML. Stopping the monitor and deleting what it "
                   "had not sent are what a hijacker does first: medium alone, high when the host's GPUs were busy "
                   "in the last 10 minutes or unsent events were removed; beside any other evidence on the host the "
                   "incident is at least high.")
    examples: ClassVar[list[Example]] = [
        Example("agent stopped by SIGTERM", True, [_agent(0, "started"), _agent(60, "stopping", "SIGTERM")]),
        Example("agent started again without having stopped (killed)", True,
                [_agent(0, "started"), gpu(5, util=95), _agent(300, "started")]),
        Example("a GPU that stopped answering NVML", True, [gpu(0, util=90), _lost(5)]),
        Example("spool removed with 40 unsent messages in it", True, [_agent(0, "started"), _removed(300, 40)],
                min_severity="high"),
        Example("killed, its spool deleted, started again", True,
                [_agent(0, "started"), _agent(300, "started", spool_new=True)]),
        Example("an agent that starts once", False, [_agent(0, "started"), gpu(5, util=95)]),
        Example("a stopped agent started again", False,
                [_agent(0, "started"), _agent(60, "stopping", "SIGTERM"), _agent(90, "started")],
                min_severity="high"),
        Example("an agent stopped, started again with a new spool (nothing was left unsent)", False,
                [_agent(0, "started"), _agent(60, "stopping", "SIGTERM"), _agent(90, "started", spool_new=True)],
                min_severity="high"),
        Example("ordinary process end", False, [proc("/usr/bin/python3 train.py", action="end")]),
    ]

    def new_state(self) -> AgentState:
        return AgentState()

    def process(self, event: dict[str, Any], state: AgentState) -> Iterable[Finding]:
        ts = event_time(event)
        if event["event"]["dataset"] == Dataset.GPU.value:
            return self.process_parsed(event, read_sample(event, ts), state)
        stage, stop_signal = lifecycle(event)
        if stage == "stopping":
            state.running = False
            return [self._finding(event, state, ts, f"gpusentry agent on {event['host']['name']} stopped by "
                                  f"{stop_signal or 'a signal'}: the host is unwatched until it is back")]
        if stage == "started":
            was_running, state.running = state.running, True
            if was_running:
                new_spool = agent_fields(event).get("spool_new") is True
                return [self._finding(event, state, ts, f"gpusentry agent on {event['host']['name']} started again "
                                      "without having stopped: it was killed (SIGKILL, an OOM kill) or crashed"
                                      + ("; its spool was new, so whatever the last run had not sent is gone "
                                         "(deleted, moved, or lost with its disk)" if new_spool else ""))]
        if stage == "spool_removed":
            fields = agent_fields(event)
            removed = fields.get("spool_removed_messages")
            removed = removed if isinstance(removed, int) and not isinstance(removed, bool) and removed > 0 else 0
            problem = fields.get("spool_problem")
            what = problem if isinstance(problem, str) and problem else "its spool's files were removed"
            return [self._finding(event, state, ts, f"gpusentry agent on {event['host']['name']} found its spool "
                                  f"deleted while it ran ({what}): {removed:,} unsent message(s) were in the "
                                  "removed files", removed=removed)]
        return ()

    def process_parsed(self, event: dict[str, Any], parsed: Sample, state: AgentState) -> Iterable[Finding]:
        util = parsed.util
        if util is not None:
            if util >= BUSY_PCT:
                state.last_busy = parsed.ts
            if state.lost:
                state.lost.discard(parsed.uuid)
            return ()
        if not gpu_lost(event) or parsed.uuid in state.lost:
            return ()
        state.lost.add(parsed.uuid)
        return [self._finding(event, state, parsed.ts, f"GPU {parsed.uuid} on {event['host']['name']} stopped "
                              "answering NVML while the agent watched it (driver reset, a GPU off the bus, or NVML "
                              "blocked)")]

    def _finding(self, event: dict[str, Any], state: AgentState, ts: float, message: str,
                 removed: int = 0) -> Finding:
        busy = state.last_busy is not None and ts - state.last_busy <= BUSY_WINDOW_S
        high = busy or removed > 0  # deleting unsent events is covering tracks, whatever the GPUs did
        return self.finding(event, message + ("; its GPUs were busy" if busy else ""), timestamp=ts,
                            severity="high" if high else "medium", score=0.7 if high else 0.5)
