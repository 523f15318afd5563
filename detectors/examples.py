"""Compact builders for detector examples and tests: realistic contract events with few keystrokes."""

from __future__ import annotations

import shlex
from typing import Any

from gpusentry import contract as c

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z: examples run on a fixed event-time clock
HOST = "gpu-node-7"


def proc(command_line: str, *, t: float = 0.0, pid: int = 4242, executable: str | None = None,
         name: str | None = None, parent: str = "bash", parent_pid: int = 100, user: str = "ml",
         cwd: str = "/home/ml", host: str = HOST, action: str = "start", container_id: str | None = None,
         event_id: str | None = None) -> dict[str, Any]:
    """A process start whose args are the command line split as a shell would."""
    try:
        args = shlex.split(command_line)
    except ValueError:
        args = command_line.split()
    exe = executable or args[0]
    return c.process_event(host, T0 + t, action=action, pid=pid, name=name or exe.rsplit("/", 1)[-1],
                           executable=exe, command_line=command_line, args=args, working_directory=cwd,
                           start=T0 + t, parent_pid=parent_pid, parent_name=parent, user_name=user,
                           container_id=container_id, event_id=event_id or f"proc-{pid}-{int(t * 1000)}")


def flow(payload: bytes | str | None = None, *, t: float = 0.0, dst: str = "203.0.113.50", dport: int = 3333,
         src: str = "10.0.0.7", sport: int = 51234, domain: str | None = None, sni: str | None = None,
         pid: int | None = 4242, process_name: str | None = "python3", host: str = HOST,
         event_id: str | None = None) -> dict[str, Any]:
    """A new outbound TCP flow whose first client bytes are ``payload`` (text is UTF-8 encoded)."""
    import base64

    data = payload.encode() if isinstance(payload, str) else payload
    b64 = base64.b64encode(data[:c.MAX_PAYLOAD_BYTES]).decode() if data is not None else None
    return c.network_event(host, T0 + t, source_ip=src, source_port=sport, destination_ip=dst,
                           destination_port=dport, pid=pid, process_name=process_name, destination_domain=domain,
                           server_name=sni, payload_b64=b64,
                           event_id=event_id or f"flow-{dst}-{dport}-{sport}-{int(t * 1000)}")


def dns(question: str, ips: list[str], *, t: float = 0.0, pid: int | None = None, host: str = HOST,
        event_id: str | None = None) -> dict[str, Any]:
    """A DNS answer the host saw."""
    return c.dns_event(host, T0 + t, question=question, resolved_ips=ips, pid=pid,
                       event_id=event_id or f"dns-{question}-{int(t * 1000)}")


def gpu(t: float = 0.0, *, util: float | None, **kwargs: Any) -> dict[str, Any]:
    """One GPU sample at ``T0 + t`` (an A100 by default; keywords as :func:`detectors.gpu._examples.gpu`).

    Workload series (idle, training, mining, burn-in) are in :mod:`detectors.gpu._examples`.
    """
    from detectors.gpu._examples import gpu as build  # imported here: that module builds on this one

    return build(t, util=util, **kwargs)
