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


def configure(level: str, fmt: str, service: str = "gpusentry") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(EcsJsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
