"""The pipeline against an S3-compatible server (moto, 127.0.0.1): cache and results in the
bucket, a second run computes nothing, rescore loads no backbone and equals a fresh run."""

import csv
import io
import json

import numpy as np
import pytest

from infra.storage import open_filesystem
from musc_core.features_2d import ViTFeatureExtractor
from tasks import backbones
from tests.flows.conftest import SMALL, run_line, run_rescore
from tests.flows.test_score_line import ForwardCounter

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _scores(fs, url):
    text = fs.cat_file(url.removeprefix("s3://")).decode()
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    return {r[1]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}


def _map(fs, out, row):
    return np.load(io.BytesIO(fs.cat_file(f"{out.removeprefix('s3://')}/{row['map_file']}")))


def test_runs_cache_and_results_live_in_the_bucket(line, s3_env, monkeypatch):
    storage = f"{s3_env}/store"
    fs, root = open_filesystem(storage)
    counter = ForwardCounter(monkeypatch)
    first = run_line(data=str(line), storage=storage, cluster="threads", batch="n1", **SMALL)
    assert counter.counts == {"2d": 8, "3d": 8}
    assert first["out"].startswith("s3://") and first["outputs"]["report"].startswith("s3://")
    written = fs.find(root)
    assert any("/cache/" in p and p.endswith("_complete.json") for p in written)
    assert any(p.endswith("/results/part/n1/scores.csv") for p in written)
    assert any(p.endswith("/results/part/n1/report.html") for p in written)
    assert any(p.endswith("/lines/part/batches/n1.json") for p in written)
    assert len([p for p in written if p.endswith(".npy")]) == 8
    run = json.loads(fs.cat_file(first["outputs"]["run"].removeprefix("s3://")))
    assert run["counts"]["tokens_2d"]["computed"] == 8

    second = run_line(data=str(line), storage=storage, cluster="threads", batch="n2", **SMALL)
    assert counter.counts == {"2d": 8, "3d": 8}, "the second run computes no feature"
    assert all(c["computed"] == 0 for c in second["counts"].values())
    assert _scores(fs, first["outputs"]["scores"]) == _scores(fs, second["outputs"]["scores"])

    def refuse(*args, **kwargs):
        raise AssertionError("rescore must not build a backbone")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "build_2d", refuse)
        patch.setattr(backbones, "build_3d", refuse)
        patch.setattr(ViTFeatureExtractor, "create", refuse)
        again = run_rescore(
            line="part", batch="n1", storage=storage, interval_ratio=0.6, cluster="threads"
        )
    assert again["out"].startswith(f"{storage}/results/part/n1-rescore-")
    assert again["counts"]["pairs"]["computed"] == 0
    fresh = run_line(
        data=str(line),
        storage=f"{s3_env}/fresh",
        cluster="threads",
        batch="n1",
        interval_ratio=0.6,
        **SMALL,
    )
    rows, fresh_rows = (
        _scores(fs, again["outputs"]["scores"]),
        _scores(fs, fresh["outputs"]["scores"]),
    )
    assert rows == fresh_rows
    for row in rows.values():
        np.testing.assert_array_equal(_map(fs, again["out"], row), _map(fs, fresh["out"], row))
