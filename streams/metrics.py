"""Prometheus metrics of a stream worker, in a registry of its own (served on an optional localhost port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Event delay from @timestamp to processing: sub-second normally, minutes when a worker catches up.
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
_PROCESSING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("gpusentry_worker_messages", "Kafka messages consumed, by topic.", ["topic"],
                                registry=r)
        self.events = Counter("gpusentry_worker_events", "Valid events processed, by topic (rate = events/s).",
                              ["topic"], registry=r)
        self.alerts = Counter("gpusentry_worker_alerts", "Incident updates published, by severity and status "
                              "(each update once).", ["severity", "status"], registry=r)
        self.alert_rules = Counter("gpusentry_worker_alert_rules", "Incident updates published, once per rule "
                                   "that contributed to the incident (an update of three rules counts three times).",
                                   ["rule", "status"], registry=r)
        self.suppressed = Counter("gpusentry_worker_alerts_suppressed",
                                  "Incident updates withheld by an analyst's suppression.", ["rule"], registry=r)
        self.duplicates = Counter("gpusentry_worker_alerts_deduplicated",
                                  "Incident updates not re-published after a restart because they were already "
                                  "on the alerts topic.", registry=r)
        self.resent_messages = Counter("gpusentry_worker_resent_messages", "Messages dropped as exact copies of one "
                                       "the same host sent recently: an agent resending a batch whose delivery it "
                                       "could not confirm (a network cut mid-request).", ["topic"], registry=r)
        self.deadletters = Counter("gpusentry_worker_deadletters", "Messages or events sent to the dead-letter "
                                   "topic, by reason.", ["reason"], registry=r)
        self.detector_failures = Counter("gpusentry_worker_detector_failures", "Detector exceptions, by rule.",
                                         ["rule"], registry=r)
        self.lag = Gauge("gpusentry_worker_consumer_lag", "Messages behind the partition's high watermark.",
                         ["topic", "partition"], registry=r)
        self.event_delay = Histogram("gpusentry_worker_event_delay_seconds",
                                     "Wall time at processing minus the event's @timestamp.",
                                     buckets=_DELAY_BUCKETS, registry=r)
        self.processing = Histogram("gpusentry_worker_message_processing_seconds",
                                    "Time to decode and run the detectors over one message.",
                                    buckets=_PROCESSING_BUCKETS, registry=r)
        self.checkpoints = Counter("gpusentry_worker_checkpoints", "Partition checkpoints written.", registry=r)
        self.checkpoint_seconds = Histogram("gpusentry_worker_checkpoint_seconds",
                                            "Time to write one partition checkpoint (processing waits for it).",
                                            buckets=_PROCESSING_BUCKETS, registry=r)
        self.checkpoint_failures = Counter("gpusentry_worker_checkpoints_too_large",
                                           "Checkpoints not written because they exceeded worker.checkpoint_max_bytes.",
                                           registry=r)
        self.restores = Counter("gpusentry_worker_restores", "Partition checkpoints restored.", registry=r)
        self.end_offset_failures = Counter("gpusentry_worker_end_offset_queries_failed", "Queries of the event "
                                           "topics' end offsets (asked while messages are held for event-time "
                                           "order) the broker did not answer in time.", registry=r)
        self.stalled_topics = Counter("gpusentry_worker_stalled_topic_waits", "Times a topic's records were known "
                                      "on the broker but not received past worker.reorder_hold_s, so the "
                                      "partition's other topics waited for them.", ["topic"], registry=r)
        self.kept = Counter("gpusentry_worker_partitions_kept", "Partitions a rebalance revoked and gave straight "
                            "back, kept in memory instead of restored from their checkpoint.", registry=r)
        self.topic_problems = Gauge("gpusentry_worker_topic_problems", "Topics missing or with another partition "
                                    "count than the worker started with, at the last check (every "
                                    "worker.topic_check_s and after the broker answers again).", registry=r)
        self.feedback = Gauge("gpusentry_worker_suppressions_active", "Analyst suppressions in force.", registry=r)
        self.feedback_rejected = Counter("gpusentry_worker_feedback_rejected",
                                         "Analyst verdicts refused, by reason (unsigned, unknown_key, bad_signature, "
                                         "bad_feedback, superseded).", ["reason"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
