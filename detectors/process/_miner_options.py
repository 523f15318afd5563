"""Miner command-line vocabulary read from ``miner_options.toml``: pool URL schemes, options by role, mining
algorithms and coin address formats (the facts; :mod:`detectors.process.miner_flags` weighs them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gpusentry.knowledge import KnowledgeError, load_entries, resolve

OPTIONS_FILE = Path(__file__).with_name("miner_options.toml")
ROLES = ("pool", "user", "algorithm", "miner_only", "weak")
_SCHEME = re.compile(r"^[a-z][a-z0-9]*(?:\+[a-z0-9]+)?$")


@dataclass(frozen=True)
class MinerOptions:
    pool_url: re.Pattern[str]  # a value that is a pool URL (``stratum+tcp://...``, ``url=stratum+ssl://...``)
    options: dict[str, frozenset[str]]  # role -> option names
    algorithms: frozenset[str]  # lower-case
    wallet: re.Pattern[str]  # a user value that is a coin address (with an optional COIN: prefix and .worker)


def load(path: Path | None = None) -> MinerOptions:
    path = path or resolve(OPTIONS_FILE)
    schemes: list[str] = []
    for entry in load_entries(path, "scheme", required={"id": str, "names": list}):
        for name in entry["names"]:
            if not _SCHEME.match(name.lower()):
                raise KnowledgeError(f"{path}: [[scheme]] {entry['id']!r}: {name!r} is not a URL scheme (letters and "
                                     "digits, one optional +transport, no ://)")
            schemes.append(name.lower())
    options: dict[str, set[str]] = {role: set() for role in ROLES}
    for entry in load_entries(path, "option", required={"id": str, "role": str, "names": list}):
        if entry["role"] not in ROLES:
            raise KnowledgeError(f"{path}: [[option]] {entry['id']!r}: role {entry['role']!r} is not one of "
                                 f"{', '.join(ROLES)}")
        for name in entry["names"]:
            if not name.startswith("-") or any(c.isspace() for c in name) or "=" in name:
                raise KnowledgeError(f"{path}: [[option]] {entry['id']!r}: {name!r} is not an option as typed "
                                     "(starts with -, no spaces, no =value)")
            options[entry["role"]].add(name)
    algorithms = frozenset(n.lower() for e in load_entries(path, "algorithm", required={"id": str, "names": list})
                           for n in e["names"])
    patterns = []
    for entry in load_entries(path, "wallet", required={"id": str, "pattern": str}):
        try:
            re.compile(entry["pattern"])
        except re.error as exc:
            raise KnowledgeError(f"{path}: [[wallet]] {entry['id']!r}: `pattern` is not a regular expression "
                                 f"({exc})") from None
        if re.fullmatch(entry["pattern"], ""):
            raise KnowledgeError(f"{path}: [[wallet]] {entry['id']!r}: `pattern` matches the empty string")
        patterns.append(f"(?:{entry['pattern']})")
    # Longest first, so ``ethstratum2+tcp`` is tried before ``ethstratum``.
    alternatives = "|".join(re.escape(s) for s in sorted(set(schemes), key=len, reverse=True))
    return MinerOptions(
        pool_url=re.compile(rf"^(?:[a-z]+=)?(?:{alternatives})://", re.IGNORECASE),
        options={role: frozenset(names) for role, names in options.items()},
        algorithms=algorithms,
        # A pool user is often ``COIN:address.worker`` or ``address+difficulty``.
        wallet=re.compile(rf"^(?:[A-Za-z]{{2,6}}:)?(?:{'|'.join(patterns)})(?:[./+][\w.+-]*)?$"))


OPTIONS = load()
