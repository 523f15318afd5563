"""The eth-proxy (getwork) mining protocol, raw or inside HTTP POST bodies."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import flow
from detectors.network._payload import flow_fields, flow_messages, is_http_request, where
from gpusentry.contract import Dataset, event_time

# eth_submitLogin exists only in mining proxies; eth_getWork is also a (rarely used) node RPC method.
MINING_ONLY = frozenset({"eth_submitLogin", "eth_submitWork", "eth_submitHashrate"})
WORK = frozenset({"eth_getWork"})


class EthProxyPayload(Detector):
    id = "network.eth_proxy"
    title = "eth-proxy (getwork) mining protocol in an outbound flow"
    description = ("A flow's first client bytes hold eth-proxy JSON-RPC calls (eth_submitLogin, eth_getWork, "
                   "eth_submitWork, eth_submitHashrate), as line-delimited JSON or in an HTTP POST body: "
                   "Ethash/Etchash miners talking to a pool or proxy. eth_getWork alone is medium (Ethereum nodes "
                   "also answer it); the login and submit calls are high.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://github.com/sammy007/open-ethereum-pool/blob/master/docs/STRATUM.md",)
    datasets = frozenset({Dataset.NETWORK})
    signal = Signal.PROTOCOL

    examples: ClassVar[list[Example]] = [
        Example("eth_submitLogin line", True,
                [flow(b'{"id":1,"jsonrpc":"2.0","method":"eth_submitLogin",'
                      b'"params":["0x1f9090aaE28b8a3dCeaDf281B0F12828e676c326"],"worker":"rig1"}\n', dport=4444)]),
        Example("getwork over HTTP POST", True,
                [flow(b"POST / HTTP/1.1\r\nHost: pool.example\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 60\r\n\r\n"
                      b'{"jsonrpc":"2.0","method":"eth_submitWork","params":["0x1","0x2","0x3"],"id":5}',
                      dport=8888)]),
        Example("dapp reading a balance", False,
                [flow(b"POST / HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n\r\n"
                      b'{"jsonrpc":"2.0","method":"eth_getBalance","params":["0xab","latest"],"id":1}',
                      dport=8545)]),
        Example("plain web request on 8080", False,
                [flow(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", dport=8080)]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        data, messages = flow_messages(event)
        methods = sorted({m.method for m in messages if m.method in MINING_ONLY or m.method in WORK})
        if not methods:
            return ()
        high = any(m in MINING_ONLY for m in methods)
        over = " over HTTP" if is_http_request(data) else ""
        return [self.finding(event, f"eth-proxy {', '.join(methods)}{over} to {where(event)}",
                             timestamp=event_time(event), severity="high" if high else "medium",
                             score=0.9 if high else 0.5, fields=flow_fields(event))]
