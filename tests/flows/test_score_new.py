"""The score-new flow: new parts against a line's bank of cached entries, and its command."""

import json
import shutil

import numpy as np
import pytest

from flows.cli import main
from flows.score_new import part_records
from tasks.planning.bank import bank_reductions
from tasks.records.batch_record import list_batches, read_batch_record
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import SMALL, read_scores, run_line, run_score_new
from tests.flows.test_score_line import ForwardCounter

pytestmark = pytest.mark.usefixtures("prefect_server")
CLI_SMALL = ["--cluster", "threads", "--quiet"]


@pytest.fixture(scope="module")
def batch(line, tmp_path_factory, prefect_server):
    """The 8-sample line scored as batch b1 in blocks of 3: (storage, summary)."""
    store = str(tmp_path_factory.mktemp("bank") / "store")
    summary = run_line(
        data=str(line), storage=store, cluster="threads", batch="b1", shard_size=3, **SMALL
    )
    return store, summary


def _as_folder(line, name, root):
    """A one-sample folder in MVTec 3D-AD layout holding the line's sample ``name``."""
    defect, stem = name.split("/")
    for kind, suffix in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png")):
        source = line / "part" / "test" / defect / kind / f"{stem}.{suffix}"
        target = root / "part" / "test" / defect / kind
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return root


def _assert_like_batch_run(result, summary, rows, name):
    (row,) = read_scores(result["outputs"]["scores"]).values()
    expected = rows[name]
    # Same pair distances (bit for bit) but the references in another order: CAE's rank
    # remapping breaks ties by position, which moves a few map values by ~0.1 % of the
    # map's range (the same tolerance as a batch laid out in other shards).
    reference = np.load(f"{summary['out']}/{expected['map_file']}")
    span = float(reference.max() - reference.min())
    np.testing.assert_allclose(
        np.load(f"{result['out']}/{row['map_file']}"), reference, atol=0.005 * span
    )
    assert float(row["score"]) == pytest.approx(float(expected["score"]), abs=1e-3)
    assert float(row["score_rescored"]) == pytest.approx(
        float(expected["score_rescored"]), abs=1e-3
    )
    return row


@pytest.mark.slow
def test_sample_against_rest_of_its_batch_equals_the_batch_run(
    batch, line, tmp_path, monkeypatch
):
    store, summary = batch
    rows = read_scores(summary["outputs"]["scores"])
    top = max(rows, key=lambda n: float(rows[n]["score_rescored"]))
    normal = next(n for n in sorted(rows) if n.startswith("good/") and n != top)
    counter = ForwardCounter(monkeypatch)
    for number, name in enumerate((top, normal), start=1):
        folder = _as_folder(line, name, tmp_path / f"new{number}")
        result = run_score_new(
            line="part", inputs=[str(folder)], data_format="mvtec3d", storage=store,
            out=str(tmp_path / f"out{number}"), clean_bank=False,
        )
        # the part's inputs are those of a bank sample: its features are found in the cache
        assert counter.counts == {"2d": 0, "3d": 0}
        assert result["scored"] == 1 and result["pool"] == 8 and result["bank"] == ["b1"]
        assert result["random_weights"]
        # the part's reduction is computed unless its references come in the batch run's order
        # (then the batch run's entry is the same computation, found by its key)
        assert result["counts"]["reduced"]["computed"] + result["counts"]["reduced"]["cached"] == 1
        # 3 shards (the part's block against the bank's 3 blocks), one entry per modality
        assert result["counts"]["pairs"]["computed"] + result["counts"]["pairs"]["cached"] == 6
        row = _assert_like_batch_run(result, summary, rows, name)
        assert row["name"] == name
    assert list_batches(store, "part") == ["b1"], "new parts are not recorded as a batch"


def _files(line, name):
    defect, stem = name.split("/")
    base = line / "part" / "test" / defect
    return str(base / "rgb" / f"{stem}.png"), str(base / "xyz" / f"{stem}.tiff")


@pytest.mark.slow
def test_part_files_without_masks_leave_their_masked_bank_copies_out(
    batch, line, tmp_path, monkeypatch
):
    # The bank's samples have masks (gt/*.png); parts given as files have none. The bank copy
    # of a part is left out all the same: its scored inputs equal the part's.
    store, summary = batch
    rows = read_scores(summary["outputs"]["scores"])
    assert all((line / "part" / "test" / n.split("/")[0] / "gt").is_dir() for n in rows)
    top = max(rows, key=lambda n: float(rows[n]["score_rescored"]))
    image, cloud = _files(line, top)
    counter = ForwardCounter(monkeypatch)
    result = run_score_new(
        line="part", inputs=[image], xyz=[cloud], storage=store, out=str(tmp_path / "one"),
        clean_bank=False,
    )
    assert counter.counts == {"2d": 0, "3d": 0}
    assert result["scored"] == 1 and result["pool"] == 8
    row = _assert_like_batch_run(result, summary, rows, top)
    defect, stem = top.split("/")
    assert row["name"].endswith(f"part/test/{defect}/rgb/{stem}"), "the folder is kept"
    # The reported case: a part and a copy of another bank sample, under another file name.
    normal = next(n for n in sorted(rows) if n.startswith("good/") and n != top)
    copy_image, copy_cloud = tmp_path / "copy.png", tmp_path / "copy.tiff"
    shutil.copy(_files(line, normal)[0], copy_image)
    shutil.copy(_files(line, normal)[1], copy_cloud)
    both = run_score_new(
        line="part", inputs=[image, str(copy_image)], xyz=[cloud, str(copy_cloud)],
        storage=store, out=str(tmp_path / "two"), clean_bank=False,
    )
    assert both["scored"] == 2 and both["pool"] == 8, "both bank copies are left out"
    assert counter.counts == {"2d": 0, "3d": 0}


def test_reductions_of_an_old_record_are_derived_again(batch):
    store, _ = batch
    record = read_batch_record(store, "part", "b1")
    recorded = bank_reductions(store, record)
    assert len(recorded) == 8
    old = record.model_copy(update={"samples": tuple(
        s.model_copy(update={"reduced": None}) for s in record.samples
    )})
    assert bank_reductions(store, old) == recorded


@pytest.mark.slow
def test_cli_scores_new_part_files_against_the_latest_batch(
    batch, tmp_path, capsys, monkeypatch
):
    store, _ = batch
    new = tmp_path / "new"
    generate_line(new, category="part", num_samples=2, image_size=64, defect_rate=0.5, seed=21)
    images = sorted((new / "part" / "test").glob("*/rgb/*.png"))
    clouds = [p.parent.parent / "xyz" / f"{p.stem}.tiff" for p in images]
    names = [f"{p.parent.parent.name}-{p.stem}" for p in images]
    for image, cloud, name in zip(images, clouds, names, strict=True):
        shutil.copy(image, tmp_path / f"{name}.png")
        shutil.copy(cloud, tmp_path / f"{name}.tiff")
    out = tmp_path / "out"
    counter = ForwardCounter(monkeypatch)
    monkeypatch.chdir(tmp_path)  # parts are named by their path below the current folder
    status = main(
        ["score-new", "part", *[str(tmp_path / f"{n}.png") for n in names], "--xyz",
         *[str(tmp_path / f"{n}.tiff") for n in names], "--storage", store, "--out", str(out),
         "--record-as", "extra-1", "--no-clean-bank", *CLI_SMALL]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert counter.counts == {"2d": 2, "3d": 2}, "only the new parts go through the backbones"
    assert "random backbone weights" in printed and "against bank b1" in printed
    rows = read_scores(out / "scores.csv")
    assert sorted(rows) == sorted(names)
    for row in rows.values():
        assert np.load(out / row["map_file"]).shape == (64, 64)
    for name in ("report.html", "run.json"):
        assert (out / name).exists()
    assert len(list((out / "overlays").glob("*.png"))) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["warning"] and run["bank"] == ["b1"] and run["pool"] == 10
    assert "reference bank" in (out / "report.html").read_text()
    record = read_batch_record(store, "part", "extra-1")
    assert record.scored_against_bank and len(record.samples) == 2


def test_part_files_are_named_by_their_path_as_given(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    records = part_records(
        ["l/good/rgb/000.png", "./l/crack/rgb/000.png", str(tmp_path / "l/crack/rgb/001.png"),
         "/elsewhere/rgb/002.png"],
        ["l/good/xyz/000.tiff", "l/crack/xyz/000.tiff", "l/crack/xyz/001.tiff", "/e/002.tiff"],
        "part",
    )
    assert [r.name for r in records] == [
        "l/good/rgb/000", "l/crack/rgb/000", "l/crack/rgb/001", "elsewhere/rgb/002"
    ]
    assert records[1].xyz_path == "l/crack/xyz/000.tiff" and records[0].category == "part"
    with pytest.raises(ValueError, match="one per image"):
        part_records(["/l/a.png", "/l/b.png"], ["/l/a.tiff"], "part")
