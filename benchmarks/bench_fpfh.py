"""Quality of the weight-free FPFH 3D backbone on synthetic lines: a small ablation.

Run from the repository root::

    python -m benchmarks.bench_fpfh --out benchmarks/out/fpfh.json

Lines come from :mod:`tasks.synthetic.generator`, rendered in memory without the support plane (so
no
RANSAC/DBSCAN cleaning is involved: the object's points are the foreground), one line per
(seed, object kind) of ``--lines``; the default includes two ``ribs`` lines, the object whose
rib tops and groove floors lie side by side (where Iterative Point Grouping matters). Every
line is scored with the in-memory :func:`musc_core.pipeline.score` under each setting:

- ``3d``: FPFH alone; ``2d+3d``: FPFH with a random-weight ViT-Tiny/8 (no pretrained 2D
  weights exist offline either, so this is the air-gapped case); ``2d``: the random ViT alone,
  for reference.
- IPG on (the paper's K_iter = K/2) or off (K_iter = K: plain K-nearest groups).
- SNAMD on (degrees 1, 3, 5) or off (degree 1 only: every feature stays its own).
- The pooling section compares FPFH variants (3D only, IPG and SNAMD on): the default (one
  radius, nested pooling extents), mean+max pooling, three radii with whole-group pooling, the
  centre's own descriptor at three radii.

Metrics: image AUROC over the geometric defects (dent, crack vs good; a colour defect has no
geometry by construction), pixel AUROC and AUPRO (FPR ≤ 0.3) over the same samples, and image
AUROC over every defect kind. Printed as Markdown tables (the mean over the lines), the JSON
keeps every line and the machine. The FPFH features of one grouping are computed once and
reused by the settings that share it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine_info
from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.fpfh import FpfhFeatureExtractor, FpfhParams
from musc_core.grouping import Grouping
from musc_core.metrics import image_metrics, pixel_metrics
from musc_core.pipeline import Sample, score
from tasks.synthetic.generator import plan_line, render_sample

DEFAULT_LINES = ("0:puck", "1:dome", "2:box", "3:ribs", "4:ribs")
GEOMETRIC = ("dent", "crack")
VARIANTS = {
    "default (r 4; 1/4, 1/2, all members; mean)": FpfhParams(),
    "mean+max pooling": FpfhParams(pooling="mean+max"),
    "radii 3, 5, 8; all members; mean": FpfhParams(radii=(3.0, 5.0, 8.0), fractions=(1.0,)),
    "centre only, radii 3, 5, 8": FpfhParams(
        radii=(3.0, 5.0, 8.0), fractions=(1.0,), pooling="centre"
    ),
}


class MemoFpfh(FpfhFeatureExtractor):
    """The FPFH extractor, remembering the features of each (points, grouping) it has seen."""

    def __init__(self, params: FpfhParams) -> None:
        super().__init__(params)
        self._memo: dict[str, list[torch.Tensor]] = {}

    def extract_many(
        self,
        points: Sequence[torch.Tensor],
        groupings: Sequence[Grouping],
        layers: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """As the parent's (FPFH has no dtype), computing only samples not seen before."""
        per_sample = []
        for p, g in zip(points, groupings, strict=True):
            digest = hashlib.sha1(p.numpy().tobytes() + g.members.numpy().tobytes()).hexdigest()
            if digest not in self._memo:
                self._memo[digest] = super().extract_many([p], [g], layers, dtype)
            per_sample.append(self._memo[digest])
        return [torch.cat([s[j] for s in per_sample]) for j in range(len(layers))]


def prepared_line(
    seed: int, shape: str, size: int, num_samples: int, preset: str
) -> dict[str, Any]:
    """A line generated as ``musc synth --preset`` and prepared as a run prepares it.

    The scans (e.g. ``mvtec3d-400``: 400 px at 0.2 mm, pre-cleaned, half of the parts at the
    frame) go through the MVTec 3D-AD cleaning and are resized to ``size``.
    """
    import tempfile

    from tasks.formats.datasets import read_dataset
    from tasks.formats.prepare import prepare_records
    from tasks.synthetic.generator import generate_line, preset_kwargs

    config = MuscConfig(image_size=size, num_groups=16, group_size=8, ipg_step=4)
    with tempfile.TemporaryDirectory() as root:
        generate_line(root, category="part", num_samples=num_samples, seed=seed, shape=shape,
                      defect_rate=0.5, **preset_kwargs(preset))
        prepared, aside = prepare_records(read_dataset(root, "mvtec3d", "part"), "mvtec3d",
                                          config)
    if aside:
        raise RuntimeError(f"{len(aside)} samples set aside: {aside[0].problem}")
    return {
        "samples": [p.sample for p in prepared],
        "kinds": [p.record.defect_type for p in prepared],
        "masks": np.stack([p.mask.numpy() for p in prepared]),
    }


def render_line(seed: int, shape: str, size: int, num_samples: int) -> dict[str, Any]:
    """Samples, defect kinds and masks of one synthetic line (no support plane)."""
    model, specs = plan_line(
        num_samples=num_samples, image_size=size, seed=seed, support_plane=False,
        shape=shape, defect_rate=0.5,
    )
    samples, masks = [], []
    for spec in specs:
        rendered = render_sample(model, spec)
        image = torch.from_numpy(rendered.rgb).permute(2, 0, 1).float() / 255.0
        samples.append(Sample(spec.name, image=image, xyz=torch.from_numpy(rendered.xyz)))
        masks.append(rendered.mask)
    return {
        "samples": samples,
        "kinds": [s.defect_type for s in specs],
        "masks": np.stack(masks),
    }


def line_metrics(line: dict[str, Any], maps: np.ndarray, scores: np.ndarray) -> dict:
    """Image AUROC (geometric, all kinds), pixel AUROC and AUPRO (geometric samples)."""
    kinds = np.array(line["kinds"])
    geometric = np.isin(kinds, ("good",) + GEOMETRIC)
    pixel = pixel_metrics(line["masks"][geometric], maps[geometric])
    return {
        "image_auroc_geometric": image_metrics(kinds[geometric] != "good", scores[geometric])[
            "auroc"
        ],
        "pixel_auroc_geometric": pixel["auroc"],
        "aupro_geometric": pixel["aupro"],
        "image_auroc_all": image_metrics(kinds != "good", scores)["auroc"],
    }


def settings() -> list[tuple[str, str, bool, bool]]:
    """(name, modality, IPG, SNAMD) of the ablation rows."""
    rows = []
    for modality in ("3d", "2d+3d"):
        for ipg in (True, False):
            for snamd in (True, False):
                name = f"{modality}, IPG {'on' if ipg else 'off'}, SNAMD {'on' if snamd else 'off'}"
                rows.append((name, modality, ipg, snamd))
    rows.append(("2d (random ViT alone)", "2d", True, True))
    return rows


def config_for(args: argparse.Namespace, modality: str, ipg: bool, snamd: bool) -> MuscConfig:
    """The small configuration of a row."""
    return MuscConfig(
        modality=modality,
        image_size=args.size,
        num_groups=args.groups,
        group_size=args.group_size,
        ipg_step=args.group_size // 2 if ipg else args.group_size,
        aggregation_degrees=(1, 3, 5) if snamd else (1,),
        distance_dtype="float32",
        vit_dtype="float32",
    )


def mean_rows(per_line: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean of every metric over the lines, per row."""
    return {
        row: {m: float(np.mean([v[m] for v in lines.values()])) for m in next(iter(lines.values()))}
        for row, lines in per_line.items()
    }


def markdown(title: str, table: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the mean metrics."""
    head = (
        f"| {title} | image AUROC (dent, crack) | pixel AUROC (dent, crack) | "
        "AUPRO (dent, crack) | image AUROC (all kinds) |\n|---|---|---|---|---|\n"
    )
    keys = ("image_auroc_geometric", "pixel_auroc_geometric", "aupro_geometric",
            "image_auroc_all")
    return head + "".join(
        f"| {row} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |\n"
        for row, v in table.items()
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: output, lines, sizes, sections."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fpfh.json"))
    parser.add_argument("--lines", nargs="+", default=list(DEFAULT_LINES),
                        help="seed:kind of each line (kinds: puck, dome, box, ribs)")
    parser.add_argument("--samples", type=int, default=12, help="samples per line")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--groups", type=int, default=256, help="G")
    parser.add_argument("--group-size", type=int, default=32, help="K (IPG on: K_iter = K/2)")
    parser.add_argument("--preset", default=None,
                        help="lines as musc synth --preset (e.g. mvtec3d-400), cleaned and "
                        "resized as a run prepares them; default: rendered at --size")
    parser.add_argument("--only", nargs="*", choices=("ablation", "pooling"),
                        default=["ablation", "pooling"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Score every line under every setting, print the tables, write the JSON."""
    args = parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    vit = ViTFeatureExtractor.create("vit_tiny_patch16_224", "random", args.size, patch_size=8)
    lines = {}
    for item in args.lines:
        seed, kind = item.split(":")
        if args.preset:
            lines[item] = prepared_line(int(seed), kind, args.size, args.samples, args.preset)
        else:
            lines[item] = render_line(int(seed), kind, args.size, args.samples)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "backbone_3d": FpfhParams().identity,
        "backbone_2d": vit.identity,
    }
    if "ablation" in args.only:
        fpfh = MemoFpfh(FpfhParams())
        per_line: dict[str, dict[str, dict[str, float]]] = {}
        for row, modality, ipg, snamd in settings():
            config = config_for(args, modality, ipg, snamd)
            per_line[row] = {}
            for item, line in lines.items():
                result = score(line["samples"], config, vit, fpfh)
                per_line[row][item] = line_metrics(
                    line, result.maps.numpy(), result.scores_rescored.numpy()
                )
            print(f"{row}: {per_line[row]}", flush=True)
        results["ablation"] = {"per_line": per_line, "mean": mean_rows(per_line)}
        ribs = {r: {k: v for k, v in lines_.items() if k.endswith("ribs")}
                for r, lines_ in per_line.items()}
        results["ablation"]["mean_ribs"] = mean_rows(ribs)
    if "pooling" in args.only:
        config = config_for(args, "3d", True, True)
        per_variant: dict[str, dict[str, dict[str, float]]] = {}
        seconds: dict[str, float] = {}
        for name, params in VARIANTS.items():
            per_variant[name] = {}
            extractor = FpfhFeatureExtractor(params)
            seconds[name] = 0.0
            for item, line in lines.items():
                result = score(line["samples"], config, extractor_3d=extractor)
                seconds[name] += result.timings["3d_features"] / len(line["samples"])
                per_variant[name][item] = line_metrics(
                    line, result.maps.numpy(), result.scores_rescored.numpy()
                )
            seconds[name] /= len(lines)
            print(f"{name}: {per_variant[name]}", flush=True)
        results["pooling"] = {
            "per_line": per_variant,
            "mean": mean_rows(per_variant),
            "features_s_per_sample": seconds,
            "identities": {name: p.identity for name, p in VARIANTS.items()},
        }
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    info = results["machine"]
    print(f"\n{info['cpu_model']}, capability {info['cpu_capability']}, {info['threads']} "
          f"threads; {results['seconds']:.0f} s; lines {', '.join(args.lines)}; "
          f"{args.samples} samples of {args.size} px, G = {args.groups}, K = {args.group_size}\n")
    if "ablation" in results:
        print(markdown("setting (mean over all lines)", results["ablation"]["mean"]))
        print(markdown("setting (ribs lines only)", results["ablation"]["mean_ribs"]))
    if "pooling" in results:
        print(markdown("FPFH variant (3D, IPG and SNAMD on)", results["pooling"]["mean"]))
        for name, value in results["pooling"]["features_s_per_sample"].items():
            print(f"- {name}: {value:.3f} s per sample (features)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
