"""Write docs/catalogue.md: every detector, from its own metadata, grouped by the kind of evidence it finds, each
kind with its analyst runbook (docs/runbooks.toml: what it means, how to confirm, how to contain).

    python scripts/detector_catalogue.py [--check]

``--check`` exits 1 when the committed file is not what this writes (tests/test_docs.py runs it).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "docs" / "catalogue.md"
RUNBOOKS = REPO / "docs" / "runbooks.toml"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render() -> str:
    from detectors.base import Signal
    from detectors.engine import CLOCK_JUMP_RULE, discover
    runbooks = {}
    for i, entry in enumerate(tomllib.loads(RUNBOOKS.read_text())["runbook"], 1):
        keys = {"signal": str, "title": str, "meaning": str, "confirm": list, "contain": list}
        bad = [k for k, kind in keys.items() if not isinstance(entry.get(k), kind) or not entry.get(k)]
        if bad or set(entry) - set(keys):
            raise SystemExit(f"{RUNBOOKS}: [[runbook]] {i}: needs non-empty {', '.join(keys)} and nothing else "
                             f"(wrong: {', '.join(bad + sorted(set(entry) - set(keys)))})")
        runbooks[entry["signal"]] = entry
    signals = [v for k, v in vars(Signal).items() if k.isupper()]
    missing = [s for s in signals if s not in runbooks]
    if missing:
        raise SystemExit(f"{RUNBOOKS}: no runbook for {', '.join(missing)}")
    detectors = discover()
    lines = [
        "# Detector catalogue and analyst runbooks",
        "",
        "Written by `python scripts/detector_catalogue.py` from each detector's own metadata and `docs/runbooks.toml`;",
        "`tests/test_docs.py` keeps it current. An incident's `gpusentry.alert.signals` names the kinds of evidence it",
        "holds: read the runbook of each. How the kinds combine into a severity is in reference.md (Incidents).",
        "",
        f"{len(detectors)} detectors, {len(signals)} kinds of evidence.",
        "",
    ]
    for signal in signals:
        book = runbooks[signal]
        members = [d for d in detectors if d.signal == signal]
        lines += [f"## {book['title']} (`{signal}`)", "", book["meaning"], "", "**Confirm**", ""]
        lines += [f"1. {step}" for step in book["confirm"]]
        lines += ["", "**Contain**", ""]
        lines += [f"1. {step}" for step in book["contain"]]
        lines += [""]
        rows = [(d.id, d.title, d.severity, d.technique, ", ".join(sorted(ds.value.split(".")[-1] for ds in d.datasets)),
                 d.description) for d in members]
        if signal == Signal.CLOCK:
            rows.append((CLOCK_JUMP_RULE[0], CLOCK_JUMP_RULE[1], "low (medium with an open incident)", "T1496",
                         "any", CLOCK_JUMP_RULE[2]))
        if rows:
            lines += ["| detector | title | severity | technique | events | what it catches |", "|---|---|---|---|---|---|"]
            lines += [f"| `{i}` | {_cell(t)} | {_cell(s)} | {_cell(tech)} | {_cell(ev)} | {_cell(desc)} |"
                      for i, t, s, tech, ev, desc in rows]
            lines += [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/catalogue.md is not current")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/detector_catalogue.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
