"""Faults during and between runs: corrupted cache entries are detected and recomputed."""

import json
from pathlib import Path

import pytest

from flows.score_line import score_line
from tests.flows.conftest import SMALL, read_scores

pytestmark = pytest.mark.usefixtures("prefect_server")


def _entries_with(cache_root: Path, array: str) -> list[Path]:
    """Entry folders whose completion record lists ``array``."""
    found = []
    for record in sorted(cache_root.glob("*/*/_complete.json")):
        if array in json.loads(record.read_text())["arrays"]:
            found.append(record.parent)
    return found


def _chunks(entry: Path, array: str) -> list[Path]:
    return sorted(p for p in entry.glob(f"*/{array}/c/**/*") if p.is_file())


def _damage(chunk: Path, how: str) -> None:
    data = chunk.read_bytes()
    if how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        chunk.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_entries_are_detected_and_recomputed_never_used(line, tmp_path, how):
    store = tmp_path / "store"
    score_line(data=str(line), storage=str(store), cluster="threads", batch="b1", **SMALL)
    cache = store / "cache"
    for array in ("features", "d2", "map"):
        entry = _entries_with(cache, array)[0]
        _damage(_chunks(entry, array)[0], how)
    # A new Interval Average ratio re-reads shards and features (new reductions); the
    # damaged reduction of the old ratio is not needed.
    second = score_line(
        data=str(line),
        storage=str(store),
        cluster="threads",
        batch="b2",
        interval_ratio=0.5,
        **SMALL,
    )
    computed = {stage: c["computed"] for stage, c in second["counts"].items()}
    assert computed["pairs"] >= 1
    assert computed["snamd_2d"] + computed["snamd_3d"] == 1
    assert computed["tokens_2d"] == 0 and computed["tokens_3d"] == 0
    fresh = score_line(
        data=str(line),
        storage=str(tmp_path / "fresh"),
        cluster="threads",
        batch="b1",
        interval_ratio=0.5,
        **SMALL,
    )
    assert read_scores(second["outputs"]["scores"]) == read_scores(fresh["outputs"]["scores"])


@pytest.mark.slow
def test_corrupted_reduction_is_recomputed_when_the_report_reads_it(line, tmp_path):
    store = tmp_path / "store"
    first = score_line(data=str(line), storage=str(store), cluster="threads", batch="b1", **SMALL)
    _damage(_chunks(_entries_with(store / "cache", "map")[0], "map")[0], "flip")
    second = score_line(data=str(line), storage=str(store), cluster="threads", batch="b2", **SMALL)
    assert second["counts"]["reduced"] == {"computed": 1, "cached": 7}
    assert read_scores(first["outputs"]["scores"]) == read_scores(second["outputs"]["scores"])
