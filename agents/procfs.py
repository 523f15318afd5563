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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def command_line(self) -> str | None:
        return " ".join(self.args) if self.args else None


class ProcFS:
    """Readers bound to one /proc mount (``/proc`` unless a test says otherwise)."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = str(root)
        self._users: dict[int, str | None] = {}
        self._btime: float | None = None

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

    def container_id(self, pid: int) -> str | None:
        try:
            with open(f"{self.root}/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            return None
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
        return ProcessInfo(pid=pid, name=comm, ppid=ppid, start_time=start, uid=self.uid(pid),
                           executable=self._readlink(f"{base}/exe"), args=self.cmdline(pid),
                           working_directory=self._readlink(f"{base}/cwd"), container_id=self.container_id(pid))

    # ------------------------------------------------------------------ sockets

    def socket_owners(self, wanted: set[int] | None = None) -> dict[int, int]:
        """Socket inode -> pid, from the /proc/PID/fd links.

        This is the expensive read (one readlink per open file on the host), so callers pass the
        inodes they need and the walk stops as soon as all are found.
        """
        owners: dict[int, int] = {}
        remaining = set(wanted) if wanted is not None else None
        for pid in self.pids():
            fd_dir = f"{self.root}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if remaining is None:
                        owners.setdefault(inode, pid)
                    elif inode in remaining:
                        owners[inode] = pid
                        remaining.discard(inode)
                        if not remaining:
                            return owners
        return owners


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
