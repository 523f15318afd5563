"""Where an address is: loopback, link-local, internal (``[detection.network] internal_networks``), a
configured bastion, or outside.  Shared by the tunnel, reverse-shell and probing detectors."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from gpusentry.settings.sandboxes import NetworkDetectionSettings

# Names that resolve inside a site, never on the Internet (RFC 6762 .local, RFC 8375 home.arpa, Kubernetes).
INTERNAL_SUFFIXES = (".local", ".internal", ".lan", ".home.arpa", ".cluster.local", ".svc", ".localdomain")

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Places:
    internal: tuple[IPNet, ...]
    bastion_nets: tuple[IPNet, ...]
    bastion_names: frozenset[str]

    def ip(self, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            return None

    def is_local(self, host: str) -> bool:
        """Loopback (and the names for it)."""
        addr = self.ip(host)
        return host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost") or (
            addr is not None and (addr.is_loopback or addr.is_unspecified))

    def is_internal(self, host: str) -> bool:
        addr = self.ip(host)
        if addr is None:
            name = host.lower().rstrip(".")
            return "." not in name or name.endswith(INTERNAL_SUFFIXES)
        return addr.is_loopback or addr.is_link_local or any(addr in n for n in self.internal)

    def is_bastion(self, host: str) -> bool:
        addr = self.ip(host)
        if addr is None:
            name = host.lower().rstrip(".")
            return name in self.bastion_names or any(name.endswith("." + b) for b in self.bastion_names)
        return any(addr in n for n in self.bastion_nets)

    def is_outside(self, host: str) -> bool:
        return not self.is_internal(host) and not self.is_local(host)


@lru_cache(maxsize=16)
def _places(internal: tuple[str, ...], bastions: tuple[str, ...]) -> Places:
    nets, names = [], set()
    for b in bastions:
        try:
            nets.append(ipaddress.ip_network(b, strict=False))
        except ValueError:
            names.add(b.lower().rstrip("."))
    return Places(tuple(ipaddress.ip_network(n, strict=False) for n in internal), tuple(nets), frozenset(names))


def places(settings: NetworkDetectionSettings) -> Places:
    return _places(tuple(settings.internal_networks), tuple(settings.bastions))


def split_destination(text: str) -> str:
    """The host of an SSH-style destination: ``user@host``, ``host:port``, ``ssh://user@host:port``, ``[v6]``."""
    dest = text.removeprefix("ssh://").rsplit("@", 1)[-1]
    if dest.startswith("["):
        return dest[1:].split("]", 1)[0]
    if dest.count(":") == 1:
        dest = dest.split(":", 1)[0]
    return dest.split("/", 1)[0]
