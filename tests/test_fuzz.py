"""Fuzzing the decoders and the capture path: no input crashes the engine (hypothesis)."""

from __future__ import annotations

import base64
import io
import os
import socket
from pathlib import Path

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.engine import Engine
from detectors.examples import dns, flow, proc
from detectors.network._payload import rpc_messages
from detectors.network._poollist import parse_pool_list
from detectors.process._cmdline import segments, split
from gpusentry import contract as c
from gpusentry.pcap import CaptureError, CaptureStats, client_hello_sni, read_capture

PCAPS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pcaps"
# GPUSENTRY_FUZZ_EXAMPLES raises the budget for a long local run (CI keeps the default).
FUZZ = settings(max_examples=int(os.environ.get("GPUSENTRY_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
# One engine with every detector, strict: a detector that raises fails the test.
ENGINE = Engine(strict=True)

json_lines = st.lists(st.sampled_from([
    b'{"id":1,"method":"mining.subscribe","params":["x"]}', b'{"method":"login","params":{"login":"a"}}',
    b'{"id":2,"method":"eth_submitLogin","params":[]}', b'{"method":"submit","params":{"job_id":1,"nonce":2}}',
    b'{"jsonrpc":"2.0","method":"keepalived","params":null}', b'[{"method":"mining.notify"}]', b"{", b'{"method":',
    b"POST / HTTP/1.1\r\n\r\n", b"Content-Length: 3\r\n\r\n{}", b"\x16\x03\x01\x00", b"null", b"[1,2", b"{}",
]), max_size=6).map(b"\n".join)
payloads = st.one_of(st.binary(max_size=512), json_lines.map(lambda b: b[:512]),
                     st.tuples(json_lines, st.binary(max_size=64)).map(lambda t: (t[0] + t[1])[:512]))


@FUZZ
@given(payloads)
def test_payload_decoder_never_raises(data):
    for m in rpc_messages(data):
        assert m.method is None or isinstance(m.method, str)


@FUZZ
@given(payloads, st.integers(1, 65535), st.one_of(st.none(), st.text(max_size=40)),
       st.one_of(st.none(), st.text(max_size=40)))
def test_engine_survives_any_flow(data, port, domain, sni):
    ev = flow(data, dport=port, domain=domain, sni=sni)
    ENGINE.process(c.validate_or_raise(ev))
    broken = flow(None, dport=port)
    broken["gpusentry"] = {"flow": {"payload_b64": base64.b64encode(data).decode()[:684].rstrip("=") + "!"}}
    ENGINE.process(c.validate_or_raise(broken))
    assert not ENGINE.failures


@FUZZ
@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=30)), st.text(min_size=1, max_size=20))
def test_engine_survives_any_command_line(line, parent, name):
    for args in (split(line), None):
        ev = proc("/usr/bin/x", parent=parent or "bash", name=name)
        ev["process"]["command_line"] = line
        ev["process"]["args"] = args
        ev["process"]["executable"] = (args or [None])[0]
        ENGINE.process(c.validate_or_raise(ev))
    assert not ENGINE.failures
    assert isinstance(split(line), list) and isinstance(segments(split(line)), list)


@FUZZ
@given(st.text(max_size=80), st.lists(st.text(max_size=45), max_size=5))
def test_engine_survives_any_dns_answer(question, ips):
    ENGINE.process(c.validate_or_raise(dns(question or ".", ips)))


@FUZZ
@given(st.binary(max_size=600))
def test_sni_parser_never_raises(data):
    name = client_hello_sni(data)
    assert name is None or isinstance(name, str)
    client_hello_sni(b"\x16\x03\x01" + data)


@FUZZ
@given(st.text(max_size=400))
def test_pool_list_parser_never_raises(text):
    pools, errors = parse_pool_list(text)
    assert all(e.line >= 1 for e in errors)


def _read(data: bytes, tmp: Path) -> None:
    path = tmp / "f.pcap"
    path.write_bytes(data)
    try:
        events = read_capture(path, "fuzz", CaptureStats())
    except CaptureError:
        return
    for ev in events:
        assert not isinstance(c.validate_event(ev), c.Reject)
        ENGINE.process(ev)
    assert not ENGINE.failures


@FUZZ
@given(st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"\xa1\xb2\xc3\xd4", b""]), st.binary(max_size=400))
def test_capture_reader_survives_garbage(tmp_path_factory, magic, rest):
    _read(magic + rest, tmp_path_factory.mktemp("garbage"))


def _pcap(packets: list[bytes], linktype: int = dpkt.pcap.DLT_EN10MB) -> bytes:
    buf = io.BytesIO()
    writer = dpkt.pcap.Writer(buf, linktype=linktype)
    for i, pkt in enumerate(packets):
        writer.writepkt(pkt, ts=1000.0 + i)
    return buf.getvalue()


tcp_packets = st.lists(st.tuples(st.booleans(), st.integers(0, 2**32 - 1), st.integers(0, 63),
                                 st.binary(max_size=300)), max_size=12)


@FUZZ
@given(tcp_packets)
def test_capture_reader_survives_any_tcp_conversation(tmp_path_factory, segs):
    frames = []
    for outbound, seq, flags, data in segs:
        src, dst, sport, dport = ("10.0.0.1", "10.0.0.2", 40000, 3333) if outbound else \
            ("10.0.0.2", "10.0.0.1", 3333, 40000)
        tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=data)
        ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_TCP, data=tcp)
        ip.len = len(bytes(ip))
        frames.append(bytes(ip))
    _read(_pcap(frames, dpkt.pcap.DLT_RAW), tmp_path_factory.mktemp("tcp"))


@FUZZ
@given(st.data())
def test_capture_reader_survives_corrupted_real_captures(tmp_path_factory, data):
    path = PCAPS / "xmrig-login-nanopool.pcapng"
    if not path.is_file():
        pytest.skip("real capture not present in ../shared/data/pcaps/")
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 20))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(raw)))
    _read(bytes(raw[:cut]), tmp_path_factory.mktemp("corrupt"))


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=5), max_leaves=25))
def test_validation_never_raises(obj):
    result = c.validate_event(obj)
    assert isinstance(result, dict | c.Reject)


@FUZZ
@given(st.sampled_from(["@timestamp", "event", "host", "process", "gpu", "dns", "destination", "source"]),
       st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))
def test_validation_of_damaged_events_never_raises(key, value):
    for ev in (proc("/usr/bin/x"), flow(b"x"), dns("a.example", ["1.2.3.4"]),
               c.gpu_event("h", 1.0, index=0, uuid="GPU-0", name=None, processes=[{"pid": 1}])):
        ev[key] = value
        result = c.validate_event(ev)
        assert isinstance(result, dict | c.Reject)
        if isinstance(result, dict):
            ENGINE.process(result)
    assert not ENGINE.failures

