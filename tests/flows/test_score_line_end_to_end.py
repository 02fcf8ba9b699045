"""End to end on generated lines with small random-init backbones: 2d, 3d and 2d+3d."""

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from flows.cli import main
from flows.score_line import score_lines
from musc_core.config import MuscConfig
from tasks.backbones import BackboneSpec
from tasks.synth import generate_line

SIZE = 128
SMALL = dict(image_size=SIZE, num_groups=128, group_size=32, ipg_step=16)
SPEC = BackboneSpec(
    name_2d="vit_tiny_patch16_224", weights_2d="random", weights_3d="random", patch_size_2d=8
)
# Defect kinds each modality must find. With random weights the 2D and 3D maps live on
# different scales (their sum is dominated by the larger), so 2D+3D is held to the kind that
# both modalities see, and to beating chance over all kinds.
VISIBLE = {"2d": ("colour", "crack"), "3d": ("dent", "crack"), "2d+3d": ("crack",)}


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    root = tmp_path_factory.mktemp("line")
    generate_line(root, category="part", num_samples=24, image_size=SIZE, defect_rate=0.5, seed=3)
    return root


def _read_scores(path):
    with open(path, encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    header, body = rows[0], rows[1:]
    return [dict(zip(header, r, strict=True)) for r in body]


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["2d", "3d", "2d+3d"])
def test_each_modality_scores_visible_defects_above_normal(line, tmp_path, modality):
    config = MuscConfig(modality=modality, **SMALL)
    summary = score_lines(line, "mvtec3d", None, config, SPEC, tmp_path, torch.device("cpu"))
    assert summary.random_weights and not summary.failed_lines
    (outcome,) = summary.lines
    assert outcome.num_scored == 24 and outcome.set_aside == []
    rows = _read_scores(tmp_path / "part" / "scores.csv")
    assert len(rows) == 24
    for row in rows:
        heat = np.load(tmp_path / "part" / row["map_file"])
        assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
        assert np.isclose(float(row["score"]), heat.max(), rtol=1e-5)
    kept = [r for r in rows if r["defect_type"] in ("good",) + VISIBLE[modality]]
    labels = [int(r["label"]) for r in kept]
    auroc = roc_auc_score(labels, [float(r["score_rescored"]) for r in kept])
    assert auroc > 0.7, f"{modality}: image AUROC {auroc:.2f} on visible defects"
    every = roc_auc_score(
        [int(r["label"]) for r in rows], [float(r["score_rescored"]) for r in rows]
    )
    assert every > 0.55, f"{modality}: image AUROC {every:.2f} over all defect kinds"
    metrics = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert "warning" in metrics and 0.0 <= metrics["metrics"]["pixel_auroc"] <= 1.0


@pytest.mark.slow
def test_runs_are_deterministic(line, tmp_path):
    config = MuscConfig(modality="2d+3d", **SMALL)
    for run in ("a", "b"):
        score_lines(line, "mvtec3d", None, config, SPEC, tmp_path / run, torch.device("cpu"))
    a = _read_scores(tmp_path / "a" / "part" / "scores.csv")
    b = _read_scores(tmp_path / "b" / "part" / "scores.csv")
    assert a == b
    for row in a:
        np.testing.assert_array_equal(
            np.load(tmp_path / "a" / "part" / row["map_file"]),
            np.load(tmp_path / "b" / "part" / row["map_file"]),
        )


@pytest.mark.slow
def test_cli_score_writes_results_and_announces_random_weights(line, tmp_path, capsys):
    status = main(
        [
            "score", str(line), "--format", "mvtec3d", "--category", "part",
            "--modality", "2d+3d", "--backbone-2d", "vit_tiny_patch16_224",
            "--weights-2d", "random", "--weights-3d", "random", "--image-size", "128",
            "--num-groups", "64", "--group-size", "32", "--ipg-step", "16",
            "--out", str(tmp_path), "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "random backbone weights" in out and "scores" in out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["random_weights"] is True and run["warning"]
    stages = run["lines"][0]["stage_seconds"]
    assert {"prepare", "2d_features", "grouping", "3d_features", "mutual_scoring"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and "stages:" in out
    assert (tmp_path / "metrics.json").exists()
    assert "NOT meaningful" in (tmp_path / "part" / "scores.csv").read_text().splitlines()[0]


def test_cli_refuses_3d_without_weights(line, tmp_path, capsys):
    status = main(
        ["score", str(line), "--modality", "3d", "--out", str(tmp_path), "--quiet",
         "--image-size", "64"]
    )
    assert status == 2
    assert "--weights-3d" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True])
def test_cli_sets_aside_a_corrupt_sample_and_scores_the_rest(line, tmp_path, capsys, strict):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(line, data)
    broken = data / "part" / "test" / "good" / "rgb" / "000.png"
    broken.write_bytes(broken.read_bytes()[:100])
    argv = [
        "score", str(data), "--category", "part", "--modality", "2d",
        "--backbone-2d", "vit_tiny_patch16_224", "--weights-2d", "random",
        "--image-size", "64", "--out", str(tmp_path / "out"), "--quiet",
    ]
    status = main(argv + (["--fail-on-set-aside"] if strict else []))
    out = capsys.readouterr().out
    assert status == (3 if strict else 0)
    assert "set aside 'good/000'" in out and "000.png" in out
    rows = _read_scores(tmp_path / "out" / "part" / "scores.csv")
    assert len(rows) == 23 and "good/000" not in {r["name"] for r in rows}
    aside = (tmp_path / "out" / "part" / "set_aside.csv").read_text()
    assert "good/000" in aside and "000.png" in aside
