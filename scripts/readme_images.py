"""Write the README's pictures: docs/architecture.svg (how the parts connect) and docs/up-demo.svg (what
`gpusentry up --demo` shows), both rendered by rich from the code below and from the live view's own code.

    python scripts/readme_images.py [--check]

The architecture is the table ``PARTS`` and ``FLOWS`` below (edit those, not the SVG). The `up` picture renders
streams.up's own screen with the incidents the detection engine raises on the demo scenario's first 25 minutes
and fixed child states, so it is reproducible; ``--check`` exits 1 when either file is not what this writes
(tests/test_docs.py runs it).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARCHITECTURE = REPO / "docs" / "architecture.svg"
UP_DEMO = REPO / "docs" / "up-demo.svg"

# (column, title, lines): left to right, what runs where.
PARTS = [
    ("GPU nodes", "gpusentry agent", ["NVML GPU samples, per process", "process starts (netlink)",
                                      "flows, first bytes, DNS", "who was allocated which GPU",
                                      "(kubelet PodResources, Slurm, Docker)", "spool on disk while Kafka is away"]),
    ("Kafka", "event topics", ["gpusentry.gpu  .process", "gpusentry.network  .dns", "keyed by host.name:",
                               "a host's events in one partition", "", "alerts · dead letters · feedback",
                               "checkpoints (compacted)"]),
    ("workers", "faust workers", ["detectors (plain Python)", "per-host models and windows", "correlation into incidents",
                                  "event-time order across topics", "checkpointed state: no lost", "or doubled updates"]),
    ("outputs", "gpusentry forward", ["syslog CEF / LEEF", "Splunk HEC · webhook", "Slack · PagerDuty",
                                      "retries, rate limits,", "breakers, dead letters"]),
]
FLOWS = ["events →", "partitions →", "incidents →"]


def architecture_svg() -> str:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    for _ in range(len(PARTS) * 2 - 1):
        grid.add_column(vertical="middle")
    cells: list[object] = []
    for i, (where, title, lines) in enumerate(PARTS):
        body = Text("\n".join(lines))
        cells.append(Panel(body, title=Text(title, style="bold"), subtitle=where, width=36, border_style="cyan"))
        if i < len(FLOWS):
            cells.append(Text(FLOWS[i], style="bold yellow"))
    grid.add_row(*cells)
    console = Console(record=True, width=170, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")
    console.print(grid)
    console.print(Text("  gpusentry replay / report run the same detectors over files; `gpusentry up` runs all of it on "
                       "one machine with an embedded broker.", style="dim"))
    return console.export_svg(title="gpusentry: agent → Kafka → workers → outputs", unique_id="gpusentry-arch")


class _NoNvml:
    """NVML as a machine without the NVIDIA driver answers (the picture shows `up --demo` on such a machine)."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's name
        raise self.NVMLError("Driver Not Loaded")


def up_demo_svg() -> str:
    from rich.console import Console

    from detectors.engine import Engine
    from gpusentry import contract as c
    from streams import up

    class Fixed:
        def __init__(self, name: str, status: str) -> None:
            self.name, self._status = name, status

        def status(self) -> str:
            return self._status

    view = up.IncidentView()
    engine = Engine()
    start = 1_793_491_200.0  # 2026-11-01T00:00:00Z
    sent = 0
    for _, ts, batch in up.demo_batches(start):
        if ts > start + 25 * 60:
            break
        for event in batch:
            sent += 1
            for alert in engine.process(c.validate_or_raise(event)):
                view.add(alert)
    children = [Fixed("agent", "running (pid 4242)"), Fixed("worker", "running (pid 4243)")]

    class DemoState:
        scenario, sent, error = up.DEMO_SCENARIO, 0, None

        def is_alive(self) -> bool:
            return True

    demo = DemoState()
    demo.sent = sent
    screen = up._screen(view, up.embedded_broker_note("127.0.0.1:9092"), children, demo,  # type: ignore[arg-type]
                        Path("~/.local/share/gpusentry/incidents.jsonl"), Path("/tmp/gpusentry-up-logs"),
                        up.gpu_note(_NoNvml(), demo=True))
    console = Console(record=True, width=150, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")
    console.print(screen)
    return console.export_svg(title="gpusentry up --demo", unique_id="gpusentry-up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a picture is not what this writes")
    args = ap.parse_args()
    stale = []
    for path, render in ((ARCHITECTURE, architecture_svg), (UP_DEMO, up_demo_svg)):
        svg = render()
        if args.check:
            if not path.exists() or path.read_text() != svg:
                stale.append(path)
        else:
            path.write_text(svg)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(map(str, stale))}: run python scripts/readme_images.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
