"""MuSc-V2 hyperparameters: one frozen dataclass holding the paper's defaults (docs/method.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

MODALITIES = ("2d", "3d", "2d+3d")
DISTANCE_DTYPES = ("auto", "float32", "bfloat16")
BATCHNORM_MODES = ("sample", "running")
REFERENCE_CHOICES = ("similar", "cycle")
SUPPORT_PLANE_MODES = ("auto", "remove", "keep")


def setting(
    default: Any, help: str, range: str | None = None, choices: tuple[str, ...] | None = None
) -> Any:
    """A :class:`MuscConfig` field: its default and what the command line and the flows show.

    Args:
        default: the paper's value (immutable: numbers, strings, tuples).
        help: one line saying what the setting does.
        range: the allowed values in words (checked by :meth:`MuscConfig.__post_init__`).
        choices: the allowed values of a string setting.

    Returns:
        A dataclass field whose ``metadata`` holds ``help``, ``range`` and ``choices``.
    """
    return field(default=default, metadata={"help": help, "range": range, "choices": choices})


@dataclass(frozen=True)
class MuscConfig:
    """Everything that changes what MuSc-V2 computes, with the paper's defaults.

    Attributes:
        modality: ``"2d"``, ``"3d"`` or ``"2d+3d"``.
        image_size: side of the square images and XYZ maps after resizing, in pixels.
        layers_2d: 1-based ViT blocks whose patch tokens are used.
        layers_3d: 1-based point-transformer blocks whose group tokens are used.
        num_groups: G, number of point groups (3D patches) per sample.
        group_size: K, points per group.
        ipg_step: K_iter, points added per IPG iteration (and the initial group size).
        curvature_threshold: C_thr; centres at or above it are regrouped by IPG and keep
            their own token in 3D SNAMD.
        aggregation_degrees: SNAMD neighbourhood degrees r.
        interval_ratio: fraction of the references averaged by Interval Average.
        rescoring_windows: RsCon window sizes k (1 keeps the sample's own score).
        salient_layer: 0-based index into the layer tuples of the layer whose SNAMD
            features form the anomaly-salient feature (the paper's penultimate stage).
        pair_block: samples per side of one pair-scoring block; bounds the memory of the
            distance kernel (``(pair_block * M)**2`` floats) independently of N.
        distance_dtype: GEMM dtype of the pair distances; ``"auto"`` picks bfloat16 where
            the device has fast bf16 kernels (CUDA, CPUs with AVX512-BF16/AMX), else float32;
            an explicit ``"bfloat16"`` on a device without them is refused when the run
            resolves it (:func:`musc_core.hardware.resolve_compute_dtype`).
        vit_dtype: compute dtype of the 2D backbone's forward pass (bfloat16 autocast with
            float32 outputs, or float32); ``"auto"`` as for ``distance_dtype``.
        point_dtype: GEMM dtype of Point-MAE (``"auto"`` as for ``distance_dtype``). In
            bfloat16 only the matrix products round their operands (float32 accumulation);
            the BatchNorm statistics, max-pools, LayerNorms and the residual stream stay
            float32, which keeps 3D maps within 0.2% of their float32 range. (Autocasting the
            whole model instead rounds each convolution's output, bias included, before its
            BatchNorm subtracts the mean: that moved 3D maps by ~7%.)
        point_batchnorm: ``"sample"`` normalizes the Point-MAE BatchNorms with each sample's
            own statistics (reference behaviour), ``"running"`` with the checkpoint's.
        map_blur_sigma: standard deviation, in pixels, of the Gaussian blur of 3D maps.
        reference_choice: which R references a sample gets under a reference budget
            (:mod:`musc_core.references`): ``"similar"`` lays each batch out in blocks of alike
            samples (a nearest-neighbour tour of a global descriptor) and takes the most
            similar blocks first; ``"cycle"`` takes the blocks nearest on a cycle of the
            content-ordered blocks (an arbitrary draw). No effect without a budget.
        flag_mad_k: decisions without labels (:mod:`musc_core.decisions`): a sample is flagged
            when its RsCon score exceeds median + k·1.4826·MAD of the run's normal-looking
            RsCon scores (``flag_outliers``), a pixel is predicted defective above median +
            k·1.4826·MAD of the per-sample map maxima; k > 0, 3 robust standard deviations by
            default. Changes no score or map.
        support_plane: the support plane of MVTec 3D-AD scans
            (:func:`musc_core.preprocess_points.clean_mvtec3d`): ``"remove"`` fits it to the
            10-pixel border and removes it (raw scans, the authors' release), ``"keep"`` never
            does (pre-cleaned parts), ``"auto"`` removes it when a plane fitted to the border
            fills the border and the points off it lie mostly in front of it (towards the
            sensor), so the top face of a pre-cleaned part that reaches the border is kept.
    """

    modality: str = setting("2d+3d", "modalities scored", choices=MODALITIES)
    image_size: int = setting(224, "side of the images and XYZ maps after resizing (px)", "> 0")
    layers_2d: tuple[int, ...] = setting(
        (4, 8, 12), "1-based ViT blocks whose patch tokens are used", "each > 0"
    )
    layers_3d: tuple[int, ...] = setting(
        (4, 8, 12), "1-based point-transformer blocks whose group tokens are used", "each > 0"
    )
    num_groups: int = setting(1024, "G: point groups (3D patches) per sample", "> 0")
    group_size: int = setting(128, "K: points per group", "> 1")
    ipg_step: int = setting(80, "K_iter: points added per IPG iteration", "(0, group_size]")
    curvature_threshold: float = setting(
        0.01, "C_thr: centres at or above it are regrouped by IPG"
    )
    aggregation_degrees: tuple[int, ...] = setting(
        (1, 3, 5), "SNAMD neighbourhood degrees r", "odd, > 0"
    )
    interval_ratio: float = setting(
        0.3, "fraction of the references averaged by Interval Average", "(0, 1]"
    )
    rescoring_windows: tuple[int, ...] = setting(
        (1, 7), "RsCon window sizes k (1 keeps the own score)", "each > 0"
    )
    salient_layer: int = setting(
        1, "0-based index into the layers of the anomaly-salient feature's layer",
        "[0, number of layers)",
    )
    pair_block: int = setting(8, "samples per side of one pair-distance kernel block", "> 0")
    distance_dtype: str = setting(
        "auto", "pair-distance GEMM dtype (auto: bfloat16 where fast)", choices=DISTANCE_DTYPES
    )
    vit_dtype: str = setting(
        "auto", "ViT compute dtype (auto: bfloat16 where fast)", choices=DISTANCE_DTYPES
    )
    point_dtype: str = setting(
        "auto", "Point-MAE GEMM dtype (auto: bfloat16 where fast)", choices=DISTANCE_DTYPES
    )
    point_batchnorm: str = setting(
        "sample", "Point-MAE BatchNorm statistics: each sample's or the checkpoint's",
        choices=BATCHNORM_MODES,
    )
    map_blur_sigma: float = setting(4.0, "Gaussian blur of 3D maps, standard deviation (px)")
    reference_choice: str = setting(
        "similar", "references under a budget: the most similar blocks, or the next on a cycle",
        choices=REFERENCE_CHOICES,
    )
    flag_mad_k: float = setting(
        3.0, "k of the flag rule: median + k·1.4826·MAD of the RsCon scores", "> 0, finite"
    )
    support_plane: str = setting(
        "auto",
        "MVTec 3D-AD support plane: auto (removed when it fills the border behind the part), "
        "remove (raw scans), keep (pre-cleaned parts)",
        choices=SUPPORT_PLANE_MODES,
    )

    def __post_init__(self) -> None:
        """Reject settings that cannot run, naming the field."""
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        for name in ("distance_dtype", "vit_dtype", "point_dtype"):
            if getattr(self, name) not in DISTANCE_DTYPES:
                raise ValueError(
                    f"{name} must be one of {DISTANCE_DTYPES}, got {getattr(self, name)!r}"
                )
        if self.reference_choice not in REFERENCE_CHOICES:
            raise ValueError(
                f"reference_choice must be one of {REFERENCE_CHOICES}, "
                f"got {self.reference_choice!r}"
            )
        if self.support_plane not in SUPPORT_PLANE_MODES:
            raise ValueError(
                f"support_plane must be one of {SUPPORT_PLANE_MODES}, got {self.support_plane!r}"
            )
        if self.point_batchnorm not in BATCHNORM_MODES:
            raise ValueError(
                f"point_batchnorm must be one of {BATCHNORM_MODES}, got {self.point_batchnorm!r}"
            )
        if not 0.0 < self.interval_ratio <= 1.0:
            raise ValueError(f"interval_ratio must be in (0, 1], got {self.interval_ratio}")
        for name in ("image_size", "num_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.group_size <= 1:
            raise ValueError(f"group_size must be greater than 1, got {self.group_size}")
        if not 0 < self.ipg_step <= self.group_size:
            raise ValueError(f"ipg_step must be in (0, group_size], got {self.ipg_step}")
        if any(r <= 0 or r % 2 == 0 for r in self.aggregation_degrees):
            raise ValueError(
                f"aggregation_degrees must be odd and positive: {self.aggregation_degrees}"
            )
        if any(k <= 0 for k in self.rescoring_windows):
            raise ValueError(f"rescoring_windows must be positive: {self.rescoring_windows}")
        for name in ("layers_2d", "layers_3d"):
            layers = getattr(self, name)
            if not layers or any(x <= 0 for x in layers):
                raise ValueError(f"{name} must hold 1-based block numbers: {layers}")
            if not 0 <= self.salient_layer < len(layers):
                raise ValueError(f"salient_layer {self.salient_layer} is outside {name}={layers}")
        if self.pair_block <= 0:
            raise ValueError(f"pair_block must be positive, got {self.pair_block}")
        if not (math.isfinite(self.flag_mad_k) and self.flag_mad_k > 0):
            raise ValueError(f"flag_mad_k must be positive and finite, got {self.flag_mad_k}")

    @property
    def uses_2d(self) -> bool:
        """Whether images are scored."""
        return self.modality in ("2d", "2d+3d")

    @property
    def uses_3d(self) -> bool:
        """Whether point clouds are scored."""
        return self.modality in ("3d", "2d+3d")

    def as_dict(self) -> dict[str, object]:
        """Plain dictionary of every field, for reports and cache keys."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def interval_count(num_references: int, ratio: float) -> int:
    """Number of smallest pair scores averaged by Interval Average.

    Args:
        num_references: R, references each sample is scored against (N - 1 for a batch).
        ratio: the Interval Average fraction (0.3 in the paper).

    Returns:
        ``max(1, floor(ratio * R))`` (paper Eq. 8; the authors' release forgets the ``max``).
    """
    if num_references < 1:
        raise ValueError("mutual scoring needs at least one reference sample")
    return max(1, int(ratio * num_references + 1e-9))
