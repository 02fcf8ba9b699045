"""The line's history after real score_line runs: three nights of a tiny synthetic line (random
weights, 64 px), the page's row per night and the Prefect link artifact."""

import asyncio
import html
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from tasks.formats.datasets import read_dataset
from tasks.formats.prepare import prepare_records
from tasks.reporting.artifacts import artifact_key
from tasks.reporting.colormap import blend_heat
from tasks.reporting.history_page import _fmt
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import SMALL, read_scores, run_line, small_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


async def _artifact(key):
    """The artifacts of ``key``, newest first (other tests' lines may share the key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    # Newest first: the session's server also holds this key's versions from other tests.
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
        )
    return found


def _cells(page):
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S)
    return [re.findall(r"<td>(.*?)</td>", row, flags=re.S) for row in rows[1:]]


def test_history_after_three_nights_of_a_real_line(tmp_path):
    store = str(tmp_path / "store")
    nights = []
    for number, seed in enumerate((31, 32, 33), start=1):
        data = tmp_path / f"night{number}"
        generate_line(data, category="part", num_samples=5, image_size=64, defect_rate=0.4,
                      seed=seed)
        if number == 2:  # a file that cannot be read: one sample set aside that night
            (data / "part" / "test" / "good" / "rgb" / "000.png").write_bytes(b"")
        nights.append(run_line(data=str(data), storage=store, cluster="threads",
                               batch=f"n{number}", reference_nights=1, **SMALL))
    location = nights[-1]["outputs"]["history"]
    assert location == f"{store}/results/part/history.html"
    assert all(s["outputs"]["history"] == location for s in nights)
    page = open(location, encoding="utf-8").read()
    cells = _cells(page)
    assert len(cells) == 3
    for index, (summary, row) in enumerate(zip(nights, cells, strict=True), start=1):
        run = json.load(open(summary["outputs"]["run"], encoding="utf-8"))
        assert row[0] == str(index) and row[1] == f"n{index}"
        assert row[2] == str(summary["scored"]) and row[3] == str(len(summary["set_aside"]))
        assert row[4] == str(len(summary["flagged"]))
        scores = [float(r["score"]) for r in read_scores(summary["outputs"]["scores"]).values()]
        quantiles = np.quantile(scores, [0.0, 0.25, 0.5, 0.75, 1.0])
        assert [html.unescape(c) for c in row[5:10]] == [_fmt(float(q)) for q in quantiles]
        assert html.unescape(row[10]) == _fmt(run["flag_threshold"])
        # the night's report, linked relatively (it lies in the page's folder)
        href = re.search(r'href="([^"]+)"', row[-1]).group(1)
        assert href == f"n{index}/report.html"
        assert os.path.join(os.path.dirname(location), href) == summary["outputs"]["report"]
    assert [c[3] for c in cells] == ["0", "1", "0"]
    # each night's report links to the history page, relatively
    for summary in nights:
        report = open(summary["outputs"]["report"], encoding="utf-8").read()
        assert 'href="../history.html"' in report.split("</header>")[0]
        target = os.path.join(os.path.dirname(summary["outputs"]["report"]), "../history.html")
        assert os.path.normpath(target) == location

    (artifact,) = asyncio.run(_artifact(artifact_key("part", "history")))[:1]
    assert f"file://{location}" in artifact.data

    # the overlays are the report's inferno blend on the line's one scale
    summary = nights[0]
    rows = read_scores(summary["outputs"]["scores"])
    maps = {n: np.load(f"{summary['out']}/{r['map_file']}") for n, r in rows.items()}
    low, high = min(m.min() for m in maps.values()), max(m.max() for m in maps.values())
    name = sorted(rows)[0]
    stem = rows[name]["map_file"].removeprefix("maps/").removesuffix(".npy")
    picture = np.asarray(Image.open(f"{summary['out']}/overlays/{stem}.png").convert("RGB"))
    (record,) = [r for r in read_dataset(tmp_path / "night1", "mvtec3d", "part") if r.name == name]
    (prepared,), _ = prepare_records([record], "mvtec3d", small_config())
    image = prepared.sample.image.permute(1, 2, 0).numpy()
    base = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    expected = blend_heat(base, (maps[name] - low) / (high - low))
    assert np.abs(picture.astype(int) - expected.astype(int)).max() <= 1
