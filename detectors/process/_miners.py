"""Miner knowledge read from ``miners.toml``: family names, miner container images, known cryptojacking malware."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gpusentry.knowledge import KnowledgeError, load_entries, resolve

MINERS_FILE = Path(__file__).with_name("miners.toml")
# -6.21.0, _v1.31, -v2, .exe; not a bare -64 (Cisco's traffic generator t-rex-64 is not the T-Rex miner).
_VERSION_SUFFIX = re.compile(r"[-_.]?(v\d+(\.\d+)*|\d+(\.\d+)+)?(\.exe)?$")


@dataclass(frozen=True)
class Malware:
    id: str
    names: frozenset[str]
    paths: tuple[str, ...]
    unique: bool
    source: str


@dataclass(frozen=True)
class MinerKnowledge:
    families: dict[str, str]  # executable base name -> family id
    common: frozenset[str]  # names other software uses too: the family's, but evidence only beside its flags
    images: dict[str, str]  # image repository -> source
    malware: tuple[Malware, ...]
    layouts: dict[str, str]  # directory name -> layout id (a pool installer's miner directory)

    def layout(self, path: str | None) -> str | None:
        """The miner-installer layout a path lies in (``/home/u/c3pool/xmrig``), if any."""
        if not path or "/" not in path:
            return None
        for part in path.split("/")[:-1]:
            layout = self.layouts.get(part.lower())
            if layout is not None:
                return layout
        return None

    def family(self, name: str | None) -> str | None:
        """The miner family an executable name belongs to (``xmrig-6.21.0`` is xmrig), if any."""
        if not name:
            return None
        raw = name.rsplit("/", 1)[-1].lower()
        return self.families.get(raw) or self.families.get(_VERSION_SUFFIX.sub("", raw) or raw)

    def release_dir(self, path: str | None) -> tuple[str, str] | None:
        """(family, directory) when ``path`` lies in a miner's unpacked release directory (``xmrig-6.22.2``,
        ``t-rex-0.26.8``): whatever the file is called, it is the release's, renamed or not."""
        if not path or "/" not in path:
            return None
        for part in path.split("/")[:-1]:
            if not any(ch.isdigit() for ch in part):
                continue  # a release directory carries its version; a source checkout (``src/xmrig``) does not
            family = self.family(part)
            if family is not None and not self.generic(part):
                return family, part
        return None

    def generic(self, name: str) -> bool:
        """``miner`` (GMiner's binary), ``excavator``: words other software is called too, never evidence by the
        name alone (the family's ``common_names``)."""
        raw = name.rsplit("/", 1)[-1].lower()
        return (_VERSION_SUFFIX.sub("", raw) or raw) in self.common

    def image(self, reference: str) -> str | None:
        """Why a container image reference is a miner's (``docker.io/xmrig/xmrig:latest``), if it is."""
        repo = image_repository(reference)
        if repo in self.images:
            return f"known miner image {repo}"
        last = repo.rsplit("/", 1)[-1]
        family = self.family(last)
        if family is not None and not self.generic(last):
            return f"image {repo} named after the {family} miner"
        return None


def image_repository(reference: str) -> str:
    """``registry:5000/ns/name:tag@sha256:...`` -> ``ns/name`` (Docker Hub's ``library/`` and ``docker.io`` dropped)."""
    ref = reference.split("@", 1)[0]
    head, _, tail = ref.rpartition("/")
    if ":" in tail:
        tail = tail.split(":", 1)[0]
    parts = [p for p in (head.split("/") if head else []) if p] + [tail]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]  # a registry host
    if len(parts) > 1 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts).lower()


def load(path: Path | None = None) -> MinerKnowledge:
    path = path or resolve(MINERS_FILE)
    families: dict[str, str] = {}
    common: set[str] = set()
    for entry in load_entries(path, "family", required={"id": str, "names": list},
                              optional={"common_names": list}):
        if not entry["names"] and not entry.get("common_names"):
            raise KnowledgeError(f"{path}: [[family]] {entry['id']!r}: needs `names` or `common_names`")
        for name in entry["names"] + entry.get("common_names", []):
            families[name.lower()] = entry["id"]
        common.update(n.lower() for n in entry.get("common_names", []))
    images = {e["repository"].lower(): e["source"]
              for e in load_entries(path, "image", required={"repository": str})}
    malware = tuple(Malware(e["id"], frozenset(n.lower() for n in e.get("names", [])), tuple(e.get("paths", [])),
                            bool(e["unique"]), e["source"])
                    for e in load_entries(path, "malware", required={"id": str, "unique": bool},
                                          optional={"names": list, "paths": list}))
    layouts = {d.lower(): e["id"] for e in load_entries(path, "layout", required={"id": str, "directories": list})
               for d in e["directories"]}
    return MinerKnowledge(families, frozenset(common), images, malware, layouts)


KNOWLEDGE = load()
