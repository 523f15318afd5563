"""``gpusentry replay``: run the detection engine over event files, deterministically.

Input is JSONL (optionally gzip-compressed), one contract event per line.  A bad line is
reported with its file and line number and skipped; everything else still runs.  Alerts are
written as JSONL.  Event time drives the engine, so the same files always give the same alerts.
"""

from __future__ import annotations

import gzip
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from rich.console import Console

from gpusentry.config import Config
from gpusentry.contract import Reject, RejectCode, validate_event

log = logging.getLogger(__name__)
MAX_REPORTED_REJECTS = 20


@dataclass
class ReplaySummary:
    files: int = 0
    events_read: int = 0
    rejected: int = 0
    alerts: int = 0
    reject_codes: Counter[str] = field(default_factory=Counter)
    engine: str = "detection engine"

    def describe(self) -> str:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(self.reject_codes.items()))
        rejected = f"{self.rejected} rejected ({codes})" if self.rejected else "0 rejected"
        return (f"replay: {self.files} file(s), {self.events_read} events read, {rejected}, "
                f"{self.alerts} alerts raised by the {self.engine}")


def open_text(path: Path) -> IO[bytes]:
    """Open a plain or gzip-compressed file for binary reading (gzip told by its magic bytes)."""
    raw = path.open("rb")
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]  # GzipFile is a binary IO
    return raw


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """Yield (line number, event or reject) for each non-blank line."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield lineno, Reject(RejectCode.NOT_JSON, f"not valid JSON: {exc}")
                continue
            yield lineno, validate_event(obj)


def run_replay(files: list[Path], cfg: Config, *, out: Path | None = None,
               progress_console: Console | None = None) -> ReplaySummary:
    summary = ReplaySummary(files=len(files))
    engine = _load_engine(cfg)
    summary.engine = type(engine).__name__ if engine is not None else "(no engine in this build: validation only)"
    sink: IO[bytes] = out.open("wb") if out else sys.stdout.buffer
    try:
        for path in files:
            for lineno, item in iter_jsonl(path):
                if isinstance(item, Reject):
                    summary.rejected += 1
                    summary.reject_codes[item.code.value] += 1
                    if progress_console is not None and summary.rejected <= MAX_REPORTED_REJECTS:
                        progress_console.print(f"{path}:{lineno}: rejected: {item.reason}", highlight=False,
                                               markup=False)
                    continue
                summary.events_read += 1
                if engine is not None:
                    for alert in engine.process(item):
                        sink.write(orjson.dumps(alert) + b"\n")
                        summary.alerts += 1
        if engine is not None:
            for alert in engine.finish():
                sink.write(orjson.dumps(alert) + b"\n")
                summary.alerts += 1
        if progress_console is not None and summary.rejected > MAX_REPORTED_REJECTS:
            progress_console.print(f"... and {summary.rejected - MAX_REPORTED_REJECTS} more rejected lines")
    finally:
        if out:
            sink.close()
        else:
            sink.flush()
    return summary


def _load_engine(cfg: Config) -> Any:
    try:
        from detectors.engine import Engine
    except ImportError:
        return None
    return Engine.from_config(cfg)
