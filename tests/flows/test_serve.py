"""The inspection station (``musc serve``): same results as score-new, and bad requests refused.

The station and the ``score_new`` flow score the same part against the same bank, each on its
own copy of the storage (so neither finds the other's entries). They run the same task
functions on the same features, keys and plan, in the same process, so the written maps are
equal bit for bit and the scores, RsCon scores, flags and thresholds exactly equal.
"""

import asyncio
import csv
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from flows.cli import build_parser, command_settings, main
from flows.serve import InspectionStation
from flows.serve_app import create_app
from flows.settings import SERVE, BankChoice, NewPartsChanges, Station, StationRun
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import SIZE, SMALL, run_line, run_score_new

pytestmark = pytest.mark.usefixtures("prefect_server")
LIMIT = 4 << 20


@pytest.fixture(scope="module")
def bank(line, tmp_path_factory, prefect_server):
    """The 8-sample line scored as batch b1 in blocks of 3: its storage root."""
    store = tmp_path_factory.mktemp("serve-bank") / "store"
    run_line(data=str(line), storage=str(store), cluster="threads", batch="b1", shard_size=3,
             **SMALL)
    return store


@pytest.fixture(scope="module")
def station(bank, tmp_path_factory):
    """A station on its own copy of the bank's storage (naive bank: every sample)."""
    copy = tmp_path_factory.mktemp("serve-copy") / "store"
    shutil.copytree(bank, copy)
    started = InspectionStation(
        Station(line="part"), BankChoice(clean_bank=False), NewPartsChanges(),
        StationRun(storage=str(copy), out=str(copy / "served"), device="cpu"),
    )
    yield started
    started.close()


@pytest.fixture(scope="module")
def client(station):
    return TestClient(create_app(station, LIMIT))


@pytest.fixture(scope="module")
def other_line(tmp_path_factory):
    """Parts that are not in the bank (another seed)."""
    root = tmp_path_factory.mktemp("other")
    generate_line(root, category="part", num_samples=4, image_size=SIZE, defect_rate=0.5, seed=11)
    return root


def _files(root, name):
    defect, stem = name.split("/")
    base = root / "part" / "test" / defect
    return base / "rgb" / f"{stem}.png", base / "xyz" / f"{stem}.tiff"


def _sample_names(root):
    return sorted(
        f"{p.parent.parent.name}/{p.stem}" for p in (root / "part" / "test").glob("*/rgb/*.png")
    )


def _post(client, image, xyz, name=None):
    files = {"image": (image.name, image.read_bytes(), "image/png"),
             "xyz": (xyz.name, xyz.read_bytes(), "image/tiff")}
    return client.post("/score", files=files, data={} if name is None else {"name": name})


def _row(path):
    with open(path, encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    return row


def _assert_equal_to_score_new(answer, flow):
    served = _row(answer["outputs"]["scores"])
    expected = _row(flow["outputs"]["scores"])
    for column in ("score", "score_rescored", "flagged", "random_weights"):
        assert served[column] == expected[column], column
    served_map = np.load(f"{answer['out']}/{served['map_file']}")
    flow_map = np.load(f"{flow['out']}/{expected['map_file']}")
    assert served_map.dtype == np.float32 and served_map.shape == (SIZE, SIZE)
    assert np.array_equal(served_map, flow_map)
    assert answer["score"] == float(flow_map.max())
    assert answer["flagged"] == bool(int(expected["flagged"]))
    assert answer["flag_threshold"] == flow["flag_threshold"]
    assert answer["pixel_threshold"] == flow["pixel_threshold"]
    assert answer["pool"] == flow["pool"] and answer["bank"] == flow["bank"] == ["b1"]
    assert f"{float(answer['score_rescored']):.6g}" == expected["score_rescored"]


@pytest.mark.slow
def test_a_new_part_gets_score_new_s_results(client, bank, other_line, tmp_path):
    for name in _sample_names(other_line)[:2]:
        image, xyz = _files(other_line, name)
        response = _post(client, image, xyz, name="day/" + name)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["name"] == "day/" + name and answer["random_weights"]
        assert answer["warning"] and answer["pool"] == 9
        flow = run_score_new(
            line="part", inputs=[str(image)], xyz=[str(xyz)], storage=str(bank),
            out=str(tmp_path / name.replace("/", "-")), clean_bank=False, device="cpu",
        )
        _assert_equal_to_score_new(answer, flow)
        for kind in ("report", "run", "overlays", "maps"):
            assert answer["outputs"][kind].startswith(answer["out"])
        assert _row(answer["outputs"]["scores"])["name"] == "day/" + name


@pytest.mark.slow
def test_a_copy_of_a_bank_sample_is_scored_without_it_like_score_new(
    client, bank, line, tmp_path
):
    # the part equals a bank sample: that sample leaves the bank (its block is scored short)
    name = _sample_names(line)[0]
    image, xyz = _files(line, name)
    response = _post(client, image, xyz)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["pool"] == 8 and answer["name"] == xyz.stem
    flow = run_score_new(
        line="part", inputs=[str(image)], xyz=[str(xyz)], storage=str(bank),
        out=str(tmp_path / "copy"), clean_bank=False, device="cpu",
    )
    _assert_equal_to_score_new(answer, flow)


def test_health_names_the_line_and_its_bank(client):
    facts = client.get("/health").json()
    assert facts["status"] == "ok" and facts["line"] == "part" and facts["bank"] == ["b1"]
    assert facts["bank_samples"] == 8 and facts["modality"] == "2d+3d"
    assert facts["random_weights"] and facts["bank_memory_mb"] > 0


def _detail(response, status):
    assert response.status_code == status, response.text
    return response.json()["detail"]


def test_bad_requests_get_a_4xx_naming_the_problem(client, other_line):
    image, xyz = _files(other_line, _sample_names(other_line)[0])
    png, tiff = image.read_bytes(), xyz.read_bytes()
    assert "multipart/form-data" in _detail(client.post("/score", json={"image": "x"}), 415)
    missing = client.post("/score", files={"image": ("a.png", png, "image/png")})
    assert "field xyz is missing" in _detail(missing, 422)
    kind = client.post("/score", files={"image": ("a.txt", png), "xyz": ("a.tiff", tiff)})
    assert ".png" in _detail(kind, 415)
    unknown = client.post("/score", files={"image": ("a.png", png), "xyz": ("a.tiff", tiff)},
                          data={"mask": "m.png"})
    assert "unknown field(s) ['mask']" in _detail(unknown, 400)
    many = client.post("/score", files={"image": ("a.png", png), "xyz": ("a.tiff", tiff),
                                        "mask": ("m.png", png)})
    assert "Too many files" in _detail(many, 400)
    empty = client.post("/score", files={"image": ("a.png", b""), "xyz": ("a.tiff", tiff)})
    assert "empty" in _detail(empty, 400)
    text = client.post("/score", files={"xyz": ("a.tiff", tiff)}, data={"image": "a.png"})
    assert "must be a file" in _detail(text, 400)
    named = client.post("/score", files={"image": ("a.png", png), "xyz": ("a.tiff", tiff)},
                        data={"name": "../etc"})
    assert "name" in _detail(named, 400)
    broken = client.post("/score", files={"image": ("a.png", b"not a png"),
                                          "xyz": ("a.tiff", tiff)})
    detail = _detail(broken, 422)
    assert "uploaded image" in detail and "musc-upload" not in detail
    assert client.get("/health").json()["status"] == "ok"


def test_a_request_over_the_limit_gets_413_while_it_is_read(station, other_line):
    image, xyz = _files(other_line, _sample_names(other_line)[0])
    small = TestClient(create_app(station, 1000))
    declared = small.post("/score", files={"image": ("a.png", image.read_bytes()),
                                           "xyz": ("a.tiff", xyz.read_bytes())})
    assert "1000" not in _detail(declared, 413) and "--max-request-mb" in declared.text
    assert small.get("/health").status_code == 200


def test_the_size_limit_stops_reading_a_body_without_content_length(station):
    # A chunked body of 200 × 100 bytes against a 1000-byte limit: the app stops reading after
    # the chunk that passes the limit and answers 413; the rest is never received.
    app = create_app(station, 1000)
    read: list[int] = []
    sent: list[dict] = []

    head = b'--zzz\r\ncontent-disposition: form-data; name="image"; filename="a.png"\r\n\r\n'

    async def receive():
        read.append(1)
        body = (head + b"x" * 100)[:100] if len(read) == 1 else b"x" * 100
        return {"type": "http.request", "body": body, "more_body": len(read) < 200}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/score", "raw_path": b"/score", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"multipart/form-data; boundary=zzz"),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert len(read) == 11
    assert b"--max-request-mb" in b"".join(m.get("body", b"") for m in sent[1:])


def test_serve_options_are_the_station_s_settings_bound_to_this_machine():
    args = build_parser(env={}).parse_args(["serve", "part", "--storage", "s", "--port", "0"])
    settings = command_settings(args)
    assert set(settings) == set(SERVE)
    assert settings["station"].host == "127.0.0.1" and settings["station"].port == 0
    assert settings["run"].storage == "s" and settings["bank"].clean_bank
    serve = next(a for a in build_parser(env={})._actions if a.dest == "command").choices["serve"]
    options = {a.dest for a in serve._actions}
    assert {f for model in SERVE.values() for f in model.model_fields} <= options


def test_serve_of_a_line_without_batches_is_one_error_line(tmp_path, capsys):
    status = main(["serve", "nowhere", "--storage", str(tmp_path / "store"), "--port", "0"])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"musc: error: line 'nowhere' has no recorded batch in {tmp_path / 'store'}"]
