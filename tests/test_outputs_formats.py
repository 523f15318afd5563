"""Formatters against the published rules: CEF escaping, LEEF 2.0, RFC 5424 headers, RFC 6587 framing, HEC events."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusentry.settings.outputs import HecOutputSettings
from outputs.cef import cef_severity, escape_extension, escape_header, format_cef, parse_cef
from outputs.hec import hec_event
from outputs.leef import delimiter_token, format_leef, parse_leef
from outputs.syslog import format_rfc5424, octet_frame
from tests.outputs_helpers import alert, with_network

CEF_HEADER = re.compile(r"^CEF:0\|gpusentry\|gpusentry\|[^|]+\|[^|]+\|.*\|(10|[0-9])\|")


def test_cef_header_and_extension_escapes_follow_the_spec():
    assert escape_header("a|b\\c") == "a\\|b\\\\c"
    assert escape_header("line\nbreak") == "line break", "a header cannot carry a line break"
    assert escape_extension("a=b\\c|d\ne\rf") == "a\\=b\\\\c|d\\ne\\rf", "pipes are literal in the extension"


def test_cef_layout_standard_keys_and_labels():
    a = with_network(alert(1, user__name="ml"))
    line = format_cef(a)
    assert CEF_HEADER.match(line)
    header, ext = parse_cef(line)
    assert header[4] == a["rule"]["id"] and header[6] == "10"
    for key, value in {"rt": "1790000000000", "shost": "gpu-node-7", "src": "10.0.0.7", "spt": "50512",
                       "dst": "203.0.113.9", "dpt": "3333", "dhost": "pool.example.net", "suser": "ml",
                       "act": "open", "msg": a["message"]}.items():
        assert ext[key] == value, key
    labels = {ext[f"cs{n}Label"]: ext[f"cs{n}"] for n in range(1, 7) if f"cs{n}" in ext}
    assert labels["dedupKey"] == a["gpusentry"]["alert"]["dedup_key"] and labels["severity"] == "critical"
    assert ext["cn1Label"] == "busyGpuSeconds" and ext["cfp1Label"] == "costUsd"


def test_every_cef_and_leef_time_field_is_in_a_form_arcsight_and_qradar_parse():
    """CEF's rt, start and end as milliseconds since the epoch (end= was an RFC 3339 string, kept as text by
    ArcSight); LEEF's devTime in exactly the devTimeFormat it announces."""
    import datetime as dt

    from gpusentry.timefmt import parse_timestamp

    for a in (alert(1), alert(2, status="resolved")):
        _, ext = parse_cef(format_cef(a))
        keys = {"rt", "start"} | ({"end"} if a["gpusentry"]["alert"]["status"] == "resolved" else set())
        assert keys <= set(ext), keys - set(ext)
        for key in keys:
            assert ext[key].isdigit() and len(ext[key]) == 13, (key, ext[key])
        assert int(ext["start"]) == int(parse_timestamp(a["event"]["start"]) * 1000)
        if "end" in keys:
            assert int(ext["end"]) == int(parse_timestamp(a["event"]["end"]) * 1000) >= int(ext["start"])
        fields = parse_leef(format_leef(a))[1]
        assert fields["devTimeFormat"] == "yyyy-MM-dd'T'HH:mm:ss.SSSX"
        # That Java pattern, in Python: 2026-11-01T00:00:00.000Z
        parsed = dt.datetime.strptime(fields["devTime"].replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")
        assert parsed.timestamp() == pytest.approx(parse_timestamp(a["@timestamp"]), abs=0.001)


def test_cef_severity_scale():
    assert [cef_severity(alert(1, event__severity=s)) for s in (0, 25, 50, 75, 95, 100)] == [0, 2, 5, 8, 10, 10]


def test_cef_long_message_is_cut_to_the_dictionary_limit():
    _, ext = parse_cef(format_cef(alert(1, message="m" * 5000)))
    assert len(ext["msg"]) == 1023


nasty_text = st.text(alphabet=st.sampled_from(list("ab =|\\\n\r\t%^é")), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(message=nasty_text, user=nasty_text.filter(bool), name=nasty_text.filter(lambda s: s.strip() == s and s))
def test_cef_round_trips_any_value(message, user, name):
    a = alert(1, message=message, user__name=user, rule__name=name)
    header, ext = parse_cef(format_cef(a))
    assert header[5] == name.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    assert ext.get("msg", "") == message
    assert ext["suser"] == user


@settings(max_examples=150, deadline=None)
@given(message=nasty_text, user=nasty_text.filter(bool), delimiter=st.sampled_from(["^", "\t", "|", "~"]))
def test_leef_round_trips_and_never_carries_a_raw_delimiter(message, user, delimiter):
    a = alert(1, message=message, user__name=user)
    line = format_leef(a, delimiter)
    header, attrs = parse_leef(line)
    assert header[:5] == ["LEEF:2.0", "gpusentry", "gpusentry", header[3], a["rule"]["id"]]
    assert header[5] == delimiter_token(delimiter)
    assert attrs.get("msg", "") == message and attrs["usrName"] == user
    body = line.split("|", 6)[6]
    assert body.count(delimiter) == len(attrs) - 1, "the delimiter only separates attributes"
    assert "\n" not in line and "\r" not in line


def test_leef_delimiter_declarations():
    assert delimiter_token("^") == "^" and delimiter_token("\t") == "x09" and delimiter_token("|") == "x7C"
    _, attrs = parse_leef(format_leef(with_network(alert(1)), "\t"))
    assert attrs["src"] == "10.0.0.7" and attrs["dstPort"] == "3333" and attrs["sev"] == "10"
    assert attrs["devTimeFormat"] == "yyyy-MM-dd'T'HH:mm:ss.SSSX" and attrs["devTime"] == "2026-09-21T14:13:20.000Z"


def test_rfc5424_header_fields_are_printable_and_bounded():
    msg = format_rfc5424("CEF:0|x", facility=13, severity_code=2, timestamp=1_790_000_000.25,
                         hostname="host with spaces" + "h" * 300, app_name="gpu sentry", procid="42", msgid="incident")
    text = msg.decode()
    pri, ts, host, app, procid, msgid, sd, body = text.split(" ", 7)
    assert pri == "<106>1" and ts == "2026-09-21T14:13:20.250Z"
    assert len(host) == 255 and " " not in host and app == "gpu_sentry"
    assert (procid, msgid, sd, body) == ("42", "incident", "-", "CEF:0|x")


def test_rfc5424_cut_keeps_utf8_whole():
    msg = format_rfc5424("é" * 400, facility=1, severity_code=5, timestamp=0, hostname="h", app_name="a",
                         procid="1", msgid="m", max_bytes=500)
    assert len(msg) <= 500
    msg.decode("utf-8")


def test_octet_counting_frame_counts_bytes_not_characters():
    assert octet_frame("é\n".encode()) == b"3 \xc3\xa9\n"


def test_hec_event_fields():
    a = alert(3)
    e = hec_event(a, HecOutputSettings(token="t", index="sec"))
    assert e["time"] == 1_790_000_000.0 and isinstance(e["time"], float)
    assert (e["host"], e["source"], e["sourcetype"], e["index"]) == ("gpu-node-7", "gpusentry", "gpusentry:alert", "sec")
    assert e["event"] is a and e["fields"]["status"] == "open"
    assert "index" not in hec_event(a, HecOutputSettings(token="t"))
