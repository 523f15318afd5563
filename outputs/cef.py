"""ArcSight Common Event Format (CEF) 0 for alerts, with the escaping the CEF specification requires.

``CEF:0|Device Vendor|Device Product|Device Version|Signature ID|Name|Severity|Extension``

* header fields escape ``\\`` and ``|`` (as ``\\\\`` and ``\\|``); a header cannot hold a line break, so
  one becomes a space;
* extension values escape ``\\``, ``=`` and line breaks (``\\\\``, ``\\=``, ``\\n``, ``\\r``); ``|`` is
  literal there;
* keys are the standard CEF dictionary names (``rt``, ``shost``, ``src``, ``dst``, ``dpt``, ``suser``,
  ``msg``, ``act``, ``cs1``..``cs6`` with ``cs<n>Label``, ...), so a SIEM maps them without a parser.

:func:`parse_cef` reads a line back (tests, and anyone checking what a SIEM will see).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gpusentry import __version__
from gpusentry.contract import get
from gpusentry.timefmt import parse_timestamp
from outputs.base import Alert, alert_time, dedup_key, first, severity, status, truncate

VENDOR = PRODUCT = "gpusentry"
# Limits of the ArcSight dictionary: msg 1023 characters, custom strings 4000.
MSG_LIMIT = 1023
CUSTOM_STRING_LIMIT = 4000


def escape_header(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def escape_extension(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("=", "\\=")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def cef_severity(alert: Alert) -> int:
    """CEF severity 0-10 from ``event.severity`` 0-100 (falling back to the severity word)."""
    score = get(alert, "event.severity")
    if isinstance(score, int | float) and not isinstance(score, bool):
        return max(0, min(10, round(score / 10)))
    return {"low": 3, "medium": 5, "high": 8, "critical": 10}[severity(alert)]


def _evidence_summary(alert: Alert) -> str:
    entries = get(alert, "gpusentry.alert.evidence") or []
    return " ; ".join(f"{e.get('rule.id')}: {e.get('summary')}" for e in entries if isinstance(e, dict))


def cef_extension_fields(alert: Alert) -> list[tuple[str, Any]]:
    """The extension as ordered (key, value) pairs; absent fields are left out."""
    cost = get(alert, "gpusentry.alert.cost") or {}
    custom = [
        ("dedupKey", dedup_key(alert)),
        ("severity", severity(alert)),
        ("commandLine", first(alert, "process.command_line")),
        ("gpuUuid", first(alert, "gpu.uuid")),
        ("technique", first(alert, "threat.technique.subtechnique.id", "threat.technique.id")),
        ("evidence", truncate(_evidence_summary(alert), CUSTOM_STRING_LIMIT) or None),
    ]
    pairs: list[tuple[str, Any]] = [
        ("rt", int(alert_time(alert) * 1000)),
        ("shost", first(alert, "host.name")),
        ("src", first(alert, "source.ip")),
        ("spt", first(alert, "source.port")),
        ("dst", first(alert, "destination.ip")),
        ("dpt", first(alert, "destination.port")),
        ("dhost", first(alert, "destination.domain")),
        ("suser", first(alert, "user.name")),
        ("sproc", first(alert, "process.name")),
        ("spid", first(alert, "process.pid")),
        ("filePath", first(alert, "process.executable")),
        ("act", status(alert)),
        ("cat", "GPU/compute hijacking"),
        ("externalId", get(alert, "event.id")),
        ("msg", truncate(str(get(alert, "message") or ""), MSG_LIMIT)),
        ("cn1", cost.get("busy_gpu_seconds", cost.get("gpu_seconds"))), ("cn1Label", "busyGpuSeconds"),
        ("cfp1", cost.get("usd")), ("cfp1Label", "costUsd"),
        ("cfp2", cost.get("energy_kwh")), ("cfp2Label", "energyKwh"),
    ]
    for n, (label, value) in enumerate(custom, 1):
        if value is not None:
            pairs += [(f"cs{n}", truncate(str(value), CUSTOM_STRING_LIMIT)), (f"cs{n}Label", label)]
    # Every CEF time field in milliseconds since the epoch, as rt: ArcSight and QRadar read that form of CEF's
    # date fields without a format to configure (an RFC 3339 string in end= was kept as text).
    if get(alert, "event.start"):
        pairs.append(("start", _epoch_ms(get(alert, "event.start"))))
    if status(alert) == "resolved" and get(alert, "event.end"):
        pairs.append(("end", _epoch_ms(get(alert, "event.end"))))
    return [(k, v) for k, v in pairs if v is not None and v != ""]


def _epoch_ms(value: Any) -> int | None:
    try:
        return int(parse_timestamp(str(value)) * 1000)
    except ValueError:
        return None  # not a time: the field is left out rather than sent as text a SIEM misreads


def format_cef(alert: Alert) -> str:
    header = [
        "CEF:0", VENDOR, PRODUCT, __version__,
        get(alert, "rule.id") or "gpusentry.incident",
        get(alert, "rule.name") or "GPU/compute hijacking incident",
        str(cef_severity(alert)),
    ]
    head = "|".join(h if i == 0 else escape_header(h) for i, h in enumerate(header))
    ext = " ".join(f"{k}={escape_extension(_scalar(v))}" for k, v in cef_extension_fields(alert))
    return f"{head}|{ext}"


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e15 else repr(value)
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


# ---------------------------------------------------------------------------- parsing (tests, checks)

_UNESCAPE_HEADER = re.compile(r"\\([\\|])")
_EXT_KEY = re.compile(r"(?:^| )([A-Za-z0-9_.\[\]]+)=")


def _unescape_extension(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """Split a CEF line into its 7 unescaped header fields and its unescaped extension."""
    if not line.startswith("CEF:"):
        raise ValueError(f"not a CEF line: {line[:40]!r}")
    header: list[str] = []
    start = i = 0
    while len(header) < 7:
        if i >= len(line):
            raise ValueError("CEF header has fewer than 7 fields")
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == "|":
            header.append(_UNESCAPE_HEADER.sub(r"\1", line[start:i]))
            start = i + 1
        i += 1
    ext_text = line[start:]
    # A key starts after a space and ends at an unescaped '='; '=' inside values is always escaped.
    keys = [m for m in _EXT_KEY.finditer(ext_text) if not _escaped(ext_text, m.end() - 1)]
    ext: dict[str, str] = {}
    for n, m in enumerate(keys):
        end = keys[n + 1].start() if n + 1 < len(keys) else len(ext_text)
        ext[m.group(1)] = _unescape_extension(ext_text[m.end():end])
    return header, ext


def _escaped(text: str, pos: int) -> bool:
    backslashes = 0
    while pos - 1 - backslashes >= 0 and text[pos - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1
