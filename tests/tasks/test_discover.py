"""Discovery: duplicate names, links out of the dataset root, unreadable files."""

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from tasks import discover
from tasks.discover import discover_line
from tasks.formats.datasets import inside_root, read_dataset
from tasks.formats.prepare import prepare_records
from tests.tasks.formats.test_prepare import CONFIG_2D

RNG = np.random.default_rng(0)


def png(path, suffix_format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path, suffix_format)
    return path


@pytest.fixture
def hashed(monkeypatch):
    """The files whose bytes discovery reads (through its digest)."""
    seen: list[str] = []
    original = discover.input_digests

    def spy(record, *args, **kwargs):
        seen.extend(p for p in (record.image_path, record.xyz_path, record.mask_path) if p)
        return original(record, *args, **kwargs)

    monkeypatch.setattr(discover, "input_digests", spy)
    return seen


def test_every_sample_of_a_duplicated_name_is_set_aside(tmp_path):
    line = tmp_path / "line"
    png(line / "a.png")
    png(line / "a.jpg", "JPEG")
    png(line / "b.png")
    png(line / "c.png")
    found, aside = discover_line(str(line), "folder", "line")
    assert [s.record.name for s in found] == ["b", "c"]
    assert [a.name for a in aside] == ["a", "a"]
    for item in aside:
        assert "duplicate sample name 'a'" in item.problem
        assert "a.png" in item.problem and "a.jpg" in item.problem
    prepared, aside_in_memory = prepare_records(
        read_dataset(line, "folder", "line"), "folder", CONFIG_2D
    )
    assert [p.record.name for p in prepared] == ["b", "c"]
    assert aside_in_memory == aside


def test_mvtec3d_two_xyz_maps_of_one_stem_are_reported_not_chosen(tmp_path):
    base = tmp_path / "root" / "part" / "test" / "good"
    png(base / "rgb" / "000.png")
    png(base / "rgb" / "001.png")
    for stem, suffix in (("000", ".tif"), ("000", ".tiff"), ("001", ".tiff")):
        (base / "xyz").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(
            base / "xyz" / f"{stem}{suffix}", np.ones((8, 8, 3), np.float32), photometric="rgb"
        )
    records = read_dataset(tmp_path / "root", "mvtec3d", "part")
    assert [r.name for r in records] == ["good/000", "good/000", "good/001"]
    found, aside = discover_line(str(tmp_path / "root"), "mvtec3d", "part")
    assert [s.record.name for s in found] == ["good/001"]
    assert {a.path for a in aside} == {str(base / "rgb" / "000.png"), str(base / "xyz/000.tiff")}


def test_a_link_to_a_file_outside_the_root_is_set_aside_unread(tmp_path, hashed):
    outside = png(tmp_path / "elsewhere" / "secret.png")
    line = tmp_path / "line"
    png(line / "a.png")
    png(line / "b.png")
    (line / "link.png").symlink_to(outside)
    (line / "inner.png").symlink_to(line / "a.png")  # a link inside the root is fine
    found, aside = discover_line(str(line), "folder", "line")
    assert [s.record.name for s in found] == ["a", "b", "inner"]
    (item,) = aside
    assert item.name == "link" and "outside the dataset root" in item.problem
    assert "link.png" in item.problem and "secret" not in item.problem
    assert str(outside) not in hashed and str(line / "link.png") not in hashed


def test_folder_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    png(outside / "x.png")
    line = tmp_path / "line"
    png(line / "sub" / "a.png")
    png(line / "b.png")
    (line / "sub" / "loop").symlink_to(line, target_is_directory=True)
    (line / "out").symlink_to(outside, target_is_directory=True)
    records = read_dataset(line, "folder", "line")
    assert [r.name for r in records] == ["b", "sub/a"]


def test_a_dangling_link_is_reported(tmp_path):
    line = tmp_path / "line"
    png(line / "a.png")
    png(line / "b.png")
    (line / "gone.png").symlink_to(line / "missing.png")
    found, aside = discover_line(str(line), "folder", "line")
    assert [s.record.name for s in found] == ["a", "b"]
    assert [a.name for a in aside] == ["gone"] and "gone.png" in aside[0].problem


def test_visa_rows_pointing_out_of_the_root_are_set_aside(tmp_path, hashed):
    root = tmp_path / "visa"
    png(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG", "JPEG")
    png(root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG", "JPEG")
    secret = png(tmp_path / "secret.JPG", "JPEG")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/../../secret.JPG,\n"
    )
    found, aside = discover_line(str(root), "visa", "candle")
    assert len(found) == 2
    (item,) = aside
    assert "outside the dataset root" in item.problem
    assert not any(os.path.samefile(p, secret) for p in hashed)


def test_inside_root_resolves_links_and_dots(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    assert inside_root(tmp_path / "root" / "a" / "x.png", tmp_path / "root")
    assert not inside_root(tmp_path / "root" / ".." / "x.png", tmp_path / "root")
    (tmp_path / "link").symlink_to(tmp_path / "root", target_is_directory=True)
    assert inside_root(tmp_path / "link" / "a" / "x.png", tmp_path / "root")
    assert inside_root(tmp_path / "root" / "a" / "x.png", tmp_path / "link")
