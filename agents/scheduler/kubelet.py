"""Kubernetes: the kubelet's PodResources API (gRPC over its unix socket), joined to pods that still exist.

``List`` names each pod's containers and the device ids the device plugin gave them; ``GetAllocatableResources``
names every device the kubelet manages (older kubelets answer UNIMPLEMENTED: every GPU then counts as managed).
The API names pods, not processes, and it also lists pods that have finished: an allocation counts only while
its pod's cgroup exists, and pods are tied to processes through ``/proc/PID/cgroup`` (pod UID) and the kubelet's
log directory (UID -> namespace and name).  The kubelet rate-limits the socket (100 queries/s); one refresh
every few seconds is two calls.
"""

from __future__ import annotations

import fnmatch
import logging
import os

from agents.cgroups import PodNames, live_pod_uids
from agents.scheduler import Allocation, Holder, SourceError

log = logging.getLogger(__name__)


class KubeletSource:
    name = "kubernetes"

    def __init__(self, socket_path: str, *, gpu_resources: list[str], cgroup_root: str | None,
                 pods: PodNames | None, timeout_s: float = 2.0) -> None:
        import grpc

        from agents.scheduler.podresources import api_pb2, api_pb2_grpc

        self._grpc = grpc
        self._pb = api_pb2
        self.socket_path = socket_path
        self.gpu_resources = list(gpu_resources)
        self.cgroup_root = cgroup_root
        self.pods = pods
        self.timeout_s = timeout_s
        # A unix-socket channel reconnects by itself when the kubelet restarts and recreates the socket (which
        # is why the directory, not the socket, is mounted).
        # Reconnection backoff capped near the refresh interval, so a restarted kubelet is read again within
        # seconds rather than after gRPC's default two-minute ceiling.
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}", options=[
            ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000)])
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        self._allocatable_supported = True

    def _is_gpu(self, resource: str) -> bool:
        return any(fnmatch.fnmatchcase(resource, p) for p in self.gpu_resources)

    def read(self) -> Allocation:
        grpc = self._grpc
        try:
            listed = self._stub.List(self._pb.ListPodResourcesRequest(), timeout=self.timeout_s)
            managed: set[str] | None = None
            if self._allocatable_supported:
                try:
                    allocatable = self._stub.GetAllocatableResources(self._pb.AllocatableResourcesRequest(),
                                                                     timeout=self.timeout_s)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._allocatable_supported = False  # kubelet < 1.23 without the feature gate
                    log.info("kubelet has no GetAllocatableResources: every GPU counts as managed by it")
                else:
                    managed = {d for cd in allocatable.devices if self._is_gpu(cd.resource_name) for d in cd.device_ids}
        except grpc.RpcError as exc:
            raise SourceError(f"kubelet PodResources at {self.socket_path}: {exc.code().name} "
                              f"({exc.details()}); check that its directory is mounted and the kubelet runs") from exc
        live = live_pod_uids(self.cgroup_root) if self.cgroup_root else None
        by_name = self._uids_by_name() if live is not None else {}
        devices: dict[str, list[Holder]] = {}
        for pod in listed.pod_resources:
            uids = by_name.get((pod.namespace, pod.name))
            pod_uid = None
            if uids and live is not None:
                alive = [u for u in uids if u in live]
                if not alive:
                    continue  # a finished pod the kubelet still lists: its devices are free
                pod_uid = alive[0]
            for container in pod.containers:
                for cd in container.devices:
                    if not self._is_gpu(cd.resource_name):
                        continue
                    holder = Holder("kubernetes", namespace=pod.namespace, pod=pod.name, pod_uid=pod_uid,
                                    container=container.name, resource=cd.resource_name)
                    for device_id in cd.device_ids:
                        devices.setdefault(device_id, []).append(holder)
        return Allocation("kubernetes", devices, managed, judges_host_processes=True)

    def _uids_by_name(self) -> dict[tuple[str, str], list[str]]:
        if self.pods is None:
            return {}
        out: dict[tuple[str, str], list[str]] = {}
        for uid, ns_name in self.pods.all(refresh=True).items():
            out.setdefault(ns_name, []).append(uid)
        return out

    def close(self) -> None:
        self._channel.close()

