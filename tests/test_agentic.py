"""Agent sandboxes end to end: lineage, the agentic scenarios through the whole engine, knowledge files."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from detectors.engine import Engine
from detectors.examples import proc
from detectors.sandbox._lineage import Lineage, load_shapes, matcher
from gpusentry import contract as c
from gpusentry.contract import event_time
from gpusentry.knowledge import KnowledgeError, load_entries
from gpusentry.settings.sandboxes import SandboxSettings
from gpusentry.simulate import generate

START = 1_793_491_200.0
M = matcher(SandboxSettings())


def feed(lineage: Lineage, events, m=M):
    out = None
    for ev in events:
        ev = c.validate_or_raise(copy.deepcopy(ev))
        out = lineage.observe(ev, m, event_time(ev))
    return out


CID = "ab" * 32


def test_tool_call_lineage_names_the_server_and_the_call():
    lineage = Lineage()
    feed(lineage, [proc("python -u -m openhands.runtime.action_execution_server 30000", pid=10, name="python",
                        container_id=CID),
                   proc("/bin/bash -lc 'make test'", pid=11, parent="python", parent_pid=10, container_id=CID)])
    make = feed(lineage, [proc("make test", pid=12, parent="bash", parent_pid=11, container_id=CID)])
    assert make.sandbox.shape == "openhands" and make.sandbox.server_pid == 10
    assert make.sandbox.tool_call == "/bin/bash -lc 'make test'" and make.chain == ("bash(11)", "make(12)")
    f = make.fields()
    assert f["gpusentry.sandbox.container_id"] == CID and f["gpusentry.sandbox.tool_call.pid"] == 11


def test_a_detached_process_stays_in_its_sandbox_by_container():
    lineage = Lineage()
    feed(lineage, [proc("/tmp/rocklet-venv/bin/rocklet --port 8000", pid=10, name="rocklet", container_id=CID)])
    # Its parent exited before the agent read it: adopted by init, parent unknown to the table.
    orphan = feed(lineage, [proc("/usr/local/bin/python3 /tmp/.w/run.py", pid=99, parent="systemd", parent_pid=1,
                                 container_id=CID)])
    assert orphan.sandbox is not None and orphan.sandbox.shape == "rock"
    outsider = feed(lineage, [proc("/usr/bin/python3 train.py", pid=100, parent="systemd", parent_pid=1)])
    assert outsider.sandbox is None


def test_site_settings_make_sandboxes_and_the_trainer_is_not_one():
    m = matcher(SandboxSettings(tool_servers=["agentd"], users=["sbx"], container_names=["agent-sbx-*"]))
    lineage = Lineage()
    feed(lineage, [proc("/opt/agentd --listen 7000", pid=5, name="agentd")], m)
    assert feed(lineage, [proc("sh -c ls", pid=6, parent="agentd", parent_pid=5)], m).sandbox.shape == "site"
    assert feed(lineage, [proc("python3 x.py", pid=7, user="sbx", parent="init", parent_pid=1)], m).sandbox
    named = proc("python3 y.py", pid=8, parent="containerd-shim", parent_pid=2)
    named["container"] = {"id": CID, "name": "agent-sbx-42"}
    assert feed(lineage, [named], m).sandbox.shape == "site"
    trainer = feed(lineage, [proc("/opt/conda/bin/python -u train.py", pid=9, parent="torchrun", parent_pid=3)], m)
    assert trainer.sandbox is None


def test_lineage_is_bounded_and_pickles():
    lineage = Lineage()
    m = matcher(SandboxSettings(max_processes=256))
    feed(lineage, [proc("python -m ipykernel_launcher -f k.json", pid=1, name="python")], m)
    for pid in range(2, 600):
        feed(lineage, [proc("sleep 1", pid=pid, parent="python", parent_pid=1, event_id=f"e{pid}")], m)
    assert len(lineage.procs) <= 256
    clone = pickle.loads(pickle.dumps(lineage))
    assert clone.procs.keys() == lineage.procs.keys() and clone.sandboxed


def alerts_of(scenario: str, seed: int = 42, duration: float = 1800.0) -> list[dict]:
    engine = Engine(strict=True)
    out = []
    for ev in generate(scenario, f"sim-{scenario}", START, duration, 5.0, seed=seed):
        out.extend(engine.process(c.validate_or_raise(ev)))
    assert not engine.failures
    return out


def test_the_incident_itself_is_critical_and_names_the_sandbox_and_the_tool_call():
    alerts = alerts_of("agent-combined")
    top = [a for a in alerts if a["gpusentry"]["alert"]["status"] == "open"][-1]  # the latest update
    a = top["gpusentry"]["alert"]
    assert a["severity"] == "critical"
    assert {"tunnel", "probing", "gpu_unowned"} <= set(a["signals"])
    assert top["gpusentry"]["sandbox"]["framework"] and top["gpusentry"]["sandbox"]["container_id"]
    assert top["gpusentry"]["sandbox"]["tool_call"]["command_line"].startswith("/bin/bash -lc ")
    assert len({x["gpusentry"]["alert"]["dedup_key"] for x in alerts}) == 1


def test_intermittent_episodes_are_one_incident_history():
    alerts = alerts_of("agent-intermittent", duration=3600.0)
    keys = {a["gpusentry"]["alert"]["dedup_key"] for a in alerts}
    episodes = sorted({a["gpusentry"]["alert"]["episode"] for a in alerts})
    assert len(keys) == 1, keys
    assert episodes[:3] == [1, 2, 3], episodes
    opened = [a for a in alerts if a["gpusentry"]["alert"]["status"] == "open"]
    assert all(a["gpusentry"]["alert"]["severity"] == "high" for a in opened)
    starts = sorted({a["event"]["start"] for a in opened})
    assert len(starts) == len(episodes), "each episode has its own start (its own time to detect)"


@pytest.mark.parametrize("scenario", ["agent-ordinary", "sandbox-cuda-tests", "ops-tunnels", "prometheus-scrape",
                                      "inventory-nmap"])
def test_benign_look_alikes_stay_below_medium(scenario):
    for seed in (1, 2, 3):
        worst = {a["gpusentry"]["alert"]["severity"] for a in alerts_of(scenario, seed=seed)}
        assert worst <= {"low"}, (scenario, seed, worst)


def test_knowledge_files_refuse_bad_entries_with_the_place_and_the_fix(tmp_path: Path):
    bad = tmp_path / "shapes.toml"
    bad.write_text('version = 1\n[[shape]]\nid = "x"\nframework = "X"\n')
    with pytest.raises(KnowledgeError, match=r"entry 1 \('x'\): `source` is missing"):
        load_shapes(bad)
    bad.write_text('version = 1\n[[shape]]\nid = "x"\nframework = "X"\nsource = "s"\nprocess_name = ["a"]\n')
    with pytest.raises(KnowledgeError, match="unknown key `process_name`"):
        load_shapes(bad)
    bad.write_text('version = 1\n[[shape]]\nid = "x"\nframework = "X"\nsource = "s"\nargs = "a"\n')
    with pytest.raises(KnowledgeError, match="`args` must be a list"):
        load_shapes(bad)
    bad.write_text("[[shape]]\n")
    with pytest.raises(KnowledgeError, match="version"):
        load_entries(bad, "shape", required={})
    with pytest.raises(KnowledgeError, match="cannot read"):
        load_entries(tmp_path / "missing.toml", "shape", required={})


def test_every_shipped_knowledge_file_loads_and_cites_its_sources():
    from detectors.network.internal_probe import load_probing
    from detectors.network.tunnel_wire import load_services
    from detectors.process.reverse_shell import load_programs
    from detectors.process.tunnel import load_tunnels

    assert {s.id for s in load_shapes()} >= {"jupyter-kernel", "openhands", "e2b", "swe-bench", "rock", "ray-worker",
                                             "generic-tool-server"}
    assert load_tunnels().tools["chisel"][1] == "reverse"
    assert "trycloudflare.com" in load_services()
    assert load_programs()["ncat"].kind == "relay"
    assert load_probing().metadata_ips["100.100.100.200"] == "alibaba-metadata"
