"""Dataset readers on object storage (moto S3 on 127.0.0.1): a tree uploaded to a bucket reads
as the same tree on disk (records, digests, decoded files), nothing outside the prefix is read,
and a missing bucket or prefix is a clear error."""

import os
from dataclasses import fields

import numpy as np
import pytest

from flows.checks import UsageError, check_dataset
from infra.storage import open_filesystem
from tasks.discover import discover_line
from tasks.formats import sources
from tasks.formats.datasets import SampleRecord, list_categories, read_dataset
from tasks.formats.prepare import prepare_records
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import small_config, upload_tree
from tests.tasks.formats.test_datasets import png, tiff
from tests.tasks.test_discover import hashed  # noqa: F401  (fixture)

pytestmark = pytest.mark.s3

PATH_FIELDS = [f.name for f in fields(SampleRecord) if f.name.endswith("_path")]
RNG = np.random.default_rng(5)
SIDE = 16


def image(path):
    return png(path, RNG.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))


def cloud(path):
    xyz = np.dstack([*np.meshgrid(np.arange(SIDE), np.arange(SIDE)), RNG.random((SIDE, SIDE))])
    return tiff(path, xyz.astype(np.float32))


def mask_png(path, anomalous):
    array = np.zeros((SIDE, SIDE), dtype=np.uint8)
    if anomalous:
        array[4:9, 6:10] = 255
    return png(path, array)


def _eyecandies_sample(data, sample_id, anomalous, mask=True, info="normalization"):
    image(data / f"{sample_id}_image_0.png")
    depth = RNG.integers(20000, 40000, (SIDE, SIDE)).astype(np.uint16)
    png(data / f"{sample_id}_depth.png", depth)
    text = "normalization:\n  min: 0.5\n  max: 1.25\n" if info else "min: 0.5\nmax: 1.25\n"
    (data / f"{sample_id}_info_depth.yaml").write_text(text)
    np.savetxt(data / f"{sample_id}_pose.txt", np.eye(4))
    if mask:
        mask_png(data / f"{sample_id}_mask.png", anomalous)


def as_url(record, local_root, url):
    """The record with its local paths turned into the uploaded objects' URLs."""
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(record, name)
        if value is not None:
            relative = os.path.relpath(value, local_root).replace(os.sep, "/")
            changes[name] = f"{url}/{relative}"
    return SampleRecord(**{**record.__dict__, **changes})


def _mvtec3d(root):
    generate_line(root, category="bagel", num_samples=3, image_size=64, defect_rate=0.5, seed=2)
    return "bagel"


def _eyecandies(root):
    data = root / "CandyCane" / "test_public" / "data"
    _eyecandies_sample(data, "000", anomalous=False, info=None)
    _eyecandies_sample(data, "001", anomalous=True)
    _eyecandies_sample(data, "002", anomalous=False, mask=False)
    return "CandyCane"


def _mvtec(root):
    cat = root / "bottle"
    for stem in ("000", "001"):
        image(cat / "test" / "good" / f"{stem}.png")
        image(cat / "test" / "broken" / f"{stem}.png")
        mask_png(cat / "ground_truth" / "broken" / f"{stem}_mask.png", True)
    return "bottle"


def _btad(root):
    cat = root / "01"
    image(cat / "test" / "ok" / "0001.bmp")
    image(cat / "test" / "ko" / "0003.bmp")
    mask_png(cat / "ground_truth" / "ko" / "0003.png", True)
    return "01"


def _visa(root):
    for kind, stem in (("Normal", "0000"), ("Anomaly", "000")):
        image(root / "candle" / "Data" / "Images" / kind / f"{stem}.png")
    mask_png(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png", True)
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.png,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.png,"
        "candle/Data/Masks/Anomaly/000.png\n"
    )
    return "candle"


def _folder(root):
    line = root / "line7"
    image(line / "a.png")
    image(line / "sub" / "c.png")
    cloud(line / "xyz" / "a.tiff")
    cloud(line / "sub" / "c.tiff")
    cloud(line / "scans" / "d.tif")  # 3-channel float TIFF alone: a 3D-only sample
    mask_png(line / "masks" / "a_mask.png", True)
    image(line / ".hidden" / "x.png")
    return "line7"


LAYOUTS = {
    "mvtec3d": _mvtec3d, "eyecandies": _eyecandies, "mvtec": _mvtec, "mpdd": _mvtec,
    "btad": _btad, "visa": _visa, "folder": _folder,
}


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_a_bucket_reads_as_the_same_tree_on_disk(fmt, tmp_path, s3_env):
    local = tmp_path / "data"
    category = LAYOUTS[fmt](local)
    root = local / category if fmt == "folder" else local
    url = upload_tree(root, f"{s3_env}/{fmt}-data/{category}" if fmt == "folder" else
                 f"{s3_env}/{fmt}-data")

    assert list_categories(url, fmt) == list_categories(root, fmt)
    on_disk = read_dataset(root, fmt, category)
    in_bucket = read_dataset(url, fmt, category)
    assert in_bucket == [as_url(r, root, url) for r in on_disk]
    assert all(r.image_path is None or r.image_path.startswith("s3://") for r in in_bucket)

    found_disk, aside_disk = discover_line(str(root), fmt, category)
    found_url, aside_url = discover_line(url, fmt, category)
    assert not aside_disk and not aside_url
    assert [s.digests for s in found_url] == [s.digests for s in found_disk]

    config = small_config(modality="2d+3d" if fmt in ("mvtec3d", "eyecandies") else "2d")
    prepared_disk, aside_disk = prepare_records([s.record for s in found_disk], fmt, config)
    prepared_url, aside_url = prepare_records([s.record for s in found_url], fmt, config)
    assert prepared_disk and len(prepared_url) == len(prepared_disk)
    assert [(a.name, a.problem) for a in aside_disk] == [(a.name, a.problem) for a in aside_url]
    for a, b in zip(prepared_url, prepared_disk, strict=True):
        assert a.info == b.info
        for left, right in ((a.sample.image, b.sample.image), (a.sample.xyz, b.sample.xyz),
                            (a.mask, b.mask)):
            assert (left is None) == (right is None)
            if right is not None:
                np.testing.assert_array_equal(left.numpy(), right.numpy())


def test_nothing_outside_the_prefix_is_listed_or_read(tmp_path, s3_env, hashed):  # noqa: F811
    fs, base = open_filesystem(s3_env)
    local = tmp_path / "line"
    image(local / "a.png")
    image(local / "b.png")
    line = upload_tree(local, f"{s3_env}/line")
    sibling = upload_tree(local, f"{s3_env}/line2")  # shares the prefix's first characters
    # An object whose key climbs out of the prefix by its segments, and a literal dot.
    with open(local / "a.png", "rb") as handle:
        fs.pipe_file(f"{base}/line/x/../../line2/escape.png", handle.read())
        fs.pipe_file(f"{base}/line/./dot.png", handle.read())
    found, aside = discover_line(line, "folder", "line")
    assert [s.record.name for s in found] == ["a", "b"]
    assert all(s.record.image_path.startswith(f"{line}/") for s in found)
    assert sorted(a.name for a in aside) == ["dot", "x/../../line2/escape"]
    assert all("outside the dataset root" in a.problem for a in aside)
    assert not any(p.startswith(sibling) or "/../" in p or "/./" in p for p in hashed)


def test_visa_rows_climbing_out_of_the_bucket_prefix_are_set_aside(
    tmp_path, s3_env, hashed  # noqa: F811
):
    local = tmp_path / "visa"
    _visa(local)
    image(tmp_path / "secret.png")
    (local / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.png,\n"
        "candle,test,normal,candle/../../secret.png,\n"
    )
    url = upload_tree(local, f"{s3_env}/visa")
    fs, base = open_filesystem(s3_env)
    with open(tmp_path / "secret.png", "rb") as handle:
        fs.pipe_file(f"{base}/secret.png", handle.read())  # where the row climbs to
    found, aside = discover_line(url, "visa", "candle")
    assert [s.record.name for s in found] == ["Normal/0000"]
    (item,) = aside
    assert "outside the dataset root" in item.problem
    assert not any("secret" in p for p in hashed)


def test_url_inside_by_literal_segments():
    root = "s3://bucket/line"
    assert sources.url_inside("s3://bucket/line/a/b.png", root)
    assert sources.url_inside("s3://bucket/line/a/b.png", root + "/")
    assert not sources.url_inside("s3://bucket/line2/a.png", root)
    assert not sources.url_inside("s3://bucket/line/../x.png", root)
    assert not sources.url_inside("s3://bucket/line/a/./x.png", root)
    assert not sources.url_inside("s3://bucket/line//x.png", root)
    assert not sources.url_inside("gs://bucket/line/x.png", root)
    assert not sources.url_inside("/bucket/line/x.png", root)


def test_a_missing_bucket_or_prefix_is_an_error_naming_data(s3_env):
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        read_dataset("s3://no-such-bucket-here/line", "folder", "line")
    with pytest.raises(UsageError, match=r"argument data: no objects below 's3://no-such-bu"):
        check_dataset("s3://no-such-bucket-here/line", "folder", None)
    with pytest.raises(UsageError, match="argument data: no objects below"):
        check_dataset(f"{s3_env}/empty-prefix", "folder", None)
    with pytest.raises(UsageError, match="argument data: .*a bucket or folder"):
        check_dataset("s3://", "folder", None)


def test_any_fsspec_url_reads_like_the_folder_on_disk(tmp_path):
    import fsspec

    local = tmp_path / "data"
    category = _folder(local)
    url = f"memory://musc-test-{tmp_path.name}/{category}"
    fs = fsspec.filesystem("memory")
    for folder, _, names in os.walk(local / category):
        for name in names:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, local / category).replace(os.sep, "/")
            with open(path, "rb") as handle:
                fs.pipe_file(f"{url}/{key}", handle.read())
    try:
        found_disk, _ = discover_line(str(local / category), "folder", category)
        found_mem, aside = discover_line(url, "folder", category)
        assert not aside and [s.record.name for s in found_mem] == [
            s.record.name for s in found_disk
        ]
        assert [s.digests for s in found_mem] == [s.digests for s in found_disk]
        assert all(s.record.image_path is None or s.record.image_path.startswith("memory://")
                   for s in found_mem)
        assert not sources.url_inside("memory:///elsewhere/a.png", url)
    finally:
        fs.rm(url, recursive=True)


def test_objects_too_large_for_the_pixel_limit_are_not_fetched(tmp_path, monkeypatch):
    import fsspec

    from tasks.formats import image_io

    fs = fsspec.filesystem("memory")
    url = f"memory://musc-test-{tmp_path.name}/big.png"
    fs.pipe_file(url, image(tmp_path / "big.png").read_bytes())
    fetched = []
    monkeypatch.setattr(image_io, "read_bytes", lambda u: fetched.append(u) or b"")
    monkeypatch.setenv("MUSC_MAX_IMAGE_PIXELS", "10")  # 160 bytes at 16 bytes per pixel
    try:
        with pytest.raises(ValueError, match=r"big.png: .* bytes, more than .*refusing to fetch"):
            image_io.load_image(url)
        assert fetched == []
        fs.pipe_file(url, b"")
        with pytest.raises(ValueError, match="big.png: empty file"):
            image_io.load_image(url)
    finally:
        fs.rm(url)


def test_an_unreachable_s3_endpoint_for_data_is_an_error_naming_data(monkeypatch):
    import socket

    with socket.socket() as probe:  # a free port on 127.0.0.1, closed again: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MUSC_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(
        UsageError,
        match=rf"argument data: 's3://bucket/line': the S3 endpoint http://127.0.0.1:{port} "
        "refuses connections",
    ):
        check_dataset("s3://bucket/line", "folder", None)
