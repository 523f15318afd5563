"""Analyst feedback: signed, scoped suppressions read from the feedback topic by every worker.

A feedback message (value: one JSON object, key: the incident's dedup key or anything) says an incident
is benign and how widely to believe it:

    {"@timestamp": "2026-11-29T21:35:00.000Z",
     "gpusentry": {"feedback": {"id": "6f1c…", "verdict": "benign", "expires": "2026-12-06T00:00:00.000Z",
                                "dedup_key": "gpusentry-gpu-node-7-…", "reason": "nightly hashcat audit",
                                "signature": {"alg": "ed25519", "key_id": "soc-alice", "value": "…"}}},
     "host": {"name": "gpu-node-7"}, "process": {"executable": "/opt/audit/hashcat"},
     "rule": {"id": "process.miner_binary"}, "user": {"name": "alice@example.com"}}

**Who may suppress.** Anyone who can write the feedback topic could silence incidents, and every GPU
node holds Kafka credentials. So a verdict counts only when it is signed (Ed25519, over the message
with its ``signature`` removed, keys sorted: :func:`canonical_bytes`) by a key in the workers'
``[feedback] trusted_keys``. Workers hold public keys only; the signing keys stay with the analysts
(``gpusentry feedback keygen``). An unsigned, unknown-key or forged verdict is dead-lettered with the
reason and counted. The topic itself is the audit record: who (``user.name`` and the key), when
(``@timestamp``), why (``reason``), scope and expiry, kept for ever (``gpusentry feedback list``).

**Scope.** Every one of ``host.name``, ``process.executable``, ``rule.id`` and
``gpusentry.feedback.dedup_key`` that is given (at least one must be); an incident update matching the
whole scope before ``expires`` (compared with the update's own ``@timestamp``, so replays agree) is not
published. ``verdict: "revoke"`` lifts earlier suppressions of exactly that scope. For each scope the
newest signed verdict wins, so re-sending an old signed verdict cannot undo a later revoke. This is a
filter on publication only: detection and the incident's state go on, so an expired suppression lets
the next update through.
"""

from __future__ import annotations

import base64
import binascii
import copy
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpusentry.contract import get
from gpusentry.timefmt import format_timestamp, parse_timestamp

VERDICTS = ("benign", "revoke")
SCOPE_FIELDS = ("host.name", "process.executable", "rule.id", "gpusentry.feedback.dedup_key")


SIGNATURE_ALG = "ed25519"


class FeedbackError(ValueError):
    """A feedback message that cannot be understood or is not authorised; the message says what was expected."""

    def __init__(self, message: str, reason: str = "bad_feedback") -> None:
        super().__init__(message)
        self.reason = reason  # bad_feedback | unsigned | unknown_key | bad_signature


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """What a signature covers: the message without its signature, keys sorted, compact JSON."""
    body = copy.deepcopy(dict(doc))
    fb = body.get("gpusentry", {}).get("feedback") if isinstance(body.get("gpusentry"), dict) else None
    if isinstance(fb, dict):
        fb.pop("signature", None)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def generate_key() -> tuple[bytes, str]:
    """A new signing key as PEM (PKCS#8) and its public key as base64 (for ``trusted_keys``)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, public_key_b64(key)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise FeedbackError(f"cannot read the signing key {path}: {exc}; make one with `gpusentry feedback keygen "
                            f"--out {path}`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FeedbackError(f"{path} is not an Ed25519 key; make one with `gpusentry feedback keygen`")
    return key


def sign(doc: dict[str, Any], key: Ed25519PrivateKey, key_id: str) -> dict[str, Any]:
    """``doc`` with its signature set (in place, and returned)."""
    fb = doc.setdefault("gpusentry", {}).setdefault("feedback", {})
    fb.pop("signature", None)
    value = base64.b64encode(key.sign(canonical_bytes(doc))).decode()
    fb["signature"] = {"alg": SIGNATURE_ALG, "key_id": key_id, "value": value}
    return doc


class Verifier:
    """Checks a verdict's signature against the trusted public keys (``[feedback] trusted_keys``)."""

    def __init__(self, trusted_keys: Mapping[str, str], *, require_signature: bool = True) -> None:
        self.keys = {kid: Ed25519PublicKey.from_public_bytes(base64.b64decode(v)) for kid, v in trusted_keys.items()}
        self.require_signature = require_signature

    @classmethod
    def from_settings(cls, settings: Any) -> Verifier:
        return cls(settings.trusted_keys, require_signature=settings.require_signature)

    def check(self, doc: Mapping[str, Any]) -> str | None:
        """The key id that signed ``doc`` (None when signatures are not required and it has none)."""
        sig = get(doc, "gpusentry.feedback.signature")
        if sig is None:
            if not self.require_signature:
                return None
            raise FeedbackError("verdict is not signed; write verdicts with `gpusentry feedback add` (it signs "
                                "them with your key from `gpusentry feedback keygen`)", "unsigned")
        if not isinstance(sig, dict) or sig.get("alg") != SIGNATURE_ALG or not isinstance(sig.get("value"), str):
            raise FeedbackError(f"gpusentry.feedback.signature must be {{alg: {SIGNATURE_ALG}, key_id, value}}",
                                "bad_signature")
        key_id = sig.get("key_id")
        key = self.keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            known = ", ".join(sorted(self.keys)) or "none"
            raise FeedbackError(f"verdict signed by key {key_id!r}, which is not in [feedback] trusted_keys "
                                f"(trusted: {known}); add the analyst's public key there", "unknown_key")
        try:
            key.verify(base64.b64decode(sig["value"], validate=True), canonical_bytes(doc))
        except (InvalidSignature, binascii.Error, ValueError):
            raise FeedbackError(f"signature by {key_id!r} does not match the verdict (altered or forged)",
                                "bad_signature") from None
        return key_id


@dataclass(frozen=True, slots=True)
class Suppression:
    scope: tuple[tuple[str, str], ...]  # (field, value) pairs, sorted
    expires: float | None  # epoch seconds; None = until revoked
    reason: str = ""
    analyst: str = ""
    issued: float = 0.0  # the verdict's signed @timestamp: the newest verdict for a scope wins
    verdict_id: str = ""
    signed_by: str | None = None  # trusted key id

    def matches(self, alert: dict[str, Any], at: float) -> bool:
        if self.expires is not None and at >= self.expires:
            return False
        for path, value in self.scope:
            if path == "rule.id":
                rules = get(alert, "gpusentry.alert.rules") or []
                if value != get(alert, "rule.id") and value not in rules:
                    return False
            elif path == "gpusentry.feedback.dedup_key":
                if value != get(alert, "gpusentry.alert.dedup_key"):
                    return False
            elif get(alert, path) != value:
                return False
        return True


def parse_feedback(value: bytes | None, verifier: Verifier) -> tuple[str, Suppression]:
    """(verdict, suppression) from one feedback message, or :class:`FeedbackError` (with its reason)."""
    doc = decode_feedback(value)
    signed_by = verifier.check(doc)
    return _verdict(doc, signed_by)


def decode_feedback(value: bytes | None) -> dict[str, Any]:
    if not value:
        raise FeedbackError("feedback message has no value; expected a JSON object")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise FeedbackError(f"feedback is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FeedbackError("feedback must be a JSON object")
    return doc


def _verdict(doc: dict[str, Any], signed_by: str | None) -> tuple[str, Suppression]:
    verdict = get(doc, "gpusentry.feedback.verdict")
    if verdict not in VERDICTS:
        raise FeedbackError(f"gpusentry.feedback.verdict is {verdict!r}; expected one of {list(VERDICTS)}")
    scope = []
    for path in SCOPE_FIELDS:
        v = get(doc, path)
        if v is None:
            v = doc.get(path)  # a flat dotted key is accepted too
        if v is not None:
            if not isinstance(v, str) or not v:
                raise FeedbackError(f"{path} must be a non-empty string")
            scope.append((path, v))
    if not scope:
        raise FeedbackError(f"feedback needs a scope: at least one of {', '.join(SCOPE_FIELDS)}")
    expires_raw = get(doc, "gpusentry.feedback.expires")
    expires = None
    if expires_raw is not None:
        try:
            expires = parse_timestamp(expires_raw)
        except (ValueError, TypeError) as exc:
            raise FeedbackError(f"gpusentry.feedback.expires: {exc}; expected RFC 3339") from None
    try:
        issued = parse_timestamp(str(doc.get("@timestamp")))
    except (ValueError, TypeError) as exc:
        raise FeedbackError(f"@timestamp: {exc}; expected RFC 3339 (when the verdict was made)") from None
    return verdict, Suppression(tuple(sorted(scope)), expires, str(get(doc, "gpusentry.feedback.reason") or ""),
                                str(get(doc, "user.name") or ""), issued, str(get(doc, "gpusentry.feedback.id") or ""),
                                signed_by)


class Suppressions:
    """The suppressions in force, built from the whole feedback topic."""

    def __init__(self) -> None:
        self._by_scope: dict[tuple[tuple[str, str], ...], Suppression] = {}
        self._newest: dict[tuple[tuple[str, str], ...], float] = {}  # scope -> issue time of its newest verdict

    def apply(self, verdict: str, suppression: Suppression) -> bool:
        """Apply one verdict; False (ignored) when a newer verdict for the same scope was already applied."""
        if suppression.issued < self._newest.get(suppression.scope, float("-inf")):
            return False
        self._newest[suppression.scope] = suppression.issued
        if verdict == "revoke":
            self._by_scope.pop(suppression.scope, None)
        else:
            self._by_scope[suppression.scope] = suppression
        return True

    def matching(self, alert: dict[str, Any], at: float) -> Suppression | None:
        for s in self._by_scope.values():
            if s.matches(alert, at):
                return s
        return None

    def __len__(self) -> int:
        return len(self._by_scope)


def feedback_doc(*, verdict: str = "benign", host: str | None = None, executable: str | None = None,
                 rule: str | None = None, dedup_key: str | None = None, expires: str | None = None,
                 reason: str = "", analyst: str = "", timestamp: str | None = None,
                 verdict_id: str | None = None) -> dict[str, Any]:
    """An unsigned verdict (sign it with :func:`sign`)."""
    doc: dict[str, Any] = {"@timestamp": timestamp or format_timestamp(time.time()),
                           "gpusentry": {"feedback": {"id": verdict_id or uuid.uuid4().hex, "verdict": verdict,
                                                      "reason": reason}}}
    if expires:
        doc["gpusentry"]["feedback"]["expires"] = expires
    if dedup_key:
        doc["gpusentry"]["feedback"]["dedup_key"] = dedup_key
    if host:
        doc["host"] = {"name": host}
    if executable:
        doc["process"] = {"executable": executable}
    if rule:
        doc["rule"] = {"id": rule}
    if analyst:
        doc["user"] = {"name": analyst}
    return doc


def feedback_message(key: Ed25519PrivateKey | None = None, key_id: str = "", **fields: Any) -> bytes:
    """A feedback message value, signed when ``key`` is given (for tools and tests)."""
    doc = feedback_doc(**fields)
    if key is not None:
        sign(doc, key, key_id)
    return orjson.dumps(doc)
