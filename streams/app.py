"""The faust application: one :class:`WorkerApp` per worker process, built from the configuration.

The app is a thin adapter (after faust's own examples): topics, agents and timers live in their own
small modules and are registered explicitly by :func:`build_app` (the list below is the whole
"autodiscovery"); the agents hand each message to :class:`streams.pipeline.Pipeline`, which hands each
event to the detection engine.  Nothing in :mod:`detectors` imports faust.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, cast

import faust
from faust.sensors import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

from detectors.engine import Engine
from gpusentry.broker import refuse_auto_create
from gpusentry.config import Config
from streams.feedback import Suppressions
from streams.kafka_io import KafkaClients, bootstrap_list
from streams.metrics import WorkerMetrics
from streams.pipeline import Pipeline, Topics

log = logging.getLogger(__name__)

# The fetch wait faust's aiokafka driver hard-codes (1,500 ms) is latency on every quiet partition;
# this transport is faust's own with that one value taken from `worker.fetch_max_wait_ms`.
TRANSPORT_SCHEME = "gpusentry-kafka"
_fetch_max_wait_ms = 100


class _LowLatencyConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = _fetch_max_wait_ms  # read by AIOKafkaConsumer.start()
        return consumer


# The message loop below is a copy of faust-streaming 0.15's with one change; on any other faust release the
# copy could be out of step with faust's internals, so faust's own loop runs there instead.
FAUST_LOOP_COPIED_FROM = "0.15."
_faust_loop_matches = importlib.metadata.version("faust-streaming").startswith(FAUST_LOOP_COPIED_FROM)


class _LowLatencyConsumer(faust_aiokafka.Consumer):
    _producer_threaded: bool | None = None  # app.conf.producer_threaded, read once

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _LowLatencyConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def delivery_cannot_block(self) -> bool:
        """True when faust's delivery of a message (the conductor's callback) finishes without waiting.

        It waits only while flow control is suspended (a rebalance), faust's producer buffer is over its
        limit, or a stream's buffer is full.
        """
        if self.suspend_flow.is_set():
            return False
        app = self.app
        if not app.flow_control.is_active():
            return False
        # faust's ProducerBuffer.size reads a setting on every call; which queue it counts is fixed.
        if self._producer_threaded is None:
            self._producer_threaded = bool(app.conf.producer_threaded)
        buffer: Any = app.producer.buffer
        queue = buffer.queue if self._producer_threaded else buffer.pending
        if queue and queue.qsize() > buffer.max_messages:
            return False
        return not any(chan.queue.full() for chan in cast(Any, app.topics)._topics)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - the consumer's own loop
        """faust's ``Consumer._drain_messages`` (faust-streaming 0.15) with a fast path for each message.

        faust delivers every message as ``wait_first(callback(message), suspend_flow.wait())``: two tasks
        and an ``asyncio.wait`` per message, so that a rebalance can abandon a delivery that blocks.  A
        delivery blocks only while flow control is suspended, the producer buffer is over its limit or a
        stream's buffer is full; when none of these holds, the callback finishes without waiting, and it
        is awaited directly.  Otherwise (and so during every rebalance) faust's own path is taken.
        """
        if not _faust_loop_matches:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Any, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        cannot_block = self.delivery_cannot_block
        yield_every, since_yield = 100, 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(Any, getmany(timeout=1.0))
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        since_yield += 1
                        if since_yield > yield_every:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if cannot_block():
                                await callback(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class LowLatencyTransport(faust_aiokafka.Transport):
    Consumer = _LowLatencyConsumer


TRANSPORTS.aliases[TRANSPORT_SCHEME] = f"{__name__}:LowLatencyTransport"


class LeanMonitor(Monitor):
    """faust's Monitor without its per-message bookkeeping (timings, deques, counters per event).

    The worker exports its own Prometheus metrics; faust's per-message statistics cost about as much
    as the rest of faust's per-message path and nobody reads them with the web server off.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> dict | None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: dict | None = None) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None


def broker_credentials(cfg: Config) -> Any:
    """faust credentials from the shared [kafka] settings (the agent and forwarder read the same)."""
    conf = cfg.kafka.aiokafka_config()
    if cfg.kafka.sasl_mechanism:
        return faust.SASLCredentials(username=conf["sasl_plain_username"], password=conf["sasl_plain_password"],
                                     ssl_context=conf.get("ssl_context"), mechanism=cfg.kafka.sasl_mechanism)
    if "ssl_context" in conf:
        return faust.SSLCredentials(conf["ssl_context"])
    return None


@dataclass
class WorkerApp:
    app: faust.App
    pipeline: Pipeline
    clients: KafkaClients
    metrics: WorkerMetrics
    suppressions: Suppressions
    cfg: Config


def build_app(cfg: Config, *, engine: Engine | None = None, metrics: WorkerMetrics | None = None) -> WorkerApp:
    global _fetch_max_wait_ms
    refuse_auto_create()  # faust's consumer and the worker's own clients: a missing topic stays missing
    if not cfg.kafka.bootstrap_servers:
        raise ValueError("kafka.bootstrap_servers is empty; set it (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS=host:9092) "
                         "or use `gpusentry up`, which starts the embedded broker")
    _fetch_max_wait_ms = cfg.worker.fetch_max_wait_ms
    w = cfg.worker
    app = faust.App(
        w.app_id,
        broker=[f"{TRANSPORT_SCHEME}://{s}" for s in bootstrap_list(cfg)],
        broker_credentials=broker_credentials(cfg),
        broker_client_id=f"{cfg.kafka.client_id}-worker",
        broker_session_timeout=w.session_timeout_s,
        broker_heartbeat_interval=min(3.0, w.session_timeout_s / 5),
        broker_request_timeout=max(40.0, w.session_timeout_s * 2),
        # Offsets are committed as soon as the pipeline acknowledges messages (after a checkpoint).
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        # Messages are acknowledged after the checkpoint that covers them, so faust must not wait for
        # every message to be acknowledged before it lets a rebalance go on.
        stream_wait_empty=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=w.web_enabled,
        web_host=w.web_host,
        web_port=w.web_port,
        web_bind=w.web_host,
        datadir=w.data_dir or tempfile.mkdtemp(prefix="gpusentry-worker-"),
        producer_max_request_size=cfg.contract.max_message_bytes + 65536,
        consumer_max_fetch_size=max(cfg.contract.max_message_bytes * 2, 1_048_576),
        logging_config=None,
        Monitor=LeanMonitor,
    )
    metrics = metrics or WorkerMetrics()
    suppressions = Suppressions()
    clients = KafkaClients(cfg)
    t = cfg.topics
    pipeline = Pipeline(engine or Engine.from_config(cfg, clock=time.time), clients,
                        Topics(events=tuple(t.event_topics().values()), alerts=t.alerts, deadletter=t.deadletter,
                               feedback=t.feedback),
                        max_message_bytes=cfg.contract.max_message_bytes,
                        checkpoint_interval_s=w.checkpoint_interval_s, metrics=metrics, suppressions=suppressions,
                        worker_id=w.app_id, snapshot_cpu_share=w.snapshot_cpu_share,
                        checkpoint_max_bytes=w.checkpoint_max_bytes, reorder_hold_s=w.reorder_hold_s)
    worker_app = WorkerApp(app, pipeline, clients, metrics, suppressions, cfg)
    # Explicit registration, in this order: topics, agents, timers.
    from streams import agents, timers, topics

    event_topic = topics.register(worker_app)
    agents.register(worker_app, event_topic)
    timers.register(worker_app)
    return worker_app
