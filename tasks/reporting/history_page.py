"""The line's history: one self-contained HTML page with every night of a line.

``<storage>/results/<line>/history.html`` — the folder that holds each night's default result
folder ``<storage>/results/<line>/<batch>``, whatever ``--out`` a night used — shows, per
recorded batch: N scored, set aside, flagged, the quantiles of the scores before RsCon (map
maxima, comparable across nights; RsCon normalizes each pool), the flag threshold, the
operators' verdicts, the drift from the bank and a link to the night's report; and two inline
SVG plots over time (score quantiles; flagged and set-aside counts). Like the run report it
has no script and no external asset, and every string from the records is escaped. Links
between the page and the nights' reports are relative where both lie in that folder
(:func:`history_link`), so they work when the folder is copied or served.

Drift (:func:`musc_core.decisions.score_drift`): the median of a night's scores minus the
median of its bank's scores (the earlier nights it was scored with), in robust sigmas of the
bank's scores; beyond 3 the night is marked.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.storage import split_url
from musc_core.decisions import DRIFT_K, score_drift
from tasks.records.batch_record import list_batches, read_batch_record
from tasks.records.result_store import ResultStore, safe_file_stem
from tasks.records.verdicts import latest_verdicts, read_verdicts


@dataclass(frozen=True)
class Night:
    """One recorded batch as the history shows it.

    Attributes:
        batch: batch id.
        scored: samples scored.
        set_aside: samples set aside.
        flagged: samples flagged.
        quantiles: min, 25 %, median, 75 %, max of the scores before RsCon (empty if unknown).
        threshold: flag threshold on the RsCon scores (None if unknown).
        verdicts: ``{sample: verdict}`` of the operators on this batch.
        drift: median shift from the bank in robust sigmas (None without a bank).
        report: link to the night's report: relative to the page when the report lies in
            the page's folder (``<batch>/report.html``), else its URL ("" if unknown).
    """

    batch: str
    scored: int
    set_aside: int
    flagged: int
    quantiles: tuple[float, ...]
    threshold: float | None
    verdicts: dict[str, str]
    drift: float | None
    report: str


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _read_run(out: str) -> tuple[dict, dict[str, float]]:
    """A night's ``run.json`` and scores before RsCon by name (empty when missing)."""
    store = ResultStore(out)
    try:
        run = json.loads(store.read_bytes("run.json"))
        text = store.read_bytes("scores.csv").decode("utf-8")
    except (FileNotFoundError, ValueError):
        return {}, {}
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    header = rows[0] if rows else []
    scores = {}
    for row in rows[1:]:
        entry = dict(zip(header, row, strict=False))
        scores[entry["name"]] = float(entry["score"])
    return run, scores


def _line_folder(storage: str, line: str) -> tuple[str, str]:
    """(protocol, path) of the folder holding the history page and the default results."""
    protocol, root = split_url(storage)
    return protocol, posixpath.dirname(f"{root}/{history_location(storage, line)}")


def _report_link(storage: str, line: str, report: str) -> str:
    """A night's report as the history page links it.

    Relative when the report lies in the page's folder (``<batch>/report.html``: the link
    survives copying or serving the folder), else its location as a URL (``file://`` for a
    local path).
    """
    if not report:
        return ""
    protocol, folder = _line_folder(storage, line)
    report_protocol, path = split_url(report)
    if report_protocol == protocol and path.startswith(folder + "/"):
        return path[len(folder) + 1 :]
    return report if "://" in report else Path(report).as_uri()


def line_nights(storage: str, line: str) -> list[Night]:
    """Every recorded batch of a line, oldest first, with what its results say.

    Args:
        storage: storage root of the line's batch records.
        line: the line.

    Returns:
        One :class:`Night` per batch (batches whose results are gone show counts only).
    """
    verdicts = latest_verdicts(read_verdicts(storage, line))
    scores_of: dict[str, dict[str, float]] = {}
    nights = []
    for batch in list_batches(storage, line):
        record = read_batch_record(storage, line, batch)
        run, scores = _read_run(record.out)
        scores_of[batch] = scores
        values = np.array(list(scores.values()), dtype=np.float64)
        quantiles = tuple(
            float(q) for q in np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
        ) if values.size else ()
        bank = [s for b in record.bank for s in scores_of.get(b, {}).values()]
        drift = score_drift(values, bank).shift if values.size and bank else None
        threshold = run.get("flag_threshold")
        nights.append(
            Night(
                batch=batch,
                scored=len(record.samples),
                set_aside=len(record.set_aside),
                flagged=len(record.flagged),
                quantiles=quantiles,
                threshold=None if threshold is None else float(threshold),
                verdicts={s: v["verdict"] for (b, s), v in verdicts.items() if b == batch},
                drift=drift,
                report=_report_link(storage, line, str(run.get("outputs", {}).get("report", ""))),
            )
        )
    return nights


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.4g}"


def _plot(title: str, series: dict[str, list[float | None]], colours: dict[str, str]) -> str:
    """A line plot over the nights (one polyline per series, gaps for None)."""
    width, height, left, bottom, top = 520, 220, 48, 28, 18
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    count = max((len(vs) for vs in series.values()), default=0)
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0

    def x(i: int) -> float:
        return left + (width - left - 12) * (i / max(count - 1, 1))

    def y(v: float) -> float:
        return height - bottom - (height - bottom - top) * (v - low) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
        f'<path d="M{left},{top} V{height - bottom} H{width - 12}" fill="none" '
        'stroke="#495057"/>',
        f'<text x="{left - 4}" y="{y(high) + 4:.1f}" font-size="10" text-anchor="end">'
        f"{_esc(_fmt(high))}</text>",
        f'<text x="{left - 4}" y="{y(low) + 4:.1f}" font-size="10" text-anchor="end">'
        f"{_esc(_fmt(low))}</text>",
    ]
    for i in range(count):
        parts.append(
            f'<text x="{x(i):.1f}" y="{height - 10}" font-size="10" text-anchor="middle">'
            f"{i + 1}</text>"
        )
    legend_x = left + 8
    for name, vs in series.items():
        points = [
            f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vs) if v is not None and math.isfinite(v)
        ]
        if points:
            parts.append(
                f'<polyline class="series" points="{" ".join(points)}" fill="none" '
                f'stroke="{colours[name]}" stroke-width="2"/>'
            )
        parts.append(
            f'<text x="{legend_x}" y="12" font-size="10" fill="{colours[name]}">{_esc(name)}'
            "</text>"
        )
        legend_x += 90
    parts.append("</svg>")
    return "".join(parts)


def render_history(line: str, nights: list[Night], drift_limit: float = DRIFT_K) -> str:
    """The history page of a line.

    Args:
        line: the line.
        nights: from :func:`line_nights`, oldest first.
        drift_limit: nights whose |drift| exceeds this are marked.

    Returns:
        The HTML document.
    """
    rows = []
    for index, night in enumerate(nights, 1):
        q = night.quantiles
        drifted = night.drift is not None and abs(night.drift) > drift_limit
        verdicts = ", ".join(f"{_esc(s)}: {_esc(v)}" for s, v in sorted(night.verdicts.items()))
        link = f'<a href="{_esc(night.report)}">report</a>' if night.report else "–"
        rows.append(
            f'<tr{" class=drift" if drifted else ""}><td>{index}</td><td>{_esc(night.batch)}'
            f"</td><td>{night.scored}</td><td>{night.set_aside}</td><td>{night.flagged}</td>"
            + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in (q or (None,) * 5))
            + f"<td>{_esc(_fmt(night.threshold))}</td><td>{verdicts or '–'}</td>"
            f"<td>{_esc(_fmt(night.drift))}{' ⚠ drift' if drifted else ''}</td><td>{link}</td>"
            "</tr>"
        )
    warned = [n.batch for n in nights if n.drift is not None and abs(n.drift) > drift_limit]
    warning = ""
    if warned:
        warning = (
            '<p class="warn" role="alert"><strong>Drift:</strong> the median score of '
            f"{_esc(', '.join(warned))} is more than {drift_limit:g} robust sigmas away from "
            "its bank's (check the parts, the camera and the lighting).</p>"
        )
    quantile_plot = _plot(
        "Scores before RsCon per night (quartiles and median)",
        {
            "25 %": [n.quantiles[1] if n.quantiles else None for n in nights],
            "median": [n.quantiles[2] if n.quantiles else None for n in nights],
            "75 %": [n.quantiles[3] if n.quantiles else None for n in nights],
        },
        {"25 %": "#74c0fc", "median": "#1971c2", "75 %": "#74c0fc"},
    )
    count_plot = _plot(
        "Flagged and set-aside samples per night",
        {
            "flagged": [float(n.flagged) for n in nights],
            "set aside": [float(n.set_aside) for n in nights],
        },
        {"flagged": "#c92a2a", "set aside": "#868e96"},
    )
    header = (
        "<tr><th>night</th><th>batch</th><th>N</th><th>set aside</th><th>flagged</th>"
        "<th>min</th><th>25 %</th><th>median</th><th>75 %</th><th>max</th>"
        "<th>flag threshold (RsCon)</th><th>verdicts</th><th>drift (σ)</th><th>report</th></tr>"
    )
    css = (
        "body{font-family:system-ui,sans-serif;margin:0;background:#f8f9fa;color:#212529}"
        "main{max-width:1200px;margin:0 auto;padding:16px 24px}"
        "table{border-collapse:collapse;background:#fff;font-size:.9rem}"
        "th,td{border:1px solid #dee2e6;padding:3px 8px}tr.drift{background:#fff3bf}"
        ".warn{background:#fff3bf;border-left:4px solid #f08c00;padding:8px 12px}"
        "svg{background:#fff;border:1px solid #dee2e6;margin:8px 8px 0 0}"
    )
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>musc line history — {_esc(line)}</title><style>{css}</style></head><body><main>"
        f"<h1>Line history — {_esc(line)}</h1><p>{len(nights)} night(s). Scores are the "
        "samples' map maxima before RsCon; drift is the median shift from the night's bank in "
        f"robust sigmas (1.4826 · MAD of the bank's scores), marked beyond {drift_limit:g}.</p>"
        f'{warning}<section id="plots">{quantile_plot}{count_plot}</section>'
        f'<section id="nights"><table><thead>{header}</thead><tbody>{"".join(rows)}</tbody>'
        "</table></section></main></body></html>\n"
    )


def history_location(storage: str, line: str) -> str:
    """Where the history page of a line goes: ``<storage>/results/<line>/history.html``."""
    return f"results/{safe_file_stem(line)}/history.html"


def history_link(storage: str, line: str, out: str) -> str:
    """How a night's report links to the line's history page.

    The page is ``<storage>/results/<line>/history.html``, the folder that holds each
    night's default result folder (``<storage>/results/<line>/<batch>``). A report written
    there links to it relatively (``../history.html``: the link survives copying or serving
    the results folder); a report written elsewhere (``--out``) links to the page's location.

    Args:
        storage: storage root.
        line: the line.
        out: the night's output prefix.

    Returns:
        ``"../history.html"`` or the page's location (local path or URL).
    """
    protocol, folder = _line_folder(storage, line)
    out_protocol, out_root = split_url(out)
    if out_protocol == protocol and posixpath.dirname(out_root) == folder:
        return "../history.html"
    return ResultStore(storage).location(history_location(storage, line))


#: Renderings of the history page at most while other runs of the line keep recording.
HISTORY_RENDERINGS = 5


def write_history(storage: str, line: str) -> str:
    """Render and store the history page of a line; returns its location.

    Runs of one line that finish together each record their batch, then write the page: a
    run renders the page again when the line's batches changed while it rendered and wrote
    it (up to :data:`HISTORY_RENDERINGS` times), so the last page written lists every batch
    recorded before it, whichever run wrote it.
    """
    store = ResultStore(storage)
    for _ in range(HISTORY_RENDERINGS):
        batches = list_batches(storage, line)
        page = render_history(line, line_nights(storage, line))
        location = store.write_text(history_location(storage, line), page)
        if list_batches(storage, line) == batches:
            break
    return location
