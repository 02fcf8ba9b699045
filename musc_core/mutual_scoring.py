"""Mutual scoring (MSM, paper §III-C, Eq. 7–11): the entry module of the section.

Everything §III-C computes is reached from here:

- pair distances ``d(i, m, j) = min_n ||F_i(m) − F_j(n)||`` (Eq. 7) between all samples of a
  batch (:func:`pair_distances`), between two sets of samples (:func:`pair_minima_untiled`, one
  pass over both sets; :func:`pair_minima_tiled`, the same in tiles of bounded memory) or of
  queries against a reference set (:func:`reference_distances`);
- Interval Average (Eq. 8, :func:`interval_average`);
- the patch scores of one sample against its references (:func:`sample_patch_scores`):
  Cross-modal Anomaly Enhancement when both modalities are scored (Eq. 10–11, implemented in
  :mod:`musc_core.cross_modal`), Interval Average and the mean over the layers.

The hot loop is the L×L distance block between two samples. It is one GEMM
(``||a||² + ||b||² − 2ab``): the row minima give ``d(i, ·, j)`` and the column minima
``d(j, ·, i)``, so every unordered pair of samples is computed once. A strip of samples (one
on the CPU, ``block`` on an accelerator) is multiplied with ``block`` samples at a time, so the
working memory is at most about ``(block * L)**2`` floats whatever N is; nothing of size
(N, L, N, L) is ever formed. On the CPU the GEMM writes into one reused buffer, and the minima
are taken on the integer view of the float bits (exact, see ``_order_keys``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from musc_core.config import interval_count
from musc_core.cross_modal import Projection, cross_modal_enhance
from musc_core.hardware import resolve_compute_dtype

# Elements per block of rows when norming the rounded features (a 4 MB float32 temporary).
_NORM_BLOCK_ELEMENTS = 1 << 20


class PairMinima(NamedTuple):
    """Nearest-patch distances between two blocks of samples.

    Attributes:
        a_to_b: (Ba, L, Bb) float32, ``[i, m, j] = min_n ||a_i(m) − b_j(n)||_2``.
        b_to_a: (Bb, L2, Ba) float32, ``[j, n, i] = min_m ||b_j(n) − a_i(m)||_2``.
    """

    a_to_b: torch.Tensor
    b_to_a: torch.Tensor


class _Prepared(NamedTuple):
    """Samples flattened and augmented for the distance GEMM (see ``_prepare``).

    Attributes:
        vectors: (B·L, C') vectors in the GEMM dtype, C' = C + extra columns, padded to 16.
        count: B, samples.
        length: L, patches per sample.
    """

    vectors: torch.Tensor
    count: int
    length: int


def resolve_distance_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """GEMM dtype of the pair distances for a config value and a device.

    Args:
        name: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (see
            :func:`musc_core.hardware.resolve_compute_dtype`: bfloat16 only where the device
            has native bf16; an explicit ``"bfloat16"`` elsewhere is refused).
        device: the device the features live on.

    Returns:
        ``torch.float32`` or ``torch.bfloat16``.
    """
    return resolve_compute_dtype(name, device, "distance_dtype")


def _prepare(features: torch.Tensor, dtype: torch.dtype, side: str) -> _Prepared:
    """Round samples to the GEMM dtype and fold the norms into the GEMM.

    The squared distance is a single dot product of augmented vectors,
    ``||a − b||² = [a, ||a||², 1] · [−2b, 1, ||b||²]``, so the GEMM writes squared distances
    directly and no pass over the block is needed to add the norms. The norms are those of the
    *rounded* vectors, so the identity holds for the vectors the GEMM actually multiplies.
    In bfloat16 each norm is carried as a hi + lo pair of bf16 numbers (about 16 significant
    bits); products of bf16 numbers are exact in float32, so the only rounding after the
    float32 accumulation is that of the result, which is *relative* to the squared distance
    itself (≈ 2⁻⁹) — small distances, the ones that matter, stay accurate.

    Args:
        features: (B, L, C) samples.
        dtype: GEMM dtype, float32 or bfloat16.
        side: ``"a"`` (left operand) or ``"b"`` (right operand, scaled by −2).

    Returns:
        The augmented vectors.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pair distances run in float32 or bfloat16, not {dtype}")
    count, length, channels = features.shape
    width = channels + (2 if dtype == torch.float32 else 4)
    vectors = features.new_empty((count * length, width + (-width) % 16), dtype=dtype)
    rounded = vectors[:, :channels]
    rounded.copy_(features.reshape(count * length, channels))
    norms = _squared_norms(rounded)
    ones = torch.ones_like(norms)
    if dtype == torch.float32:
        parts = [norms, ones]
    else:
        hi = norms.to(dtype)
        lo = (norms - hi.float()).to(dtype)
        parts = [hi, lo, ones.to(dtype), ones.to(dtype)]
    if side == "b":
        parts = parts[len(parts) // 2 :] + parts[: len(parts) // 2]
        rounded.mul_(-2)  # exact: a power of two
    vectors[:, channels:width] = torch.stack(parts, dim=-1)
    vectors[:, width:] = 0
    return _Prepared(vectors, count, length)


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """(R,) float32 squared norms of (R, C) rows, in blocks of rows.

    Blocks keep the float32 temporary of a bfloat16 input small (cache-resident, no fresh
    pages to fault in).
    """
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    step = max(1, _NORM_BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        torch.linalg.vector_norm(block, dim=-1, dtype=torch.float32, out=out[start : start + step])
    return out.square_()


def _mirror(left: _Prepared, channels: int) -> _Prepared:
    """The right-operand (``"b"``) vectors of the same samples as left-operand ones.

    Equal to ``_prepare(features, dtype, "b")``: the rounded vectors times −2 (exact) and the
    halves of the augmented columns swapped, without rounding or norming the samples again.
    """
    vectors = torch.empty_like(left.vectors)
    torch.mul(left.vectors[:, :channels], -2, out=vectors[:, :channels])
    extra = left.vectors[:, channels:]
    used = 2 if left.vectors.dtype == torch.float32 else 4
    vectors[:, channels : channels + used] = extra[:, :used].roll(used // 2, dims=1)
    vectors[:, channels + used :] = 0
    return _Prepared(vectors, left.count, left.length)


def _strip(device: torch.device, block: int) -> int:
    """Left-operand samples per GEMM.

    On the CPU one sample at a time: its L × (block·L2) distance tile stays in the last-level
    cache for the two minimum passes that follow the GEMM, and the GEMM is still large enough to
    run at the machine's matmul peak. On an accelerator ``block`` samples (fewer, larger
    kernels).
    """
    return 1 if device.type == "cpu" else block


def _chunks(start: int, stop: int, block: int) -> list[tuple[int, int]]:
    """Split [start, stop) into ceil(len / block) ranges of near-equal length (≤ block)."""
    total = stop - start
    if total <= 0:
        return []
    count = -(-total // block)
    bounds = [start + (total * part) // count for part in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _squared_distances(a: _Prepared, b: _Prepared, buffer: torch.Tensor | None) -> torch.Tensor:
    """(Ba·L, Bb·L2) squared distances, float32 or (CPU bf16) bfloat16.

    In bfloat16 the products of the rounded operands are exact in float32 and are accumulated
    in float32 on every device; on the CPU the result is then rounded once to bfloat16 (torch
    has no bf16 GEMM with a float32 output there). That holds for oneDNN's kernels on
    AVX512-BF16/AMX and for torch's fallback kernel on AVX2 (which is slow, so the pipeline only
    uses bf16 where it is native; see :mod:`musc_core.hardware`). The rounding is relative to
    the squared distance itself (≤ 2⁻⁹), never to the norms that cancel in it.

    Args:
        a: left samples.
        b: right samples.
        buffer: flat GEMM-dtype storage of at least Ba·L·Bb·L2 elements to write the result
            into (reused across calls: no fresh pages to fault in), or None.
    """
    if a.vectors.is_cuda and a.vectors.dtype == torch.bfloat16:
        try:  # bf16 inputs, fp32 accumulation and fp32 output in one cuBLAS call
            return torch.mm(a.vectors, b.vectors.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    # float32, or bf16 inputs with fp32 accumulation and a bf16 result
    if buffer is None:
        return torch.mm(a.vectors, b.vectors.T)
    rows, cols = a.vectors.shape[0], b.vectors.shape[0]
    return torch.mm(a.vectors, b.vectors.T, out=buffer[: rows * cols].view(rows, cols))


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """The bits of float32/bfloat16 values as signed integers of the same width (a view).

    For non-negative floats (+0 to +inf) the integer order is the float order, and every
    negative float (−0 included) is a negative integer. Minima taken on the integers and then
    clamped at 0 therefore equal the clamped float minima exactly; integer minima are plain
    vector instructions, while bfloat16 minima are converted element by element on the CPU.
    """
    return values.view(torch.int16 if values.element_size() == 2 else torch.int32)


def _distances(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 distances from minima of squared distances given as ``_order_keys``."""
    return keys.view(dtype).float().clamp_min_(0.0).sqrt_()


def _minima(
    a: _Prepared, b: _Prepared, both: bool, buffer: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and optionally column) minima of the distance block, as float32 distances.

    Returns:
        (Ba, L, Bb) row minima and, with ``both``, (Bb, L2, Ba) column minima.
    """
    block = _squared_distances(a, b, buffer)
    keys = _order_keys(block)
    rows = keys.view(a.count, a.length, b.count, b.length).amin(dim=-1)
    rows = _distances(rows, block.dtype)  # (Ba, L, Bb)
    if not both:
        return rows, None
    cols = keys.view(a.count, a.length, b.count * b.length).amin(dim=1)
    cols = _distances(cols, block.dtype).view(a.count, b.count, b.length).permute(1, 2, 0)
    return rows, cols


def _buffer(left: _Prepared, strip: int, length: int, block: int) -> torch.Tensor | None:
    """GEMM output storage for strips of ``strip`` samples against ``block`` samples (CPU)."""
    if left.vectors.is_cuda:
        return None
    size = strip * left.length * block * length
    return left.vectors.new_empty(size)


def pair_minima_untiled(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> PairMinima:
    """Nearest-patch distances in both directions between two sets of samples, untiled (Eq. 7).

    Both sets are multiplied whole (no tiling of ``b``: see :func:`pair_minima_tiled` for a
    bounded working memory). Every squared distance ``||a||² + ||b||² − 2ab`` comes out of a
    GEMM (the norms ride in two to four extra GEMM columns); minima are taken on both sides,
    clamped at 0, and only the minima are square-rooted. In bfloat16 the inputs are rounded
    once, the norms are computed from the rounded vectors and the products are accumulated in
    float32. On the CPU the samples of ``a`` are multiplied with all of ``b`` one at a time
    (see ``_strip``), so the working memory is L·Bb·L2 GEMM outputs.

    Args:
        a: (Ba, L, C) features.
        b: (Bb, L2, C) features.
        dtype: GEMM dtype, ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        Both directions' minima, float32, on the inputs' device.
    """
    left, right = _prepare(a, dtype, "a"), _prepare(b, dtype, "b")
    strip = _strip(a.device, left.count)
    buffer = _buffer(left, strip, right.length, right.count)
    a_to_b = torch.empty((left.count, left.length, right.count), device=a.device)
    b_to_a = torch.empty((right.count, right.length, left.count), device=a.device)
    for s0, s1 in _chunks(0, left.count, strip):
        rows, cols = _minima(_slice(left, s0, s1), right, True, buffer)
        a_to_b[s0:s1] = rows
        b_to_a[:, :, s0:s1] = cols
    return PairMinima(a_to_b, b_to_a)


def _slice(p: _Prepared, start: int, stop: int) -> _Prepared:
    return _Prepared(p.vectors[start * p.length : stop * p.length], stop - start, p.length)


def pair_distances(features: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Nearest-patch distances between all ordered pairs of samples of a batch (Eq. 7).

    Every unordered pair is computed once: a strip of samples (one on the CPU, ``block`` on an
    accelerator; see ``_strip``) is multiplied with the samples after it, ``block`` at a
    time, and inside a strip each sample with the samples after it.

    Args:
        features: (N, L, C) features of one layer.
        block: samples per side of one GEMM block; memory ≈ ``(block * L)**2`` floats at most.
        dtype: GEMM dtype, ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        (N, L, N) float32 ``D[i, m, j] = min_n ||F_i(m) − F_j(n)||_2``, ``+inf`` where j == i.
    """
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    n, length, _ = features.shape
    out = torch.full((n, length, n), math.inf, dtype=torch.float32, device=features.device)
    left = _prepare(features, dtype, "a")
    right = _mirror(left, features.shape[-1])
    strip = _strip(features.device, block)
    buffer = _buffer(left, strip, length, block)
    for s0, s1 in _chunks(0, n, strip):
        for i in range(s0, s1 - 1):  # inside the strip: sample i against the ones after it
            rows, cols = _minima(_slice(left, i, i + 1), _slice(right, i + 1, s1), True, buffer)
            out[i, :, i + 1 : s1] = rows[0]
            out[i + 1 : s1, :, i] = cols[..., 0]
        for t0, t1 in _chunks(s1, n, block):
            rows, cols = _minima(_slice(left, s0, s1), _slice(right, t0, t1), True, buffer)
            out[s0:s1, :, t0:t1] = rows
            out[t0:t1, :, s0:s1] = cols
    return out


def reference_distances(
    queries: torch.Tensor, references: torch.Tensor, block: int, dtype: torch.dtype
) -> torch.Tensor:
    """Nearest-patch distances of query samples against an explicit reference set (Eq. 7).

    Args:
        queries: (Nq, L, C) features of the samples being scored.
        references: (R, L2, C) features of the reference samples (e.g. a rolling bank). A
            query that is also a reference is not detected: the caller excludes it (set the
            entry to ``+inf``) if needed.
        block: samples per side of one GEMM block.
        dtype: GEMM dtype, ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        (Nq, L, R) float32 ``D[i, m, j] = min_n ||Q_i(m) − R_j(n)||_2``.
    """
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    nq, length, _ = queries.shape
    nr = references.shape[0]
    out = torch.empty((nq, length, nr), dtype=torch.float32, device=queries.device)
    q_all, r_all = _prepare(queries, dtype, "a"), _prepare(references, dtype, "b")
    strip = _strip(queries.device, block)
    buffer = _buffer(q_all, strip, r_all.length, block)
    for s0, s1 in _chunks(0, nq, strip):
        q = _slice(q_all, s0, s1)
        for t0, t1 in _chunks(0, nr, block):
            out[s0:s1, :, t0:t1] = _minima(q, _slice(r_all, t0, t1), False, buffer)[0]
    return out


def interval_average(distances: torch.Tensor, ratio: float) -> torch.Tensor:
    """Interval Average (Eq. 8): mean of the smallest pair scores of each patch.

    Args:
        distances: (N, L, R) pair scores; non-finite entries (``+inf`` on the diagonal of a
            batch) are excluded references.
        ratio: fraction of the valid references averaged (paper: 0.3).

    Returns:
        (N, L) mean of the ``k = max(1, floor(ratio * R_valid))`` smallest valid values, where
        R_valid is the number of finite entries of the row (N − 1 for a batch).
    """
    r = distances.shape[-1]
    valid = torch.isfinite(distances)
    counts = valid.sum(dim=-1)
    if r == 0 or bool((counts == 0).any()):
        raise ValueError("every patch needs at least one finite reference distance")
    table = [0] + [interval_count(v, ratio) for v in range(1, r + 1)]
    k = torch.tensor(table, device=distances.device)[counts]  # (N, L)
    k_max = int(k.max())
    clean = distances.float().masked_fill(~valid, math.inf)
    smallest = torch.topk(clean, k_max, dim=-1, largest=False, sorted=True).values
    keep = torch.arange(k_max, device=distances.device) < k[..., None]
    return smallest.masked_fill(~keep, 0.0).sum(dim=-1) / k


def pair_minima_tiled(
    a: torch.Tensor, b: torch.Tensor, block: int, dtype: torch.dtype
) -> PairMinima:
    """Nearest-patch distances in both directions between two sets of samples, tiled.

    The same numbers as :func:`pair_minima_untiled` (which multiplies the whole sets at once,
    its memory growing with both set sizes), but computed in tiles of at most ``block`` samples
    per side, so the working memory is about ``(block * L)**2`` floats however many samples
    the sets hold (a pipeline shard holds tens).

    Args:
        a: (Ba, L, C) features.
        b: (Bb, L2, C) features.
        block: samples per side of one GEMM tile.
        dtype: GEMM dtype, ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        ``a_to_b`` (Ba, L, Bb) and ``b_to_a`` (Bb, L2, Ba), float32.
    """
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    a_to_b = torch.empty((a.shape[0], a.shape[1], b.shape[0]), dtype=torch.float32, device=a.device)
    b_to_a = torch.empty((b.shape[0], b.shape[1], a.shape[0]), dtype=torch.float32, device=a.device)
    for s0 in range(0, a.shape[0], block):
        s1 = min(a.shape[0], s0 + block)
        for t0 in range(0, b.shape[0], block):
            t1 = min(b.shape[0], t0 + block)
            tile = pair_minima_untiled(a[s0:s1], b[t0:t1], dtype)
            a_to_b[s0:s1, :, t0:t1] = tile.a_to_b
            b_to_a[t0:t1, :, s0:s1] = tile.b_to_a
    return PairMinima(a_to_b, b_to_a)


class PatchScores(NamedTuple):
    """Patch scores of one sample.

    Attributes:
        scores_2d: (M,) 2D patch scores, or None when images are not scored.
        scores_3d: (G,) 3D group scores, or None when point clouds are not scored.
    """

    scores_2d: torch.Tensor | None
    scores_3d: torch.Tensor | None


def _interval_mean(layers: torch.Tensor, ratio: float) -> torch.Tensor:
    """Interval Average of each layer's (L, R) pair scores, then the layer mean: (L,)."""
    return interval_average(layers, ratio).mean(0)


def sample_patch_scores(
    distances_2d: torch.Tensor | None,
    distances_3d: torch.Tensor | None,
    projection: Projection | None,
    ratio: float,
) -> PatchScores:
    """Patch scores of one sample against R references (Eq. 8–11).

    With both modalities every layer's pair scores go through CAE (Eq. 10–11) before Interval
    Average; with one modality Interval Average applies directly. The layer mean follows.

    Args:
        distances_2d: (Y, M, R) 2D pair distances ``d(i, m, j)`` of the sample's M patches to
            each of the R references, one slice per layer (Y layers); or None.
        distances_3d: (Y, G, R) 3D pair distances against the same references in the same
            order; or None.
        projection: the sample's 2D↔3D projection lists (needed with both modalities).
        ratio: Interval Average fraction of the references.

    Returns:
        The sample's patch scores per modality.
    """
    if distances_2d is None and distances_3d is None:
        raise ValueError("sample_patch_scores needs the distances of at least one modality")
    if distances_2d is None or distances_3d is None:
        only = distances_2d if distances_2d is not None else distances_3d
        scores = _interval_mean(only, ratio)
        return PatchScores(scores, None) if distances_2d is not None else PatchScores(None, scores)
    if projection is None:
        raise ValueError("2D+3D scoring needs the sample's projection lists")
    if distances_2d.shape[0] != distances_3d.shape[0]:
        raise ValueError(
            f"2D has {distances_2d.shape[0]} layers, 3D {distances_3d.shape[0]}: they are fused "
            "layer by layer"
        )
    e2, e3 = cross_modal_enhance(distances_2d, distances_3d, projection)
    return PatchScores(_interval_mean(e2, ratio), _interval_mean(e3, ratio))
