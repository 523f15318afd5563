"""Process collector: ``gpusentry.process`` start and end events.

Two sources.  **netlink**: the kernel's process-events connector (``NETLINK_CONNECTOR``,
``CN_IDX_PROC``) tells us about every fork, exec and exit as it happens, so a miner that runs for a
few milliseconds is still seen; the details are read from /proc the moment the exec arrives.  It
needs CAP_NET_ADMIN and the host network namespace (the kernel only multicasts to the initial
namespace), which is why ``auto`` first proves the subscription works by watching a child of its
own start.  **poll**: /proc is listed every cycle; processes shorter than a cycle can be missed.

At start every running process is reported once as a ``start`` event carrying its real
``process.start`` time, so a miner that predates the agent is not invisible.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import subprocess
import threading
import time
from typing import Any

from agents.cgroups import PodNames, owner_fields
from agents.metrics import AgentMetrics
from agents.procfs import ContainerNames, ExecutableHasher, ProcessInfo, ProcFS, name_this_thread
from gpusentry.contract import process_event

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_PROC_EVENT_HDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EVENT_OFFSET = _NLMSGHDR.size + _CN_MSG.size + _PROC_EVENT_HDR.size
KERNEL_THREADD = 2
FORK_GRACE_S = 0.5


class NetlinkUnavailable(RuntimeError):
    pass


class ProcConnector:
    """A subscription to the kernel's process events, read on a daemon thread."""

    def __init__(self, on_fork: Any, on_exec: Any, on_exit: Any, on_overflow: Any) -> None:
        self._handlers = (on_fork, on_exec, on_exit, on_overflow)
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
            self.sock.bind((0, CN_IDX_PROC))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            self._send_op(PROC_CN_MCAST_LISTEN)
        except OSError as exc:
            raise NetlinkUnavailable(f"process-events connector refused ({exc}); needs CAP_NET_ADMIN in the "
                                     "host network namespace") from exc
        self._stop = threading.Event()
        self.failed = False
        self._thread = threading.Thread(target=self._run, name="gpusentry-proc-connector", daemon=True)
        self._thread.start()

    def _send_op(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)

    def _run(self) -> None:
        name_this_thread("gs-proc-events")
        try:
            self._read()
        except Exception:
            # Never a silent death: logged with its traceback, and the collector polls /proc from now on.
            log.exception("process-events reader failed; the process collector falls back to polling /proc")
            self.failed = True
            self._handlers[3]()

    def _read(self) -> None:
        on_fork, on_exec, on_exit, on_overflow = self._handlers
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.5)
                if not ready:
                    continue
                data = self.sock.recv(65536)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    on_overflow()  # the kernel dropped events: the collector resyncs from /proc
                    continue
                if self._stop.is_set():
                    return
                raise
            offset = 0
            while offset + _EVENT_OFFSET <= len(data):
                length = _NLMSGHDR.unpack_from(data, offset)[0]
                what = _PROC_EVENT_HDR.unpack_from(data, offset + _NLMSGHDR.size + _CN_MSG.size)[0]
                at = offset + _EVENT_OFFSET
                if what == PROC_EVENT_FORK:
                    _ppid, ptgid, child_pid, child_tgid = struct.unpack_from("=IIII", data, at)
                    if child_pid == child_tgid:  # a new process, not a new thread
                        on_fork(child_tgid, ptgid)
                elif what == PROC_EVENT_EXEC:
                    on_exec(struct.unpack_from("=II", data, at)[1])
                elif what == PROC_EVENT_EXIT:
                    pid, tgid = struct.unpack_from("=II", data, at)
                    if pid == tgid:
                        on_exit(tgid)
                if length <= 0:
                    break
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._send_op(PROC_CN_MCAST_IGNORE)
        self._thread.join(timeout=2)
        self.sock.close()


class ProcessCollector:
    name = "process"

    def __init__(self, host_name: str, *, procfs: ProcFS | None = None, metrics: AgentMetrics | None = None,
                 source: str = "auto", hasher: ExecutableHasher | None = None,
                 containers: ContainerNames | None = None, pods: PodNames | None = None,
                 ignore_tree: int | None = None) -> None:
        self.host_name = host_name
        # The processes under this pid are gpusentry's own (`up`'s broker, worker, forwarder): not reported.
        self._ignored: set[int] = {ignore_tree} if ignore_tree is not None else set()
        self.containers = containers or ContainerNames(None)
        self.pods = pods
        self.procfs = procfs or ProcFS()
        self.metrics = metrics or AgentMetrics()
        self.requested = source
        self.source = "poll"
        self.hasher = hasher
        self.known: dict[int, ProcessInfo] = {}
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._forked: dict[int, tuple[ProcessInfo | None, float]] = {}
        # pid -> its parent when it was forked: a detached process (setsid, nohup, double fork) is re-parented
        # to init before it is read, but its lineage (who started it) is the fork's parent.
        self._fork_parent: dict[int, int] = {}
        self._resync = False
        self._connector: ProcConnector | None = None
        self._self_test_pid: int | None = None
        self._self_test_seen = threading.Event()
        self._self_test_pending = True
        self._self_test_execs: set[int] = set()
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        if self.requested in ("auto", "netlink"):
            try:
                self._start_netlink()
                self.source = "netlink"
            except NetlinkUnavailable as exc:
                if self.requested == "netlink":
                    raise
                log.warning("process collector: %s; polling /proc every cycle instead (processes shorter than "
                            "a cycle can be missed)", exc)
        log.info("process collector: source %s", self.source)
        if self._ignored:
            log.info("process collector: not reporting the processes under pid %d (agent.ignore_process_tree: "
                     "gpusentry's own)", next(iter(self._ignored)))
        return True

    def _start_netlink(self) -> None:
        self._connector = ProcConnector(self._on_fork, self._on_exec, self._on_exit, self._on_overflow)
        # Prove that events reach us: in a container's own network namespace the subscription succeeds
        # but the kernel sends nothing.
        child = subprocess.Popen(["/bin/true"] if os.path.exists("/bin/true") else ["true"])
        self._self_test_pid = child.pid
        child.wait()
        deadline = time.monotonic() + 2.0
        while child.pid not in self._self_test_execs and time.monotonic() < deadline:
            self._self_test_seen.wait(0.05)
            self._self_test_seen.clear()
        self._self_test_pending = False
        if child.pid not in self._self_test_execs:
            self._connector.close()
            self._connector = None
            raise NetlinkUnavailable("process-events connector sends nothing here (not the host network "
                                     "namespace?)")
        with self._lock:  # the self-test's own events are not news
            self._pending = [e for e in self._pending if e["process"]["pid"] != self._self_test_pid]
            self._forked.pop(self._self_test_pid, None)

    def close(self) -> None:
        if self._connector is not None:
            self._connector.close()
            self._connector = None

    # ------------------------------------------------------------------ netlink callbacks (reader thread)

    def _on_fork(self, pid: int, ppid: int) -> None:
        info = self.procfs.process(pid)
        with self._lock:
            self._forked[pid] = (info, time.time())
            self._fork_parent[pid] = ppid
            if len(self._fork_parent) > 65536:  # exits the kernel dropped: keep the processes still known
                self._fork_parent = {p: pp for p, pp in self._fork_parent.items()
                                     if p in self.known or p in self._forked}

    def _on_exec(self, pid: int) -> None:
        if self._self_test_pending:
            self._self_test_execs.add(pid)
            self._self_test_seen.set()
        now = time.time()
        info = self.procfs.process(pid)  # read at once: a short-lived process is gone a moment later
        with self._lock:
            self._forked.pop(pid, None)
            if info is None:
                self.metrics.processes_vanished.inc()
                info = self._vanished(pid)
            elif self._is_kernel_thread(info):
                self._fork_parent.pop(pid, None)
                return
            old = self.known.get(pid)
            creator = self._fork_parent.get(pid) or (old.ppid if old is not None else None)
            if creator and info.ppid in (None, 1) and creator != 1:
                info.ppid = creator  # re-parented to init (detached): keep who started it
            if old is not None and old.start_time == info.start_time:
                # exec() replaces the program of a known process: report the old one ended.
                self._pending.append(self._event("end", old, now))
            self.known[pid] = info
            self._pending.append(self._event("start", info, now))

    def _on_exit(self, pid: int) -> None:
        now = time.time()
        with self._lock:
            forked = self._forked.pop(pid, None)
            self._fork_parent.pop(pid, None)
            info = self.known.pop(pid, None)
            if info is None and forked is not None:
                # Forked and exited without exec within one cycle: still a process that ran.
                info = forked[0] or self._vanished(pid)
                self._pending.append(self._event("start", info, forked[1]))
            if info is not None:
                self._pending.append(self._event("end", info, now))

    def _on_overflow(self) -> None:
        log.warning("process collector: the kernel dropped process events (burst); resyncing from /proc")
        self.metrics.collector_errors.labels(self.name, "netlink_overflow").inc()
        self._resync = True

    # ------------------------------------------------------------------ events

    @staticmethod
    def _is_kernel_thread(info: ProcessInfo) -> bool:
        return info.pid == KERNEL_THREADD or info.ppid == KERNEL_THREADD

    @staticmethod
    def _vanished(pid: int) -> ProcessInfo:
        return ProcessInfo(pid=pid, name="", ppid=None, start_time=None, uid=None, executable=None, args=None,
                           working_directory=None, container_id=None)

    def _event(self, action: str, info: ProcessInfo, now: float) -> dict[str, Any]:
        parent_name = self._name_of(info.ppid) if info.ppid else None
        sha = None
        if action == "start" and self.hasher is not None:
            sha = self.hasher.sha256(info.pid, info.executable, self.procfs.root)
        container_name, container_image = self.containers.lookup(info.container_id)
        return process_event(
            self.host_name, now, action=action, pid=info.pid, name=info.name, executable=info.executable,
            command_line=info.command_line, args=info.args, working_directory=info.working_directory,
            start=info.start_time, parent_pid=info.ppid, parent_name=parent_name,
            user_name=self.procfs.user_name(info.uid), container_id=info.container_id, sha256=sha,
            container_name=container_name, container_image=container_image,
            owner=owner_fields(info.owner, self.pods, now))

    def _name_of(self, pid: int) -> str | None:
        known = self.known.get(pid)
        return known.name if known is not None else self.procfs.comm(pid)

    def _poll(self, now: float) -> list[dict[str, Any]]:
        """Diff /proc against what we know: the whole story in poll mode, a resync in netlink mode."""
        events: list[dict[str, Any]] = []
        current = set(self.procfs.pids())
        for pid in sorted(current - self.known.keys()):
            info = self.procfs.process(pid)
            if info is None or self._is_kernel_thread(info):
                continue
            self.known[pid] = info
            events.append(self._event("start", info, now))
        for pid in sorted(self.known.keys() - current):
            events.append(self._event("end", self.known.pop(pid), now))
        return events

    def collect(self, now: float) -> list[dict[str, Any]]:
        if self._connector is not None and self._connector.failed:
            self.metrics.collector_errors.labels(self.name, "netlink_reader_failed").inc()
            self._connector.close()
            self._connector = None
            self.source = "poll"
        if self._connector is None or self._resync or not self._started:
            with self._lock:
                self._resync = False
                events = self._poll(now)
                self._started = True
                events = self._drain() + events
        else:
            with self._lock:
                events = self._drain()
                # Forked children that have not exec'd after a while (workers, daemons): report them like
                # poll would.  The grace keeps the usual fork-then-exec from showing up twice.
                for pid, (forked, seen) in list(self._forked.items()):
                    if time.time() - seen < FORK_GRACE_S:
                        continue
                    self._forked.pop(pid)
                    info = self.procfs.process(pid) or forked
                    if info is not None and not self._is_kernel_thread(info):
                        self.known[pid] = info
                        events.append(self._event("start", info, seen))
        if self._ignored:
            events = self._without_ignored(events)
        self.metrics.events.labels(self.name).inc(len(events))
        return events

    def _without_ignored(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop the events of the ignored tree: a process whose known ancestry reaches a member of it is one (and is
        remembered as one, so its own children are found at once)."""
        kept = []
        with self._lock:
            for event in events:
                proc = event["process"]
                pid = proc["pid"]
                if self._in_ignored_tree(pid, (proc.get("parent") or {}).get("pid")):
                    if event["event"]["type"] == ["end"]:
                        self._ignored.discard(pid)
                    else:
                        self._ignored.add(pid)
                    continue
                kept.append(event)
        return kept

    def _in_ignored_tree(self, pid: int, ppid: int | None) -> bool:
        for _ in range(64):  # deeper than any real process tree; a pid cycle (reuse) ends here too
            if pid in self._ignored or ppid in self._ignored:
                return True
            parent = self.known.get(ppid) if ppid is not None else None
            if ppid is None or parent is None:
                return False
            pid, ppid = ppid, parent.ppid
        return False

    def _drain(self) -> list[dict[str, Any]]:
        out, self._pending = self._pending, []
        return out
