"""``gpusentry report``: what each hijack cost, per incident, host, owner, GPU model, day or month.

Input is what the system already writes: the incidents file of ``up`` and the worker, the JSONL of
``replay``, or the alerts topic for a time range. The last update of each incident (by dedup key)
holds its running cost; a resolution closes it. Every figure is the incident's own (busy GPU-seconds
from the samples, energy integrated from the draw, the price list that priced it, see docs/finance.md),
so the report adds nothing it cannot show the source of, and the same input always gives the same bytes:
rows sorted, amounts rounded to fixed places, charts written without dates or random ids.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detectors.base import SEVERITIES
from gpusentry.contract import Dataset, as_dict, get
from gpusentry.timefmt import format_timestamp, parse_timestamp

GROUPS = ("incident", "host", "namespace", "team", "cost-centre", "gpu-model", "day", "month")
FORMATS = ("csv", "json", "html")
SUM_COLUMNS = ("incidents", "busy_gpu_hours", "energy_kwh", "compute", "energy", "total", "unpriced_gpu_hours")
# Label keys that name a team or a cost centre (ECS `labels.*`, Kubernetes label style), in order of preference.
TEAM_LABELS = ("team", "owner_team", "app.kubernetes.io/part-of")
COST_CENTRE_LABELS = ("cost_centre", "cost-centre", "cost_center", "cost-center", "costcenter")
UNATTRIBUTED = "(unattributed)"


class ReportError(ValueError):
    """Input the report cannot use; the message names the file and the fix."""


@dataclass
class Loaded:
    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)  # dedup key -> latest update
    updates: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: why", for lines that are not alerts


def _lines(path: Path) -> Iterator[bytes]:
    from gpusentry.replay import open_text  # plain or gzip, told by the magic bytes, as replay reads

    try:
        with open_text(path) as fh:
            first = fh.readline()
            if first and first[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
                raise ReportError(f"{path}: not a JSONL file of alerts (it starts with {first[:2]!r}); give the "
                                  "incidents file of `gpusentry up`/the worker or the output of `gpusentry replay`")
            if first:
                yield first
            yield from fh  # streamed: a month of updates is hundreds of MiB
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc}); check the path") from None


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when update ``a`` is later than ``b`` (a resolution wins at the same time)."""
    ka = (str(a.get("@timestamp")), get(a, "gpusentry.alert.status") == "resolved",
          get(a, "gpusentry.alert.evidence_count") or 0)
    kb = (str(b.get("@timestamp")), get(b, "gpusentry.alert.status") == "resolved",
          get(b, "gpusentry.alert.evidence_count") or 0)
    return ka >= kb


def fold(alerts: Iterable[tuple[str, dict[str, Any] | None]], out: Loaded | None = None) -> Loaded:
    """Keep the latest update per dedup key; ``alerts`` are (where, alert or None for an unreadable line)."""
    out = out or Loaded()
    for where, alert in alerts:
        if alert is None or get(alert, "event.dataset") != Dataset.ALERT.value:
            out.skipped.append(f"{where}: not a gpusentry.alert")
            continue
        key = get(alert, "gpusentry.alert.dedup_key")
        if not isinstance(key, str) or not key:
            out.skipped.append(f"{where}: alert without gpusentry.alert.dedup_key")
            continue
        out.updates += 1
        known = out.incidents.get(key)
        if known is None or _newer(alert, known):
            out.incidents[key] = alert
    return out


def load_files(paths: Iterable[Path]) -> Loaded:
    out = Loaded()
    for path in paths:
        def alerts(path: Path = path) -> Iterator[tuple[str, dict[str, Any] | None]]:
            for n, line in enumerate(_lines(path), 1):
                if not line.strip():
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    doc = None
                yield f"{path}:{n}", doc if isinstance(doc, dict) else None
        fold(alerts(), out)
    return out


def _labels(alert: Mapping[str, Any]) -> dict[str, str]:
    labels = get(alert, "labels")
    owner = get(alert, "gpusentry.owner.labels")
    out: dict[str, str] = {}
    for src in (labels, owner):
        if isinstance(src, dict):
            out.update({str(k): str(v) for k, v in src.items() if isinstance(v, str | int | float)})
    return out


def _first(labels: Mapping[str, str], keys: Iterable[str]) -> str:
    return next((labels[k] for k in keys if labels.get(k)), UNATTRIBUTED)


def _verdict_of(key: str, host: str, verdicts: Mapping[str, list[dict[str, Any]]]) -> str:
    rows = verdicts.get(key, []) + verdicts.get(f"host={host}", [])
    if not rows:
        return ""
    v = max(rows, key=lambda r: str(r.get("timestamp")))
    return f"{v.get('verdict')} by {v.get('analyst') or '?'} ({v.get('state')}): {v.get('reason') or ''}".strip()


def incident_rows(loaded: Loaded, verdicts: Mapping[str, list[dict[str, Any]]] | None = None,
                  since: float | None = None, until: float | None = None,
                  min_severity: str = "low") -> list[dict[str, Any]]:
    """One ledger row per incident whose evidence overlaps [since, until), at ``min_severity`` or above."""
    rows = []
    floor = SEVERITIES.index(min_severity)
    for key, alert in loaded.incidents.items():
        a = as_dict(get(alert, "gpusentry.alert"))
        if a.get("severity") not in SEVERITIES or SEVERITIES.index(a["severity"]) < floor:
            continue
        cost = as_dict(a.get("cost"))
        first = get(alert, "gpusentry.alert.first_opened") or get(alert, "event.start") or alert.get("@timestamp")
        last = a.get("last_evidence") or alert.get("@timestamp")
        try:
            t_first, t_last = parse_timestamp(str(first)), parse_timestamp(str(last))
        except (TypeError, ValueError):
            continue
        if (since is not None and t_last < since) or (until is not None and t_first >= until):
            continue
        labels = _labels(alert)
        by_model = [m for m in cost.get("by_model") or [] if isinstance(m, dict)]
        host = str(get(alert, "host.name") or "?")
        rows.append({
            "incident_id": key, "host": host,
            "namespace": str(get(alert, "orchestrator.namespace") or UNATTRIBUTED),
            "pod": str(get(alert, "orchestrator.resource.name") or "")
            if get(alert, "orchestrator.resource.type") == "pod" else "",
            "job": str(get(alert, "orchestrator.resource.id") or "")
            if get(alert, "orchestrator.resource.type") == "job" else "",
            "user": str(get(alert, "user.name") or ""),
            "team": _first(labels, TEAM_LABELS), "cost_centre": _first(labels, COST_CENTRE_LABELS),
            "first_evidence": format_timestamp(t_first), "last_evidence": format_timestamp(t_last),
            "duration_h": round((t_last - t_first) / 3600, 4),
            "gpus": int(cost.get("gpus") or 0),
            "gpu_models": "; ".join(sorted({str(m.get("gpu_model")) for m in by_model})),
            "busy_gpu_hours": round(float(cost.get("busy_gpu_seconds") or 0) / 3600, 4),
            "energy_kwh": round(float(cost.get("energy_kwh") or 0), 4),
            "price_source": "; ".join(sorted({f"{m.get('price_model') or 'unpriced'}" for m in by_model})),
            "rate_per_gpu_hour": "; ".join(sorted({f"{m['rate_per_gpu_hour']:.4f}" for m in by_model
                                                   if isinstance(m.get("rate_per_gpu_hour"), int | float)})),
            "compute": round(float(cost.get("compute") or 0), 2),
            "energy": round(float(cost.get("energy") or 0), 2),
            "total": round(float(cost.get("usd") or 0), 2),
            "currency": str(cost.get("currency") or "USD"),
            "price_list": "; ".join(cost.get("price_lists") or [str(cost.get("price_list") or "")]),
            "unpriced_gpu_hours": round(float(cost.get("unpriced_gpu_seconds") or 0) / 3600, 4),
            "severity": str(a.get("severity") or ""), "status": str(a.get("status") or ""),
            "episodes": int(a.get("episode") or 1),
            "analyst_verdict": _verdict_of(key, host, verdicts or {}),
            "_by_model": by_model,
            "_summary": "; ".join(str(e.get("summary")) for e in (a.get("evidence") or [])[:3] if isinstance(e, dict)),
        })
    rows.sort(key=lambda r: (r["first_evidence"], r["incident_id"]))
    return rows


def load_verdicts(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Verdicts from `gpusentry feedback list --all --json`, by dedup key (and `host=<name>` for host scopes)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ReportError(f"{path}:{n}: not JSON; give the output of `gpusentry feedback list --all --json`") \
                from None
        scope = as_dict(row.get("scope")) if isinstance(row, dict) else {}
        if scope.get("dedup_key"):
            out.setdefault(scope["dedup_key"], []).append(row)
        elif set(scope) == {"host.name"}:
            out.setdefault(f"host={scope['host.name']}", []).append(row)
    return out


def group(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Sum the ledger by ``by`` (pandas), in a stable order; ``incident`` returns the rows themselves."""
    import pandas as pd

    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if by == "incident":
        return public
    if by == "gpu-model":  # one part per model of each incident: amounts stay where they were spent
        parts = [{"gpu_model": str(m.get("gpu_model")), "incidents": 1, "currency": r["currency"],
                  "busy_gpu_hours": float(m.get("busy_gpu_seconds") or 0) / 3600,
                  "energy_kwh": float(m.get("energy_kwh") or 0), "compute": float(m.get("compute") or 0),
                  "energy": float(m.get("energy") or 0),
                  "total": float(m.get("compute") or 0) + float(m.get("energy") or 0),
                  "unpriced_gpu_hours": 0.0 if m.get("price_model") else float(m.get("busy_gpu_seconds") or 0) / 3600}
                 for r in rows for m in r["_by_model"]]
        frame, keys = pd.DataFrame(parts), ["gpu_model", "currency"]
    else:
        frame = pd.DataFrame(public).assign(incidents=1)
        column = {"host": "host", "namespace": "namespace", "team": "team", "cost-centre": "cost_centre"}.get(by)
        if column is None:
            column = by
            frame[by] = frame["first_evidence"].str.slice(0, 10 if by == "day" else 7)
        keys = [column, "currency"]
    if frame.empty:
        return []
    summed = frame.groupby(keys, sort=True)[list(SUM_COLUMNS)].sum().reset_index()
    summed["incidents"] = summed["incidents"].astype(int)
    for col, places in (("busy_gpu_hours", 4), ("energy_kwh", 4), ("unpriced_gpu_hours", 4), ("compute", 2),
                        ("energy", 2), ("total", 2)):
        summed[col] = summed[col].round(places)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
            for rec in summed.to_dict(orient="records")]


MONEY = ("compute", "energy", "total")


def to_csv(records: list[dict[str, Any]]) -> bytes:
    import pandas as pd

    if not records:
        return b""
    frame = pd.DataFrame(records)
    for col in MONEY:  # amounts to the cent, quantities to four places: fixed, so the bytes reproduce
        if col in frame:
            frame[col] = frame[col].map(lambda v: f"{v:.2f}")
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n", float_format="%.4f")
    return buf.getvalue().encode()


def to_json(records: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(records, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


# ---------------------------------------------------------------------------- the HTML report


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _charts(rows: list[dict[str, Any]], currency: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "gpusentry-report"  # stable element ids: the same bytes every run
    matplotlib.rcParams["font.family"] = "DejaVu Sans"
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    for title, by, key in (("Cost by month", "month", "month"), ("Cost by team", "team", "team")):
        data = group(rows, by)
        fig, ax = plt.subplots(figsize=(6.4, 2.8))
        labels = [str(d[key]) for d in data]
        ax.bar(labels, [d["compute"] for d in data], label="compute", color="#c0392b")
        ax.bar(labels, [d["energy"] for d in data], bottom=[d["compute"] for d in data], label="energy",
               color="#f39c12")
        ax.set_ylabel(currency)
        ax.set_title(title)
        ax.legend(frameon=False)
        ax.tick_params(axis="x", labelrotation=30 if len(labels) > 4 else 0)
        out[by] = _svg(fig)
        plt.close(fig)
    import datetime as dt

    import matplotlib.dates as mdates

    fig, ax = plt.subplots(figsize=(12.8, max(1.6, 0.28 * min(len(rows), 40) + 0.8)))
    shown = rows[-40:]
    spans = [(parse_timestamp(r["first_evidence"]), parse_timestamp(r["last_evidence"])) for r in shown]
    # Incidents last minutes in a report of weeks: each bar is at least 1/150 of the axis, so it shows.
    least = max((max(e for _, e in spans) - min(s for s, _ in spans)) / 150, 60.0)
    for i, (r, (start, end)) in enumerate(zip(shown, spans, strict=True)):
        colour = {"critical": "#8e0000", "high": "#c0392b", "medium": "#e67e22"}.get(r["severity"], "#7f8c8d")
        left = float(mdates.date2num(dt.datetime.fromtimestamp(start, dt.UTC)))
        ax.barh(i, max(end - start, least) / 86400, left=left, color=colour)
    ax.set_yticks(range(len(shown)), [f"{r['host']} {r['first_evidence'][:10]}" for r in shown], fontsize=7)
    ax.xaxis_date()
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=8))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.set_xlabel("UTC; a bar runs from the first to the last evidence; colour: severity")
    ax.set_title(f"Timeline of the {'last 40 of ' if len(rows) > 40 else ''}{len(rows)} incidents")
    out["timeline"] = _svg(fig)
    plt.close(fig)
    return out


_STYLE = """body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222}h1{margin:0 0 4px}
.muted{color:#666;font-size:13px}.totals{display:flex;gap:16px;margin:16px 0}.card{border:1px solid #ddd;
border-radius:6px;padding:10px 14px;min-width:150px}.card b{display:block;font-size:22px}.charts{display:flex;
flex-wrap:wrap;gap:12px}table{border-collapse:collapse;font-size:12px;width:100%}th,td{border-bottom:1px solid
#eee;padding:4px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere}th{background:#f6f6f6}td.n{text-align:right}"""


def to_html(rows: list[dict[str, Any]], *, title: str, source: str) -> bytes:
    esc = html.escape  # everything in the rows came from monitored hosts or analysts: text, never markup
    currency = rows[0]["currency"] if rows else "USD"
    total = sum(r["total"] for r in rows)
    charts = _charts(rows, currency) if rows else {}
    cards = [("incidents", f"{len(rows)}"), ("busy GPU-hours", f"{sum(r['busy_gpu_hours'] for r in rows):,.2f}"),
             ("energy", f"{sum(r['energy_kwh'] for r in rows):,.2f} kWh"),
             (f"cost ({currency})", f"{total:,.2f}"),
             ("unpriced GPU-hours", f"{sum(r['unpriced_gpu_hours'] for r in rows):,.2f}")]
    top = sorted(rows, key=lambda r: (-r["total"], r["incident_id"]))[:25]
    cols = ("incident_id", "host", "team", "first_evidence", "duration_h", "gpus", "gpu_models", "busy_gpu_hours",
            "compute", "energy", "total", "severity", "status", "analyst_verdict")
    numeric = {"duration_h", "gpus", "busy_gpu_hours", "energy_kwh", "compute", "energy", "total"}
    head = "".join(f"<th>{esc(c)}</th>" for c in (*cols, "evidence"))
    def cell(c: str, v: Any) -> str:
        text = f"{v:,.2f}" if c in MONEY else str(v)
        return f"<td class=\"{'n' if c in numeric else ''}\">{esc(text)}</td>"

    body = "".join("<tr>" + "".join(cell(c, r[c]) for c in cols)
                   + f"<td>{esc(r['_summary'][:300])}</td></tr>" for r in top)
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1><div class=\"muted\">source: {esc(source)}; amounts in {esc(currency)}; figures "
        "as docs/finance.md defines them</div>",
        "<div class=\"totals\">" + "".join(f"<div class=\"card\">{esc(k)}<b>{esc(v)}</b></div>" for k, v in cards)
        + "</div>",
        "<div class=\"charts\">" + "".join(charts.get(k, "") for k in ("month", "team")) + "</div>",
        charts.get("timeline", ""),
        f"<h2>Top incidents by cost</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        "</body></html>\n",
    ]
    return "".join(parts).encode()


def render(rows: list[dict[str, Any]], *, by: str, fmt: str, title: str = "GPU hijacking cost report",
           source: str = "") -> bytes:
    if fmt == "html":
        return to_html(rows, title=title, source=source)
    records = group(rows, by)
    return to_csv(records) if fmt == "csv" else to_json(records)


def load_topic(cfg: Any, since: float | None, until: float | None, *, timeout_s: float = 30.0) -> Loaded:
    """The alerts topic from the offsets of ``since`` (Kafka record time) to its end or ``until``."""
    from gpusentry.topic_range import TopicReadError, read_range

    out = Loaded()
    topic = cfg.topics.alerts
    try:
        for p, off, _ts, value in read_range(cfg, topic, since, until, timeout_s=timeout_s):
            try:
                doc = orjson.loads(value) if value else None
            except orjson.JSONDecodeError:
                doc = None
            fold([(f"{topic}[{p}]@{off}", doc if isinstance(doc, dict) else None)], out)
    except TopicReadError as exc:
        raise ReportError(str(exc)) from None
    return out
