"""Compact builders for detector examples and tests: realistic contract events with few keystrokes."""

from __future__ import annotations

from typing import Any

from gpusentry import contract as c

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z: examples run on a fixed event-time clock
HOST = "gpu-node-7"


def proc(command_line: str, *, t: float = 0.0, pid: int = 4242, executable: str | None = None,
         name: str | None = None, parent: str = "bash", parent_pid: int = 100, user: str = "ml",
         cwd: str = "/home/ml", host: str = HOST, action: str = "start", container_id: str | None = None,
         event_id: str | None = None) -> dict[str, Any]:
    """A process start whose args are the whitespace-split command line."""
    args = command_line.split()
    exe = executable or args[0]
    return c.process_event(host, T0 + t, action=action, pid=pid, name=name or exe.rsplit("/", 1)[-1],
                           executable=exe, command_line=command_line, args=args, working_directory=cwd,
                           start=T0 + t, parent_pid=parent_pid, parent_name=parent, user_name=user,
                           container_id=container_id, event_id=event_id or f"proc-{pid}-{int(t * 1000)}")
