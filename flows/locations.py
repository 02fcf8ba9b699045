"""Where a run's entries and results go below a storage root, and a run's default batch id."""

from __future__ import annotations

from datetime import datetime, timezone

from tasks.records.result_store import safe_file_stem


def cache_url(storage: str) -> str:
    """The feature cache's root below a storage root."""
    return f"{storage.rstrip('/')}/cache"


def results_url(storage: str, line: str, batch: str) -> str:
    """Default output prefix of a run: ``<storage>/results/<line>/<batch>``."""
    return f"{storage.rstrip('/')}/results/{safe_file_stem(line)}/{batch}"


def default_batch_id() -> str:
    """The batch id of a run started now: its UTC time, ``YYYYmmddTHHMMSSZ``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
