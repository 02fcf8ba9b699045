"""Prefect artifacts of a run: a markdown summary, the top suspects, a link to the report.

They appear on the flow run's page in the Prefect UI (and under stable keys per line, so the
UI shows each line's history). Creating them never fails a run: an API error is logged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.records.run_summary import RunSummary

log = logging.getLogger(__name__)
TOP_SUSPECTS = 20


def artifact_key(line: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a line and a kind."""
    slug = re.sub(r"[^a-z0-9]+", "-", line.lower()).strip("-") or "line"
    return f"musc-{slug}-{kind}"[:100]


def _escape_markdown(text: str) -> str:
    """Sample names in markdown: no table breaks, no links or HTML from a file name."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|])", r"\\\1", text).replace("\n", " ")


def summary_markdown(summary: RunSummary) -> str:
    """The run's summary as markdown: counts, flags, metrics, set-aside samples, outputs."""
    lines = [f"# musc — line `{_escape_markdown(summary.line)}`, batch {summary.batch}"]
    if summary.warning:
        lines.append(f"\n**{summary.warning}**")
    threshold = summary.flag_threshold
    lines.append(
        f"\n{summary.scored} samples scored (pool {summary.pool}), "
        f"**{len(summary.flagged)} flagged** (threshold "
        f"{'none' if threshold is None else format(threshold, '.4g')}), "
        f"{len(summary.set_aside)} set aside."
    )
    if summary.drift is not None and summary.drift.drifted:
        lines.append(
            f"\n**Drift:** tonight's median score is {summary.drift.shift:+.1f} robust sigmas "
            f"from the bank's (limit {summary.drift.limit:g})."
        )
    if summary.flag_note:
        lines.append(f"\n**No flag threshold:** {_escape_markdown(summary.flag_note)}")
    if summary.metrics:
        lines.append("\n| metric | value |\n|---|---|")
        lines += [f"| {k} | {v:.4f} |" for k, v in summary.metrics.items()]
    if summary.set_aside:
        lines.append("\n**Set aside**\n")
        lines += [
            f"- {_escape_markdown(a.name)}: {_escape_markdown(a.problem)}"
            for a in summary.set_aside
        ]
    lines.append(f"\nReport: {summary.outputs.get('report', '')}")
    return "\n".join(lines)


def publish_artifacts(summary: RunSummary, ranked: list[dict]) -> None:
    """Create the run's artifacts: summary, top suspects table, link to the report.

    Args:
        summary: the run summary (as written to ``run.json``).
        ranked: rows of the ranked samples (``rank``, ``name``, ``score_rescored``,
            ``flagged``, ``label``), most suspect first.
    """
    line = summary.line
    try:
        create_markdown_artifact(
            summary_markdown(summary),
            key=artifact_key(line, "summary"),
            description=f"musc run of line {line}, batch {summary.batch}",
        )
        create_table_artifact(
            ranked[:TOP_SUSPECTS],
            key=artifact_key(line, "suspects"),
            description=f"Top {TOP_SUSPECTS} suspects of line {line} (score after RsCon)",
        )
        report = summary.outputs.get("report")
        if report:
            create_link_artifact(
                link_url(report),
                link_text="run report",
                key=artifact_key(line, "report"),
                description=f"HTML report of line {line}, batch {summary.batch}",
            )
    except Exception as error:  # artifacts are informative: never fail a run on them
        log.warning("could not create the run's Prefect artifacts: %s", error)


def link_url(location: str) -> str:
    """A link artifact's URL for a result location.

    URLs stay as they are; a local path becomes an absolute ``file://`` URL with its spaces and
    non-ASCII letters percent-encoded (``/runs/line a/ü.html`` →
    ``file:///runs/line%20a/%C3%BC.html``), so the link opens whatever the line's name.
    """
    return location if "://" in location else Path(location).absolute().as_uri()


def publish_history(line: str, location: str) -> None:
    """A link artifact to the line's history page (never fails the run).

    Args:
        line: the line.
        location: where the page was written (local path or URL).
    """
    try:
        create_link_artifact(
            link_url(location),
            link_text="line history",
            key=artifact_key(line, "history"),
            description=f"History page of line {line}: every night",
        )
    except Exception as error:  # artifacts are informative: never fail a run on them
        log.warning("could not create the line's history artifact: %s", error)
