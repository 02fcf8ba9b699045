"""The clean rolling bank: flagged samples stay out unless cleared, confirmed defects never
enter; verdicts recorded with ``musc verdict``."""

import json

import pytest

from flows.cli import main
from tasks.records.verdicts import read_verdicts
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import (
    SMALL,
    assert_matches,
    in_memory,
    pool_order,
    read_scores,
    run_line,
    small_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


def _settings(summary):
    with open(summary["outputs"]["run"], encoding="utf-8") as handle:
        return json.load(handle)["settings"]


@pytest.mark.slow
def test_flagged_samples_leave_the_bank_until_an_operator_clears_them(line, tmp_path, capsys):
    night2 = tmp_path / "night2"
    generate_line(night2, category="part", num_samples=5, image_size=64, defect_rate=0.4, seed=11)
    store = str(tmp_path / "store")
    first = run_line(data=str(line), storage=store, cluster="threads", batch="n1", **SMALL)
    flagged = first["flagged"]
    assert flagged, "the test line must have a flagged sample in night 1"
    second = run_line(
        data=str(night2), storage=store, cluster="threads", batch="n2", reference_nights=1,
        **SMALL,
    )
    assert second["pool"] == 5 + 8 - len(flagged)
    left = {"n1": dict.fromkeys(flagged, "flagged, not cleared")}
    assert _settings(second)["bank_left_out"] == left
    # the pool really is tonight + night 1 without its flagged samples
    config = small_config()
    order = [
        (root, name)
        for root, name in pool_order([night2, line], config)
        if root == str(night2) or name not in flagged
    ]
    reference = in_memory(order, config)
    span = float(reference.maps.max() - reference.maps.min())
    names = [name for _, name in order[:5]]
    assert_matches(second, reference, names, map_atol=0.005 * span, score_atol=1e-3)

    # an operator clears one flag and confirms a defect on a sample that was not flagged
    cleared = flagged[0]
    scored = read_scores(first["outputs"]["scores"])
    confirmed = next(name for name in scored if name not in flagged)
    assert main(["verdict", "part", cleared, "ok", "--batch", "n1", "--storage", store]) == 0
    assert main(["verdict", "part", confirmed, "defect", "--note", "dent <seen>", "--batch",
                 "n1", "--storage", store]) == 0
    out = capsys.readouterr().out
    assert "stays out of the bank" in out and "may serve as a reference" in out
    assert [v["verdict"] for v in read_verdicts(store, "part")] == ["ok", "defect"]
    # batch id "n1z" sorts between n1 and n2: its rolling bank of one night is n1
    third = run_line(
        data=str(night2), storage=store, cluster="threads", batch="n1z", reference_nights=1,
        **SMALL,
    )
    expected = dict.fromkeys(flagged[1:], "flagged, not cleared")
    expected[confirmed] = "confirmed defect"
    assert _settings(third)["bank_left_out"] == {"n1": expected}
    assert third["pool"] == 5 + 8 - len(flagged) + 1 - 1
    naive = run_line(
        data=str(night2), storage=store, cluster="threads", batch="n1y", reference_nights=1,
        clean_bank=False, **SMALL,
    )
    assert naive["pool"] == 13 and _settings(naive)["bank_left_out"] == {}
