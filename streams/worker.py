"""``gpusentry worker``: run one stream worker until SIGINT/SIGTERM.

Scale out by starting more workers with the same ``worker.app_id`` (they form one consumer group) on
topics with at least as many partitions as workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Any

import faust
import mode
from aiokafka.errors import KafkaError
from confluent_kafka import KafkaException

from gpusentry.config import Config
from streams.app import WorkerApp, build_app
from streams.feedback import FeedbackError, Verifier, parse_feedback
from streams.kafka_io import broker_back, checkpoint_topic, follow_feedback
from streams.pipeline import DeadLetterReason

log = logging.getLogger(__name__)

GC_THRESHOLDS = (100_000, 50, 100)  # measured: +30 % engine throughput over the default (700, 10, 10)


class TopicsMissing(RuntimeError):
    pass


def list_topics(cfg: Config) -> dict[str, Any]:
    """Topic name -> metadata (confluent-kafka's admin client, which never creates topics)."""
    from confluent_kafka.admin import AdminClient

    return dict(AdminClient(cfg.kafka.confluent_config()).list_topics(timeout=15).topics)


def topic_problems(cfg: Config, existing: dict[str, Any], partitions: int) -> list[str]:
    """What is wrong with the topics now, compared with what the worker started with; each with its fix."""
    problems = [f"topic {t!r} is missing: recreate it with {partitions} partition(s) (gpusentry worker "
                "--create-topics), or restore the broker's data" for t in cfg.topics.all() if t not in existing]
    for t in cfg.topics.event_topics().values():
        if t in existing and len(existing[t].partitions) != partitions:
            problems.append(f"topic {t!r} has {len(existing[t].partitions)} partition(s), the worker started with "
                            f"{partitions}: a host's events no longer meet one partition's state; give every event "
                            "topic the same count and restart the workers")
    ckpt = checkpoint_topic(cfg)
    if ckpt not in existing:
        problems.append(f"checkpoint topic {ckpt!r} is missing: a restart would replay from scratch; restart the "
                        "worker to create it")
    return problems


def ensure_topics(cfg: Config, *, create: bool) -> int:
    """Check (or create) the topics; create the checkpoint topic.  Returns the event partition count."""
    from confluent_kafka import KafkaError as CKafkaError
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(cfg.kafka.confluent_config())
    try:
        existing = admin.list_topics(timeout=15).topics
    except KafkaException as exc:
        raise TopicsMissing(f"cannot reach Kafka at {cfg.kafka.bootstrap_servers!r}: {exc}; check "
                            "kafka.bootstrap_servers and the security settings") from None
    wanted: list[Any] = []
    missing = [t for t in cfg.topics.all() if t not in existing]
    if missing and not create:
        raise TopicsMissing(f"topics missing: {', '.join(missing)}; create them, or run "
                            "`gpusentry worker --create-topics` once")
    # The feedback topic is the audit record of every verdict: kept for ever, never compacted away.
    audit = {"retention.ms": "-1", "cleanup.policy": "delete"}
    wanted += [NewTopic(t, num_partitions=cfg.kafka.partitions, replication_factor=-1,
                        config=audit if t == cfg.topics.feedback else {}) for t in missing]
    counts = {len(existing[t].partitions) for t in cfg.topics.event_topics().values() if t in existing}
    if len(counts) > 1:
        raise TopicsMissing("the four event topics must have the same number of partitions (a host's events "
                            f"must meet in one partition number); found {sorted(counts)}")
    partitions = counts.pop() if counts else cfg.kafka.partitions
    ckpt = checkpoint_topic(cfg)
    if ckpt in existing and len(existing[ckpt].partitions) < partitions:
        raise TopicsMissing(f"checkpoint topic {ckpt!r} has {len(existing[ckpt].partitions)} partitions, fewer than "
                            f"the {partitions} of the event topics; add partitions to it")
    if ckpt not in existing:
        wanted.append(NewTopic(ckpt, num_partitions=partitions, replication_factor=-1,
                               config={"cleanup.policy": "compact",
                                       "max.message.bytes": str(cfg.worker.checkpoint_max_bytes + 65536)}))
    if wanted:
        for name, future in admin.create_topics(wanted, operation_timeout=30, request_timeout=30).items():
            try:
                future.result(30)
            except KafkaException as exc:
                if exc.args[0].code() != CKafkaError.TOPIC_ALREADY_EXISTS:
                    raise TopicsMissing(f"could not create topic {name!r}: {exc}") from None
    return partitions


class PipelineService(mode.Service):
    """Starts before the faust app and stops after it: own clients, feedback reader, metrics server."""

    def __init__(self, wa: WorkerApp, partitions: int | None = None, **kwargs: Any) -> None:
        self.wa = wa
        self.partitions = partitions or wa.cfg.kafka.partitions
        self._stop_feedback = asyncio.Event()
        self._check_topics_now = asyncio.Event()
        self.verifier = Verifier.from_settings(wa.cfg.feedback)
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.wa.clients.start()
        w = self.wa.cfg.worker
        if w.metrics_port:
            self.wa.metrics.serve(w.metrics_port, w.metrics_host)
            log.info("metrics on http://%s:%d/metrics", w.metrics_host, w.metrics_port)
        caught_up = asyncio.Event()
        if self.verifier.require_signature and not self.verifier.keys:
            log.warning("[feedback] trusted_keys is empty: every analyst verdict will be refused; add each "
                        "analyst's public key (gpusentry feedback keygen prints it)")
        partitions = await self.wa.clients.partitions(self.wa.cfg.topics.feedback)
        self.add_future(follow_feedback(self.wa.cfg, self._on_feedback, self._stop_feedback, caught_up, partitions))
        loop = asyncio.get_running_loop()
        broker_back.append(lambda: loop.call_soon_threadsafe(self._check_topics_now.set))
        self.add_future(self._watch_topics())
        # Nothing is published before the suppressions already on the feedback topic are known.
        await asyncio.wait_for(caught_up.wait(), timeout=60)
        log.info("feedback applied: %d suppression(s) in force", len(self.wa.suppressions))
        # The engine allocates many small objects per event; with faust's large, long-lived heap the
        # default collector thresholds spend a third of the worker's time re-scanning it.  Everything
        # alive now lives for the whole run: move it out of the collector's way and collect less often.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    async def _watch_topics(self) -> None:
        """Every ``worker.topic_check_s``, and as soon as the broker answers again: are the topics still what the worker
        started with?  Said when it changes (an error per problem, one line when they are gone)."""
        said: list[str] = []
        while not self._stop_feedback.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_topics_now.wait(), self.wa.cfg.worker.topic_check_s)
            self._check_topics_now.clear()
            try:
                existing = await asyncio.to_thread(list_topics, self.wa.cfg)
            except KafkaException:
                continue  # the broker is away: the clients say so; check again when it answers
            problems = topic_problems(self.wa.cfg, existing, self.partitions)
            self.wa.metrics.topic_problems.set(len(problems))
            if problems != said:
                for problem in problems:
                    log.error("%s", problem)
                if said and not problems:
                    log.warning("the topics are as the worker started with them again")
            said = problems

    async def _on_feedback(self, value: bytes | None, partition: int, offset: int) -> None:
        try:
            verdict, suppression = parse_feedback(value, self.verifier)
        except FeedbackError as exc:
            self.wa.metrics.feedback_rejected.labels(exc.reason).inc()
            log.warning("feedback at %s[%d]@%d refused (%s): %s", self.wa.cfg.topics.feedback, partition, offset,
                        exc.reason, exc)
            await self.wa.pipeline.dead_letter(DeadLetterReason.BAD_FEEDBACK, f"{exc.reason}: {exc}",
                                               topic=self.wa.cfg.topics.feedback, partition=partition,
                                               offset=offset, key=None,
                                               original=value.decode("utf-8", "replace")[:65536] if value else None)
            return
        if not self.wa.suppressions.apply(verdict, suppression):
            self.wa.metrics.feedback_rejected.labels("superseded").inc()
            log.warning("feedback at %s[%d]@%d ignored: a newer verdict for the same scope is in force",
                        self.wa.cfg.topics.feedback, partition, offset)
            return
        self.wa.metrics.feedback.set(len(self.wa.suppressions))
        log.info("feedback: %s %s by %s (key %s, expires %s)", verdict, dict(suppression.scope),
                 suppression.analyst or "?", suppression.signed_by, suppression.expires)

    async def on_stop(self) -> None:
        self._stop_feedback.set()
        self._check_topics_now.set()
        try:
            written = await self.wa.pipeline.checkpoint_due(force=True)
            log.info("final checkpoints written: %d", written)
        except KafkaError as exc:
            log.warning("final checkpoint failed (%s); the next worker replays from the last one", exc)
        await self.wa.clients.stop()


def run_worker(cfg: Config, *, create_topics: bool = False) -> int:
    if not cfg.kafka.bootstrap_servers:
        raise ValueError("kafka.bootstrap_servers is empty; set it (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS=host:9092), "
                         "or use `gpusentry up`, which starts the embedded broker")
    partitions = ensure_topics(cfg, create=create_topics)
    wa = build_app(cfg)
    service = PipelineService(wa, partitions)
    worker = _Worker(wa.app, service, loglevel=cfg.logging.level.lower(), quiet=True,
                     override_logging=False, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code:
            return int(exc.code)
    # Ctrl-C is an interruption (130, like every command); SIGTERM is how a service manager stops it (0).
    return 128 + signal.SIGINT if worker.stopped_by == signal.SIGINT else 0


class _Worker(faust.Worker):
    """faust's worker, remembering which signal stopped it (faust stops the same way for both)."""

    stopped_by: signal.Signals | None = None

    def _schedule_shutdown(self, signal_: signal.Signals) -> None:  # mode's one path for SIGINT and SIGTERM
        if self.stopped_by is None:
            self.stopped_by = signal_
        super()._schedule_shutdown(signal_)
