"""score-new's bank is clean like the batch run's rolling bank: a sample flagged in its night
is no reference for a new part until an operator clears it."""

import json
import shutil

import numpy as np
import pytest

from flows.cli import main
from tasks.records.batch_record import read_batch_record
from tests.flows.conftest import SMALL, read_scores, run_line, run_score_new

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _copy_sample(line, name, root):
    defect, stem = name.split("/")
    for kind, suffix in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png")):
        target = root / "part" / "test" / defect / kind
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(line / "part" / "test" / defect / kind / f"{stem}.{suffix}", target)


def _part_map(result):
    (row,) = read_scores(result["outputs"]["scores"]).values()
    return row, np.load(f"{result['out']}/{row['map_file']}")


def test_a_flagged_sample_is_no_reference_for_a_new_part_until_cleared(line, tmp_path):
    store = str(tmp_path / "store")
    night = run_line(data=str(line), storage=store, cluster="threads", batch="b1", **SMALL)
    flagged = night["flagged"]
    assert flagged, "the test line must have a flagged sample"
    rows = read_scores(night["outputs"]["scores"])
    part = next(n for n in sorted(rows) if n.startswith("good/") and n not in flagged)
    new = tmp_path / "new"
    _copy_sample(line, part, new)

    clean = run_score_new(line="part", inputs=[str(new)], data_format="mvtec3d", storage=store,
                          out=str(tmp_path / "clean"))
    # the part's own bank copy is left out (same inputs), and so is every flagged sample
    assert clean["pool"] == 8 - len(flagged)
    run = json.loads((tmp_path / "clean" / "run.json").read_text())
    left = {"b1": dict.fromkeys(flagged, "flagged, not cleared")}
    assert run["settings"]["bank_left_out"] == left
    naive = run_score_new(line="part", inputs=[str(new)], data_format="mvtec3d", storage=store,
                          out=str(tmp_path / "naive"), clean_bank=False)
    assert naive["pool"] == 8

    # Independent truth: a bank in which the flagged samples never were. The part's map and
    # score depend on its references only, so they equal the clean run's.
    kept = tmp_path / "kept"
    for name in rows:
        if name not in flagged:
            _copy_sample(line, name, kept)
    other = str(tmp_path / "other-store")
    run_line(data=str(kept), storage=other, cluster="threads", batch="k1", **SMALL)
    truth = run_score_new(line="part", inputs=[str(new)], data_format="mvtec3d", storage=other,
                          out=str(tmp_path / "truth"), clean_bank=False)
    (clean_row, clean_map), (truth_row, truth_map) = _part_map(clean), _part_map(truth)
    span = float(truth_map.max() - truth_map.min())
    np.testing.assert_allclose(clean_map, truth_map, atol=0.005 * span)
    assert float(clean_row["score"]) == pytest.approx(float(truth_row["score"]), abs=1e-3)
    _, naive_map = _part_map(naive)
    assert np.abs(naive_map - truth_map).max() > 0.005 * span, "the flagged samples mattered"

    # an operator clears one flag: that sample is a reference again
    cleared = flagged[0]
    assert main(["verdict", "part", cleared, "ok", "--batch", "b1", "--storage", store]) == 0
    after = run_score_new(line="part", inputs=[str(new)], data_format="mvtec3d", storage=store,
                          out=str(tmp_path / "after"), record_as="day1")
    assert after["pool"] == 8 - len(flagged) + 1
    run = json.loads((tmp_path / "after" / "run.json").read_text())
    left = {"b1": dict.fromkeys(flagged[1:], "flagged, not cleared")} if flagged[1:] else {}
    assert run["settings"]["bank_left_out"] == left
    # the recorded parts' batch record says what their bank left out (rescore reads it)
    record = read_batch_record(store, "part", "day1")
    assert record.scored_against_bank and record.bank_left_out == left
