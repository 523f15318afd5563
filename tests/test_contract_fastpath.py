"""The validation fast path and the dotted-key pre-check agree with the reference validation."""

from __future__ import annotations

import copy

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.examples import dns, flow, proc
from gpusentry import contract as c

SAMPLES = [
    proc("/usr/bin/python3 train.py"), flow(b'{"id":1}\n', sni="a.example"), dns("a.example", ["192.0.2.1"]),
    c.gpu_event("h", 1_790_000_000.5, index=0, uuid="GPU-0", name="NVIDIA L4", gpu_pct=50.5, memory_pct=3,
                power_draw_watts=70.0, processes=[{"pid": 1, "sm_pct": 5}]),
]
values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, width=32),
                   st.text(max_size=6), st.sampled_from(["", "event", "metric", "alert", "gpusentry.gpu", "x.y",
                                                         "2026-01-01T00:00:00Z", "2026-13-01T00:00:00Z"]),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from(["a", "b.c", "pid"]),
                                                                       st.integers(), max_size=2))


def _paths(obj, prefix=""):
    for key, value in obj.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _paths(value, prefix + key + ".")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(SAMPLES) - 1), st.data())
def test_fast_path_answers_exactly_as_the_reference(which, data):
    event = copy.deepcopy(SAMPLES[which])
    paths = sorted(_paths(event))
    for _ in range(data.draw(st.integers(0, 3))):
        path = data.draw(st.sampled_from(paths))
        *parents, leaf = path.split(".")
        node = c.get(event, ".".join(parents)) if parents else event
        if isinstance(node, dict):
            if data.draw(st.booleans()):
                node[leaf] = data.draw(values)
            else:
                node.pop(leaf, None)
    expanded = c.expand_dotted(event) if c._has_dotted_key(event) else copy.deepcopy(event)
    reference = c._validate_slow(expanded)
    assert c.validate_event(copy.deepcopy(event)) == reference
    if not c._has_dotted_key(event) and c._fast_valid(copy.deepcopy(event)):  # as validate_event consults it
        assert reference == event, "the fast path accepted what the reference refuses or changes"


json_docs = st.recursive(
    st.none() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(alphabet=st.sampled_from('ab.:" \\\n'),
                                                                      max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet=st.sampled_from('ab.:" \\\u00e9'), max_size=5), inner, max_size=4), max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(alphabet=st.sampled_from('ab.:" \\'), max_size=5), json_docs, max_size=4))
def test_dotted_key_precheck_never_misses_a_dotted_key(doc):
    raw = orjson.dumps(doc)
    if not c.may_have_dotted_keys(raw):
        assert not c._has_dotted_key(doc)
        assert c.validate_event(orjson.loads(raw), dotted_keys=False) == c.validate_event(orjson.loads(raw))


def test_dotted_keys_in_a_batch_are_still_expanded():
    ev = proc("/usr/bin/x")
    flat = {k: v for k, v in ev.items() if k != "host"}
    flat["host.name"] = ev["host"]["name"]
    decoded = c.decode_message(orjson.dumps([ev, flat]))
    assert not decoded.rejects and decoded.events[0] == decoded.events[1] == ev
