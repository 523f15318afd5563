"""Where the agent learns who was allocated which GPU (``[agent.scheduler]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpusentry.settings.base import Section

SchedulerMode = Literal["auto", "kubernetes", "slurm", "docker", "none"]


class SchedulerSettings(Section):
    """The scheduler whose allocations the agent reports on every GPU sample (``gpusentry.allocation.*``)."""

    mode: SchedulerMode = Field(
        "auto", description="`auto` picks the first source this node has: the kubelet's PodResources socket, "
        "then Slurm (slurmstepd cgroups or `scontrol` on PATH), then Docker's state directory; `none` reports no "
        "allocation (GPU ownership is then judged by allowlist and learned jobs).")
    refresh_s: float = Field(
        5.0, ge=0.5, le=300, description="Seconds between reads of the scheduler (in a background thread: a slow "
        "or absent source never delays collection).")
    stale_after_s: float = Field(
        30.0, ge=1, description="An answer older than this (the source stopped answering) is reported as "
        "`stale`; detectors then fall back to the allowlist for that GPU.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Deadline of one call to the scheduler.")
    kubelet_socket: str = Field(
        "/var/lib/kubelet/pod-resources/kubelet.sock", description="The kubelet's PodResources socket. Mount "
        "its directory (not the socket) so a kubelet restart does not lose it.")
    gpu_resources: list[str] = Field(
        default_factory=lambda: ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*"],
        description="Kubernetes extended-resource names (shell-style patterns) that are GPUs.")
    cgroup_root: str = Field(
        "/sys/fs/cgroup", description="The cgroup filesystem: which pods and Slurm jobs still exist "
        "(the kubelet also lists finished pods).")
    scontrol: str = Field("scontrol", description="Slurm's `scontrol` (PATH is searched); asked once per job.")
    slurm_map_dir: str | None = Field(
        "/run/gpusentry/slurm", description="Where the shipped Slurm prolog (deploy/slurm/prolog.sh) writes each "
        "job's GPU UUIDs; read before `scontrol`. Unset: not read.")
