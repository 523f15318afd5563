"""A bad clock cannot blind detection: far-future events are refused, a host's time never leaps on one event,
late events neither resolve nor reopen, and a jump is itself a finding (replay and worker alike)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson

from detectors.engine import Engine
from detectors.examples import HOST, T0, proc
from detectors.process.miner_flags import MinerFlags
from gpusentry import contract as c
from gpusentry.settings.detection import DetectionSettings
from streams.pipeline import Pipeline
from tests.test_streams_pipeline import TOPICS, FakeIO

MINER = "/tmp/x/xmrig -o stratum+tcp://pool.example.net:3333 -u 4AbC --donate-level 1"
YEAR_2999 = 32_503_593_600.0  # 2999-12-31T00:00:00Z


def engine(**kw) -> Engine:
    s = DetectionSettings()
    return Engine(s, detectors=[MinerFlags(s)], strict=True, **kw)


def gpu(t: float, *, util: float = 100, pid: int = 31337, eid: str | None = None) -> dict:
    return c.validate_or_raise(c.gpu_event(HOST, t, index=0, uuid="GPU-0", name="NVIDIA H100 80GB HBM3", gpu_pct=util,
                                           power_draw_watts=300.0, processes=[{"pid": pid}] if util else [],
                                           event_id=eid or f"g-{t}"))


def feed(eng: Engine, events) -> list[dict]:
    out = []
    for ev in events:
        out += eng.process(c.validate_or_raise(ev) if "event" in ev else ev)
    return out


def test_one_idle_sample_from_2999_neither_resolves_nor_freezes_the_incident():
    eng = engine()
    alerts = feed(eng, [proc(MINER, pid=31337), *[gpu(T0 + t) for t in range(5, 300, 5)]])
    assert alerts and alerts[0]["gpusentry"]["alert"]["status"] == "open"
    assert feed(eng, [gpu(YEAR_2999, util=0, pid=1, eid="bad")]) == []  # refused: it would resolve the incident
    [reject] = eng.drain_clock_rejects()
    assert "ahead" in reject.reason and "max_replay_gap_s" in reject.reason
    feed(eng, [gpu(T0 + t) for t in range(300, 900, 5)])  # the miner keeps running: the incident stays open
    assert eng.hosts[HOST].incidents.current is not None
    assert eng.hosts[HOST].watermark < T0 + 1000, "the host's time never leapt to 2999"
    # Evidence dated 2999 cannot pin last_evidence there either.
    feed(eng, [{**proc(MINER, pid=4444, event_id="e2999"), "@timestamp": "2999-01-01T00:00:00.000Z"}])
    assert eng.hosts[HOST].incidents.current.last_evidence_at < T0 + 1000


def test_two_events_on_a_new_time_line_are_a_clock_jump_and_are_accepted():
    eng = engine()
    feed(eng, [proc(MINER, pid=31337), *[gpu(T0 + t) for t in range(5, 60, 5)]])
    jump = T0 + 30 * 86400  # a month past the file's time line: beyond contract.max_replay_gap_s
    assert feed(eng, [gpu(jump, eid="j1")]) == []
    alerts = feed(eng, [gpu(jump + 5, eid="j2")])
    assert eng.hosts[HOST].watermark == jump + 5
    assert eng.findings_by_rule["agent.clock_jump"] == 1
    assert any("agent.clock_jump" in a["gpusentry"]["alert"]["rules"] for a in alerts)
    a = [x for x in alerts if "agent.clock_jump" in x["gpusentry"]["alert"]["rules"]][0]["gpusentry"]["alert"]
    assert "clock" in a["signals"]


def test_a_quiet_spell_in_a_replayed_file_is_not_a_bad_clock():
    eng = engine()
    feed(eng, [proc(MINER, pid=31337), gpu(T0 + 5)])
    assert feed(eng, [gpu(T0 + 3 * 3600, util=0, pid=1)])  # three hours later: it resolves the incident
    assert not eng.drain_clock_rejects()


def test_late_events_do_not_reopen_a_resolved_incident():
    eng = engine()
    feed(eng, [proc(MINER, pid=31337, t=0)])
    resolved = eng.expire(T0 + 700)
    assert [a["gpusentry"]["alert"]["status"] for a in resolved] == ["resolved"]
    feed(eng, [gpu(T0 + t, util=0, pid=1) for t in range(700, 2000, 100)])  # the host moves on
    late = feed(eng, [proc(MINER, pid=31338, t=10, event_id="late-miner")])  # 30 minutes behind
    assert late == [] and eng.hosts[HOST].incidents.current is None and eng.late_events == 1


def test_a_worker_refuses_events_ahead_of_its_clock_and_says_so_once():
    now = T0 + 3600
    eng = engine(clock=lambda: now)
    alerts = feed(eng, [gpu(now + 3600 * 24, eid="f1"), gpu(now + 3600 * 24 + 5, eid="f2")])
    assert len(eng.drain_clock_rejects()) == 2, "live, every event ahead of the worker's clock is refused"
    assert eng.findings_by_rule["agent.clock_jump"] == 1 and alerts
    assert alerts[0]["@timestamp"] == c.format_timestamp(now), "dated by the worker's clock, not the host's"


def test_the_pipeline_dead_letters_clock_skew_and_keyless_messages():
    async def go() -> FakeIO:
        io = FakeIO()
        p = Pipeline(Engine(strict=True, clock=lambda: T0 + 60), io, TOPICS, max_message_bytes=1 << 20,
                     checkpoint_interval_s=3600)
        good = orjson.dumps([c.gpu_event(HOST, T0, index=0, uuid="GPU-0", name=None, event_id="ok")])
        future = orjson.dumps([c.gpu_event(HOST, YEAR_2999, index=0, uuid="GPU-0", name=None, event_id="future")])
        await p.handle("gpu", 0, 0, HOST.encode(), good, ack=lambda: None)
        await p.handle("gpu", 0, 1, HOST.encode(), future, ack=lambda: None)
        await p.handle("gpu", 0, 2, None, good, ack=lambda: None)
        await io.flush()
        return io

    io = asyncio.run(go())
    reasons = [orjson.loads(d)["event"]["reason"] for d in io.topics[TOPICS.deadletter]]
    assert reasons == ["clock_skew", "missing_key"]


def test_replay_counts_clock_skew_as_rejected_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    events = [c.gpu_event(HOST, T0 + t, index=0, uuid="GPU-0", name=None, event_id=f"g{t}") for t in range(0, 60, 5)]
    events.insert(5, c.gpu_event(HOST, YEAR_2999, index=0, uuid="GPU-0", name=None, event_id="bad"))
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    r = subprocess.run([sys.executable, "-m", "gpusentry.cli", "replay", str(path), "--strict"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 4 and "clock_skew: 1" in r.stderr and "e.jsonl:6: rejected: event time 2999" in r.stderr
