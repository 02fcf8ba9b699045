"""Names and choices shared by the tasks and the ``musc`` command, importable at no cost.

The command line builds its parser (and answers ``--help``) from these without importing
PyTorch, Prefect or Dask.
"""

from __future__ import annotations

#: Dataset layouts :mod:`tasks.formats.datasets` reads.
FORMATS = ("mvtec3d", "eyecandies", "mvtec", "visa", "btad", "mpdd", "folder")
#: timm ViT of the 2D modality by default (DINO ViT-B/8, the paper's).
DEFAULT_BACKBONE_2D = "vit_base_patch8_224.dino"
#: 3D backbones: the Point-MAE transformer (default) and weight-free FPFH descriptors.
BACKBONES_3D = ("point-mae", "fpfh")
#: Object kinds of the synthetic generator (:mod:`tasks.synthetic.generator`): drawn from the seed
#: among
#: SYNTH_SHAPES unless one is named; SYNTH_NAMED_SHAPES only when named.
SYNTH_SHAPES = ("puck", "dome", "box")
SYNTH_NAMED_SHAPES = ("ribs",)
#: Smallest image side of a synthetic line (px).
SYNTH_MIN_IMAGE_SIZE = 32
#: Range of the synthetic camera's pixel pitch (mm between neighbouring pixels on the plane).
SYNTH_PITCH_RANGE_MM = (0.05, 1.0)
#: Range of the synthetic camera's distance to the support plane (metres).
SYNTH_DISTANCE_RANGE_M = (0.2, 1.0)
#: How a synthetic part sits in the frame: ``centred`` (inside, the default), ``touching`` (its
#: outline reaches one image border), ``crossing`` (cut off by one border, its top face reaching
#: it) or ``mixed`` (each sample drawn: half centred, a quarter touching, a quarter crossing).
SYNTH_FRAMINGS = ("centred", "touching", "crossing", "mixed")
#: Named synthetic lines like MVTec 3D-AD scans (:func:`tasks.synthetic.generator.preset_kwargs`).
SYNTH_PRESETS = (
    "mvtec3d-400", "mvtec3d-400-raw", "mvtec3d-800", "mvtec3d-800-raw", "mvtec3d-400-filling",
)
#: Operator verdicts on a scored sample (``musc verdict``).
VERDICTS = ("ok", "defect")
#: Storage root (feature cache, batch records) when none is given.
DEFAULT_STORAGE = "musc-store"
#: Shown wherever results computed with random weights appear.
RANDOM_WEIGHTS_WARNING = (
    "WARNING: random backbone weights were used: these scores, maps and metrics are NOT "
    "meaningful anomaly detection results (they exercise the pipeline only)."
)
