"""A line's data in a bucket (moto S3 on 127.0.0.1): it scores to the same results as the same
line on disk, score-new takes object URLs, and a missing bucket is refused up front."""


import numpy as np
import pytest

from flows.cli import main
from infra.storage import open_filesystem
from tests.flows.conftest import SMALL, read_scores, run_line, run_score_new, upload_tree
from tests.flows.test_cli_checks import TINY

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _maps(summary):
    rows = read_scores(summary["outputs"]["scores"])
    return rows, {n: np.load(f"{summary['out']}/{r['map_file']}") for n, r in rows.items()}


def test_a_line_in_a_bucket_scores_like_the_line_on_disk(line, s3_env, tmp_path):
    url = upload_tree(line, f"{s3_env}/data")
    on_disk = run_line(data=str(line), storage=str(tmp_path / "disk"), cluster="threads",
                       batch="n1", **SMALL)
    in_bucket = run_line(data=url, storage=str(tmp_path / "bucket"), cluster="threads",
                         batch="n1", **SMALL)
    assert in_bucket["scored"] == on_disk["scored"] == 8 and not in_bucket["set_aside"]
    rows_disk, maps_disk = _maps(on_disk)
    rows_url, maps_url = _maps(in_bucket)
    assert rows_url == rows_disk
    for name, expected in maps_disk.items():
        np.testing.assert_array_equal(maps_url[name], expected)

    # score-new takes objects' URLs: the same part from the bucket scores as from disk
    defect, stem = sorted(rows_disk)[0].split("/")
    relative = [f"part/test/{defect}/rgb/{stem}.png", f"part/test/{defect}/xyz/{stem}.tiff"]
    store = str(tmp_path / "disk")
    local = run_score_new(line="part", inputs=[str(line / relative[0])],
                          xyz=[str(line / relative[1])], storage=store, out=str(tmp_path / "l"))
    remote = run_score_new(line="part", inputs=[f"{url}/{relative[0]}"],
                           xyz=[f"{url}/{relative[1]}"], storage=store, out=str(tmp_path / "r"))
    ((_, row_local),), ((name, row_remote),) = (
        read_scores(local["outputs"]["scores"]).items(),
        read_scores(remote["outputs"]["scores"]).items(),
    )
    assert name == f"{url.removeprefix('s3://')}/part/test/{defect}/rgb/{stem}"
    assert remote["pool"] == local["pool"]
    for field in ("score", "score_rescored", "flagged"):
        assert row_remote[field] == row_local[field]
    np.testing.assert_array_equal(
        np.load(f"{remote['out']}/{row_remote['map_file']}"),
        np.load(f"{local['out']}/{row_local['map_file']}"),
    )
    # a folder of new parts given as a prefix (one sample in MVTec 3D-AD layout)
    fs, base = open_filesystem(s3_env)
    for kind, suffix in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png")):
        key = f"part/test/{defect}/{kind}/{stem}.{suffix}"
        fs.pipe_file(f"{base}/one/{key}", (line / key).read_bytes())
    folder = run_score_new(line="part", inputs=[f"{s3_env}/one"], data_format="mvtec3d",
                           storage=store, out=str(tmp_path / "f"))
    ((name, row_folder),) = read_scores(folder["outputs"]["scores"]).items()
    assert name == f"{defect}/{stem}" and folder["pool"] == local["pool"]
    for field in ("score", "score_rescored", "flagged"):
        assert row_folder[field] == row_local[field]


def test_a_missing_bucket_as_data_is_refused_naming_data(s3_env, tmp_path, capsys):
    status = main(["score", "s3://no-such-bucket-here/line", "--out", str(tmp_path / "out"),
                   "--storage", str(tmp_path / "store"), *TINY])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("musc: error")]
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("musc: error: argument data: no objects below"), lines
    assert "Traceback" not in err
