"""`gpusentry up --demo` as a user runs it: a detection within a minute, the incidents file, Ctrl-C stops all."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from streams.up import DEMO_HOST, IncidentView, demo_batches
from tests import outputs_receivers as rx

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_demo_batches_are_agent_style_messages():
    start = 1_790_000_000.0
    batches = list(itertools.islice(demo_batches(start), 400))
    assert batches
    for dataset, ts, batch in batches:
        assert {e["event"]["dataset"] for e in batch} == {dataset}
        assert {e["host"]["name"] for e in batch} == {DEMO_HOST}
        assert len({e["@timestamp"] for e in batch}) == 1 and ts >= start
    assert [ts for _, ts, _ in batches] == sorted(ts for _, ts, _ in batches)


def test_an_agentic_demo_scenario_reaches_a_critical_incident_in_its_demo_window():
    from detectors.engine import Engine
    from gpusentry import contract as c

    engine = Engine(strict=True)
    alerts = [a for _, _, batch in demo_batches(1_790_000_000.0, "agent-combined") for e in batch
              for a in engine.process(c.validate_or_raise(e))]
    assert any(a["gpusentry"]["alert"]["severity"] == "critical" for a in alerts)
    assert any("sandbox" in a.get("gpusentry", {}) for a in alerts), "the view's incidents name the sandbox"


def test_up_refuses_an_unknown_demo_scenario():
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "up", "--demo", "--scenario", "nope"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "agent-combined" in r.stderr


def test_incident_view_keeps_the_latest_update_per_incident():
    view = IncidentView()
    for status, n in (("open", 1), ("open", 3), ("resolved", 4)):
        view.add({"@timestamp": f"2026-11-29T21:00:0{n}.000Z", "host": {"name": "h"}, "message": "m",
                  "gpusentry": {"alert": {"dedup_key": "k", "status": status, "severity": "high",
                                          "evidence_count": n, "signals": ["pool"], "cost": {}}}})
    assert view.updates == 3 and list(view.incidents) == ["k"]
    assert view.incidents["k"]["gpusentry"]["alert"]["status"] == "resolved"
    assert view.table().row_count == 1


def test_up_demo_detects_within_a_minute_and_ctrl_c_stops_everything(tmp_path):
    incidents = tmp_path / "incidents.jsonl"
    receivers = rx.Receivers().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    env.update({"GPUSENTRY_WORKER__INCIDENTS_FILE": str(incidents), "GPUSENTRY_KAFKA__PARTITIONS": "2",
                "GPUSENTRY_AGENT__INTERVAL_S": "5",
                # An enabled output makes `up` start the forwarder too.
                "GPUSENTRY_OUTPUTS__WEBHOOK__ENABLED": "true",
                "GPUSENTRY_OUTPUTS__WEBHOOK__URL": receivers.base + rx.WEBHOOK_PATH,
                "GPUSENTRY_OUTPUTS__WEBHOOK__SECRET": rx.WEBHOOK_SECRET})
    out = tmp_path / "up.out"
    with out.open("wb") as fh:
        # A session of its own, so that Ctrl-C can be sent the way a terminal sends it: to the whole group.
        proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "up", "--demo"], cwd=tmp_path, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    children: list[psutil.Process] = []
    try:
        found = None
        while time.monotonic() - started < 90 and found is None:
            time.sleep(0.5)
            assert proc.poll() is None, out.read_text()
            if incidents.exists():
                for line in incidents.read_bytes().splitlines():
                    alert = orjson.loads(line)
                    if alert["host"]["name"] == DEMO_HOST:
                        found = alert
        assert found is not None, f"no demo detection within 90 s:\n{out.read_text()[-3000:]}"
        assert found["gpusentry"]["alert"]["severity"] in ("medium", "high", "critical")
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "worker" in names and "broker" in names and "agent" in names and "forward" in names
        deadline = time.monotonic() + 30
        while not receivers.received[rx.WEBHOOK_PATH] and time.monotonic() < deadline:
            time.sleep(0.5)
        delivered = {a["host"]["name"] for a in receivers.received[rx.WEBHOOK_PATH]}
        assert DEMO_HOST in delivered, "the forwarder started by `up` delivered no demo incident"
        assert not receivers.violations
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches every process of the group
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for c in children:
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                c.kill()
        receivers.stop()
    text = out.read_text()
    assert rc == 130, text[-3000:]
    gone = psutil.wait_procs(children, timeout=5)[1]
    assert not gone, f"still running after Ctrl-C: {gone}"
    assert "embedded broker" in text and "gone when `up` stops" in text.replace("\n", " ")
    assert "stopped. Incidents are kept in" in text
    assert "stopping: demo, forwarder, agent, worker, broker" in text
    # The broker outlives its clients: nothing complains about a vanished broker while stopping.
    assert "Connection refused" not in text
    assert incidents.stat().st_size > 0  # kept
    # `up`'s own processes (the broker runs from a hidden directory) are not this machine's incidents.
    own = [a["message"] for a in map(orjson.loads, incidents.read_bytes().splitlines())
           if a["host"]["name"] != DEMO_HOST and ("tansu" in a["message"] or "gpusentry" in a["message"])]
    assert not own, own


def test_up_with_kafka_bootstrap_servers_uses_that_broker(bootstrap, tmp_path):
    """`kafka.bootstrap_servers` set: `up` starts no broker of its own and runs everything on that one."""
    incidents = tmp_path / "incidents.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    env.update({"GPUSENTRY_WORKER__INCIDENTS_FILE": str(incidents), "GPUSENTRY_KAFKA__PARTITIONS": "2",
                "GPUSENTRY_AGENT__INTERVAL_S": "5", "GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "GPUSENTRY_WORKER__APP_ID": f"up-external-{os.getpid()}-{time.time_ns()}",
                "GPUSENTRY_AGENT__SPOOL_DIR": str(tmp_path / "spool")})
    out = tmp_path / "up.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "up", "--demo"], cwd=tmp_path, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, found = time.monotonic() + 90, False
        while time.monotonic() < deadline and not found:
            time.sleep(0.5)
            assert proc.poll() is None, out.read_text()
            found = incidents.exists() and any(orjson.loads(line)["host"]["name"] == DEMO_HOST
                                               for line in incidents.read_bytes().splitlines())
        assert found, f"no demo detection within 90 s:\n{out.read_text()[-3000:]}"
        names = " ".join(" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True))
        assert "worker" in names and "agent" in names and " broker" not in names, names
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = out.read_text()
    assert rc == 130, text[-3000:]
    assert "embedded broker" not in text and bootstrap in text, text[-3000:]


def test_no_child_outlives_a_killed_up(tmp_path):
    """SIGKILL of `up` (nothing of it runs to stop its children): the broker, worker and agent die with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    env.update({"GPUSENTRY_WORKER__INCIDENTS_FILE": str(tmp_path / "incidents.jsonl")})
    proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "up"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = psutil.Process(proc.pid).children(recursive=True)
            names = " ".join(" ".join(c.cmdline()) for c in children if c.is_running())
            if "worker" in names and "agent" in names and "broker" in names:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"up did not start its children: {names}")
        proc.kill()
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"outlived up: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


def test_up_says_when_there_is_no_gpu_and_points_at_the_demo():
    from rich.console import Console

    from streams import up

    class NoDriver:
        def nvmlInit(self):
            raise RuntimeError("Driver Not Loaded")

    class OneGpu:
        def nvmlInit(self):
            pass

        def nvmlDeviceGetCount(self):
            return 1

        def nvmlShutdown(self):
            pass

    assert up.gpu_note(OneGpu(), demo=False) is None
    note = up.gpu_note(NoDriver(), demo=False)
    assert "no NVIDIA GPU on this machine (NVML: RuntimeError: Driver Not Loaded)" in note and "--demo" in note
    assert "simulated GPU host stands in" in up.gpu_note(NoDriver(), demo=True)
    console = Console(record=True, width=200)
    console.print(up._screen(up.IncidentView(), up.embedded_broker_note("127.0.0.1:1"), [], None, Path("i.jsonl"),
                             Path("logs"), note))
    assert "gpu  no NVIDIA GPU on this machine" in console.export_text()


# ------------------------------------------------------------------ however `up` ends


def _up_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSENTRY_")}
    # `up`'s temporary folder (logs, the agent's spool) goes under tmp_path, where the test can look at it.
    env.update({"GPUSENTRY_WORKER__INCIDENTS_FILE": str(tmp_path / "incidents.jsonl"), "TMPDIR": str(tmp_path),
                "GPUSENTRY_AGENT__INTERVAL_S": "1"})
    return env


def _children_when_all_run(pid: int, needed: tuple[str, ...] = ("worker", "agent", "broker")) -> list[psutil.Process]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children if c.is_running())
        if all(n in names for n in needed):
            return children
        time.sleep(0.3)
    raise AssertionError(f"up did not start its children: {names}")


def _stopped_in_order(tmp_path: Path, children: list[psutil.Process], *, spool_kept: bool = False) -> None:
    """Every child gone, the worker's final checkpoint written (it was stopped, not killed), the agent's spool
    removed unless asked to keep it."""
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"outlived up: {[' '.join(p.cmdline()) for p in alive]}"
    (logs,) = tmp_path.glob("gpusentry-up-*")
    assert "final checkpoints written" in (logs / "worker.log").read_text()
    assert (logs / "agent-spool").exists() == spool_kept, sorted(p.name for p in logs.iterdir())


@contextlib.contextmanager
def _up(tmp_path: Path, *args: str, **popen: Any) -> Iterator[tuple[subprocess.Popen[bytes], list[psutil.Process]]]:
    """`gpusentry up ARGS` in a session of its own; whatever the test leaves running is killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "gpusentry.cli", "up", *args], cwd=tmp_path,
                            env=_up_env(tmp_path), start_new_session=True, **popen)
    children: list[psutil.Process] = []
    try:
        yield proc, children
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


def test_up_piped_into_a_program_that_exits_early_stops_everything(tmp_path):
    """`gpusentry up --demo | head -3`: the next line `up` writes finds the pipe closed; it stops its children in
    order, says nothing more (no traceback) and exits 141, as a program killed by SIGPIPE would."""
    with _up(tmp_path, "--demo", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as (proc, children):
        assert proc.stdout is not None and proc.stderr is not None
        head = [proc.stdout.readline() for _ in range(3)]  # what `head -3` reads, then it exits
        children += _children_when_all_run(proc.pid)
        proc.stdout.close()
        rc = proc.wait(90)
        stderr = proc.stderr.read().decode()
    assert b"embedded broker" in b"".join(head)
    assert rc == 141, stderr[-3000:]
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]
    _stopped_in_order(tmp_path, children)


def test_a_closed_terminal_stops_up_in_order(tmp_path):
    """`up` in a terminal that is closed (its window, an ssh session that drops): the kernel sends the session
    SIGHUP and writes fail with EIO. `up` stops its children in order and exits 129."""
    import fcntl
    import pty
    import select
    import termios

    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # runs after setsid(): the pty becomes the session's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    with _up(tmp_path, "--demo", stdin=slave, stdout=slave, stderr=slave,
             preexec_fn=controlling_terminal) as (proc, children):
        os.close(slave)
        screen = b""
        deadline = time.monotonic() + 60
        while b"incidents (" not in screen and time.monotonic() < deadline:  # the live view is up
            if select.select([master], [], [], 0.5)[0]:
                screen += os.read(master, 65536)
        assert b"incidents (" in screen, screen[-2000:]
        children += _children_when_all_run(proc.pid)
        os.close(master)  # the terminal goes away
        rc = proc.wait(90)
    assert rc == 129
    _stopped_in_order(tmp_path, children)


def test_sigterm_stops_up_in_order_and_keep_spool_keeps_the_spool(tmp_path):
    with _up(tmp_path, "--keep-spool", stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) as (proc, children):
        children += _children_when_all_run(proc.pid)
        time.sleep(2)  # the agent has written to its spool
        proc.terminate()
        rc = proc.wait(90)
    assert rc == 130
    _stopped_in_order(tmp_path, children, spool_kept=True)
