"""Links of the Prefect artifacts open the files they name, whatever the names hold."""

from urllib.parse import urlparse
from urllib.request import url2pathname

from tasks.reporting.artifacts import link_url


def test_local_paths_become_encoded_file_urls_that_lead_back_to_the_path():
    path = "/runs/line a/ünïcødé 名前/report#1?.html"
    url = link_url(path)
    assert url == "file:///runs/line%20a/%C3%BCn%C3%AFc%C3%B8d%C3%A9%20%E5%90%8D%E5%89%8D/report%231%3F.html"
    parsed = urlparse(url)
    assert parsed.scheme == "file" and url2pathname(parsed.path) == path


def test_urls_stay_as_they_are():
    assert link_url("s3://bucket/results/part/report.html") == "s3://bucket/results/part/report.html"
    assert link_url("https://minio.local/b/r.html") == "https://minio.local/b/r.html"
