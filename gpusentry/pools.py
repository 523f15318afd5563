"""``gpusentry pools``: show the mining-pool list in use, and refresh it from a file or URL.

``refresh`` validates the whole new list first (every bad line is reported with its number and
the fix) and only then installs it at ``detection.pools.file``, atomically, so a detector never
reads a half-written list and a bad download never replaces a good list.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from detectors.network._poollist import PoolList, PoolListError, entries, load_pool_list, parse_pool_list
from gpusentry.settings.pools import PoolSettings

MAX_LIST_BYTES = 16 * 1024 * 1024
FETCH_TIMEOUT_S = 30.0


class PoolRefreshError(RuntimeError):
    """The new list could not be fetched or is not valid; nothing was installed."""


@dataclass
class RefreshResult:
    path: Path
    domains: int
    ips: int
    networks: int
    skipped: list[PoolListError]


def safe_source(source: str) -> str:
    """A source fit for logs: URLs without credentials or query strings (feeds put API keys there)."""
    if "://" not in source:
        return source
    parts = urlsplit(source)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def fetch(source: str) -> str:
    """The text of a list from a local file or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        shown = safe_source(source)
        # httpx logs every request URL at INFO, and feed URLs carry API keys in their query strings.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").getEffectiveLevel()))
        try:
            with httpx.stream("GET", source, timeout=FETCH_TIMEOUT_S, follow_redirects=True) as response:
                if response.status_code != 200:
                    raise PoolRefreshError(f"{shown} answered HTTP {response.status_code}; check the URL")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_LIST_BYTES:
                        raise PoolRefreshError(f"{shown} sent more than {MAX_LIST_BYTES} bytes; not a pool list?")
                return body.decode("utf-8", "replace")
        except httpx.HTTPError as exc:
            raise PoolRefreshError(f"cannot fetch {shown}: {exc}; check the URL and the network") from None
    path = Path(source).expanduser()
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise PoolRefreshError(f"{path} is larger than {MAX_LIST_BYTES} bytes; not a pool list?")
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise PoolRefreshError(f"cannot read {path}: {exc.strerror or exc}") from None


def render(pools: PoolList, source: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    header = [f"# gpusentry mining-pool list, installed {stamp} from {safe_source(source)}",
              f"# {len(pools.domains)} domains, {len(pools.ips)} addresses, {len(pools.networks)} networks", ""]
    return "\n".join(header + list(entries(pools))) + "\n"


def refresh(source: str, settings: PoolSettings, *, skip_invalid: bool = False) -> RefreshResult:
    """Fetch, validate and install a pool list; raise :class:`PoolRefreshError` and install nothing on error."""
    text = fetch(source)
    pools, errors = parse_pool_list(text, safe_source(source))
    if errors and not skip_invalid:
        shown = "\n".join(f"  {e}" for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise PoolRefreshError(f"{safe_source(source)} has {len(errors)} invalid line(s); nothing installed:\n"
                               f"{shown}{more}\nfix the list, or pass --skip-invalid to install the valid entries")
    if not len(pools):
        raise PoolRefreshError(f"{safe_source(source)} holds no entries; nothing installed")
    path = settings.path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pools-", suffix=".txt", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(pools, source))
        os.replace(tmp, path)
    except OSError as exc:
        raise PoolRefreshError(f"cannot install the list at {path}: {exc.strerror or exc}; set "
                               "detection.pools.file to a writable place") from None
    return RefreshResult(path, len(pools.domains), len(pools.ips), len(pools.networks), errors)


def describe(settings: PoolSettings, *, show_entries: bool = False) -> str:
    pools = load_pool_list(settings)
    path = settings.path()
    installed = f"{path} ({'present' if path.is_file() else 'not installed'})"
    lines = [f"pool list: {len(pools.domains)} domains, {len(pools.ips)} addresses, {len(pools.networks)} networks",
             f"bundled list: {'used' if settings.include_bundled else 'not used (include_bundled = false)'}",
             f"installed list: {installed}",
             f"ignored: {', '.join(settings.ignore) if settings.ignore else 'nothing'}"]
    if show_entries:
        lines += ["", *entries(pools)]
    return "\n".join(lines)
