"""Self-contained HTML report of one scored line: what a person reads after a run.

The report is a single HTML file with nothing external: thumbnails are PNG data URIs, charts
are inline SVG, the CSS sits in a ``<style>`` element and there is no JavaScript. It can be
mailed, archived next to the results or opened from object storage without a server.

Safety: sample names, paths, error messages, backbone names and configuration values come
from files on disk, so every string taken from :class:`ReportData` is passed through
:func:`html.escape` before it reaches the page. A Content-Security-Policy ``<meta>`` (no
scripts, images only from ``data:``, no network) is a second line of defence.

Layout, top to bottom: header (line, run, N, flagged, modality, backbones, a red banner when
the weights are random), the flagged samples (large pictures: the heat map alpha-blended over
the image and over the depth rendering, side by side for 2D+3D, with the predicted-mask
outline; click a picture to enlarge it, a CSS checkbox toggle, no script), then the other
samples and the ranked table of all samples, both collapsed in ``<details>``, the decision
(flag rule, thresholds, score histogram, colour scale), metrics with ROC/PR curves (only when
labels exist), samples set aside, stage timings and the configuration. The heat maps use the
perceptually ordered inferno scale (:mod:`tasks.reporting.colormap`), one scale for the whole line.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_curve

from tasks.records.result_store import RANDOM_WEIGHTS_WARNING
from tasks.reporting.colormap import blend_heat, inferno

THUMB_SIZE = 160
"""Largest picture side of an unflagged sample: bigger samples are downscaled."""
FLAGGED_SIZE = 512
"""Largest picture side of a flagged sample (shown large; bigger samples are downscaled)."""
PREDICTED_COLOUR = (0, 255, 255)
"""Contour colour of the predicted defect mask (cyan, absent from the inferno scale)."""
GT_COLOUR = (255, 0, 255)
"""Contour colour of the ground-truth mask (magenta, absent from the inferno scale)."""
NO_POINT_COLOUR = (24, 24, 24)
"""Depth-rendering colour of pixels without a measured point."""
_CROSS = ndimage.generate_binary_structure(2, 1)
_CLASS_COLOURS = {1: "#e8590c", 0: "#4c6ef5", None: "#868e96"}
_CLASS_NAMES = {1: "anomalous", 0: "normal", None: "unlabelled"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#212529;
background:#f8f9fa}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.6rem;margin:8px 0}h2{font-size:1.25rem;margin:28px 0 8px;
border-bottom:1px solid #dee2e6;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;font-size:.9rem}
th,td{border:1px solid #dee2e6;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner-random{background:#c92a2a;color:#fff;padding:12px 16px;border-radius:6px;
font-size:1.05rem;margin:12px 0}
.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:8px 0}
.facts dt{font-weight:600}.facts dd{margin:0}
.rule{background:#fff;border-left:4px solid #495057;padding:8px 12px;white-space:pre-wrap}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.charts svg{background:#fff;border:1px solid #dee2e6}
.cards{display:flex;flex-direction:column;gap:10px}
.card{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:8px 12px}
.card.flagged{border-left:6px solid #c92a2a}
.card h3{font-size:1rem;margin:0 0 6px;word-break:break-all}
.panels{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0}figcaption{font-size:.8rem;color:#495057}
.panels img{width:160px;height:160px;image-rendering:pixelated;display:block;cursor:zoom-in}
.card.flagged .panels img{width:320px;height:320px}
.zoom{display:block}.zoom input{display:none}
.panels .zoom input:checked+img{position:fixed;top:2vh;left:2vw;width:96vw;height:96vh;
object-fit:contain;z-index:10;background:rgba(33,37,41,.92);cursor:zoom-out}
details{margin:8px 0}summary{cursor:pointer;font-weight:600;padding:4px 0}
.none{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:10px 14px}
.badge.ok{background:#2b8a3e}.badge.defect{background:#862e9c}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-size:.8rem;color:#fff;
background:#868e96}.badge.flag{background:#c92a2a}
.bar{background:#74c0fc;height:10px}
.muted{color:#6c757d}
.warn{background:#fff3bf;border-left:4px solid #f08c00;padding:8px 12px}
"""


@dataclass(frozen=True)
class ReportSample:
    """One scored sample as the report shows it.

    Attributes:
        name: sample name (any string; escaped on the page).
        score: sample score before RsCon (maximum of the anomaly map).
        score_rescored: sample score after RsCon; the ranking and the flag rule use it.
        flagged: whether the flag rule marked the sample as suspect.
        label: 1 anomalous, 0 normal, None without ground truth.
        defect_type: the dataset's defect class (e.g. ``"crack"``), None when unknown.
        image: (S, S, 3) uint8 RGB, None for 3D-only lines.
        anomaly_map: (S, S) float32 anomaly map, or None for a sample listed without
            pictures (the report then needs :attr:`ReportData.map_range`).
        predicted_mask: (S, S) bool, pixels above the pixel threshold (None without a map).
        gt_mask: (S, S) bool ground truth, or None.
        depth: (S, S) float32 z of the organized point cloud (0 = no point), or None.
        verdict: an operator's verdict (``ok`` or ``defect``), or None.
    """

    name: str
    score: float
    score_rescored: float
    flagged: bool
    label: int | None
    defect_type: str | None
    image: np.ndarray | None
    anomaly_map: np.ndarray | None
    predicted_mask: np.ndarray | None
    gt_mask: np.ndarray | None
    depth: np.ndarray | None
    verdict: str | None = None

    def __post_init__(self) -> None:
        """Reject arrays whose shapes do not fit the (S, S) anomaly map, or pictures without one."""
        if self.anomaly_map is None:
            pictured = ("image", "predicted_mask", "gt_mask", "depth")
            given = [name for name in pictured if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{self.name!r}: {', '.join(given)} given without anomaly_map")
            return
        side = np.shape(self.anomaly_map)
        if len(side) != 2 or side[0] != side[1]:
            raise ValueError(f"{self.name!r}: anomaly_map must be (S, S), got {side}")
        expected = {"predicted_mask": side, "gt_mask": side, "depth": side, "image": (*side, 3)}
        for field_name, shape in expected.items():
            value = getattr(self, field_name)
            if value is not None and np.shape(value) != shape:
                raise ValueError(
                    f"{self.name!r}: {field_name} must be {shape}, got {np.shape(value)}"
                )


@dataclass(frozen=True)
class ReportData:
    """Everything the report of one line shows.

    Attributes:
        line: production line (category) name.
        run_id: identifier of the run (e.g. the flow run id).
        started: ISO 8601 start time.
        seconds: wall time of the line's run.
        modality: ``"2d"``, ``"3d"`` or ``"2d+3d"``.
        backbones: backbone identity (name and weights) by modality.
        random_weights: whether any backbone had random weights (results not meaningful).
        samples: N scored samples, in any order.
        flag_threshold: threshold of the flag rule on the RsCon scores (may be ``inf``).
        pixel_threshold: threshold of the pixel rule on the maps (may be ``inf``).
        flag_rule: human-readable statement of both rules.
        metrics: metric name -> value when labels exist, else None.
        f1_threshold: RsCon score at the F1 maximum when labels exist, else None.
        set_aside: (name, path, problem) of every sample that could not be used.
        timings: wall seconds per stage.
        config: configuration fields (``MuscConfig.as_dict()`` and run options).
        flag_note: why the batch could not set a flag threshold (shown as a warning), or None.
        drift_note: the drift warning (tonight's scores moved from the bank's), or None.
        history: the line's history page (linked from the header): a location (local path
            or URL) or a link relative to the report (``../history.html``), or None.
        map_range: the line's colour scale, the minimum and maximum over every map; None to
            take it from the samples' maps (then every sample needs one).
    """

    line: str
    run_id: str
    started: str
    seconds: float
    modality: str
    backbones: dict[str, str]
    random_weights: bool
    samples: list[ReportSample]
    flag_threshold: float
    pixel_threshold: float
    flag_rule: str
    metrics: dict[str, float] | None
    f1_threshold: float | None
    set_aside: list[tuple[str, str, str]]
    timings: dict[str, float]
    config: dict[str, object]
    flag_note: str | None = None
    drift_note: str | None = None
    history: str | None = None
    map_range: tuple[float, float] | None = None


# ------------------------------------------------------------------------------------------
# small helpers


def _esc(value: object) -> str:
    """HTML-escaped text of any value (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    """Compact number: ``digits`` significant digits, ``∞`` for inf, ``n/a`` for None/nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def rank_samples(samples: Sequence[ReportSample]) -> list[int]:
    """Report order: flagged samples first, then by decreasing RsCon score, then by name.

    Args:
        samples: the N samples.

    Returns:
        N indices into ``samples``.
    """
    return sorted(
        range(len(samples)),
        key=lambda i: (not samples[i].flagged, -samples[i].score_rescored, samples[i].name),
    )


# ------------------------------------------------------------------------------------------
# thumbnails


def png_data_uri(rgb: np.ndarray) -> str:
    """Encode an image as an inline PNG.

    Args:
        rgb: (H, W, 3) uint8.

    Returns:
        ``data:image/png;base64,...``
    """
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def contour(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner outline of a mask: the mask XOR its erosion (4-neighbourhood).

    Mask pixels on the image border count as outline (outside the image is background).

    Args:
        mask: (H, W) bool.

    Returns:
        (H, W) bool outline.
    """
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _draw_contour(rgb: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int]) -> None:
    """Paint the outline of ``mask`` into ``rgb`` (H, W, 3) in place (nothing for None)."""
    if mask is not None:
        rgb[contour(mask)] = colour


def _resize_rgb(rgb: np.ndarray, side: int) -> np.ndarray:
    """(S, S, 3) uint8 -> (side, side, 3) uint8, antialiased."""
    if rgb.shape[0] == side:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))


def _resize_float(values: np.ndarray, side: int, nearest: bool = False) -> np.ndarray:
    """(S, S) float -> (side, side) float32 (bilinear, or nearest for depth)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape[0] == side:
        return values
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(values).resize((side, side), method))


def _resize_mask(mask: np.ndarray | None, side: int) -> np.ndarray | None:
    """(S, S) bool -> (side, side) bool by nearest neighbour (None stays None)."""
    if mask is None:
        return None
    return _resize_float(np.asarray(mask, dtype=np.float32), side, nearest=True) > 0.5


def depth_rendering(depth: np.ndarray) -> np.ndarray:
    """Grey rendering of an organized depth map: near is bright, relief is hill-shaded.

    Args:
        depth: (H, W) float z (0 = no point).

    Returns:
        (H, W, 3) uint8; pixels without a point are :data:`NO_POINT_COLOUR`.
    """
    valid = depth > 0
    grey = np.zeros(depth.shape, dtype=np.float32)
    if valid.any():
        z = depth[valid]
        low, high = float(z.min()), float(z.max())
        near = np.where(valid, (high - depth) / ((high - low) or 1.0), 0.0)
        filled = np.where(valid, depth, float(z.mean()))
        gy, gx = np.gradient(filled)
        slope = -(gx + gy)
        scale = float(np.percentile(np.abs(slope[valid]), 99)) or 1.0
        shade = 0.5 + 0.5 * np.clip(slope / scale, -1.0, 1.0)
        grey = np.where(valid, 0.25 + 0.45 * near + 0.3 * shade, 0.0)
    rgb = np.repeat((np.clip(grey, 0.0, 1.0) * 255).round().astype(np.uint8)[..., None], 3, -1)
    rgb[~valid] = NO_POINT_COLOUR
    return rgb


def sample_panels(
    sample: ReportSample, low: float, high: float, side: int = THUMB_SIZE
) -> list[tuple[str, np.ndarray]]:
    """The thumbnails of one sample, with the line's shared colour scale.

    Panels: the heat map alpha-blended over the image (2D lines) and over the depth rendering
    (3D lines), side by side for 2D+3D, then the plain image for comparison; the bare heat map
    when there is neither. Heat-map panels carry the predicted-mask outline (cyan) and the
    ground-truth outline (magenta) when present.

    Args:
        sample: the sample.
        low: map value drawn as the bottom of the colour scale (the line's minimum).
        high: map value drawn as the top (the line's maximum).
        side: thumbnail side; samples larger than this are downscaled.

    Returns:
        ``(caption, (t, t, 3) uint8)`` per panel, t = min(S, side).
    """
    if sample.anomaly_map is None:
        raise ValueError(f"{sample.name!r} has no anomaly map to draw")
    t = min(sample.anomaly_map.shape[0], side)
    heat = np.clip((_resize_float(sample.anomaly_map, t) - low) / ((high - low) or 1.0), 0, 1)
    predicted = _resize_mask(sample.predicted_mask, t)
    gt = _resize_mask(sample.gt_mask, t)
    # (caption, picture under the heat map or None, pixels to leave uncoloured or None)
    bases: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
    panels: list[tuple[str, np.ndarray]] = []
    image = None
    if sample.image is not None:
        image = _resize_rgb(np.asarray(sample.image, dtype=np.uint8), t)
        bases.append(("image + heat map", image, None))
    if sample.depth is not None:
        depth = _resize_float(sample.depth, t, nearest=True)
        bases.append(("depth + heat map", depth_rendering(depth), depth <= 0))
    if not bases:
        bases.append(("heat map", None, None))
    for caption, base, no_point in bases:
        rgb = blend_heat(base, heat)
        if no_point is not None:
            rgb[no_point] = NO_POINT_COLOUR
        _draw_contour(rgb, predicted, PREDICTED_COLOUR)
        _draw_contour(rgb, gt, GT_COLOUR)
        panels.append((caption, rgb))
    if image is not None:
        panels.append(("image", image))
    return panels


# ------------------------------------------------------------------------------------------
# SVG charts


class _Frame:
    """A chart's plotting area: maps data coordinates to SVG pixels and draws the axes."""

    def __init__(
        self,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        size: tuple[int, int] = (420, 260),
        margins: tuple[int, int, int, int] = (52, 14, 14, 40),
    ) -> None:
        self.width, self.height = size
        self.left, self.right, self.top, self.bottom = margins
        self.x_range, self.y_range = x_range, y_range

    def x(self, value: float) -> float:
        """SVG abscissa of a data x."""
        lo, hi = self.x_range
        span = self.width - self.left - self.right
        return self.left + span * (value - lo) / ((hi - lo) or 1.0)

    def y(self, value: float) -> float:
        """SVG ordinate of a data y (up is larger)."""
        lo, hi = self.y_range
        span = self.height - self.top - self.bottom
        return self.height - self.bottom - span * (value - lo) / ((hi - lo) or 1.0)

    def open(self, label: str) -> str:
        """``<svg>`` start tag with an accessible, escaped title."""
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" role="img" '
            f'aria-label="{_esc(label)}"><title>{_esc(label)}</title>'
        )

    def axes(
        self, x_label: str, y_label: str, ticks: int = 5, y_ticks: Sequence[float] | None = None
    ) -> str:
        """Axis lines, tick labels (``ticks`` evenly spaced, or the given ``y_ticks``), titles."""
        x0, x1 = self.x(self.x_range[0]), self.x(self.x_range[1])
        y0, y1 = self.y(self.y_range[0]), self.y(self.y_range[1])
        parts = [f'<path d="M{x0:.1f},{y1:.1f} V{y0:.1f} H{x1:.1f}" fill="none" stroke="#495057"/>']
        for value in np.linspace(*self.x_range, ticks):
            px = self.x(value)
            parts.append(
                f'<text x="{px:.1f}" y="{y0 + 14:.1f}" font-size="10" '
                f'text-anchor="middle">{_esc(_fmt(float(value), 3))}</text>'
            )
        for value in np.linspace(*self.y_range, ticks) if y_ticks is None else y_ticks:
            py = self.y(value)
            parts.append(
                f'<text x="{x0 - 4:.1f}" y="{py + 3:.1f}" font-size="10" '
                f'text-anchor="end">{_esc(_fmt(float(value), 3))}</text>'
            )
        parts.append(
            f'<text x="{(x0 + x1) / 2:.1f}" y="{self.height - 6}" font-size="11" '
            f'text-anchor="middle">{_esc(x_label)}</text>'
            f'<text transform="translate(12,{(y0 + y1) / 2:.1f}) rotate(-90)" font-size="11" '
            f'text-anchor="middle">{_esc(y_label)}</text>'
        )
        return "".join(parts)


def _count_ticks(top: int) -> list[float]:
    """At most six whole-number ticks from 0 to at least ``top``."""
    step = max(1, math.ceil(top / 5))
    return [float(v) for v in range(0, step * math.ceil(top / step) + 1, step)]


def _stacked_bars(frame: _Frame, edges: np.ndarray, stacks: dict[int | None, np.ndarray]) -> str:
    """Histogram bars, one colour per class, stacked in the order of ``stacks``."""
    parts = []
    base = np.zeros(len(edges) - 1)
    for c, counts in stacks.items():
        for i, n in enumerate(counts):
            if n:
                x0, x1 = frame.x(edges[i]), frame.x(edges[i + 1])
                y_top, y_bottom = frame.y(base[i] + n), frame.y(base[i])
                parts.append(
                    f'<rect x="{x0 + 0.5:.1f}" y="{y_top:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                    f'height="{y_bottom - y_top:.1f}" fill="{_CLASS_COLOURS[c]}">'
                    f"<title>{n} {_CLASS_NAMES[c]}</title></rect>"
                )
        base = base + counts
    return "".join(parts)


def _threshold_line(frame: _Frame, threshold: float) -> str:
    """Vertical red line at the threshold, its value written on the side with more room."""
    tx = frame.x(threshold)
    middle = (frame.left + frame.width - frame.right) / 2
    anchor, dx = ("start", 4) if tx < middle else ("end", -4)
    return (
        f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{frame.top}" y2="{frame.y(0):.1f}" '
        f'stroke="#c92a2a" stroke-width="2"/><text x="{tx + dx:.1f}" y="{frame.top + 11}" '
        f'font-size="10" fill="#c92a2a" text-anchor="{anchor}" paint-order="stroke" '
        f'stroke="#fff" stroke-width="3">flag threshold '
        f"{_esc(_fmt(threshold))}</text>"
    )


def _legend(frame: _Frame, classes: Sequence[int | None]) -> str:
    """Class colours in a row above the plotting area, right-aligned."""
    parts = []
    x = frame.width - frame.right - 80 * len(classes)
    for c in classes:
        parts.append(
            f'<rect x="{x}" y="4" width="9" height="9" fill="{_CLASS_COLOURS[c]}"/>'
            f'<text x="{x + 13}" y="12" font-size="10">{_CLASS_NAMES[c]}</text>'
        )
        x += 80
    return "".join(parts)


def histogram_svg(
    scores: np.ndarray, labels: Sequence[int | None], threshold: float, bins: int | None = None
) -> str:
    """Histogram of the RsCon scores, stacked by label, with the flag threshold line.

    Args:
        scores: (N,) RsCon scores.
        labels: N labels (1, 0 or None); bars are coloured by class.
        threshold: flag threshold; drawn when finite, with the flagged side shaded.
        bins: number of bins; ``clip(ceil(sqrt(N)), 5, 30)`` by default.

    Returns:
        An inline ``<svg>`` element.
    """
    scores = np.asarray(scores, dtype=np.float64)
    count = bins or int(np.clip(math.ceil(math.sqrt(scores.size)), 5, 30))
    low, high = float(scores.min()), float(scores.max())
    if math.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    edges = np.histogram_bin_edges(scores, bins=count, range=(low, high) if high > low else None)
    classes = [c for c in (0, 1, None) if any(label == c for label in labels)]
    stacks = {
        c: np.histogram(scores[[label == c for label in labels]], bins=edges)[0] for c in classes
    }
    y_ticks = _count_ticks(int(sum(stacks.values()).max()))
    frame = _Frame(
        (float(edges[0]), float(edges[-1])), (0.0, y_ticks[-1]), margins=(52, 14, 22, 40)
    )
    parts = [frame.open("Histogram of the sample scores after RsCon with the flag threshold")]
    if math.isfinite(threshold):
        tx = frame.x(threshold)
        parts.append(
            f'<rect x="{tx:.1f}" y="{frame.top}" width="{frame.x(edges[-1]) - tx:.1f}" '
            f'height="{frame.y(0) - frame.top:.1f}" fill="#ffe3e3"/>'
        )
    parts.append(_stacked_bars(frame, edges, stacks))
    parts.append(frame.axes("score after RsCon", "samples", y_ticks=y_ticks))
    if math.isfinite(threshold):
        parts.append(_threshold_line(frame, threshold))
    parts.append(_legend(frame, classes))
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(
    x: np.ndarray,
    y: np.ndarray,
    title: str,
    x_label: str,
    y_label: str,
    diagonal: bool = False,
    marker: tuple[float, float] | None = None,
) -> str:
    """A curve on the unit square (ROC or precision-recall).

    Args:
        x: (T,) abscissae in [0, 1].
        y: (T,) ordinates in [0, 1].
        title: accessible chart title.
        x_label: x axis title.
        y_label: y axis title.
        diagonal: draw the chance diagonal (ROC).
        marker: a point to highlight (e.g. the F1-max point), or None.

    Returns:
        An inline ``<svg>`` element.
    """
    frame = _Frame((0.0, 1.0), (0.0, 1.0), size=(300, 280))
    parts = [frame.open(title), frame.axes(x_label, y_label, ticks=6)]
    if diagonal:
        parts.append(
            f'<line x1="{frame.x(0):.1f}" y1="{frame.y(0):.1f}" x2="{frame.x(1):.1f}" '
            f'y2="{frame.y(1):.1f}" stroke="#adb5bd" stroke-dasharray="4 3"/>'
        )
    points = " ".join(
        f"{frame.x(float(a)):.1f},{frame.y(float(b)):.1f}" for a, b in zip(x, y, strict=True)
    )
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1971c2" stroke-width="2"/>')
    if marker is not None:
        mx, my = frame.x(marker[0]), frame.y(marker[1])
        parts.append(
            f'<circle cx="{mx:.1f}" cy="{my:.1f}" r="4.5" fill="#e8590c"><title>F1 maximum'
            f"</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def colour_bar_svg(low: float, high: float, pixel_threshold: float) -> str:
    """The line's heat-map colour scale with the pixel threshold marked.

    The colours are :mod:`tasks.reporting.colormap`'s inferno map.

    Args:
        low: map value at the bottom of the scale.
        high: map value at the top.
        pixel_threshold: marked on the bar when it lies inside ``[low, high]``.

    Returns:
        An inline ``<svg>`` element.
    """
    stops = inferno(np.linspace(0.0, 1.0, 11))
    gradient = "".join(
        f'<stop offset="{i / 10:.1f}" stop-color="rgb({r},{g},{b})"/>'
        for i, (r, g, b) in enumerate(stops.tolist())
    )
    frame = _Frame((low, high), (0.0, 1.0), size=(420, 76), margins=(64, 24, 20, 24))
    parts = [
        frame.open("Heat-map colour scale of the whole line"),
        f'<defs><linearGradient id="heat-scale">{gradient}</linearGradient></defs>',
        f'<rect x="{frame.left}" y="{frame.top}" width="{frame.x(high) - frame.left:.1f}" '
        f'height="{frame.y(0) - frame.top:.1f}" fill="url(#heat-scale)"/>',
        f'<text x="{frame.left - 6}" y="{(frame.top + frame.y(0)) / 2 + 3:.1f}" font-size="10" '
        'text-anchor="end">map value</text>',
    ]
    for value in (low, high):
        parts.append(
            f'<text x="{frame.x(value):.1f}" y="{frame.height - 12}" font-size="10" '
            f'text-anchor="middle">{_esc(_fmt(value))}</text>'
        )
    if math.isfinite(pixel_threshold) and low <= pixel_threshold <= high:
        px = frame.x(pixel_threshold)
        parts.append(
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{frame.top - 4}" y2="{frame.y(0) + 4:.1f}" '
            f'stroke="#212529" stroke-width="2"/><text x="{px:.1f}" y="{frame.top - 8}" '
            f'font-size="10" text-anchor="middle">pixel threshold {_esc(_fmt(pixel_threshold))}'
            "</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# sections


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()
) -> str:
    """A table from already escaped cell HTML; the ``numeric`` columns are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _header_section(data: ReportData) -> str:
    """Title, key facts and backbones; the random-weights banner when it applies."""
    flagged = sum(s.flagged for s in data.samples)
    facts = [
        ("run", _esc(data.run_id)),
        ("started", _esc(data.started)),
        ("run time", f"{data.seconds:.1f} s"),
        ("samples scored (N)", str(len(data.samples))),
        ("flagged", f"{flagged} of {len(data.samples)}"),
        ("set aside", str(len(data.set_aside))),
        ("modality", _esc(data.modality)),
    ]
    facts += [(f"backbone {_esc(k)}", _esc(v)) for k, v in data.backbones.items()]
    if data.history:
        absolute = "://" not in data.history and Path(data.history).is_absolute()
        href = Path(data.history).as_uri() if absolute else data.history
        facts.append(("line history", f'<a href="{_esc(href)}">all nights of the line</a>'))
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    banner = ""
    if data.drift_note:
        banner += (
            f'<p class="warn" role="alert"><strong>Drift:</strong> {_esc(data.drift_note)}</p>'
        )
    if data.random_weights:
        banner += (
            '<div class="banner-random" role="alert"><strong>Random backbone weights: results '
            f"are not meaningful.</strong><br>{_esc(RANDOM_WEIGHTS_WARNING)}</div>"
        )
    return (
        f'<header><h1>musc run report — {_esc(data.line)}</h1>{banner}<dl class="facts">'
        f"{items}</dl></header>"
    )


def _decision_section(data: ReportData, low: float, high: float) -> str:
    """Flag rule, thresholds, histogram of RsCon scores and the colour scale."""
    scores = np.array([s.score_rescored for s in data.samples])
    labels = [s.label for s in data.samples]
    note = ""
    if data.flag_note:
        note = (
            '<p class="warn" role="alert"><strong>No flag threshold for this batch:</strong> '
            f"{_esc(data.flag_note)}</p>"
        )
    return (
        '<section id="decision"><h2>Decision</h2>'
        f'<p class="rule">{_esc(data.flag_rule)}</p>{note}'
        f"<p>Flag threshold (score after RsCon): <strong>{_esc(_fmt(data.flag_threshold))}"
        f"</strong> · pixel threshold (anomaly map): <strong>"
        f"{_esc(_fmt(data.pixel_threshold))}</strong></p>"
        f'<div class="charts">{histogram_svg(scores, labels, data.flag_threshold)}'
        f"{colour_bar_svg(low, high, data.pixel_threshold)}</div></section>"
    )


def _label_text(sample: ReportSample) -> str:
    """``anomalous (crack)``, ``normal`` or ``—``, escaped."""
    if sample.label is None:
        return "—" if sample.defect_type is None else _esc(sample.defect_type)
    text = _CLASS_NAMES[int(sample.label)]
    if sample.defect_type:
        text += f" ({sample.defect_type})"
    return _esc(text)


def _verdict_badge(sample: ReportSample) -> str:
    """A badge for an operator's verdict (empty without one)."""
    if sample.verdict not in ("ok", "defect"):
        return ""
    text = "operator: ok" if sample.verdict == "ok" else "operator: defect"
    return f'<span class="badge {sample.verdict}">{text}</span>'


def _sample_card(rank: int, sample: ReportSample, low: float, high: float) -> str:
    """One sample: scores, label, verdict and its pictures (click one to enlarge it)."""
    side = FLAGGED_SIZE if sample.flagged else THUMB_SIZE
    figures = "".join(
        f'<figure><label class="zoom" title="click to enlarge"><input type="checkbox">'
        f'<img src="{png_data_uri(rgb)}" alt="{_esc(caption)} of {_esc(sample.name)}"'
        f' width="{rgb.shape[1]}" height="{rgb.shape[0]}"></label><figcaption>{_esc(caption)}'
        "</figcaption></figure>"
        for caption, rgb in sample_panels(sample, low, high, side)
    )
    badge = '<span class="badge flag">flagged</span>' if sample.flagged else ""
    return (
        f'<div class="card{" flagged" if sample.flagged else ""}"><h3>#{rank} '
        f"{_esc(sample.name)} {badge} {_verdict_badge(sample)}</h3><p>score after RsCon "
        f"<strong>{_esc(_fmt(sample.score_rescored))}</strong> · map maximum "
        f"{_esc(_fmt(sample.score))} · label {_label_text(sample)}</p>"
        f'<div class="panels">{figures}</div></div>'
    )


def _no_flag_text(data: ReportData) -> str:
    """What the flagged section says when nothing is flagged."""
    if data.flag_note:
        return (
            f'<p class="none warn">No sample flagged: the batch could not set a flag threshold '
            f"({_esc(data.flag_note)}).</p>"
        )
    return (
        f'<p class="none">No sample flagged: every score after RsCon is at or below the flag '
        f"threshold {_esc(_fmt(data.flag_threshold))}.</p>"
    )


def _samples_section(
    data: ReportData, order: list[int], max_samples: int, low: float, high: float
) -> str:
    """Flagged samples first and large; the others and the ranked table collapsed.

    Pictures are drawn for the first ``max_samples`` samples of the ranking (flagged first).
    """
    shown = order[:max_samples]
    flagged = [i for i in order if data.samples[i].flagged]
    others = [i for i in order if not data.samples[i].flagged]
    rank = {i: r for r, i in enumerate(order, 1)}
    legend = (
        '<p class="muted">Heat map (inferno, one colour scale for the whole line, see the '
        "Decision section) blended over the picture; outlines: cyan = predicted defect (pixel "
        "rule), magenta = ground truth. Click a picture to enlarge it.</p>"
    )
    flagged_cards = "".join(
        _sample_card(rank[i], data.samples[i], low, high) for i in flagged if i in shown
    )
    if not flagged:
        flagged_cards = _no_flag_text(data)
    elif len(flagged) > len([i for i in flagged if i in shown]):
        flagged_cards += (
            f'<p class="muted">Pictures of the first {max_samples} flagged samples; all are in '
            "the table below.</p>"
        )
    other_cards = "".join(
        _sample_card(rank[i], data.samples[i], low, high) for i in others if i in shown
    )
    pictured = len([i for i in others if i in shown])
    other_note = (
        f'<p class="muted">Pictures of the {pictured} most suspect of them.</p>'
        if pictured < len(others)
        else ""
    )
    rows = [
        [
            str(rank[i]),
            _esc(data.samples[i].name),
            _esc(_fmt(data.samples[i].score_rescored)),
            _esc(_fmt(data.samples[i].score)),
            "yes" if data.samples[i].flagged else "",
            _esc(data.samples[i].verdict or ""),
            _label_text(data.samples[i]),
        ]
        for i in order
    ]
    table = _table(
        ["rank", "name", "score after RsCon", "map maximum", "flagged", "verdict", "label"],
        rows,
        numeric=(0, 2, 3),
    )
    return (
        f'<section id="suspects"><h2>Flagged samples: {len(flagged)} of {len(order)}</h2>'
        f'{legend}<div class="cards">{flagged_cards}</div></section>'
        f'<section id="others"><details><summary>Other samples ({len(others)}, not flagged), '
        f'most suspect first</summary>{other_note}<div class="cards">{other_cards}</div>'
        "</details></section>"
        f'<section id="ranking"><details><summary>All {len(order)} samples, ranked</summary>'
        f"{table}</details></section>"
    )


def _metrics_section(data: ReportData) -> str:
    """Metrics table, F1-optimal threshold, ROC and PR curves (empty string without labels)."""
    labelled = [s for s in data.samples if s.label is not None]
    if not labelled:
        return ""
    metrics = data.metrics or {}
    table = (
        _table(["metric", "value"], [[_esc(k), _esc(_fmt(v))] for k, v in metrics.items()], (1,))
        if metrics
        else '<p class="muted">No metrics were computed.</p>'
    )
    f1_text = (
        f"<p>F1-optimal threshold on the score after RsCon: <strong>"
        f"{_esc(_fmt(data.f1_threshold))}</strong> (chosen with the labels, for comparison with "
        f"the flag threshold {_esc(_fmt(data.flag_threshold))}).</p>"
    )
    y = np.array([int(s.label) for s in labelled])
    scores = np.array([s.score_rescored for s in labelled])
    charts = '<p class="muted">ROC and PR curves need both normal and anomalous samples.</p>'
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, scores)
        precision, recall, cuts = precision_recall_curve(y, scores)
        marker = None
        if data.f1_threshold is not None and np.isin(data.f1_threshold, cuts):
            index = int(np.flatnonzero(cuts == data.f1_threshold)[0])
            marker = (float(recall[index]), float(precision[index]))
        charts = (
            '<div class="charts">'
            + curve_svg(fpr, tpr, "ROC curve", "false-positive rate", "true-positive rate", True)
            + curve_svg(
                recall, precision, "Precision-recall curve", "recall", "precision", marker=marker
            )
            + "</div>"
        )
    return (
        f'<section id="metrics"><h2>Metrics (labels present)</h2>{table}{f1_text}{charts}</section>'
    )


def _set_aside_section(data: ReportData) -> str:
    """Samples that could not be used, with the file and the problem."""
    if not data.set_aside:
        body = '<p class="muted">None: every sample was scored.</p>'
    else:
        body = _table(
            ["name", "file", "problem"],
            [[_esc(n), _esc(p), _esc(problem)] for n, p, problem in data.set_aside],
        )
    return f'<section id="set-aside"><h2>Samples set aside</h2>{body}</section>'


def _timings_section(data: ReportData) -> str:
    """Stage wall times with proportional bars."""
    longest = max(data.timings.values(), default=0.0) or 1.0
    rows = [
        [
            _esc(stage),
            f"{seconds:.2f}",
            f'<div class="bar" style="width:{200 * max(seconds, 0.0) / longest:.0f}px"></div>',
        ]
        for stage, seconds in data.timings.items()
    ]
    return (
        f'<section id="timings"><h2>Stage timings</h2>'
        f"{_table(['stage', 'seconds', ''], rows, (1,))}</section>"
    )


def _config_section(data: ReportData) -> str:
    """The configuration the line was scored with."""
    rows = [[_esc(k), _esc(v)] for k, v in data.config.items()]
    return (
        f'<section id="config"><h2>Configuration</h2>{_table(["field", "value"], rows)}</section>'
    )


def _map_range(data: ReportData) -> tuple[float, float]:
    """Minimum and maximum over every map of the line: the one shared colour scale.

    Raises:
        ValueError: without :attr:`ReportData.map_range` when a sample has no map.
    """
    if data.map_range is not None:
        return float(data.map_range[0]), float(data.map_range[1])
    maps = [s.anomaly_map for s in data.samples]
    if any(m is None for m in maps):
        raise ValueError("samples without an anomaly map need the report's map_range")
    if not maps:
        return 0.0, 1.0
    return float(min(np.min(m) for m in maps)), float(max(np.max(m) for m in maps))


# ------------------------------------------------------------------------------------------
# public entry points


def render_report(data: ReportData, max_samples: int = 40) -> str:
    """Render the self-contained HTML report of one line.

    Args:
        data: everything to show.
        max_samples: most samples shown with thumbnails (the ranked table lists all).

    Returns:
        The HTML document as a string.

    Raises:
        ValueError: when ``max_samples`` is negative, the line has no sample, or a sample
            shown with pictures (the first ``max_samples`` of the ranking) has no map.
    """
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    if not data.samples:
        raise ValueError("a report needs at least one scored sample")
    low, high = _map_range(data)
    order = rank_samples(data.samples)
    unmapped = [data.samples[i].name for i in order[:max_samples]
                if data.samples[i].anomaly_map is None]
    if unmapped:
        raise ValueError(f"samples shown with pictures need their anomaly map: {unmapped}")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    body = "".join(
        [
            _header_section(data),
            _samples_section(data, order, max_samples, low, high),
            _decision_section(data, low, high),
            _metrics_section(data),
            _set_aside_section(data),
            _timings_section(data),
            _config_section(data),
        ]
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>musc report — {_esc(data.line)}</title>"
        f'<link rel="icon" href="data:,"><style>{_CSS}</style></head>'
        f"<body><main>{body}</main></body></html>\n"
    )


def write_report(data: ReportData, url_or_path: str | Path, max_samples: int = 40) -> str:
    """Render the report and write it to a local file (parent folders are created).

    Args:
        data: everything to show.
        url_or_path: destination file, e.g. ``<out>/<category>/report.html``.
        max_samples: most samples shown with thumbnails.

    Returns:
        The path written, as a string.
    """
    path = Path(url_or_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(data, max_samples), encoding="utf-8")
    return str(path)
