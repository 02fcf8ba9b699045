"""Progress of long stages, as the flow sees its tasks finish.

The flow reports ``(stage, done, total)`` whenever a task of a long stage completes. Reports go
to a Prefect progress artifact of the flow run and to an optional reporter of the calling
process (the ``musc`` command draws progress bars with it; ``--quiet`` sets none).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prefect.futures import PrefectFuture, as_completed

Reporter = Callable[[str, int, int], None]

_reporters: list[Reporter] = []
log = logging.getLogger(__name__)


def add_reporter(reporter: Reporter) -> None:
    """Send stage progress of flows run in this process to ``reporter`` too."""
    _reporters.append(reporter)


def remove_reporter(reporter: Reporter) -> None:
    """Stop sending progress to ``reporter``."""
    if reporter in _reporters:
        _reporters.remove(reporter)


class StageTracker:
    """Progress of one flow run's stages: a Prefect progress artifact plus the reporters."""

    def __init__(self, total_stages: int) -> None:
        self.total_stages = max(1, total_stages)
        self.finished_stages = 0
        self._artifact = None

    def _artifact_update(self, fraction: float, stage: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = round(100.0 * min(1.0, fraction), 1)
        try:
            if self._artifact is None:
                self._artifact = create_progress_artifact(
                    progress=percent, key=None, description="musc: share of the run done"
                )
            else:
                update_progress_artifact(self._artifact, progress=percent)
        except Exception as error:  # progress is informative: never fail a run on it
            log.debug("progress artifact not updated (%s): %s", stage, error)

    def report(self, stage: str, done: int, total: int) -> None:
        """Record that ``done`` of ``total`` tasks of ``stage`` have finished."""
        for reporter in list(_reporters):
            reporter(stage, done, total)
        within = done / total if total else 1.0
        self._artifact_update((self.finished_stages + within) / self.total_stages, stage)
        if done >= total:
            self.finished_stages += 1

    def track(self, stage: str, futures: Iterable[PrefectFuture]) -> Iterator[PrefectFuture]:
        """Yield futures as they finish, reporting the stage's progress after each."""
        futures = list(futures)
        self.report(stage, 0, len(futures))
        for done, future in enumerate(as_completed(futures), start=1):
            self.report(stage, done, len(futures))
            yield future
