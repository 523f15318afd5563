"""``gpusentry replay``: run the detection engine over event files and captures, deterministically.

Input is JSONL (optionally gzip-compressed), one contract event per line, or a packet capture
(pcap / pcapng, told by its magic bytes, not its name): its TCP flows and DNS answers become
events of the host named by ``--host`` (default: the file's stem), see :mod:`gpusentry.pcap`.
A bad line is reported with its file and line number and skipped; everything else still runs.
Alerts are written as JSONL.  Event time drives the engine, so the same files always give the
same alerts.  Progress goes to stderr every few seconds on big inputs.
"""

from __future__ import annotations

import gzip
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from rich.console import Console

from gpusentry.config import Config
from gpusentry.contract import Reject, RejectCode, may_have_dotted_keys, validate_event
from gpusentry.pcap import CaptureError, CaptureStats, is_capture, read_capture

log = logging.getLogger(__name__)
MAX_REPORTED_REJECTS = 20
PROGRESS_EVERY_S = 5.0


@dataclass
class ReplaySummary:
    files: int = 0
    events_read: int = 0
    rejected: int = 0
    alerts: int = 0
    reject_codes: Counter[str] = field(default_factory=Counter)
    engine: str = "detection engine"
    packets: int = 0
    packets_skipped: int = 0
    failed_files: list[str] = field(default_factory=list)
    detector_failures: int = 0
    highest_severity: str | None = None

    def describe(self) -> str:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(self.reject_codes.items()))
        rejected = f"{self.rejected} rejected ({codes})" if self.rejected else "0 rejected"
        text = (f"replay: {self.files} file(s), {self.events_read} events read, {rejected}, "
                f"{self.alerts} alerts raised by the {self.engine}")
        if self.highest_severity:
            text += f" (highest severity: {self.highest_severity})"
        if self.packets:
            text += f"; {self.packets} packets ({self.packets_skipped} not decoded)"
        if self.detector_failures:
            text += f"; {self.detector_failures} detector failures (see the log)"
        if self.failed_files:
            text += f"; {len(self.failed_files)} file(s) unreadable"
        return text


def open_text(path: Path) -> IO[bytes]:
    """Open a plain or gzip-compressed file for binary reading (gzip told by its magic bytes)."""
    raw = path.open("rb")
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]  # GzipFile is a binary IO
    return raw


class NotJsonl(OSError):
    """A file that is neither JSON lines nor a capture: refused whole, not read as thousands of bad lines."""


def _looks_binary(head: bytes) -> bool:
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 4  # not just a character cut at the end of the sample
    return False


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """Yield (line number, event or reject) for each non-blank line."""
    loads, validate, not_json, dotted = orjson.loads, validate_event, RejectCode.NOT_JSON, may_have_dotted_keys
    with open_text(path) as fh:
        head = fh.peek(4096)[:4096] if hasattr(fh, "peek") else b""
        if _looks_binary(head):
            raise NotJsonl(f"binary content, neither JSON lines (one event per line, optionally gzip) nor a "
                           f"pcap/pcapng capture (starts with {head[:8].hex()}); give the agent's JSONL output or a "
                           f"capture")
        for lineno, line in enumerate(fh, 1):
            try:
                obj = loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip():
                    continue
                yield lineno, Reject(not_json, f"not valid JSON: {exc}")
                continue
            yield lineno, validate(obj, dotted_keys=None if dotted(line) else False)
        # A gzip file cut short raises EOFError from the loop above; let the caller report it.


def iter_capture(path: Path, host: str, stats: CaptureStats,
                 console: Console | None = None) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """Events of a capture, numbered in time order (a reject's "line" is the event's position)."""
    last = [time.monotonic()]

    def progress(s: CaptureStats) -> None:
        if console is not None and time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            console.print(f"replay: {path.name}: {s.packets:,} packets read, {s.dns_answers:,} DNS answers so far",
                          highlight=False, markup=False)

    for i, event in enumerate(read_capture(path, host, stats, progress), 1):
        yield i, validate_event(event)


def _is_capture(path: Path) -> bool:
    with path.open("rb") as fh:
        return is_capture(fh.read(4))


def run_replay(files: list[Path], cfg: Config, *, out: Path | None = None, progress_console: Console | None = None,
               host: str | None = None, engine: Any = None) -> ReplaySummary:
    """Replay ``files``; ``engine`` (default: every detector, configured by ``cfg``) does the detection."""
    from detectors.base import SEVERITIES

    summary = ReplaySummary(files=len(files))
    if engine is None:
        from detectors.engine import Engine

        engine = Engine.from_config(cfg)
    summary.engine = type(engine).__name__
    process = engine.process
    sink: IO[bytes] = out.open("wb") if out else sys.stdout.buffer
    started = last_progress = time.monotonic()

    def emit(alerts: list[dict[str, Any]]) -> None:
        for alert in alerts:
            sink.write(orjson.dumps(alert) + b"\n")
            summary.alerts += 1
            sev = alert["gpusentry"]["alert"]["severity"]
            if summary.highest_severity is None or SEVERITIES.index(sev) > SEVERITIES.index(summary.highest_severity):
                summary.highest_severity = sev

    try:
        for path in files:
            stats = CaptureStats()
            if hasattr(engine, "new_timeline"):
                engine.new_timeline()  # each file's clock is judged against its own time line
            try:
                items = (iter_capture(path, host or path.stem, stats, progress_console) if _is_capture(path)
                         else iter_jsonl(path))
                for lineno, item in items:
                    if isinstance(item, Reject):
                        summary.rejected += 1
                        summary.reject_codes[item.code.value] += 1
                        if progress_console is not None and summary.rejected <= MAX_REPORTED_REJECTS:
                            progress_console.print(f"{path}:{lineno}: rejected: {item.reason}", highlight=False,
                                                   markup=False)
                        continue
                    summary.events_read += 1
                    alerts = process(item)
                    if alerts:
                        emit(alerts)
                    if engine.clock_rejects:
                        for rejected in engine.drain_clock_rejects():
                            summary.rejected += 1
                            summary.reject_codes[RejectCode.CLOCK_SKEW.value] += 1
                            if progress_console is not None and summary.rejected <= MAX_REPORTED_REJECTS:
                                progress_console.print(f"{path}:{lineno}: rejected: {rejected.reason}",
                                                       highlight=False, markup=False)
                    if engine.failures:
                        summary.detector_failures += len(engine.drain_failures())
                    if progress_console is not None and not summary.events_read & 0x3FFF:
                        now = time.monotonic()
                        if now - last_progress >= PROGRESS_EVERY_S:
                            last_progress = now
                            rate = summary.events_read / max(now - started, 1e-9)
                            progress_console.print(f"replay: {path.name}: {summary.events_read} events, "
                                                   f"{summary.alerts} alerts ({rate:,.0f} events/s)",
                                                   highlight=False, markup=False)
            except (CaptureError, OSError, EOFError) as exc:
                summary.failed_files.append(str(path))
                if progress_console is not None:
                    progress_console.print(f"{path}: cannot be read: {exc}", highlight=False, markup=False)
            summary.packets += stats.packets
            summary.packets_skipped += stats.skipped
            if stats.truncated and progress_console is not None:
                progress_console.print(f"{path}: capture ends mid-packet; replayed what came before",
                                       highlight=False, markup=False)
        emit(engine.finish())
        if progress_console is not None and summary.rejected > MAX_REPORTED_REJECTS:
            progress_console.print(f"... and {summary.rejected - MAX_REPORTED_REJECTS} more rejected lines")
    finally:
        if out:
            sink.close()
        else:
            sink.flush()
    return summary
