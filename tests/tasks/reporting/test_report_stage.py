"""The report stage reads maps a block at a time; its files and metrics equal all-at-once ones."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import tasks.results as results
from musc_core.config import MuscConfig
from musc_core.decisions import predicted_masks
from tasks.cache.keys import PreparedKeys, SampleKeys
from tasks.cache.store import FeatureCache
from tasks.decisions import Decided, write_decided
from tasks.evaluation.metrics import line_metrics
from tasks.planning.blocks import PoolSample
from tasks.records.run_summary import RunFacts
from tasks.reporting.colormap import blend_heat
from tasks.reporting.run_report import ReportData, ReportSample, render_report
from tasks.results import RunInfo, report_line
from tasks.runtime import Runtime

SIZE = 16
CONFIG = MuscConfig(modality="2d", image_size=SIZE)


def _line(tmp_path: Path, n: int, with_masks: bool = True, seed: int = 0):
    """A labelled line in a fresh cache: maps with ties, images, masks of the defective ones.

    Returns:
        The pool, the reduced keys, the decided key, the runtime, the stacked (N, S, S) maps
        and the ground truth per sample (None for a defective sample without a mask).
    """
    rng = np.random.default_rng(seed)
    cache = FeatureCache(str(tmp_path / "cache"))
    pool, reduced, maps, truths = [], [], [], []
    for i in range(n):
        label = int(i % 3 == 1)
        truth = np.zeros((SIZE, SIZE), dtype=bool)
        if label:
            y, x = rng.integers(0, SIZE - 5, 2)
            truth[y : y + 5, x : x + 4] = True
        # Quantized maps: ties inside a sample, across samples and across the classes.
        anomaly_map = (np.round(rng.random((SIZE, SIZE)) * 9) / 9 + 0.4 * truth + 0.1 * i)
        anomaly_map = anomaly_map.astype(np.float32)
        image = rng.random((3, SIZE, SIZE)).astype(np.float32)
        cache.write(f"image-{i}", {"image": image})
        mask_key = None
        if label and with_masks:
            cache.write(f"mask-{i}", {"mask": truth.astype(np.uint8)})
            mask_key = f"mask-{i}"
        cache.write(f"reduced-{i}", {"map": anomaly_map})
        keys = SampleKeys(PreparedKeys(f"image-{i}", None, mask_key), None, None, None, None, None)
        pool.append(PoolSample(f"part {i}", "b1", keys, label, "crack" if label else None))
        reduced.append(f"reduced-{i}")
        maps.append(anomaly_map)
        truths.append(truth if (with_masks or not label) else None)
    before = np.float32([m.max() for m in maps])
    after = before + np.float32(0.01) * np.arange(n, dtype=np.float32)
    flags = after > np.median(after)
    decided = Decided(before, after, flags, float(np.median(after)), None, 1.0, None)
    write_decided(cache, "decided", decided)
    return pool, reduced, "decided", Runtime(str(tmp_path / "cache"), "cpu"), np.stack(maps), truths


def _report(tmp_path: Path, pool, reduced, decided_key, runtime):
    info = RunInfo("line", "b1", "run-1", "2026-01-01T00:00:00+00:00", str(tmp_path / "out"),
                   False, {"2d": "vit"}, {})
    facts = RunFacts(counts={}, timings={}, seconds=1.0, bank=[])
    return report_line.fn(info, pool, reduced, len(pool), decided_key, [], CONFIG, runtime,
                          facts, publish=False)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 maps and value passes of 7 distinct values: many blocks and passes."""
    monkeypatch.setattr(results, "METRIC_BLOCK_PIXELS", 3 * SIZE * SIZE)
    monkeypatch.setattr(results, "METRIC_VALUES_PER_PASS", 7)


def test_report_files_and_metrics_equal_the_all_at_once_computation(tmp_path, small_blocks):
    pool, reduced, key, runtime, maps, truths = _line(tmp_path, 11)
    result = _report(tmp_path, pool, reduced, key, runtime)
    out = tmp_path / "out"
    # All at once, as the stage computed them before it streamed: one stack of every map.
    low, high = float(maps.min()), float(maps.max())
    for i, stem in enumerate(f"part {i}" for i in range(len(pool))):
        np.testing.assert_array_equal(np.load(out / "maps" / f"{stem}.npy"), maps[i])
        image = FeatureCache(runtime.cache_url).read_array(f"image-{i}", "image")
        base = (np.clip(np.transpose(image, (1, 2, 0)), 0, 1) * 255).round().astype(np.uint8)
        expected = blend_heat(base, (maps[i] - low) / ((high - low) or 1.0))
        np.testing.assert_array_equal(np.asarray(Image.open(out / "overlays" / f"{stem}.png")),
                                      expected)
    labels = [s.label for s in pool]
    before = np.float32([m.max() for m in maps])
    after = before + np.float32(0.01) * np.arange(len(pool), dtype=np.float32)
    expected_metrics = line_metrics(labels, before, after, truths, maps)
    written = json.loads((out / "metrics.json").read_text())["metrics"]
    assert written == expected_metrics == result.metrics  # every digit
    assert {"pixel_auroc", "pixel_aupro", "pixel_aupro_200"} <= set(written)
    y = np.stack(truths).ravel()
    assert written["pixel_auroc"] == pytest.approx(roc_auc_score(y, maps.ravel()), abs=1e-12)
    assert (out / "report.html").read_text().count("part 10") >= 1


def test_report_without_a_defect_mask_has_image_metrics_only(tmp_path, small_blocks):
    pool, reduced, key, runtime, maps, truths = _line(tmp_path, 7, with_masks=False, seed=2)
    result = _report(tmp_path, pool, reduced, key, runtime)
    assert result.metrics is not None
    assert not any(k.startswith("pixel_") for k in result.metrics)
    labels = [s.label for s in pool]
    before = np.float32([m.max() for m in maps])
    after = before + np.float32(0.01) * np.arange(len(pool), dtype=np.float32)
    assert result.metrics == line_metrics(labels, before, after, truths, maps)


def test_a_report_with_the_map_range_and_unpictured_samples_without_maps_is_the_same_page():
    anomaly_map = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    other_map = np.full((8, 8), 1.7, dtype=np.float32)  # lifts the line's maximum
    shown = ReportSample("a", 1.0, 1.0, True, 1, None, None, anomaly_map,
                         predicted_masks(anomaly_map, 0.5), None, None)
    mapped = ReportSample("b", 0.2, 0.2, False, 0, None, None, other_map,
                          predicted_masks(other_map, 0.5), None, None)
    listed = ReportSample("b", 0.2, 0.2, False, 0, None, None, None, None, None, None)
    full = ReportData("line", "run", "2026-01-01", 1.0, "2d", {}, False, [shown, mapped],
                      0.5, 0.5, "rule", None, None, [], {}, {})
    bare = ReportData(**{**full.__dict__, "samples": [shown, listed]})
    with pytest.raises(ValueError, match="map_range"):
        render_report(bare, max_samples=1)
    page = render_report(ReportData(**{**bare.__dict__, "map_range": (0.0, 1.7)}), 1)
    assert page == render_report(full, max_samples=1)
    assert page != render_report(ReportData(**{**bare.__dict__, "map_range": (0.0, 1.0)}), 1)
    with pytest.raises(ValueError, match="need their anomaly map"):
        render_report(ReportData(**{**bare.__dict__, "map_range": (0.0, 1.7)}), 2)
    with pytest.raises(ValueError, match="without anomaly_map"):
        ReportSample("c", 0.2, 0.2, False, 0, None, None, None, None, np.zeros((8, 8), bool),
                     None)
