"""Batch records: a typed, versioned contract, validated whenever one is read."""

import json

import pytest

from tasks.records.batch_record import BatchRecord, read_batch_record, write_batch_record
from tests.records import hand_record


def _record():
    return hand_record(
        "part", "n1",
        [{"name": "a", "prepared": {"image": "k1", "points": None}, "block": 0, "label": 1,
          "defect_type": "crack", "reduced": "r1"},
         {"name": "b", "prepared": "old-single-key", "block": 1}],
        flagged=["a"], bank=["n0"], bank_left_out={"n0": {"x": "confirmed defect"}},
    )


def test_a_record_survives_the_json_round_trip(tmp_path):
    record = _record()
    assert BatchRecord.from_json(record.to_json(), "here") == record
    write_batch_record(str(tmp_path), record)
    again = read_batch_record(str(tmp_path), "part", "n1")
    assert again == record
    assert again.samples[1].prepared == "old-single-key" and again.samples[1].reduced is None
    written = json.loads((tmp_path / "lines" / "part" / "batches" / "n1.json").read_text())
    assert written["version"] == 1 and written["samples"][0]["name"] == "a"


def _write(tmp_path, payload) -> None:
    folder = tmp_path / "lines" / "part" / "batches"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "n1.json").write_text(json.dumps(payload))


def test_another_version_is_refused_naming_the_file(tmp_path):
    payload = json.loads(_record().to_json()) | {"version": 2}
    _write(tmp_path, payload)
    with pytest.raises(ValueError, match=r"n1\.json has version 2; this musc reads version 1"):
        read_batch_record(str(tmp_path), "part", "n1")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"some": "other file"}, r"n1\.json is not a batch record"),
        ([1, 2, 3], r"n1\.json is not a batch record"),
        ({"version": 1, "line": "part"}, r"n1\.json is not a valid batch record: batch"),
    ],
)
def test_a_foreign_or_incomplete_file_is_refused_naming_it(tmp_path, payload, problem):
    _write(tmp_path, payload)
    with pytest.raises(ValueError, match=problem):
        read_batch_record(str(tmp_path), "part", "n1")


def test_a_wrong_field_type_is_refused_on_read(tmp_path):
    payload = json.loads(_record().to_json())
    payload["samples"][0]["block"] = "first"
    _write(tmp_path, payload)
    with pytest.raises(ValueError, match=r"not a valid batch record: samples\.0\.block"):
        read_batch_record(str(tmp_path), "part", "n1")


def test_a_record_from_before_the_reference_choice_was_planned_on_the_cycle():
    from musc_core.config import MuscConfig

    old = _record()  # its config names no reference choice and no Point-MAE dtype
    assert "reference_choice" not in old.config and "point_dtype" not in old.config
    assert old.musc_config().reference_choice == "cycle"
    assert old.musc_config().point_dtype == "float32"
    new = old.model_copy(update={"config": MuscConfig().as_dict()})
    assert new.musc_config() == MuscConfig() and new.musc_config().reference_choice == "similar"
