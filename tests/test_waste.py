"""`gpusentry waste`: allocated-but-idle GPU time per owner, priced with the same list as stolen time."""

from __future__ import annotations

import gzip
import subprocess
import sys

import orjson
import pytest

from detectors.gpu._examples import A100, allocated, gpu, job, pod
from gpusentry.pricing import price_list
from gpusentry.settings.detection import DetectionSettings
from gpusentry.waste import WasteError, rows, tally, tally_files

pytestmark = pytest.mark.allocation

A = pod("team-a", "trainer-0", "6f1b2c3d-0000-4000-8000-00000000000a")
B = pod("team-b", "nb-1", "6f1b2c3d-0000-4000-8000-00000000000b")


def hour(uuid: str, index: int, util: float, *owners, state: str = "current", start: float = 0.0):
    return [gpu(start + 10 * i, util=util, index=index, uuid=uuid, allocation=allocated("kubernetes", *owners,
                                                                                        state=state))
            for i in range(361)]  # 360 intervals of 10 s: one hour


def lines(events):
    return [(f"t:{n}", orjson.dumps(e)) for n, e in enumerate(events, 1)]


def test_idle_allocated_time_is_priced_per_owner_and_shared_between_holders():
    s = DetectionSettings()
    events = (hour("GPU-a", 0, 0, A)  # A holds an idle GPU for an hour: one wasted GPU-hour
              + hour("GPU-b", 1, 95, A)  # and a busy one: allocated, not wasted
              + hour("GPU-c", 2, 0, A, B)  # an idle GPU time-sliced between A and B: half an hour each
              + hour("GPU-d", 3, 0, A, state="stale")  # no current answer: not counted
              + hour("GPU-e", 4, 0))  # nobody holds it: not waste (gpu.unallocated_use judges busy ones)
    t = tally(lines(events), s)
    by_owner = {r["owner"]: r for r in rows(t, s, "owner")}
    rate = price_list(s.pricing).quote(A100).rate
    a = by_owner["pod team-a/trainer-0"]
    assert a["idle_gpu_hours"] == pytest.approx(1.5) and a["allocated_gpu_hours"] == pytest.approx(2.5)
    assert a["waste"] == pytest.approx(1.5 * rate, rel=1e-6) and a["currency"] == "USD"
    assert by_owner["pod team-b/nb-1"]["idle_gpu_hours"] == pytest.approx(0.5)
    assert list(by_owner) == ["pod team-a/trainer-0", "pod team-b/nb-1"], "largest waste first"
    assert [r["namespace"] for r in rows(t, s, "namespace")] == ["team-a", "team-b"]


def test_slurm_jobs_by_user_and_gaps_capped():
    s = DetectionSettings()
    events = [gpu(t, util=0, allocation=allocated("slurm", job("77") | {"user": "alice"})) for t in (0, 10, 3600)]
    t = tally(lines(events), s)
    [row] = rows(t, s, "user")
    assert row["user"] == "alice" and row["idle_gpu_hours"] == pytest.approx((10 + 60) / 3600, abs=1e-6)


def test_bad_lines_are_named_and_the_rest_still_counts(tmp_path):
    path = tmp_path / "events.jsonl.gz"
    good = hour("GPU-a", 0, 0, A)
    with gzip.open(path, "wb") as f:
        f.write(b"not json\n" + orjson.dumps({"event": {"dataset": "gpusentry.gpu"}}) + b"\n")
        f.write(b"\n".join(orjson.dumps(e) for e in good) + b"\n")
    t = tally_files([path], DetectionSettings())
    assert len(t.skipped) == 2 and t.skipped[0].startswith(f"{path}:1: not JSON")
    assert rows(t, DetectionSettings(), "owner")[0]["idle_gpu_hours"] == pytest.approx(1.0)
    with pytest.raises(WasteError, match="cannot read"):
        tally_files([tmp_path / "absent.jsonl"], DetectionSettings())
    with pytest.raises(WasteError, match="--by"):
        rows(t, DetectionSettings(), "planet")


def test_cli_writes_the_ledger(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in hour("GPU-a", 0, 0, A)) + b"\n")
    done = subprocess.run([sys.executable, "-m", "gpusentry.cli", "waste", str(path), "--format", "json"],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [row] = orjson.loads(done.stdout)
    assert row["owner"] == "pod team-a/trainer-0" and row["idle_gpu_hours"] == pytest.approx(1.0)
    assert b"1.00 idle GPU-hours" in done.stderr
