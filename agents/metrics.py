"""Self-metrics of the agent, on an optional Prometheus endpoint bound to localhost.

Each agent owns its registry (several agents run in one test process).  Rates such as events/s
per collector come from the counters (``rate(gpusentry_agent_events_total[1m])``); own CPU and
RSS come from prometheus-client's process collector (``process_cpu_seconds_total``,
``process_resident_memory_bytes``).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.events = Counter("gpusentry_agent_events", "Events collected, per collector.", ["collector"],
                              registry=r)
        self.collector_errors = Counter("gpusentry_agent_collector_errors",
                                        "Collection failures, per collector and reason.",
                                        ["collector", "reason"], registry=r)
        self.cycle_seconds = Gauge("gpusentry_agent_cycle_seconds", "Wall time of the last collection cycle.",
                                   registry=r)
        self.messages_spooled = Counter("gpusentry_agent_messages_spooled",
                                        "Messages written to the on-disk spool.", registry=r)
        self.messages_delivered = Counter("gpusentry_agent_messages_delivered",
                                          "Messages the broker acknowledged.", registry=r)
        self.delivery_failures = Counter("gpusentry_agent_delivery_failures",
                                         "Deliveries that failed and went back to the spool, per error.",
                                         ["error"], registry=r)
        self.producer_queue_full = Counter("gpusentry_agent_producer_queue_full",
                                           "Times the Kafka client's queue was full (BufferError); the "
                                           "messages waited in the spool.", registry=r)
        self.spool_messages = Gauge("gpusentry_agent_spool_messages", "Messages waiting in the spool.",
                                    registry=r)
        self.spool_bytes = Gauge("gpusentry_agent_spool_bytes", "Bytes on disk in the spool.", registry=r)
        self.spool_removals = Counter("gpusentry_agent_spool_removals",
                                      "Times the agent found its spool's files removed behind its back (reported "
                                      "as an agent event: agent.tampered).", registry=r)
        self.spool_errors = Counter("gpusentry_agent_spool_errors",
                                    "Checks of the spool that failed (it could not be made again); retried every "
                                    "cycle.", registry=r)
        self.spool_dropped = Counter("gpusentry_agent_spool_dropped_messages",
                                     "Unsent messages dropped because the spool was over its cap.", registry=r)
        self.oversize_dropped = Counter("gpusentry_agent_oversize_events_dropped",
                                        "Events larger than contract.max_message_bytes on their own.",
                                        registry=r)
        self.gpus = Gauge("gpusentry_agent_gpus", "GPUs and MIG instances seen, by state.", ["state"],
                          registry=r)
        self.nvml_reinit = Counter("gpusentry_agent_nvml_reinit", "Times NVML was initialised again after "
                                   "the driver went away.", registry=r)
        self.processes_vanished = Counter("gpusentry_agent_processes_vanished",
                                          "Processes that exited before /proc could be read.", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("self-metrics on http://%s:%d/metrics", host, server.server_port)
        return server

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (tests and the benchmark read metrics through this)."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got
