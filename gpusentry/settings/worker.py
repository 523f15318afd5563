"""Options of the stream worker (`gpusentry worker`) and of `gpusentry up`."""

from __future__ import annotations

from pydantic import Field

from gpusentry.settings.base import Section


class WorkerSettings(Section):
    app_id: str = Field("gpusentry", description="faust application id: the consumer group and the "
                        "prefix of its checkpoint topic. Workers with the same id share the work.")
    reorder_hold_s: float = Field(
        10.0, ge=0, le=60, description="Each partition's messages reach detection in event-time order across the "
        "event topics (a host's GPU samples, process, network and DNS events in the order they happened, whichever "
        "topic the consumer fetched first), waiting at most this long for a topic that is still delivering, and up to 120 s for one whose records the "
        "broker holds but this worker has not received (its fetches stalled: after a broker restart one topic's "
        "can resume tens of seconds after another's). A worker catching up a backlog then decides what `gpusentry "
        "replay` decides. Only a backlog (events over 30 s old) is ever held. 0: in arrival order.")
    checkpoint_interval_s: float = Field(
        10.0, gt=0, le=600, description="Seconds between checkpoints of a partition's detector state (and the "
        "input offsets it covers). A killed worker's successor replays about this much input; shorter costs "
        "more CPU (each active host's state is pickled once per interval).")
    checkpoint_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024 * 1024, description="Largest checkpoint record (one per input partition); "
        "the checkpoint topic is created with this `max.message.bytes`.")
    snapshot_cpu_share: float = Field(
        0.15, gt=0, le=1, description="Share of the worker's time that host snapshots may take. Their cost "
        "grows with hosts, not events; beyond this share snapshots wait (a successor replays more input) "
        "instead of delaying alerts.")
    fetch_max_wait_ms: int = Field(
        100, ge=0, le=5000, description="Longest a fetch waits for data. faust's built-in 1,500 ms adds that "
        "much latency on quiet topics; 100 ms keeps alerts under a second.")
    session_timeout_s: float = Field(
        10.0, ge=1, le=300, description="Consumer group session timeout; a dead worker's partitions move "
        "after this long.")
    topic_check_s: float = Field(
        30.0, ge=1, le=3600, description="How often the worker checks that its topics exist with the partition "
        "counts it started with (also right after the broker answers again); a problem is logged as an error "
        "and shown by `gpusentry_worker_topic_problems`.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Serve Prometheus metrics on 127.0.0.1 at this port; 0 turns them off.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds to.")
    web_enabled: bool = Field(False, description="Run faust's own web server (on `web_host`:`web_port`).")
    web_host: str = Field("127.0.0.1", description="Address of faust's web server when enabled.")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of faust's web server when enabled.")
    data_dir: str = Field("", description="faust data directory; empty means a fresh temporary directory.")
    incidents_file: str = Field("gpusentry-incidents.jsonl",
                                description="`gpusentry up`: incidents are appended here as JSON lines.")
