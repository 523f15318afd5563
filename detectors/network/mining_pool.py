"""Contact with a known mining pool: DNS answers, TLS SNI, destination domains and addresses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import dns, flow
from detectors.network._payload import flow_fields
from detectors.network._poollist import PoolList, load_pool_list
from gpusentry.contract import Dataset, event_time
from gpusentry.settings.detection import DetectionSettings

MAX_REMEMBERED_IPS = 4096
MAX_REPORTED_KEYS = 1024


@dataclass
class PoolState:
    resolved: dict[str, tuple[str, float]] = field(default_factory=dict)  # ip -> (pool name, when learned)
    reported: dict[str, float] = field(default_factory=dict)  # match key -> last report (event time)


class MiningPool(Detector):
    id = "network.mining_pool"
    title = "Contact with a known mining pool"
    description = ("A DNS answer for a known mining-pool domain, a flow whose TLS SNI or destination domain is "
                   "one, a flow to an address a pool's DNS answer gave earlier on the same host, or to a listed "
                   "pool address. Names match on whole labels (nanopool.org matches xmr-eu1.nanopool.org); "
                   "nothing is resolved; private addresses are not exempt (in-cluster proxies, split DNS). "
                   "The list ships with gpusentry and is refreshed with `gpusentry pools refresh`.")
    severity = "high"
    technique = "T1496.001"
    references = ("https://attack.mitre.org/techniques/T1496/001/",)
    datasets = frozenset({Dataset.DNS, Dataset.NETWORK})
    signal = Signal.POOL

    examples: ClassVar[list[Example]] = [
        Example("DNS answer for a nanopool host", True, [dns("xmr-eu1.nanopool.org.", ["185.71.66.20"])]),
        Example("TLS to a pool on 443", True, [flow(None, dport=443, sni="gulf.moneroocean.stream")]),
        Example("flow to an address a pool name resolved to", True,
                [dns("rvn.2miners.com", ["10.20.30.40"], t=0), flow(None, dst="10.20.30.40", dport=6060, t=30)]),
        Example("destination domain of a pool", True, [flow(None, dport=14433, domain="pool.supportxmr.com")]),
        Example("look-alike domain", False, [dns("notnanopool.org", ["198.51.100.4"])]),
        Example("pool statistics site is not a pool", False, [dns("miningpoolstats.stream", ["198.51.100.5"])]),
        Example("huggingface download on 443", False,
                [dns("huggingface.co", ["203.0.113.80"]), flow(None, dst="203.0.113.80", dport=443,
                                                                sni="huggingface.co", t=1)]),
    ]

    def __init__(self, settings: DetectionSettings | None = None, pools: PoolList | None = None) -> None:
        super().__init__(settings)
        self.pools = pools if pools is not None else load_pool_list(self.settings.pools)

    def new_state(self) -> PoolState:
        return PoolState()

    def _once(self, state: PoolState, key: str, ts: float) -> bool:
        """True when ``key`` was not reported in the last ``repeat_after_s`` (and marks it reported)."""
        last = state.reported.get(key)
        if last is not None and 0 <= ts - last < self.settings.pools.repeat_after_s:
            return False
        if len(state.reported) >= MAX_REPORTED_KEYS:
            horizon = ts - self.settings.pools.repeat_after_s
            state.reported = {k: v for k, v in state.reported.items() if v >= horizon}
            while len(state.reported) >= MAX_REPORTED_KEYS:
                state.reported.pop(next(iter(state.reported)))
        state.reported[key] = ts
        return True

    def process(self, event: dict[str, Any], state: PoolState) -> Iterable[Finding]:
        ts = event_time(event)
        if event["event"]["dataset"] == Dataset.DNS.value:
            return self._dns(event, state, ts)
        return self._flow(event, state, ts)

    def _dns(self, event: dict[str, Any], state: PoolState, ts: float) -> list[Finding]:
        question = event["dns"]["question"]["name"]
        ips = [ip for ip in event["dns"]["resolved_ip"] if isinstance(ip, str)]
        entry = self.pools.match_domain(question)
        if entry is not None:
            for ip in ips:
                state.resolved.pop(ip, None)
                state.resolved[ip] = (question.rstrip("."), ts)
            while len(state.resolved) > MAX_REMEMBERED_IPS:
                state.resolved.pop(next(iter(state.resolved)))
            if self._once(state, f"dns:{entry}", ts):
                proc = event.get("process") or {}
                return [self.finding(event, f"DNS answer for mining pool {question.rstrip('.')} (list entry "
                                     f"{entry}): {', '.join(ips[:4]) or 'no address'}", timestamp=ts, score=0.9,
                                     fields={"dns.question.name": question, "destination.domain": question.rstrip("."),
                                             "process.pid": proc.get("pid"), "process.name": proc.get("name")})]
            return []
        listed = [ip for ip in ips if self.pools.match_ip(ip)]
        if listed and self._once(state, f"dnsip:{listed[0]}", ts):
            return [self.finding(event, f"DNS answer for {question} points at listed pool address {listed[0]}",
                                 timestamp=ts, severity="medium", score=0.6,
                                 fields={"dns.question.name": question})]
        return []

    def _flow(self, event: dict[str, Any], state: PoolState, ts: float) -> list[Finding]:
        dst = event["destination"]
        sni = ((event.get("tls") or {}).get("client") or {}).get("server_name")
        port = dst.get("port")
        for name, how in ((sni, "TLS SNI"), (dst.get("domain"), "destination domain")):
            entry = self.pools.match_domain(name)
            if entry is not None and self._once(state, f"name:{entry}:{dst.get('ip')}", ts):
                return [self.finding(event, f"flow to mining pool {name}:{port} ({how}, list entry {entry})",
                                     timestamp=ts, score=0.9, fields=flow_fields(event))]
        ip = dst.get("ip")
        learned = state.resolved.get(ip) if isinstance(ip, str) else None
        if learned is not None and ts - learned[1] <= self.settings.pools.remember_resolved_s:
            if self._once(state, f"learned:{ip}", ts):
                fields = flow_fields(event)
                fields["destination.domain"] = fields.get("destination.domain") or learned[0]
                return [self.finding(event, f"flow to {ip}:{port}, the address mining pool {learned[0]} resolved "
                                     "to", timestamp=ts, score=0.85, fields=fields)]
            return []
        entry = self.pools.match_ip(ip)
        if entry is not None and self._once(state, f"ip:{entry}", ts):
            return [self.finding(event, f"flow to listed mining-pool address {ip}:{port} (list entry {entry})",
                                 timestamp=ts, severity="medium", score=0.6, fields=flow_fields(event))]
        return []
