"""``gpusentry feedback``: write signed verdicts to the feedback topic and read its audit trail.

Nobody hand-writes JSON to Kafka: ``add`` builds, signs and publishes a verdict; ``revoke`` publishes the
signed revocation of one (found by its id); ``list`` reads the whole topic and says, for each verdict,
who made it, when, why, its scope and expiry, which key signed it and what became of it (in force,
expired, revoked, superseded, or refused and why) — the same judgement the workers make.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gpusentry.config import Config
from gpusentry.contract import get
from gpusentry.timefmt import format_timestamp
from streams.feedback import (
    FeedbackError,
    Suppressions,
    Verifier,
    decode_feedback,
    feedback_doc,
    load_signing_key,
    parse_feedback,
    sign,
)


@dataclass(frozen=True)
class AuditRow:
    partition: int
    offset: int
    verdict_id: str
    timestamp: str
    verdict: str
    analyst: str
    signed_by: str
    scope: dict[str, str]
    reason: str
    expires: str
    state: str  # in force | expired | revoked | revocation | superseded | refused: <reason>

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _producer_config(cfg: Config) -> dict[str, Any]:
    if not cfg.kafka.bootstrap_servers:
        raise FeedbackError("kafka.bootstrap_servers is empty; set it (GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS=host:9092)")
    return {**cfg.kafka.confluent_config(), "log.connection.close": False}


def signed_verdict(cfg: Config, *, verdict: str, scope: Mapping[str, str | None], reason: str,
                   expires: str | None, now: float | None = None) -> dict[str, Any]:
    """A verdict signed with ``[feedback] signing_key_file``, ready to publish."""
    fb = cfg.feedback
    if fb.signing_key_file is None:
        raise FeedbackError("no signing key: set [feedback] signing_key_file (GPUSENTRY_FEEDBACK__SIGNING_KEY_FILE) "
                            "to the key `gpusentry feedback keygen --out FILE` wrote")
    key = load_signing_key(fb.signing_key_file)
    key_id = fb.signing_key_id or Path(fb.signing_key_file).stem
    analyst = fb.analyst or os.environ.get("USER") or getpass.getuser()
    doc = feedback_doc(verdict=verdict, host=scope.get("host.name"), executable=scope.get("process.executable"),
                       rule=scope.get("rule.id"), dedup_key=scope.get("gpusentry.feedback.dedup_key"),
                       expires=expires, reason=reason, analyst=analyst,
                       timestamp=format_timestamp(time.time() if now is None else now))
    return sign(doc, key, key_id)


def publish(cfg: Config, doc: dict[str, Any], *, timeout_s: float = 15.0) -> None:
    from confluent_kafka import KafkaException, Producer

    producer = Producer({**_producer_config(cfg), "enable.idempotence": True, "acks": "all"})
    errors: list[str] = []
    key = get(doc, "gpusentry.feedback.dedup_key") or get(doc, "gpusentry.feedback.id")
    try:
        producer.produce(cfg.topics.feedback, orjson.dumps(doc), key=str(key).encode(),
                         on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
    except KafkaException as exc:
        raise FeedbackError(f"cannot write to {cfg.topics.feedback}: {exc}") from None
    left = producer.flush(timeout_s)
    if left or errors:
        raise FeedbackError(f"the verdict was not written to {cfg.topics.feedback} at {cfg.kafka.bootstrap_servers}"
                            f" ({'; '.join(errors) or 'no answer in time'}); check that the broker is up and that "
                            f"your principal may write that topic")


def read_feedback_topic(cfg: Config, *, timeout_s: float = 15.0) -> list[tuple[int, int, bytes | None]]:
    """Every record of the feedback topic, in partition and offset order."""
    from gpusentry.topic_range import TopicReadError, read_range

    try:
        records = [(p, off, value) for p, off, _ts, value in read_range(cfg, cfg.topics.feedback, timeout_s=timeout_s)]
    except TopicReadError as exc:
        raise FeedbackError(str(exc)) from None
    return sorted(records, key=lambda r: (r[0], r[1]))


def audit(records: list[tuple[int, int, bytes | None]], verifier: Verifier, *, now: float) -> list[AuditRow]:
    """Judge every record as the workers do (signature, newest verdict per scope), in time order."""
    rows: list[AuditRow] = []
    parsed: list[tuple[int, int, str, Any, dict[str, Any]]] = []
    for partition, offset, value in records:
        try:
            verdict, supp = parse_feedback(value, verifier)
        except FeedbackError as exc:
            # The row records the refusal; an undecodable record shows as an empty one.
            doc: dict[str, Any] = {}
            with contextlib.suppress(FeedbackError):
                doc = decode_feedback(value)
            rows.append(_row(partition, offset, doc, f"refused: {exc.reason} ({exc})"))
            continue
        parsed.append((partition, offset, verdict, supp, decode_feedback(value)))
    parsed.sort(key=lambda r: r[3].issued)
    state = Suppressions()
    latest: dict[Any, int] = {}
    for i, (_p, _o, verdict, supp, _doc) in enumerate(parsed):
        if state.apply(verdict, supp):
            latest[supp.scope] = i
    for i, (partition, offset, verdict, supp, doc) in enumerate(parsed):
        if latest.get(supp.scope) != i:
            later = [parsed[j][2] for j in range(i + 1, len(parsed)) if parsed[j][3].scope == supp.scope]
            what = "revoked" if verdict == "benign" and "revoke" in later else "superseded"
        elif verdict == "revoke":
            what = "revocation"
        elif supp.expires is not None and supp.expires <= now:
            what = "expired"
        else:
            what = "in force"
        rows.append(_row(partition, offset, doc, what, signed_by=supp.signed_by or "unsigned"))
    return sorted(rows, key=lambda r: (r.timestamp, r.partition, r.offset))


def _row(partition: int, offset: int, doc: dict[str, Any], state: str, signed_by: str = "") -> AuditRow:
    scope = {}
    for path in ("host.name", "process.executable", "rule.id", "gpusentry.feedback.dedup_key"):
        v = get(doc, path)
        if v is not None:
            scope[path.removeprefix("gpusentry.feedback.")] = str(v)
    sig = get(doc, "gpusentry.feedback.signature")
    return AuditRow(partition, offset, str(get(doc, "gpusentry.feedback.id") or ""), str(doc.get("@timestamp") or ""),
                    str(get(doc, "gpusentry.feedback.verdict") or ""), str(get(doc, "user.name") or ""),
                    signed_by or (str(sig.get("key_id")) if isinstance(sig, dict) else "unsigned"), scope,
                    str(get(doc, "gpusentry.feedback.reason") or ""), str(get(doc, "gpusentry.feedback.expires") or ""),
                    state)


def find_verdict(rows: list[AuditRow], verdict_id: str) -> AuditRow:
    matches = [r for r in rows if r.verdict_id == verdict_id or (len(verdict_id) >= 6
                                                                and r.verdict_id.startswith(verdict_id))]
    if not matches:
        raise FeedbackError(f"no verdict with id {verdict_id!r} on the feedback topic; `gpusentry feedback list` "
                            f"shows the ids")
    if len({r.verdict_id for r in matches}) > 1:
        raise FeedbackError(f"id {verdict_id!r} is ambiguous; give more of it")
    return matches[0]
