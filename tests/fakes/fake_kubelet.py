"""A fake kubelet: the PodResources gRPC service (the real v1 proto, agents/scheduler/podresources) on a unix
socket, answering ``List`` and ``GetAllocatableResources`` from a list of pods, and ``Get`` with UNIMPLEMENTED
as kubelets without the KubeletPodResourcesGet feature gate do.

    python -m tests.fakes.fake_kubelet SOCKET PODS_JSON   # serve until killed (the agent benchmark's kubelet)

``PODS_JSON``: ``[[namespace, name, [[container, [[resource, [device ids]]]]]]]``.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from agents.scheduler.podresources import api_pb2 as pb
from agents.scheduler.podresources import api_pb2_grpc as pb_grpc

Pods = list[tuple[str, str, list[tuple[str, list[tuple[str, list[str]]]]]]]


class FakeKubelet(pb_grpc.PodResourcesListerServicer):
    def __init__(self, pods: Pods, allocatable: list[tuple[str, list[str]]] | None) -> None:
        self.pods = pods
        self.allocatable = allocatable  # None: an old kubelet without GetAllocatableResources
        self.calls = 0

    def List(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        self.calls += 1
        return pb.ListPodResourcesResponse(pod_resources=[
            pb.PodResources(name=name, namespace=ns, containers=[
                pb.ContainerResources(name=cname, devices=[pb.ContainerDevices(resource_name=r, device_ids=ids)
                                                           for r, ids in devices])
                for cname, devices in containers])
            for ns, name, containers in self.pods])

    def GetAllocatableResources(self, request: Any, context: Any) -> Any:  # noqa: N802
        if self.allocatable is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown method GetAllocatableResources")
        return pb.AllocatableResourcesResponse(devices=[pb.ContainerDevices(resource_name=r, device_ids=ids)
                                                        for r, ids in self.allocatable or ()])


def serve(socket_path: Path | str, servicer: FakeKubelet) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"unix://{socket_path}"):
        raise OSError(f"cannot listen on {socket_path}")
    server.start()
    return server


if __name__ == "__main__":
    pods = json.loads(Path(sys.argv[2]).read_text())
    serve(sys.argv[1], FakeKubelet(pods, allocatable=None))
    print("ready", flush=True)
    threading.Event().wait()
