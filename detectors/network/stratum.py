"""Stratum v1 and its EthereumStratum / NiceHash variants in a flow's first client bytes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import flow
from detectors.network._payload import flow_fields, flow_messages, params_text, where
from gpusentry.contract import Dataset, event_time

STRATUM_METHODS = frozenset({
    "mining.subscribe", "mining.authorize", "mining.submit", "mining.notify", "mining.extranonce.subscribe",
    "mining.configure", "mining.suggest_difficulty", "mining.suggest_target", "mining.get_transactions",
    "mining.set_difficulty", "mining.set_extranonce", "mining.multi_version", "mining.hello", "mining.noop",
    "mining.set_target", "mining.set_version_mask", "mining.ping", "mining.pong",
})


def variant(messages_params: list[Any]) -> str:
    """Which Stratum dialect the subscribe names (EthereumStratum/1.0.0 is NiceHash's)."""
    for params in messages_params:
        text = params_text(params, 400)
        if "EthereumStratum/1.0.0" in text:
            return "EthereumStratum/1.0.0 (NiceHash)"
        if "EthereumStratum/2.0.0" in text:
            return "EthereumStratum/2.0.0"
    return "Stratum v1"


class StratumPayload(Detector):
    id = "network.stratum"
    title = "Stratum mining protocol in an outbound flow"
    description = ("The first bytes a host sent on a TCP flow are Stratum v1 JSON-RPC (mining.subscribe, "
                   "mining.authorize, mining.submit, mining.extranonce.subscribe, mining.hello, ...), including "
                   "the EthereumStratum/1.0.0 (NiceHash) and 2.0.0 dialects. Judged on the parsed messages, on any "
                   "port, so a pool on 443 or 25 is caught and a language server on 3333 is not.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://braiins.com/stratum-v1/docs",
                  "https://github.com/nicehash/Specifications/blob/master/EthereumStratum_NiceHash_v1.0.0.txt")
    datasets = frozenset({Dataset.NETWORK})
    signal = Signal.PROTOCOL

    examples: ClassVar[list[Example]] = [
        Example("cgminer subscribe and authorize on port 25", True,
                [flow(b'{"id": 9, "method": "mining.subscribe", "params": ["cgminer/3.7.2"]}\n'
                      b'{"id": 22, "method": "mining.authorize", "params": ["Bitcoin", "x"]}\n', dport=25)]),
        Example("NiceHash EthereumStratum subscribe", True,
                [flow(b'{"id":1,"method":"mining.subscribe","params":["NBMiner/42.3","EthereumStratum/1.0.0"]}\n',
                      dport=3353)]),
        Example("subscribe cut at 512 bytes", True,
                [flow(b'{"id": 1, "method": "mining.subscribe", "params": ["xx' + b"a" * 600, dport=443)]),
        Example("language server on 3333", False,
                [flow(b'Content-Length: 90\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"initialize",'
                      b'"params":{"processId":1,"rootUri":null}}', dport=3333)]),
        Example("log shipper mentioning mining.subscribe", False,
                [flow(b'{"message": "blocked mining.subscribe from 10.0.0.3", "level": "warn"}\n', dport=8080)]),
        Example("TLS client hello on 4444", False,
                [flow(bytes.fromhex("1603010200010001fc0303") + bytes(64), dport=4444)]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        _, messages = flow_messages(event)
        hits = [m for m in messages if m.method in STRATUM_METHODS]
        if not hits:
            return ()
        methods = sorted({m.method for m in hits if m.method})
        complete = [m for m in hits if not m.truncated]
        dialect = variant([m.params for m in complete])
        # Show what the subscribe says about the miner; authorize params hold the pool password.
        subscribe = next((m for m in complete if m.method == "mining.subscribe" and m.params is not None), None)
        detail = f" {params_text(subscribe.params, 80)}" if subscribe is not None else ""
        return [self.finding(event, f"{dialect} {', '.join(methods)} to {where(event)}{detail}",
                             timestamp=event_time(event), score=0.95 if complete else 0.8,
                             fields=flow_fields(event))]
