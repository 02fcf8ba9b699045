"""Sample preparation: good inputs of every pixel format are accepted, bad ones set aside."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from musc_core.config import MuscConfig
from tasks.formats.datasets import read_dataset
from tasks.formats.prepare import prepare_records

SIZE = 32
CONFIG_2D = MuscConfig(modality="2d", image_size=SIZE)
CONFIG_3D = MuscConfig(modality="2d+3d", image_size=SIZE, num_groups=16, group_size=8, ipg_step=4)


def _dome(size=SIZE, radius=0.4):
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    inside = u**2 + v**2 < radius**2
    z = np.where(inside, 0.5 - np.sqrt(np.clip(radius**2 - u**2 - v**2, 0, None)) * 0.2, 0)
    xyz = np.stack([u * 0.1, v * 0.1, z], axis=-1).astype(np.float32)
    xyz[~inside] = 0
    return xyz


def _rgb(seed, size=SIZE):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "line"
    (root / "xyz").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_rgb(i)).save(root / f"ok{i}.png")
        tifffile.imwrite(root / "xyz" / f"ok{i}.tiff", _dome(), photometric="rgb")
    return root


def _prepare(root, config):
    return prepare_records(read_dataset(root, "folder", root.name), "folder", config)


def test_good_samples_pass(folder):
    prepared, aside = _prepare(folder, CONFIG_3D)
    assert aside == [] and len(prepared) == 3
    sample = prepared[0].sample
    assert sample.image.shape == (3, SIZE, SIZE) and sample.xyz.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("mode", ["I;16", "L", "RGBA", "P"])
def test_other_pixel_formats_are_accepted(folder, mode):
    rgb = _rgb(9)
    if mode == "I;16":
        image = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(rgb).convert(mode)
    image.save(folder / "odd.png")
    tifffile.imwrite(folder / "xyz" / "odd.tiff", _dome(), photometric="rgb")
    prepared, aside = _prepare(folder, CONFIG_3D)
    assert aside == [] and len(prepared) == 4


@pytest.mark.parametrize(
    "name,writer,problem",
    [
        ("empty", lambda p: p.write_bytes(b""), "empty"),
        ("truncated", lambda p: p.write_bytes(_png_bytes()[:60]), ""),
        ("text", lambda p: p.write_bytes(b"this is not an image at all" * 10), ""),
    ],
)
def test_unreadable_images_are_set_aside_with_their_path(folder, name, writer, problem):
    writer(folder / f"{name}.png")
    prepared, aside = _prepare(folder, CONFIG_2D)
    assert len(prepared) == 3
    (item,) = aside
    assert item.name.endswith(name) and f"{name}.png" in item.problem
    assert problem in item.problem.lower()


def _png_bytes():
    import io

    buffer = io.BytesIO()
    Image.fromarray(_rgb(5)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "xyz,problem",
    [
        (np.full((SIZE, SIZE, 3), np.nan, np.float32), "nan"),
        (np.zeros((SIZE, SIZE, 3), np.float32), "no valid point"),
        (_dome(SIZE * 2), "but the image is"),
        (_dome(radius=0.05), "foreground points"),
    ],
    ids=["nan", "zeros", "size_mismatch", "too_few_points"],
)
def test_bad_point_clouds_are_set_aside(folder, xyz, problem):
    Image.fromarray(_rgb(7)).save(folder / "bad.png")
    tifffile.imwrite(folder / "xyz" / "bad.tiff", xyz, photometric="rgb")
    prepared, aside = _prepare(folder, CONFIG_3D)
    assert len(prepared) == 3
    (item,) = aside
    assert item.name.endswith("bad") and problem in item.problem.lower()
    assert "bad.tiff" in item.problem
