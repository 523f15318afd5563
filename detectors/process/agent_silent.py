"""A GPU host's agent fell silent: no GPU sample for longer than its cadence allows, without having stopped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from detectors.base import Example, Finding
from detectors.examples import gpu, proc
from detectors.gpu._window import Sample, read_sample
from detectors.process._agent_health import BUSY_PCT, BUSY_WINDOW_S, AgentHealthDetector, lifecycle
from gpusentry.contract import Dataset, event_time

# Gaps shorter than this are the host's sampling cadence (several GPUs share one timestamp: gap 0).
_CADENCE_MAX_S = 60.0


@dataclass
class SilenceState:
    last_sample: float | None = None  # event time of the latest GPU sample
    cadence: float | None = None  # the host's sampling interval, learnt (EWMA of positive gaps)
    last_busy: float | None = None
    stopped: bool = False  # the agent said it was stopping: the gap that follows is explained (agent.tampered)
    other_events: int = 0  # non-GPU events since the latest GPU sample


class AgentSilent(AgentHealthDetector):
    id = "agent.silent"
    title = "gpusentry agent fell silent on a GPU host"
    description = ("A host that sends GPU samples every few seconds sent none for longer than "
                   "detection.agent_silent_after_s (120 s) or ten of its intervals, without having said it was "
                   "stopping: the agent was killed or frozen, the host was cut off, or NVML was blocked (then its "
                   "process and network events went on). Reported when the host is heard from again: medium, high "
                   "when its GPUs were busy just before; beside any other evidence on the host the incident is at "
                   "least high. A silence that never ends is the monitoring's to see "
                   "(the GpusentryAgentDown alert).")
    examples: ClassVar[list[Example]] = [
        Example("busy GPU host silent for ten minutes", True,
                [gpu(t, util=95) for t in range(0, 60, 5)] + [gpu(660, util=95)]),
        Example("GPU samples stop while process events go on (NVML blocked)", True,
                [gpu(t, util=90) for t in range(0, 60, 5)] + [proc("/usr/bin/ls", t=100 + k) for k in range(3)]
                + [gpu(400, util=90)]),
        Example("samples every 5 s", False, [gpu(t, util=95) for t in range(0, 600, 5)]),
        Example("a slow sampler (every 60 s) is not silent at 90 s", False,
                [gpu(t, util=10) for t in range(0, 600, 60)] + [gpu(690, util=10)]),
    ]

    def new_state(self) -> SilenceState:
        return SilenceState()

    def process(self, event: dict[str, Any], state: SilenceState) -> Iterable[Finding]:
        if event["event"]["dataset"] == Dataset.GPU.value:
            return self.process_parsed(event, read_sample(event, event_time(event)), state)
        stage, _ = lifecycle(event)
        if stage == "stopping":
            state.stopped = True
        state.other_events += 1
        return ()

    def process_parsed(self, event: dict[str, Any], parsed: Sample, state: SilenceState) -> Iterable[Finding]:
        ts, last = parsed.ts, state.last_sample
        if last is not None and ts <= last:  # another GPU of the same cycle, or a late sample
            if parsed.util is not None and parsed.util >= BUSY_PCT:
                state.last_busy = max(ts, state.last_busy or ts)
            return ()
        found: tuple[Finding, ...] = ()
        if last is not None:
            gap = ts - last
            if gap > self.settings.agent_silent_after_s and gap > 10 * (state.cadence or 0.0) and not state.stopped:
                found = (self._silence(event, state, ts, last, gap),)
            if gap <= _CADENCE_MAX_S:
                state.cadence = gap if state.cadence is None else 0.8 * state.cadence + 0.2 * gap
        state.last_sample = ts
        state.stopped = False
        state.other_events = 0
        if parsed.util is not None and parsed.util >= BUSY_PCT:
            state.last_busy = ts
        return found

    def _silence(self, event: dict[str, Any], state: SilenceState, ts: float, last: float, gap: float) -> Finding:
        busy = state.last_busy is not None and last - state.last_busy <= BUSY_WINDOW_S
        why = (f"; {state.other_events} other event(s) arrived meanwhile: NVML stopped answering or was blocked"
               if state.other_events else "")
        return self.finding(event, f"gpusentry agent on {event['host']['name']} sent no GPU sample for {gap:,.0f} s "
                            f"(usually every {state.cadence or 0:.0f} s){why}"
                            + ("; its GPUs were busy before" if busy else ""),
                            timestamp=ts, severity="high" if busy else "medium", score=0.6 if busy else 0.4)
