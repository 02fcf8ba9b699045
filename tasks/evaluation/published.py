"""The MuSc-V2 paper's published means, to print beside ours (``musc eval``).

Transcribed from ``paper/musc-v2-paper.md`` (the MuSc-V2 paper): Table I (MVTec 3D-AD and
Eyecandies; 2D, 3D and multimodal; the whole dataset, and split into g = 2 or 3 subsets for
the multimodal ViT-B-8+PT setting, means over 10 seeds) and Table II (MVTec AD, VisA, MPDD,
BTAD; 2D, no PRO column, the backbone is not stated in the table). Values are the paper's, in
percent; ``None`` where the paper reports no value.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Columns of the paper's tables, in order: (key, header).
COLUMNS = (
    ("auroc_cls", "AUROC-cls"),
    ("f1_max_cls", "F1-max-cls"),
    ("ap_cls", "AP-cls"),
    ("auroc_seg", "AUROC-seg"),
    ("f1_max_seg", "F1-max-seg"),
    ("ap_seg", "AP-seg"),
    ("pro_30", "PRO@30%"),
)


@dataclass(frozen=True)
class PublishedRow:
    """One MuSc-V2 row of the paper's tables.

    Attributes:
        dataset: the dataset's ``--format`` name.
        modality: ``2d``, ``3d`` or ``2d+3d``.
        backbone: as the paper names it (``ViT-B-8``, ``ViT-L-14-336``, ``PT``, ``ViT-B-8+PT``,
            ...), or ``not stated``.
        subsets: g, the number of subsets the test set was split into (1: the whole set).
        values: the seven columns of :data:`COLUMNS` in percent (None: not reported).
        source: where the row is in the paper.
    """

    dataset: str
    modality: str
    backbone: str
    subsets: int
    values: tuple[float | None, ...]
    source: str

    def as_fractions(self) -> dict[str, float | None]:
        """The values by column key, as fractions in [0, 1] like our metrics."""
        return {
            key: None if value is None else round(value / 100.0, 4)
            for (key, _), value in zip(COLUMNS, self.values, strict=True)
        }


def _row(dataset: str, modality: str, backbone: str, subsets: int, values: tuple,
         source: str) -> PublishedRow:
    return PublishedRow(dataset, modality, backbone, subsets, tuple(values), source)


_T1 = "Table I"
_T2 = "Table II"
ROWS: tuple[PublishedRow, ...] = (
    _row("mvtec3d", "2d", "ViT-L-14-336", 1, (75.8, 90.3, 91.1, 98.0, 47.1, 41.7, 94.0),
         f"{_T1}, MVTec 3D-AD (2D modal), MuSc-V2 ViT-L-14-336"),
    _row("mvtec3d", "2d", "ViT-B-8", 1, (75.7, 90.5, 92.6, 98.2, 40.4, 34.7, 93.1),
         f"{_T1}, MVTec 3D-AD (2D modal), MuSc-V2 ViT-B-8"),
    _row("mvtec3d", "3d", "PT", 1, (83.7, 92.5, 94.4, 97.1, 45.9, 44.4, 88.4),
         f"{_T1}, MVTec 3D-AD (3D modal), MuSc-V2 PT"),
    _row("mvtec3d", "2d+3d", "ViT-B-8+PT", 1, (88.1, 93.0, 96.8, 99.0, 54.6, 54.7, 97.0),
         f"{_T1}, MVTec 3D-AD (Multimodal), MuSc-V2 ViT-B-8+PT"),
    _row("mvtec3d", "2d+3d", "ViT-B-8+PT", 2, (87.6, 92.7, 96.6, 99.0, 54.3, 54.4, 96.9),
         f"{_T1}, MVTec 3D-AD (Multimodal), MuSc-V2 (g=2) ViT-B-8+PT, mean of 10 seeds"),
    _row("mvtec3d", "2d+3d", "ViT-B-8+PT", 3, (87.2, 92.6, 96.4, 99.0, 53.6, 53.7, 96.8),
         f"{_T1}, MVTec 3D-AD (Multimodal), MuSc-V2 (g=3) ViT-B-8+PT, mean of 10 seeds"),
    _row("mvtec3d", "2d+3d", "ViT-L-14-336+PT", 1, (89.9, 93.6, 97.2, 98.8, 58.8, 60.0, 96.6),
         f"{_T1}, MVTec 3D-AD (Multimodal), MuSc-V2 ViT-L-14-336+PT"),
    _row("eyecandies", "2d", "ViT-L-14-336", 1, (85.1, 84.8, 87.4, 96.9, 44.0, 38.9, 89.4),
         f"{_T1}, Eyecandies (2D modal), MuSc-V2 ViT-L-14-336"),
    _row("eyecandies", "2d", "ViT-B-8", 1, (85.1, 81.8, 86.6, 97.4, 42.0, 36.8, 89.0),
         f"{_T1}, Eyecandies (2D modal), MuSc-V2 ViT-B-8"),
    _row("eyecandies", "3d", "PT", 1, (69.1, 72.1, 71.7, 89.8, 28.1, 21.4, 66.9),
         f"{_T1}, Eyecandies (3D modal), MuSc-V2 PT"),
    _row("eyecandies", "2d+3d", "ViT-B-8+PT", 1, (83.9, 82.9, 86.1, 97.5, 44.7, 41.8, 90.1),
         f"{_T1}, Eyecandies (Multimodal), MuSc-V2 ViT-B-8+PT"),
    _row("eyecandies", "2d+3d", "ViT-B-8+PT", 2, (83.5, 82.6, 85.8, 97.4, 44.4, 41.3, 89.8),
         f"{_T1}, Eyecandies (Multimodal), MuSc-V2 (g=2) ViT-B-8+PT, mean of 10 seeds"),
    _row("eyecandies", "2d+3d", "ViT-B-8+PT", 3, (83.4, 82.2, 85.5, 97.4, 43.8, 40.6, 89.8),
         f"{_T1}, Eyecandies (Multimodal), MuSc-V2 (g=3) ViT-B-8+PT, mean of 10 seeds"),
    _row("eyecandies", "2d+3d", "ViT-L-14-336+PT", 1, (85.9, 84.4, 87.6, 97.3, 46.2, 42.6, 90.9),
         f"{_T1}, Eyecandies (Multimodal), MuSc-V2 ViT-L-14-336+PT"),
    _row("mvtec", "2d", "not stated", 1, (97.7, 97.6, 99.1, 97.3, 63.1, 63.5, None),
         f"{_T2}, MVTec AD, MuSc-V2 (Ours)"),
    _row("visa", "2d", "not stated", 1, (91.9, 88.5, 92.8, 98.8, 50.4, 46.1, None),
         f"{_T2}, VisA, MuSc-V2 (Ours)"),
    _row("mpdd", "2d", "not stated", 1, (79.0, 83.6, 78.7, 97.5, 37.7, 32.6, None),
         f"{_T2}, MPDD, MuSc-V2 (Ours)"),
    _row("btad", "2d", "not stated", 1, (96.5, 96.1, 99.1, 97.5, 59.0, 57.3, None),
         f"{_T2}, BTAD, MuSc-V2 (Ours)"),
)


def backbone_family(timm_name: str) -> str | None:
    """The paper's name of a timm 2D backbone (``ViT-B-8``, ``ViT-L-14-336``), or None."""
    name = timm_name.lower()
    if "vit_base_patch8" in name:
        return "ViT-B-8"
    if "vit_large_patch14" in name and "336" in name:
        return "ViT-L-14-336"
    return None


def published_mean(
    dataset: str, modality: str, backbone_2d: str, subsets: int
) -> tuple[PublishedRow | None, str]:
    """The paper's row to compare a run with, and a note on how well it matches.

    The row of the same dataset, modality, 2D backbone and g is preferred; the paper reports
    g = 2, 3 only for the multimodal ViT-B-8+PT setting, and other settings fall back to its
    whole-dataset row (g = 1). A 2D backbone the paper did not use falls back to its default,
    DINO ViT-B-8.

    Args:
        dataset: ``--format`` name.
        modality: ``2d``, ``3d`` or ``2d+3d``.
        backbone_2d: our timm 2D backbone name.
        subsets: our g.

    Returns:
        The row (None when the paper has none for the dataset and modality) and a note (empty
        when it matches exactly).
    """
    family = backbone_family(backbone_2d)
    wanted = {"2d": family or "ViT-B-8", "3d": "PT", "2d+3d": f"{family or 'ViT-B-8'}+PT"}[
        modality
    ]
    rows = [r for r in ROWS if r.dataset == dataset and r.modality == modality]
    if not rows:
        return None, f"the paper reports no {modality} result for {dataset}"
    notes = []
    same_backbone = [r for r in rows if r.backbone in (wanted, "not stated")]
    if not same_backbone:
        same_backbone = rows
        notes.append(f"the paper reports no {wanted} row")
    elif family is None and modality != "3d" and same_backbone[0].backbone != "not stated":
        notes.append(f"{backbone_2d} is not a backbone of the paper; its default ViT-B-8 row")
    exact = [r for r in same_backbone if r.subsets == subsets]
    if not exact:
        exact = [r for r in same_backbone if r.subsets == 1]
        notes.append(f"the paper reports g={subsets} for no such row; its g=1 row")
    return exact[0], "; ".join(notes)
