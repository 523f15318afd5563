"""XMRig / Monero-style mining JSON-RPC: login with an agent or algorithm list, submit, keepalived, getjob."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import flow
from detectors.network._payload import RpcMessage, flow_fields, flow_messages, where
from detectors.process.miner_flags import WALLET
from gpusentry.contract import Dataset, event_time

MINER_AGENTS = re.compile(r"xmrig|xmr-stak|srbminer|teamredminer|wildrig|cpuminer|nanominer|lolminer|"
                          r"rigel|gminer|bzminer|onezerominer|jce|cast.xmr|claymore|ccminer", re.IGNORECASE)


def _login_reasons(m: RpcMessage) -> list[str]:
    params = m.params if isinstance(m.params, dict) else {}
    reasons = []
    agent = params.get("agent")
    if isinstance(agent, str) and MINER_AGENTS.search(agent):
        reasons.append(f"agent {agent[:40]!r}")
    if isinstance(params.get("algo"), list):
        reasons.append(f"algorithms {', '.join(str(a) for a in params['algo'][:4])}")
    login = params.get("login")
    if isinstance(login, str) and WALLET.match(login):
        reasons.append(f"wallet login {login[:12]}...")
    if "rigid" in params:
        reasons.append("rig id")
    return reasons


class MoneroStratumPayload(Detector):
    id = "network.monero_stratum"
    title = "XMRig / Monero mining protocol in an outbound flow"
    description = ("A flow's first client bytes are the JSON-RPC dialect of XMRig-family miners: a `login` whose "
                   "params carry a miner agent, an algorithm list, a wallet address or a rig id, or the `submit`, "
                   "`keepalived` and `getjob` calls with job ids. A bare login with user and password is medium.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://github.com/xmrig/xmrig-proxy/blob/master/doc/STRATUM.md",)
    datasets = frozenset({Dataset.NETWORK})
    signal = Signal.PROTOCOL

    examples: ClassVar[list[Example]] = [
        Example("xmrig login to a pool on 14444", True,
                [flow(b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"4AdUndXHHZ6cfufTMvppY6JwXNou'
                      b'MBzSkbLYfpAV5Usx3skxNgYeYTRj5UzqtReoS44qo9mtmXCqY45DJ852K5Jv2684Rge","pass":"x",'
                      b'"agent":"XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0","algo":["rx/0","cn/r"]}}\n',
                      dport=14444)]),
        Example("keepalived and submit", True,
                [flow(b'{"id":3,"jsonrpc":"2.0","method":"submit","params":{"id":"1","job_id":"abc","nonce":'
                      b'"00000001","result":"ff"}}\n{"id":4,"jsonrpc":"2.0","method":"keepalived",'
                      b'"params":{"id":"1"}}\n', dport=443)]),
        Example("JSON-RPC login of a chat bot", False,
                [flow(b'{"id":1,"jsonrpc":"2.0","method":"auth.login","params":{"user":"bot","password":"x"}}\n',
                      dport=4444)]),
        Example("language server initialize on 3333", False,
                [flow(b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"capabilities":{}}}\n',
                      dport=3333)]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        _, messages = flow_messages(event)
        reasons: list[str] = []
        medium = False
        for m in messages:
            params = m.params if isinstance(m.params, dict) else None
            if m.method == "login" and params is not None and "login" in params:
                found = _login_reasons(m)
                reasons.extend(found)
                medium = medium or not found
            elif m.method == "submit" and params is not None and {"job_id", "nonce"} <= params.keys():
                reasons.append("share submit")
            elif m.method in ("keepalived", "getjob") and params is not None and "id" in params:
                reasons.append(m.method)
        if not reasons and not medium:
            return ()
        if reasons:
            return [self.finding(event, f"XMRig/Monero stratum to {where(event)}: {'; '.join(reasons[:4])}",
                                 timestamp=event_time(event), score=0.95, fields=flow_fields(event))]
        return [self.finding(event, f"Monero-style stratum login (user and password only) to {where(event)}",
                             timestamp=event_time(event), severity="medium", score=0.5,
                             fields=flow_fields(event))]
