"""Batch records: a typed, versioned contract, validated whenever one is read; ids that sort
by time and never collide; records created once, never replaced."""

import errno
import json
import multiprocessing
import os
from datetime import datetime, timedelta, timezone

import pytest

from infra.storage import StorageFull
from tasks.records.batch_record import (
    BatchExists,
    BatchRecord,
    check_batch_id,
    list_batches,
    new_batch_id,
    read_batch_record,
    select_bank,
    write_batch_record,
)
from tasks.records.result_store import ResultStore
from tasks.reporting.history_page import line_nights
from tests.records import hand_record, record_at_once


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


# --------------------------------------------------------------------------- batch ids
INSTANT = datetime(2026, 12, 7, 15, 56, 7, 482913, tzinfo=timezone.utc)


def _second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def test_new_ids_sort_by_time_and_after_the_older_ids_of_whole_seconds():
    times = [INSTANT - timedelta(seconds=1), INSTANT, INSTANT + timedelta(milliseconds=1),
             INSTANT + timedelta(seconds=1), INSTANT + timedelta(days=40)]
    new = [new_batch_id(t) for t in times]
    old = [t.strftime("%Y%m%dT%H%M%SZ") for t in times]  # the ids musc gave before
    assert new[1].startswith("20261207T155607Z-482-") and len(new[1]) == len(new[0])
    assert all(check_batch_id(n) == n for n in new)
    assert sorted(new) == new
    for i, older in enumerate(old):
        for j, newer in enumerate(new):
            assert (newer < older) == (_second(times[j]) < _second(times[i])), (older, newer)


def test_ids_made_in_one_instant_differ_and_naive_times_are_utc():
    assert len({new_batch_id(INSTANT) for _ in range(1000)}) == 1000
    naive = INSTANT.replace(tzinfo=None)
    shifted = INSTANT.astimezone(timezone(timedelta(hours=2)))
    assert new_batch_id(naive)[:20] == new_batch_id(shifted)[:20] == new_batch_id(INSTANT)[:20]


def _night(batch: str, writer: str = "first", **fields) -> BatchRecord:
    return hand_record("part", batch, [{"name": "a", "prepared": "k", "block": 0}],
                       data=writer, **fields)


def test_old_and_new_ids_are_listed_and_banked_in_time_order(tmp_path):
    store = str(tmp_path)
    moments = [INSTANT + timedelta(seconds=s) for s in (0, 1, 1.002, 3)]
    ids = [moments[0].strftime("%Y%m%dT%H%M%SZ"), new_batch_id(moments[1]),
           new_batch_id(moments[2]), moments[3].strftime("%Y%m%dT%H%M%SZ")]
    for batch in (ids[2], ids[0], ids[3], ids[1]):
        write_batch_record(store, _night(batch))
    assert list_batches(store, "part") == ids
    bank = select_bank(store, "part", new_batch_id(moments[2] + timedelta(milliseconds=1)),
                       nights=5, max_samples=None, compatible={})
    assert [r.batch for r in bank] == [ids[2], ids[1], ids[0]]


# --------------------------------------------------------------------------- created once
def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if not n.endswith(".json")]


def test_a_record_is_never_replaced_on_disk(tmp_path):
    store = str(tmp_path)
    where = write_batch_record(store, _night("n1", "first"))
    with pytest.raises(BatchExists, match=r"line 'part' has a batch 'n1' already .*n1\.json"):
        write_batch_record(store, _night("n1", "retried"))
    assert read_batch_record(store, "part", "n1").data == "first"
    assert where == str(tmp_path / "lines" / "part" / "batches" / "n1.json")
    assert _leftovers(tmp_path / "lines" / "part" / "batches") == []


def test_without_hard_links_the_record_is_still_created_once(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "hard links not supported here", target)

    monkeypatch.setattr(os, "link", no_links)
    store = str(tmp_path)
    write_batch_record(store, _night("n1", "first"))
    with pytest.raises(BatchExists):
        write_batch_record(store, _night("n1", "retried"))
    assert read_batch_record(store, "part", "n1").data == "first"
    assert _leftovers(tmp_path / "lines" / "part" / "batches") == []


def test_a_retry_that_finds_its_own_record_succeeds_and_another_is_refused(tmp_path):
    store = ResultStore(str(tmp_path))
    calls = []
    create = store.fs.pipe_file

    def lost_answer(path, data, **options):
        calls.append(path)
        create(path, data, **options)
        if len(calls) == 1:  # written, but the answer is lost: the call is retried
            raise TimeoutError("the answer was lost")

    store.protocol = "s3"  # the object-store path: pipe_file with mode="create"
    store.fs.pipe_file = lost_answer
    assert store.create_bytes("r.json", b"mine").endswith("r.json")
    assert (tmp_path / "r.json").read_bytes() == b"mine"
    with pytest.raises(FileExistsError):
        store.create_bytes("r.json", b"another")
    assert (tmp_path / "r.json").read_bytes() == b"mine"


@pytest.mark.s3
def test_a_record_is_never_replaced_on_s3(s3_env):
    store = f"{s3_env}/store"
    write_batch_record(store, _night("n1", "first"))
    with pytest.raises(BatchExists, match=r"'n1' already \(s3://.*/n1\.json\)"):
        write_batch_record(store, _night("n1", "retried"))
    assert read_batch_record(store, "part", "n1").data == "first"


def _store_refusing_conditions(monkeypatch, how: str) -> list[str]:
    """Make S3 puts behave as on a store without ``If-None-Match``; returns the modes seen."""
    import s3fs
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    put = s3fs.S3FileSystem._pipe_file
    modes: list[str] = []

    async def pipe_file(self, path, data, mode="overwrite", **options):
        modes.append(mode)
        if mode == "create" and how == "refuses":
            error = ClientError({"Error": {"Code": "NotImplemented", "Message": "no"},
                                 "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
            raise translate_boto_error(error)
        return await put(self, path, data, mode="overwrite", **options)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", pipe_file)
    return modes


@pytest.mark.s3
@pytest.mark.parametrize("how", ["refuses", "ignores"])
def test_a_store_without_conditional_puts_is_looked_up_before_the_put(
    s3_env, monkeypatch, how
):
    modes = _store_refusing_conditions(monkeypatch, how)
    store = f"{s3_env}/store-{how}"
    write_batch_record(store, _night("n1", "first"))
    assert modes == (["create", "overwrite"] if how == "refuses" else ["create"])
    with pytest.raises(BatchExists):
        write_batch_record(store, _night("n1", "retried"))
    assert read_batch_record(store, "part", "n1").data == "first"


# --------------------------------------------------------------------------- two processes
def _at_once(storage: str, batches: list[str | None], out: str) -> list[tuple]:
    """Writers in processes of their own, released together; their outcomes by writer."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(batches))
    outcomes = context.Queue()
    writers = [
        context.Process(target=record_at_once, args=(barrier, outcomes, storage, b, i, out))
        for i, b in enumerate(batches)
    ]
    for writer in writers:
        writer.start()
    try:
        found = sorted(outcomes.get(timeout=180) for _ in writers)
    finally:
        for writer in writers:
            writer.join(timeout=30)
            writer.kill()
    return found


def _kind(storage: str) -> str:
    return "S3" if storage.startswith("s3://") else "local disk"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_env')}/store"


@pytest.mark.chaos
def test_two_processes_at_once_leave_two_records_both_in_the_history(
    storage, tmp_path, chaos_record
):
    outcomes = _at_once(storage, [None, None], str(tmp_path / "results"))
    assert [o[2] for o in outcomes] == ["created", "created"], outcomes
    ids = sorted(o[1] for o in outcomes)
    assert ids[0] != ids[1]
    assert list_batches(storage, "part") == ids
    assert [n.batch for n in line_nights(storage, "part")] == ids
    assert {read_batch_record(storage, "part", b).data for b in ids} == {"writer 0", "writer 1"}
    chaos_record(kind="fault", what=f"two processes record a batch at once, default ids "
                 f"({_kind(storage)})", outcome="2 writers: two records", injected=1, runs=0,
                 completed=0, samples=0, lost=0)


@pytest.mark.chaos
def test_two_processes_at_once_with_one_id_leave_one_complete_record(
    storage, tmp_path, chaos_record
):
    outcomes = _at_once(storage, ["n1", "n1"], str(tmp_path / "results"))
    assert sorted(o[2] for o in outcomes) == ["created", "refused"], outcomes
    (winner,) = [o[0] for o in outcomes if o[2] == "created"]
    (refusal,) = [o[3] for o in outcomes if o[2] == "refused"]
    assert "line 'part' has a batch 'n1' already" in refusal and "never replaced" in refusal
    assert list_batches(storage, "part") == ["n1"]
    assert read_batch_record(storage, "part", "n1").data == f"writer {winner}"
    chaos_record(kind="fault", what=f"two processes record one batch id at once "
                 f"({_kind(storage)})", outcome="2 writers: one record, the other refused",
                 injected=1, runs=0, completed=0, samples=0, lost=0)


def test_no_space_left_keeps_the_old_file_creates_nothing_and_names_the_output(
    tmp_path, monkeypatch
):
    out = tmp_path / "out"
    store = ResultStore(str(out))
    store.write_bytes("scores.csv", b"the old rows")
    write = store.fs.pipe_file

    def write_until_full(path, data, **options):
        write(path, data[:3], **options)  # the disk fills up part-way through the file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.fs, "pipe_file", write_until_full)
    with pytest.raises(StorageFull) as raised:
        store.write_bytes("scores.csv", b"the new rows")
    assert (raised.value.location, raised.value.what) == (str(out), "scores.csv")
    assert (out / "scores.csv").read_bytes() == b"the old rows"

    def no_room_at_flush(descriptor):  # where a filesystem that allocates late says so
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_room_at_flush)
    with pytest.raises(StorageFull):
        store.create_bytes("n1.json", b"a record")
    assert sorted(os.listdir(out)) == ["scores.csv"]  # no record, no temporary file
