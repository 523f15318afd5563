"""IBM QRadar Log Event Extended Format (LEEF) 2.0 for alerts.

``LEEF:2.0|Vendor|Product|Version|EventID|DelimiterCharacter|key=value<delim>key=value...``

LEEF has no escape sequences, so nothing a value holds may look like structure: the declared
delimiter inside a value is percent-encoded (``^`` becomes ``%5E``), as are ``%`` itself and line
breaks (``%0A``, ``%0D``), so a value decodes exactly with :func:`urllib.parse.unquote`.  Header
fields cannot hold ``|``; it is replaced by ``/``.  Keys are QRadar's predefined attributes where one
fits (``devTime``, ``src``, ``dst``, ``dstPort``, ``srcPort``, ``usrName``, ``sev``, ``cat``,
``identHostName``), our own names otherwise.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from gpusentry import __version__
from gpusentry.contract import get
from gpusentry.timefmt import format_timestamp
from outputs.base import Alert, alert_time, dedup_key, first, severity, status, truncate
from outputs.cef import cef_severity

DEV_TIME_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSX"


def delimiter_token(delimiter: str) -> str:
    """How the header declares the delimiter: the character itself, or ``xHH`` for control/space/``|``."""
    if delimiter.isprintable() and delimiter not in " |":
        return delimiter
    return f"x{ord(delimiter):02X}"


def escape_value(value: Any, delimiter: str) -> str:
    text = str(value).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(delimiter, f"%{ord(delimiter):02X}")


def _header(value: Any) -> str:
    return str(value).replace("|", "/").replace("\r", " ").replace("\n", " ")


def leef_fields(alert: Alert) -> list[tuple[str, Any]]:
    cost = get(alert, "gpusentry.alert.cost") or {}
    ts = alert_time(alert)
    pairs: list[tuple[str, Any]] = [
        ("devTime", format_timestamp(ts)), ("devTimeFormat", DEV_TIME_FORMAT),
        ("cat", "GPU/compute hijacking"),
        ("sev", max(1, cef_severity(alert))),
        ("identHostName", first(alert, "host.name")),
        ("src", first(alert, "source.ip")), ("srcPort", first(alert, "source.port")),
        ("dst", first(alert, "destination.ip")), ("dstPort", first(alert, "destination.port")),
        ("dstDomain", first(alert, "destination.domain")),
        ("usrName", first(alert, "user.name")),
        ("processName", first(alert, "process.name")), ("processId", first(alert, "process.pid")),
        ("commandLine", first(alert, "process.command_line")),
        ("gpuUuid", first(alert, "gpu.uuid")),
        ("status", status(alert)), ("severity", severity(alert)), ("dedupKey", dedup_key(alert)),
        ("technique", first(alert, "threat.technique.subtechnique.id", "threat.technique.id")),
        ("gpuSeconds", cost.get("busy_gpu_seconds", cost.get("gpu_seconds"))), ("costUsd", cost.get("usd")),
        ("energyKwh", cost.get("energy_kwh")),
        ("msg", truncate(str(get(alert, "message") or ""), 1023)),
    ]
    return [(k, v) for k, v in pairs if v is not None and v != ""]


def format_leef(alert: Alert, delimiter: str = "^") -> str:
    header = ["LEEF:2.0", "gpusentry", "gpusentry", __version__, get(alert, "rule.id") or "gpusentry.incident",
              delimiter_token(delimiter)]
    head = "|".join(h if i == 0 else _header(h) for i, h in enumerate(header))
    attrs = delimiter.join(f"{k}={escape_value(v, delimiter)}" for k, v in leef_fields(alert))
    return f"{head}|{attrs}"


def parse_leef(line: str) -> tuple[list[str], dict[str, str]]:
    """Split a LEEF 2.0 line into its header fields and its decoded attributes."""
    parts = line.split("|", 6)
    if len(parts) != 7 or parts[0] != "LEEF:2.0":
        raise ValueError(f"not a LEEF 2.0 line: {line[:40]!r}")
    token = parts[5]
    delimiter = chr(int(token[1:], 16)) if len(token) > 1 and token[0] in "xX" else token
    attrs: dict[str, str] = {}
    for pair in parts[6].split(delimiter):
        key, _, value = pair.partition("=")
        attrs[key] = unquote(value)
    return parts[:6], attrs
