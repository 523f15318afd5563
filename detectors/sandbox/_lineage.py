"""Which processes are an agent's tool calls: sandbox shapes and a per-host process lineage.

A **sandbox** is a container or process subtree whose processes are an agent's tool calls. Its *tool
server* is the process that executes tool calls (a Jupyter kernel, OpenHands' action execution server,
E2B's envd, rocklet, a Ray worker, or anything matching a site's settings); each process it starts is a
*tool call* (the command line an analyst finds in the agent's trajectory), and everything a tool call
starts stays in that sandbox.

Membership is decided once, when a process starts, from the process table this module keeps per host
(fed by process events) and from the container: a child inherits its parent's sandbox, and a process
whose parent is already gone (a double fork, ``setsid``, ``nohup`` re-parented to init) still belongs
to the sandbox of its container. Later re-parenting changes nothing, because nothing is re-read.

Detectors share one :class:`Lineage` per host (``Detector.new_host_state``); it advances once per
process event however many detectors feed it.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from detectors.process._cmdline import SHELLS, argv, basename
from gpusentry.contract import as_dict
from gpusentry.knowledge import load_entries, resolve
from gpusentry.settings.sandboxes import SandboxSettings

SHAPES_FILE = Path(__file__).with_name("sandboxes.toml")
SHARED_KEY = "lineage"
CHAIN_LIMIT = 8  # processes kept in a sandbox chain (the tool call first, then the latest ones)
TEXT_LIMIT = 512


@dataclass(frozen=True, slots=True)
class Shape:
    id: str
    framework: str
    process_names: frozenset[str] = frozenset()
    process_prefixes: tuple[str, ...] = ()
    exclude_names: frozenset[str] = frozenset()
    args: frozenset[str] = frozenset()
    container_names: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    shell_flags: frozenset[str] = frozenset()

    def is_server(self, name: str, args: list[str]) -> bool:
        """True when a process of this name and arguments is this shape's tool server."""
        if self.shell_flags or name in self.exclude_names:
            return False
        if name in self.process_names or (self.process_prefixes and name.startswith(self.process_prefixes)):
            return True
        return any(a in self.args or basename(a) in self.args for a in args[:16])

    def is_generic_call(self, parent_name: str, args: list[str]) -> bool:
        """True when ``args`` is a shell started with a tool-call flag by a process of this shape's kinds."""
        if not self.shell_flags or not args or basename(args[0]) not in SHELLS:
            return False
        return parent_name.startswith(self.process_prefixes) and any(a in self.shell_flags for a in args[1:3])


@dataclass(frozen=True, slots=True)
class Sandbox:
    """Where a tool call came from: what an analyst matches against the agent's trajectory."""

    shape: str
    framework: str
    container_id: str | None
    server_pid: int | None
    server: str  # the tool server's command line (or name)
    tool_call_pid: int | None
    tool_call: str  # the command line of the process the tool server started

    def fields(self, chain: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {"gpusentry.sandbox.shape": self.shape, "gpusentry.sandbox.framework": self.framework,
                               "gpusentry.sandbox.tool_server.command_line": self.server,
                               "gpusentry.sandbox.tool_call.command_line": self.tool_call}
        if self.container_id:
            out["gpusentry.sandbox.container_id"] = self.container_id
        if self.server_pid is not None:
            out["gpusentry.sandbox.tool_server.pid"] = self.server_pid
        if self.tool_call_pid is not None:
            out["gpusentry.sandbox.tool_call.pid"] = self.tool_call_pid
        if chain:
            out["gpusentry.sandbox.chain"] = list(chain)
        return out


@dataclass(slots=True)
class Proc:
    pid: int
    ppid: int | None
    name: str
    command_line: str
    container_id: str | None
    user: str | None
    started: float
    parent_name: str = ""
    server_shape: str | None = None  # set when this process is a tool server
    sandbox: Sandbox | None = None
    chain: tuple[str, ...] = ()  # tool call ... this process, as "name(pid)"
    exited: bool = False

    def fields(self) -> dict[str, Any]:
        return self.sandbox.fields(self.chain) if self.sandbox is not None else {}


@dataclass(frozen=True)
class Matcher:
    """The shapes and the site's settings, compiled once per detector (not part of any state)."""

    shapes: tuple[Shape, ...]
    settings: SandboxSettings

    def server_shape(self, name: str, args: list[str]) -> Shape | None:
        if name in self.settings.tool_servers:
            return _SITE
        for shape in self.shapes:
            if shape.is_server(name, args):
                return shape
        return None

    def container_shape(self, container: Mapping[str, Any]) -> Shape | None:
        """The shape an event's ``container`` (ECS) is a sandbox of (by id, name or image), if any."""
        cid = container.get("id") if isinstance(container.get("id"), str) else None
        cname = container.get("name") if isinstance(container.get("name"), str) else None
        image = container.get("image", {}).get("name") if isinstance(container.get("image"), dict) else None
        s = self.settings
        if (cid and _any_match(cid, s.container_ids)) or (cname and _any_match(cname, s.container_names)) or \
                (image and _any_match(image, s.images)):
            return _SITE
        for shape in self.shapes:
            if (cname and _any_match(cname, shape.container_names)) or (image and _any_match(image, shape.images)):
                return shape
        return None

    def generic_call(self, parent_name: str, args: list[str]) -> Shape | None:
        for shape in self.shapes:
            if shape.is_generic_call(parent_name, args):
                return shape
        return None


_SITE = Shape(id="site", framework="site-defined sandbox")


def _any_match(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


@lru_cache(maxsize=8)
def load_shapes(path: Path | None = None) -> tuple[Shape, ...]:
    path = path or resolve(SHAPES_FILE)
    entries = load_entries(path, "shape", required={"id": str, "framework": str},
                           optional={"process_names": list, "process_prefixes": list, "exclude_names": list,
                                     "args": list, "container_names": list, "images": list, "shell_flags": list})
    return tuple(Shape(id=e["id"], framework=e["framework"], process_names=frozenset(e.get("process_names", ())),
                       process_prefixes=tuple(e.get("process_prefixes", ())),
                       exclude_names=frozenset(e.get("exclude_names", ())), args=frozenset(e.get("args", ())),
                       container_names=tuple(e.get("container_names", ())), images=tuple(e.get("images", ())),
                       shell_flags=frozenset(e.get("shell_flags", ()))) for e in entries)


def matcher(settings: SandboxSettings) -> Matcher:
    return Matcher(load_shapes(settings.shapes_file or SHAPES_FILE), settings)


@dataclass
class Lineage:
    """One host's process table with the sandbox of every process (bounded: oldest exited forgotten first)."""

    procs: OrderedDict[int, Proc] = field(default_factory=OrderedDict)
    # container id -> the sandbox its tool server runs: a process of that container whose parent is
    # unknown (detached, re-parented) is still in it.
    containers: dict[str, Sandbox] = field(default_factory=dict)
    last_event_id: str = ""
    last: Proc | None = None
    sandboxed: bool = False  # any process seen in a sandbox yet (lets the GPU path skip the lookups)

    def of_pid(self, pid: Any) -> Proc | None:
        return self.procs.get(pid) if isinstance(pid, int) else None

    def observe(self, event: dict[str, Any], m: Matcher, ts: float) -> Proc | None:
        """Feed one process event (once per event, whoever calls); the process's entry, or None."""
        eid = event["event"]["id"]
        if eid == self.last_event_id:
            return self.last
        self.last_event_id = eid
        self.last = proc = self._observe(event, m, ts)
        return proc

    def _observe(self, event: dict[str, Any], m: Matcher, ts: float) -> Proc | None:
        p = event.get("process")
        if not isinstance(p, dict) or not isinstance(p.get("pid"), int):
            return None
        pid = p["pid"]
        if event["event"]["type"] == ["end"]:
            known = self.procs.get(pid)
            if known is not None:
                known.exited = True
            return known
        args = argv(p)
        name = str(p.get("name") or basename(p.get("executable")) or "")
        parent = as_dict(p.get("parent"))
        ppid = parent.get("pid") if isinstance(parent.get("pid"), int) else None
        container = as_dict(event.get("container"))
        cid = container.get("id") if isinstance(container.get("id"), str) else None
        user_name = as_dict(event.get("user")).get("name")
        user = user_name if isinstance(user_name, str) else None
        raw_line = p.get("command_line")
        line = (raw_line if isinstance(raw_line, str) else " ".join(args))[:TEXT_LIMIT]
        proc = Proc(pid=pid, ppid=ppid, name=name, command_line=line, container_id=cid, user=user, started=ts,
                    parent_name=str(parent.get("name") or ""))
        parent_proc = self.procs.get(ppid) if ppid is not None else None
        shape = m.server_shape(name, args)
        if shape is not None:
            proc.server_shape = shape.id
        proc.sandbox, proc.chain = self._sandbox_of(proc, parent_proc, args, event, m, shape)
        if proc.sandbox is not None:
            self.sandboxed = True
        if shape is not None and cid:
            self.containers.setdefault(cid, Sandbox(shape.id, shape.framework, cid, pid, line, None, ""))
        self._remember(proc, m.settings.max_processes)
        return proc

    def _sandbox_of(self, proc: Proc, parent: Proc | None, args: list[str], event: dict[str, Any], m: Matcher,
                    own_shape: Shape | None) -> tuple[Sandbox | None, tuple[str, ...]]:
        me = f"{proc.name}({proc.pid})"
        if parent is not None and parent.sandbox is not None:
            chain = parent.chain + (me,)
            if len(chain) > CHAIN_LIMIT:
                chain = chain[:1] + chain[-(CHAIN_LIMIT - 1):]
            return parent.sandbox, chain
        parent_shape_id = parent.server_shape if parent is not None else None
        parent_shape = None
        if parent_shape_id is not None:
            parent_shape = next((s for s in (*m.shapes, _SITE) if s.id == parent_shape_id), None)
        elif parent is None and proc.parent_name:
            # The parent started before the agent did: judge it by its name alone.
            parent_shape = m.server_shape(proc.parent_name, [])
        if parent_shape is not None and own_shape is None:
            server_pid = parent.pid if parent is not None else proc.ppid
            server = parent.command_line if parent is not None else proc.parent_name
            return Sandbox(parent_shape.id, parent_shape.framework, proc.container_id, server_pid, server, proc.pid,
                           proc.command_line), (me,)
        generic = m.generic_call(proc.parent_name or (parent.name if parent else ""), args)
        if generic is not None:
            server = parent.command_line if parent is not None else proc.parent_name
            return Sandbox(generic.id, generic.framework, proc.container_id, proc.ppid, server, proc.pid,
                           proc.command_line), (me,)
        if own_shape is not None:
            return None, ()  # a tool server is not its own tool call
        if proc.container_id and proc.container_id in self.containers:
            known = self.containers[proc.container_id]
            return Sandbox(known.shape, known.framework, known.container_id, known.server_pid, known.server,
                           proc.pid, proc.command_line), (me,)
        container = event.get("container")
        by_container = m.container_shape(container) if isinstance(container, dict) else None
        if by_container is not None or (proc.user and proc.user in m.settings.users):
            shape = by_container or _SITE
            return Sandbox(shape.id, shape.framework, proc.container_id, None, "", proc.pid, proc.command_line), (me,)
        return None, ()

    def _remember(self, proc: Proc, limit: int) -> None:
        self.procs.pop(proc.pid, None)
        self.procs[proc.pid] = proc
        if len(self.procs) > limit:
            # Forget exited processes first, then the oldest; tool servers and sandbox roots last.
            for pid in [p for p, e in self.procs.items() if e.exited][: len(self.procs) - limit]:
                del self.procs[pid]
            while len(self.procs) > limit:
                self.procs.popitem(last=False)
        if len(self.containers) > 1024:
            live = {e.container_id for e in self.procs.values() if e.container_id}
            self.containers = {c: s for c, s in self.containers.items() if c in live}


def shared_lineage(shared: dict[str, Any]) -> Lineage:
    lineage = shared.get(SHARED_KEY)
    if lineage is None:
        lineage = shared[SHARED_KEY] = Lineage()
    return lineage
