"""Decoding the first bytes a client sent (``gpusentry.flow.payload_b64``) into JSON-RPC messages.

Mining protocols (Stratum v1, EthereumStratum, eth-proxy, XMRig/Monero) are JSON-RPC: one JSON
object per line over TCP, or a JSON body in an HTTP POST.  The agent keeps only the first 512
bytes, so the last line is often cut short: a cut line is not thrown away, its ``"method"`` is
recovered with a pattern anchored at the start of the object, and the message is marked
``truncated`` so detectors can weigh it lower.  Nothing here raises on any input.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Any

import orjson

# A cut-off JSON-RPC line: recover "method" when it appears among the first keys of the object.
_PARTIAL_METHOD = re.compile(rb'^\s*\{(?:\s*"(?:id|jsonrpc|worker)"\s*:\s*(?:"[^"]{0,64}"|[\d.]+|null)\s*,)*'
                             rb'\s*"method"\s*:\s*"([A-Za-z0-9_.]{1,64})"')
_HTTP_METHODS = (b"POST ", b"PUT ", b"GET ", b"PATCH ")


@dataclass(frozen=True, slots=True)
class RpcMessage:
    method: str | None
    params: Any
    has_id: bool
    truncated: bool  # recovered from a line the 512-byte cut left incomplete
    body: dict[str, Any] | None  # the whole object when it parsed


def decode_payload(b64: Any) -> bytes | None:
    """The payload bytes, or None when absent or not base64."""
    if not isinstance(b64, str) or not b64:
        return None
    try:
        return binascii.a2b_base64(b64.encode("ascii", "replace"))
    except (binascii.Error, ValueError):
        return None


def _objects(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list):  # JSON-RPC batch
        return [d for d in doc[:32] if isinstance(d, dict)]
    return []


def _message(obj: dict[str, Any]) -> RpcMessage:
    method = obj.get("method")
    return RpcMessage(method if isinstance(method, str) else None, obj.get("params"), "id" in obj, False, obj)


def _lines(data: bytes) -> list[RpcMessage]:
    out: list[RpcMessage] = []
    parts = data.split(b"\n")
    last = len(parts) - 1
    for i, line in enumerate(parts):
        line = line.strip()
        if not line or line[:1] not in (b"{", b"["):
            continue
        try:
            out.extend(_message(o) for o in _objects(orjson.loads(line)))
            continue
        except orjson.JSONDecodeError:
            pass
        if i == last:  # the cut-off last line: recover the method only
            m = _PARTIAL_METHOD.match(line)
            if m:
                out.append(RpcMessage(m.group(1).decode("ascii"), None, b'"id"' in line[:m.start(1)], True, None))
    return out


def rpc_messages(data: bytes | None) -> list[RpcMessage]:
    """JSON-RPC messages in a client payload: line-delimited JSON, an HTTP POST body, or an LSP-style frame."""
    if not data:
        return []
    head = data[:16].lstrip()
    if head[:1] in (b"{", b"["):
        return _lines(data)
    if data.startswith(_HTTP_METHODS) or data[:15].lower().startswith(b"content-length:"):
        _, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            _, sep, body = data.partition(b"\n\n")
        if sep and body.lstrip()[:1] in (b"{", b"["):
            return _lines(body)
    return []


def is_http_request(data: bytes | None) -> bool:
    return bool(data) and data.startswith(_HTTP_METHODS)  # type: ignore[union-attr]


# The last payload decoded: every network detector asks for the same event's messages in turn.
_last: tuple[str | None, list[RpcMessage], bytes | None] = (None, [], None)


def flow_messages(event: dict[str, Any]) -> tuple[bytes | None, list[RpcMessage]]:
    """Payload bytes and JSON-RPC messages of a network event (decoded once for all detectors of the event)."""
    global _last
    ours = event.get("gpusentry")
    flow = ours.get("flow") if isinstance(ours, dict) else None
    b64 = flow.get("payload_b64") if isinstance(flow, dict) else None
    if b64 is None:
        return None, []
    if _last[0] is b64:
        return _last[2], _last[1]
    data = decode_payload(b64)
    messages = rpc_messages(data)
    _last = (b64, messages, data)
    return data, messages


def params_text(params: Any, limit: int = 200) -> str:
    """Short printable form of RPC params for evidence summaries (wallets are trimmed)."""
    text = orjson.dumps(params).decode("utf-8", "replace") if params is not None else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flow_fields(event: dict[str, Any]) -> dict[str, Any]:
    """ECS fields an incident should carry about a flow."""
    dst = event.get("destination") or {}
    src = event.get("source") or {}
    proc = event.get("process") or {}
    return {"destination.ip": dst.get("ip"), "destination.port": dst.get("port"),
            "destination.domain": dst.get("domain"), "source.ip": src.get("ip"), "source.port": src.get("port"),
            "process.pid": proc.get("pid"), "process.name": proc.get("name"),
            "process.executable": proc.get("executable"),
            "tls.client.server_name": ((event.get("tls") or {}).get("client") or {}).get("server_name")}


def where(event: dict[str, Any]) -> str:
    dst = event.get("destination") or {}
    name = dst.get("domain") or dst.get("ip")
    proc = event.get("process") or {}
    by = f" by {proc.get('name')} (pid {proc.get('pid')})" if proc.get("pid") is not None else ""
    return f"{name}:{dst.get('port')}{by}"
