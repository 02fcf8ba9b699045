"""Every setting of the flows, declared once: type, default, range and a one-line help.

The flows take these models as their parameters (Prefect renders them as typed forms and
validates ``--param``/``--params`` and ``prefect.yaml`` against them); the ``musc`` command
builds its options from the same fields (:mod:`flows.options`), so no default is written
twice. The algorithm settings are :class:`musc_core.config.MuscConfig`'s own fields
(:class:`Algorithm` is generated from them); the run settings are declared here.

An invalid value is refused naming its field, never clamped. Importing this module costs
pydantic only (no PyTorch, Prefect or Dask): ``musc --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from musc_core.config import MuscConfig
from tasks.choices import (
    BACKBONES_3D,
    DEFAULT_BACKBONE_2D,
    DEFAULT_STORAGE,
    FORMATS,
    SYNTH_DISTANCE_RANGE_M,
    SYNTH_FRAMINGS,
    SYNTH_MIN_IMAGE_SIZE,
    SYNTH_NAMED_SHAPES,
    SYNTH_PITCH_RANGE_MM,
    SYNTH_PRESETS,
    SYNTH_SHAPES,
)

DataFormat = Literal[FORMATS]  # type: ignore[valid-type]
Backbone3D = Literal[BACKBONES_3D]  # type: ignore[valid-type]
SynthShape = Literal[SYNTH_SHAPES + SYNTH_NAMED_SHAPES]  # type: ignore[valid-type]
SynthFraming = Literal[SYNTH_FRAMINGS]  # type: ignore[valid-type]
SynthPreset = Literal[SYNTH_PRESETS]  # type: ignore[valid-type]
_OWN_DEFAULT = re.compile(r" \(default: [^)]*\)$")


class Settings(BaseModel):
    """Base of every settings model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AlgorithmBase(Settings):
    """Base of :class:`Algorithm`: validated by :class:`MuscConfig` itself."""

    @model_validator(mode="after")
    def _valid(self) -> AlgorithmBase:
        self.to_config()
        return self

    def to_config(self) -> MuscConfig:
        """The core's settings object.

        Raises:
            ValueError: a value :class:`MuscConfig` refuses (the message names the field).
        """
        return MuscConfig(**{name: getattr(self, name) for name in type(self).model_fields})


def _algorithm_fields() -> dict[str, tuple[object, object]]:
    """``create_model`` field definitions from :class:`MuscConfig`'s declarations."""
    hints = typing.get_type_hints(MuscConfig)
    out: dict[str, tuple[object, object]] = {}
    for item in dataclasses.fields(MuscConfig):
        meta = item.metadata
        annotation = Literal[meta["choices"]] if meta["choices"] else hints[item.name]
        text = meta["help"] + (f"; range {meta['range']}" if meta["range"] else "")
        out[item.name] = (annotation, Field(item.default, description=text))
    return out


Algorithm = create_model(
    "Algorithm",
    __base__=AlgorithmBase,
    __doc__="MuSc-V2's settings, with the paper's defaults (musc_core.config.MuscConfig).",
    **_algorithm_fields(),  # type: ignore[arg-type]
)


def algorithm_from(config: MuscConfig) -> AlgorithmBase:
    """The :class:`Algorithm` model holding ``config``'s values."""
    return Algorithm(**config.as_dict())


class LineInput(Settings):
    """The samples of one run of a line: where they are and how they are laid out."""

    data: str = Field(
        description="dataset root: a local path, or an s3://bucket/prefix or other fsspec URL"
    )
    data_format: DataFormat = Field("mvtec3d", description="dataset layout")
    category: str | None = Field(
        None, description="the category to score (default: the dataset's only one)"
    )
    line: str | None = Field(
        None, description="the line's name in records and results (default: the category)"
    )
    samples: list[str] | None = Field(
        None, description="names of the samples to score, a subset of the category (default: all)"
    )


class Backbones(Settings):
    """The feature extractors and their weights."""

    backbone_2d: str = Field(DEFAULT_BACKBONE_2D, description="timm ViT name")
    weights_2d: str = Field(
        "pretrained",
        description="'pretrained' (timm), a checkpoint path, or 'random' (results not meaningful)",
    )
    weights_3d: str | None = Field(
        None, description="Point-MAE checkpoint path, or 'random' (results not meaningful)"
    )
    backbone_3d: Backbone3D = Field(
        "point-mae",
        description="3D features: 'point-mae' (needs weights_3d) or 'fpfh' (weight-free)",
    )
    patch_size_2d: int | None = Field(
        None, ge=1, description="patch size of a random-weights ViT (small test models)"
    )


class RollingBank(Settings):
    """Earlier batches of the line used as extra references, and the reference budget."""

    reference_budget: int | None = Field(
        None, ge=1, description="most references per sample (default: all)"
    )
    reference_nights: int = Field(
        0, ge=0, description="earlier batches of the line used as extra references"
    )
    reference_samples: int | None = Field(
        None, ge=1, description="most samples taken from earlier batches (default: no limit)"
    )
    clean_bank: bool = Field(
        True,
        description="leave flagged (not cleared) and confirmed-defective samples of earlier "
        "batches out of the rolling bank",
    )


class StorageSettings(Settings):
    """Where the cache, the batch records and the results go."""

    storage: str = Field(
        DEFAULT_STORAGE,
        description="storage root (path or s3://bucket/prefix) of the feature cache and the "
        "batch records",
    )
    out: str | None = Field(
        None, description="output prefix of the results (default: below <storage>/results/<line>)"
    )


class DeviceSettings(Settings):
    """The device the models and the scoring run on."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")


class ComputeSettings(DeviceSettings):
    """Where the tasks run."""

    cluster: str = Field(
        "auto",
        description="'auto' (this process for 1 worker, a local Dask cluster for more), "
        "'local' (local Dask cluster), 'threads' (this process) or tcp://scheduler:8786",
    )
    workers: int = Field(
        1, ge=1, description="local Dask worker processes ('auto', 'local') or threads ('threads')"
    )


class RescoreRun(StorageSettings, ComputeSettings):
    """Storage and compute of a re-scoring run."""


class LineRun(StorageSettings, ComputeSettings):
    """Storage, compute and block size of a run that extracts features."""

    shard_size: int = Field(16, ge=1, description="samples per block")


class NewPartsRun(LineRun):
    """As :class:`LineRun`; a few parts are scored fastest in this process."""

    cluster: str = Field(
        "threads",
        description="'threads' (this process: the fastest for a few parts), 'local' or "
        "tcp://scheduler:8786",
    )


class RecordedBatch(Settings):
    """A recorded batch of a line."""

    line: str = Field(description="the line (category) name")
    batch: str | None = Field(None, description="the batch (default: the line's latest)")


def _overrides(
    name: str, doc: str, sources: dict[type[BaseModel], tuple[str, ...]], suffix: str
) -> type[Settings]:
    """A model of optional replacements of fields declared elsewhere (None keeps the value)."""
    fields: dict[str, tuple[object, object]] = {}
    for model, names in sources.items():
        for field in names:
            info = model.model_fields[field]
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else (
                info.annotation
            )
            text = _OWN_DEFAULT.sub("", info.description or "")
            described = Field(None, description=f"{text} (default: {suffix})")
            fields[field] = (annotation | None, described)
    return create_model(name, __base__=Settings, __doc__=doc, **fields)  # type: ignore[arg-type]


Rescoring = _overrides(
    "Rescoring",
    "What a re-scoring run changes; None keeps the batch's value.",
    {Algorithm: ("interval_ratio", "rescoring_windows", "flag_mad_k"),
     RollingBank: ("reference_budget", "reference_nights", "reference_samples")},
    "the batch's",
)


class NewParts(Settings):
    """New parts of a line scored against its recorded batches."""

    line: str = Field(description="the line (category) name")
    inputs: list[str] = Field(
        description="image files of the new parts (XYZ TIFFs for a 3D-only line), or one folder"
    )
    xyz: list[str] | None = Field(None, description="XYZ TIFFs, one per image, in order")
    data_format: DataFormat = Field(
        "folder", description="layout of a folder input (preprocessing is always the bank's)"
    )
    category: str | None = Field(None, description="category of a folder input")
    record_as: str | None = Field(
        None, description="record the new parts as a batch of the line with this id"
    )


class BankChoice(Settings):
    """Which recorded batches form the bank of new parts."""

    bank: list[str] | None = Field(
        None, description="batch ids forming the bank (default: the latest bank_nights)"
    )
    bank_nights: int = Field(
        1, ge=1, description="how many of the line's latest batches form the bank"
    )
    reference_budget: int | None = Field(
        None, ge=1, description="most bank samples per part (default: all)"
    )
    clean_bank: bool = Field(
        True,
        description="leave bank samples flagged in their night (not cleared by a verdict ok) "
        "and confirmed-defective ones out of the bank (false: every sample is a reference)",
    )


NewPartsChanges = _overrides(
    "NewPartsChanges",
    "What new parts change of the bank's settings; None keeps the bank's.",
    {Algorithm: ("flag_mad_k",), Backbones: ("weights_2d", "weights_3d")},
    "the bank's",
)


class Station(Settings):
    """The inspection station (``musc serve``): its line and where it listens."""

    line: str = Field(description="the line (category) name")
    host: str = Field(
        "127.0.0.1",
        description="address to listen on (127.0.0.1: this machine only; the server has no "
        "authentication)",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    max_request_mb: float = Field(
        64.0, gt=0, le=4096,
        description="largest request accepted, in MiB (a bigger one is refused with 413 as it "
        "is read)",
    )


class SynthLine(Settings):
    """A synthetic product line (``musc synth``; tasks.synthetic.generator.generate_line)."""

    out: str = Field(description="dataset root to write")
    category: str = Field("part", description="the line's (category's) name")
    num_samples: int = Field(16, ge=1, description="samples of the line")
    image_size: int = Field(
        224, ge=SYNTH_MIN_IMAGE_SIZE,
        description="image side (px); MVTec 3D-AD scans are 400 to 800",
    )
    defect_rate: float = Field(0.4, ge=0.0, le=1.0, description="fraction of defective samples")
    seed: int = Field(0, description="seed of everything random")
    support_plane: bool = Field(
        True,
        description="a raw scan: the support plane behind the object is measured (false: a "
        "pre-cleaned part, background all zeros)",
    )
    shape: SynthShape | None = Field(
        None,
        description=f"object kind (default: drawn from the seed among {', '.join(SYNTH_SHAPES)})",
    )
    pixel_pitch: float | None = Field(
        None, ge=SYNTH_PITCH_RANGE_MM[0], le=SYNTH_PITCH_RANGE_MM[1],
        description="mm between neighbouring pixels on the plane at the camera distance "
        f"(range {SYNTH_PITCH_RANGE_MM[0]}-{SYNTH_PITCH_RANGE_MM[1]}; MVTec 3D-AD: about "
        "0.1-0.2; default: 100 mm / image size)",
    )
    camera_distance: float | None = Field(
        None, ge=SYNTH_DISTANCE_RANGE_M[0], le=SYNTH_DISTANCE_RANGE_M[1],
        description=f"camera-to-plane distance in metres (range {SYNTH_DISTANCE_RANGE_M[0]}-"
        f"{SYNTH_DISTANCE_RANGE_M[1]}; default: drawn from the seed in 0.38-0.45)",
    )
    framing: SynthFraming = Field(
        "centred",
        description="where the part sits: inside the image, its outline touching a border, "
        "crossing one (its top face cut off), or mixed (drawn per sample)",
    )
    preset: SynthPreset | None = Field(
        None,
        description="a named line like MVTec 3D-AD scans; sets the image size, pixel pitch, "
        "camera distance, framing and support plane (docs/usage.md)",
    )


class StationRun(StorageSettings, DeviceSettings):
    """Storage, results and device of the inspection station (one folder per scored part)."""


def split_settings(
    models: dict[str, type[BaseModel]], values: dict[str, object], loose: tuple[str, ...] = ()
) -> dict[str, object]:
    """Flow parameters from flat setting values: each value goes to the model declaring it.

    Args:
        models: the flow's model parameters by name (``{"run": LineRun, ...}``).
        values: ``{field: value}``; a field declared by several models goes to each.
        loose: the flow's plain (not model) parameters, passed through.

    Returns:
        ``{parameter: model instance or value}``.

    Raises:
        TypeError: a value no model declares.
        pydantic.ValidationError: a value a model refuses.
    """
    unknown = set(values) - set(loose) - {f for m in models.values() for f in m.model_fields}
    if unknown:
        raise TypeError(f"no such setting: {sorted(unknown)}")
    out: dict[str, object] = {k: values[k] for k in loose if k in values}
    for name, model in models.items():
        out[name] = model(**{k: v for k, v in values.items() if k in model.model_fields})
    return out


#: The model parameters of each flow, by parameter name.
SCORE_LINE = {"data": LineInput, "backbones": Backbones, "algorithm": Algorithm,
              "bank": RollingBank, "run": LineRun}
RESCORE = {"target": RecordedBatch, "changes": Rescoring, "run": RescoreRun}
SCORE_NEW = {"parts": NewParts, "bank": BankChoice, "changes": NewPartsChanges,
             "run": NewPartsRun}
SERVE = {"station": Station, "bank": BankChoice, "changes": NewPartsChanges, "run": StationRun}
