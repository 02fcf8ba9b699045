"""Operators' verdicts and the clean bank they decide (records written by hand)."""

from datetime import datetime, timezone

import pytest

from tasks.records.batch_record import write_batch_record
from tasks.records.verdicts import (
    clean_records,
    latest_verdicts,
    left_out_of_bank,
    read_verdicts,
    record_verdict,
    without_left_out,
)
from tests.records import hand_record


def _record(batch, names, flagged=(), prepared=None):
    keys = {n: f"key-{batch}-{n}" for n in names} | (prepared or {})
    return hand_record(
        "part", batch,
        [{"name": n, "prepared": keys[n], "block": 0, "label": None} for n in names],
        flagged=list(flagged),
    )


@pytest.fixture
def storage(tmp_path):
    root = str(tmp_path / "store")
    write_batch_record(root, _record("n1", ["a", "b", "c"], flagged=["b"]))
    write_batch_record(root, _record("n2", ["a", "d"], flagged=["d"]))
    return root


def test_a_verdict_goes_to_the_latest_batch_with_that_sample(storage):
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    stored = record_verdict(storage, "part", "a", "ok", note="checked <by hand>", now=when)
    assert stored["batch"] == "n2" and stored["prepared"] == "key-n2-a"
    assert stored["recorded"] == "2026-01-02T03:04:05+00:00" and not stored["flagged"]
    older = record_verdict(storage, "part", "b", "ok", batch="n1")
    assert older["batch"] == "n1" and older["flagged"]
    assert [v["sample"] for v in read_verdicts(storage, "part")] == ["a", "b"]
    assert read_verdicts(storage, "part")[0]["note"] == "checked <by hand>"


def test_the_last_verdict_on_a_sample_wins(storage):
    record_verdict(storage, "part", "b", "defect", batch="n1")
    record_verdict(storage, "part", "b", "ok", batch="n1")
    verdicts = read_verdicts(storage, "part")
    assert len(verdicts) == 2
    assert latest_verdicts(verdicts)[("n1", "b")]["verdict"] == "ok"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("part", "zz", "ok"), "no scored sample named 'zz'"),
        (("part", "a", "maybe"), "verdict must be one of"),
        (("part", "c", "ok", "x" * 501), "at most 500"),
    ],
)
def test_bad_verdicts_are_refused_with_the_reason(storage, args, message):
    with pytest.raises(ValueError, match=message):
        record_verdict(storage, *args)
    assert read_verdicts(storage, "part") == []


def test_no_batch_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recorded batch"):
        record_verdict(str(tmp_path), "part", "a", "ok")


def test_flagged_samples_stay_out_unless_cleared_and_defects_never_enter():
    n1 = _record("n1", ["a", "b", "c"], flagged=["b"])
    assert left_out_of_bank(n1, []) == {"b": "flagged, not cleared"}
    cleared = [{"batch": "n1", "sample": "b", "prepared": "key-n1-b", "verdict": "ok"}]
    assert left_out_of_bank(n1, cleared) == {}
    confirmed = [{"batch": "n1", "sample": "c", "prepared": "key-n1-c", "verdict": "defect"}]
    assert left_out_of_bank(n1, confirmed) == {
        "b": "flagged, not cleared",
        "c": "confirmed defect",
    }


def test_a_confirmed_defect_is_left_out_wherever_its_content_appears():
    n2 = _record("n2", ["a", "d"], prepared={"a": "same-content"})
    verdicts = [{"batch": "n1", "sample": "x", "prepared": "same-content", "verdict": "defect"}]
    assert left_out_of_bank(n2, verdicts) == {"a": "confirmed defect"}


def test_clean_records_drop_only_the_left_out_samples():
    records = [_record("n2", ["a", "d"], flagged=["d"]), _record("n1", ["a", "b"])]
    cleaned, left = clean_records(records, [])
    assert [s.name for s in cleaned[0].samples] == ["a"]
    assert [s.name for s in cleaned[1].samples] == ["a", "b"]
    assert left == {"n2": {"d": "flagged, not cleared"}}
    assert [s.name for s in records[0].samples] == ["a", "d"]  # inputs untouched


def test_without_left_out_drops_what_a_run_recorded():
    records = [_record("n2", ["a", "d"]), _record("n1", ["a", "b"])]
    kept = without_left_out(records, {"n1": {"b": "flagged, not cleared"}})
    assert [[s.name for s in r.samples] for r in kept] == [["a", "d"], ["a"]]


def test_the_verdict_command_stores_and_explains(storage, capsys):
    from flows.cli import main

    assert main(["verdict", "part", "b", "ok", "--batch", "n1", "--storage", storage]) == 0
    assert "verdict ok on 'b' of batch n1 (flagged in its night)" in capsys.readouterr().out
    assert main(["verdict", "part", "zz", "defect", "--storage", storage]) == 2
    error = capsys.readouterr().err
    assert "no scored sample named 'zz'" in error and "--batch" in error
    assert len(read_verdicts(storage, "part")) == 1
