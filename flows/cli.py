"""The ``musc`` command: ``synth``, ``score`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from flows.score_line import RunSummary, score_lines
from musc_core.config import MODALITIES, MuscConfig
from tasks.backbones import DEFAULT_BACKBONE_2D, BackboneSpec, resolve_device
from tasks.datasets import FORMATS
from tasks.outputs import RANDOM_WEIGHTS_WARNING
from tasks.synth import generate_line


class StageProgress:
    """Progress bars on stderr, one per stage, for the core's ``(stage, done, total)`` calls."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Advance (or open) the bar of ``stage``."""
        if not self.enabled:
            return
        bar = self._bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=f"{stage:>15}", unit="it", file=sys.stderr, leave=True)
            self._bars[stage] = bar
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[stage]


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = MuscConfig()
    parser.add_argument("--modality", choices=MODALITIES, default=defaults.modality)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--backbone-2d", default=DEFAULT_BACKBONE_2D, help="timm ViT name")
    parser.add_argument(
        "--weights-2d",
        default="pretrained",
        help="'pretrained' (timm), a checkpoint path, or 'random' (results not meaningful)",
    )
    parser.add_argument(
        "--weights-3d",
        default=None,
        help="Point-MAE checkpoint path, or 'random' (results not meaningful)",
    )
    parser.add_argument("--num-groups", type=int, default=defaults.num_groups)
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--ipg-step", type=int, default=defaults.ipg_step)
    parser.add_argument("--interval-ratio", type=float, default=defaults.interval_ratio)
    parser.add_argument(
        "--distance-dtype", choices=("auto", "float32", "bfloat16"), default="auto"
    )
    parser.add_argument("--vit-dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from(args: argparse.Namespace) -> MuscConfig:
    return MuscConfig(
        modality=args.modality,
        image_size=args.image_size,
        num_groups=args.num_groups,
        group_size=args.group_size,
        ipg_step=min(args.ipg_step, args.group_size),
        interval_ratio=args.interval_ratio,
        distance_dtype=args.distance_dtype,
        vit_dtype=args.vit_dtype,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="musc", description="Zero-shot industrial anomaly detection with MuSc-V2."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic product line (MVTec 3D-AD layout)")
    synth.add_argument("--out", required=True, help="dataset root to write")
    synth.add_argument("--category", default="part")
    synth.add_argument("--num-samples", type=int, default=16)
    synth.add_argument("--image-size", type=int, default=224)
    synth.add_argument("--defect-rate", type=float, default=0.4)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-support-plane", action="store_true")

    score_cmd = sub.add_parser("score", help="score a dataset's lines and write results")
    score_cmd.add_argument("data", help="dataset root")
    score_cmd.add_argument("--format", choices=FORMATS, default="mvtec3d")
    score_cmd.add_argument("--category", default="all", help="a category name or 'all'")
    score_cmd.add_argument("--out", required=True, help="output folder")
    score_cmd.add_argument(
        "--fail-on-set-aside",
        action="store_true",
        help="exit non-zero when any sample had to be set aside",
    )
    _add_config_options(score_cmd)

    demo = sub.add_parser(
        "demo", help="generate a small synthetic line and score it 2D+3D (random weights)"
    )
    demo.add_argument("--out", default="demo", help="folder for the line and the results")
    demo.add_argument("--num-samples", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    _add_config_options(demo)
    demo.set_defaults(weights_2d="random", weights_3d="random")
    return parser


def _print_summary(summary: RunSummary) -> None:
    stream = sys.stdout
    if summary.random_weights:
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n", file=stream)
    for line in summary.lines:
        if line.error:
            print(f"[{line.category}] NOT SCORED: {line.error}", file=stream)
        else:
            print(f"[{line.category}] {line.num_scored} samples scored in {line.seconds:.1f} s",
                  file=stream)
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in line.timings.items())
            print(f"    stages: {stages}", file=stream)
            for kind, path in line.outputs.items():
                print(f"    {kind:>9}: {path}", file=stream)
            if line.metrics:
                shown = ", ".join(
                    f"{k}={v:.3f}" for k, v in line.metrics.items() if "before" not in k
                )
                print(f"    metrics: {shown}", file=stream)
        for name, problem in line.set_aside:
            print(f"    set aside {name!r}: {problem}", file=stream)
    if summary.metrics_path:
        print(f"metrics (per category and mean): {summary.metrics_path}", file=stream)
    print(f"run summary: {summary.summary_path}", file=stream)


def _run_score(args: argparse.Namespace, data: str, fmt: str, out: str) -> int:
    config = _config_from(args)
    spec = BackboneSpec(
        name_2d=args.backbone_2d, weights_2d=args.weights_2d, weights_3d=args.weights_3d
    )
    categories = None if args.category == "all" else [args.category]
    summary = score_lines(
        data,
        fmt,
        categories,
        config,
        spec,
        out,
        resolve_device(args.device),
        progress=StageProgress(enabled=not args.quiet),
    )
    _print_summary(summary)
    if summary.failed_lines:
        return 2
    if summary.num_set_aside and getattr(args, "fail_on_set_aside", False):
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``musc`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            summary = generate_line(
                args.out,
                category=args.category,
                num_samples=args.num_samples,
                image_size=args.image_size,
                defect_rate=args.defect_rate,
                seed=args.seed,
                support_plane=not args.no_support_plane,
            )
            print(f"synthetic line written: {Path(args.out) / args.category} ({summary})")
            return 0
        if args.command == "score":
            return _run_score(args, args.data, args.format, args.out)
        if args.command == "demo":
            data = Path(args.out) / "line"
            generate_line(
                data,
                category="demo_part",
                num_samples=args.num_samples,
                image_size=args.image_size,
                seed=args.seed,
            )
            print(f"synthetic line: {data / 'demo_part'}")
            args.category = "all"
            return _run_score(args, str(data), "mvtec3d", str(Path(args.out) / "results"))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"musc: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
