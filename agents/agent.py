"""The host agent: collectors on a fixed cadence, each cycle's events to every sink.

``Agent(cfg).run()`` is ``gpusentry agent``; ``gpusentry up`` and the tests build an ``Agent`` with
their own outputs and call :meth:`Agent.run_cycle` or :meth:`Agent.run`.  A collector that fails
in a cycle is counted (``gpusentry_agent_collector_errors_total``), logged with its traceback,
and the other collectors' events still go out; ``strict=True`` re-raises instead (tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from agents.cgroups import PodNames
from agents.gpu import GpuCollector
from agents.metrics import AgentMetrics
from agents.network import NetworkCollector
from agents.process import ProcessCollector
from agents.procfs import ContainerNames, ExecutableHasher, ProcFS
from agents.scheduler import SchedulerView, SourceError, build_source
from agents.sinks import JsonlSink, KafkaSink, Sink, StdoutSink
from agents.spool import Spool
from gpusentry.config import Config
from gpusentry.contract import Dataset
from gpusentry.settings.agent import AgentSettings

log = logging.getLogger(__name__)


class Collector(Protocol):
    name: str

    def start(self) -> bool: ...

    def collect(self, now: float) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class AgentError(RuntimeError):
    """The agent cannot start as configured; the message names the fix."""


def scheduler_view(settings: AgentSettings, pods: PodNames, host_name: str) -> SchedulerView | None:
    """The view of the configured scheduler (``[agent.scheduler]``), or None: ownership is then judged by
    allowlist and learned jobs."""
    sched = settings.scheduler
    try:
        source = build_source(sched, docker_root=settings.docker_root, pods=pods, node=host_name)
    except SourceError as exc:
        raise AgentError(str(exc)) from exc
    if source is None:
        log.info("scheduler: none found (mode %s); GPU ownership is judged by allowlist and learned jobs", sched.mode)
        return None
    log.info("scheduler: %s; its allocations decide who may use each GPU", source.name)
    return SchedulerView(source, refresh_s=sched.refresh_s, stale_after_s=sched.stale_after_s)


class Agent:
    def __init__(self, cfg: Config, *, outputs: list[str] | None = None, nvml: ModuleType | None = None,
                 procfs: ProcFS | None = None, collectors: list[Collector] | None = None,
                 kafka_extra: dict[str, Any] | None = None, strict: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.settings = cfg.agent
        self.host_name = cfg.agent.host_name
        self.metrics = AgentMetrics()
        self.strict = strict
        self.clock = clock
        self.procfs = procfs or ProcFS()
        self.collectors: list[Collector] = collectors if collectors is not None else self._build_collectors(nvml)
        self.sinks: list[Sink] = self._build_sinks(outputs or cfg.agent.outputs, kafka_extra)
        self.cycles = 0
        self._metrics_server: Any = None
        self._stop = threading.Event()
        self._started_at: float | None = None  # when announce("started") ran (the agent's own process start)

    def _build_collectors(self, nvml: ModuleType | None) -> list[Collector]:
        s = self.settings
        out: list[Collector] = []
        pods = PodNames(s.pod_logs_dir)
        if "gpu" in s.collectors:
            out.append(GpuCollector(self.host_name, nvml=nvml, procfs=self.procfs, metrics=self.metrics,
                                    retry_s=s.nvml_retry_s, scheduler=scheduler_view(s, pods, self.host_name),
                                    pods=pods))
        if "process" in s.collectors:
            hasher = ExecutableHasher(s.hash_max_bytes) if s.hash_executables else None
            out.append(ProcessCollector(self.host_name, procfs=self.procfs, metrics=self.metrics,
                                        source=s.process_source, hasher=hasher,
                                        containers=ContainerNames(s.docker_root), pods=pods,
                                        ignore_tree=s.ignore_process_tree))
        if "network" in s.collectors:
            out.append(NetworkCollector(self.host_name, procfs=self.procfs, metrics=self.metrics,
                                        capture=s.capture, payload_bytes=s.payload_bytes,
                                        payload_wait_s=s.payload_wait_s))
        return out

    def _build_sinks(self, outputs: list[str], kafka_extra: dict[str, Any] | None) -> list[Sink]:
        sinks: list[Sink] = []
        for item in outputs:
            if item == "stdout":
                sinks.append(StdoutSink())
            elif item.startswith("jsonl:") and len(item) > 6:
                sinks.append(JsonlSink(item[6:]))
            elif item == "kafka":
                if not self.cfg.kafka.bootstrap_servers:
                    raise AgentError("output 'kafka' needs kafka.bootstrap_servers (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS"
                                     "=host:9092), or use --output jsonl:PATH / --output stdout")
                try:
                    spool = Spool(self.settings.spool_dir, self.settings.spool_max_bytes)
                except OSError as exc:
                    raise AgentError(str(exc)) from exc
                if spool.pending:
                    log.info("spool holds %d unsent message(s) from an earlier run; they are sent first",
                             spool.pending)
                sinks.append(KafkaSink(self.cfg.kafka, self.cfg.topics.event_topics(), spool, self.metrics,
                                       max_message_bytes=self.cfg.contract.max_message_bytes,
                                       message_timeout_ms=self.settings.message_timeout_ms,
                                       max_in_flight=self.settings.max_in_flight_messages,
                                       extra_config=kafka_extra))
            else:
                raise AgentError(f"unknown output {item!r}; use kafka, stdout or jsonl:PATH")
        return sinks

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        started = []
        for c in self.collectors:
            if c.start():
                started.append(c)
        self.collectors = started
        if self.settings.metrics_port is not None:
            self._metrics_server = self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        log.info("agent %s: collectors %s, outputs %s, every %.3g s", self.host_name,
                 ", ".join(c.name for c in self.collectors) or "none",
                 ", ".join(type(s).__name__ for s in self.sinks), self.settings.interval_s)

    def run_cycle(self) -> int:
        """Collect once from every collector and hand the events to every sink; return the event count."""
        started = time.monotonic()
        now = self.clock()
        batches: dict[str, list[dict[str, Any]]] = {d.value: [] for d in Dataset if d is not Dataset.ALERT}
        for c in self.collectors:
            try:
                events = c.collect(now)
            except Exception as exc:
                # Counted and logged with its traceback; the other collectors' events still go out.
                self.metrics.collector_errors.labels(c.name, type(exc).__name__).inc()
                log.exception("collector %s failed this cycle", c.name)
                if self.strict:
                    raise
                continue
            for ev in events:
                batches[ev["event"]["dataset"]].append(ev)
        batches = {k: v for k, v in batches.items() if v}
        self._check_spool()
        for sink in self.sinks:
            if batches:
                sink.write(self.host_name, batches)
            elif isinstance(sink, KafkaSink):
                sink.pump()  # resend the spool even in a quiet cycle
        self.cycles += 1
        self.metrics.cycle_seconds.set(time.monotonic() - started)
        return sum(len(v) for v in batches.values())

    def _check_spool(self) -> None:
        """A spool removed behind the agent's back is reported as the agent's own event (agent.tampered): it held
        the events not yet sent, which is what someone covering their tracks deletes."""
        sink = self.kafka_sink()
        if sink is None:
            return
        try:
            removal = sink.check_spool()
        except OSError:
            # Counted and logged; the check runs again next cycle.
            self.metrics.spool_errors.inc()
            log.exception("the spool in %s could not be made again; check that agent.spool_dir is writable",
                          self.settings.spool_dir)
            if self.strict:
                raise
            return
        if removal is not None:
            self.announce("spool_removed", fields={"gpusentry.agent.spool_problem": removal.problem,
                                                   "gpusentry.agent.spool_removed_messages": removal.removed_messages})

    def run(self, cycles: int | None = None) -> None:
        """Cycle every ``interval_s`` (on a fixed grid, so a slow cycle does not shift the next ones)."""
        interval = self.settings.interval_s
        next_at = time.monotonic()
        done = 0
        while not self._stop.is_set():
            self.run_cycle()
            done += 1
            if cycles is not None and done >= cycles:
                break
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # overran: skip the missed slots rather than bunching cycles
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()

    def announce(self, lifecycle: str, stop_signal: str | None = None, fields: dict[str, Any] | None = None) -> None:
        """Publish the agent's own process event: ``started``; ``spool_removed`` when its spool's files were
        removed while it ran; ``stopping`` as its last event when a signal stops it. A worker that sees an agent
        stop, restart without having stopped, lose its spool or fall silent raises an incident (agent.tampered,
        agent.silent): switching the monitor off is also a hijacker's first move."""
        import getpass
        import os
        import sys

        from gpusentry.contract import process_event, set_path

        now = self.clock()
        try:
            name = Path("/proc/self/comm").read_text(encoding="utf-8").strip() or "gpusentry"
        except OSError:
            name = "gpusentry"
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = None
        event = process_event(self.host_name, now, action="end" if lifecycle == "stopping" else "start",
                              pid=os.getpid(), name=name, executable=sys.executable,
                              command_line=" ".join(sys.argv), args=list(sys.argv), start=self._started_at or now,
                              parent_pid=os.getppid(), user_name=user)
        set_path(event, "gpusentry.agent.lifecycle", lifecycle)
        if stop_signal is not None:
            set_path(event, "gpusentry.agent.stop_signal", stop_signal)
        for path, value in (fields or {}).items():
            set_path(event, path, value)
        if lifecycle == "started":
            self._started_at = now
            kafka = self.kafka_sink()
            if kafka is not None:
                set_path(event, "gpusentry.agent.spool_new", kafka.spool.created)
        for sink in self.sinks:
            sink.write(self.host_name, {Dataset.PROCESS.value: [event]})

    def close(self, timeout: float = 10.0) -> None:
        for c in self.collectors:
            c.close()
        for s in self.sinks:
            s.close(timeout)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def kafka_sink(self) -> KafkaSink | None:
        return next((s for s in self.sinks if isinstance(s, KafkaSink)), None)


def run_agent(cfg: Config, outputs: list[str] | None = None, cycles: int | None = None) -> int:
    """``gpusentry agent``: run until SIGTERM / Ctrl-C, then flush what can be flushed.  Returns the exit
    code: 0 (done, or stopped by SIGTERM as a service manager stops it), 130 after Ctrl-C (SIGINT)."""
    import signal

    agent = Agent(cfg, outputs=outputs)
    previous = signal.getsignal(signal.SIGTERM)
    stopped_by: list[str] = []

    def on_sigterm(*_: Any) -> None:
        stopped_by.append("SIGTERM")
        agent.stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    code = 0
    try:
        agent.start()
        agent.announce("started")  # `gpusentry agent` says when it starts and, below, when a signal stops it
        agent.run(cycles)
    except KeyboardInterrupt:
        log.info("interrupted; flushing")
        stopped_by.append("SIGINT")
        code = 130
    finally:
        if stopped_by:
            agent.announce("stopping", stopped_by[0])  # the last event: sent before the sinks flush and close
        agent.close()
        signal.signal(signal.SIGTERM, previous)
    return code
