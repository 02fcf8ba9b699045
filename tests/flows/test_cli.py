"""The musc command and the score-line flow end to end on a generated line: 2d, 3d, 2d+3d."""

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flows.cli import main
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import read_scores, run_line

pytestmark = pytest.mark.usefixtures("prefect_server")

SIZE = 128
SMALL = dict(image_size=SIZE, num_groups=128, group_size=32, ipg_step=16)
# Defect kinds each modality must find. With random weights the 2D and 3D maps live on
# different scales (their sum is dominated by the larger), so 2D+3D is held to the kind that
# both modalities see, and to beating chance over all kinds.
VISIBLE = {"2d": ("colour", "crack"), "3d": ("dent", "crack"), "2d+3d": ("crack",)}
CLI_SMALL = [
    "--backbone-2d", "vit_tiny_patch16_224", "--weights-2d", "random", "--weights-3d", "random",
    "--num-groups", "64", "--group-size", "32", "--ipg-step", "16", "--cluster", "threads",
    "--quiet",
]


@pytest.fixture(scope="module")
def big_line(tmp_path_factory):
    root = tmp_path_factory.mktemp("line24")
    generate_line(root, category="part", num_samples=24, image_size=SIZE, defect_rate=0.5, seed=3)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["2d", "3d", "2d+3d"])
def test_each_modality_scores_visible_defects_above_normal(big_line, tmp_path, modality):
    summary = run_line(
        data=str(big_line), data_format="mvtec3d", modality=modality,
        backbone_2d="vit_tiny_patch16_224", weights_2d="random", weights_3d="random",
        patch_size_2d=8, storage=str(tmp_path / "store"), cluster="threads", workers=2,
        batch="b1", **SMALL,
    )
    assert summary["random_weights"] and summary["scored"] == 24 and summary["set_aside"] == []
    rows = read_scores(summary["outputs"]["scores"])
    assert len(rows) == 24
    for row in rows.values():
        heat = np.load(f"{summary['out']}/{row['map_file']}")
        assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
        assert np.isclose(float(row["score"]), heat.max(), rtol=1e-5)
    kept = [r for r in rows.values() if r["defect_type"] in ("good",) + VISIBLE[modality]]
    auroc = roc_auc_score(
        [int(r["label"]) for r in kept], [float(r["score_rescored"]) for r in kept]
    )
    assert auroc > 0.7, f"{modality}: image AUROC {auroc:.2f} on visible defects"
    every = roc_auc_score(
        [int(r["label"]) for r in rows.values()],
        [float(r["score_rescored"]) for r in rows.values()],
    )
    assert every > 0.55, f"{modality}: image AUROC {every:.2f} over all defect kinds"
    metrics = json.loads(open(summary["outputs"]["metrics"]).read())
    assert "warning" in metrics and 0.0 <= metrics["metrics"]["pixel_auroc"] <= 1.0
    assert "random backbone weights" in open(summary["outputs"]["report"]).read()


@pytest.mark.slow
def test_cli_score_writes_results_and_announces_random_weights(line, tmp_path, capsys):
    status = main(
        ["score", str(line), "--format", "mvtec3d", "--category", "part", "--modality", "2d+3d",
         "--image-size", "64", "--out", str(tmp_path / "out"), "--storage",
         str(tmp_path / "store"), *CLI_SMALL]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "random backbone weights" in out and "scores" in out and "stages:" in out
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["random_weights"] is True and run["warning"]
    (line_summary,) = run["lines"]
    assert {"discover", "prepare", "features", "pair_scoring", "reduction"} <= set(
        line_summary["timings"]
    )
    assert (tmp_path / "out" / "metrics.json").exists()
    scores = (tmp_path / "out" / "part" / "scores.csv").read_text().splitlines()
    # plain CSV: the random weights are stated in a column of every row, not a comment line
    assert scores[0].startswith("rank,") and scores[0].endswith(",random_weights")
    assert len(scores) == 9 and all(row.endswith(",1") for row in scores[1:])
    part_run = json.loads((tmp_path / "out" / "part" / "run.json").read_text())
    assert part_run["warning"] and part_run["counts"]["tokens_2d"]["computed"] == 8


def test_cli_refuses_3d_without_weights(line, tmp_path, capsys):
    status = main(
        ["score", str(line), "--modality", "3d", "--out", str(tmp_path), "--quiet",
         "--image-size", "64", "--cluster", "threads", "--storage", str(tmp_path / "s")]
    )
    assert status == 2
    (error,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("musc: error")]
    assert "argument --weights-3d" in error and "--weights-3d random" in error


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True])
def test_cli_sets_aside_a_corrupt_sample_and_scores_the_rest(line, tmp_path, capsys, strict):
    data = tmp_path / "data"
    shutil.copytree(line, data)
    broken = data / "part" / "test" / "good" / "rgb" / "000.png"
    broken.write_bytes(broken.read_bytes()[:100])
    argv = [
        "score", str(data), "--category", "part", "--modality", "2d", "--image-size", "64",
        "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "store"), *CLI_SMALL,
    ]
    status = main(argv + (["--fail-on-set-aside"] if strict else []))
    out = capsys.readouterr().out
    assert status == (3 if strict else 0)
    assert "set aside 'good/000'" in out and "000.png" in out
    rows = read_scores(tmp_path / "out" / "part" / "scores.csv")
    assert len(rows) == 7 and "good/000" not in rows
    aside = (tmp_path / "out" / "part" / "set_aside.csv").read_text()
    assert "good/000" in aside and "000.png" in aside


@pytest.mark.slow
def test_cli_line_with_one_usable_sample_is_not_scored(tmp_path, capsys):
    data = tmp_path / "data"
    generate_line(data, category="part", num_samples=2, image_size=64, defect_rate=0.0, seed=1)
    for png in (data / "part" / "test" / "good" / "rgb").glob("000.png"):
        png.write_bytes(b"")
    status = main(
        ["score", str(data), "--category", "part", "--modality", "2d", "--image-size", "64",
         "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "store"), *CLI_SMALL]
    )
    out = capsys.readouterr().out
    assert status == 4
    assert "NOT SCORED" in out and "at least 2" in out and "empty file" in out
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["lines"][0]["scored"] == 0 and run["lines"][0]["error"]
