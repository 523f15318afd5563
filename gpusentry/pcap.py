"""Packet captures (pcap, pcapng) as contract events, for ``gpusentry replay``.

Each TCP connection becomes one ``gpusentry.network`` event at the time of its first packet,
from the side that opened it (the SYN sender; without a SYN, the side with the higher port) to
the other, carrying the first ≤ 512 bytes the opener sent, reassembled in sequence order
(retransmissions and out-of-order segments are handled; a gap ends the payload), and the TLS SNI
when those bytes start with a ClientHello.  DNS answers (UDP port 53) become ``gpusentry.dns``
events, and a flow to an address a DNS answer gave gets that name as ``destination.domain``.
Packets that do not decode are counted and skipped; a file that is not a capture raises
:class:`CaptureError` naming the file.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import dpkt

from gpusentry.contract import MAX_PAYLOAD_BYTES, dns_event, network_event

PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# Bytes kept per flow before reassembly: enough for the payload plus some retransmitted copies.
_KEEP_BYTES = 4 * MAX_PAYLOAD_BYTES
_SEQ_MOD = 1 << 32
_DECODE_ERRORS = (dpkt.UnpackError, dpkt.NeedData, IndexError, struct.error, ValueError, KeyError, TypeError,
                  OSError)


class CaptureError(ValueError):
    """The file is not a readable pcap/pcapng capture."""


def is_capture(head: bytes) -> bool:
    return head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_MAGIC


@dataclass
class CaptureStats:
    packets: int = 0
    skipped: int = 0  # packets that did not decode, or of a link type we do not read
    flows: int = 0
    dns_answers: int = 0
    truncated: bool = False
    skip_reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class _Flow:
    client: tuple[str, int]
    server: tuple[str, int]
    first_ts: float
    domain: str | None
    isn: int | None = None  # the client's SYN sequence number, when seen
    first_seq: int | None = None
    segments: list[tuple[int, bytes]] = field(default_factory=list)  # (offset from first_seq, data)
    kept: int = 0
    closed: bool = False

    def add(self, seq: int, data: bytes) -> None:
        if self.kept >= _KEEP_BYTES or not data:
            return
        if self.first_seq is None:
            self.first_seq = seq
        off = (seq - self.first_seq) % _SEQ_MOD
        if off >= _SEQ_MOD // 2:  # before the first segment we saw (out of order)
            off -= _SEQ_MOD
        self.segments.append((off, data))
        self.kept += len(data)

    def payload(self) -> bytes:
        if not self.segments or self.first_seq is None:
            return b""
        if self.isn is not None:
            start = ((self.isn + 1 - self.first_seq) % _SEQ_MOD)
            if start >= _SEQ_MOD // 2:
                start -= _SEQ_MOD
        else:
            start = min(off for off, _ in self.segments)
        out = bytearray()
        cursor = start
        for off, data in sorted(self.segments, key=lambda s: s[0]):
            if off > cursor:
                break  # a gap: bytes we never saw
            tail = data[cursor - off:]
            out += tail
            cursor += len(tail)
            if len(out) >= MAX_PAYLOAD_BYTES:
                break
        return bytes(out[:MAX_PAYLOAD_BYTES])


def client_hello_sni(data: bytes) -> str | None:
    """The server name of a TLS ClientHello at the start of ``data``; None when absent or cut short."""
    try:
        if len(data) < 5 or data[0] != 0x16 or data[1] != 0x03 or data[5] != 0x01:
            return None
        pos = 5 + 4 + 2 + 32  # record header, handshake header, client_version, random
        pos += 1 + data[pos]  # session id
        pos += 2 + int.from_bytes(data[pos:pos + 2], "big")  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = min(len(data), pos + 2 + int.from_bytes(data[pos:pos + 2], "big"))
        pos += 2
        while pos + 4 <= end:
            ext_type = int.from_bytes(data[pos:pos + 2], "big")
            ext_len = int.from_bytes(data[pos + 2:pos + 4], "big")
            pos += 4
            if ext_type == 0:  # server_name: list length, then (type, length, name)
                if pos + 5 > len(data) or data[pos + 2] != 0:
                    return None
                name_len = int.from_bytes(data[pos + 3:pos + 5], "big")
                raw = data[pos + 5:pos + 5 + name_len]
                if len(raw) != name_len or not name_len:
                    return None
                name = raw.decode("ascii")
                ok = all(ch.isalnum() or ch in "-._" for ch in name)
                return name.lower() if ok else None
            pos += ext_len
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _ip_text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def _network_layer(linktype: int, buf: bytes) -> Any:
    if linktype == dpkt.pcap.DLT_EN10MB:
        frame: Any = dpkt.ethernet.Ethernet(buf)
        return frame.data
    if linktype in (dpkt.pcap.DLT_RAW, 12, 14, 228, 229):
        version = buf[0] >> 4
        return dpkt.ip.IP(buf) if version == 4 else dpkt.ip6.IP6(buf) if version == 6 else None
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return dpkt.sll.SLL(buf).data
    if linktype == 276 and hasattr(dpkt, "sll2"):
        return dpkt.sll2.SLL2(buf).data
    if linktype in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
        return dpkt.loopback.Loopback(buf).data
    return None


def _reader(fh: BinaryIO, path: Path) -> Any:
    head = fh.read(4)
    fh.seek(0)
    try:
        if head == PCAPNG_MAGIC:
            return dpkt.pcapng.Reader(fh)
        if head in PCAP_MAGICS:
            return dpkt.pcap.Reader(fh)
    except _DECODE_ERRORS as exc:
        raise CaptureError(f"{path}: not a readable capture ({exc}); expected pcap or pcapng") from None
    raise CaptureError(f"{path}: not a pcap or pcapng file (magic {head.hex()})")


# Packet times an event can carry: from the epoch up to the end of year 9999 (RFC 3339's range).
MAX_TIMESTAMP = 253_402_300_800.0


def _packets(reader: Any, stats: CaptureStats) -> Iterator[tuple[float, bytes]]:
    it = iter(reader)
    while True:
        try:
            ts, buf = next(it)
        except StopIteration:
            return
        except _DECODE_ERRORS:
            stats.truncated = True  # a cut or corrupt file: keep what came before
            return
        yield float(ts), buf


def read_capture(path: Path, host: str, stats: CaptureStats | None = None,
                 progress: Callable[[CaptureStats], None] | None = None) -> list[dict[str, Any]]:
    """The capture's flows and DNS answers as contract events of ``host``, in time order.

    ``progress`` is called with the running statistics every 65,536 packets (big captures).
    """
    stats = stats if stats is not None else CaptureStats()
    with path.open("rb") as fh:
        reader = _reader(fh, path)
        try:
            linktype = reader.datalink()
        except _DECODE_ERRORS as exc:
            raise CaptureError(f"{path}: unreadable capture header ({exc})") from None
        return _events(_packets(reader, stats), linktype, host, path.name, stats, progress)


def _events(packets: Iterator[tuple[float, bytes]], linktype: int, host: str, source: str,
            stats: CaptureStats, progress: Callable[[CaptureStats], None] | None = None) -> list[dict[str, Any]]:
    flows: dict[tuple[Any, ...], _Flow] = {}
    done: list[_Flow] = []
    names: dict[str, str] = {}
    events: list[dict[str, Any]] = []
    for n, (ts, buf) in enumerate(packets):
        stats.packets += 1
        if progress is not None and not stats.packets & 0xFFFF:
            progress(stats)
        if not 0.0 <= ts < MAX_TIMESTAMP:  # a corrupt record header: no event can carry this time
            stats.skipped += 1
            stats.skip_reasons["timestamp out of range"] += 1
            continue
        try:
            ip = _network_layer(linktype, buf)
            if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                stats.skipped += 1
                stats.skip_reasons["not IP"] += 1
                continue
            seg = ip.data
            src, dst = _ip_text(ip.src), _ip_text(ip.dst)
            if isinstance(seg, dpkt.tcp.TCP):
                _tcp(flows, done, names, ts, src, dst, seg)
            elif isinstance(seg, dpkt.udp.UDP) and 53 in (seg.sport, seg.dport):
                answer = _dns_answer(seg.data)
                if answer is not None:
                    question, ips = answer
                    for addr in ips:
                        names[addr] = question
                    stats.dns_answers += 1
                    digest = hashlib.sha256(f"{source}|{n}|{ts}|{question}".encode()).hexdigest()[:24]
                    events.append(dns_event(host, ts, question=question, resolved_ips=ips,
                                            event_id=f"pcap-dns-{digest}"))
        except _DECODE_ERRORS as exc:
            stats.skipped += 1
            stats.skip_reasons[type(exc).__name__] += 1
    done.extend(flows.values())
    clients = Counter(f.client[0] for f in done)
    local = clients.most_common(1)[0][0] if clients else None
    for f in done:
        stats.flows += 1
        payload = f.payload()
        digest = hashlib.sha256(f"{source}|{f.client}|{f.server}|{f.first_ts}".encode()).hexdigest()[:24]
        events.append(network_event(
            host, f.first_ts, source_ip=f.client[0], source_port=f.client[1], destination_ip=f.server[0],
            destination_port=f.server[1], direction="egress" if f.client[0] == local else "ingress",
            destination_domain=f.domain, server_name=client_hello_sni(payload) if payload else None,
            payload_b64=base64.b64encode(payload).decode("ascii") if payload else None,
            event_id=f"pcap-flow-{digest}"))
    events.sort(key=lambda e: e["@timestamp"])
    return events


def _tcp(flows: dict[tuple[Any, ...], _Flow], done: list[_Flow], names: dict[str, str], ts: float,
         src: str, dst: str, seg: Any) -> None:
    a, b = (src, seg.sport), (dst, seg.dport)
    key = (a, b) if a <= b else (b, a)
    syn = bool(seg.flags & dpkt.tcp.TH_SYN)
    ack = bool(seg.flags & dpkt.tcp.TH_ACK)
    flow = flows.get(key)
    if flow is not None and syn and not ack and flow.client == a and flow.isn is not None and flow.isn != seg.seq:
        done.append(flow)  # the same ports reused for a new connection
        flow = None
    if flow is None:
        if syn and not ack:
            client, server = a, b
        elif syn and ack:
            client, server = b, a
        else:  # joined mid-connection: the opener is usually the side with the ephemeral (higher) port
            client, server = (a, b) if a[1] > b[1] else (b, a)
        flow = flows[key] = _Flow(client, server, ts, names.get(server[0]))
    if syn and not ack and a == flow.client:
        flow.isn = seg.seq
    if a == flow.client and seg.data:
        flow.add(seg.seq, bytes(seg.data))


def _dns_answer(data: bytes) -> tuple[str, list[str]] | None:
    msg = dpkt.dns.DNS(data)
    if not msg.qr or not msg.qd:
        return None
    question = msg.qd[0].name
    if not question:
        return None
    ips = [_ip_text(rr.rdata) for rr in msg.an if rr.type in (dpkt.dns.DNS_A, dpkt.dns.DNS_AAAA)
           and len(rr.rdata) in (4, 16)]
    return question, ips
