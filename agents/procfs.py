"""Small, fast readers of /proc: process details, sockets and their owners.

The agent must cost next to nothing, so these read the few files they need directly rather than
through psutil (which reads more than we use).  Every reader takes ``root`` so tests and the
benchmark can point it at a synthetic tree; a process that exits mid-read gives ``None``, never an
exception.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pwd
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from agents.cgroups import CgroupOwner, owner_of

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Container runtimes put the 64-hex container id in the cgroup path: docker-<id>.scope,
# cri-containerd-<id>.scope, crio-<id>.scope, /docker/<id>, /kubepods/.../<id>, libpod-<id>.scope.
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")


@dataclass(slots=True)
class ProcessInfo:
    pid: int
    name: str
    ppid: int | None
    start_time: float | None  # epoch seconds
    uid: int | None
    executable: str | None
    args: list[str] | None
    working_directory: str | None
    container_id: str | None
    owner: CgroupOwner | None = None  # the pod, job or container the cgroup names

    @property
    def command_line(self) -> str | None:
        return " ".join(self.args) if self.args else None


class ProcFS:
    """Readers bound to one /proc mount (``/proc`` unless a test says otherwise)."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = str(root)
        self._users: dict[int, str | None] = {}
        self._btime: float | None = None
        self._fd_cache: dict[int, dict[str, int]] = {}  # pid -> fd -> socket inode (0: not a socket)
        self._socket_pids: set[int] = set()

    # ------------------------------------------------------------------ processes

    def pids(self) -> list[int]:
        try:
            return [int(n) for n in os.listdir(self.root) if n.isdigit()]
        except OSError:
            return []

    def boot_time(self) -> float:
        if self._btime is None:
            self._btime = 0.0
            try:
                with open(f"{self.root}/stat", "rb") as fh:
                    for line in fh:
                        if line.startswith(b"btime "):
                            self._btime = float(line.split()[1])
                            break
            except OSError:
                pass
        return self._btime

    def stat(self, pid: int) -> tuple[str, int, float] | None:
        """(comm, ppid, start time in epoch seconds) from /proc/PID/stat, or None when gone."""
        try:
            with open(f"{self.root}/{pid}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        # comm may hold spaces and parentheses: it runs from the first '(' to the last ')'.
        left, right = data.find(b"("), data.rfind(b")")
        if left < 0 or right < 0:
            return None
        comm = data[left + 1:right].decode("utf-8", "replace")
        rest = data[right + 2:].split()
        try:
            ppid = int(rest[1])
            start = self.boot_time() + int(rest[19]) / CLK_TCK
        except (IndexError, ValueError):
            return None
        return comm, ppid, start

    def comm(self, pid: int) -> str | None:
        try:
            with open(f"{self.root}/{pid}/comm", "rb") as fh:
                return fh.read().rstrip(b"\n").decode("utf-8", "replace")
        except OSError:
            return None

    def _readlink(self, path: str) -> str | None:
        try:
            return os.readlink(path)
        except OSError:
            return None

    def cmdline(self, pid: int) -> list[str] | None:
        try:
            with open(f"{self.root}/{pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return None
        if not raw:
            return None  # kernel threads and zombies have none
        return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]

    def cgroup(self, pid: int) -> str:
        try:
            with open(f"{self.root}/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def container_id(self, pid: int, text: str | None = None) -> str | None:
        text = self.cgroup(pid) if text is None else text
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            m = _CONTAINER_ID.search(path)
            if m:
                return m.group(1)
        return None

    def uid(self, pid: int) -> int | None:
        try:
            return os.stat(f"{self.root}/{pid}").st_uid
        except OSError:
            return None

    def user_name(self, uid: int | None) -> str | None:
        if uid is None:
            return None
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = str(uid)  # no passwd entry (containers): the number is still useful
        return self._users[uid]

    def process(self, pid: int) -> ProcessInfo | None:
        """Everything the contract wants about one process, or None when it is already gone."""
        st = self.stat(pid)
        if st is None:
            return None
        comm, ppid, start = st
        base = f"{self.root}/{pid}"
        cgroup = self.cgroup(pid)  # read once: the container id and the owner both come from it
        return ProcessInfo(pid=pid, name=comm, ppid=ppid, start_time=start, uid=self.uid(pid),
                           executable=self._readlink(f"{base}/exe"), args=self.cmdline(pid),
                           working_directory=self._readlink(f"{base}/cwd"),
                           container_id=self.container_id(pid, cgroup), owner=owner_of(cgroup) if cgroup else None)

    # ------------------------------------------------------------------ sockets

    def socket_owners(self, wanted: set[int], live: set[int] | None = None, *, full: bool = False,
                      recheck: Callable[[], set[int]] | None = None, reread: bool = True) -> dict[int, int]:
        """Socket inode -> pid for the ``wanted`` inodes, from the /proc/PID/fd links.

        This is the expensive read (a readlink per open file), so it is made cheap three ways: each
        process's fd -> inode map is cached and only fds not seen before, or whose socket is no longer
        ``live``, are read again; processes that owned sockets before, then the newest processes, are
        searched first; the walk stops as soon as every wanted inode is found.  An inode the cached
        walk misses (its fd number held a file when last read) gets one walk that reads every fd again;
        ``full=True`` starts with that walk, ``reread=False`` skips it.  ``recheck`` returns the inodes still open: it is asked
        before each walk over processes not known to own sockets, so that a flow that already closed
        does not cost a walk over every process.
        """
        owners: dict[int, int] = {}
        remaining = set(wanted)
        if not remaining:
            return owners
        pids = self.pids()
        gone = self._fd_cache.keys() - set(pids)
        for pid in gone:
            del self._fd_cache[pid]
            self._socket_pids.discard(pid)
        pids.sort(key=lambda p: (p not in self._socket_pids, -p))
        for reread_all in ((True,) if full else (False, True) if reread else (False,)):
            checked = recheck is None
            for pid in pids:
                if not checked and pid not in self._socket_pids:
                    checked = True
                    remaining &= recheck()  # type: ignore[misc]  # checked is False only when recheck is set
                if not remaining:
                    return owners
                self._scan_fds(pid, remaining, owners, live, reread_all)
            if not remaining:
                break
        return owners

    def _scan_fds(self, pid: int, remaining: set[int], owners: dict[int, int], live: set[int] | None,
                  full: bool) -> None:
        fd_dir = f"{self.root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return
        cache = self._fd_cache.setdefault(pid, {})
        has_socket = False
        for fd in fds:
            # Cache: inode > 0, a socket of the watched tables when read (read again once it is no longer
            # live: closed, the fd number maybe reused); inode < 0, any other socket (unix, or opened
            # after the table was taken), kept as is; 0, not a socket.
            cached = cache.get(fd)
            if cached is None or full or (cached > 0 and live is not None and cached not in live):
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                inode = int(target[8:-1]) if target.startswith("socket:[") else 0
                cache[fd] = inode if (live is None or inode in live) else -inode
            else:
                inode = abs(cached)
            if inode:
                has_socket = True
                if inode in remaining:
                    owners[inode] = pid
                    remaining.discard(inode)
        if has_socket:
            self._socket_pids.add(pid)


# ---------------------------------------------------------------------------- /proc/net

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
TCP_LISTEN = 10
UDP_UNCONNECTED = 7  # an unconnected UDP socket shows state 07 (TCP_CLOSE) and remote 0:0


@dataclass(frozen=True, slots=True)
class SocketEntry:
    transport: str  # tcp | udp
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    state: int
    uid: int
    inode: int


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # IPv6: four 32-bit words, each in host (little-endian) order.
    words = struct.unpack("<4I", raw)
    addr = ipaddress.IPv6Address(struct.pack(">4I", *words))
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def parse_net_table(path: str, transport: str) -> Iterator[SocketEntry]:
    """Entries of /proc/net/{tcp,tcp6,udp,udp6}; a missing table (no IPv6) yields nothing."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        parts = line.split()
        if len(parts) < 10:
            continue
        local, remote = parts[1].decode(), parts[2].decode()
        lip, lport = local.split(":")
        rip, rport = remote.split(":")
        yield SocketEntry(transport, _hex_ip(lip), int(lport, 16), _hex_ip(rip), int(rport, 16),
                          int(parts[3], 16), int(parts[7]), int(parts[9]))


def read_sockets(root: str | Path = "/proc", net_root: str | Path | None = None) -> Iterable[SocketEntry]:
    """Every TCP and UDP socket of the agent's network namespace (the host's, with hostNetwork)."""
    base = str(net_root) if net_root is not None else f"{root}/net"
    for name, transport in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        yield from parse_net_table(f"{base}/{name}", transport)


# ---------------------------------------------------------------------------- executable hashes


class ExecutableHasher:
    """sha256 of executables, cached by (path, size, mtime) so each binary is read once."""

    def __init__(self, max_bytes: int, max_entries: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._cache: dict[tuple[str, int, int], str] = {}

    def sha256(self, pid: int, executable: str | None, root: str = "/proc") -> str | None:
        if not executable:
            return None
        # Read through /proc/PID/exe: it still works when the file was deleted or lives in a container.
        path = f"{root}/{pid}/exe"
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (executable, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if st.st_size > self.max_bytes:
            return None
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            return None
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = value = digest.hexdigest()
        return value


# ---------------------------------------------------------------------------- sock_diag

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLH = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBI48s")
_DIAG_MSG_SIZE = 72
# Bitmasks of TCP states (1 << state): what the kernel should return.
STATES_OUTBOUND = (1 << 1) | (1 << 2) | (1 << TCP_LISTEN)  # ESTABLISHED, SYN_SENT, LISTEN
STATES_ALL = 0xFFF


def decode_diag(transport: str, msg: bytes) -> SocketEntry:
    """A sock_diag ``inet_diag_msg`` as a :class:`SocketEntry`."""
    _family, state, sport, dport = _DIAG_HEAD.unpack_from(msg)
    if msg[0] == socket.AF_INET:
        src, dst = socket.inet_ntop(socket.AF_INET, msg[8:12]), socket.inet_ntop(socket.AF_INET, msg[24:28])
    else:
        src, dst = _v6(msg[8:24]), _v6(msg[24:40])
    uid, inode = _UID_INODE.unpack_from(msg, 64)
    return SocketEntry(transport, src, sport, dst, dport, state, uid, inode)


_DIAG_HEAD = struct.Struct("!BBxxHH")  # family, state, (timer, retrans), local and remote port
_UID_INODE = struct.Struct("=II")


def _v6(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


class SockDiag:
    """Socket tables through the kernel's sock_diag netlink interface (``ss`` uses it).

    Much cheaper than formatting and parsing /proc/net/tcp: the kernel filters by state and answers
    in binary, and :meth:`table` only slices each answer into a key (ports, addresses, uid, inode),
    so a steady cycle is a set difference; only new sockets are decoded.  No privileges needed.
    :attr:`available` is False on kernels without it, and the caller falls back to /proc/net.
    """

    def __init__(self) -> None:
        self.sock: socket.socket | None
        self._seq = 0
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            self.sock.bind((0, 0))
            self.table(STATES_OUTBOUND)
        except OSError:
            self.sock = None

    @property
    def available(self) -> bool:
        return self.sock is not None

    def _dump(self, family: int, protocol: int, states: int, prefix: bytes, out: dict[bytes, bytes]) -> None:
        assert self.sock is not None
        self._seq += 1
        req = _DIAG_REQ.pack(family, protocol, 0, 0, states, b"\0" * 48)
        self.sock.send(_NLH.pack(_NLH.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                                 self._seq, 0) + req)
        unpack = _NLH_HEAD.unpack_from
        while True:
            data = self.sock.recv(1 << 17)
            offset, size = 0, len(data)
            while offset + 16 <= size:
                length, msg_type = unpack(data, offset)
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    errno_ = -struct.unpack_from("=i", data, offset + 16)[0]
                    raise OSError(errno_, f"sock_diag: {os.strerror(errno_)}")
                body = data[offset + 16:offset + 16 + _DIAG_MSG_SIZE]
                # Ports and addresses (4:40), uid and inode (64:72): stable for the socket's life.
                out[prefix + body[4:40] + body[64:72]] = body
                offset += (length + 3) & ~3

    def table(self, tcp_states: int = STATES_OUTBOUND, udp_connected_only: bool = True) -> dict[bytes, bytes]:
        """Key -> raw answer for TCP sockets in ``tcp_states`` and (connected) UDP sockets.

        Keys start with ``t`` or ``u`` (the transport); :func:`decode_diag` turns an answer into a
        :class:`SocketEntry`.
        """
        out: dict[bytes, bytes] = {}
        udp_states = (1 << 1) if udp_connected_only else STATES_ALL
        for family in (socket.AF_INET, socket.AF_INET6):
            if tcp_states:
                self._dump(family, socket.IPPROTO_TCP, tcp_states, b"t", out)
            self._dump(family, socket.IPPROTO_UDP, udp_states, b"u", out)
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_NLH_HEAD = struct.Struct("=IH")


def key_inode(key: bytes) -> int:
    return int.from_bytes(key[-4:], sys.byteorder)


def name_this_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (``top -H``, /proc/PID/task/TID/comm); best effort."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        return


class ContainerNames:
    """Container id -> (name, image) from Docker's state files, cached (a container's name and image do not
    change).  Other runtimes keep no such file on the host: their processes carry the id alone."""

    def __init__(self, docker_root: str | None, max_entries: int = 4096) -> None:
        self.root = docker_root
        self.max_entries = max_entries
        self._cache: dict[str, tuple[str | None, str | None]] = {}

    def lookup(self, container_id: str | None) -> tuple[str | None, str | None]:
        if not container_id or not self.root:
            return None, None
        hit = self._cache.get(container_id)
        if hit is not None:
            return hit
        found: tuple[str | None, str | None] = (None, None)
        try:
            with open(f"{self.root}/containers/{container_id}/config.v2.json", "rb") as fh:
                doc = orjson.loads(fh.read(1 << 20))
            name, image = doc.get("Name"), (doc.get("Config") or {}).get("Image")
            found = (name.lstrip("/") if isinstance(name, str) and name else None,
                     image if isinstance(image, str) and image else None)
        except (OSError, ValueError, AttributeError):
            found = (None, None)  # not a Docker container, or not readable: the id alone is reported
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[container_id] = found
        return found

