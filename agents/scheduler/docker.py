"""Docker without an orchestrator: the GPUs each running container was started with.

Read from Docker's state files (``containers/<id>/config.v2.json`` and ``hostconfig.json``), which only root can
change: ``--gpus`` becomes a device request (``Count: -1`` is every GPU; ``DeviceIDs`` are NVML indices or
UUIDs); a container run with ``--runtime=nvidia`` gets the GPUs its ``NVIDIA_VISIBLE_DEVICES`` names (``all``,
``none``/``void``, indices or UUIDs; CUDA base images set ``all``).  A process in a container that was given no
GPU is outside its allocation.  Processes on the host itself are not Docker's business: there is no scheduler to
ask about them, and they are judged as without a scheduler.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from agents.scheduler import Allocation, Holder, SourceError


def _device_ids(text: str) -> list[str]:
    text = text.strip()
    if text in ("", "none", "void"):
        return []
    if text == "all":
        return ["all"]
    return [d if not d.isdigit() else f"index:{d}" for d in (p.strip() for p in text.split(",")) if d]


def container_gpus(config: dict[str, Any], hostconfig: dict[str, Any]) -> tuple[list[str], str | None]:
    """(device ids, how they were given) of one container's state."""
    ids: list[str] = []
    how = None
    for req in hostconfig.get("DeviceRequests") or ():
        if not isinstance(req, dict):
            continue
        caps = [c for group in req.get("Capabilities") or () if isinstance(group, list) for c in group]
        if "gpu" not in caps and req.get("Driver") != "nvidia":
            continue
        how = "--gpus"
        if req.get("Count") == -1:
            ids.append("all")
        for d in req.get("DeviceIDs") or ():
            if isinstance(d, str):
                ids.extend(_device_ids(d))
    if hostconfig.get("Runtime") == "nvidia":
        for item in (config.get("Config") or {}).get("Env") or ():
            if isinstance(item, str) and item.startswith("NVIDIA_VISIBLE_DEVICES="):
                ids.extend(_device_ids(item.split("=", 1)[1]))
                how = how or "--runtime=nvidia"
    return ids, how


class DockerSource:
    name = "docker"

    def __init__(self, docker_root: str) -> None:
        self.root = docker_root
        self._cache: dict[str, tuple[float, Holder, list[str]]] = {}  # id -> (config mtime, holder, ids)

    def read(self) -> Allocation:
        base = os.path.join(self.root, "containers")
        try:
            ids = os.listdir(base)
        except OSError as exc:
            raise SourceError(f"cannot list {base} ({exc.strerror}); mount Docker's state directory read-only") from exc
        devices: dict[str, list[Holder]] = {}
        seen = set()
        for cid in ids:
            entry = self._container(base, cid)
            if entry is None:
                continue
            seen.add(cid)
            holder, dev_ids = entry
            for d in dev_ids:
                devices.setdefault(d, []).append(holder)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return Allocation("docker", devices, None, judges_host_processes=False)

    def _container(self, base: str, cid: str) -> tuple[Holder, list[str]] | None:
        path = os.path.join(base, cid, "config.v2.json")
        try:
            mtime = os.stat(path).st_mtime
            cached = self._cache.get(cid)
            if cached is not None and cached[0] == mtime:
                return cached[1], cached[2]
            with open(path, "rb") as f:
                config = orjson.loads(f.read(1 << 22))
            with open(os.path.join(base, cid, "hostconfig.json"), "rb") as f:
                hostconfig = orjson.loads(f.read(1 << 22))
        except (OSError, ValueError):
            return None  # removed meanwhile, or not a container directory
        if not isinstance(config, dict) or not isinstance(hostconfig, dict):
            return None
        if not (config.get("State") or {}).get("Running"):
            self._cache.pop(cid, None)
            return None
        dev_ids, how = container_gpus(config, hostconfig)
        name = config.get("Name")
        holder = Holder("docker", container_id=cid, container=name.lstrip("/") if isinstance(name, str) else None,
                        resource=how)
        self._cache[cid] = (mtime, holder, dev_ids)
        return holder, dev_ids

    def close(self) -> None:
        pass

