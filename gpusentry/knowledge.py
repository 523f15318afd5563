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
