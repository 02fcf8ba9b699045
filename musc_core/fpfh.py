"""Weight-free 3D group features: FPFH descriptors pooled over each group (docs/fpfh.md).

A plant without internet access cannot download the Point-MAE checkpoint. Classical point
descriptors need no weights and work well for 3D anomaly detection (Horwitz & Hoshen, "Back to
the feature", CVPR 2023), and everything after the backbone in MuSc-V2 (SNAMD, mutual scoring,
CAE, maps, RsCon) only needs one feature vector per point group. This module provides that
vector from Open3D's Fast Point Feature Histograms (Rusu et al., ICRA 2009).

Per sample, on its unit-sphere normalized foreground points:

1. Scale. The point spacing s is the median distance of a point to its nearest neighbour.
   Every radius below is a multiple of s, so the descriptor covers the same number of points
   whatever the image size (224 px and a 64 px test image give the same neighbourhoods in
   points, not in unit-sphere lengths).
2. Normals: Open3D ``estimate_normals`` over the points within ``normal_radius · s``,
   oriented towards −z (the camera of an organized XYZ map looks along +z, so that is the
   side the sensor saw).
3. FPFH: Open3D ``compute_fpfh_feature`` within ``radius · s``: 33 bins per point, three
   11-bin histograms of the angles between the point's normal and its neighbours' (each
   summing to 200: the point's own histogram plus its neighbours' distance-weighted one, so
   the descriptor sees about twice the radius). Both searches stop at
   :func:`neighbour_limit` points, so that the radius, not the limit, decides.
4. Pooling over each group's members (the IPG groups of :mod:`musc_core.grouping`, nearest
   members first): the mean of the first ``fraction · K`` members' descriptors (optionally
   with their element-wise max), or the centre's own descriptor.

Layers. The pipeline asks for as many layers as the Point-MAE blocks it would use (three by
default); FPFH has no blocks, so a layer is a (radius, pooling extent) pair. The default is
one radius of 4 spacings, pooled over the nearest quarter, half and all of each group: one
Open3D pass per sample (a second and third radius would double and triple the cost) and a
coarse-to-fine view of the group, as the transformer's blocks give. ``docs/fpfh.md`` measures
this against several radii and other poolings.

Everything is deterministic: Open3D's neighbour searches and per-point histograms do not
depend on the thread count, and pooling is a gather and a reduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import open3d as o3d
import torch

from musc_core.grouping import Grouping

FPFH_BINS = 33
POOLINGS = ("mean+max", "mean", "centre")
# Direction the normals are turned towards: an organized map's camera looks along +z.
_VIEW_DIRECTION = np.array([0.0, 0.0, -1.0])


def neighbour_limit(radius: float) -> int:
    """Most neighbours searched within ``radius`` point spacings: ``ceil(1.5 · π · radius²)``.

    A surface sampled at spacing s holds about π r² points within r·s of a point; the
    headroom keeps the radius, not the limit, in charge, while bounding the cost of a dense
    clump.
    """
    return int(math.ceil(1.5 * math.pi * radius * radius))


@dataclass(frozen=True)
class FpfhParams:
    """Settings of the FPFH backbone; all of them are part of its identity.

    A layer is an FPFH radius and a pooling extent: layer j uses ``radii[j]`` and pools the
    first ``fractions[j]`` of each group's members (a tuple of length 1 applies to every
    layer). Groups list their nearest points first, so a fraction below 1 pools a smaller
    patch around the centre.

    Attributes:
        normal_radius: radius of the normal estimation, in point spacings.
        radii: FPFH radius per layer, in point spacings.
        fractions: fraction of each group's members pooled per layer, in (0, 1].
        pooling: ``"mean+max"`` (66 channels), ``"mean"`` (33) or ``"centre"`` (the group
            centre's own descriptor, 33; ``fractions`` are then irrelevant).
    """

    normal_radius: float = 3.0
    radii: tuple[float, ...] = (4.0,)
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    pooling: str = "mean"

    def __post_init__(self) -> None:
        """Reject settings that cannot run, naming the field."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.radii or any(not r > 0 for r in self.radii):
            raise ValueError(f"radii must be positive point spacings, got {self.radii}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if len(self.radii) > 1 and len(self.fractions) > 1:
            if len(self.radii) != len(self.fractions):
                raise ValueError(
                    f"{len(self.radii)} radii and {len(self.fractions)} fractions: give one "
                    "of them once, or both once per layer"
                )
        if not self.normal_radius > 0:
            raise ValueError(f"normal_radius must be positive, got {self.normal_radius}")

    @property
    def num_layers(self) -> int:
        """Number of layers the backbone provides."""
        return max(len(self.radii), len(self.fractions))

    def layer(self, j: int) -> tuple[float, float]:
        """``(radius, fraction)`` of layer j (0-based)."""
        radius = self.radii[j] if len(self.radii) > 1 else self.radii[0]
        fraction = self.fractions[j] if len(self.fractions) > 1 else self.fractions[0]
        return radius, fraction

    @property
    def channels(self) -> int:
        """Channels of one layer's group features."""
        return 2 * FPFH_BINS if self.pooling == "mean+max" else FPFH_BINS

    @property
    def identity(self) -> str:
        """Name and every parameter, e.g. ``"fpfh:weight-free:n3-r4-f0.25,0.5,1-mean"``."""

        def join(values: tuple[float, ...]) -> str:
            return ",".join(f"{v:g}" for v in values)

        return (
            f"fpfh:weight-free:n{self.normal_radius:g}-r{join(self.radii)}"
            f"-f{join(self.fractions)}-{self.pooling}"
        )


def point_spacing(points: np.ndarray) -> float:
    """Median nearest-neighbour distance of a cloud.

    Args:
        points: (P, 3) float64 coordinates.

    Returns:
        The median over the points of the distance to their nearest other point, in the
        points' unit; coincident points (distance 0) are left out.

    Raises:
        ValueError: fewer than two distinct points.
    """
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    nearest = np.asarray(cloud.compute_nearest_neighbor_distance())
    nearest = nearest[nearest > 0]
    if nearest.size == 0:
        raise ValueError("FPFH needs at least two distinct points; all points coincide")
    return float(np.median(nearest))


def point_descriptors(
    points: np.ndarray,
    radii: Sequence[float],
    normal_radius: float,
    indices: np.ndarray | None = None,
) -> list[np.ndarray]:
    """FPFH descriptors of a cloud's points at several radii.

    Args:
        points: (P, 3) float64 unit-sphere normalized coordinates.
        radii: FPFH radii, in point spacings (:func:`point_spacing`).
        normal_radius: radius of the normal estimation, in point spacings.
        indices: (Q,) points to describe (their neighbourhoods use every point); None for all.

    Returns:
        One (Q, 33) float32 array per radius (Q = P without ``indices``); a point with no
        neighbour inside the radius gets zeros.

    Raises:
        ValueError: fewer than two distinct points, or non-finite coordinates.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected (P, 3) points, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("FPFH needs finite coordinates")
    spacing = point_spacing(points)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.estimate_normals(
        o3d.geometry.KDTreeSearchParamHybrid(
            radius=normal_radius * spacing, max_nn=neighbour_limit(normal_radius)
        ),
        fast_normal_computation=False,
    )
    cloud.orient_normals_to_align_with_direction(_VIEW_DIRECTION)
    wanted = (
        np.arange(points.shape[0], dtype=np.int64) if indices is None else np.asarray(indices)
    )
    out = []
    for radius in radii:
        search = o3d.geometry.KDTreeSearchParamHybrid(
            radius=radius * spacing, max_nn=neighbour_limit(radius)
        )
        feature = o3d.pipelines.registration.compute_fpfh_feature(cloud, search, wanted.tolist())
        out.append(np.asarray(feature.data, dtype=np.float32).T.copy())
    return out


def pool_groups(descriptors: torch.Tensor, members: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per group from its members' descriptors (a gather and reductions).

    Args:
        descriptors: (P, D) per-point descriptors.
        members: (G, K) long indices into the points; for ``"centre"`` pooling the first
            column must be the group's centre.
        pooling: ``"mean+max"`` → (G, 2D) ``[mean | max]``, ``"mean"`` → (G, D), ``"centre"``
            → (G, D) the descriptor of ``members[:, 0]``.

    Returns:
        The pooled group features, float32.
    """
    if pooling == "centre":
        return descriptors[members[:, 0]].float()
    gathered = descriptors[members]  # (G, K, D)
    mean = gathered.mean(dim=1)
    if pooling == "mean":
        return mean.float()
    if pooling != "mean+max":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return torch.cat([mean, gathered.amax(dim=1)], dim=1).float()


def group_features(
    points: torch.Tensor, grouping: Grouping, params: FpfhParams
) -> list[torch.Tensor]:
    """Pooled FPFH features of one sample's groups, one tensor per layer.

    Only the points some layer pools are described (their neighbourhoods still use every
    point), and each distinct radius is computed once.

    Args:
        points: (P, 3) unit-sphere normalized foreground points.
        grouping: the sample's groups (members index ``points``, nearest first).
        params: radii, pooling extents, pooling.

    Returns:
        One (G, C) float32 tensor per layer on ``points``' device, C = ``params.channels``.
    """
    members = grouping.members.to("cpu")
    size = members.shape[1]
    layers = [params.layer(j) for j in range(params.num_layers)]
    if params.pooling == "centre":
        members = grouping.centre_index.to("cpu")[:, None]
        counts = [1] * len(layers)
    else:
        counts = [max(1, round(fraction * size)) for _, fraction in layers]
        members = members[:, : max(counts)]
    used, local = torch.unique(members, return_inverse=True)
    radii = sorted({radius for radius, _ in layers})
    coords = points.detach().to("cpu", torch.float64).numpy()
    described = point_descriptors(coords, radii, params.normal_radius, used.numpy())
    by_radius = dict(zip(radii, (torch.from_numpy(d) for d in described), strict=True))
    return [
        pool_groups(by_radius[radius], local[:, :count], params.pooling).to(points.device)
        for (radius, _), count in zip(layers, counts, strict=True)
    ]


class FpfhFeatureExtractor:
    """FPFH group features with the interface of :class:`musc_core.point_mae.PointFeatureExtractor`.

    Attributes:
        params: the descriptor settings.
        identity: ``params.identity`` (cache keys and reports say "fpfh, weight-free").
        random_weights: always False: there are no weights.
    """

    random_weights = False

    def __init__(self, params: FpfhParams | None = None) -> None:
        """Create the extractor.

        Args:
            params: descriptor settings; None for the defaults.
        """
        self.params = params if params is not None else FpfhParams()
        self.identity = self.params.identity
        self._device = torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """Where the features are returned (the descriptors are computed on the CPU)."""
        return self._device

    def _check_layers(self, layers: Sequence[int]) -> None:
        if len(layers) != self.params.num_layers:
            raise ValueError(
                f"the FPFH backbone has {self.params.num_layers} layers "
                f"({self.params.identity}), {len(layers)} were asked for"
            )

    def extract(
        self,
        points: torch.Tensor,
        grouping: Grouping,
        layers: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Group features of one sample.

        Args:
            points: (P, 3) the sample's unit-sphere normalized foreground points.
            grouping: its groups.
            layers: the pipeline's layer numbers; the j-th gets layer j of the params.
            dtype: accepted for the call shared with Point-MAE; descriptors have no GEMM and
                are always computed in float32.

        Returns:
            One (G, C) float32 tensor per layer, on :attr:`device`.
        """
        return [t[0] for t in self.extract_many([points], [grouping], layers)]

    def extract_many(
        self,
        points: Sequence[torch.Tensor],
        groupings: Sequence[Grouping],
        layers: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Group features of several samples (each described on its own).

        Args:
            points: B tensors (P_b, 3), the samples' foreground points.
            groupings: their groups, all with the same G.
            layers: the pipeline's layer numbers; the j-th gets layer j of the params.
            dtype: as for :meth:`extract` (unused).

        Returns:
            One (B, G, C) float32 tensor per layer, on :attr:`device`.
        """
        if len(points) != len(groupings) or not points:
            raise ValueError(f"{len(points)} point sets for {len(groupings)} groupings")
        self._check_layers(layers)
        per_sample = [
            group_features(p, g, self.params) for p, g in zip(points, groupings, strict=True)
        ]
        shapes = {tuple(s[0].shape) for s in per_sample}
        if len(shapes) != 1:
            raise ValueError(f"samples must share G to be batched, got {sorted(shapes)}")
        return [
            torch.stack([s[j] for s in per_sample]).to(self._device)
            for j in range(len(layers))
        ]

    def to(self, device: torch.device | str) -> FpfhFeatureExtractor:
        """Return features on ``device`` from now on; returns self."""
        self._device = torch.device(device)
        return self
