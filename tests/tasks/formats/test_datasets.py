"""Dataset readers on tiny fake trees of every layout, and the file loaders."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from tasks.discover import discover_line
from tasks.formats.datasets import (
    SampleRecord,
    list_categories,
    load_eyecandies_depth,
    load_image,
    load_mask,
    load_xyz,
    read_dataset,
)

RNG = np.random.default_rng(0)


def png(path, array=None, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = RNG.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    image.save(path)
    return path


def mask_png(path, anomalous):
    array = np.zeros((4, 5), dtype=np.uint8)
    if anomalous:
        array[1:3, 2] = 255
    return png(path, array)


def tiff(path, array=None, photometric=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = RNG.random((4, 5, 3)).astype(np.float32)
    if photometric is None:
        photometric = "rgb" if array.ndim == 3 and array.shape[2] == 3 else "minisblack"
    tifffile.imwrite(path, array, photometric=photometric)
    return path


def names(records):
    return [r.name for r in records]


# ------------------------------------------------------------------------------------------
# MVTec 3D-AD


@pytest.fixture
def mvtec3d(tmp_path):
    root = tmp_path / "mvtec3d"
    for cat in ("bagel", "cookie"):
        for defect, stems in (("good", ["000", "001"]), ("crack", ["001", "000"])):
            for stem in stems:
                base = root / cat / "test" / defect
                png(base / "rgb" / f"{stem}.png")
                tiff(base / "xyz" / f"{stem}.tiff")
                mask_png(base / "gt" / f"{stem}.png", defect != "good")
        png(root / cat / "train" / "good" / "rgb" / "000.png")
    (root / "readme.txt").write_text("not a category")
    (root / ".cache").mkdir()
    return root


def test_mvtec3d_records(mvtec3d):
    assert list_categories(mvtec3d, "mvtec3d") == ["bagel", "cookie"]
    records = read_dataset(mvtec3d, "mvtec3d", "bagel")
    assert names(records) == ["crack/000", "crack/001", "good/000", "good/001"]
    first = records[0]
    assert isinstance(first, SampleRecord)
    assert first.category == "bagel" and first.label == 1 and first.defect_type == "crack"
    base = mvtec3d / "bagel" / "test" / "crack"
    assert first.image_path == str(base / "rgb" / "000.png")
    assert first.xyz_path == str(base / "xyz" / "000.tiff")
    assert first.mask_path == str(base / "gt" / "000.png")
    assert [r.label for r in records] == [1, 1, 0, 0]
    assert all(r.depth_path is None for r in records)
    # The same twice: stable order.
    assert read_dataset(mvtec3d, "mvtec3d", "bagel") == records


def test_mvtec3d_root_may_be_the_category_folder(mvtec3d):
    assert list_categories(mvtec3d / "cookie", "mvtec3d") == ["cookie"]
    records = read_dataset(mvtec3d / "cookie", "mvtec3d", "cookie")
    assert len(records) == 4 and all(r.category == "cookie" for r in records)


def test_mvtec3d_three_d_only_samples_and_bad_layouts(mvtec3d, tmp_path):
    (mvtec3d / "bagel" / "test" / "good" / "rgb" / "001.png").unlink()
    record = {r.name: r for r in read_dataset(mvtec3d, "mvtec3d", "bagel")}["good/001"]
    assert record.image_path is None and record.xyz_path.endswith("001.tiff")

    (mvtec3d / "bagel" / "test" / "hole").mkdir()
    with pytest.raises(ValueError, match="hole"):
        read_dataset(mvtec3d, "mvtec3d", "bagel")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_dataset(mvtec3d, "mvtec3d", "nope")
    with pytest.raises(FileNotFoundError, match="missing_root"):
        read_dataset(tmp_path / "missing_root", "mvtec3d", "bagel")
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_root"):
        list_categories(empty, "mvtec3d")
    with pytest.raises(ValueError, match="format"):
        list_categories(mvtec3d, "kitti")


# ------------------------------------------------------------------------------------------
# Eyecandies


def _eyecandies_sample(data, sample_id, anomalous, mask=True, info="normalization"):
    png(data / f"{sample_id}_image_0.png")
    png(data / f"{sample_id}_image_1.png")
    png(data / f"{sample_id}_depth.png", (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16))
    if info == "normalization":
        text = "normalization:\n  min: 0.5\n  max: 1.25\n"
    else:
        text = "min: 0.5\nmax: 1.25\n"
    (data / f"{sample_id}_info_depth.yaml").write_text(text)
    np.savetxt(data / f"{sample_id}_pose.txt", np.eye(4) * 2)
    if mask:
        mask_png(data / f"{sample_id}_mask.png", anomalous)


@pytest.fixture
def eyecandies(tmp_path):
    root = tmp_path / "eyecandies"
    data = root / "CandyCane" / "test_public" / "data"
    _eyecandies_sample(data, "001", anomalous=True)
    _eyecandies_sample(data, "000", anomalous=False, info="top")
    _eyecandies_sample(data, "002", anomalous=False, mask=False)
    (root / "GummyBear" / "test_public" / "data").mkdir(parents=True)
    (root / "GummyBear" / "train").mkdir()
    return root


def test_eyecandies_records_and_labels_from_masks(eyecandies):
    assert list_categories(eyecandies, "eyecandies") == ["CandyCane", "GummyBear"]
    records = read_dataset(eyecandies, "eyecandies", "CandyCane")
    assert names(records) == ["000", "001", "002"]
    assert [r.label for r in records] == [0, 1, None]
    data = eyecandies / "CandyCane" / "test_public" / "data"
    r = records[1]
    assert r.image_path == str(data / "001_image_0.png")
    assert r.depth_path == str(data / "001_depth.png")
    assert r.info_path == str(data / "001_info_depth.yaml")
    assert r.pose_path == str(data / "001_pose.txt")
    assert r.mask_path == str(data / "001_mask.png") and records[2].mask_path is None
    with pytest.raises(ValueError, match="GummyBear"):
        read_dataset(eyecandies, "eyecandies", "GummyBear")


def test_eyecandies_depth_loader_reads_both_yaml_layouts(eyecandies):
    for record in read_dataset(eyecandies, "eyecandies", "CandyCane")[:2]:
        depth, low, high, pose = load_eyecandies_depth(
            record.depth_path, record.info_path, record.pose_path
        )
        assert depth.dtype == np.uint16 and depth.shape == (4, 5) and depth[3, 4] == 57000
        assert (low, high) == (0.5, 1.25)
        np.testing.assert_array_equal(pose, np.eye(4) * 2)


def test_eyecandies_depth_loader_errors_name_the_file(tmp_path):
    depth = png(tmp_path / "d.png", np.full((4, 5), 1000, dtype=np.uint16))
    pose = tmp_path / "p.txt"
    np.savetxt(pose, np.eye(4))
    info = tmp_path / "info.yaml"
    info.write_text("something: 1\n")
    with pytest.raises(ValueError, match="info.yaml.*depth range"):
        load_eyecandies_depth(depth, info, pose)
    info.write_text("normalization: {min: 2.0, max: 1.0}\n")
    with pytest.raises(ValueError, match="info.yaml"):
        load_eyecandies_depth(depth, info, pose)
    info.write_text("normalization: {min: 0.0, max: 1.0}\n")
    pose.write_text("1 2 3\n")
    with pytest.raises(ValueError, match="p.txt"):
        load_eyecandies_depth(depth, info, pose)
    np.savetxt(pose, np.eye(4))
    eight_bit = png(tmp_path / "d8.png", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="d8.png.*16-bit"):
        load_eyecandies_depth(eight_bit, info, pose)
    with pytest.raises(ValueError, match="info_depth"):
        load_eyecandies_depth(depth, None, pose)


# ------------------------------------------------------------------------------------------
# MVTec AD / MPDD / BTAD


@pytest.mark.parametrize("fmt", ["mvtec", "mpdd"])
def test_mvtec_ad_layout(tmp_path, fmt):
    root = tmp_path / fmt
    cat = root / "bottle"
    for stem in ("001", "000"):
        png(cat / "test" / "good" / f"{stem}.png")
        png(cat / "test" / "broken_large" / f"{stem}.png")
        mask_png(cat / "ground_truth" / "broken_large" / f"{stem}_mask.png", True)
    png(cat / "train" / "good" / "000.png")
    (cat / "test" / "good" / ".DS_Store").write_bytes(b"junk")
    (root / "license.txt").write_text("x")
    assert list_categories(root, fmt) == ["bottle"]
    records = read_dataset(root, fmt, "bottle")
    assert names(records) == ["broken_large/000", "broken_large/001", "good/000", "good/001"]
    assert [r.label for r in records] == [1, 1, 0, 0]
    assert records[1].mask_path == str(cat / "ground_truth" / "broken_large" / "001_mask.png")
    assert records[2].mask_path is None and records[2].defect_type == "good"
    assert all(r.xyz_path is None for r in records)


def test_btad_layout_with_mixed_extensions(tmp_path):
    root = tmp_path / "btad"
    cat = root / "01"
    png(cat / "test" / "ok" / "0001.bmp")
    png(cat / "test" / "ko" / "0003.bmp")
    png(cat / "test" / "ko" / "0002.png")
    mask_png(cat / "ground_truth" / "ko" / "0003.png", True)
    mask_png(cat / "ground_truth" / "ko" / "0002.bmp", True)
    png(root / "02" / "test" / "ok" / "0000.png")
    assert list_categories(root, "btad") == ["01", "02"]
    records = read_dataset(root, "btad", "01")
    assert names(records) == ["ko/0002", "ko/0003", "ok/0001"]
    assert [r.label for r in records] == [1, 1, 0]
    assert records[0].mask_path.endswith("0002.bmp") and records[1].mask_path.endswith("0003.png")
    assert records[2].mask_path is None


# ------------------------------------------------------------------------------------------
# VisA


def test_visa_split_csv(tmp_path):
    root = tmp_path / "visa"
    rows = [
        "object,split,label,image,mask",
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,candle/Data/Masks/Anomaly/001.png",
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "pcb1,test,normal,pcb1/Data/Images/Normal/0000.JPG,",
        "macaroni1,train,normal,macaroni1/Data/Images/Normal/0000.JPG,",
    ]
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert list_categories(root, "visa") == ["candle", "pcb1"]
    records = read_dataset(root, "visa", "candle")
    assert names(records) == ["Anomaly/000", "Anomaly/001", "Normal/0001"]
    assert [r.label for r in records] == [1, 1, 0]
    assert records[0].image_path == str(root / "candle/Data/Images/Anomaly/000.JPG")
    assert records[0].mask_path == str(root / "candle/Data/Masks/Anomaly/000.png")
    assert records[2].mask_path is None
    with pytest.raises(ValueError, match="1cls.csv.*macaroni1"):
        read_dataset(root, "visa", "macaroni1")
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows[:2] + ["pcb1,test,weird,a.JPG,"]))
    with pytest.raises(ValueError, match=r"1cls.csv:3.*weird"):
        read_dataset(root, "visa", "pcb1")
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\n")
    with pytest.raises(ValueError, match="missing column"):
        list_categories(root, "visa")
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        list_categories(tmp_path, "visa")


# ------------------------------------------------------------------------------------------
# generic folder


def test_folder_matches_xyz_and_masks_by_stem(tmp_path):
    line = tmp_path / "line7"
    png(line / "a.png")
    png(line / "b.jpg")
    png(line / "sub" / "c.png")
    png(line / "16bit.tiff", np.full((4, 5), 40000, dtype=np.uint16))  # a TIFF image
    tiff(line / "xyz" / "a.tiff")
    tiff(line / "sub" / "c.tiff")  # float TIFF beside its image
    tiff(line / "scans" / "d.tif")  # float TIFF alone: a 3D-only sample
    planar = RNG.random((3, 4, 5)).astype(np.float32)
    tiff(line / "scans" / "e.tif", planar, "minisblack")  # planar float TIFF: 3D-only too
    mask_png(line / "masks" / "b_mask.png", True)
    mask_png(line / "sub" / "gt" / "c.png", True)
    (line / ".hidden").mkdir()
    png(line / ".hidden" / "x.png")
    (line / "notes.txt").write_text("ignored")

    assert list_categories(line, "folder") == ["line7"]
    records = {r.name: r for r in read_dataset(line, "folder", "line7")}
    assert sorted(records) == ["16bit", "a", "b", "scans/d", "scans/e", "sub/c"]
    assert all(r.label is None and r.category == "line7" for r in records.values())
    assert records["a"].xyz_path == str(line / "xyz" / "a.tiff")
    assert records["a"].mask_path is None
    assert records["b"].xyz_path is None
    assert records["b"].mask_path == str(line / "masks" / "b_mask.png")
    assert records["sub/c"].xyz_path == str(line / "sub" / "c.tiff")
    assert records["sub/c"].mask_path == str(line / "sub" / "gt" / "c.png")
    assert records["scans/d"].image_path is None
    assert records["scans/d"].xyz_path == str(line / "scans" / "d.tif")
    assert records["scans/e"].image_path is None
    assert records["16bit"].image_path == str(line / "16bit.tiff")
    assert names(read_dataset(line, "folder", "line7")) == sorted(records)
    # A parent folder of several lines: the category may name a subfolder.
    assert names(read_dataset(tmp_path, "folder", "line7")) == sorted(records)


def test_folder_prefers_the_closest_match_and_reports_ties(tmp_path):
    line = tmp_path / "line"
    png(line / "day1" / "rgb" / "001.png")
    png(line / "day2" / "rgb" / "001.png")
    tiff(line / "day1" / "xyz" / "001.tiff")
    tiff(line / "day2" / "xyz" / "001.tiff")
    records = read_dataset(line, "folder", "line")
    assert names(records) == ["day1/rgb/001", "day2/rgb/001"]
    assert records[0].xyz_path == str(line / "day1" / "xyz" / "001.tiff")
    assert records[1].xyz_path == str(line / "day2" / "xyz" / "001.tiff")
    tiff(line / "xyz" / "002.tiff")
    tiff(line / "other" / "xyz" / "002.tiff")
    png(line / "002.png")
    with pytest.raises(ValueError, match="002.png.*several XYZ"):
        read_dataset(line, "folder", "line")


def test_folder_masks_follow_the_sample_path_never_a_sibling_folder(tmp_path):
    line = tmp_path / "line"
    for folder in ("good", "crack", "dent", "scratch"):
        png(line / folder / "000.png")
    # one same-stem mask in a sibling folder: it is crack's, never good's
    mask_png(line / "crack" / "masks" / "000.png", True)
    # mirrored tree at the line root, and an rgb/ image folder beside gt/
    mask_png(line / "ground_truth" / "dent" / "000_mask.png", True)
    png(line / "day1" / "rgb" / "001.png")
    mask_png(line / "day1" / "gt" / "001.png", True)
    png(line / "day2" / "rgb" / "001.png")
    mask_png(line / "day2" / "rgb" / "masks" / "001_mask.png", True)
    records = {r.name: r for r in read_dataset(line, "folder", "line")}
    assert records["good/000"].mask_path is None and records["scratch/000"].mask_path is None
    assert records["crack/000"].mask_path == str(line / "crack" / "masks" / "000.png")
    assert records["dent/000"].mask_path == str(line / "ground_truth" / "dent" / "000_mask.png")
    assert records["day1/rgb/001"].mask_path == str(line / "day1" / "gt" / "001.png")
    assert records["day2/rgb/001"].mask_path == str(
        line / "day2" / "rgb" / "masks" / "001_mask.png"
    )
    assert all(r.mask_problem is None for r in records.values())
    # two same-stem masks in two sibling folders: the line still reads (was an error)
    mask_png(line / "scratch" / "gt" / "000.png", True)
    records = {r.name: r for r in read_dataset(line, "folder", "line")}
    assert records["good/000"].mask_path is None
    assert records["scratch/000"].mask_path == str(line / "scratch" / "gt" / "000.png")


def test_ambiguous_folder_masks_set_only_their_samples_aside(tmp_path):
    line = tmp_path / "line"
    for stem in ("a", "b", "c"):
        png(line / f"{stem}.png")
    mask_png(line / "masks" / "a.png", True)
    mask_png(line / "gt" / "a_mask.png", True)  # a second mask for a
    mask_png(line / "masks" / "b.png", True)
    png(line / "rgb" / "b.png")  # b.png and rgb/b.png both repeat masks/b.png's path
    found, aside = discover_line(str(line), "folder", "line")
    assert [s.record.name for s in found] == ["c"]
    problems = {a.name: a.problem for a in aside}
    assert sorted(problems) == ["a", "b", "rgb/b"]
    assert "several masks match sample 'a'" in problems["a"] and "a_mask.png" in problems["a"]
    assert "matches several samples" in problems["b"] and "rgb/b" in problems["b"]


def test_colour_masks_must_be_binary(tmp_path):
    two = np.zeros((4, 5, 3), dtype=np.uint8)
    two[1, 1] = (255, 0, 0)
    assert load_mask(png(tmp_path / "two.png", two)).sum() == 1
    many = RNG.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="many.png: not a binary mask"):
        load_mask(png(tmp_path / "many.png", many))


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "xyz").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*no images"):
        read_dataset(empty, "folder", "empty")
    with pytest.raises(FileNotFoundError, match="other"):
        read_dataset(empty, "folder", "other")


# ------------------------------------------------------------------------------------------
# loaders


def test_load_image_converts_every_pixel_format(tmp_path):
    gray16 = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    out = load_image(png(tmp_path / "g16.png", gray16))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(gray16 / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])

    gray = RNG.integers(0, 255, (4, 5), dtype=np.uint8)
    out = load_image(png(tmp_path / "g.png", gray))
    np.testing.assert_array_equal(out, np.stack([gray] * 3, -1))

    rgba = RNG.integers(0, 255, (4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(png(tmp_path / "rgba.png", rgba)), rgba[..., :3])

    palette = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[1, 0], [70, 80, 90])
    np.testing.assert_array_equal(out[0, 1], [40, 50, 60])

    rgb16 = RNG.integers(0, 65535, (4, 5, 3)).astype(np.uint16)
    out = load_image(tiff(tmp_path / "rgb16.tiff", rgb16))
    np.testing.assert_array_equal(out, np.round(rgb16 / 257.0).astype(np.uint8))

    rgb = RNG.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(png(tmp_path / "rgb.png", rgb)), rgb)


def test_loaders_reject_bad_files_naming_them(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    good = png(tmp_path / "full.png", RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (empty, garbage, truncated):
        for loader in (load_image, load_mask):
            with pytest.raises(ValueError, match=str(path.name)) as info:
                loader(path)
            assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    for path in (empty, garbage):
        with pytest.raises(ValueError, match=str(path.name)):
            load_xyz(path)


def test_load_mask_any_non_zero(tmp_path):
    array = np.zeros((4, 5, 3), dtype=np.uint8)
    array[1, 2, 1] = 1
    mask = load_mask(png(tmp_path / "m.png", array))
    assert mask.dtype == np.bool_ and mask.shape == (4, 5) and mask.sum() == 1 and mask[1, 2]
    gray = np.zeros((4, 5), dtype=np.uint8)
    gray[0, 0] = 255
    assert load_mask(png(tmp_path / "g.png", gray)).sum() == 1


def test_load_xyz(tmp_path):
    xyz = RNG.random((4, 5, 3)).astype(np.float64)
    out = load_xyz(tiff(tmp_path / "a.tiff", xyz))
    assert out.dtype == np.float32 and out.shape == (4, 5, 3)
    np.testing.assert_allclose(out, xyz, rtol=1e-6)
    # Planar storage (3, H, W), one page per coordinate, reads the same.
    planar = tiff(tmp_path / "planar.tiff", xyz.transpose(2, 0, 1).copy(), "minisblack")
    np.testing.assert_allclose(load_xyz(planar), xyz, rtol=1e-6)
    with pytest.raises(ValueError, match="b.tiff.*shape"):
        load_xyz(tiff(tmp_path / "b.tiff", RNG.random((4, 5)).astype(np.float32)))
    with pytest.raises(ValueError, match="c.tiff.*floating"):
        load_xyz(tiff(tmp_path / "c.tiff", np.zeros((4, 5, 3), dtype=np.uint16)))
    with pytest.raises(ValueError, match="d.png"):
        load_xyz(png(tmp_path / "d.png"))
