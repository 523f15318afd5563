"""The mining-pool list: parsing with line-numbered errors, and matching names and addresses.

Names match on whole labels from the right: the entry ``nanopool.org`` matches ``nanopool.org`` and
``xmr-eu1.nanopool.org`` but not ``notnanopool.org``.  Addresses match exactly or by CIDR network.
Private addresses are matched like any other: an in-cluster stratum proxy is listed by its private
address, and split DNS can resolve a pool name to one.  Nothing is ever resolved here.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gpusentry.settings.pools import PoolSettings

log = logging.getLogger(__name__)
BUNDLED = "pools.txt"
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^(?:{_LABEL}\.)+[a-z][a-z0-9-]{{0,62}}$")
# Registry suffixes that look like domains: an entry equal to one would match half the internet.
PUBLIC_SUFFIXES = frozenset({
    "co.uk", "org.uk", "ac.uk", "gov.uk", "com.cn", "net.cn", "org.cn", "com.au", "net.au", "com.br", "co.jp",
    "ne.jp", "co.kr", "com.tw", "com.hk", "com.sg", "co.in", "co.za", "com.mx", "com.tr", "com.ru", "github.io",
    "herokuapp.com", "amazonaws.com", "cloudfront.net", "azurewebsites.net", "appspot.com", "web.app",
})
MIN_PREFIX = {4: 16, 6: 32}  # broader networks are refused: they would match unrelated hosting


@dataclass(frozen=True)
class PoolListError:
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.text!r}: {self.reason}"


@dataclass
class PoolList:
    domains: set[str] = field(default_factory=set)
    ips: set[str] = field(default_factory=set)
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    ignore_domains: set[str] = field(default_factory=set)
    ignore_ips: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.domains) + len(self.ips) + len(self.networks)

    def merge(self, other: PoolList) -> None:
        self.domains |= other.domains
        self.ips |= other.ips
        self.networks.extend(n for n in other.networks if n not in self.networks)
        self.sources.extend(other.sources)

    def match_domain(self, name: str | None) -> str | None:
        """The list entry ``name`` falls under, or None."""
        if not name or not isinstance(name, str):
            return None
        name = name.strip().rstrip(".").lower()
        if _suffix_in(name, self.ignore_domains):
            return None
        return _suffix_in(name, self.domains)

    def match_ip(self, ip: str | None) -> str | None:
        if not ip or not isinstance(ip, str):
            return None
        try:
            addr = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
        text = str(addr)
        if text in self.ignore_ips:
            return None
        if text in self.ips:
            return text
        for net in self.networks:
            if addr.version == net.version and addr in net:
                return str(net)
        return None


def _suffix_in(name: str, entries: set[str]) -> str | None:
    if not entries:
        return None
    if name in entries:
        return name
    dot = name.find(".")
    while dot != -1:
        suffix = name[dot + 1:]
        if suffix in entries:
            return suffix
        dot = name.find(".", dot + 1)
    return None


def parse_entry(raw: str) -> tuple[str, str] | str:
    """("domain"|"ip"|"network", normalised entry), or the reason it is refused."""
    text = raw.strip().lower()
    if "://" in text:  # stratum+tcp://pool.example:3333
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0] if "/" in text and not re.match(r"^[0-9a-f:.]+/\d+$", text) else text
    if text.startswith("*."):
        text = text[2:]
    text = text.lstrip(".").rstrip(".")
    if re.match(r"^[0-9a-f:.]+/\d+$", text):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            return f"not a valid network: {exc}"
        if net.prefixlen < MIN_PREFIX[net.version]:
            return f"network too broad (/{net.prefixlen}); use /{MIN_PREFIX[net.version]} or narrower"
        return "network", str(net)
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if port and port.isdigit():
        text = host
    try:
        return "ip", str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if re.fullmatch(r"[a-z][a-z0-9-]{0,62}", text):
        return "a bare top-level domain would match everything under it"
    if not _DOMAIN.match(text) or len(text) > 253:
        return "not a domain, IP address or CIDR network"
    if text in PUBLIC_SUFFIXES:
        return "a public registry suffix would match unrelated sites"
    return "domain", text


def parse_pool_list(text: str, source: str = "<text>") -> tuple[PoolList, list[PoolListError]]:
    pools = PoolList(sources=[source])
    errors: list[PoolListError] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.split()
        if len(parts) == 2 and parts[0] in ("0.0.0.0", "127.0.0.1", "::", "::1"):  # hosts-file format
            parts = parts[1:]
        if len(parts) != 1:
            errors.append(PoolListError(lineno, body, "one entry per line"))
            continue
        parsed = parse_entry(parts[0])
        if isinstance(parsed, str):
            errors.append(PoolListError(lineno, body, parsed))
            continue
        kind, value = parsed
        if kind == "domain":
            pools.domains.add(value)
        elif kind == "ip":
            pools.ips.add(value)
        else:
            pools.networks.append(ipaddress.ip_network(value))
    return pools, errors


def bundled_text() -> str:
    return resources.files("detectors.network").joinpath(BUNDLED).read_text(encoding="utf-8")


def load_pool_list(settings: PoolSettings) -> PoolList:
    """The effective list: the bundled one (unless turned off) plus the installed file, minus ``ignore``.

    Bad lines in an installed file are skipped here (``pools refresh`` refuses them before install),
    so a hand-edited file never stops detection.
    """
    pools = PoolList(sources=[])
    if settings.include_bundled:
        pools.merge(parse_pool_list(bundled_text(), "bundled")[0])
    path: Path = settings.path()
    if path.is_file():
        try:
            installed, _ = parse_pool_list(path.read_text(encoding="utf-8", errors="replace"), str(path))
        except OSError as exc:
            log.warning("pool list %s cannot be read (%s); using the bundled list only", path, exc)
            installed = PoolList()
        pools.merge(installed)
    for raw in settings.ignore:
        parsed = parse_entry(raw)
        if isinstance(parsed, tuple):
            (pools.ignore_domains if parsed[0] == "domain" else pools.ignore_ips).add(parsed[1])
    return pools


def entries(pools: PoolList) -> Iterable[str]:
    yield from sorted(pools.domains)
    yield from sorted(pools.ips)
    yield from (str(n) for n in pools.networks)
