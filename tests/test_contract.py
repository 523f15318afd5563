"""Event contract v1: builders, round trips, dotted keys, and every way a message can be bad."""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusentry import contract as c
from gpusentry.timefmt import format_timestamp, parse_timestamp

T0 = 1_790_000_000.123


def sample_events() -> list[dict]:
    return [
        c.gpu_event("gpu-node-1", T0, index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", gpu_pct=97.0,
                    memory_pct=35.5, memory_used_bytes=5 << 30, memory_total_bytes=80 << 30,
                    power_draw_watts=410.2, power_limit_watts=700.0, temperature_c=61, sm_clock_mhz=1980,
                    mem_clock_mhz=2619, pcie_rx_bytes_per_s=1200, pcie_tx_bytes_per_s=800,
                    processes=[{"pid": 4242, "used_memory_bytes": 5 << 30, "sm_pct": 96, "name": "python3",
                                "executable": "/usr/bin/python3", "command_line": "python3 train.py"}]),
        c.gpu_event("gpu-node-1", T0, index=1, uuid="GPU-bbbb", name=None),
        c.process_event("gpu-node-1", T0, action="start", pid=77, name="xmrig", executable="/tmp/.x/xmrig",
                        command_line="/tmp/.x/xmrig -o stratum+tcp://pool:3333", args=["/tmp/.x/xmrig", "-o",
                        "stratum+tcp://pool:3333"], working_directory="/tmp", start=T0 - 1, parent_pid=1,
                        parent_name="bash", user_name="ray", container_id="abc123", sha256="00" * 32),
        c.process_event("gpu-node-1", T0, action="end", pid=77, name="xmrig"),
        c.network_event("gpu-node-1", T0, source_ip="10.0.0.5", source_port=50000, destination_ip="1.2.3.4",
                        destination_port=443, pid=77, process_name="xmrig", destination_domain="pool.example",
                        server_name="pool.example", payload_b64="eyJpZCI6MX0K"),
        c.dns_event("gpu-node-1", T0, question="pool.example", resolved_ips=["1.2.3.4"], pid=12,
                    process_name="systemd-resolved"),
    ]


def test_builders_produce_valid_events_that_round_trip():
    events = sample_events()
    for ev in events:
        assert c.validate_event(ev) == ev
    decoded = c.decode_message(c.encode(events), key="gpu-node-1")
    assert decoded.rejects == []
    assert decoded.events == events


def test_single_object_message_and_common_fields():
    ev = sample_events()[0]
    decoded = c.decode_message(c.encode(ev))
    assert decoded.events == [ev]
    assert ev["@timestamp"] == "2026-09-21T14:13:20.123Z"
    assert ev["ecs"]["version"] == c.ECS_VERSION
    assert ev["event"]["kind"] == "metric" and ev["event"]["dataset"] == "gpusentry.gpu"
    assert ev["agent"] == {"type": "gpusentry", "version": ev["agent"]["version"]}
    assert c.get(ev, "gpu.utilization.gpu_pct") == 97.0
    assert c.get(ev, "gpu.nope.x", "d") == "d"
    assert c.event_time(ev) == pytest.approx(T0, abs=1e-3)


def test_event_ids_are_unique():
    ids = {c.make_event(c.Dataset.DNS, "h", T0)["event"]["id"] for _ in range(1000)}
    assert len(ids) == 1000


def test_unreported_hardware_values_are_null_not_missing():
    ev = sample_events()[1]
    assert ev["gpu"]["power"]["draw_watts"] is None
    assert "draw_watts" in ev["gpu"]["power"]


def test_dotted_keys_are_accepted_and_expanded():
    nested = sample_events()[4]
    flat = {"@timestamp": nested["@timestamp"]}

    def flatten(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                flatten(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v

    flatten("", {k: v for k, v in nested.items() if k != "@timestamp"})
    assert "destination.ip" in flat
    result = c.validate_event(flat)
    assert result == nested
    # Mixed: a nested object that itself has dotted keys.
    mixed = copy.deepcopy(nested)
    mixed["destination"] = {"ip": "1.2.3.4", "port": 443, "domain": "pool.example"}
    del mixed["tls"]
    mixed["tls.client.server_name"] = "pool.example"
    assert c.validate_event(mixed) == nested


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda e: e.pop("@timestamp"), c.RejectCode.MISSING_FIELD, "@timestamp"),
        (lambda e: e.__setitem__("@timestamp", "yesterday"), c.RejectCode.BAD_VALUE, "RFC 3339"),
        (lambda e: e.__setitem__("@timestamp", "2026-01-01T00:00:00"), c.RejectCode.BAD_VALUE, "UTC"),
        (lambda e: e["host"].pop("name"), c.RejectCode.MISSING_FIELD, "host.name"),
        (lambda e: e["host"].__setitem__("name", ""), c.RejectCode.BAD_VALUE, "host.name"),
        (lambda e: e["host"].__setitem__("name", 5), c.RejectCode.WRONG_TYPE, "host.name"),
        (lambda e: e["event"].__setitem__("dataset", "x.y"), c.RejectCode.BAD_VALUE, "event.dataset"),
        (lambda e: e["event"].__setitem__("kind", "event"), c.RejectCode.BAD_VALUE, "event.kind"),
        (lambda e: e["event"].__setitem__("category", "host"), c.RejectCode.WRONG_TYPE, "event.category"),
        (lambda e: e["gpu"].pop("index"), c.RejectCode.MISSING_FIELD, "gpu.index"),
        (lambda e: e["gpu"].__setitem__("index", True), c.RejectCode.WRONG_TYPE, "gpu.index"),
        (lambda e: e["gpu"].__setitem__("index", None), c.RejectCode.WRONG_TYPE, "gpu.index"),
        (lambda e: e["gpu"]["utilization"].__setitem__("gpu_pct", "97"), c.RejectCode.WRONG_TYPE, "gpu_pct"),
        (lambda e: e["gpu"].__setitem__("processes", [{"pid": "1"}]), c.RejectCode.WRONG_TYPE, "processes[0]"),
        (lambda e: e["gpu"].__setitem__("processes", [7]), c.RejectCode.WRONG_TYPE, "processes[0]"),
    ],
)
def test_bad_gpu_events_are_rejected_with_a_reason(mutate, code, needle):
    ev = copy.deepcopy(sample_events()[0])
    mutate(ev)
    result = c.validate_event(ev)
    assert isinstance(result, c.Reject), result
    assert result.code == code
    assert needle in result.reason
    with pytest.raises(c.ContractError) as info:
        c.validate_or_raise(ev)
    assert info.value.reject == result


@pytest.mark.parametrize(
    ("index", "mutate", "needle"),
    [
        (2, lambda e: e["event"].__setitem__("type", ["change"]), "event.type"),
        (2, lambda e: e["process"].__setitem__("pid", 1.5), "process.pid"),
        (2, lambda e: e["process"].pop("name"), "process.name"),
        (4, lambda e: e["network"].__setitem__("transport", "sctp"), "network.transport"),
        (4, lambda e: e["destination"].__setitem__("port", "443"), "destination.port"),
        (4, lambda e: e["gpusentry"]["flow"].__setitem__("payload_b64", "A" * 700), "512 bytes"),
        (5, lambda e: e["dns"].__setitem__("resolved_ip", [1]), "dns.resolved_ip"),
        (5, lambda e: e["dns"]["question"].pop("name"), "dns.question.name"),
    ],
)
def test_bad_events_of_other_datasets_are_rejected(index, mutate, needle):
    ev = copy.deepcopy(sample_events()[index])
    mutate(ev)
    result = c.validate_event(ev)
    assert isinstance(result, c.Reject)
    assert needle in result.reason


def test_alert_dataset_rules():
    alert = c.make_event(c.Dataset.ALERT, "h", T0, {
        "rule.id": "x", "rule.name": "X", "event.severity": 80, "gpusentry.alert.severity": "high",
        "gpusentry.alert.dedup_key": "k", "gpusentry.alert.status": "open", "message": "m"})
    assert c.validate_event(alert) == alert
    alert["event"]["severity"] = 101
    assert "between 0 and 100" in str(c.validate_event(alert))
    alert["event"]["severity"] = 80
    alert["gpusentry"]["alert"]["severity"] = "severe"
    assert "expected one of" in str(c.validate_event(alert))


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"not json", c.RejectCode.NOT_JSON),
        (b'{"truncated": ', c.RejectCode.NOT_JSON),
        (b"\xff\xfe", c.RejectCode.NOT_JSON),
        (b"42", c.RejectCode.NOT_OBJECT),
        (b'"string"', c.RejectCode.NOT_OBJECT),
        (b"null", c.RejectCode.NOT_OBJECT),
        (None, c.RejectCode.NOT_JSON),
        (b"[" + b" " * 2_000_000 + b"]", c.RejectCode.OVERSIZE),
    ],
)
def test_bad_messages_are_rejected_whole(value, code):
    decoded = c.decode_message(value)
    assert decoded.events == []
    assert [r.code for r in decoded.rejects] == [code]
    assert decoded.rejects[0].index is None


def test_bad_event_in_a_batch_is_rejected_alone():
    good = sample_events()
    batch = [good[0], {"not": "an event"}, 17, good[1]]
    decoded = c.decode_message(orjson.dumps(batch), key=b"gpu-node-1")
    assert decoded.events == [good[0], good[1]]
    assert [(r.index, r.code) for r in decoded.rejects] == [
        (1, c.RejectCode.MISSING_FIELD), (2, c.RejectCode.NOT_OBJECT)]
    assert str(decoded.rejects[0]).startswith("event 1: ")


def test_events_keyed_to_another_host_are_rejected():
    other = c.dns_event("other-host", T0, question="a.example", resolved_ips=[])
    decoded = c.decode_message(c.encode([sample_events()[5], other]), key="gpu-node-1")
    assert len(decoded.events) == 1
    assert decoded.rejects[0].code == c.RejectCode.HOST_MISMATCH
    assert "key messages by host.name" in decoded.rejects[0].reason


def test_size_cap_is_configurable():
    value = c.encode(sample_events())
    assert c.decode_message(value, max_bytes=len(value)).rejects == []
    assert c.decode_message(value, max_bytes=len(value) - 1).rejects[0].code == c.RejectCode.OVERSIZE


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("1970-01-01T00:00:00.000Z", 0.0),
        ("2026-11-29T21:35:00.250Z", 1795988100.25),
        ("2026-11-29T21:35:00Z", 1795988100.0),
        ("2026-11-29T22:35:00.250+01:00", 1795988100.25),
    ],
)
def test_timestamps(text, epoch):
    assert parse_timestamp(text) == pytest.approx(epoch)


def test_timestamp_format_is_canonical():
    assert format_timestamp(1795988100.2506) == "2026-11-29T21:35:00.251Z"
    assert format_timestamp(0.9999) == "1970-01-01T00:00:01.000Z"
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_timestamp("2026-13-01T00:00:00Z")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_raises_on_arbitrary_bytes(data):
    decoded = c.decode_message(data)
    assert len(decoded.events) + len(decoded.rejects) >= 1 or data.strip() in (b"[]",)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_decoder_never_raises_on_arbitrary_json(value):
    c.decode_message(orjson.dumps(value))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(range(6)), st.sampled_from(["event", "host", "gpu", "process", "destination", "dns"]),
       json_values)
def test_validator_never_raises_on_corrupted_events(index, section, junk):
    ev = copy.deepcopy(sample_events()[index])
    ev[section] = junk
    result = c.validate_event(ev)
    assert isinstance(result, (dict, c.Reject))
