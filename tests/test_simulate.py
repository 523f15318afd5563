"""The simulator: valid contract events in time order, deterministic by seed, labels kept out of events."""

from __future__ import annotations

import base64
import json

import orjson
from typer.testing import CliRunner

from gpusentry import contract as c
from gpusentry.cli import app
from gpusentry.simulate import BENIGN, HIJACK, SCENARIOS, generate, simulate_host
from gpusentry.simulate.payloads import tls_client_hello

T0 = 1_793_491_200.0

# The scenario classes the product promises (issue 4), by name.
REQUIRED = {
    BENIGN: {"training", "inference", "notebook", "burn-in", "transcoding", "idle-then-job", "miner-ports"},
    HIJACK: {"miner-blatant", "miner-renamed", "tls-pool-443", "stratum-proxy", "ssh-login", "ray-abuse",
             "jupyter-abuse", "duty-cycled", "shares-training", "cpu-only", "container"},
}


def test_every_promised_scenario_exists_with_its_label():
    for label, names in REQUIRED.items():
        for name in names:
            assert SCENARIOS[name].label == label, name


def test_events_are_valid_and_in_time_order():
    for name in SCENARIOS:
        events = list(generate(name, f"h-{name}", T0, 600, 5, 3))
        assert events, name
        times = [c.event_time(e) for e in events]
        assert times == sorted(times), name
        for ev in events:
            checked = c.validate_event(ev)
            assert not isinstance(checked, c.Reject), (name, checked)
            assert ev["host"]["name"] == f"h-{name}"


def test_deterministic_by_seed_and_host():
    a = [orjson.dumps(e) for e in generate("miner-renamed", "h1", T0, 600, 5, 9)]
    b = [orjson.dumps(e) for e in generate("miner-renamed", "h1", T0, 600, 5, 9)]
    other_seed = [orjson.dumps(e) for e in generate("miner-renamed", "h1", T0, 600, 5, 10)]
    assert a == b
    assert a != other_seed


def test_labels_never_appear_in_events():
    label, events = simulate_host("miner-renamed", "h1", start=T0, duration_s=600, interval_s=5, seed=1)
    blob = b"\n".join(orjson.dumps(e) for e in events).lower()
    for word in (b"hijack", b"benign", b"miner-renamed", b"scenario", b"label"):
        assert word not in blob
    assert label.label == HIJACK and label.attack_start is not None and label.attack_start > T0


def test_sampling_interval_and_gpu_models_vary_across_hosts():
    labels = [simulate_host("idle", f"host-{i}", start=T0, duration_s=60, interval_s=None, seed=1)[0]
              for i in range(24)]
    assert len({lb.interval_s for lb in labels}) >= 3
    assert all(1 <= lb.interval_s <= 10 for lb in labels)
    assert len({lb.gpu_name for lb in labels}) >= 4


def test_gpu_samples_follow_the_interval():
    label, events = simulate_host("training", "h2", start=T0, duration_s=300, interval_s=2, seed=1, gpus=1)
    times = [c.event_time(e) for e in events if e["event"]["dataset"] == "gpusentry.gpu"]
    steps = {round(b - a, 3) for a, b in zip(times, times[1:], strict=False)}
    assert steps == {2.0}


def test_miner_payloads_are_what_miners_send():
    _, events = simulate_host("stratum-proxy", "h3", start=T0, duration_s=900, interval_s=5, seed=1)
    flows = [e for e in events if e["event"]["dataset"] == "gpusentry.network"
             and e["destination"]["port"] == 3333]
    payload = base64.b64decode(flows[0]["gpusentry"]["flow"]["payload_b64"])
    first = json.loads(payload.splitlines()[0])
    assert first["method"] == "mining.subscribe" and "EthereumStratum/1.0.0" in first["params"]
    assert flows[0]["destination"]["ip"].startswith("10.")


def test_tls_client_hello_carries_the_sni():
    import random

    hello = tls_client_hello("etc.2miners.com", random.Random(1))
    assert hello[0] == 0x16 and hello[5] == 0x01  # handshake record, ClientHello
    assert int.from_bytes(hello[3:5], "big") == len(hello) - 5
    assert b"etc.2miners.com" in hello


def test_cli_writes_events_and_a_separate_labels_file(tmp_path):
    out, labels = tmp_path / "events.jsonl", tmp_path / "labels.json"
    result = CliRunner().invoke(app, ["simulate", "-s", "notebook", "-s", "ssh-login", "--hosts", "2",
                                      "--duration", "400", "--seed", "5", "--out", str(out),
                                      "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    lines = out.read_bytes().splitlines()
    assert lines and all(not isinstance(c.validate_event(orjson.loads(line)), c.Reject) for line in lines)
    doc = json.loads(labels.read_text())
    assert set(doc) == {"sim-notebook-00", "sim-notebook-01", "sim-ssh-login-00", "sim-ssh-login-01"}
    assert doc["sim-ssh-login-00"]["label"] == "hijack" and doc["sim-ssh-login-00"]["attack_start"].endswith("Z")
    assert doc["sim-notebook-00"]["attack_start"] is None
    hosts = {orjson.loads(line)["host"]["name"] for line in lines}
    assert hosts == set(doc)


def test_cli_lists_scenarios_and_rejects_unknown_ones():
    runner = CliRunner()
    listed = runner.invoke(app, ["simulate", "--list"])
    assert listed.exit_code == 0 and "shares-training" in listed.output
    bad = runner.invoke(app, ["simulate", "-s", "no-such-thing"])
    assert bad.exit_code == 2 and "--list" in bad.output


def test_simulated_fleet_replays_into_incidents_on_the_hijacked_host_only(tmp_path):
    events, labels, alerts = tmp_path / "fleet.jsonl.gz", tmp_path / "labels.json", tmp_path / "alerts.jsonl"
    runner = CliRunner()
    made = runner.invoke(app, ["simulate", "-s", "burn-in", "-s", "miner-renamed", "--duration", "900", "--seed", "3",
                               "-o", str(events), "--labels", str(labels)])
    assert made.exit_code == 0, made.output
    replayed = runner.invoke(app, ["replay", str(events), "-o", str(alerts), "--strict"])
    assert replayed.exit_code == 0, replayed.output
    truth = json.loads(labels.read_text())
    worst: dict[str, str] = {}
    order = ["low", "medium", "high", "critical"]
    for line in alerts.read_bytes().splitlines():
        alert = orjson.loads(line)
        host, sev = alert["host"]["name"], alert["gpusentry"]["alert"]["severity"]
        worst[host] = max(worst.get(host, "low"), sev, key=order.index)
    hijacked = [h for h, lb in truth.items() if lb["label"] == "hijack"]
    benign = [h for h, lb in truth.items() if lb["label"] == "benign"]
    assert all(worst.get(h) in ("high", "critical") for h in hijacked), worst
    assert all(worst.get(h, "low") == "low" for h in benign), worst
