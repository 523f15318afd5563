"""``gpusentry up``: the whole system on one machine, with a live view of the incidents.

Starts the embedded broker (unless ``kafka.bootstrap_servers`` names one), creates the topics, runs one
worker and the local agent as child processes, and shows every incident update live while appending
it to the incidents file (``worker.incidents_file``).  ``--demo`` also replays a simulated hijack on a
simulated host, so a machine without a GPU sees a detection within a minute.  Ctrl-C stops everything:
demo, agent, worker (which writes its final checkpoint), then the broker.

The embedded broker keeps everything in memory: topics, alerts and checkpoints are gone when ``up``
stops.  The incidents file is kept (and appended to by the next run).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gpusentry.broker import EmbeddedBroker, create_topics, die_with_parent
from gpusentry.config import Config
from gpusentry.contract import get
from gpusentry.terminal import CONTROL, shown

log = logging.getLogger(__name__)

DEMO_HOST = "sim-demo-gpu-01"
DEMO_SCENARIO = "miner-blatant"
DEMO_HISTORY_S = 15 * 60  # replayed at once: the hijack starts a quarter in, so it is found in seconds
DEMO_LIVE_S = 45 * 60  # then the same host goes on in real time
SEVERITY_STYLE = {"low": "cyan", "medium": "yellow", "high": "red", "critical": "bold white on red"}


@dataclass
class Child:
    """A child process (worker, agent, forwarder) with its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    note: str = ""

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # A session of its own: Ctrl-C reaches only `up`, which then stops the children in order.
            # Dies with `up` however `up` ends (a SIGKILL or a closed terminal included): no orphans.
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent)

    def status(self) -> str:
        if self.proc is None:
            return self.note or "not started"
        rc = self.proc.poll()
        if rc is None:
            return f"running (pid {self.proc.pid})"
        return f"exited with {rc}; see {self.log_path}"

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class IncidentView:
    """The latest update of every incident, by dedup key."""

    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)
    updates: int = 0
    unreadable: int = 0  # messages on the alerts topic that are not an alert object


    def add(self, alert: dict[str, Any]) -> None:
        key = get(alert, "gpusentry.alert.dedup_key") or get(alert, "event.id") or "?"
        self.incidents[str(key)] = alert
        self.updates += 1

    def table(self) -> Table:
        unreadable = f", {self.unreadable} unreadable messages skipped" if self.unreadable else ""
        t = Table(expand=True, title=f"incidents ({len(self.incidents)}, {self.updates} updates{unreadable})")
        for col in ("last update (event time)", "host", "severity", "status", "evidence", "GPU-h / USD", "message"):
            t.add_column(col, overflow="fold")
        for alert in sorted(self.incidents.values(), key=lambda a: str(a.get("@timestamp")), reverse=True)[:20]:
            t.add_row(*incident_row(alert))
        return t


def _decode_alert(value: bytes) -> dict[str, Any] | None:
    """An alert from the alerts topic, or None for a message that is not a JSON object."""
    try:
        alert = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return alert if isinstance(alert, dict) else None




def incident_row(alert: dict[str, Any]) -> list[Text]:
    """One incident as table cells.  Every cell is a ``Text``, never markup: host names, messages and
    signals come from monitored hosts (or from whoever can write the alerts topic), and a ``[/bold]``
    in a command line must print as itself, not end the live view with a MarkupError."""
    cost = get(alert, "gpusentry.alert.cost")
    cost = cost if isinstance(cost, dict) else {}
    severity = str(get(alert, "gpusentry.alert.severity", "?"))
    try:
        money = f"{float(cost.get('gpu_seconds', 0)) / 3600:.2f} / {float(cost.get('usd', 0)):.2f}"
    except (TypeError, ValueError):
        money = "?"
    signals = get(alert, "gpusentry.alert.signals")
    signals = signals if isinstance(signals, list) else []
    return [shown(alert.get("@timestamp", "")), shown(get(alert, "host.name", "")),
            Text(CONTROL.sub("?", severity), style=SEVERITY_STYLE.get(severity, "")),
            shown(get(alert, "gpusentry.alert.status", "")),
            shown(f"{get(alert, 'gpusentry.alert.evidence_count', 0)}: {', '.join(map(str, signals))}"), Text(money),
            shown(alert.get("message", ""))]


def demo_batches(start: float, scenario: str = DEMO_SCENARIO) -> Iterator[tuple[str, float, list[dict[str, Any]]]]:
    """The simulated scenario as agent-style messages: one per dataset per collection cycle."""
    from gpusentry.simulate import generate

    batch: list[dict[str, Any]] = []
    key: tuple[str, str] | None = None
    for event in generate(scenario, DEMO_HOST, start, DEMO_HISTORY_S + DEMO_LIVE_S, 5.0, seed=42):
        k = (event["event"]["dataset"], event["@timestamp"])
        if key is not None and k != key and batch:
            yield key[0], _ts(batch[0]), batch
            batch = []
        key = k
        batch.append(event)
    if batch and key is not None:
        yield key[0], _ts(batch[0]), batch


def _ts(event: dict[str, Any]) -> float:
    from gpusentry.contract import event_time

    return event_time(event)


class Demo(threading.Thread):
    """Publishes the simulated hijack: the first 15 minutes at once, the rest as the clock reaches it."""

    def __init__(self, cfg: Config, bootstrap: str, scenario: str = DEMO_SCENARIO) -> None:
        super().__init__(name="gpusentry-demo", daemon=True)
        self.cfg = cfg
        self.scenario = scenario
        self.bootstrap = bootstrap
        self.stopping = threading.Event()
        self.sent = 0
        self.error: str | None = None

    def run(self) -> None:
        from confluent_kafka import Producer

        topics = self.cfg.topics.event_topics()
        producer = Producer({**self.cfg.kafka.confluent_config(), "bootstrap.servers": self.bootstrap,
                             "linger.ms": 20, "enable.idempotence": False, "partitioner": "murmur2_random",
                             "log.connection.close": False})
        try:
            for dataset, ts, batch in demo_batches(time.time() - DEMO_HISTORY_S, self.scenario):
                while ts > time.time() and not self.stopping.is_set():
                    producer.poll(0)
                    self.stopping.wait(min(1.0, ts - time.time()))
                if self.stopping.is_set():
                    break
                producer.produce(topics[dataset], orjson.dumps(batch), key=DEMO_HOST.encode())
                producer.poll(0)
                self.sent += len(batch)
        except Exception as exc:  # noqa: BLE001 - shown in the live view; `up` goes on without the demo
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            producer.flush(5)


def _alerts_consumer(cfg: Config, bootstrap: str) -> Any:
    from confluent_kafka import Consumer

    consumer = Consumer({**cfg.kafka.confluent_config(), "bootstrap.servers": bootstrap,
                         "group.id": f"gpusentry-up-{os.getpid()}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 100,
                         "log.connection.close": False})
    consumer.subscribe([cfg.topics.alerts])
    return consumer


def run_up(cfg: Config, *, demo: bool, config_path: Path | None, console: Console,
           scenario: str = DEMO_SCENARIO, keep_spool: bool = False) -> int:
    """Run everything until Ctrl-C (exit 130), SIGTERM (130), a closed terminal (SIGHUP: 129) or a closed output
    (the program reading a pipe exited: 141); each stops the children in order the same way."""
    logs = Path(tempfile.mkdtemp(prefix="gpusentry-up-"))
    broker: EmbeddedBroker | None = None
    children: list[Child] = []
    demo_thread: Demo | None = None
    incidents_path = Path(cfg.worker.incidents_file).resolve()
    out = _Output(console)
    spool_dir: Path | None = None
    received: list[int] = []  # the stop signals that arrived (SIGTERM, SIGHUP)

    def on_stop_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt  # stops `up` the way Ctrl-C does; a second one while stopping is only noted

    previous = {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        if cfg.kafka.bootstrap_servers:
            bootstrap = cfg.kafka.bootstrap_servers
            broker_note = f"Kafka at {bootstrap}"
        else:
            console.print("starting the embedded broker ...")
            broker = EmbeddedBroker(log_path=logs / "broker.log").start()
            bootstrap = broker.bootstrap_servers
            broker_note = embedded_broker_note(bootstrap)
        create_topics(bootstrap, cfg.topics.all(), partitions=cfg.kafka.partitions,
                      client_config={k: v for k, v in cfg.kafka.confluent_config().items()
                                     if k != "bootstrap.servers"})
        # The local agent does not report this run's own processes (broker, worker, forwarder, itself): the
        # embedded broker runs from a hidden directory and would be `up`'s first incident.
        env = {**os.environ, "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
               "GPUSENTRY_AGENT__IGNORE_PROCESS_TREE": str(os.getpid())}
        if broker is not None:
            # The agent's spool outlives a run, the embedded broker does not: resending an old run's
            # events to a fresh broker would only confuse, so the spool lives and dies with this run.
            spool_dir = logs / "agent-spool"
            env["GPUSENTRY_AGENT__SPOOL_DIR"] = str(spool_dir)
        base = [sys.executable, "-m", "gpusentry.cli"]
        cfg_args = ["--config", str(config_path)] if config_path else []
        children = [Child("worker", [*base, "worker", "--create-topics", *cfg_args], env, logs / "worker.log"),
                    Child("agent", [*base, "agent", "--output", "kafka", *cfg_args], env, logs / "agent.log")]
        # Alert delivery runs only when [outputs] enables a destination; `up` itself always shows
        # and files the incidents.
        from outputs.registry import enabled_output_names

        if enabled_output_names(cfg):
            children.append(Child("forwarder", [*base, "forward", *cfg_args], env, logs / "forwarder.log"))
        for child in children:
            child.start()
        if demo:
            demo_thread = Demo(cfg, bootstrap, scenario)
            demo_thread.start()
        view = IncidentView()
        gpus = gpu_note(demo=demo) if "gpu" in cfg.agent.collectors else None
        consumer = _alerts_consumer(cfg, bootstrap)
        live_terminal = console.is_terminal
        with incidents_path.open("ab") as incidents_file, Live(console=console, auto_refresh=False,
                                                               transient=False) if live_terminal else _NoLive() as live:
            if not live_terminal:
                console.print(f"{broker_note}\n" + (f"gpu: {gpus}\n" if gpus else "")
                              + f"incidents file: {incidents_path}\nlogs: {logs}", highlight=False, markup=False)
            try:
                for tick in itertools.count():
                    msg = consumer.poll(0.25)
                    if msg is not None and not msg.error() and msg.value():
                        alert = _decode_alert(msg.value())
                        if alert is None:
                            view.unreadable += 1  # shown in the view; not filed as an incident
                        else:
                            incidents_file.write(msg.value().rstrip(b"\n") + b"\n")
                            incidents_file.flush()
                            view.add(alert)
                            if not live_terminal:
                                time_, host, sev, status, *_, message = (c.plain for c in incident_row(alert))
                                console.print(f"incident {status} {sev} on {host}: {message}", highlight=False,
                                              markup=False)
                    if live_terminal and (msg is not None or tick % 4 == 0):
                        live.update(_screen(view, broker_note, children, demo_thread, incidents_path, logs, gpus),
                                    refresh=True)
                    if children[0].proc is not None and children[0].proc.poll() not in (None, 0):
                        console.print(Text(f"the worker stopped ({children[0].status()})", style="red"))
                        return 1
            finally:
                consumer.close()
    except KeyboardInterrupt:
        code = 129 if received[:1] == [signal.SIGHUP] else 130
    except OSError as exc:
        # The reader of our output is gone: a pipe into a program that exited (`up | head`), or a closed terminal
        # (EIO; its SIGHUP may come before or after). Everything stops as after Ctrl-C, without a word more.
        if exc.errno not in _OUTPUT_GONE:
            raise
        out.lost()
        code = 129 if signal.SIGHUP in received else 141
    finally:
        parts = (["demo"] if demo_thread is not None else []) + [c.name for c in reversed(children)] + \
            (["broker"] if broker is not None else [])
        out.print(f"stopping: {', '.join(parts)} ...")
        if demo_thread is not None:
            demo_thread.stopping.set()
            demo_thread.join(10)
        for child in reversed(children):
            child.stop()
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        kept = f"; logs in {logs}"
        if spool_dir is not None and not keep_spool and spool_dir.exists():
            try:
                shutil.rmtree(spool_dir)
            except OSError as exc:
                log.warning("could not remove the agent's temporary spool %s (%s); remove it by hand", spool_dir, exc)
        elif spool_dir is not None and keep_spool:
            kept += f"; the agent's spool in {spool_dir}"
        out.print(f"stopped. Incidents are kept in {incidents_path}{kept}", highlight=False, markup=False)
    return code


# The reader of `up`'s output is gone: EPIPE from a pipe, EIO from a terminal that was closed.
_OUTPUT_GONE = (errno.EPIPE, errno.EIO)


class UpConsole(Console):
    """The console of `up`: a pipe whose reader exited raises BrokenPipeError to `run_up`, which then stops
    everything in order, instead of rich's default of exiting with 1 and leaving the children to their
    parent-death signal."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


class _Output:
    """`up`'s own lines: once the reader is gone nothing more is written, and the stopping sequence still runs."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.gone = False

    def print(self, *objects: Any, **options: Any) -> None:
        if self.gone:
            return
        try:
            self.console.print(*objects, **options)
        except OSError as exc:
            if exc.errno not in _OUTPUT_GONE:
                raise
            self.lost()

    def lost(self) -> None:
        self.gone = True
        self.console.quiet = True
        if self.console.file is not sys.stdout:
            return
        # Python flushes stdout at exit: pointed at /dev/null, that flush has nowhere to fail with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


class _NoLive:
    """Stands in for rich's Live when the output is not a terminal (updates are printed as lines)."""

    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def embedded_broker_note(bootstrap: str) -> str:
    return (f"embedded broker on {bootstrap} (in memory: topics, alerts and checkpoints are gone when `up` stops; "
            "the incidents file is kept)")


def gpu_note(nvml: Any = None, *, demo: bool) -> str | None:
    """What the view says when this machine has no NVIDIA GPU to watch (None when it has one)."""
    try:
        if nvml is None:
            from agents.gpu import load_nvml

            nvml = load_nvml()
            if nvml is None:
                raise ModuleNotFoundError("the pynvml module (nvidia-ml-py) is not installed")
        nvml.nvmlInit()
        try:
            count = int(nvml.nvmlDeviceGetCount())
        finally:
            nvml.nvmlShutdown()
        why = None if count else "NVML answers but finds no device"
    except Exception as exc:  # noqa: BLE001 - any NVML failure means the same thing here, and is named
        why = f"NVML: {type(exc).__name__}: {exc}"
    if why is None:
        return None
    if demo:
        return f"no NVIDIA GPU on this machine ({why}); the demo's simulated GPU host stands in"
    return (f"no NVIDIA GPU on this machine ({why}): the agent watches processes and flows only; "
            "`gpusentry up --demo` adds a simulated GPU host with a hijack")


def _screen(view: IncidentView, broker_note: str, children: list[Child], demo: Demo | None, incidents: Path,
            logs: Path, gpus: str | None = None) -> Group:
    # Labels are ours; the values (broker address, log paths, child status) are shown as plain text.
    lines = [("broker", broker_note)] + ([("gpu", gpus)] if gpus else [])
    lines += [(child.name, child.status()) for child in children]
    if demo is not None:
        state = demo.error or ("running" if demo.is_alive() else "done")
        lines.append(("demo", f"simulated scenario {demo.scenario} on {DEMO_HOST}: {demo.sent} events, {state}"))
    lines.append(("incidents file", f"{incidents}    logs  {logs}    Ctrl-C stops everything"))
    body = Text("\n").join(Text.assemble((label, "bold"), "  ", value) for label, value in lines)
    return Group(Panel(body, title="gpusentry up"), view.table())
