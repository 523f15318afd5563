"""Log records as text for people, or as one ECS JSON object per line for log shippers (`logging.format`)."""

from __future__ import annotations

import logging
import sys

import orjson

from gpusentry import __version__
from gpusentry.timefmt import format_timestamp


class EcsJsonFormatter(logging.Formatter):
    """One valid JSON object per record, with ECS field names (`@timestamp`, `log.level`, `log.logger`,
    `message`, `error.*`, `process.pid`, `service.*`): the message is whatever the record says, escaped by the
    JSON encoder, so a host's command line in a log message cannot break the line or forge fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "@timestamp": format_timestamp(record.created), "log.level": record.levelname.lower(),
            "log.logger": record.name, "message": record.getMessage(), "ecs.version": "8.11.0",
            "process.pid": record.process, "process.thread.name": record.threadName,
            "service.name": self.service, "service.version": __version__,
        }
        if record.exc_info:
            exc_type, exc, _ = record.exc_info
            doc["error.type"] = exc_type.__name__ if exc_type else "Exception"
            doc["error.message"] = str(exc)
            doc["error.stack_trace"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class RepeatFilter(logging.Filter):
    """Say a Kafka client's complaint (and the agent's Kafka sink's) once per ``window_s``, not once per retry.

    While a broker is away, aiokafka (and librdkafka, whose lines confluent-kafka hands to the `librdkafka` logger
    instead of printing them) logs every failed connect, metadata update, fetch and heartbeat: hundreds of
    ERROR lines a minute that bury the one line that matters.  A record of a client logger whose message template
    was already shown in the last ``window_s`` is counted instead; the next one shown after the window says how
    many were held back.  Other loggers, and the clients' INFO lines, pass untouched."""

    def __init__(self, prefixes: tuple[str, ...] = ("aiokafka", "librdkafka", "agents.sinks"),
                 window_s: float = 60.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.window_s = window_s
        self._shown: dict[tuple[str, int, str], tuple[float, int]] = {}  # key -> (shown at, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(self.prefixes):
            return True  # the clients' INFO lines (joins, assignments) are the story of a rebalance: keep them
        # librdkafka (through confluent-kafka's `logger` setting) logs every line with one template, "%s [%s] %s":
        # its facility (FAIL, REQTMOUT, ...) is what tells one complaint from another.
        facility = str(record.args[0]) if record.name == "librdkafka" and isinstance(record.args, tuple) \
            and record.args else ""
        key = (record.name, record.levelno, str(record.msg) + facility)
        shown = self._shown.get(key)
        if shown is not None and record.created - shown[0] < self.window_s:
            self._shown[key] = (shown[0], shown[1] + 1)
            return False
        if shown is not None and shown[1]:
            record.msg = f"{record.msg} ({shown[1]} more like this in the last {self.window_s:.0f} s held back)"
        self._shown[key] = (record.created, 0)
        if len(self._shown) > 1024:  # templates, not messages: this stays small; bound it anyway
            self._shown.pop(next(iter(self._shown)))
        return True


def configure(level: str, fmt: str, service: str = "gpusentry") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    if fmt == "json":
        handler.setFormatter(EcsJsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
