"""Options of the GPU behaviour detectors (``[detection.gpu]``): windows, models, signature, ownership."""

from __future__ import annotations

from pydantic import Field

from gpusentry.settings.base import Section

# Programs that legitimately use GPUs on AI fleets, as globs on the full executable path.  A miner
# copied to /tmp or a hidden directory never matches; one renamed to a listed name in a listed
# directory is left to the mining signature and the process and network detectors.
DEFAULT_ALLOWED_EXECUTABLES = [
    "/usr/bin/python3*", "/usr/local/bin/python3*", "/usr/bin/python", "/opt/conda/bin/python*",
    "/opt/conda/envs/*/bin/python*", "/home/*/.venv/bin/python*", "/home/*/venv/bin/python*",
    "/home/*/miniconda3/bin/python*", "/home/*/miniconda3/envs/*/bin/python*", "/opt/venv/bin/python*",
    "/usr/local/bin/torchrun", "/opt/tritonserver/bin/tritonserver", "/usr/bin/ffmpeg", "/usr/local/bin/ffmpeg",
    "/usr/bin/dcgmi", "/usr/bin/nv-hostengine", "/usr/bin/nvidia-smi", "/usr/local/bin/gpu_burn",
    "/opt/gpu-burn/gpu_burn", "/usr/local/bin/nvbandwidth", "/usr/local/cuda*/extras/demo_suite/*",
    "/usr/bin/Xorg", "/usr/lib/xorg/Xorg",
]
DEFAULT_ALLOWED_NAMES = ["python", "python3", "torchrun", "tritonserver", "ffmpeg", "dcgmi", "nv-hostengine",
                         "gpu_burn", "nvbandwidth", "Xorg"]


class GpuDetectionSettings(Section):
    """GPU behaviour models, the mining signature, drift and ownership of GPU work."""

    window_s: float = Field(
        30.0, ge=5, le=600, description="Event-time window over which each GPU's samples are summarised "
        "before the models see them (models run per window, not per sample).")
    busy_gpu_pct: float = Field(
        20.0, ge=1, le=100, description="A GPU sample at or above this utilisation counts as busy.")

    anomaly_threshold: float = Field(
        0.7, gt=0, lt=1, description="Half-space-trees score (0..1) at or above which a window is anomalous "
        "for that GPU. Anomalous windows are kept out of training unless the GPU's work is owned.")
    anomaly_warmup_windows: int = Field(
        20, ge=1, description="Windows a GPU's model learns before it may flag anything.")
    anomaly_trees: int = Field(10, ge=1, le=50, description="Half-space trees per GPU model.")
    anomaly_tree_height: int = Field(
        6, ge=2, le=12, description="Height of each tree; the pickled model doubles with every level.")
    anomaly_reference_windows: int = Field(
        20, ge=5, description="Windows in each half-space-trees reference period.")

    signature_medium: float = Field(
        0.72, gt=0, le=1, description="Mining-signature score (0..1) that raises a medium finding when held "
        "for `signature_windows` busy windows.")
    signature_high: float = Field(
        0.9, gt=0, le=1, description="Mining-signature score that raises a high finding when held.")
    signature_windows: int = Field(
        2, ge=1, description="Busy windows among the last `signature_history` that must reach a level.")
    signature_history: int = Field(
        6, ge=1, le=60, description="Busy windows remembered per GPU for the signature and its dip check.")

    drift_delta: float = Field(
        0.002, gt=0, lt=1, description="ADWIN confidence parameter for drift in utilisation and power "
        "(smaller = fewer, surer detections).")
    power_limit_change_pct: float = Field(
        10.0, gt=0, le=100, description="A change of the enforced power limit by more than this percent "
        "is reported.")

    allowed_executables: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_EXECUTABLES),
        description="Globs on the full executable path of programs allowed to use GPUs.")
    allowed_process_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_NAMES),
        description="Process names allowed to use GPUs, used only when the executable path is unknown.")
    allowed_users: list[str] = Field(
        default_factory=list, description="Users whose GPU processes are always owned (service accounts).")
    allowed_container_ids: list[str] = Field(
        default_factory=list, description="Container ids (or id prefixes) whose GPU processes are owned.")
    learn_jobs_for_s: float = Field(
        0.0, ge=0, description="For this many seconds after a host is first seen, every program found on "
        "its GPUs is learned as a known job (0 = learn nothing: a miner already running would be learned).")
    allocation_grace_s: float = Field(
        15.0, ge=0, le=600, description="Event time a GPU process may stay outside its pod's/job's allocation, or "
        "a GPU may stay busy with nobody holding it, before it is reported: covers pod start-up, device-plugin "
        "lag and the agent's scheduler refresh ([agent.scheduler] refresh_s).")
    duty_cycle_min_cycles: int = Field(
        3, ge=2, description="Busy/idle cycles within `duty_cycle_horizon_s` that make an unowned GPU's use "
        "duty-cycled.")
    duty_cycle_horizon_s: float = Field(
        900.0, ge=60, description="Event-time horizon over which duty cycles are counted.")
