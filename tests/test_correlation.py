"""Correlation into incidents and the alert contract v1 (docs/alerts.md)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from detectors.base import Signal
from detectors.correlation import incident_severity
from detectors.engine import Engine
from detectors.examples import HOST, T0, dns, flow, proc
from detectors.examples import gpu as gpu_sample
from detectors.network.mining_pool import MiningPool
from detectors.network.stratum import StratumPayload
from detectors.process.miner_flags import MinerFlags
from detectors.process.staging_path import StagingPath
from gpusentry import contract as c
from gpusentry.pricing import price_list
from gpusentry.settings.detection import DetectionSettings
from gpusentry.timefmt import format_timestamp

ROOT = Path(__file__).resolve().parent.parent
SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["xmrig/6.21"]}\n'
MINER = "/dev/shm/.x/kthreadd -o stratum+tcp://10.9.9.9:3333 -u 4AdUndXHHZ6cfufTMvppY6JwXNouMBzSkbLYfpAV5Usx3sk" \
        "xNgYeYTRj5UzqtReoS44qo9mtmXCqY45DJ852K5Jv2684Rge --cuda"


def engine(settings: DetectionSettings | None = None) -> Engine:
    s = settings or DetectionSettings()
    return Engine(s, detectors=[MinerFlags(s), StagingPath(s), StratumPayload(s), MiningPool(s)], strict=True)


def gpu(t: float, *, pid: int = 4242, watts: float = 300.0, index: int = 0) -> dict[str, Any]:
    return c.gpu_event(HOST, T0 + t, index=index, uuid=f"GPU-{index}", name="NVIDIA H100 80GB HBM3", gpu_pct=100,
                       power_draw_watts=watts, processes=[{"pid": pid, "used_memory_bytes": 1 << 30}],
                       event_id=f"gpu-{index}-{int(t * 1000)}")


def hijack_stream(minutes: int = 60, *, gpu_every: float = 5.0) -> list[dict[str, Any]]:
    """A miner that runs for ``minutes``: one process start, a flow and a DNS answer every 10 s, GPU samples."""
    events = [proc(MINER, t=0.0)]
    t = 1.0
    while t < minutes * 60:
        events.append(gpu(t))
        if int(t) % 10 == 1:
            events.append(flow(SUBSCRIBE, t=t + 0.5, dst="10.9.9.9", sport=40000 + int(t) % 20000))
            events.append(dns("xmr.nanopool.org", ["10.9.9.9"], t=t + 0.2))
        t += gpu_every
    # after the miner stops: the GPU idles for 20 minutes
    end = t
    while t < end + 20 * 60:
        events.append(c.gpu_event(HOST, T0 + t, index=0, uuid="GPU-0", name="NVIDIA H100 80GB HBM3", gpu_pct=0,
                                  power_draw_watts=60, processes=[], event_id=f"idle-{int(t)}"))
        t += gpu_every
    return sorted(events, key=c.event_time)


def run(eng: Engine, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    alerts = []
    for ev in events:
        alerts.extend(eng.process(c.validate_or_raise(copy.deepcopy(ev))))
    return alerts


def test_a_flood_of_findings_is_one_incident_with_a_handful_of_alerts():
    events = hijack_stream(60)
    eng = engine()
    alerts = run(eng, events)
    findings = sum(eng.findings_by_rule.values())
    assert findings > 300, "the stream must really flood the correlator"
    keys = {a["gpusentry"]["alert"]["dedup_key"] for a in alerts}
    assert len(keys) == 1, "one hijack, one incident"
    # open, escalations, an update per 5 minutes for an hour, resolved
    assert 3 <= len(alerts) <= 20, [a["message"] for a in alerts]
    statuses = [a["gpusentry"]["alert"]["status"] for a in alerts]
    assert statuses[0] == "open" and statuses[-1] == "resolved" and statuses.count("resolved") == 1
    final = alerts[-1]
    assert final["gpusentry"]["alert"]["severity"] == "critical"
    assert final["rule"]["id"] in ("process.miner_flags", "network.stratum", "network.mining_pool")
    assert set(final["gpusentry"]["alert"]["rules"]) >= {"process.miner_flags", "network.stratum",
                                                         "network.mining_pool"}
    assert final["gpusentry"]["alert"]["evidence_count"] == findings
    assert len(final["gpusentry"]["alert"]["evidence"]) <= DetectionSettings().max_evidence
    # resolved when it stopped: last evidence is about an hour in, resolution 10 minutes later
    last = c.parse_timestamp(final["event"]["end"])
    assert 59 * 60 <= last - T0 <= 60 * 60 + 1
    assert c.parse_timestamp(final["@timestamp"]) - last >= DetectionSettings().resolve_after_s
    # the incident carries who and where
    assert final["process"]["pid"] == 4242 and final["destination"]["ip"] == "10.9.9.9"
    assert final["threat"]["technique"]["subtechnique"]["id"] == ["T1496.001"]


def test_alert_timestamp_is_the_event_time_of_the_triggering_evidence():
    alerts = run(engine(), [proc(MINER, t=5.0)])
    assert len(alerts) == 1
    assert alerts[0]["@timestamp"] == c.format_timestamp(T0 + 5.0)
    assert "created" not in alerts[0]["event"]  # wall time is the publisher's business


def test_cost_integrates_gpu_time_energy_and_price():
    eng = engine()
    events = [proc(MINER, t=0.0)] + [gpu(float(t), watts=360.0) for t in range(1, 3602, 10)]
    alerts = run(eng, events)
    eng_alerts = alerts + eng.expire(T0 + 10_000)
    final = eng_alerts[-1]["gpusentry"]["alert"]["cost"]
    assert final["gpu_seconds"] == pytest.approx(3600, abs=1)
    assert final["energy_kwh"] == pytest.approx(0.36, rel=1e-3)
    pricing = DetectionSettings().pricing
    rate = price_list(pricing).quote("NVIDIA H100 80GB HBM3").rate
    assert final["busy_gpu_seconds"] == pytest.approx(3600, abs=1)
    assert final["usd"] == pytest.approx(rate + 0.36 * pricing.kwh_usd, rel=1e-3)
    assert final["compute"] == pytest.approx(rate, rel=1e-3) and final["currency"] == "USD"


def test_gpu_of_another_process_is_not_charged():
    eng = engine()
    alerts = run(eng, [proc(MINER, t=0.0)] + [gpu(float(t), pid=777) for t in range(1, 600, 5)])
    assert alerts and eng.expire(T0 + 5000)[-1]["gpusentry"]["alert"]["cost"]["gpu_seconds"] == 0


@pytest.mark.parametrize(("kinds", "expected"), [
    ({Signal.SUSPICIOUS_PROCESS: "low"}, "low"),
    ({Signal.SUSPICIOUS_PROCESS: "low", Signal.GPU_ANOMALY: "low"}, "low"),
    ({Signal.SUSPICIOUS_PROCESS: "low", Signal.GPU_ANOMALY: "low", Signal.GPU_UNOWNED: "low"}, "medium"),
    ({Signal.GPU_SIGNATURE: "medium", Signal.SUSPICIOUS_PROCESS: "low"}, "medium"),
    ({Signal.GPU_SIGNATURE: "medium", Signal.GPU_UNOWNED: "medium"}, "high"),
    ({Signal.MINER_PROCESS: "high"}, "high"),
    ({Signal.MINER_PROCESS: "high", Signal.POOL: "high"}, "critical"),
    ({Signal.PROTOCOL: "high", Signal.GPU_SIGNATURE: "medium", Signal.POOL: "high"}, "critical"),
    ({Signal.TAMPERING: "medium"}, "medium"),  # an agent stopped, nothing else: a maintenance window or worse
    ({Signal.TAMPERING: "medium", Signal.SUSPICIOUS_PROCESS: "low"}, "high"),  # covering tracks after evidence
    ({Signal.TAMPERING: "low", Signal.GPU_ANOMALY: "low"}, "high"),
    ({Signal.TAMPERING: "medium", Signal.MINER_PROCESS: "high"}, "critical"),
])
def test_severity_comes_from_independent_kinds_of_evidence(kinds, expected):
    assert incident_severity(kinds) == expected


def test_the_agent_stopped_right_after_weak_evidence_is_a_high_incident():
    from detectors.process.agent_tampered import _agent

    eng = Engine(DetectionSettings(), strict=True)  # every detector, agent.tampered among them
    before = run(eng, [_agent(T0, "started"), proc("/root/.toolbox/bin/helper --daemon", t=T0 + 100)])
    after = run(eng, [_agent(T0 + 130, "stopping", "SIGTERM")])
    assert [a["gpusentry"]["alert"]["severity"] for a in before] in ([], ["low"])
    assert after[-1]["gpusentry"]["alert"]["severity"] == "high"
    assert after[-1]["gpusentry"]["alert"]["signals"] == ["suspicious_process", "tampering"]


def test_lone_weak_signal_stays_low_and_below_threshold_is_not_published():
    alerts = run(engine(), [proc("/tmp/build/tool --fast")])
    assert [a["gpusentry"]["alert"]["severity"] for a in alerts] == ["low"]
    quiet = run(engine(DetectionSettings(min_alert_severity="medium")), [proc("/tmp/build/tool --fast")])
    assert quiet == []


def test_escalation_publishes_at_once_and_recurrence_continues_the_incident():
    eng = engine()
    first = run(eng, [proc("/tmp/build/tool --fast", t=0)])
    more = run(eng, [flow(SUBSCRIBE, t=10)])
    assert [a["gpusentry"]["alert"]["severity"] for a in first + more] == ["low", "high"]
    assert first[0]["gpusentry"]["alert"]["dedup_key"] == more[0]["gpusentry"]["alert"]["dedup_key"]
    resolved = eng.expire(T0 + 10 + 601)
    assert [a["gpusentry"]["alert"]["status"] for a in resolved] == ["resolved"]
    # Within the recurrence horizon the next episode continues the incident: one history, its own start.
    again = run(eng, [flow(SUBSCRIBE, t=2000)])
    a = again[0]["gpusentry"]["alert"]
    assert a["dedup_key"] == first[0]["gpusentry"]["alert"]["dedup_key"] and a["episode"] == 2
    assert again[0]["event"]["start"] == format_timestamp(T0 + 2000)
    assert a["first_opened"] == first[0]["event"]["start"]
    eng.expire(T0 + 2000 + 601)
    later = run(eng, [flow(SUBSCRIBE, t=2000 + 601 + 86400 + 1)])  # past the horizon: a new incident
    assert later[0]["gpusentry"]["alert"]["dedup_key"] != first[0]["gpusentry"]["alert"]["dedup_key"]
    assert later[0]["gpusentry"]["alert"]["episode"] == 1


def test_recurrence_can_be_switched_off():
    eng = engine(DetectionSettings(recurrence_horizon_s=0))
    first = run(eng, [flow(SUBSCRIBE, t=0)])
    eng.expire(T0 + 601)
    again = run(eng, [flow(SUBSCRIBE, t=700)])
    assert again[0]["gpusentry"]["alert"]["dedup_key"] != first[0]["gpusentry"]["alert"]["dedup_key"]


def test_snapshot_and_restore_mid_incident_give_the_same_alerts():
    events = hijack_stream(20)
    half = len(events) // 2
    a = engine()
    head = run(a, events[:half])
    b = engine()
    b.restore_host(HOST, a.snapshot_host(HOST))
    assert run(a, events[half:]) == run(b, events[half:])
    assert head


def test_replays_are_deterministic():
    events = hijack_stream(15)
    assert run(engine(), events) == run(engine(), events)


# ---------------------------------------------------------------------------- the contract and its doc


def _paths(obj: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _paths(value, path + ".")
        else:
            out.add(path)
    return out


def _all_alerts() -> list[dict[str, Any]]:
    eng = Engine(strict=True)  # every detector, as shipped
    alerts = run(eng, hijack_stream(20))
    alerts += run(eng, [dns("pool.supportxmr.com", ["198.51.100.1"], t=9000, pid=9),
                        flow(None, dst="198.51.100.1", dport=443, t=9001, sni="pool.supportxmr.com"),
                        proc("/home/ml/bin/x --donate-level 1", t=9002, container_id="c0ffee")])
    return alerts + eng.expire(T0 + 100_000)


def test_every_alert_is_a_valid_contract_event():
    alerts = _all_alerts()
    assert {a["gpusentry"]["alert"]["status"] for a in alerts} == {"open", "resolved"}
    for alert in alerts:
        assert not isinstance(c.validate_event(copy.deepcopy(alert)), c.Reject)
        assert alert["event"]["kind"] == "alert" and alert["threat"]["framework"] == "MITRE ATT&CK"
        assert 0 <= alert["event"]["severity"] <= 100
        for item in alert["gpusentry"]["alert"]["evidence"]:
            assert set(item) == {"event.id", "@timestamp", "rule.id", "signal", "severity", "summary"}


def test_docs_describe_every_emitted_field_and_nothing_stale():
    text = (ROOT / "docs" / "alerts.md").read_text()
    fields_section = text.split("## Fields", 1)[1].split("### Context copied from the evidence", 1)[0]
    table = set(re.findall(r"^\| `([^`]+)` \|", fields_section, re.MULTILINE))
    families = set(re.findall(r"`([a-z]+)\.\*`", text))
    context = set(re.findall(r"`([a-z_.]+)`", text.split("### Context copied from the evidence", 1)[1]))
    emitted: set[str] = set()
    for alert in _all_alerts():
        emitted |= _paths(alert)
    common = {s.path for s in c.COMMON_FIELDS}
    undocumented = sorted(p for p in emitted if p not in table and p not in common and p not in context
                          and p.split(".", 1)[0] not in families)
    assert not undocumented, f"docs/alerts.md does not describe: {undocumented}"
    optional = {"event.created", "event.end", "threat.technique.subtechnique.id",
                "threat.technique.subtechnique.name", "threat.technique.subtechnique.reference"}
    stale = sorted(p for p in table if p not in emitted and p not in optional)
    assert not stale, f"docs/alerts.md lists fields the correlator never emits: {stale}"
    assert "event.end" in emitted and "threat.technique.subtechnique.id" in emitted


# ---------------------------------------------------------------------------- order-independent keys


def _keys(events):
    engine = Engine(strict=True)
    return [a["gpusentry"]["alert"]["dedup_key"] for ev in events for a in engine.process(c.validate_or_raise(ev))]


def test_dedup_keys_do_not_depend_on_which_topic_was_read_first():
    """A worker reads the four topics interleaved as the broker hands them out: the miner's process start and its
    pool connection may come in either order. The incident's key is the same either way (it used to be the hash
    of whichever finding was processed first)."""
    start = proc("/tmp/.x/xmrig -o stratum+tcp://pool.example:3333 -u 4Abc", t=0.0)
    login = flow(b'{"id":1,"method":"login","params":{"login":"4Abc","agent":"XMRig/6.21.0"}}\n', t=0.4)
    first = _keys([start, login])
    second = _keys([login, start])
    assert first and second and set(first) == set(second), (first, second)
    # A second hijack on the same host after the first resolved (past the recurrence horizon) gets a new key.
    later = 3 * 86400.0
    again = _keys([start, login, gpu_sample(later - 100, util=0),  # a quiet sample: the first incident resolves
                   proc("/tmp/.x/xmrig -o stratum+tcp://pool.example:3333 -u 4Abc", t=later),
                   flow(b'{"id":1,"method":"login","params":{"login":"4Abc"}}\n', t=later + 0.4)])
    assert len(set(again)) == 2


def test_host_states_pickled_before_the_sequence_existed_still_load():
    import pickle

    from detectors.correlation import HostIncidents

    state = HostIncidents()
    del state.__dict__["opened"], state.__dict__["epoch"]  # what an older checkpoint holds
    restored = pickle.loads(pickle.dumps(state))
    assert restored.opened == 0 and restored.epoch is None
