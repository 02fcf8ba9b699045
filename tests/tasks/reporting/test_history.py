"""The line's history page over a 7-night synthetic history, in HTML and in headless Chromium."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from musc_core.decisions import score_drift
from tasks.records.batch_record import write_batch_record
from tasks.records.result_store import ResultStore
from tasks.records.verdicts import record_verdict
from tasks.reporting.history_page import history_link, line_nights, render_history, write_history
from tests.records import hand_record

REPO = Path(__file__).resolve().parents[2]

EVIL = "<script>alert(1)</script>"


def _write_night(storage, night, scores, bank, flagged):
    batch = f"2025010{night}T020000Z"
    out = f"{storage}/results/part/{batch}"
    names = [f"good/{i:03d}" for i in range(len(scores) - 1)] + [EVIL]
    store = ResultStore(out)
    rows = "rank,name,score,score_rescored,flagged,label,defect_type,map_file\n" + "".join(
        f"{i},{n},{s},0.5,{int(n in flagged)},,,maps/x.npy\n"
        for i, (n, s) in enumerate(zip(names, scores, strict=True), 1)
    )
    store.write_text("scores.csv", rows.replace(EVIL, '"' + EVIL + '"'))
    store.write_json(
        "run.json",
        {"flag_threshold": 0.8, "flagged": flagged, "outputs": {"report": f"{out}/report.html"}},
    )
    write_batch_record(
        storage,
        hand_record(
            "part", batch, [{"name": n, "prepared": f"{batch}-{n}", "block": 0} for n in names],
            out=out, bank=bank, flagged=flagged,
            set_aside=[{"name": "bad", "path": "x", "problem": "empty"}] if night == 3 else [],
        ),
    )
    return batch, np.array(scores)


@pytest.fixture
def week(tmp_path):
    """7 nights of 10 parts; night 7's scores jump (a new camera, say)."""
    storage = str(tmp_path / "store")
    rng = np.random.default_rng(0)
    batches, scores = [], []
    for night in range(1, 8):
        centre = 1.5 if night == 7 else 1.0
        values = list(np.round(rng.normal(centre, 0.05, size=10), 4))
        bank = batches[-1:]
        batch, array = _write_night(storage, night, values, bank, [EVIL] if night == 2 else [])
        batches.append(batch)
        scores.append(array)
    record_verdict(storage, "part", EVIL, "ok", batch=batches[1], note="fine")
    return storage, batches, scores


def test_seven_nights_with_counts_quantiles_verdicts_and_drift(week):
    storage, batches, scores = week
    nights = line_nights(storage, "part")
    assert [n.batch for n in nights] == batches
    assert [n.scored for n in nights] == [10] * 7
    assert [n.set_aside for n in nights] == [0, 0, 1, 0, 0, 0, 0]
    assert [n.flagged for n in nights] == [0, 1, 0, 0, 0, 0, 0]
    assert nights[1].verdicts == {EVIL: "ok"}
    np.testing.assert_allclose(nights[4].quantiles[2], np.median(scores[4]))
    assert nights[0].drift is None  # no bank on the first night
    for i in range(1, 7):
        assert nights[i].drift == pytest.approx(score_drift(scores[i], scores[i - 1]).shift)
    assert all(abs(n.drift) < 3 for n in nights[1:6]) and nights[6].drift > 3


def test_page_marks_the_drifting_night_and_escapes_names(week):
    storage, batches, _ = week
    page = render_history("part", line_nights(storage, "part"))
    rows = re.findall(r"<tr(?: class=drift)?><td>\d", page)
    assert len(rows) == 7
    assert page.count("<tr class=drift>") == 1 and "⚠ drift" in page
    assert batches[6] in page.split('role="alert"')[1].split("</p>")[0]
    assert EVIL not in page and "&lt;script&gt;" in page
    assert page.count("<svg") == 2 and "<script" not in page
    assert page.count(f'{batches[3]}/report.html"') == 1


def test_write_history_puts_the_page_next_to_the_results(week):
    storage, _, _ = week
    location = write_history(storage, "part")
    assert location.endswith("results/part/history.html")
    assert ResultStore(storage).read_bytes("results/part/history.html").startswith(b"<!DOCTYPE")


def test_a_batch_recorded_while_the_page_is_written_is_on_the_last_page(week, monkeypatch):
    """Another run of the line records its batch while this run renders the page: the page
    this run leaves lists that batch too."""
    from tasks.reporting import history_page

    storage, batches, _ = week
    render = history_page.render_history
    late: list[str] = []

    def render_then_another_run_records(line, nights):
        page = render(line, nights)
        if not late:
            late.append(_write_night(storage, 8, [1.0] * 4, [], [])[0])
        return page

    monkeypatch.setattr(history_page, "render_history", render_then_another_run_records)
    write_history(storage, "part")
    page = ResultStore(storage).read_bytes("results/part/history.html").decode("utf-8")
    assert late and all(f"<td>{batch}</td>" in page for batch in [*batches, *late])


@pytest.mark.slow
def test_history_renders_in_headless_chromium(week, tmp_path):
    pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
    from infra.browser import chromium_paths, full_page_png, start_chromium

    browser, driver_path = chromium_paths()
    if not (browser and driver_path):
        pytest.skip("Debian chromium/chromium-driver are not installed: run `make test-deps`")
    storage, _, _ = week
    page = tmp_path / "history.html"
    page.write_text(render_history("part", line_nights(storage, "part")), encoding="utf-8")
    driver = start_chromium(browser, driver_path, tmp_path / "profile", 900, console_log=True)
    try:
        driver.get(page.as_uri())
        counts = driver.execute_script(
            "return [document.querySelectorAll('#nights tbody tr').length,"
            " document.querySelectorAll('tr.drift').length,"
            " document.querySelectorAll('svg polyline.series').length,"
            " document.scripts.length,"
            " getComputedStyle(document.querySelector('tr.drift')).backgroundColor];"
        )
        assert counts == [7, 1, 5, 0, "rgb(255, 243, 191)"]
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert severe == []
        png = full_page_png(driver)
    finally:
        driver.quit()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MUSC_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs" / "history-screenshot.png").write_bytes(png)


def test_links_between_reports_and_history_are_relative_next_to_the_results(tmp_path):
    store = str(tmp_path / "store")
    page = f"{store}/results/line-a/history.html"
    assert history_link(store, "line-a", f"{store}/results/line-a/n1") == "../history.html"
    assert history_link(store, "line-a", str(tmp_path / "elsewhere" / "n1")) == page
    assert history_link(store, "line-a", f"{store}/results/line-b/n1") == page
    bucket = "s3://quality/musc"
    assert history_link(bucket, "line-a", f"{bucket}/results/line-a/n1") == "../history.html"
    assert history_link(bucket, "line-a", "s3://other/results/line-a/n1") == (
        f"{bucket}/results/line-a/history.html"
    )
