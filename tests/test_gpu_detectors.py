"""GPU detectors beyond their examples: severities, allowlists, learned jobs, windows, checkpoints."""

from __future__ import annotations

import copy
import pickle

from hypothesis import HealthCheck, given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from detectors.engine import Engine, discover
from detectors.examples import proc
from detectors.gpu._examples import TRAINER, gproc, gpu, idle, mining, training
from detectors.gpu._window import GpuWindows, read_sample
from detectors.gpu.drift import GpuDrift
from detectors.gpu.duty_cycle import DutyCycledGpu
from detectors.gpu.mining_signature import GpuMiningSignature
from detectors.gpu.unowned_process import UnownedGpuProcess
from gpusentry import contract as c
from gpusentry.settings.detection import DetectionSettings


def run(det, events):
    state = det.new_state()
    out = []
    for ev in events:
        out.extend(det.process(c.validate_or_raise(copy.deepcopy(ev)), state))
    return out


def settings(**gpu):
    s = DetectionSettings()
    for key, value in gpu.items():
        setattr(s.gpu, key, value)
    return s


def test_second_process_on_a_training_gpu_is_high_and_a_lone_unowned_one_medium():
    shared = training(0, 3) + mining(30, 2, exe="/home/ml/.cache/pt_worker",
                                     extra=[gproc(2000, TRAINER, gib=70, sm=None)])
    findings = run(UnownedGpuProcess(), shared)
    assert [f.severity for f in findings] == ["high"]
    assert "shares GPU 0 with the job" in findings[0].message
    assert findings[0].fields["process.executable"] == "/home/ml/.cache/pt_worker"
    lone = run(UnownedGpuProcess(), idle(0, 2) + mining(20, 2))
    assert [f.severity for f in lone] == ["medium"]


def test_unidentified_gpu_process_is_low():
    events = [gpu(0, util=100, used_gib=5, procs=[{"pid": 99, "used_memory_bytes": 5 << 30}])]
    assert [f.severity for f in run(UnownedGpuProcess(), events)] == ["low"]


def test_unowned_finding_repeats_while_the_process_stays():
    findings = run(UnownedGpuProcess(), mining(0, 40))  # 400 s
    assert len(findings) == 4  # at 0, 120, 240 and 360 s: keeps the incident open, without flooding it


def test_allowlisted_user_and_container_own_their_gpu_work():
    miner_like = [proc("/srv/bench/hashbench --gpu 0", pid=31337, user="perf", container_id="abc123def456")]
    events = miner_like + mining(1, 2, exe="/srv/bench/hashbench")
    assert run(UnownedGpuProcess(), events)
    assert not run(UnownedGpuProcess(settings(allowed_users=["perf"])), events)
    assert not run(UnownedGpuProcess(settings(allowed_container_ids=["abc123"])), events)
    assert not run(UnownedGpuProcess(settings(allowed_executables=["/srv/bench/*"])), events)


def test_learning_period_learns_what_already_runs():
    custom = mining(0, 3, exe="/opt/lab/bin/simulate_md")
    assert run(UnownedGpuProcess(), custom)
    assert not run(UnownedGpuProcess(settings(learn_jobs_for_s=3600)), custom)


def test_children_of_the_learned_job_belong_to_it_but_strangers_do_not():
    child = [proc("/home/ml/bin/custom_kernel_runner", t=15, pid=2050, parent="python3", parent_pid=2000)]
    stranger = [proc("/home/ml/bin/custom_kernel_runner", t=15, pid=2050, parent="bash", parent_pid=1)]
    later = [gpu(30 + i * 10, util=97, used_gib=75, procs=[gproc(2000, TRAINER, gib=70),
                                                           gproc(2050, "/home/ml/bin/custom_kernel_runner", gib=4)])
             for i in range(2)]
    assert not run(UnownedGpuProcess(), training(0, 2) + child + later)
    assert [f.severity for f in run(UnownedGpuProcess(), training(0, 2) + stranger + later)] == ["high"]


def test_mining_signature_severity_rises_with_the_score():
    findings = run(GpuMiningSignature(), mining(0, 20))
    assert findings and findings[-1].severity == "high"
    assert all(f.fields["gpu.uuid"] for f in findings)


def test_duty_cycle_needs_a_visible_unowned_process():
    def cycles(procs):
        out = []
        for k in range(4):
            base = k * 120
            out += [gpu(base + i * 20, util=100, used_gib=5, procs=procs or []) for i in range(3)]
            out += [gpu(base + 60 + i * 20, util=0, used_gib=5, procs=procs or []) for i in range(3)]
        if procs is None:
            for ev in out:
                ev["gpu"]["processes"] = None  # the driver did not report processes
        return out

    listed_once = [gpu(-10, util=0, used_gib=1, procs=[gproc(5, "/usr/bin/nvidia-smi", gib=0.1)])]
    assert run(DutyCycledGpu(), listed_once + cycles([]))  # busy with no visible process at all
    assert not run(DutyCycledGpu(), cycles([]))  # a GPU that never lists processes (vGPU guest, MIG parent)
    assert not run(DutyCycledGpu(), cycles(None))  # processes not reported: nothing to judge
    assert not run(DutyCycledGpu(), cycles([gproc(5, "/usr/bin/ffmpeg")]))


def test_power_limit_change_names_both_limits():
    findings = run(GpuDrift(), [gpu(0, util=0, limit=400), gpu(5, util=0, limit=250)])
    assert findings and "from 400 W to 250 W" in findings[0].message


def test_windows_are_aligned_to_event_time_and_drop_late_samples():
    w = GpuWindows(30, 20)
    edge = 10  # T0 + 10 s is a multiple of 30 s since the epoch: a window starts there
    assert w.add(read_sample(c.validate_or_raise(gpu(edge + 1, util=100)))) is None
    assert w.add(read_sample(c.validate_or_raise(gpu(edge + 29, util=90)))) is None
    closed = w.add(read_sample(c.validate_or_raise(gpu(edge + 31, util=0))))
    assert closed is not None and closed.samples == 2
    assert closed.features["util_mean"] == 95.0 and closed.start % 30 == 0 and closed.end - closed.start == 30
    assert w.add(read_sample(c.validate_or_raise(gpu(edge + 5, util=50)))) is None  # late: window closed


def test_engine_checkpoint_mid_hijack_resumes_identically():
    gpu_detectors = [cls for cls in discover() if cls.id.startswith("gpu.")]
    events = [c.validate_or_raise(copy.deepcopy(e)) for e in training(0, 60, interval=10) + mining(600, 30)]

    def engine():
        s = DetectionSettings()
        return Engine(s, [cls(s) for cls in gpu_detectors], strict=True)

    straight = engine()
    expected = [a for e in events for a in straight.process(e)]
    first = engine()
    head = [a for e in events[:70] for a in first.process(e)]
    blob = first.snapshot_host("gpu-node-7")
    assert len(blob) < 256 * 1024, f"one host's GPU state pickles to {len(blob)} bytes"
    resumed = engine()
    resumed.restore_host("gpu-node-7", blob)
    tail = [a for e in events[70:] for a in resumed.process(e)]
    key = [(a["@timestamp"], a["gpusentry"]["alert"]["severity"]) for a in expected]
    assert [(a["@timestamp"], a["gpusentry"]["alert"]["severity"]) for a in head + tail] == key
    assert any(a["gpusentry"]["alert"]["severity"] in ("high", "critical") for a in expected)
    pickle.loads(blob)


_numbers = st.one_of(st.none(), st.integers(-10, 10**13), st.floats(-1e12, 1e15, allow_nan=False))


@settings_(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0, 600), _numbers, _numbers, _numbers, _numbers, _numbers, _numbers,
                          st.lists(st.tuples(st.integers(1, 5), st.one_of(st.none(), st.text(max_size=20))),
                                   max_size=3)),
                min_size=1, max_size=30))
def test_gpu_detectors_never_raise_on_odd_numbers(samples):
    """Any value the contract lets through (negative, huge, zero totals, missing) is survived."""
    dets = [cls() for cls in discover() if cls.id.startswith("gpu.")]
    states = [d.new_state() for d in dets]
    for t, util, mem, used, power, limit, pcie, procs in sorted(samples, key=lambda s: s[0]):
        ev = c.gpu_event("h", 1.79e9 + t, index=0, uuid="GPU-x", name="NVIDIA L4", gpu_pct=util, memory_pct=mem,
                         memory_used_bytes=int(used) if used is not None else None, memory_total_bytes=0,
                         power_draw_watts=power, power_limit_watts=limit, pcie_rx_bytes_per_s=pcie,
                         processes=[{"pid": pid, "executable": exe, "name": exe} for pid, exe in procs])
        checked = c.validate_event(ev)
        if isinstance(checked, c.Reject):
            continue
        for det, state in zip(dets, states, strict=True):
            for f in det.process(checked, state):
                assert 0.0 <= f.score <= 1.0


def test_detectors_sharing_a_hosts_windows_and_process_table_find_what_each_finds_alone():
    """Inside an engine the GPU detectors share per-host windows and a process table; that is only speed."""
    from gpusentry.simulate import simulate_host

    dets = [cls() for cls in discover() if cls.id.startswith("gpu.")]

    def key(f):
        return (f.rule_id, f.event_id, f.severity, f.message, round(f.score, 9))

    found = set()
    for scenario in ("shares-training", "duty-cycled", "idle-then-job", "miner-blatant"):
        events = [c.validate_or_raise(e) for e in simulate_host(scenario, "h1", start=1.79e9, duration_s=900,
                                                                interval_s=3, seed=5, gpus=2)[1]]
        alone = {d.id: d.new_state() for d in dets}
        shared: dict = {}
        together = {d.id: d.new_host_state(shared) for d in dets}
        assert together["gpu.drift"].windows is together["gpu.mining_signature"].windows
        assert together["gpu.unowned_process"].table is together["gpu.duty_cycle"].table
        expected, got = [], []
        for ev in events:
            # As the engine does it: one parse of a GPU sample for all the detectors that share the host's state.
            sample = read_sample(ev, c.event_time(ev)) if ev["event"]["dataset"] == "gpusentry.gpu" else None
            for d in dets:
                if ev["event"]["dataset"] not in {ds.value for ds in d.datasets}:
                    continue
                expected += [key(f) for f in d.process(ev, alone[d.id])]
                got += [key(f) for f in (d.process(ev, together[d.id]) if sample is None
                                         else d.process_parsed(ev, sample, together[d.id]))]
        assert got == expected, scenario
        found |= {k[0] for k in expected}
        restored = pickle.loads(pickle.dumps(together))
        assert restored["gpu.drift"].windows is restored["gpu.behaviour_anomaly"].windows, "checkpoints keep sharing"
        assert len(pickle.dumps(together)) < len(pickle.dumps(alone))
    assert found >= {"gpu.unowned_process", "gpu.mining_signature", "gpu.duty_cycle"}


def test_window_close_shortcut_for_complete_samples_matches_the_general_summary():
    """Windows whose samples all report finite numbers take a shortcut; it must give the same features."""
    import random

    from detectors.gpu._window import _Acc

    rng = random.Random(11)
    for _ in range(50):
        acc = _Acc(0.0, name="NVIDIA A100-SXM4-80GB")
        for _ in range(rng.randint(1, 12)):
            acc.rows.append((rng.choice([rng.uniform(0, 100), 100, 0]), rng.uniform(0, 100), rng.uniform(50, 400),
                             rng.choice([250.0, 400]), rng.uniform(800, 1500), 1593, rng.uniform(0, 1e9),
                             rng.choice([0, rng.uniform(0, 1e9)]), rng.randint(0, 80 << 30), 80 << 30))
            acc.n += 1
        columns = list(zip(*acc.rows, strict=True))
        quick = GpuWindows(30, 20)._close(f"GPU-{_}", 0, acc)
        general = GpuWindows(30, 20)._close_general(f"GPU-{_}", 0, acc, columns)
        assert quick.features == general.features
    # A missing number takes the general path.
    acc.rows.append((None,) * 10)
    acc.n += 1
    assert GpuWindows(30, 20)._close("GPU-x", 0, acc).samples == acc.n


def test_skipping_steady_samples_changes_no_finding(monkeypatch):
    """Detectors skip samples that repeat their GPU's last one (GpuWindows.add sets Sample.steady); that is only speed.

    The same fleet runs through two engines, one with every sample marked unsteady; their alerts and
    per-rule findings must be identical, and most samples of a steady fleet must have been skippable.
    """
    from gpusentry.simulate import SCENARIOS, simulate_host

    events = []
    for i, scenario in enumerate(sorted(SCENARIOS)):
        events += simulate_host(scenario, f"h{i}", start=1.79e9, duration_s=1200, interval_s=5, seed=3, gpus=2)[1]
    events.sort(key=lambda e: e["@timestamp"])
    events = [c.validate_or_raise(e) for e in events]

    steady = []
    add = GpuWindows.add

    def counting_add(self, s):
        closed = add(self, s)
        steady.append(s.steady)
        return closed

    monkeypatch.setattr(GpuWindows, "add", counting_add)
    fast = Engine(strict=True)
    fast_alerts = [a for ev in events for a in fast.process(copy.deepcopy(ev))]

    def never_steady(self, s):
        closed = add(self, s)
        s.steady = False
        return closed

    monkeypatch.setattr(GpuWindows, "add", never_steady)
    slow = Engine(strict=True)
    slow_alerts = [a for ev in events for a in slow.process(copy.deepcopy(ev))]

    def key(alert):
        a = alert["gpusentry"]["alert"]
        return (alert["host"]["name"], alert["@timestamp"], a["status"], a["severity"], a["rules"], a["evidence"])

    assert fast.findings_by_rule == slow.findings_by_rule and fast.findings_by_rule
    assert [key(a) for a in fast_alerts] == [key(a) for a in slow_alerts] and fast_alerts
    assert sum(steady) > len(steady) / 2


def test_a_process_list_whose_figures_change_parses_to_the_same_list_and_the_sample_is_steady():
    """Per-process memory and SM figures change every sample; who runs on the GPU does not."""
    windows = GpuWindows(30, 20)
    first = c.validate_or_raise(gpu(1, util=95, procs=[gproc(2000, TRAINER, gib=70, sm=90)]))
    same_procs = c.validate_or_raise(gpu(6, util=96, procs=[gproc(2000, TRAINER, gib=71, sm=40)]))
    other_proc = c.validate_or_raise(gpu(11, util=96, procs=[gproc(2001, TRAINER, gib=71, sm=40)]))
    a, b, d = (read_sample(ev) for ev in (first, same_procs, other_proc))
    assert b.procs is a.procs and b.pids == (2000,)
    assert d.procs is not a.procs and d.pids == (2001,)
    for s in (a, b, d):
        windows.add(s)
    assert (a.steady, b.steady, d.steady) == (False, True, False)
