"""A heuristic for the Stratum V2 handshake: a lone 64-byte random key as a flow's first message.

Stratum V2 encrypts everything after a Noise NX handshake.  Its first message, client to pool, is
the client's ephemeral public key: 64 bytes in ElligatorSwift encoding (32 in early drafts),
indistinguishable from random, after which the client waits for the pool's answer.  So a flow
whose client side sent exactly one 64-byte (or 32-byte) high-entropy blob, to a port that is not a
TLS, SSH or VPN port, and which starts no known protocol, is probably a Stratum V2 handshake.
Other Noise-based protocols look the same, so this is medium; the registered Stratum V2 port
(34254) makes it high.

Limit: the host agent reports a flow's first segment, which is exactly the key.  ``replay`` of a
capture reassembles up to 512 client bytes, so a captured *complete* session (key followed by the
encrypted frames) is longer than the key and does not match; a handshake the pool never answered does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import flow
from detectors.network._payload import flow_fields, flow_messages, where
from gpusentry.contract import Dataset, event_time

HANDSHAKE_SIZES = frozenset({64, 32})
SV2_PORTS = frozenset({34254, 34255})
# Ports whose protocols start with random-looking bytes or are encrypted from the first byte.
ENCRYPTED_PORTS = frozenset({22, 443, 465, 500, 636, 853, 993, 995, 1194, 1701, 1723, 4500, 5061, 8443, 9735,
                             51820, 41641, 3478, 5349})
_KNOWN_MAGIC = (b"\x16\x03", b"SSH-", b"GET ", b"POST", b"HEAD", b"PUT ", b"PRI ", b"\x00\x00\x00", b"{", b"[",
                b"\x05\x01", b"\x04\x01")


def looks_random(data: bytes) -> bool:
    """Enough distinct bytes and few printable ones for a key (64 random bytes: ~58 distinct, ~37 % printable)."""
    distinct = len(set(data))
    printable = sum(1 for b in data if 32 <= b < 127)
    return distinct >= len(data) * 0.7 and printable <= len(data) * 0.7


class StratumV2Handshake(Detector):
    id = "network.stratum_v2_handshake"
    title = "Probable Stratum V2 (Noise NX) handshake"
    description = ("A flow's client side sent exactly one 64-byte (or 32-byte) random-looking message, to a port "
                   "that is not TLS/SSH/VPN, starting no known protocol: the Noise NX ephemeral key that opens "
                   "an encrypted Stratum V2 mining session. Heuristic: medium, high on the Stratum V2 port 34254.")
    severity = "medium"
    technique = "T1496.001"
    references = ("https://stratumprotocol.org/specification/04-Protocol-Security/",
                  "https://github.com/stratum-mining/sv2-spec")
    datasets = frozenset({Dataset.NETWORK})
    signal = Signal.PROTOCOL

    examples: ClassVar[list[Example]] = [
        Example("64-byte key to a pool port", True,
                [flow(bytes.fromhex("9f3c7a1e52d8b06e4f19a2c37d58e0b6" "11c4f0a9837b2d65e8f4a1c0b9d2736a"
                                    "5e8d2c7f41b09a36d1e7f8025c4b93ae" "07f2d8c1b5a4e3960f7c28d1a6b3e549"), dport=34254)]),
        Example("64-byte key to an odd port", True,
                [flow(bytes(range(200, 232)) + bytes(range(17, 49)), dport=3336)]),
        Example("64 random bytes on 443", False,
                [flow(bytes(range(200, 232)) + bytes(range(17, 49)), dport=443)]),
        Example("64 ASCII bytes", False, [flow(b"hello from a health checker, nothing to see, just text....ok!\n",
                                               dport=3336)]),
        Example("redis ping", False, [flow(b"*1\r\n$4\r\nPING\r\n", dport=6379)]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        data, _ = flow_messages(event)
        if data is None or len(data) not in HANDSHAKE_SIZES:
            return ()
        port = (event.get("destination") or {}).get("port")
        if port in ENCRYPTED_PORTS or data.startswith(_KNOWN_MAGIC) or not looks_random(data):
            return ()
        high = port in SV2_PORTS
        return [self.finding(event, f"{len(data)}-byte random first message to {where(event)}: probable "
                             "Stratum V2 Noise handshake", timestamp=event_time(event),
                             severity="high" if high else "medium", score=0.8 if high else 0.45,
                             fields=flow_fields(event))]
