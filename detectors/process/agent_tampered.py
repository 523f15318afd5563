"""The agent itself stopped, restarted without stopping, or lost a GPU from NVML: a monitor switched off."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Example, Finding
from detectors.examples import gpu, proc
from detectors.gpu._window import Sample, read_sample
from detectors.process._agent_health import BUSY_PCT, BUSY_WINDOW_S, AgentHealthDetector, gpu_lost, lifecycle
from gpusentry import contract as c
from gpusentry.contract import Dataset, event_time


def _agent(t: float, lifecycle_: str, stop_signal: str | None = None) -> dict[str, Any]:
    """The agent's own process event, as `gpusentry agent` sends it."""
    ev = proc("/usr/bin/python3 -m gpusentry.cli agent", t=t, pid=777, action="start" if lifecycle_ == "started"
              else "end", event_id=f"agent-{lifecycle_}-{int(t)}")
    c.set_path(ev, "gpusentry.agent.lifecycle", lifecycle_)
    if stop_signal:
        c.set_path(ev, "gpusentry.agent.stop_signal", stop_signal)
    return ev


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
                   "having stopped (it was killed: SIGKILL, an OOM kill, a crash), or a GPU it watched stopped "
                   "answering NVML. Stopping the monitor is what a hijacker does first: medium alone, high when "
                   "the host's GPUs were busy in the last 10 minutes; beside other evidence it raises the "
                   "incident.")
    examples: ClassVar[list[Example]] = [
        Example("agent stopped by SIGTERM", True, [_agent(0, "started"), _agent(60, "stopping", "SIGTERM")]),
        Example("agent started again without having stopped (killed)", True,
                [_agent(0, "started"), gpu(5, util=95), _agent(300, "started")]),
        Example("a GPU that stopped answering NVML", True, [gpu(0, util=90), _lost(5)]),
        Example("an agent that starts once", False, [_agent(0, "started"), gpu(5, util=95)]),
        Example("a stopped agent started again", False,
                [_agent(0, "started"), _agent(60, "stopping", "SIGTERM"), _agent(90, "started")],
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
                return [self._finding(event, state, ts, f"gpusentry agent on {event['host']['name']} started again "
                                      "without having stopped: it was killed (SIGKILL, an OOM kill) or crashed")]
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

    def _finding(self, event: dict[str, Any], state: AgentState, ts: float, message: str) -> Finding:
        busy = state.last_busy is not None and ts - state.last_busy <= BUSY_WINDOW_S
        return self.finding(event, message + ("; its GPUs were busy" if busy else ""), timestamp=ts,
                            severity="high" if busy else "medium", score=0.7 if busy else 0.5)
