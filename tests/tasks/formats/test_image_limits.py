"""The pixel limit: decompression bombs are refused from their header, before decoding."""

import numpy as np
import pytest
import tifffile
from PIL import ImageFile

from tasks.formats.image_io import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, load_image, load_xyz
from tests.flows.test_bad_inputs import png_bomb


def _never_decode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", refuse)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", refuse)


def test_a_png_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    png_bomb(bomb, 8192, 4097)  # one row more than 8192 x 4096 = the default limit
    assert bomb.stat().st_size < 200_000
    _never_decode(monkeypatch)
    with pytest.raises(ValueError) as caught:
        load_image(bomb)
    message = str(caught.value)
    assert str(bomb) in message and "8192x4097" in message
    assert f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in message and MAX_PIXELS_ENV in message


def test_beyond_pillows_own_guard_the_message_is_the_same(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    png_bomb(bomb, 20_000, 10_000)  # 200 Mpx: Pillow raises DecompressionBombError itself
    _never_decode(monkeypatch)
    with pytest.raises(ValueError, match=r"bomb\.png: image is .*above the limit"):
        load_image(bomb)


def test_a_tiff_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "xyz.tiff"
    tile = np.zeros((512, 512, 3), np.float32)
    tiles = (tile for _ in range(16 * 9))
    tifffile.imwrite(bomb, data=tiles, shape=(8192, 4608, 3), dtype="float32", tile=(512, 512),
                     compression="zlib", photometric="rgb")
    assert bomb.stat().st_size < 2_000_000
    _never_decode(monkeypatch)
    with pytest.raises(ValueError, match=r"xyz\.tiff: image is 4608x8192 .* above the limit"):
        load_xyz(bomb)


def test_the_operator_may_raise_or_lower_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    png_bomb(path, 3000, 2000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000000")
    with pytest.raises(ValueError, match="above the limit of 5,000,000"):
        load_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "6000000")
    assert load_image(path).shape == (2000, 3000, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="MUSC_MAX_IMAGE_PIXELS='lots'"):
        load_image(path)
