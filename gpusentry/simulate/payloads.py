"""The first bytes clients send, as real miners and real services write them.

Miners: Stratum v1 (cgminer / T-Rex style ``mining.subscribe`` + ``mining.authorize``),
EthereumStratum/1.0.0 (NiceHash), XMRig's ``login`` JSON-RPC, eth-proxy ``eth_submitLogin``.
Look-alikes on the same ports: a language server's JSON-RPC (LSP framing), an HTTP JSON API.
TLS flows start with a ClientHello carrying the server name (SNI), built byte for byte.
"""

from __future__ import annotations

import random
import struct

import orjson


def _line(obj: object) -> bytes:
    return orjson.dumps(obj) + b"\n"


def stratum_v1(agent: str, worker: str) -> bytes:
    return (_line({"id": 1, "method": "mining.subscribe", "params": [agent]})
            + _line({"id": 2, "method": "mining.authorize", "params": [worker, "x"]}))


def ethereum_stratum(agent: str, worker: str) -> bytes:
    return (_line({"id": 1, "method": "mining.subscribe", "params": [agent, "EthereumStratum/1.0.0"]})
            + _line({"id": 2, "method": "mining.authorize", "params": [worker, "x"]}))


def xmrig_login(wallet: str, agent: str = "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/11.2.0",
                algos: tuple[str, ...] = ("rx/0", "cn/r", "kawpow")) -> bytes:
    return _line({"id": 1, "jsonrpc": "2.0", "method": "login",
                  "params": {"login": wallet, "pass": "x", "agent": agent, "algo": list(algos)}})


def eth_proxy_login(wallet: str) -> bytes:
    return _line({"id": 1, "jsonrpc": "2.0", "method": "eth_submitLogin", "params": [wallet, "x"], "worker": "rig"})


def lsp_initialize(pid: int, root: str) -> bytes:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                         "params": {"processId": pid, "rootUri": f"file://{root}", "capabilities": {}}})
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def http_json_post(host: str, path: str, body: object) -> bytes:
    data = orjson.dumps(body)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: python-httpx/0.27.0\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def http_get(host: str, path: str, agent: str = "curl/7.81.0") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\nAccept: */*\r\n\r\n".encode()


def rtsp_describe(url: str) -> bytes:
    return f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 2\r\nUser-Agent: Lavf59.27.100\r\nAccept: application/sdp\r\n\r\n".encode()


def tls_client_hello(server_name: str, rng: random.Random) -> bytes:
    """A TLS 1.2/1.3 ClientHello record with the SNI, supported groups and versions extensions."""
    name = server_name.encode("ascii")
    sni_entry = b"\x00" + struct.pack("!H", len(name)) + name
    sni = struct.pack("!HH", 0, len(sni_entry) + 2) + struct.pack("!H", len(sni_entry)) + sni_entry
    groups = struct.pack("!HHH", 10, 6, 4) + struct.pack("!HH", 0x001D, 0x0017)
    versions = struct.pack("!HHB", 43, 5, 4) + struct.pack("!HH", 0x0304, 0x0303)
    alpn_proto = b"\x08http/1.1"
    alpn = struct.pack("!HHH", 16, len(alpn_proto) + 2, len(alpn_proto)) + alpn_proto
    extensions = sni + groups + versions + alpn
    suites = struct.pack("!HHHH", 0x1301, 0x1302, 0x1303, 0xC02F)
    body = (b"\x03\x03" + rng.randbytes(32) + b"\x20" + rng.randbytes(32)
            + struct.pack("!H", len(suites)) + suites + b"\x01\x00"
            + struct.pack("!H", len(extensions)) + extensions)
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake
