"""Privileged packet capture: DNS answers and the first bytes of new outbound TCP flows.

An AF_PACKET socket (cooked, ``SOCK_DGRAM``: packets start at the IP header on every link type)
with a classic-BPF filter in the kernel, so the agent only ever sees

* inbound UDP from port 53 (DNS answers), IPv4 and IPv6;
* outbound TCP SYNs (to know a flow started while we watched, so its first payload really is the
  first), and outbound TCP segments that carry payload and are at most 1600 bytes long (bulk
  transfers use large offloaded segments and are dropped in the kernel).

Nothing is ever resolved or sent: names come from answers the host asked for itself (resolving a
pool domain from the agent would make the agent look like a miner).  Parsing is dpkt's.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import dpkt

from agents.procfs import name_this_thread

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SNAPLEN = 2048
MAX_SEGMENT = 1600

# Classic BPF opcodes (linux/filter.h).
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_H_IND, LD_B_IND = 0x48, 0x50
LDX_B_MSH, LD_MEM, ST, TAX = 0xB1, 0x60, 0x02, 0x07
ALU_AND_K, ALU_RSH_K, ALU_SUB_X = 0x54, 0x74, 0x1C
JEQ_K, JGT_K, JSET_K = 0x15, 0x25, 0x45
RET_K = 0x06


def _assemble(program: list[tuple[Any, ...]]) -> list[tuple[int, int, int, int]]:
    """Resolve ``("label", name)`` markers and symbolic jump targets into relative offsets."""
    labels: dict[str, int] = {}
    code: list[tuple[Any, ...]] = []
    for item in program:
        if item[0] == "label":
            labels[item[1]] = len(code)
        else:
            code.append(item)
    out = []
    for pc, (op, jt, jf, k) in enumerate(code):
        jt = labels[jt] - pc - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - pc - 1 if isinstance(jf, str) else jf
        out.append((op, jt, jf, k & 0xFFFFFFFF))
    return out


def _filter_program(first_bytes: bool = True) -> list[tuple[int, int, int, int]]:
    """The kernel-side filter; ``first_bytes=False`` passes DNS answers only (no TCP at all)."""
    tcp4, tcp6 = ("v4tcp", "v6tcp") if first_bytes else ("drop", "drop")

    def payload(ihl_in_x: bool, tot_off: int, tcp: int) -> list[tuple[Any, ...]]:
        """A = TCP payload length; X holds the IP header length (IPv4) or is unused (IPv6)."""
        if ihl_in_x:  # IPv4: total length - IP header - TCP header
            return [(LD_B_IND, 0, 0, 12), (ALU_AND_K, 0, 0, 0xF0), (ALU_RSH_K, 0, 0, 2), (ST, 0, 0, 1),
                    (LD_H_ABS, 0, 0, tot_off), (ALU_SUB_X, 0, 0, 0), (ST, 0, 0, 0),
                    (LD_MEM, 0, 0, 1), (TAX, 0, 0, 0), (LD_MEM, 0, 0, 0), (ALU_SUB_X, 0, 0, 0)]
        # IPv6: payload length - TCP header
        return [(LD_B_ABS, 0, 0, tcp + 12), (ALU_AND_K, 0, 0, 0xF0), (ALU_RSH_K, 0, 0, 2), (TAX, 0, 0, 0),
                (LD_H_ABS, 0, 0, tot_off), (ALU_SUB_X, 0, 0, 0)]

    prog: list[tuple[Any, ...]] = [
        (LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PROTOCOL),
        (JEQ_K, "v4", 0, ETH_P_IP),
        (JEQ_K, "v6", "drop", ETH_P_IPV6),
        # ---- IPv4
        ("label", "v4"),
        (LD_H_ABS, 0, 0, 6), (JSET_K, "drop", 0, 0x1FFF),  # fragments: no L4 header to read
        (LDX_B_MSH, 0, 0, 0),
        (LD_B_ABS, 0, 0, 9),
        (JEQ_K, "v4udp", 0, 17),
        (JEQ_K, tcp4, "drop", 6),
        ("label", "v4udp"),
        (LD_H_IND, 0, 0, 0), (JEQ_K, "inbound", "drop", 53),
        ("label", "v4tcp"),
        (LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE), (JEQ_K, 0, "drop", PACKET_OUTGOING),
        (LD_H_ABS, 0, 0, 2), (JGT_K, "drop", 0, MAX_SEGMENT),
        (LD_B_IND, 0, 0, 13), (JSET_K, 0, "v4data", 0x02),  # SYN
        (JSET_K, "drop", "keep", 0x10),  # SYN+ACK is the server side
        ("label", "v4data"),
        *payload(True, 2, 0), (JGT_K, "keep", "drop", 0),
        # ---- IPv6 (no extension headers)
        ("label", "v6"),
        (LD_B_ABS, 0, 0, 6),
        (JEQ_K, "v6udp", 0, 17),
        (JEQ_K, tcp6, "drop", 6),
        ("label", "v6udp"),
        (LD_H_ABS, 0, 0, 40), (JEQ_K, "inbound", "drop", 53),
        ("label", "v6tcp"),
        (LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE), (JEQ_K, 0, "drop", PACKET_OUTGOING),
        (LD_H_ABS, 0, 0, 4), (JGT_K, "drop", 0, MAX_SEGMENT - 40),
        (LD_B_ABS, 0, 0, 53), (JSET_K, 0, "v6data", 0x02),
        (JSET_K, "drop", "keep", 0x10),
        ("label", "v6data"),
        *payload(False, 4, 40), (JGT_K, "keep", "drop", 0),
        # ---- verdicts
        ("label", "inbound"),
        (LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE), (JEQ_K, "drop", "keep", PACKET_OUTGOING),
        ("label", "keep"), (RET_K, 0, 0, SNAPLEN),
        ("label", "drop"), (RET_K, 0, 0, 0),
    ]
    return _assemble(prog)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


def _attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    insns = (_SockFilter * len(program))(*[_SockFilter(*i) for i in program])
    fprog = struct.pack("HL", len(program), ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


FlowKey = tuple[str, int, str, int]  # local ip, local port, remote ip, remote port


@dataclass(slots=True)
class FirstBytes:
    payload_b64: str
    server_name: str | None


@dataclass(slots=True)
class DnsAnswer:
    timestamp: float
    question: str
    addresses: list[str]
    client_ip: str
    client_port: int


def tls_server_name(data: bytes) -> str | None:
    """SNI of a TLS ClientHello at the start of ``data``; None for anything else."""
    if len(data) < 6 or data[0] != 0x16 or data[5] != 0x01:  # handshake record holding a ClientHello
        return None
    try:
        record = dpkt.ssl.TLSRecord(data)
        hello = dpkt.ssl.TLSHandshake(record.data).data
    except (dpkt.UnpackError, dpkt.NeedData, ValueError, struct.error):
        # A ClientHello split over two segments is cut short here; take the name if it fits in the first.
        return _sni_from_partial(data)
    for ext_type, ext_data in getattr(hello, "extensions", ()):
        if ext_type == 0 and len(ext_data) > 5 and ext_data[2] == 0:
            length = struct.unpack_from("!H", ext_data, 3)[0]
            return ext_data[5:5 + length].decode("ascii", "replace") if length else None
    return None


def _sni_from_partial(data: bytes) -> str | None:
    try:
        pos = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        pos += 1 + data[pos]  # session id
        pos += 2 + struct.unpack_from("!H", data, pos)[0]  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = pos + 2 + struct.unpack_from("!H", data, pos)[0]
        pos += 2
        while pos + 4 <= min(end, len(data)):
            ext_type, ext_len = struct.unpack_from("!HH", data, pos)
            if ext_type == 0:
                name_len = struct.unpack_from("!H", data, pos + 7)[0]
                name = data[pos + 9:pos + 9 + name_len]
                return name.decode("ascii", "replace") if len(name) == name_len else None
            pos += 4 + ext_len
    except (IndexError, struct.error):
        return None
    return None


class PacketCapture:
    """The capture thread and what it learnt, read by the network collector each cycle."""

    def __init__(self, payload_bytes: int = 512, *, max_names: int = 65536, max_flows: int = 65536) -> None:
        self.payload_bytes = payload_bytes
        self.max_names = max_names
        self.max_flows = max_flows
        self._lock = threading.Lock()
        self._names: OrderedDict[str, str] = OrderedDict()  # ip -> name, most recent answers last
        self._syn: OrderedDict[FlowKey, float] = OrderedDict()
        self._first: OrderedDict[FlowKey, FirstBytes] = OrderedDict()
        self._answers: list[DnsAnswer] = []
        self.packets = 0
        self.parse_errors = 0
        self.failed = False
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            _attach(self.sock, _filter_program(first_bytes=payload_bytes > 0))
        except OSError:
            self.sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="gpusentry-capture", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    # ------------------------------------------------------------------ reader thread

    def _run(self) -> None:
        name_this_thread("gs-capture")
        try:
            self._read()
        except Exception:
            # Never a silent death: logged with its traceback; the network collector turns capture off.
            log.exception("packet capture reader failed; flows go on without domain, payload and SNI")
            self.failed = True

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            try:
                data, addr = self.sock.recvfrom(SNAPLEN)
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self.packets += 1
            try:
                self.handle(data, addr[1], addr[2], time.time())
            except (dpkt.UnpackError, dpkt.NeedData, ValueError, IndexError, struct.error):
                self.parse_errors += 1

    def handle(self, data: bytes, proto: int, pkttype: int, now: float) -> None:
        """One packet starting at its IP header (public for tests)."""
        ip: Any
        if proto == ETH_P_IP:
            ip = dpkt.ip.IP(data)
            src, dst = socket.inet_ntop(socket.AF_INET, ip.src), socket.inet_ntop(socket.AF_INET, ip.dst)
        elif proto == ETH_P_IPV6:
            ip = dpkt.ip6.IP6(data)
            src, dst = socket.inet_ntop(socket.AF_INET6, ip.src), socket.inet_ntop(socket.AF_INET6, ip.dst)
        else:
            return
        l4 = ip.data
        if isinstance(l4, dpkt.udp.UDP) and l4.sport == 53 and pkttype != PACKET_OUTGOING:
            self._dns(bytes(l4.data), dst, l4.dport, now)
        elif isinstance(l4, dpkt.tcp.TCP) and pkttype == PACKET_OUTGOING:
            key = (src, l4.sport, dst, l4.dport)
            syn, ack = l4.flags & dpkt.tcp.TH_SYN, l4.flags & dpkt.tcp.TH_ACK
            with self._lock:
                if syn and not ack:
                    self._syn[key] = now
                    self._syn.move_to_end(key)
                    if len(self._syn) > self.max_flows:
                        self._syn.popitem(last=False)
                elif l4.data and key in self._syn and key not in self._first and self.payload_bytes:
                    self._syn.pop(key, None)
                    first = bytes(l4.data)[:self.payload_bytes]
                    self._first[key] = FirstBytes(base64.b64encode(first).decode("ascii"),
                                                  tls_server_name(bytes(l4.data)))
                    if len(self._first) > self.max_flows:
                        self._first.popitem(last=False)

    def _dns(self, payload: bytes, client_ip: str, client_port: int, now: float) -> None:
        msg = dpkt.dns.DNS(payload)
        if msg.qr != dpkt.dns.DNS_R or not msg.qd:
            return
        question = msg.qd[0].name.rstrip(".").lower()
        addresses = []
        for rr in msg.an:
            if rr.type == dpkt.dns.DNS_A:
                addresses.append(socket.inet_ntop(socket.AF_INET, rr.rdata))
            elif rr.type == dpkt.dns.DNS_AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, rr.rdata))
        if not addresses:
            return
        with self._lock:
            for addr in addresses:
                self._names[addr] = question
                self._names.move_to_end(addr)
            while len(self._names) > self.max_names:
                self._names.popitem(last=False)
            self._answers.append(DnsAnswer(now, question, addresses, client_ip, client_port))
            if len(self._answers) > self.max_names:
                del self._answers[: len(self._answers) - self.max_names]

    # ------------------------------------------------------------------ read by the collector

    def name_of(self, ip: str) -> str | None:
        with self._lock:
            return self._names.get(ip)

    def first_bytes(self, key: FlowKey) -> FirstBytes | None:
        with self._lock:
            return self._first.pop(key, None)

    def saw_start(self, key: FlowKey) -> bool:
        """Whether we watched this flow start (and may still get its first bytes)."""
        with self._lock:
            return key in self._syn or key in self._first

    def drain_answers(self) -> list[DnsAnswer]:
        with self._lock:
            out, self._answers = self._answers, []
        return out
