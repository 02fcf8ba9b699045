"""Eyecandies samples go through depth decoding, back-projection and cleaning in prepare."""

import numpy as np
import pytest
from PIL import Image

from musc_core.config import MuscConfig
from tasks.formats.datasets import read_dataset
from tasks.formats.prepare import prepare_records

SIZE = 64


def _scene(size=SIZE):
    """A bright sphere (depth 0.9–1.0) in front of a dark back wall at depth 1.2."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    r2 = u**2 + v**2
    inside = r2 < 0.3**2
    depth = np.where(inside, 1.0 - 0.1 * np.sqrt(np.clip(1 - r2 / 0.09, 0, None)), 1.2)
    rgb = np.where(inside[..., None], 220, 30).astype(np.uint8).repeat(3, axis=2)
    return depth, rgb, inside


@pytest.fixture
def eyecandies(tmp_path):
    data = tmp_path / "eyecandies" / "CandyCane" / "test_public" / "data"
    data.mkdir(parents=True)
    depth, rgb, inside = _scene()
    low, high = 0.5, 1.5
    coded = np.round((depth - low) / (high - low) * 65535).astype(np.uint16)
    for sample in ("000", "001", "002"):
        Image.fromarray(rgb).save(data / f"{sample}_image_0.png")
        Image.fromarray(coded).save(data / f"{sample}_depth.png")
        (data / f"{sample}_info_depth.yaml").write_text(
            f"normalization:\n  min: {low}\n  max: {high}\n"
        )
        np.savetxt(data / f"{sample}_pose.txt", np.eye(4))
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(data / f"{sample}_mask.png")
    return tmp_path / "eyecandies", inside


def test_eyecandies_points_are_back_projected_and_cleaned(eyecandies):
    root, inside = eyecandies
    config = MuscConfig(modality="2d+3d", image_size=SIZE, num_groups=32, group_size=16, ipg_step=8)
    records = read_dataset(root, "eyecandies", "CandyCane")
    prepared, aside = prepare_records(records, "eyecandies", config)
    assert aside == [] and len(prepared) == 3
    xyz = prepared[0].sample.xyz.numpy()
    foreground = (xyz != 0).all(axis=-1)
    assert foreground.sum() > 0.5 * inside.sum()
    # the back wall is a separate, darker DBSCAN cluster: only the bright sphere is kept
    assert not foreground[~inside].any()
    assert prepared[0].record.label == 0 and prepared[0].mask is not None
