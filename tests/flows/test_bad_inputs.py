"""Bad inputs: one real run of a line holding every kind of bad file, against the same line
without them.

The clean line is a generated MVTec 3D-AD line plus good samples in unusual pixel formats
and with unusual names (all of them must be accepted and scored). The bad line is the clean
line plus one sample per kind of bad input. Both go through ``score_line`` and the bad one
also through ``musc score``: the run completes, the good samples' rows and maps equal the
clean run's (samples are ordered by content hash, so that holds only if the bad ones were set
aside before scoring), and every bad sample is listed with its file and its problem.
"""

import contextlib
import csv
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from flows.cli import main
from flows.score_line import LineNotScored
from tasks.cache.store import FeatureCache
from tasks.formats.image_io import DEFAULT_MAX_IMAGE_PIXELS
from tasks.synthetic.generator import generate_line
from tests.flows.chaos import PARAMS, cli_args
from tests.flows.conftest import SIZE, read_scores, run_line

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.usefixtures("prefect_server")]

CLI_PARAMS = cli_args()
SCRIPT_NAME = "<script>alert(1)</script>"
# Accepted samples beside the generated ones: name -> what is unusual about it.
ACCEPTED = {
    "good/rgba": "RGBA image (alpha ignored)",
    "good/palette": "palette image",
    "good/gray8": "8-bit grayscale image",
    "good/gray16": "16-bit grayscale image",
    "good/naïve part №1": "file name with spaces and unicode",
    "good/up\\..\\..\\..\\escape": "file name with '..\\' trying to leave the output folder",
    SCRIPT_NAME: "file name holding HTML",
}
# Bad samples: name -> (what, file named in the message, words of the problem).
BAD = {
    "bad/empty": ("empty image file", "empty.png", "empty file"),
    "bad/truncated_png": ("truncated PNG", "truncated_png.png", "truncated or damaged"),
    "bad/not_an_image": ("text with a .png extension", "not_an_image.png", "not an image"),
    "bad/truncated_tiff": ("truncated XYZ TIFF", "truncated_tiff.tiff", "cannot read TIFF"),
    "bad/nan_xyz": ("XYZ map with NaN and inf", "nan_xyz.tiff", "NaN or infinite"),
    "bad/zero_xyz": ("XYZ map of zeros", "zero_xyz.tiff", "all zeros"),
    "bad/few_points": ("too few foreground points", "few_points.tiff", "foreground points"),
    "bad/size_mismatch": ("image and XYZ map sizes differ", "size_mismatch.tiff",
                          "but the image is"),
    "bad/overflow_xyz": ("XYZ coordinates near the float32 limit", "overflow_xyz.tiff",
                         "too large"),
    "bad/huge_image": ("decompression bomb (80 Mpx PNG of 80 kB)", "huge_image.png",
                       "above the limit"),
    "bad/broken_mask": ("truncated ground-truth mask", "broken_mask.png", "truncated"),
    "bad/outside_link": ("symlink to a file outside the dataset", "outside_link.png",
                         "outside the dataset root"),
    "bad/duplicate": ("two XYZ maps for one name (.tif and .tiff)", "duplicate.tif",
                      "duplicate sample name"),
}
GOOD_COUNT = 8 + len(ACCEPTED)


# --------------------------------------------------------------------------- building lines
def png_bomb(path: Path, width: int, height: int) -> None:
    """A valid all-black 8-bit gray PNG, streamed: tiny on disk, width·height bytes decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _xyz(path: Path, xyz: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.ascontiguousarray(xyz, dtype=np.float32), photometric="rgb")


def build_clean(root: Path) -> Path:
    """The generated line plus accepted samples in unusual formats and with unusual names."""
    generate_line(root, category="part", num_samples=8, image_size=SIZE, defect_rate=0.5, seed=3)
    good = root / "part" / "test" / "good"
    rgb = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in (good / "rgb").glob("*.png")}
    xyz = {p.stem: tifffile.imread(p) for p in (good / "xyz").glob("*.tiff")}
    stems = sorted(rgb)
    first, second, third = stems[:3]
    # RGBA twin of the first good sample, random alpha: the alpha channel is ignored.
    alpha = np.random.default_rng(0).integers(0, 256, rgb[first].shape[:2], dtype=np.uint8)
    _save(Image.fromarray(np.dstack([rgb[first], alpha]), "RGBA"), good / "rgb" / "rgba.png")
    _xyz(good / "xyz" / "rgba.tiff", xyz[first])
    # Palette twin of the second good sample, which is replaced by the palette's colours.
    palette = Image.fromarray(rgb[second]).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    _save(palette.convert("RGB"), good / "rgb" / f"{second}.png")
    _save(palette, good / "rgb" / "palette.png")
    _xyz(good / "xyz" / "palette.tiff", xyz[second])
    # 8- and 16-bit grayscale twins (16-bit = 8-bit · 257 decodes to the same pixels).
    gray = np.asarray(Image.fromarray(rgb[third]).convert("L"))
    _save(Image.fromarray(gray, "L"), good / "rgb" / "gray8.png")
    _save(Image.fromarray(gray.astype(np.uint16) * 257), good / "rgb" / "gray16.png")
    for stem in ("gray8", "gray16"):
        _xyz(good / "xyz" / f"{stem}.tiff", xyz[third])
    # Unusual names: mirrored or flipped copies of good samples (new content, new keys).
    named = {
        good / "rgb" / "naïve part №1.png": (stems[3], np.s_[:, ::-1]),
        good / "rgb" / "up\\..\\..\\..\\escape.png": (stems[0], np.s_[::-1, :]),
        root / "part" / "test" / "<script>alert(1)<" / "rgb" / "script>.png": (
            stems[1], np.s_[:, ::-1]),
    }
    for image_path, (stem, flip) in named.items():
        _save(Image.fromarray(rgb[stem][flip].copy()), image_path)
        _xyz(image_path.parent.parent / "xyz" / f"{image_path.stem}.tiff", xyz[stem][flip])
    return root


def build_bad(clean: Path, root: Path, outside: Path) -> Path:
    """The clean line plus one sample per kind of bad input (in ``part/test/bad``)."""
    shutil.copytree(clean, root, symlinks=True)
    good = root / "part" / "test" / "good"
    bad = root / "part" / "test" / "bad"
    source = sorted((good / "rgb").glob("00*.png"))[-1].stem
    png = (good / "rgb" / f"{source}.png").read_bytes()
    tiff = (good / "xyz" / f"{source}.tiff").read_bytes()
    xyz = tifffile.imread(good / "xyz" / f"{source}.tiff")

    def sample(stem: str, image: bytes = png, points: bytes | np.ndarray = tiff,
               suffix: str = ".tiff") -> None:
        (bad / "rgb").mkdir(parents=True, exist_ok=True)
        (bad / "xyz").mkdir(parents=True, exist_ok=True)
        (bad / "rgb" / f"{stem}.png").write_bytes(image)
        if isinstance(points, bytes):
            (bad / "xyz" / f"{stem}{suffix}").write_bytes(points)
        else:
            _xyz(bad / "xyz" / f"{stem}{suffix}", points)

    sample("empty", image=b"")
    sample("truncated_png", image=png[: len(png) // 2])
    sample("not_an_image", image=b"this is a text file, not a picture\n" * 20)
    sample("truncated_tiff", points=tiff[: len(tiff) // 2])
    broken = xyz.copy()
    broken[10, 10] = np.nan
    broken[20, 20, 2] = np.inf
    sample("nan_xyz", points=broken)
    sample("zero_xyz", points=np.zeros_like(xyz))
    few = np.zeros_like(xyz)  # the support plane in the border, 9 points of object left
    few[:10], few[-10:], few[:, :10], few[:, -10:] = xyz[:10], xyz[-10:], xyz[:, :10], xyz[:, -10:]
    few[31:34, 31:34] = xyz[31:34, 31:34] + np.float32([0, 0, -0.05])
    sample("few_points", points=few)
    sample("size_mismatch", points=xyz[::2, ::2])
    overflow = few.copy()  # the support plane, and an object at the float32 limit
    overflow[20:44, 20:44] = np.float32(3e38)
    sample("overflow_xyz", points=overflow)
    sample("huge_image")
    png_bomb(bad / "rgb" / "huge_image.png", 10_000, 8_000)
    sample("broken_mask")
    (bad / "gt").mkdir(exist_ok=True)
    mask = (good / "gt" / f"{source}.png").read_bytes()
    (bad / "gt" / "broken_mask.png").write_bytes(mask[: len(mask) // 2])
    sample("outside_link")
    (bad / "rgb" / "outside_link.png").unlink()
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "elsewhere.png").write_bytes(png)
    (bad / "rgb" / "outside_link.png").symlink_to(outside / "elsewhere.png")
    sample("duplicate", suffix=".tif")
    (bad / "xyz" / "duplicate.tiff").write_bytes(tiff)
    return root


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` (outside ``skip``) with its size and modification time."""
    files = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip) or not path.is_file():
            continue
        stat = path.lstat()
        files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


# --------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The clean run, the bad run (flow) and ``musc score`` on the bad line (strict, then not)."""
    top = tmp_path_factory.mktemp("bad-inputs")
    clean = build_clean(top / "clean")
    bad = build_bad(clean, top / "bad", top / "outside")
    written = [top / "store-clean", top / "store-bad", top / "out-cli", top / "out-cli-2"]
    before = snapshot(top, written)
    clean_summary = run_line(
        data=str(clean), storage=str(top / "store-clean"), cluster="threads", batch="b1",
        **PARAMS,
    )
    bad_summary = run_line(
        data=str(bad), storage=str(top / "store-bad"), cluster="threads", batch="b1", **PARAMS
    )
    cli = {}
    # each run records a batch of its own on the bad run's storage (a record is never replaced)
    for flag, out, batch in (("--fail-on-set-aside", "out-cli", "b2"), (None, "out-cli-2", "b3")):
        stdout = io.StringIO()
        argv = ["score", str(bad), "--out", str(top / out), "--storage",
                str(top / "store-bad"), *cli_args(batch)] + ([flag] if flag else [])
        with contextlib.redirect_stdout(stdout):
            status = main(argv)
        cli[flag] = (status, stdout.getvalue(), top / out)
    return {
        "top": top, "clean": clean_summary, "bad": bad_summary, "cli": cli, "before": before,
        "after": snapshot(top, written), "written": written, "outside": top / "outside",
    }


def _set_aside_csv(path: Path) -> dict[str, list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(row["name"], []).append(row)
    return grouped


def _maps(summary: dict) -> dict[str, np.ndarray]:
    rows = read_scores(summary["outputs"]["scores"])
    return {name: np.load(Path(summary["out"]) / row["map_file"]) for name, row in rows.items()}


# --------------------------------------------------------------------------- tests
def test_good_samples_keep_the_clean_runs_results(runs, chaos_record):
    clean, bad = runs["clean"], runs["bad"]
    assert clean["scored"] == bad["scored"] == GOOD_COUNT and clean["set_aside"] == []
    clean_rows, bad_rows = (read_scores(s["outputs"]["scores"]) for s in (clean, bad))
    assert bad_rows == clean_rows  # ranks, scores, flags, map files: all identical
    clean_maps, bad_maps = _maps(clean), _maps(bad)
    assert clean_maps.keys() == bad_maps.keys()
    for name, heat in clean_maps.items():
        np.testing.assert_array_equal(bad_maps[name], heat, err_msg=name)
    everything = set(clean_rows) | set(BAD)
    lost = len(everything - set(bad_rows) - {name for name, _p, _q in bad["set_aside"]})
    for _status, _stdout, out in runs["cli"].values():
        (summary,) = json.loads((out / "run.json").read_text(encoding="utf-8"))["lines"]
        aside = {name for name, _path, _problem in summary["set_aside"]}
        lost += len(everything - set(read_scores(out / "part" / "scores.csv")) - aside)
    chaos_record(kind="run", what="bad line: score_line, musc score (strict and not)", runs=3,
                 completed=3, samples=3 * (GOOD_COUNT + len(BAD) + 1), lost=lost)


def test_every_bad_sample_is_set_aside_with_its_file_and_problem(runs, chaos_record):
    bad = runs["bad"]
    out = Path(bad["out"])
    listed = _set_aside_csv(out / "set_aside.csv")
    from_run = {}
    for item in json.loads((out / "run.json").read_text(encoding="utf-8"))["set_aside"]:
        from_run.setdefault(item["name"], []).append(item)
    summary = {name for name, _path, _problem in bad["set_aside"]}
    scored = read_scores(bad["outputs"]["scores"])
    assert set(listed) == set(from_run) == summary == set(BAD)
    assert len(listed["bad/duplicate"]) == 2  # both files of the name, none preferred
    for name, (what, file_name, words) in BAD.items():
        assert name not in scored
        for row in listed[name] + from_run[name]:
            assert file_name in row["problem"], (name, row["problem"])
            assert words.lower() in row["problem"].lower(), (name, row["problem"])
        chaos_record(kind="input", what=what, runs=3, completed=3, samples=1,
                     outcome="set aside", lost=0)


def test_unusual_formats_and_names_are_accepted_and_scored(runs, chaos_record):
    bad = runs["bad"]
    scored = read_scores(bad["outputs"]["scores"])
    record = json.loads(
        (runs["top"] / "store-bad" / "lines" / "part" / "batches" / "b1.json").read_text()
    )
    cache = FeatureCache(str(runs["top"] / "store-bad" / "cache"))
    prepared = {s["name"]: cache.read(s["prepared"]["image"])[0] for s in record["samples"]}
    good = sorted(n for n in prepared if n.startswith("good/00"))
    for name, what in ACCEPTED.items():
        assert name in scored, name
        heat = np.load(Path(bad["out"]) / scored[name]["map_file"])
        assert heat.shape == (SIZE, SIZE) and np.isfinite(heat).all()
        chaos_record(kind="input", what=what, runs=3, completed=3, samples=1,
                     outcome="scored", lost=0)
    # Independent truth: each format decodes to the same pixels as its 8-bit RGB twin.
    np.testing.assert_array_equal(prepared["good/rgba"]["image"], prepared[good[0]]["image"])
    np.testing.assert_array_equal(prepared["good/palette"]["image"], prepared[good[1]]["image"])
    np.testing.assert_array_equal(prepared["good/gray16"]["image"], prepared["good/gray8"]["image"])
    gray = prepared["good/gray8"]["image"]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    assert not np.array_equal(gray[0], prepared[good[2]]["image"][0])


def test_nothing_is_written_outside_the_output_and_storage(runs):
    assert runs["after"] == runs["before"], "files changed outside --out/--storage"
    assert sorted(p.name for p in runs["outside"].iterdir()) == ["elsewhere.png"]
    for summary in (runs["bad"], runs["clean"]):
        out = Path(summary["out"]).resolve()
        for kind in ("maps", "overlays"):
            for path in (out / kind).iterdir():
                assert path.resolve().parent == out / kind
        names = {p.name for p in (out / "maps").iterdir()}
        assert "escape.npy" not in names and any("escape" in n for n in names)


def test_the_report_escapes_sample_names(runs):
    report = Path(runs["bad"]["outputs"]["report"]).read_text(encoding="utf-8")
    assert SCRIPT_NAME not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report


def test_musc_score_lists_set_aside_samples_and_exits_3_when_asked(runs):
    strict_status, strict_out, strict_dir = runs["cli"]["--fail-on-set-aside"]
    status, stdout, out = runs["cli"][None]
    assert strict_status == 3 and status == 0
    for text in (strict_out, stdout):
        assert f"{GOOD_COUNT} samples scored" in text and f"{len(BAD) + 1} set aside" in text
        for name, (_what, file_name, _words) in BAD.items():
            assert f"set aside {name!r}" in text and file_name in text
    for folder in (strict_dir, out):
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        (line,) = run["lines"]
        assert {name for name, _path, _problem in line["set_aside"]} == set(BAD)
        assert read_scores(folder / "part" / "scores.csv") == read_scores(
            runs["bad"]["outputs"]["scores"]
        )


def test_the_decompression_bomb_is_small_on_disk_and_refused_from_its_header(runs):
    bomb = runs["top"] / "bad" / "part" / "test" / "bad" / "rgb" / "huge_image.png"
    assert bomb.stat().st_size < 1_000_000
    with Image.open(bomb) as image:
        assert image.size[0] * image.size[1] > DEFAULT_MAX_IMAGE_PIXELS
    problem = next(p for n, _f, p in runs["bad"]["set_aside"] if n == "bad/huge_image")
    assert "10000x8000" in problem and f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in problem


def test_a_line_with_fewer_than_two_usable_samples_is_not_scored(tmp_path, chaos_record):
    data = tmp_path / "data"
    generate_line(data, category="part", num_samples=2, image_size=SIZE, defect_rate=0.0, seed=1)
    (data / "part" / "test" / "good" / "rgb" / "000.png").write_bytes(b"")
    with pytest.raises(LineNotScored, match="1 usable sample") as caught:
        run_line(data=str(data), storage=str(tmp_path / "store"), cluster="threads",
                   batch="b1", **PARAMS)
    assert [a.name for a in caught.value.set_aside] == ["good/000"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["score", str(data), "--out", str(tmp_path / "out"), "--storage",
                       str(tmp_path / "store"), *CLI_PARAMS])
    text = stdout.getvalue()
    assert status == 4
    assert "NOT SCORED" in text and "at least 2" in text and "000.png" in text
    assert "empty file" in text
    run = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert run["lines"][0]["error"] and run["lines"][0]["scored"] == 0
    chaos_record(kind="run", what="line with one usable sample", outcome="exit 4", runs=2,
                 completed=2, samples=2, lost=0)


def test_scores_csv_is_plain_csv_and_unicode_names_keep_their_letters(runs):
    out = Path(runs["clean"]["out"])
    with open(out / "scores.csv", encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    assert header[:2] == ["rank", "name"] and header[-1] == "random_weights"
    assert len(rows) == GOOD_COUNT and {r["random_weights"] for r in rows} == {"1"}
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["random_weights"] is True
    row = {r["name"]: r for r in rows}["good/naïve part №1"]
    assert row["map_file"] == "maps/good__naïve part №1.npy"
    assert (out / row["map_file"]).is_file()
