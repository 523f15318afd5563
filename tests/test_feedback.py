"""Only trusted analysts can suppress incidents: signed verdicts, refusals with reasons, the audit trail."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import orjson
import pytest

from gpusentry.config import ConfigError, load_config
from gpusentry.timefmt import format_timestamp
from streams.feedback import (
    FeedbackError,
    Suppressions,
    Verifier,
    feedback_doc,
    feedback_message,
    generate_key,
    load_signing_key,
    parse_feedback,
    sign,
)
from streams.feedback_admin import audit, find_verdict
from tests.streams_helpers import topic_env

HOST = "gpu-node-7"


@pytest.fixture
def soc(tmp_path):
    pem, public = generate_key()
    (tmp_path / "soc-alice.pem").write_bytes(pem)
    return load_signing_key(tmp_path / "soc-alice.pem"), Verifier({"soc-alice": public})


def signed(key, **fields) -> bytes:
    return feedback_message(key, "soc-alice", **fields)


def test_a_signed_verdict_is_accepted_and_names_its_signer(soc):
    key, verifier = soc
    verdict, supp = parse_feedback(signed(key, host=HOST, reason="audit", analyst="alice"), verifier)
    assert verdict == "benign" and supp.signed_by == "soc-alice" and supp.analyst == "alice"
    assert supp.scope == (("host.name", HOST),) and supp.verdict_id


@pytest.mark.parametrize(("tamper", "reason"), [
    (lambda d: d["gpusentry"]["feedback"].pop("signature"), "unsigned"),
    (lambda d: d.__setitem__("host", {"name": "every-other-node"}), "bad_signature"),  # scope widened after signing
    (lambda d: d["gpusentry"]["feedback"].__setitem__("expires", "2999-01-01T00:00:00Z"), "bad_signature"),
    (lambda d: d["gpusentry"]["feedback"]["signature"].__setitem__("key_id", "mallory"), "unknown_key"),
    (lambda d: d["gpusentry"]["feedback"]["signature"].__setitem__("value", "!!"), "bad_signature"),
    (lambda d: d["gpusentry"]["feedback"].__setitem__("signature", "yes"), "bad_signature"),
])
def test_unsigned_altered_or_foreign_verdicts_are_refused_with_a_reason(soc, tamper, reason):
    key, verifier = soc
    doc = orjson.loads(signed(key, host=HOST, reason="audit"))
    tamper(doc)
    with pytest.raises(FeedbackError) as exc:
        parse_feedback(orjson.dumps(doc), verifier)
    assert exc.value.reason == reason


def test_a_key_the_workers_do_not_trust_cannot_sign(soc, tmp_path):
    _, verifier = soc
    pem, _ = generate_key()
    (tmp_path / "rogue.pem").write_bytes(pem)
    rogue = load_signing_key(tmp_path / "rogue.pem")
    with pytest.raises(FeedbackError, match="does not match") as exc:  # claims to be soc-alice
        parse_feedback(signed(rogue, host=HOST), verifier)
    assert exc.value.reason == "bad_signature"


def test_with_no_trusted_keys_every_verdict_is_refused_and_the_fix_is_named(soc):
    key, _ = soc
    with pytest.raises(FeedbackError, match="trusted_keys"):
        parse_feedback(signed(key, host=HOST), Verifier({}))


def test_an_old_signed_verdict_sent_again_cannot_undo_a_later_revoke(soc):
    key, verifier = soc
    old = signed(key, host=HOST, timestamp="2026-11-01T00:00:00.000Z")
    revoke = signed(key, verdict="revoke", host=HOST, timestamp="2026-11-02T00:00:00.000Z")
    supp = Suppressions()
    assert supp.apply(*parse_feedback(old, verifier))
    assert supp.apply(*parse_feedback(revoke, verifier)) and len(supp) == 0
    assert not supp.apply(*parse_feedback(old, verifier)), "a replayed verdict is older than the revoke"
    assert len(supp) == 0


def test_signature_covers_every_field_in_any_key_order(soc):
    key, verifier = soc
    doc = sign(feedback_doc(host=HOST, rule="process.miner_binary", reason="r"), key, "soc-alice")
    reordered = {k: doc[k] for k in reversed(list(doc))}
    parse_feedback(orjson.dumps(reordered), verifier)
    extra = copy.deepcopy(doc)
    extra["process"] = {"executable": "/anything"}  # an added field changes the scope: refused
    with pytest.raises(FeedbackError):
        parse_feedback(orjson.dumps(extra), verifier)


def test_audit_says_what_became_of_each_verdict(soc):
    key, verifier = soc
    now = time.time()
    t = [format_timestamp(now - 3600 * (5 - i)) for i in range(5)]
    records = [
        (0, 0, signed(key, host="a", timestamp=t[0], reason="audit a", analyst="alice", verdict_id="v-a")),
        (0, 1, signed(key, verdict="revoke", host="a", timestamp=t[1], verdict_id="v-a-off")),
        (0, 2, signed(key, host="b", timestamp=t[2], expires=format_timestamp(now - 60), verdict_id="v-b")),
        (1, 0, signed(key, host="c", timestamp=t[3], reason="hashcat", verdict_id="v-c")),
        (1, 1, feedback_message(host="c", timestamp=t[4], verdict_id="v-forged")),
    ]
    rows = {r.verdict_id: r for r in audit(records, verifier, now=now)}
    assert rows["v-a"].state == "revoked" and rows["v-a-off"].state == "revocation"
    assert rows["v-b"].state == "expired" and rows["v-c"].state == "in force"
    assert rows["v-forged"].state.startswith("refused: unsigned")
    assert rows["v-a"].analyst == "alice" and rows["v-a"].reason == "audit a" and rows["v-a"].signed_by == "soc-alice"
    assert find_verdict(list(rows.values()), "v-c").scope == {"host.name": "c"}
    with pytest.raises(FeedbackError, match="no verdict"):
        find_verdict(list(rows.values()), "nope-nope")


def test_trusted_keys_are_validated_at_start_up():
    with pytest.raises(ConfigError, match="trusted_keys.bob"):
        load_config(None, environ={"GPUSENTRY_FEEDBACK__TRUSTED_KEYS": '{"bob" = "not-a-key"}'})


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpusentry.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_keygen_writes_a_private_key_and_prints_the_trusted_keys_line(tmp_path):
    out = tmp_path / "soc-bob.pem"
    r = _cli("feedback", "keygen", "--out", str(out), env={})
    assert r.returncode == 0, r.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith('"soc-bob" = "')
    cfg = load_config(None, environ={"GPUSENTRY_FEEDBACK__TRUSTED_KEYS": "{" + line + "}"})
    assert "soc-bob" in cfg.feedback.trusted_keys
    again = _cli("feedback", "keygen", "--out", str(out), env={})
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_add_without_a_signing_key_names_the_fix(tmp_path):
    r = _cli("feedback", "add", "--host", HOST, "--reason", "audit",
             env={"GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert r.returncode == 1 and "signing_key_file" in r.stderr and "keygen" in r.stderr


@pytest.mark.broker
def test_add_list_revoke_on_the_broker(bootstrap, tmp_path):
    env = topic_env(bootstrap, "feedback-cli")
    key_file = tmp_path / "soc-alice.pem"
    r = _cli("feedback", "keygen", "--out", str(key_file), env={})
    trusted = "{" + r.stdout.strip().splitlines()[-1] + "}"
    env = {**env, "GPUSENTRY_FEEDBACK__SIGNING_KEY_FILE": str(key_file), "GPUSENTRY_FEEDBACK__ANALYST": "alice",
           "GPUSENTRY_FEEDBACK__TRUSTED_KEYS": trusted}
    add = _cli("feedback", "add", "--host", HOST, "--rule", "process.miner_binary", "--reason", "hashcat audit",
               env=env)
    assert add.returncode == 0, add.stderr
    verdict_id = add.stdout.split()[1]
    listed = _cli("feedback", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["verdict_id"], r["state"], r["analyst"], r["reason"]) for r in rows] == [
        (verdict_id, "in force", "alice", "hashcat audit")]
    assert rows[0]["scope"] == {"host.name": HOST, "rule.id": "process.miner_binary"} and rows[0]["expires"]
    revoke = _cli("feedback", "revoke", verdict_id[:8], "--reason", "audit over", env=env)
    assert revoke.returncode == 0, revoke.stderr
    history = [orjson.loads(line) for line in _cli("feedback", "list", "--all", "--json", env=env).stdout.splitlines()]
    assert [r["state"] for r in history] == ["revoked", "revocation"]
    assert _cli("feedback", "list", "--json", env=env).stdout.strip() == ""
