"""The ``score-line`` flow: one production line (one batch of samples) end to end.

``discover → prepare → 2D tokens / grouping → 3D tokens → SNAMD → pair-scoring shards →
per-sample reduction (CAE + Interval Average + maps) → RsCon + report``, every intermediate
cached by content in the feature cache under ``<storage>/cache`` and every task running on the
chosen cluster. A re-run computes only what is not cached; a changed input or backbone gets
new keys. The run is recorded as a batch of its line (``<storage>/lines/<line>/batches``) so
that later nights can use its samples as extra references and ``rescore`` can score it again
without a backbone.
"""

from __future__ import annotations

from prefect import flow

from flows.line_request import line_request
from flows.line_stages import LineNotScored, run_line
from flows.settings import Algorithm, Backbones, LineInput, LineRun, RollingBank

__all__ = ["LineNotScored", "score_line"]


@flow(name="score-line", log_prints=True)
def score_line(
    data: LineInput,
    batch: str | None = None,
    backbones: Backbones = Backbones(),  # noqa: B008 (immutable settings model)
    algorithm: Algorithm = Algorithm(),  # noqa: B008
    bank: RollingBank = RollingBank(),  # noqa: B008
    run: LineRun = LineRun(),  # noqa: B008
) -> dict:
    """Score one production line: every sample against the others (and the rolling bank).

    Args:
        data: the line's samples (dataset root, layout, category, line name, subset).
        batch: batch id (letters, digits, ``_.-``), one the line has not recorded (a batch
            record is never replaced); default: the UTC start time and a random suffix.
        backbones: the feature extractors and their weights.
        algorithm: MuSc-V2's settings.
        bank: earlier batches used as extra references, and the reference budget.
        run: storage, output prefix (default ``<storage>/results/<line>/<batch>``), cluster,
            workers, device and block size.

    Returns:
        A summary: counts of computed and cached entries per stage, stage timings, scored and
        set-aside samples, flagged samples, metrics and output locations.
    """
    request = line_request(data, batch, backbones, algorithm, bank, run)
    return run_line(request, run.cluster, run.workers)
