"""Test helpers for the agent: a TCP proxy that can be cut, and a broker that advertises it."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from gpusentry.broker import find_tansu, free_port, wait_for_port


class CuttableProxy:
    """Forwards a loopback port to an upstream; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.up = False
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self.up = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.up = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self.up:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


class ProxiedBroker:
    """The test broker (Apache Kafka, or Tansu with TEST_BROKER=tansu) whose advertised address is a cuttable
    proxy in front of it.

    Kafka clients connect to the address a broker advertises, so the proxy has to be what the broker
    advertises, or the client would bypass it after its first metadata request.
    """

    def __init__(self) -> None:
        from gpusentry.apache_kafka import KafkaCluster, KafkaUnavailable
        from tests.conftest import kafka_missing, selected_broker

        self.broker_port = free_port()
        self.proxy = CuttableProxy(("127.0.0.1", self.broker_port))
        self.kafka: KafkaCluster | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if selected_broker() == "kafka":
            try:
                self.kafka = KafkaCluster(listen_ports={1: self.broker_port},
                                          advertised_ports={1: self.proxy.port}).start()
            except KafkaUnavailable as exc:  # skipped with the reason, like the session broker's suites
                self.proxy.close()
                kafka_missing(exc)
            except BaseException:
                self.proxy.close()
                raise
            return
        fd, name = tempfile.mkstemp(prefix="gpusentry-proxied-broker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(find_tansu()), "broker", "--listener-url", f"tcp://127.0.0.1:{self.broker_port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.proxy.port}", "--storage-engine", "memory://tansu/"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        if not wait_for_port("127.0.0.1", self.broker_port, 20):
            self.stop()
            raise RuntimeError(f"proxied broker did not start: {self.log_path.read_text()[-2000:]}")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def stop(self) -> None:
        self.proxy.close()
        if self.kafka is not None:
            self.kafka.stop()
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self.log_path.unlink(missing_ok=True)


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[tuple[bytes, bytes]]:
    """(key, value) of every message in partition 0 of ``topic``, from the start, until at least ``expected`` arrived
    and the partition's end is reached (copies count towards ``expected``, so the end decides)."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"agent-test-{os.getpid()}-{topic}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    next_offset = 0
    try:
        while time.monotonic() < deadline:
            if len(out) >= expected and next_offset >= consumer.get_watermark_offsets(TopicPartition(topic, 0))[1]:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            out.append((msg.key(), msg.value()))
            next_offset = msg.offset() + 1
        # Anything beyond what we expected would be a duplicate: give it a moment to show up.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return out
