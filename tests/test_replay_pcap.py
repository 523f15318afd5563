"""`gpusentry replay` on packet captures: real third-party mining captures and hand-built ones."""

from __future__ import annotations

import base64
import socket
import struct
from pathlib import Path
from typing import Any

import dpkt
import orjson
import pytest
from typer.testing import CliRunner

from gpusentry.cli import app
from gpusentry.config import Config
from gpusentry.pcap import CaptureError, CaptureStats, client_hello_sni, read_capture
from gpusentry.replay import run_replay

PCAPS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pcaps"
LOCAL, POOL = "10.1.2.3", "198.51.100.20"


def real(name: str) -> Path:
    path = PCAPS / name
    if not path.is_file():
        pytest.skip(f"real capture {name} not present in ../shared/data/pcaps/")
    return path


def alerts_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize(("name", "rule"), [("stratum-v1-cgminer.pcapng", "network.stratum"),
                                            ("xmrig-login-nanopool.pcapng", "network.monero_stratum")])
def test_real_mining_captures_raise_a_high_incident(tmp_path, name, rule):
    out = tmp_path / "alerts.jsonl"
    summary = run_replay([real(name)], Config(), out=out)
    alerts = alerts_of(out)
    assert summary.alerts == len(alerts) >= 1 and summary.rejected == 0 and summary.packets > 0
    assert len({a["gpusentry"]["alert"]["dedup_key"] for a in alerts}) == 1, "one capture, one incident"
    assert alerts[-1]["gpusentry"]["alert"]["severity"] in ("high", "critical")
    assert rule in alerts[-1]["gpusentry"]["alert"]["rules"]
    assert alerts[0]["host"]["name"] == Path(name).stem
    assert alerts[0]["threat"]["technique"]["subtechnique"]["id"] == ["T1496.001"]


def test_real_stratum_capture_flows_carry_the_client_bytes():
    stats = CaptureStats()
    events = read_capture(real("stratum-v1-cgminer.pcapng"), "h", stats)
    flows = [e for e in events if e["event"]["dataset"] == "gpusentry.network"]
    assert stats.packets == 855 and stats.skipped == 0 and len(flows) == stats.flows > 100
    payloads = [base64.b64decode(e["gpusentry"]["flow"]["payload_b64"]) for e in flows
                if e.get("gpusentry", {}).get("flow")]
    subscribes = [p for p in payloads if p.startswith(b'{"id": 2, "method": "mining.subscribe"')]
    assert subscribes and all(len(p) <= 512 for p in payloads)
    assert [e["@timestamp"] for e in events] == sorted(e["@timestamp"] for e in events)
    dns = [e for e in events if e["event"]["dataset"] == "gpusentry.dns"]
    assert any(e["dns"]["question"]["name"] == "client.dropbox.com" for e in dns)


# ---------------------------------------------------------------------------- hand-built captures


def _ip(src: str, dst: str, segment: Any, proto: int) -> dpkt.ip.IP:
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, data=segment)
    ip.len = len(bytes(ip))
    return ip


def _tcp(src: str, sport: int, dst: str, dport: int, seq: int, flags: int, data: bytes = b"") -> bytes:
    seg = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=data)
    eth = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP,
                                 data=_ip(src, dst, seg, dpkt.ip.IP_PROTO_TCP))
    return bytes(eth)


def _dns_answer(name: str, ip: str) -> bytes:
    msg = dpkt.dns.DNS(id=7)
    msg.qr = dpkt.dns.DNS_R
    msg.qd = [dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)]
    msg.an = [dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_A, ttl=60, rdata=socket.inet_aton(ip))]
    udp = dpkt.udp.UDP(sport=53, dport=53000, data=bytes(msg))
    udp.ulen = len(bytes(udp))
    eth = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP,
                                 data=_ip("10.0.0.53", LOCAL, udp, dpkt.ip.IP_PROTO_UDP))
    return bytes(eth)


def client_hello(server_name: str) -> bytes:
    name = server_name.encode()
    sni = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    ext = struct.pack("!HH", 0, len(sni)) + sni
    body = b"\x03\x03" + bytes(32) + b"\x00" + struct.pack("!H", 2) + b"\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(ext)) + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def write_pcap(path: Path, packets: list[tuple[float, bytes]]) -> Path:
    with path.open("wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for ts, pkt in packets:
            writer.writepkt(pkt, ts=ts)
    return path


def built_capture(tmp_path: Path) -> Path:
    syn, ack, psh = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH | dpkt.tcp.TH_ACK
    isn = 0xFFFFFF00  # the sequence numbers wrap around 2**32 mid-payload
    part1 = b'{"id":1,"method":"mining.subscribe","params":["miner/1.0"]}\n'
    part2 = b'{"id":2,"method":"mining.authorize","params":["w.1","x"]}\n' + b"z" * 600
    hello = client_hello("xmr.2miners.com")
    return write_pcap(tmp_path / "built.pcap", [
        (1000.0, _dns_answer("eth.2miners.com", POOL)),
        (1001.0, _tcp(LOCAL, 40001, POOL, 2020, isn, syn)),
        (1001.1, _tcp(POOL, 2020, LOCAL, 40001, 5000, syn | ack)),
        # out of order: the second segment first, then the first, then a retransmission of the first
        (1001.2, _tcp(LOCAL, 40001, POOL, 2020, (isn + 1 + len(part1)) % 2**32, psh, part2)),
        (1001.3, _tcp(LOCAL, 40001, POOL, 2020, isn + 1, psh, part1)),
        (1001.4, _tcp(LOCAL, 40001, POOL, 2020, isn + 1, psh, part1)),
        (1002.0, _tcp(LOCAL, 40002, "203.0.113.9", 443, 77, syn)),
        (1002.1, _tcp(LOCAL, 40002, "203.0.113.9", 443, 78, psh, hello)),
        (1003.0, b"\x00\x01garbage that is not ethernet"),
    ])


def test_tcp_flows_are_reassembled_in_sequence_order(tmp_path):
    stats = CaptureStats()
    events = read_capture(built_capture(tmp_path), "node-1", stats)
    flows = {e["destination"]["port"]: e for e in events if e["event"]["dataset"] == "gpusentry.network"}
    mining = flows[2020]
    payload = base64.b64decode(mining["gpusentry"]["flow"]["payload_b64"])
    assert payload.startswith(b'{"id":1,"method":"mining.subscribe"')
    assert b'"mining.authorize"' in payload and len(payload) == 512
    assert mining["source"] == {"ip": LOCAL, "port": 40001}
    assert mining["destination"]["domain"] == "eth.2miners.com" and mining["network"]["direction"] == "egress"
    assert flows[443]["tls"]["client"]["server_name"] == "xmr.2miners.com"
    assert [e["dns"]["question"]["name"] for e in events if e["event"]["dataset"] == "gpusentry.dns"] == \
        ["eth.2miners.com"]
    assert stats.skipped == 1 and stats.flows == 2
    assert all(e["host"]["name"] == "node-1" for e in events)


def test_cli_replays_a_capture_with_host_name(tmp_path):
    out = tmp_path / "a.jsonl"
    result = CliRunner().invoke(app, ["replay", "--host", "gpu-7", "-o", str(out), str(built_capture(tmp_path))])
    assert result.exit_code == 0, result.output
    alerts = alerts_of(out)
    assert alerts and {a["host"]["name"] for a in alerts} == {"gpu-7"}
    assert alerts[-1]["gpusentry"]["alert"]["severity"] == "critical"  # protocol + pool
    assert "events read" in result.output and "alerts raised" in result.output and "packets" in result.output


def test_not_a_capture_is_a_clear_error_and_other_files_still_run(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\xd4\xc3\xb2\xa1" + b"\x00" * 3)
    good = tmp_path / "events.jsonl"
    good.write_text("")
    with pytest.raises(CaptureError, match="bad.pcap"):
        read_capture(bad, "h")
    result = CliRunner().invoke(app, ["replay", str(bad), str(built_capture(tmp_path))])
    assert result.exit_code == 1
    assert "bad.pcap" in result.output and "1 file(s) unreadable" in result.output
    assert "gpusentry.alert" in result.output  # the good capture still produced its alerts


def test_a_cut_capture_replays_what_came_before(tmp_path):
    data = real("stratum-v1-cgminer.pcapng").read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(data[: len(data) // 2 + 7])
    stats = CaptureStats()
    events = read_capture(cut, "h", stats)
    assert stats.truncated and 0 < stats.packets < 855 and events


def test_a_packet_with_an_impossible_time_is_skipped_and_the_rest_replayed(tmp_path):
    """A corrupt record header can carry a time past year 9999, which no event timestamp can hold."""
    syn, psh = dpkt.tcp.TH_SYN, dpkt.tcp.TH_PUSH | dpkt.tcp.TH_ACK
    subscribe = b'{"id":1,"method":"mining.subscribe","params":["miner/1.0"]}\n'
    path = tmp_path / "odd-time.pcapng"  # pcapng: 64-bit times (a pcap's 32-bit seconds end in 2106)
    with path.open("wb") as fh:
        writer = dpkt.pcapng.Writer(fh)
        writer.writepkt(_tcp(LOCAL, 40009, POOL, 3333, 5, syn), ts=289_714_959_271.6)  # the year 11150
        writer.writepkt(_tcp(LOCAL, 40001, POOL, 3333, 10, syn), ts=1000.0)
        writer.writepkt(_tcp(LOCAL, 40001, POOL, 3333, 11, psh, subscribe), ts=1000.1)
    stats = CaptureStats()
    events = read_capture(path, "h", stats)
    assert stats.skip_reasons["timestamp out of range"] == 1 and stats.skipped == 1
    assert [e["destination"]["port"] for e in events] == [3333] and events[0]["@timestamp"].startswith("1970-")


def test_sni_parser_rejects_cut_and_odd_hellos():
    hello = client_hello("pool.example.org")
    assert client_hello_sni(hello) == "pool.example.org"
    for n in range(len(hello)):  # the name ends the hello: every cut loses part of it
        assert client_hello_sni(hello[:n]) is None
    assert client_hello_sni(b"GET / HTTP/1.1\r\n") is None
