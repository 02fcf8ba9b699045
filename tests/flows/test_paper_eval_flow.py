"""``musc eval``: the paper's protocol over a dataset, its table and the published means."""

import csv
import json

import pytest

from flows.cli import main
from tasks.evaluation.published import COLUMNS
from tasks.synthetic.generator import generate_line

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.slow
def test_eval_two_categories_two_subsets_two_seeds_writes_the_papers_table(tmp_path, capsys):
    data = tmp_path / "data"
    for seed, category in enumerate(("alpha", "beta")):
        generate_line(data, category=category, num_samples=8, image_size=64, defect_rate=0.5,
                      seed=seed)
    out = tmp_path / "out"
    status = main(
        ["eval", str(data), "--format", "mvtec3d", "--modality", "2d+3d", "--subsets", "2",
         "--seeds", "2", "--out", str(out), "--storage", str(tmp_path / "store"),
         "--image-size", "64", "--backbone-2d", "vit_tiny_patch16_224", "--weights-2d",
         "random", "--weights-3d", "random", "--num-groups", "32", "--group-size", "16",
         "--ipg-step", "8", "--cluster", "threads", "--quiet"]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "random backbone weights" in printed and "mean (ours)" in printed
    table = json.loads((out / "table.json").read_text())
    assert table["warning"] and table["subsets"] == 2 and table["seeds"] == [0, 1]
    assert len(table["runs"]) == 8 and {r["samples"] for r in table["runs"]} == {4}
    keys = [k for k, _ in COLUMNS]
    assert set(table["categories"]) == {"alpha", "beta"}
    for row in [*table["categories"].values(), table["mean"]]:
        for key in keys:
            assert 0.0 <= row[key] <= 1.0, key
    for std in table["categories_std"].values():
        assert all(std[k] >= 0.0 for k in keys)
    published = table["published"]
    assert "Table I" in published["source"] and "g=2" in published["source"]
    assert published["values"]["auroc_cls"] == pytest.approx(0.876)
    markdown = (out / "table.md").read_text()
    for _, header in COLUMNS:
        assert header in markdown
    for label in ("| alpha |", "| beta |", "**mean (ours)**", "paper: Table I", "±",
                  "random backbone weights"):
        assert label in markdown, label
    with open(out / "table.csv", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0].startswith("#") and "NOT meaningful" in ",".join(rows[0])
    assert [r[0] for r in rows[2:]] == ["alpha", "beta", "mean", "paper"]
