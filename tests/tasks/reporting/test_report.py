"""The HTML run report: escaping, sections, ranking, thumbnails, and a real headless Chromium."""

import base64
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from infra.browser import chromium_paths, full_page_png, start_chromium
from musc_core.decisions import flag_outliers, pixel_threshold, predicted_masks
from musc_core.metrics import f1_optimal_threshold, image_metrics
from tasks.reporting.colormap import inferno
from tasks.reporting.run_report import (
    GT_COLOUR,
    PREDICTED_COLOUR,
    ReportData,
    ReportSample,
    contour,
    rank_samples,
    render_report,
    sample_panels,
    write_report,
)
from tasks.synthetic.generator import plan_line, render_sample

REPO = Path(__file__).resolve().parents[2]
EVIL = "<script>alert(1)</script>\"&'.png"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;&#x27;.png"
FLAG_RULE = (
    "A sample is flagged when its score after RsCon exceeds median + 3·1.4826·MAD of the "
    "line's RsCon scores; a pixel is predicted defective when its map value exceeds "
    "median + 3·1.4826·MAD of the per-sample map maxima."
)


# ------------------------------------------------------------------------------------------
# report data builders


def synthetic_report(
    num_samples=10,
    size=64,
    modality="2d+3d",
    labels=True,
    random_weights=False,
    names=None,
    seed=3,
):
    """A ReportData from a tasks.synthetic.generator line, maps made up from the GT masks plus
    noise."""
    model, specs = plan_line(num_samples=num_samples, image_size=size, defect_rate=0.4, seed=seed)
    rng = np.random.default_rng(seed)
    rendered = [render_sample(model, spec) for spec in specs]
    maps = np.stack(
        [
            ndimage.gaussian_filter(r.mask.astype(np.float32), size / 40) * 3.0
            + ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), 2.0)
            for r in rendered
        ]
    )
    scores = maps.reshape(num_samples, -1).max(axis=1)
    rescored = (scores - scores.min()) / (scores.max() - scores.min())
    decision = flag_outliers(rescored, 3.0)
    pixel_t = pixel_threshold(scores, 3.0)
    masks = predicted_masks(maps, pixel_t)
    truth = np.array([int(r.mask.any()) for r in rendered])
    samples = [
        ReportSample(
            name=(names[i] if names else spec.name),
            score=float(scores[i]),
            score_rescored=float(rescored[i]),
            flagged=bool(decision.flags[i]),
            label=int(truth[i]) if labels else None,
            defect_type=(spec.defect_type if labels else None),
            image=rendered[i].rgb if "2d" in modality else None,
            anomaly_map=maps[i],
            predicted_mask=masks[i],
            gt_mask=rendered[i].mask if labels else None,
            depth=rendered[i].xyz[..., 2] if "3d" in modality else None,
        )
        for i, spec in enumerate(specs)
    ]
    return ReportData(
        line="part",
        run_id="test-run",
        started="2025-01-01T02:00:00+00:00",
        seconds=12.5,
        modality=modality,
        backbones={"2d": "test fixture: maps = blurred GT mask + noise", "3d": "test fixture"},
        random_weights=random_weights,
        samples=samples,
        flag_threshold=decision.threshold,
        pixel_threshold=pixel_t,
        flag_rule=FLAG_RULE,
        metrics=image_metrics(truth, rescored) if labels else None,
        f1_threshold=f1_optimal_threshold(truth, rescored) if labels else None,
        set_aside=[("broken/007", "/data/part/test/broken/rgb/007.png", "truncated PNG file")],
        timings={"2d_features": 3.2, "mutual_scoring": 6.1, "maps_and_rescoring": 0.4},
        config={"modality": modality, "image_size": size, "flag_mad_k": 3.0},
    )


def tiny_sample(name, rescored, flagged, size=8, image=True, depth=False, label=None):
    grid = np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size)
    return ReportSample(
        name=name,
        score=float(rescored),
        score_rescored=float(rescored),
        flagged=flagged,
        label=label,
        defect_type=None,
        image=np.full((size, size, 3), 128, np.uint8) if image else None,
        anomaly_map=grid * rescored,
        predicted_mask=grid > 0.8,
        gt_mask=None,
        depth=np.full((size, size), 0.4, np.float32) if depth else None,
    )


def tiny_report(samples, **changes):
    fields = dict(
        line="line",
        run_id="r",
        started="2025-01-01T00:00:00",
        seconds=1.0,
        modality="2d",
        backbones={"2d": "vit"},
        random_weights=False,
        samples=samples,
        flag_threshold=0.5,
        pixel_threshold=0.5,
        flag_rule="rule",
        metrics=None,
        f1_threshold=None,
        set_aside=[],
        timings={},
        config={},
    )
    fields.update(changes)
    return ReportData(**fields)


def section(page, section_id):
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


# ------------------------------------------------------------------------------------------
# unit tests


def test_every_string_from_the_data_is_escaped():
    data = synthetic_report(num_samples=4, names=[EVIL, "b", "c", "d"])
    data = ReportData(
        **{
            **data.__dict__,
            "line": EVIL,
            "run_id": EVIL,
            "flag_rule": EVIL,
            "backbones": {EVIL: EVIL},
            "set_aside": [(EVIL, EVIL, EVIL)],
            "timings": {EVIL: 1.0},
            "config": {EVIL: EVIL},
            "metrics": {EVIL: 0.5},
        }
    )
    page = render_report(data)
    assert "<script" not in page
    assert "alert(1)</" not in page
    assert EVIL not in page
    assert page.count(EVIL_ESCAPED) >= 12


def test_random_weights_banner_iff_random():
    assert 'class="banner-random"' in render_report(synthetic_report(4, random_weights=True))
    page = render_report(synthetic_report(4, random_weights=False))
    assert "banner-random" not in page.split("</style>")[1]
    assert "not meaningful" not in page


def test_all_sections_present():
    page = render_report(synthetic_report(6))
    for section_id in (
        "decision", "suspects", "others", "ranking", "metrics", "set-aside", "timings"
    ):
        assert f'<section id="{section_id}">' in page
    assert '<section id="config">' in page
    assert "musc run report — part" in page
    assert FLAG_RULE.replace("'", "&#x27;") in page
    assert "truncated PNG file" in section(page, "set-aside")
    assert "mutual_scoring" in section(page, "timings")
    assert section(page, "decision").count("<svg") == 2  # histogram + colour scale


def test_metrics_section_only_with_labels():
    with_labels = render_report(synthetic_report(6, labels=True))
    assert section(with_labels, "metrics").count("<svg") == 2  # ROC + PR
    assert "F1-optimal threshold" in with_labels
    without = render_report(synthetic_report(6, labels=False))
    assert 'id="metrics"' not in without
    assert "F1-optimal" not in without


def test_flagged_samples_are_ranked_first():
    samples = [
        tiny_sample("high-unflagged", 0.9, False),
        tiny_sample("low-flagged", 0.6, True),
        tiny_sample("mid", 0.7, False),
        tiny_sample("top-flagged", 0.95, True),
    ]
    assert rank_samples(samples) == [3, 1, 0, 2]
    page = render_report(tiny_report(samples))
    flagged = section(page, "suspects")
    assert flagged.index("top-flagged") < flagged.index("low-flagged")
    assert "high-unflagged" not in flagged and "mid" not in flagged
    assert "Flagged samples: 2 of 4" in flagged
    others = section(page, "others")
    assert others.startswith("<details>") and "open" not in others.split(">")[0]
    assert others.index("high-unflagged") < others.index("mid")
    assert page.index('id="suspects"') < page.index('id="others"') < page.index('id="decision"')
    ranking = section(page, "ranking")
    assert ranking.index("low-flagged") < ranking.index("high-unflagged") < ranking.index("mid")


@pytest.mark.parametrize(
    ("image", "depth", "per_sample"), [(True, False, 2), (True, True, 3), (False, True, 1)]
)
def test_number_of_thumbnails(image, depth, per_sample):
    samples = [tiny_sample(f"s{i}", i / 10, i > 7, image=image, depth=depth) for i in range(10)]
    assert render_report(tiny_report(samples), max_samples=4).count("<img") == 4 * per_sample
    assert render_report(tiny_report(samples)).count("<img") == 10 * per_sample
    assert render_report(tiny_report(samples), max_samples=0).count("<img") == 0


def test_bare_heat_map_without_image_or_depth():
    samples = [tiny_sample("a", 0.5, False, image=False), tiny_sample("b", 0.2, False, image=False)]
    page = render_report(tiny_report(samples))
    assert page.count("<img") == 2
    assert "heat map of a" in page


def test_synthetic_line_thumbnail_count_and_all_samples_in_the_table():
    data = synthetic_report(10, modality="2d+3d")
    page = render_report(data, max_samples=4)
    assert page.count("<img") == 4 * 3
    assert section(page, "ranking").count("<tr>") == 1 + 10


def test_page_is_self_contained():
    page = render_report(synthetic_report(4))
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "<script" not in page
    assert "Content-Security-Policy" in page


def test_thumbnails_are_png_data_uris_of_the_right_size():
    flagged = tiny_sample("flagged", 0.9, True, size=600)
    quiet = tiny_sample("quiet", 0.1, False, size=600)
    page = render_report(tiny_report([flagged, quiet]))
    sizes = {}
    for section_id in ("suspects", "others"):
        uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', section(page, section_id))
        assert len(uris) == 2  # image + heat map, image
        for uri in uris:
            png = base64.b64decode(uri)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
            sizes[section_id] = (width, height)
    assert sizes == {"suspects": (512, 512), "others": (160, 160)}  # both downscaled from 600


def test_contour_is_the_mask_minus_its_erosion():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 2:5] = True
    expected = mask.copy()
    expected[2:5, 3] = False
    np.testing.assert_array_equal(contour(mask), expected)
    edge = np.ones((3, 3), dtype=bool)
    assert contour(edge).sum() == 8  # outside the image counts as background


def test_panels_share_the_line_colour_scale_and_draw_outlines():
    sample = tiny_sample("a", 1.0, True, image=False)
    ((caption, rgb),) = sample_panels(sample, low=0.0, high=2.0)
    assert caption == "heat map"
    inside = ~contour(sample.predicted_mask) & ~sample.predicted_mask
    np.testing.assert_array_equal(rgb[0, 0], inferno(np.zeros(1))[0])
    assert (rgb[contour(sample.predicted_mask)] == PREDICTED_COLOUR).all()
    # the map only reaches 1.0 of a 0..2 scale: no pixel gets the top colour of the scale
    top = inferno(np.ones(1))[0]
    assert not (rgb[inside] == top).all(axis=-1).any()
    with_gt = ReportSample(**{**sample.__dict__, "gt_mask": sample.predicted_mask.copy()})
    ((_, rgb_gt),) = sample_panels(with_gt, 0.0, 2.0)
    assert (rgb_gt[contour(sample.predicted_mask)] == GT_COLOUR).all()


def test_infinite_thresholds_render():
    samples = [tiny_sample("a", 0.5, False), tiny_sample("b", 0.5, False)]
    page = render_report(tiny_report(samples, flag_threshold=math.inf, pixel_threshold=math.inf))
    assert "∞" in section(page, "decision")


def test_sample_shapes_are_checked():
    with pytest.raises(ValueError, match="predicted_mask"):
        ReportSample(
            name="x",
            score=0.0,
            score_rescored=0.0,
            flagged=False,
            label=None,
            defect_type=None,
            image=None,
            anomaly_map=np.zeros((4, 4), np.float32),
            predicted_mask=np.zeros((5, 5), bool),
            gt_mask=None,
            depth=None,
        )


def test_write_report_creates_parents(tmp_path):
    target = tmp_path / "runs" / "part" / "report.html"
    written = write_report(synthetic_report(3), target)
    assert written == str(target)
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# ------------------------------------------------------------------------------------------
# real browser


def _chromium_paths():
    """(chromium, chromedriver) as installed by ``make test-deps``; the test is skipped without."""
    browser, driver = chromium_paths()
    if not (browser and driver):
        pytest.skip(
            "Debian chromium/chromium-driver are not installed: run `make test-deps` "
            "(infra/install_system_deps.sh --with-browser) to render the report in a browser"
        )
    return browser, driver


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
    from selenium.common.exceptions import NoAlertPresentException

    browser, driver_path = _chromium_paths()
    data = synthetic_report(10, size=96, random_weights=True)
    data.set_aside.append((EVIL, "/data/part/test/good/rgb/" + EVIL, "empty file (0 bytes)"))
    flagged = sum(s.flagged for s in data.samples)
    assert 0 < flagged < 8
    page_path = Path(write_report(data, tmp_path / "report.html", max_samples=8))

    driver = start_chromium(browser, driver_path, tmp_path / "profile", 900, console_log=True)
    try:
        driver.get(page_path.as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);"
        )
        assert len(images) == 8 * 3
        assert all(complete and width > 0 for complete, width in images)
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert severe == []
        with pytest.raises(NoAlertPresentException):
            _ = driver.switch_to.alert.text
        aside = driver.execute_script("return document.getElementById('set-aside').textContent")
        assert EVIL in aside  # shown as text, not run
        assert driver.execute_script("return document.scripts.length") == 0
        banner = driver.execute_script(
            "const b = document.querySelector('.banner-random');"
            "return [b.textContent, getComputedStyle(b).backgroundColor];"
        )
        assert "not meaningful" in banner[0] and banner[1] == "rgb(201, 42, 42)"
        layout = driver.execute_script(
            "const f = document.querySelector('#suspects img');"
            "const o = document.querySelector('#others details');"
            "return [f.getBoundingClientRect().width, o.open,"
            " document.querySelector('#others img').checkVisibility()];"
        )
        assert layout == [320, False, False]  # flagged large, the others collapsed (hidden)
        png = full_page_png(driver)
        driver.execute_script("document.querySelector('#suspects img').scrollIntoView()")
        driver.find_element("css selector", "#suspects label.zoom img").click()
        zoomed = driver.execute_script(
            "const r = document.querySelector('#suspects img').getBoundingClientRect();"
            "return [r.width, window.innerWidth];"
        )
        assert zoomed[0] > 0.9 * zoomed[1], "a click enlarges the picture"
    finally:
        driver.quit()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "report-screenshot.png").write_bytes(png)
    if os.environ.get("MUSC_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs" / "report-screenshot.png").write_bytes(png)


def test_heat_map_is_blended_over_the_image_and_both_modalities_sit_side_by_side():
    sample = tiny_sample("both", 1.0, True, image=True, depth=True)
    panels = sample_panels(sample, low=0.0, high=1.0)
    assert [c for c, _ in panels] == ["image + heat map", "depth + heat map", "image"]
    blended = panels[0][1]
    # pixel (0, 0): map value 0 -> 15 % inferno(0) over the grey (128) image
    expected = np.round(0.85 * 128 + 0.15 * inferno(np.zeros(1))[0].astype(float))
    np.testing.assert_array_equal(blended[0, 0], expected.astype(np.uint8))
    assert (panels[2][1] == 128).all()  # the plain image is untouched


def test_nothing_flagged_says_so_with_the_threshold_or_the_reason():
    samples = [tiny_sample("a", 0.3, False), tiny_sample("b", 0.2, False)]
    page = render_report(tiny_report(samples, flag_threshold=0.75))
    assert "Flagged samples: 0 of 2" in page
    assert "No sample flagged" in section(page, "suspects") and "0.75" in section(page, "suspects")
    declined = render_report(
        tiny_report(samples, flag_threshold=math.inf, flag_note="2 sample(s): <too few>")
    )
    assert "could not set a flag threshold" in section(declined, "suspects")
    assert "&lt;too few&gt;" in section(declined, "suspects")
    assert 'class="warn"' in section(declined, "decision")


def test_verdicts_are_shown_as_badges_and_in_the_table():
    samples = [
        ReportSample(**{**tiny_sample("a", 0.9, True).__dict__, "verdict": "ok"}),
        ReportSample(**{**tiny_sample("b", 0.2, False).__dict__, "verdict": "defect"}),
    ]
    page = render_report(tiny_report(samples))
    assert "operator: ok" in section(page, "suspects")
    assert "operator: defect" in section(page, "others")
    assert "<td>defect</td>" in section(page, "ranking")


def test_drift_warning_and_history_link_in_the_header():
    samples = [tiny_sample("a", 0.9, True), tiny_sample("b", 0.2, False)]
    page = render_report(
        tiny_report(samples, drift_note="median +4.2 <sigmas>", history="/store/results/h.html")
    )
    header = page.split("</header>")[0]
    assert "Drift:" in header and "median +4.2 &lt;sigmas&gt;" in header
    assert 'href="file:///store/results/h.html"' in header
    assert "Drift:" not in render_report(tiny_report(samples))
