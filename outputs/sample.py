"""Sample incidents made by the real detection engine, for `gpusentry outputs test` and the tests.

A miner process starts on a GPU host and the engine raises an incident; a quiet GPU sample after
``resolve_after_s`` resolves it.  Nothing is hand-written: the alerts are exactly what a worker would
publish (plus ``event.created``, which the publisher stamps).
"""

from __future__ import annotations

from typing import Any

from detectors.engine import Engine
from gpusentry import contract as c
from gpusentry.settings.detection import DetectionSettings
from gpusentry.timefmt import format_timestamp

T0 = 1_790_000_000.0


def sample_incident(host: str = "gpu-node-7", *, t0: float = T0, test_marker: bool = True,
                    command_line: str = "/dev/shm/.x/xmrig --url pool.example:3333 --donate-level 1",
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(open alert, resolved alert) of one incident on ``host``, raised by the detection engine."""
    settings = DetectionSettings()
    engine = Engine(settings, strict=True)
    exe = command_line.split()[0]
    start = c.process_event(host, t0, action="start", pid=31337, name=exe.rsplit("/", 1)[-1], executable=exe,
                            command_line=command_line, args=command_line.split(), working_directory="/tmp",
                            start=t0, parent_pid=1, parent_name="bash", user_name="svc-train",
                            event_id=f"sample-{host}-{int(t0)}")
    opened = [a for a in engine.process(start) if a["gpusentry"]["alert"]["status"] == "open"]
    quiet = c.gpu_event(host, t0 + settings.resolve_after_s + 5, index=0, uuid="GPU-00000000-sample", name="H100",
                        gpu_pct=0.0, event_id=f"sample-quiet-{host}-{int(t0)}")
    resolved = [a for a in engine.process(quiet) if a["gpusentry"]["alert"]["status"] == "resolved"]
    if not opened or not resolved:
        raise RuntimeError("the detection engine raised no sample incident: is process.miner_binary installed?")
    open_alert, resolved_alert = opened[0], resolved[0]
    for alert in (open_alert, resolved_alert):
        alert["event"]["created"] = format_timestamp(t0)
        if test_marker:
            alert["message"] = "[TEST from gpusentry outputs test] " + alert["message"]
            alert["gpusentry"]["alert"]["dedup_key"] = "test-" + alert["gpusentry"]["alert"]["dedup_key"]
    return open_alert, resolved_alert
