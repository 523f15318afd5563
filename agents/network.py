"""Network collector: each new outbound TCP/UDP flow with its owning process, plus DNS answers.

Flows come from the kernel's socket tables (/proc/net/{tcp,tcp6,udp,udp6}, the agent's network
namespace: run it with the host's network).  A TCP socket is outbound when it is established or
connecting and its local port is not a listening port; a UDP socket when it is connected.  The
owning process comes from the socket inode, found among the /proc/PID/fd links; that walk is the
expensive part, so it runs only for inodes not seen before and stops when all are found.

With packet capture (privileged, :mod:`agents.capture`) flows also get ``destination.domain`` (from
DNS answers the host received), the first bytes they sent and the TLS SNI; ``gpusentry.dns``
events are emitted for the answers.  Without it those fields are absent, which is said once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agents.capture import PacketCapture
from agents.metrics import AgentMetrics
from agents.procfs import TCP_LISTEN, ProcFS, SockDiag, SocketEntry, decode_diag, key_inode, read_sockets
from gpusentry.contract import dns_event, network_event

log = logging.getLogger(__name__)

TCP_ESTABLISHED, TCP_SYN_SENT = 1, 2
_UNSPECIFIED = ("0.0.0.0", "::")


class NetworkCollector:
    name = "network"

    def __init__(self, host_name: str, *, procfs: ProcFS | None = None, metrics: AgentMetrics | None = None,
                 capture: str = "auto", payload_bytes: int = 512, payload_wait_s: float = 1.0,
                 net_root: str | None = None) -> None:
        self.host_name = host_name
        self.procfs = procfs or ProcFS()
        self.metrics = metrics or AgentMetrics()
        self.capture_mode = capture
        self.payload_bytes = payload_bytes
        self.payload_wait_s = payload_wait_s
        self.net_root = net_root
        self.capture: PacketCapture | None = None
        self._seen: dict[Any, int] = {}  # key of every socket in the last table -> its inode
        self._owners: dict[int, int] = {}  # socket inode -> pid
        self._waiting: dict[tuple[Any, ...], tuple[SocketEntry, float]] = {}
        self._own_pid = os.getpid()
        self._parse_errors_reported = 0
        self.diag: SockDiag | None = None

    def start(self) -> bool:
        self.diag = SockDiag() if self.net_root is None else None
        if self.diag is None or not self.diag.available:
            self.diag = None
            log.info("network collector: reading /proc/net (sock_diag netlink unavailable)")
        if self.capture_mode != "off":
            try:
                self.capture = PacketCapture(self.payload_bytes)
                log.info("network collector: packet capture on (DNS answers, first bytes, TLS SNI)")
            except (PermissionError, OSError) as exc:
                if self.capture_mode == "on":
                    raise
                log.warning("network collector: packet capture off (%s; needs CAP_NET_RAW): flows are reported "
                            "without destination.domain, payload and TLS SNI, and no DNS events", exc)
        return True

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.diag is not None:
            self.diag.close()
            self.diag = None

    def _table(self) -> dict[Any, Any]:
        """Key -> raw row of every TCP socket that is established, connecting or listening, and every
        connected UDP socket."""
        if self.diag is not None:
            return self.diag.table()
        return {(e.transport, e.local_ip, e.local_port, e.remote_ip, e.remote_port, e.inode): e
                for e in read_sockets(self.procfs.root, self.net_root)
                if (e.transport == "tcp" and e.state in (TCP_ESTABLISHED, TCP_SYN_SENT, TCP_LISTEN))
                or (e.transport == "udp" and e.state == TCP_ESTABLISHED)}

    @staticmethod
    def _decode(key: Any, row: Any) -> SocketEntry:
        if isinstance(row, SocketEntry):
            return row
        return decode_diag("tcp" if key[:1] == b"t" else "udp", row)

    @staticmethod
    def _inode(key: Any) -> int:
        return int(key[-1]) if isinstance(key, tuple) else key_inode(key)

    @staticmethod
    def _listening(table: dict[Any, Any]) -> set[int]:
        ports = set()
        for key, row in table.items():
            state = row.state if isinstance(row, SocketEntry) else row[1]
            if state == TCP_LISTEN:
                ports.add(NetworkCollector._decode(key, row).local_port)
        return ports

    def _live_inodes(self) -> set[int]:
        return {self._inode(k) for k in self._table()}

    def _is_outbound(self, e: SocketEntry, listening: set[int]) -> bool:
        if e.remote_port == 0 or e.remote_ip in _UNSPECIFIED:
            return False
        if e.transport == "tcp":
            return e.state in (TCP_ESTABLISHED, TCP_SYN_SENT) and e.local_port not in listening
        return e.state == TCP_ESTABLISHED  # a connected UDP socket

    def collect(self, now: float) -> list[dict[str, Any]]:
        # A steady cycle is one dump and one set difference; only sockets not seen before are decoded.
        table = self._table()
        keys = table.keys()
        fresh = keys - self._seen.keys()
        new: list[SocketEntry] = []
        if fresh or len(keys) != len(self._seen):
            for k in self._seen.keys() - keys:
                del self._seen[k]
            for k in fresh:
                self._seen[k] = self._inode(k)
        if fresh:
            listening = self._listening(table)
            new = [e for e in (self._decode(k, table[k]) for k in fresh) if self._is_outbound(e, listening)]
        unknown = {e.inode for e in new if e.inode and e.inode not in self._owners}
        if unknown:
            live = set(self._seen.values())
            self._owners.update(self.procfs.socket_owners(unknown, live, recheck=self._live_inodes))
        if len(self._owners) > 2 * len(keys) + 256:  # forget the owners of closed sockets now and then
            keep = set(self._seen.values()) | {e.inode for e, _ in self._waiting.values()}
            self._owners = {i: p for i, p in self._owners.items() if i in keep}
        events: list[dict[str, Any]] = []
        cap = self.capture
        if cap is not None:
            if cap.parse_errors > self._parse_errors_reported:
                self.metrics.collector_errors.labels("capture", "unparsable_packet").inc(
                    cap.parse_errors - self._parse_errors_reported)
                self._parse_errors_reported = cap.parse_errors
            if cap.failed:
                self.metrics.collector_errors.labels("capture", "reader_failed").inc()
                cap.close()
                self.capture = cap = None
        for e in sorted(new, key=lambda e: (e.transport, e.local_port, e.remote_ip, e.remote_port)):
            if cap is not None and e.transport == "tcp" and self.payload_bytes and cap.saw_start(self._key(e)):
                self._waiting[self._key(e)] = (e, now)
                continue
            event = self._event(e, now)
            if event is not None:
                events.append(event)
        for key, (e, since) in list(self._waiting.items()):
            first = cap.first_bytes(key) if cap is not None else None
            if first is not None or now - since >= self.payload_wait_s or cap is None:
                del self._waiting[key]
                event = self._event(e, since, first)
                if event is not None:
                    events.append(event)
        if cap is not None:
            events.extend(self._dns_events(cap))
        self.metrics.events.labels(self.name).inc(len(events))
        return events

    @staticmethod
    def _key(e: SocketEntry) -> tuple[str, int, str, int]:
        return (e.local_ip, e.local_port, e.remote_ip, e.remote_port)

    def _event(self, e: SocketEntry, ts: float, first: Any = None) -> dict[str, Any] | None:
        pid = self._owners.get(e.inode)
        if pid == self._own_pid:
            return None  # the agent's own Kafka and metrics traffic is not news
        info = self.procfs.process(pid) if pid is not None else None
        cap = self.capture
        return network_event(
            self.host_name, ts, source_ip=e.local_ip, source_port=e.local_port, destination_ip=e.remote_ip,
            destination_port=e.remote_port, transport=e.transport, pid=pid,
            process_name=info.name if info else None, executable=info.executable if info else None,
            destination_domain=cap.name_of(e.remote_ip) if cap is not None else None,
            server_name=first.server_name if first is not None else None,
            payload_b64=first.payload_b64 if first is not None else None,
            state=("syn_sent" if e.state == TCP_SYN_SENT else "established") if e.transport == "tcp" else None)

    def _dns_events(self, cap: PacketCapture) -> list[dict[str, Any]]:
        answers = cap.drain_answers()
        if not answers:
            return []
        # The querying socket: a UDP socket bound to the port the answer went to (often closed already).
        if self.diag is not None:
            udp = [decode_diag("udp", row) for row in self.diag.table(0, udp_connected_only=False).values()]
        else:
            udp = [e for e in read_sockets(self.procfs.root, self.net_root) if e.transport == "udp"]
        udp_by_port = {e.local_port: e.inode for e in udp if e.transport == "udp"}
        out = []
        for a in answers:
            inode = udp_by_port.get(a.client_port)
            pid = None
            if inode:
                # Cached walk only: a DNS answer must not cost a read of every fd on the host.
                pid = self._owners.get(inode) or self.procfs.socket_owners({inode}, reread=False).get(inode)
            name = self.procfs.comm(pid) if pid is not None else None
            out.append(dns_event(self.host_name, a.timestamp, question=a.question, resolved_ips=a.addresses,
                                 pid=pid, process_name=name))
        return out

