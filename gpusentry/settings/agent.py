"""Options of the host agent (`gpusentry agent`)."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, field_validator

from gpusentry.contract import MAX_PAYLOAD_BYTES
from gpusentry.settings.base import Section
from gpusentry.settings.scheduler import SchedulerSettings

CollectorName = Literal["gpu", "process", "network"]


def _all_collectors() -> list[CollectorName]:
    return ["gpu", "process", "network"]


class AgentSettings(Section):
    host_name: str = Field(default_factory=socket.gethostname,
                           description="`host.name` of every event; default: this machine's hostname.")
    interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between collection cycles.")
    collectors: list[CollectorName] = Field(
        default_factory=_all_collectors,
        description="Collectors to run. A collector that cannot run here (no NVIDIA driver) says so once and "
        "the others keep running.")
    process_source: Literal["auto", "netlink", "poll"] = Field(
        "auto", description="Process start/end source: `netlink` (the kernel's process-events connector: real "
        "time, sees short-lived processes; needs CAP_NET_ADMIN in the host network namespace), `poll` (/proc "
        "every cycle; processes shorter than a cycle can be missed), `auto` (netlink when it works, else poll).")
    ignore_process_tree: int | None = Field(
        None, ge=2, description="A pid whose descendants the process collector does not report. `gpusentry up` "
        "sets it to its own pid, so its embedded broker, worker and forwarder are not judged as the machine's "
        "processes. Leave it unset on a monitored host: whatever runs under that pid is unwatched.")
    hash_executables: bool = Field(
        False, description="Add `process.hash.sha256` of each new executable (cached by path, size and mtime).")
    hash_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="Executables larger than this are not hashed.")
    capture: Literal["auto", "on", "off"] = Field(
        "auto", description="Packet capture (AF_PACKET, needs CAP_NET_RAW) for DNS answers "
        "(`destination.domain`, `gpusentry.dns` events) and the first bytes of new flows (payload, TLS SNI). "
        "`auto`: on when privileged, else off with one log line.")
    payload_bytes: int = Field(
        MAX_PAYLOAD_BYTES, ge=0, le=MAX_PAYLOAD_BYTES,
        description="How many first bytes of each new flow to keep (`gpusentry.flow.payload_b64`); 0 keeps none.")
    payload_wait_s: float = Field(
        1.0, ge=0, le=60, description="With capture on, how long a new flow waits for its first bytes before "
        "it is published without them.")
    outputs: list[str] = Field(
        default_factory=lambda: ["kafka"],
        description="Where events go: `kafka`, `stdout`, `jsonl:PATH` (any number). `--output` overrides.")
    spool_dir: str = Field(
        "/var/lib/gpusentry/spool", description="On-disk spool: every Kafka message is written here first and "
        "removed once the broker acknowledged it, so an outage or a restart loses nothing.")
    spool_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024,
        description="Spool cap; beyond it the oldest unsent messages are dropped and counted.")
    message_timeout_ms: int = Field(
        60_000, ge=1000, description="How long the Kafka client itself retries a message before handing it "
        "back; it stays in the spool and is sent again, in order.")
    max_in_flight_messages: int = Field(
        500, ge=1, le=100_000, description="Spooled messages handed to the Kafka client at once (catch-up speed "
        "after an outage).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve self-metrics (Prometheus) on this port; unset: off.")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint (keep it local).")
    docker_root: str | None = Field(
        "/var/lib/docker", description="Docker's state directory: container names and images are read from "
        "`containers/<id>/config.v2.json` for `container.name`/`container.image.name` (sandbox recognition). "
        "Mount it read-only into the agent's container; unset or unreadable: names are left out.")
    pod_logs_dir: str | None = Field(
        "/var/log/pods", description="The kubelet's pod log directory (`<namespace>_<pod>_<uid>/`): pod names and "
        "namespaces for `orchestrator.*` of processes whose cgroup names a pod. Mount it read-only; unset: UIDs only.")
    scheduler: SchedulerSettings = Field(
        default_factory=SchedulerSettings, description="Who was allocated which GPU: Kubernetes, Slurm, Docker.")
    nvml_retry_s: float = Field(
        30.0, gt=0, description="After the NVIDIA driver went away (restart, upgrade), try NVML again this often.")

    @field_validator("outputs")
    @classmethod
    def _known_outputs(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in ("kafka", "stdout") and not (item.startswith("jsonl:") and len(item) > 6):
                raise ValueError(f"unknown output {item!r}; use kafka, stdout or jsonl:PATH")
        return value
