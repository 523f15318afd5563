"""A local Apache Kafka (KRaft) for the tests and for trying gpusentry against the broker used in production.

The broker's jars come from Maven Central through ``deploy/apache-kafka/pom.xml`` (``mvn
dependency:copy-dependencies``), resolved once into a cache directory the project ignores and reused while the
pom is unchanged.  A :class:`KafkaCluster` of one node (combined broker and controller) or three (each a broker
and a controller voter) runs on free loopback ports with its data in a directory of its own, so that a node can
be SIGKILLed and started again *with its data*, the way brokers restart in production.

    python -m gpusentry.apache_kafka resolve        # fetch the jars (progress on stderr)
    python -m gpusentry.apache_kafka run [--nodes 3] # a cluster in the foreground until Ctrl-C

Java 17 or newer and Maven are needed; without them :class:`KafkaUnavailable` says what to install.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gpusentry.broker import die_with_parent, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "deploy" / "apache-kafka" / "pom.xml"
# The tests of a clean clone resolve into the clone; GPUSENTRY_KAFKA_CACHE shares one resolution between clones.
DEFAULT_CACHE = REPO / "var" / "apache-kafka"
MIN_JAVA = 17
_LOG4J2 = """\
Configuration:
  Appenders:
    File:
      name: FILE
      fileName: "{path}"
      PatternLayout:
        Pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka
        level: INFO
      - name: org.apache.kafka
        level: WARN
      - name: state.change.logger
        level: WARN
    Root:
      level: WARN
      AppenderRef:
        - ref: FILE
"""


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be had here (no Java, no Maven, no resolution); the message says what to install."""


class KafkaStartFailed(RuntimeError):
    """Apache Kafka was there but did not start: a real failure, with the node's log."""


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not match:
        raise KafkaUnavailable(f"{POM} names no <kafka.version>")
    return match.group(1)


def java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise KafkaUnavailable(f"could not read the version of {java} (`{java} -version` printed "
                               f"{(out.stderr or out.stdout).strip()[:200]!r})")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise KafkaUnavailable(f"Apache Kafka needs Java {MIN_JAVA} or newer and none was found: install a JDK or "
                               "JRE (Debian: apt install openjdk-17-jre-headless) or set JAVA_HOME")
    major = java_major(java)
    if major < MIN_JAVA:
        raise KafkaUnavailable(f"{java} is Java {major}; Apache Kafka 4 needs Java {MIN_JAVA} or newer: install "
                               "openjdk-17-jre-headless or point JAVA_HOME at a newer JDK")
    return java


def resolve(cache: Path | None = None, *, progress: Callable[[str], None] | None = None) -> Path:
    """The directory holding Apache Kafka's jars, resolved with Maven on first use (about a minute) and reused."""
    cache = Path(os.environ.get("GPUSENTRY_KAFKA_CACHE") or cache or DEFAULT_CACHE)
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    lib = cache / f"{kafka_version()}-{digest}"
    if (lib / ".complete").exists():
        return lib
    mvn = shutil.which("mvn")
    if not mvn:
        raise KafkaUnavailable("Apache Kafka's jars are resolved with Maven and `mvn` is not on PATH: install Maven "
                               "(Debian: apt install maven), or set GPUSENTRY_KAFKA_CACHE to a directory that "
                               "already holds a resolution")
    say = progress or (lambda _line: None)
    say(f"resolving Apache Kafka {kafka_version()} with Maven into {lib} (once; about a minute)")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".resolving-", dir=cache))
    started = time.monotonic()
    proc = subprocess.Popen([mvn, "-B", "--no-transfer-progress", "-f", str(POM),
                             "dependency:copy-dependencies", "-DincludeScope=runtime",
                             f"-DoutputDirectory={staging}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if "Downloaded from" in line or "BUILD" in line:  # a fresh machine downloads ~60 MB: show it moving
            say(f"  [{time.monotonic() - started:5.1f} s] {line.strip()[:160]}")
    if proc.wait() != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaUnavailable("Maven could not resolve Apache Kafka's jars (check the network path to Maven "
                               "Central or your settings.xml mirror); its output ends with:\n" + "\n".join(tail))
    if not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaUnavailable(f"Maven finished but {staging} holds no kafka_2.13 jar")
    (staging / ".complete").write_text(digest + "\n")
    try:
        staging.rename(lib)  # atomic: a concurrent resolution either wins or finds ours
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"resolved in {time.monotonic() - started:.0f} s")
    return lib


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    internal_port: int
    data_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _out: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class KafkaCluster:
    """``nodes`` Apache Kafka nodes in KRaft mode on loopback; a context manager, or call start/stop.

    ``broker_config`` adds or overrides server properties (for example ``auto.create.topics.enable``);
    ``listen_ports`` and ``advertised_ports`` (by node id) fix a node's client port and the port it tells clients
    to use, for a proxy in front of it."""

    nodes: int = 1
    workdir: Path | None = None
    broker_config: dict[str, str] = field(default_factory=dict)
    heap: str = "384m"
    startup_timeout: float = 90.0
    progress: Callable[[str], None] | None = None
    listen_ports: dict[int, int] = field(default_factory=dict)
    advertised_ports: dict[int, int] = field(default_factory=dict)
    # SCRAM-SHA-512 user -> password: clients then connect over SASL_SSL only (a CA and a broker certificate are
    # made in the work directory), ACLs are enforced and nothing is allowed without one.  "admin" is added as the
    # super user; the brokers talk to each other on a loopback-only PLAINTEXT listener of their own.
    scram_users: dict[str, str] | None = None
    members: list[KafkaNode] = field(default_factory=list, init=False)
    _lib: Path | None = field(default=None, init=False, repr=False)
    _java: str = field(default="java", init=False, repr=False)  # found once, in start()
    _own_workdir: bool = field(default=False, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        """Where clients connect (SASL_SSL when ``scram_users`` is set)."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.members)

    @property
    def internal_bootstrap(self) -> str:
        """The brokers' own PLAINTEXT listener (a super user's; only the fixture itself should use it)."""
        return ",".join(f"127.0.0.1:{n.internal_port}" for n in self.members)

    @property
    def secure(self) -> bool:
        return self.scram_users is not None

    @property
    def ca_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "tls" / "ca.pem"

    def client_env(self, user: str) -> dict[str, str]:
        """gpusentry settings (environment) for a component connecting as ``user``."""
        env = {"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap_servers}
        if self.scram_users is not None:
            env.update({"GPUSENTRY_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                        "GPUSENTRY_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512", "GPUSENTRY_KAFKA__SASL_USERNAME": user,
                        "GPUSENTRY_KAFKA__SASL_PASSWORD": self.scram_users[user],
                        "GPUSENTRY_KAFKA__SSL_CAFILE": str(self.ca_path)})
        return env

    def client_config(self, user: str) -> dict[str, str]:
        """confluent-kafka (librdkafka) settings for ``user``."""
        conf = {"bootstrap.servers": self.bootstrap_servers}
        if self.scram_users is not None:
            conf.update({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": user,
                         "sasl.password": self.scram_users[user], "ssl.ca.location": str(self.ca_path)})
        return conf

    def _make_certificates(self) -> Path:
        """A throwaway CA and a broker certificate for 127.0.0.1/localhost; the broker's PEM key store."""
        openssl = shutil.which("openssl")
        if not openssl:
            raise KafkaUnavailable("TLS for the test cluster needs the openssl command (Debian: apt install openssl)")
        tls = self.ca_path.parent
        tls.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            done = subprocess.run([openssl, *args], cwd=tls, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise KafkaStartFailed(f"openssl {args[0]} failed: {done.stderr.strip()}")

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=gpusentry test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr", "-subj",
            "/CN=localhost")
        (tls / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "broker.pem", "-days", "2", "-extfile", "san.cnf")
        run("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8")  # Kafka's PEM store: PKCS#8
        store = tls / "broker-keystore.pem"
        store.write_text((tls / "broker.pk8").read_text() + (tls / "broker.pem").read_text())
        return store

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.members if n.node_id == node_id)

    def start(self) -> KafkaCluster:
        java = self._java = find_java()
        self._lib = resolve(progress=self.progress)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="gpusentry-kafka-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        ids = range(1, self.nodes + 1)
        ports = {i: (self.listen_ports.get(i) or free_port(), free_port()) for i in ids}
        internal = {i: free_port() for i in ids}
        scram: list[str] = []
        security: dict[str, str] = {}
        if self.scram_users is not None:
            self.scram_users = {"admin": self.scram_users.get("admin") or uuid.uuid4().hex, **self.scram_users}
            store = self._make_certificates()
            scram = [arg for user, password in self.scram_users.items()
                     for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")]
            security = {
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "ssl.keystore.type": "PEM", "ssl.keystore.location": str(store),
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found": "false",
                # The brokers' and controllers' own PLAINTEXT connections are ANONYMOUS on loopback.
                "super.users": "User:admin;User:ANONYMOUS",
            }
        voters = ",".join(f"{i}@127.0.0.1:{ports[i][1]}" for i in ids)
        replicas = str(min(3, self.nodes))
        # Kafka's cluster ids are 16 random bytes, URL-safe base64 without padding (22 characters).
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        for i in ids:
            port, cport = ports[i]
            home = self.workdir / f"node-{i}"
            home.mkdir(exist_ok=True)
            client = "SASL_SSL" if self.secure else "CLIENT"
            props = {
                "process.roles": "broker,controller", "node.id": str(i),
                "controller.quorum.voters": voters,
                "listeners": f"{client}://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal[i]},"
                             f"CONTROLLER://127.0.0.1:{cport}",
                "advertised.listeners": f"{client}://127.0.0.1:{self.advertised_ports.get(i, port)},"
                                        f"INTERNAL://127.0.0.1:{internal[i]}",
                "controller.listener.names": "CONTROLLER", "inter.broker.listener.name": "INTERNAL",
                "listener.security.protocol.map": f"{client}:{'SASL_SSL' if self.secure else 'PLAINTEXT'},"
                                                  "INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "log.dirs": str(home / "data"),
                "offsets.topic.replication.factor": replicas, "offsets.topic.num.partitions": "4",
                "transaction.state.log.replication.factor": replicas,
                "transaction.state.log.min.isr": "1", "default.replication.factor": replicas,
                "min.insync.replicas": "1",
                # Tests join groups constantly; production's 3 s wait for more members only slows them.
                "group.initial.rebalance.delay.ms": "0",
                # A SIGKILLed node loses its partitions' leadership once the controller misses its heartbeats:
                # 4 s instead of 9 s, so a leader-change test waits less.
                "broker.session.timeout.ms": "4000", "broker.heartbeat.interval.ms": "500",
                # gpusentry never relies on auto-creation: a test must see a missing topic as missing.
                "auto.create.topics.enable": "false",
                "num.partitions": "1", "log.segment.bytes": str(16 << 20),
                "message.max.bytes": str(12 << 20), "replica.fetch.max.bytes": str(12 << 20),
                **security,
                **self.broker_config,
            }
            config = home / "server.properties"
            config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
            (home / "log4j2.yaml").write_text(_LOG4J2.format(path=home / "kafka.log"))
            node = KafkaNode(i, port, cport, internal[i], home / "data", config, home / "kafka.log")
            self.members.append(node)
            fmt = subprocess.run([java, "-cp", f"{self._lib}/*", *self._jvm_flags(node), "kafka.tools.StorageTool",
                                  "format", "--ignore-formatted", f"--cluster-id={cluster_id}",  # an id may begin with "-"
                                  "-c", str(config), *scram],
                                 capture_output=True, text=True, timeout=120)
            if fmt.returncode != 0:
                self.stop()
                raise KafkaStartFailed(f"formatting node {i}'s KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        try:
            for node in self.members:
                self.start_node(node.node_id, wait=False)
            for node in self.members:
                self._wait(node)
        except BaseException:
            self.stop()
            raise
        return self

    def _jvm_flags(self, node: KafkaNode) -> list[str]:
        return [f"-Dlog4j2.configurationFile={node.config_path.parent / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={node.config_path.parent}"]

    def start_node(self, node_id: int, *, wait: bool = True) -> None:
        """Start (or restart, with its data) one node."""
        node = self.node(node_id)
        if node.running:
            return
        node._out = open(node.config_path.parent / "stdout.log", "ab")  # noqa: SIM115 - closed in _close()
        node.proc = subprocess.Popen(
            [self._java, f"-Xmx{self.heap}", f"-Xms{self.heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Djava.awt.headless=true", *self._jvm_flags(node), "-cp", f"{self._lib}/*", "kafka.Kafka",
             str(node.config_path)],
            stdout=node._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)
        if wait:
            self._wait(node)

    def _wait(self, node: KafkaNode) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not node.running:
                break
            if wait_for_port("127.0.0.1", node.internal_port, 0.5) and self._registered(node):
                return
            time.sleep(0.2)
        tail = self.log_tail(node.node_id)
        raise KafkaStartFailed(f"Apache Kafka node {node.node_id} did not come up on 127.0.0.1:{node.port} within "
                               f"{self.startup_timeout:.0f} s; its log ends with:\n{tail}")

    def _registered(self, node: KafkaNode) -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            md = AdminClient({"bootstrap.servers": f"127.0.0.1:{node.internal_port}"}).list_topics(timeout=2)
        except Exception:  # noqa: BLE001 - not ready yet is any error here; the caller retries until its deadline
            return False
        return node.node_id in md.brokers

    def kill_node(self, node_id: int) -> None:
        """SIGKILL one node (its data stays for :meth:`start_node`)."""
        node = self.node(node_id)
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)
        self._close(node)

    @staticmethod
    def _close(node: KafkaNode) -> None:
        node.proc = None
        if node._out is not None:
            node._out.close()
            node._out = None

    def stop(self) -> None:
        for node in self.members:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.members:
            if node.proc is not None:
                try:
                    node.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                    node.proc.wait(30)
            self._close(node)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, node_id: int, lines: int = 25) -> str:
        node = self.node(node_id)
        text = ""
        for path in (node.log_path, node.config_path.parent / "stdout.log"):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpusentry.apache_kafka", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("resolve", help="fetch Apache Kafka's jars with Maven (once) and print their directory")
    run = sub.add_parser("run", help="run a local cluster in the foreground until Ctrl-C")
    run.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    run.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary directory)")
    args = ap.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.command == "resolve":
            print(resolve(progress=say))
            return 0
        cluster = KafkaCluster(nodes=args.nodes, workdir=args.workdir, progress=say)
        say(f"starting {args.nodes} Apache Kafka {kafka_version()} node(s)")
        with cluster:
            print(f"bootstrap servers: {cluster.bootstrap_servers}  (export "
                  f"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS={cluster.bootstrap_servers}; Ctrl-C stops it)", flush=True)
            try:
                while all(n.running for n in cluster.members):
                    time.sleep(1)
            except KeyboardInterrupt:
                return 130
            down = [n.node_id for n in cluster.members if not n.running]
            say(f"node(s) {down} stopped; the log of node {down[0]} ends with:\n{cluster.log_tail(down[0])}")
            return 1
    except (KafkaUnavailable, KafkaStartFailed) as exc:
        say(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
