"""The last stage of a run: metrics and every result file, from the maps and the decisions.

Written under the run's output prefix (local or ``s3://``)::

    run.json              settings, backbones, counts of computed/cached entries, timings,
                          set-aside samples, outputs
    scores.csv            plain CSV: rank, name, score (max of the map), score after RsCon,
                          flag, label, defect type, map file, random weights (1/0)
    maps/<stem>.npy       float32 S×S anomaly map per sample
    overlays/<stem>.png   heat map over the image, one colour scale for the line
    metrics.json          image and pixel metrics (when labels exist)
    set_aside.csv         samples that could not be used, the file and the problem
    report.html           the self-contained run report
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import IO

import numpy as np
from prefect import task

from musc_core.config import MuscConfig
from musc_core.decisions import (
    predicted_masks,
)
from musc_core.metrics import PixelMetricsStream, f1_optimal_threshold
from tasks.cache.store import FeatureCache
from tasks.decisions import read_decided
from tasks.evaluation.metrics import image_line_metrics, with_pixel_metrics
from tasks.formats.prepare import SetAside
from tasks.planning.blocks import PoolSample
from tasks.records.result_store import RANDOM_WEIGHTS_WARNING, ResultStore, unique_stems
from tasks.records.run_summary import RunFacts, RunSummary, SetAsideSample
from tasks.records.verdicts import latest_verdicts, read_verdicts
from tasks.reporting.artifacts import publish_artifacts
from tasks.reporting.colormap import blend_heat
from tasks.reporting.history_page import history_link
from tasks.reporting.run_report import ReportData, ReportSample, rank_samples, render_report
from tasks.runtime import Runtime, feature_cache
from tasks.stage import TASK_OPTIONS

#: Samples shown with thumbnails in the HTML report (the ranked table lists all of them).
REPORT_THUMBNAILS = 40
#: Map pixels the report reads per block for the pixel metrics (4 MiB of float32 maps).
METRIC_BLOCK_PIXELS = 1 << 20
#: Distinct map values one value pass of the pixel metrics gathers (up to about 100 bytes
#: each while the pass merges them).
METRIC_VALUES_PER_PASS = 1 << 20
FLAG_RULE = (
    "A sample is flagged when its score after RsCon exceeds median + k · 1.4826 · MAD of the "
    "run's normal-looking scores after RsCon (k = {k}): the set starts as the lower half of "
    "the scores and grows to every score under the threshold until it stops changing, so many "
    "defects in one batch do not lift the threshold past them (docs/decisions.md). A pixel is "
    "predicted defective when its map value exceeds median + k · 1.4826 · MAD of the run's "
    "per-sample map maxima."
)
FLAG_RULE_BANK = (
    "New parts are scored against the line's reference bank. A part is flagged when its score "
    "after RsCon (computed over the new parts and the bank together) exceeds median + k · "
    "1.4826 · MAD of the bank samples' scores after RsCon in that pool (k = {k}); a pixel is "
    "predicted defective when its map value exceeds median + k · 1.4826 · MAD of the bank "
    "samples' map maxima."
)


@dataclass(frozen=True)
class RunInfo:
    """Facts about a run that end up in its files.

    Attributes:
        line: the production line.
        batch: the batch id.
        run_id: the Prefect flow run id.
        started: ISO 8601 UTC start time.
        out: output prefix (local path or ``s3://``).
        random_weights: whether a backbone has random weights.
        backbones: backbone identity by modality.
        settings: everything else worth recording (data source, format, options).
    """

    line: str
    batch: str
    run_id: str
    started: str
    out: str
    random_weights: bool
    backbones: dict[str, str]
    settings: dict[str, object]


@dataclass(frozen=True)
class LineResult:
    """What the report task returns to the flow (small).

    Attributes:
        scored: names of tonight's scored samples, ranked by RsCon score.
        flagged: names of the flagged samples.
        metrics: metrics when labels exist.
        outputs: written files by kind.
        summary: the run's summary (``run.json``).
    """

    scored: list[str]
    flagged: list[str]
    metrics: dict[str, float] | None
    outputs: dict[str, str]
    summary: RunSummary


def _prepared_array(cache: FeatureCache, key: str | None, name: str) -> np.ndarray | None:
    """One array of a prepared entry, or None when the sample has none (no mask, no XYZ)."""
    if key is None:
        return None
    try:
        return cache.read_array(key, name)
    except KeyError:
        return None


def _ground_truth(cache: FeatureCache, sample: PoolSample, size: int) -> np.ndarray | None:
    """A sample's (S, S) bool ground truth, or None when it has none.

    Its mask entry; all normal for a labelled normal sample without a mask file (MVTec AD,
    VisA, BTAD and MPDD ship none).
    """
    mask = _prepared_array(cache, sample.keys.prepared.mask, "mask")
    if mask is not None:
        return mask.astype(bool)
    return np.zeros((size, size), dtype=bool) if sample.label == 0 else None


def _blocks(
    items: Iterable[tuple[np.ndarray | None, np.ndarray]], pixels: int
) -> Iterator[tuple[list[np.ndarray | None], np.ndarray]]:
    """Consecutive ``(mask, map)`` pairs grouped into blocks of about ``pixels`` map pixels.

    Yields:
        The block's masks (as given) and its (B, S, S) maps.
    """
    masks: list[np.ndarray | None] = []
    maps: list[np.ndarray] = []
    held = 0
    for mask, anomaly_map in items:
        masks.append(mask)
        maps.append(anomaly_map)
        held += anomaly_map.size
        if held >= pixels:
            yield masks, np.stack(maps)
            masks, maps, held = [], [], 0
    if maps:
        yield masks, np.stack(maps)


class _MapCopy:
    """The line's maps in a local temporary file, in sample order, read back in sequence.

    Reading them back costs a local file read, not a cache read and decode per sample.

    Args:
        file: an open, empty binary file; the caller closes it.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._layout: list[tuple[tuple[int, ...], np.dtype]] = []

    def write(self, anomaly_map: np.ndarray) -> None:
        """Add the next sample's map."""
        self._layout.append((anomaly_map.shape, anomaly_map.dtype))
        self._file.write(np.ascontiguousarray(anomaly_map).tobytes())

    def maps(self) -> Iterator[np.ndarray]:
        """Every map, in the order written, one at a time."""
        self._file.seek(0)
        for shape, dtype in self._layout:
            size = int(np.prod(shape)) * dtype.itemsize
            yield np.frombuffer(self._file.read(size), dtype=dtype).reshape(shape)

    def pixels(self, count: int) -> Iterator[np.ndarray]:
        """Every map pixel, in order, about ``count`` at a time (maps of one dtype)."""
        maps: list[np.ndarray] = []
        held = 0
        for anomaly_map in self.maps():
            maps.append(anomaly_map.ravel())
            held += anomaly_map.size
            if held >= count:
                yield np.concatenate(maps)
                maps, held = [], 0
        if maps:
            yield np.concatenate(maps)


def _write_maps(
    store: ResultStore,
    cache: FeatureCache,
    tonight: list[PoolSample],
    stems: list[str],
    keys: list[str],
    size: int,
    copy: _MapCopy,
    terms: Callable[[], _FileTerms] | None,
) -> tuple[tuple[float, float], dict[str, float] | None]:
    """Every sample's map (.npy), the line's colour scale and its pixel metrics.

    Memory does not grow with the line: maps and masks are read a block of
    :data:`METRIC_BLOCK_PIXELS` map pixels at a time. The pass over the cache writes the
    maps, takes the scale, feeds pass 1 of :class:`musc_core.metrics.PixelMetricsStream` and
    copies the maps to ``copy`` (4 bytes per float32 pixel on local disk); the value passes
    of the metrics read that copy back a block at a time, each gathering up to
    :data:`METRIC_VALUES_PER_PASS` distinct map values (about 40 passes for 10,000 maps of
    64 px with nearly all values distinct). The terms of the metrics' sums go to temporary
    files (``terms``; 8 bytes per distinct map value for AUROC and AP each, fewer for
    AUPRO), so that the sums are NumPy's over the whole curves, as in
    :func:`musc_core.metrics.pixel_metrics`.

    Args:
        store: the run's result files.
        cache: the feature cache.
        tonight: the batch's samples.
        stems: their file stems.
        keys: their reduced-entry keys.
        size: image side S (for the all-normal ground truth of a normal sample without mask).
        copy: where the maps are copied, for the metrics' passes and the overlays.
        terms: makes a file store for the terms of a sum; None: no pixel metrics (samples
            without labels).

    Returns:
        ``(low, high)``, the minimum and maximum over every map, and the pixel metrics, or
        None when not asked for, when a sample has no ground truth or none has a defect pixel.
    """
    stream = None
    if terms is not None:
        stream = PixelMetricsStream(max_values=METRIC_VALUES_PER_PASS, terms=terms)
    defective = False
    low, high = math.inf, -math.inf

    def first_pass() -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        nonlocal low, high, defective, stream
        for sample, stem, key in zip(tonight, stems, keys, strict=True):
            anomaly_map = cache.read_array(key, "map")
            store.write_npy(f"maps/{stem}.npy", anomaly_map.astype(np.float32))
            copy.write(anomaly_map)
            low = min(low, float(anomaly_map.min()))
            high = max(high, float(anomaly_map.max()))
            mask = _ground_truth(cache, sample, size) if stream is not None else None
            if mask is None:
                stream = None
            else:
                defective = defective or bool(mask.any())
            yield mask, anomaly_map

    for masks, maps in _blocks(first_pass(), METRIC_BLOCK_PIXELS):
        if stream is not None:
            stream.add(np.stack(masks), maps)
    if stream is None or not defective:
        return (low, high), None
    while stream.passes_left:
        for pixels in copy.pixels(METRIC_BLOCK_PIXELS):
            stream.add_values(pixels)
        stream.end_pass()
    return (low, high), stream.result()


class _FileTerms:
    """The terms of one sum of the pixel metrics in a temporary file (8 bytes each).

    Args:
        file: an open, empty binary file; the caller closes it.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._size = 0

    def append(self, terms: np.ndarray) -> None:
        """Add (K,) float64 terms at the end of the file."""
        self._file.seek(0, io.SEEK_END)
        self._file.write(np.ascontiguousarray(terms, dtype=np.float64).tobytes())
        self._size += int(np.size(terms))

    def __len__(self) -> int:
        """How many terms are kept."""
        return self._size

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) float64 terms ``start`` to ``stop``, read from the file."""
        self._file.seek(start * 8)
        return np.frombuffer(self._file.read((stop - start) * 8), dtype=np.float64).copy()


def _write_overlays(
    store: ResultStore,
    cache: FeatureCache,
    tonight: list[PoolSample],
    stems: list[str],
    copy: _MapCopy,
    scale: tuple[float, float],
) -> None:
    """Every sample's overlay (.png, one colour scale for the line), one sample at a time.

    The overlay is the report's: the inferno heat map blended over the image, more opaque
    where the map is higher (:func:`tasks.reporting.colormap.blend_heat`); the bare heat map for
    3D-only lines. Each map and image is read, drawn and written before the next one.

    Args:
        store: the run's result files.
        cache: the feature cache (the images).
        tonight: the batch's samples.
        stems: their file stems.
        copy: the maps, in sample order (:func:`_write_maps`).
        scale: ``(low, high)`` of every map of the line (:func:`_write_maps`).
    """
    low, high = scale
    spread = (high - low) or 1.0
    for sample, stem, anomaly_map in zip(tonight, stems, copy.maps(), strict=True):
        heat = (anomaly_map - low) / spread
        image = _prepared_array(cache, sample.keys.prepared.image, "image")
        base = None
        if image is not None:
            base = (np.clip(np.transpose(image, (1, 2, 0)), 0, 1) * 255).round().astype(np.uint8)
        store.write_png(f"overlays/{stem}.png", blend_heat(base, heat))


def _ranked_rows(
    tonight: list[PoolSample],
    stems: list[str],
    before: np.ndarray,
    after: np.ndarray,
    flags: np.ndarray,
    random_weights: bool,
) -> list[list[object]]:
    """scores.csv rows (header first), most suspect first (by RsCon score).

    Plain CSV, no comment line: whether a backbone had random weights (the scores then mean
    nothing) is the last column, 1 or 0 on every row, and ``random_weights`` in ``run.json``.
    """
    rows: list[list[object]] = [
        [
            "rank",
            "name",
            "score",
            "score_rescored",
            "flagged",
            "label",
            "defect_type",
            "map_file",
            "random_weights",
        ]
    ]
    for rank, index in enumerate(np.argsort(-after, kind="stable"), start=1):
        sample = tonight[index]
        rows.append(
            [
                rank,
                sample.name,
                f"{float(before[index]):.6g}",
                f"{float(after[index]):.6g}",
                int(flags[index]),
                "" if sample.label is None else sample.label,
                sample.defect_type or "",
                f"maps/{stems[index]}.npy",
                int(random_weights),
            ]
        )
    return rows


@task(name="report", **TASK_OPTIONS)
def report_line(
    info: RunInfo,
    pool: list[PoolSample],
    reduced: list[str],
    current: int,
    decided_key: str,
    set_aside: list[SetAside],
    config: MuscConfig,
    runtime: Runtime,
    extra: RunFacts,
    against_bank: bool = False,
    publish: bool = True,
) -> LineResult:
    """Metrics and the result files of tonight's samples, from their maps and decisions.

    Memory does not grow with the number of samples: maps, masks and images are read a
    sample or a block at a time (:func:`_write_maps`, :func:`_write_overlays`); the report's
    pictures read the maps of its :data:`REPORT_THUMBNAILS` pictured samples only.

    Args:
        info: the run's identity and settings.
        pool: the pool's samples in order; the first ``current`` are tonight's.
        reduced: the reduced-entry key of each pool sample.
        current: how many pool samples are tonight's (the rest is the rolling bank).
        decided_key: the pool's RsCon scores and decisions (:func:`tasks.decisions.decide`).
        set_aside: samples that could not be used.
        config: flag rule (its text in the report), modality, image size.
        runtime: cache location.
        extra: the run's counts, timings and bank so far (for ``run.json``).
        against_bank: new parts scored against a reference bank (``score_new``): the report
            states the bank's flag rule, and no metrics are computed.
        publish: create the run's Prefect artifacts (False outside a flow run: the inspection
            station, ``musc serve``, writes its files only).

    Returns:
        Names, flags, metrics and written files.
    """
    cache = feature_cache(runtime.cache_url)
    store = ResultStore(info.out)
    decided = read_decided(cache, decided_key)
    tonight = pool[:current]
    before, after = decided.before[:current], decided.after[:current]
    pixel_cut = decided.pixel_threshold
    keys = reduced[:current]
    labels = [s.label for s in tonight]
    metrics = None if against_bank else image_line_metrics(labels, before, after)
    stems = unique_stems([s.name for s in tonight])
    with contextlib.ExitStack() as files:

        def temporary() -> IO[bytes]:
            return files.enter_context(tempfile.TemporaryFile(prefix="musc-report-"))

        copy = _MapCopy(temporary())
        terms = (lambda: _FileTerms(temporary())) if metrics is not None else None
        scale, pixel = _write_maps(
            store, cache, tonight, stems, keys, config.image_size, copy, terms
        )
        if metrics is not None:
            metrics = with_pixel_metrics(metrics, pixel)
        _write_overlays(store, cache, tonight, stems, copy, scale)
    outputs = {"maps": store.location("maps"), "overlays": store.location("overlays")}
    rows = _ranked_rows(tonight, stems, before, after, decided.flags, info.random_weights)
    warning = RANDOM_WEIGHTS_WARNING if info.random_weights else ""
    outputs["scores"] = store.write_csv("scores.csv", rows)
    if set_aside:
        aside_rows = [["name", "path", "problem"]]
        aside_rows += [[a.name, a.path, a.problem] for a in set_aside]
        outputs["set_aside"] = store.write_csv("set_aside.csv", aside_rows)
    f1_cut = None
    if metrics is not None:
        payload: dict[str, object] = {"metrics": metrics}
        if warning:
            payload["warning"] = warning
        outputs["metrics"] = store.write_json("metrics.json", payload)
        f1_cut = f1_optimal_threshold(np.asarray(labels, dtype=np.int64), after)
        f1_cut = None if math.isnan(f1_cut) else float(f1_cut)
    verdicts = _batch_verdicts(info)
    drift = decided.drift
    storage = info.settings.get("storage")
    history = history_link(storage, info.line, info.out) if isinstance(storage, str) else None
    samples = [
        ReportSample(
            name=sample.name,
            score=float(before[i]),
            score_rescored=float(after[i]),
            flagged=bool(decided.flags[i]),
            label=sample.label,
            defect_type=sample.defect_type,
            image=None,
            anomaly_map=None,
            predicted_mask=None,
            gt_mask=None,
            depth=None,
            verdict=verdicts.get(sample.name),
        )
        for i, sample in enumerate(tonight)
    ]
    for i in rank_samples(samples)[:REPORT_THUMBNAILS]:  # maps and pictures of the shown ones
        prepared = tonight[i].keys.prepared
        anomaly_map = cache.read_array(keys[i], "map")
        samples[i] = replace(
            samples[i],
            image=_rgb(_prepared_array(cache, prepared.image, "image")),
            anomaly_map=anomaly_map,
            predicted_mask=predicted_masks(anomaly_map, pixel_cut),
            gt_mask=_ground_truth(cache, tonight[i], config.image_size),
            depth=_depth(_prepared_array(cache, prepared.points, "xyz")),
        )
    report = ReportData(
        line=info.line,
        run_id=info.run_id,
        started=info.started,
        seconds=extra.seconds,
        modality=config.modality,
        backbones=info.backbones,
        random_weights=info.random_weights,
        samples=samples,
        flag_threshold=decided.flag_threshold,
        pixel_threshold=pixel_cut,
        flag_rule=(FLAG_RULE_BANK if against_bank else FLAG_RULE).format(k=config.flag_mad_k),
        flag_note=decided.flag_note,
        drift_note=_drift_note(drift),
        history=history,
        metrics=metrics,
        f1_threshold=f1_cut,
        set_aside=[(a.name, a.path, a.problem) for a in set_aside],
        timings=dict(extra.timings),
        config={**config.as_dict(), **info.settings},
        map_range=scale,
    )
    outputs["report"] = store.write_text(
        "report.html", render_report(report, max_samples=REPORT_THUMBNAILS)
    )
    summary = RunSummary(
        warning=warning or None,
        random_weights=info.random_weights,
        line=info.line,
        batch=info.batch,
        run_id=info.run_id,
        started=info.started,
        out=info.out,
        backbones=info.backbones,
        config=config.as_dict(),
        settings=info.settings,
        scored=len(tonight),
        pool=len(pool),
        flag_threshold=decided.flag_threshold,
        flag_note=decided.flag_note,
        drift=drift,
        pixel_threshold=pixel_cut,
        flagged=[tonight[i].name for i in np.flatnonzero(decided.flags)],
        set_aside=[SetAsideSample(name=a.name, path=a.path, problem=a.problem)
                   for a in set_aside],
        metrics=metrics,
        outputs=outputs,
        counts=extra.counts,
        timings=extra.timings,
        seconds=extra.seconds,
        bank=extra.bank,
        preparation=extra.preparation,
        against_bank=against_bank,
    )
    outputs["run"] = store.write_json("run.json", summary.to_json_dict())
    summary.outputs["run"] = outputs["run"]
    ranked = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    if publish:
        publish_artifacts(summary, ranked)
    return LineResult(
        scored=[row[1] for row in rows[1:]],
        flagged=summary.flagged,
        metrics=metrics,
        outputs=outputs,
        summary=summary,
    )


def _drift_note(drift: dict | None) -> str | None:
    """The report's drift warning, or None when tonight's scores did not drift."""
    if not drift or not drift["drifted"]:
        return None
    return (
        f"tonight's median score is {drift['shift']:+.1f} robust sigmas from the reference "
        f"bank's (limit {drift['limit']:g}): check the parts, the camera and the lighting "
        "before trusting the flags"
    )


def _batch_verdicts(info: RunInfo) -> dict[str, str]:
    """Operators' verdicts on this batch's samples, by name (none without a storage root)."""
    storage = info.settings.get("storage")
    if not isinstance(storage, str):
        return {}
    try:
        latest = latest_verdicts(read_verdicts(storage, info.line))
    except ValueError:
        return {}
    return {name: v["verdict"] for (batch, name), v in latest.items() if batch == info.batch}


def _rgb(image: np.ndarray | None) -> np.ndarray | None:
    """(3, S, S) float image in [0, 1] → (S, S, 3) uint8, or None."""
    if image is None:
        return None
    return (np.clip(image.transpose(1, 2, 0), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _depth(xyz: np.ndarray | None) -> np.ndarray | None:
    """Z of an (S, S, 3) organized point cloud (0 = no point), or None."""
    return None if xyz is None else np.ascontiguousarray(xyz[..., 2], dtype=np.float32)
