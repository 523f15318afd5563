"""Knowledge files: facts detectors read (sandbox shapes, tunnel tools, metadata services, ...).

Each file is TOML beside the detector that reads it: a ``version`` and a list of tables, every entry
with a ``source`` saying where the fact was published.  Loading validates everything and names the
file, the list, the entry and the key of the first problem, so a bad edit (or a bad replacement
installed by an operator through the settings) stops start-up with the fix instead of silently
matching nothing.  Facts carry over from public sources; nobody's rule text does.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class KnowledgeError(ValueError):
    """A knowledge file that cannot be used; the message names the file, the entry and the fix."""


def load_entries(path: Path, table: str, *, required: Mapping[str, type | tuple[type, ...]],
                 optional: Mapping[str, type | tuple[type, ...]] | None = None) -> list[dict[str, Any]]:
    """The entries of ``[[table]]`` in ``path``, each checked against the allowed keys and types."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KnowledgeError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise KnowledgeError(f"{path}: not valid TOML: {exc}") from None
    if not isinstance(doc.get("version"), int):
        raise KnowledgeError(f"{path}: needs an integer `version` at the top")
    entries = doc.get(table)
    if not isinstance(entries, list) or not entries:
        raise KnowledgeError(f"{path}: needs at least one [[{table}]] entry")
    allowed = {**required, **(optional or {}), "source": str}
    out = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[{table}]] entry {i}" + (f" ({entry.get('id')!r})" if isinstance(entry, dict)
                                                  and "id" in entry else "")
        if not isinstance(entry, dict):
            raise KnowledgeError(f"{where}: must be a table")
        for key in (*required, "source"):
            if key not in entry:
                raise KnowledgeError(f"{where}: `{key}` is missing" +
                                     (" (every fact says where it was published)" if key == "source" else ""))
        for key, value in entry.items():
            if key not in allowed:
                raise KnowledgeError(f"{where}: unknown key `{key}`; allowed: {', '.join(sorted(allowed))}")
            if not _is(value, allowed[key]):
                raise KnowledgeError(f"{where}: `{key}` must be {_name(allowed[key])}, not {value!r}")
        if not entry["source"].strip():
            raise KnowledgeError(f"{where}: `source` is empty")
        out.append(entry)
    return out


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    if kind is list or (isinstance(kind, tuple) and list in kind):
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind)


def _name(kind: type | tuple[type, ...]) -> str:
    if kind is list:
        return "a list of non-empty strings"
    kinds: Sequence[type] = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "bool": "true or false"}.get(k.__name__, k.__name__)
                       for k in kinds)


# ---------------------------------------------------------------- replacing a shipped file

# The knowledge files an operator may replace, by name: where the shipped one lies (from the repository root) and
# the function that loads and checks one (called with the path; any KnowledgeError is the verdict).
FILES: dict[str, tuple[str, str]] = {
    "miners.toml": ("detectors/process/miners.toml", "detectors.process._miners:load"),
    "miner_options.toml": ("detectors/process/miner_options.toml", "detectors.process._miner_options:load"),
    "tampering.toml": ("detectors/process/tampering.toml", "detectors.process.defense_tampering:load_tampering"),
    "tunnels.toml": ("detectors/process/tunnels.toml", "detectors.process.tunnel:load_tunnels"),
    "reverse_shells.toml": ("detectors/process/reverse_shells.toml", "detectors.process.reverse_shell:load_programs"),
    "sandboxes.toml": ("detectors/sandbox/sandboxes.toml", "detectors.sandbox._lineage:load_shapes"),
    "probing.toml": ("detectors/network/probing.toml", "detectors.network.internal_probe:load_probing"),
    "tunnel_services.toml": ("detectors/network/tunnel_services.toml", "detectors.network.tunnel_wire:load_services"),
    "launchers.toml": ("detectors/gpu/launchers.toml", "detectors.gpu._ownership:load_launchers"),
}
ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 4 * 1024 * 1024

_directory: Path | None = None
_resolved: dict[str, Path] = {}  # name -> the file it was read from, once a detector read it


def use_directory(directory: Path | None) -> None:
    """Read knowledge files from ``directory`` where it holds one of that name (``detection.knowledge_dir``).
    Called once at start-up, before any detector reads its file: a later call would leave detectors on the old
    files, so it is refused."""
    global _directory
    if directory == _directory:
        return
    if _resolved:
        raise RuntimeError(f"knowledge files already read ({', '.join(sorted(_resolved))}) before "
                           "detection.knowledge_dir was applied")
    _directory = directory


def resolve(shipped: Path) -> Path:
    """The file a detector reads in place of ``shipped``: the installed replacement if there is one."""
    path = shipped
    if _directory is not None and (_directory / shipped.name).is_file():
        path = _directory / shipped.name
    _resolved[shipped.name] = path
    return path


def shipped_path(name: str) -> Path:
    if name not in FILES:
        raise KnowledgeError(f"{name!r} is not a knowledge file gpusentry reads; choose one of {', '.join(FILES)}")
    return ROOT / FILES[name][0]


def check(name: str, path: Path) -> dict[str, int]:
    """Load ``path`` as the knowledge file ``name`` (raise :class:`KnowledgeError` with the fix); the number of
    entries per list."""
    import importlib

    shipped_path(name)
    module, _, func = FILES[name][1].partition(":")
    getattr(importlib.import_module(module), func)(path)
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    return {key: len(value) for key, value in doc.items() if isinstance(value, list)}


def install(name: str, text: str, directory: Path, *, source: str) -> tuple[Path, dict[str, int]]:
    """Check ``text`` (read from ``source``) as the knowledge file ``name`` and install it in ``directory``
    atomically: nothing is replaced unless the whole file loads."""
    import os
    import tempfile

    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise KnowledgeError(f"the new {name} is larger than {MAX_FILE_BYTES} bytes; not a knowledge file?")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".toml", dir=directory)
    except OSError as exc:
        raise KnowledgeError(f"cannot write to {directory}: {exc.strerror or exc}; set detection.knowledge_dir to a "
                             "writable directory") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            counts = check(name, Path(tmp))
        except KnowledgeError as exc:
            raise KnowledgeError(str(exc).replace(tmp, source)) from None  # the file the operator gave
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name, counts
