"""The weight-free FPFH 3D backbone through the musc command and the score-line flow."""

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main
from flows.score_line import score_line
from musc_core.fpfh import FpfhParams
from musc_core.pipeline import score
from tasks.backbones import BackboneSpec, build_backbones
from tests.flows.conftest import (
    SIZE,
    assert_matches,
    pool_order,
    pool_samples,
    read_scores,
    run_line,
    run_score_new,
    small_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

IDENTITY = FpfhParams().identity
GROUPS = ["--num-groups", "32", "--group-size", "16", "--ipg-step", "8"]


def test_cli_scores_3d_with_fpfh_and_says_weight_free(line, tmp_path, capsys):
    status = main(
        ["score", str(line), "--format", "mvtec3d", "--category", "part", "--modality", "3d",
         "--backbone-3d", "fpfh", "--image-size", str(SIZE), *GROUPS, "--cluster", "threads",
         "--quiet", "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "store")]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "random backbone weights" not in out
    run = json.loads((tmp_path / "out" / "part" / "run.json").read_text())
    assert run["random_weights"] is False and not run.get("warning")
    assert run["backbones"] == {"3d": IDENTITY} and "weight-free" in IDENTITY
    assert run["counts"]["tokens_3d"]["computed"] == 8
    report = (tmp_path / "out" / "part" / "report.html").read_text()
    assert IDENTITY in report and "random backbone weights" not in report
    scores = (tmp_path / "out" / "part" / "scores.csv").read_text()
    assert "NOT meaningful" not in scores


def test_cli_refuses_weights_for_fpfh(line, tmp_path, capsys):
    status = main(
        ["score", str(line), "--modality", "3d", "--backbone-3d", "fpfh", "--weights-3d",
         "random", "--out", str(tmp_path), "--quiet", "--image-size", str(SIZE), "--cluster",
         "threads", "--storage", str(tmp_path / "s")]
    )
    captured = capsys.readouterr()
    assert status != 0
    assert "drop --weights-3d" in captured.err + captured.out


@pytest.mark.slow
def test_flow_2d_3d_with_fpfh_equals_in_memory_and_caches(line, tmp_path):
    params = dict(
        data=str(line), data_format="mvtec3d", modality="2d+3d",
        backbone_2d="vit_tiny_patch16_224", weights_2d="random", backbone_3d="fpfh",
        patch_size_2d=8, image_size=SIZE, num_groups=32, group_size=16, ipg_step=8,
        distance_dtype="float32", vit_dtype="float32", point_dtype="float32",
        storage=str(tmp_path / "store"),
        cluster="threads", workers=1, shard_size=100,
    )
    summary = run_line(batch="b1", **params)
    assert summary["scored"] == 8 and summary["random_weights"]  # the random ViT, not FPFH
    config = small_config()
    order = pool_order([line], config)
    samples = pool_samples(order, config)
    spec = BackboneSpec("vit_tiny_patch16_224", "random", None, 8, "fpfh")
    built = build_backbones(spec, config, torch.device("cpu"))
    reference = score(samples, config, built.extractor_2d, built.extractor_3d)
    assert_matches(summary, reference, [n for _, n in order], map_atol=1e-5, score_atol=1e-5)
    again = run_line(batch="b2", **params)
    assert again["counts"]["tokens_3d"] == {"computed": 0, "cached": 8}
    assert read_scores(again["outputs"]["scores"]).keys() == {n for _, n in order}
    # score-new takes the 3D backbone from the bank's record: a bank sample's FPFH entry is
    # found under the same identity, nothing is extracted again.
    name = next(n for _, n in order if n.startswith("good/"))
    defect, stem = name.split("/")
    for kind, suffix in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png")):
        target = tmp_path / "new" / "part" / "test" / defect / kind
        target.mkdir(parents=True)
        shutil.copy(line / "part" / "test" / defect / kind / f"{stem}.{suffix}", target)
    new = run_score_new(line="part", inputs=[str(tmp_path / "new")], data_format="mvtec3d",
                    storage=params["storage"], out=str(tmp_path / "new-out"))
    assert new["scored"] == 1
    assert new["counts"].get("tokens_3d", {"computed": 0})["computed"] == 0
    run = json.loads((tmp_path / "new-out" / "run.json").read_text())
    assert run["backbones"]["3d"] == IDENTITY


def test_the_airgapped_deployment_asks_for_fpfh_with_score_line_parameters():
    config = yaml.safe_load((Path(__file__).parents[2] / "prefect.yaml").read_text())
    (deployment,) = [d for d in config["deployments"] if d["name"] == "airgapped-line"]
    parameters = deployment["parameters"]
    backbones = parameters["backbones"]
    assert backbones["backbone_3d"] == "fpfh" and "weights_3d" not in backbones
    assert set(parameters) <= set(inspect.signature(score_line.fn).parameters)
