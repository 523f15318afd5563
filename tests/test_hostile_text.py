"""Text from a monitored host is hostile: every view and output shows it as text, never as markup.

Hypothesis feeds strings built from the characters each medium gives meaning to (rich markup, Slack
mrkdwn and mentions, CEF/LEEF delimiters, line breaks) through the ``up`` live view and every formatter.
"""

from __future__ import annotations

import io
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from gpusentry.settings.outputs import HecOutputSettings, PagerDutyOutputSettings
from outputs.cef import format_cef, parse_cef
from outputs.hec import hec_event
from outputs.leef import format_leef, parse_leef
from outputs.pagerduty import build_event
from outputs.slack import build_message
from streams.up import IncidentView, _decode_alert, incident_row, shown
from tests.outputs_helpers import alert, with_network

# Pieces that mean something to one of the media, mixed with plain letters.
PIECES = ["[/bold]", "[bold red]", "[/]", "[link=http://x]", "[", "]", "\\", "<!channel>", "<!here>", "<@U024BE7LH>",
          "<http://evil.example|click>", "@channel", "@here", "`", "```", "*", "_", "~", "&", "&amp;", "<", ">", "|",
          "=", "^", "\n", "\r", "\t", "\x1b[31m", "%s", "{0}", "é", "a", "b", " "]
hostile = st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join)
HOSTILE = settings(max_examples=200, deadline=None)


def hostile_alert(text: str) -> dict:
    """An engine-made incident whose every host-supplied field carries ``text``."""
    a = with_network(alert(1, message=text, host__name=text, user__name=text, process__command_line=text,
                           process__executable=text, destination__domain=text))
    for ev in a["gpusentry"]["alert"].get("evidence", []):
        ev["summary"] = text
    return a


@HOSTILE
@given(hostile)
def test_live_view_shows_host_text_as_text(text):
    a = hostile_alert(text)
    view = IncidentView()
    view.add(a)
    out = io.StringIO()
    Console(file=out, width=400, force_terminal=True, color_system=None).print(view.table())  # no MarkupError
    cells = [c.plain for c in incident_row(a)]
    assert cells[1] == shown(text).plain and cells[-1] == shown(text).plain, "host name and message verbatim"
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out.getvalue()), "no control character reaches the terminal"
    # Every printable character of the host's text is shown (rich only folds it across lines).
    assert "".join(out.getvalue().split()).count("".join(shown(text).plain.split())[:20]) >= 1


def test_live_view_survives_alert_topic_garbage():
    assert _decode_alert(b"not json") is None and _decode_alert(b"[1, 2]") is None
    view = IncidentView()
    view.add({"gpusentry": "x", "host": 3, "message": "[/bold]"})  # a forged message of the wrong shape
    Console(file=io.StringIO(), width=200).print(view.table())


def _mrkdwn_texts(message: dict) -> list[str]:
    out = [message["text"]]
    for block in message["blocks"]:
        if block.get("text", {}).get("type") == "mrkdwn":
            out.append(block["text"]["text"])
        for f in block.get("fields", []) + block.get("elements", []):
            if f.get("type") == "mrkdwn":
                out.append(f["text"])
    return out


@HOSTILE
@given(hostile)
def test_slack_message_never_carries_live_mrkdwn_from_a_host(text):
    message = build_message(hostile_alert(text))
    for mrkdwn in _mrkdwn_texts(message):
        assert "<" not in mrkdwn and ">" not in mrkdwn, "no mention, link or channel reference can be formed"
        assert not re.search(r"@(channel|here|everyone)\b", mrkdwn, re.I), "no bare broadcast mention"
        # Entities: only the three Slack defines, each one ours.
        assert not re.search(r"&(?!amp;|lt;|gt;)", mrkdwn)
    evidence = [t for t in _mrkdwn_texts(message) if t.startswith("*Evidence*")]
    for section in evidence:
        lines = section.split("\n• ")[1:]
        assert section.count("`") == 2 * len(lines), "only our own code spans, around each evidence time"


@HOSTILE
@given(hostile)
def test_cef_and_leef_carry_host_text_intact_and_inert(text):
    a = hostile_alert(text)
    line = format_cef(a)
    assert "\n" not in line and "\r" not in line
    header, ext = parse_cef(line)
    assert ext["msg"] == text[:1023] and ext["suser"] == text
    leef = format_leef(a, "^")
    assert "\n" not in leef and "\r" not in leef
    assert parse_leef(leef)[1]["usrName"] == text


@HOSTILE
@given(hostile)
def test_json_outputs_carry_host_text_as_json_strings(text):
    a = hostile_alert(text)
    pd = build_event(a, "r" * 32, PagerDutyOutputSettings(enabled=True))
    assert json.loads(json.dumps(pd))["payload"]["source"] == text
    hec = hec_event(a, HecOutputSettings(enabled=True))
    assert json.loads(json.dumps(hec))["event"]["message"] == text and hec["host"] == text
