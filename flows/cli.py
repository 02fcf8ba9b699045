"""The ``musc`` command: ``synth``, ``score``, ``rescore``, ``score-new``, ``eval``, ``demo``.

``score`` and ``demo`` run the ``score-line`` Prefect flow once per category (line), against
the Prefect API in ``PREFECT_API_URL`` or, when none is configured, a local server started for
the command (embedded SQLite, 127.0.0.1). ``rescore`` runs the ``rescore`` flow, ``score-new``
the ``score-new`` flow, and ``eval`` one ``score-line`` run per category, seed and subset of
a benchmark dataset (the paper's protocol).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from prefect.exceptions import TerminationSignal
from tqdm import tqdm

from flows.paper_eval import evaluate_benchmark
from flows.progress import add_reporter, remove_reporter
from flows.rescore import rescore
from flows.score_line import DEFAULT_STORAGE, LineNotScored, default_batch_id, score_line
from flows.score_new import score_new
from flows.verdict_cli import add_verdict_parser, run_verdict
from infra.prefect_api import prefect_api
from musc_core.config import MODALITIES, MuscConfig
from musc_core.metrics import summarize
from tasks.backbones import DEFAULT_BACKBONE_2D
from tasks.datasets import FORMATS, list_categories
from tasks.outputs import RANDOM_WEIGHTS_WARNING, ResultStore, safe_file_stem
from tasks.synth import generate_line

T = TypeVar("T")
EXIT_NOT_SCORED = 2
EXIT_SET_ASIDE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class StageProgress:
    """Progress bars on stderr, one per stage, fed by the flow's ``(stage, done, total)``.

    Off under ``--quiet`` and when stderr is not a terminal (CI logs, redirected output).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Advance (or open) the bar of ``stage``; close it when the stage is done."""
        if not self.enabled or total == 0:
            return
        bar = self._bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=f"{stage:>13}", unit="task", file=sys.stderr)
            self._bars[stage] = bar
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[stage]


def quiet_console() -> None:
    """Keep the console to warnings, progress bars and the summary.

    Run and task logs still reach the Prefect API (and its UI); only the console handler of
    this process and of the Dask workers it starts (through their environment) is raised to
    WARNING, and the Dask cluster's own INFO messages are dropped.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)


def with_flow_progress(args: argparse.Namespace, run: Callable[[], T]) -> T:
    """Run flows with progress bars (unless ``--quiet`` or not a terminal) and one Prefect API.

    The API is ``PREFECT_API_URL`` when set, else a local server started for the command.
    """
    reporter = StageProgress(enabled=not args.quiet and sys.stderr.isatty())
    add_reporter(reporter)
    try:
        with prefect_api():
            return run()
    finally:
        remove_reporter(reporter)


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
    parser.add_argument("--flag-k", type=float, default=defaults.flag_mad_k,
                        help="k of the flag rule: median + k·1.4826·MAD of the RsCon scores")
    parser.add_argument(
        "--distance-dtype", choices=("auto", "float32", "bfloat16"), default="auto"
    )
    parser.add_argument("--vit-dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    _add_run_options(parser)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        default=os.environ.get("MUSC_STORAGE", DEFAULT_STORAGE),
        help="storage root (path or s3://bucket/prefix) of the feature cache and batch records "
        "(default: $MUSC_STORAGE or ./musc-store)",
    )
    parser.add_argument("--batch", default=None, help="batch id (default: the UTC start time)")
    parser.add_argument(
        "--cluster",
        default="local",
        help="'local' (local Dask cluster), 'threads' (this process) or tcp://scheduler:8786",
    )
    parser.add_argument("--workers", type=int, default=1, help="local Dask worker processes")
    parser.add_argument("--shard-size", type=int, default=16, help="samples per block")
    parser.add_argument("--reference-budget", type=int, default=None,
                        help="most references per sample (default: all)")
    parser.add_argument("--reference-nights", type=int, default=0,
                        help="earlier batches of the line used as extra references")
    parser.add_argument("--reference-samples", type=int, default=None,
                        help="most samples taken from earlier batches")
    parser.add_argument(
        "--fail-on-set-aside",
        action="store_true",
        help=f"exit with status {EXIT_SET_ASIDE} when any sample had to be set aside",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--verbose", action="store_true", help="print Prefect and Dask INFO logs on the console"
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
    score_cmd.add_argument("--out", required=True, help="output folder or s3:// prefix")
    _add_config_options(score_cmd)

    again = sub.add_parser(
        "rescore", help="score a recorded batch again from cached features (no backbone)"
    )
    again.add_argument("line", help="the line (category) name")
    again.add_argument("--batch", default=None, help="the batch to re-score (default: latest)")
    again.add_argument("--out", required=True, help="output folder or s3:// prefix")
    again.add_argument("--storage", default=os.environ.get("MUSC_STORAGE", DEFAULT_STORAGE))
    again.add_argument("--interval-ratio", type=float, default=None)
    again.add_argument("--rescoring-windows", type=int, nargs="+", default=None)
    again.add_argument("--reference-budget", type=int, default=None)
    again.add_argument("--reference-nights", type=int, default=None)
    again.add_argument("--reference-samples", type=int, default=None)
    again.add_argument("--cluster", default="local")
    again.add_argument("--workers", type=int, default=1)
    again.add_argument("--quiet", action="store_true")
    again.add_argument("--verbose", action="store_true")

    new = sub.add_parser(
        "score-new",
        help="score new parts against a line's recorded batches (only the parts are extracted)",
    )
    new.add_argument("line", help="the line (category) name")
    new.add_argument(
        "inputs", nargs="+",
        help="image files of the new parts (XYZ TIFFs for a 3D-only line), or one folder",
    )
    new.add_argument("--xyz", nargs="+", default=None, help="XYZ TIFFs, one per image, in order")
    new.add_argument("--format", choices=FORMATS, default="folder",
                     help="layout of a folder input (preprocessing is always the bank's)")
    new.add_argument("--category", default=None, help="category of a folder input")
    new.add_argument("--storage", default=os.environ.get("MUSC_STORAGE", DEFAULT_STORAGE))
    new.add_argument("--bank", nargs="+", default=None,
                     help="batch ids forming the bank (default: the latest --bank-nights)")
    new.add_argument("--bank-nights", type=int, default=1,
                     help="how many of the line's latest batches form the bank (1)")
    new.add_argument("--out", default=None,
                     help="output folder or s3:// prefix (default <storage>/results/<line>/new-…)")
    new.add_argument("--reference-budget", type=int, default=None,
                     help="most bank samples per part (default: all)")
    new.add_argument("--flag-k", type=float, default=None, help="k of the flag rule (bank's)")
    new.add_argument("--weights-2d", default=None,
                     help="2D weights, when the bank's recorded location differs here")
    new.add_argument("--weights-3d", default=None,
                     help="Point-MAE weights, when the bank's recorded location differs here")
    new.add_argument("--record-as", default=None,
                     help="record the new parts as a batch of the line with this id")
    new.add_argument("--shard-size", type=int, default=16)
    new.add_argument("--cluster", default="threads",
                     help="'threads' (default, fastest for a few parts), 'local' or tcp://…")
    new.add_argument("--workers", type=int, default=1)
    new.add_argument("--device", default="auto")
    new.add_argument("--quiet", action="store_true")

    bench = sub.add_parser(
        "eval",
        help="paper-style evaluation of a benchmark dataset: every category, g subsets, seeds",
    )
    bench.add_argument("data", help="dataset root")
    bench.add_argument("--format", choices=[f for f in FORMATS if f != "folder"], required=True)
    bench.add_argument("--category", nargs="+", default=None,
                       help="categories to evaluate (default: all)")
    bench.add_argument("--subsets", type=int, default=1,
                       help="g: split each category's test set into g random subsets, each "
                       "scored on its own (paper: 1, 2, 3)")
    bench.add_argument("--seeds", type=int, default=10,
                       help="random partitions (seeds 0..N-1) averaged when g > 1 (paper: 10)")
    bench.add_argument("--out", required=True, help="output folder or s3:// prefix")
    _add_config_options(bench)

    demo = sub.add_parser(
        "demo", help="generate a small synthetic line and score it 2D+3D (random weights)"
    )
    demo.add_argument("--out", default="demo", help="folder for the line and the results")
    demo.add_argument("--num-samples", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    _add_config_options(demo)
    demo.set_defaults(weights_2d="random", weights_3d="random", storage=None)
    add_verdict_parser(sub, DEFAULT_STORAGE)
    return parser


def _line_options(args: argparse.Namespace) -> dict[str, object]:
    """The ``score_line`` parameters the command-line options set (all but the line's data)."""
    return dict(
        modality=args.modality,
        backbone_2d=args.backbone_2d,
        weights_2d=args.weights_2d,
        weights_3d=args.weights_3d,
        cluster=args.cluster,
        workers=args.workers,
        shard_size=args.shard_size,
        reference_budget=args.reference_budget,
        reference_nights=args.reference_nights,
        reference_samples=args.reference_samples,
        image_size=args.image_size,
        num_groups=args.num_groups,
        group_size=args.group_size,
        ipg_step=args.ipg_step,
        interval_ratio=args.interval_ratio,
        distance_dtype=args.distance_dtype,
        vit_dtype=args.vit_dtype,
        flag_mad_k=args.flag_k,
        device=args.device,
        patch_size_2d=getattr(args, "patch_size_2d", None),
    )


def _score_category(args: argparse.Namespace, data: str, fmt: str, category: str, out: str,
                    batch: str) -> dict:
    """Run the score-line flow for one category; a line that cannot be scored is reported."""
    try:
        return score_line(
            data=data,
            data_format=fmt,
            category=category,
            storage=args.storage,
            out=out,
            batch=batch,
            **_line_options(args),
        )
    except LineNotScored as error:
        return {
            "line": category,
            "error": str(error),
            "scored": 0,
            "set_aside": [[a.name, a.path, a.problem] for a in error.set_aside],
        }


def print_line(summary: dict) -> None:
    """One line's outcome on stdout: counts, stages, outputs, metrics, set-aside samples."""
    line = summary["line"]
    if summary.get("error"):
        print(f"[{line}] NOT SCORED: {summary['error']}")
    else:
        print(
            f"[{line}] {summary['scored']} samples scored in {summary['seconds']:.1f} s "
            f"(pool {summary['pool']}, batch {summary['batch']}); "
            f"{len(summary['flagged'])} flagged, {len(summary.get('set_aside', []))} set aside"
        )
        if summary.get("flag_note"):
            print(f"    no flag threshold: {summary['flag_note']}")
        if (summary.get("drift") or {}).get("drifted"):
            print(f"    DRIFT: median score {summary['drift']['shift']:+.1f} robust sigmas "
                  "from the bank's")
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items())
        print(f"    stages: {stages}")
        work = ", ".join(
            f"{stage} {c['computed']} computed/{c['cached']} cached"
            for stage, c in summary["counts"].items()
        )
        print(f"    cache: {work}")
        for kind, location in summary["outputs"].items():
            print(f"    {kind:>9}: {location}")
        if summary.get("metrics"):
            shown = ", ".join(
                f"{k}={v:.3f}" for k, v in summary["metrics"].items() if "before" not in k
            )
            print(f"    metrics: {shown}")
    for name, _path, problem in summary.get("set_aside", []):
        print(f"    set aside {name!r}: {problem}")


def _run_score(args: argparse.Namespace, data: str, fmt: str, out: str) -> int:
    categories = list_categories(data, fmt) if args.category == "all" else [args.category]
    batch = args.batch or default_batch_id()
    lines = with_flow_progress(
        args,
        lambda: [
            _score_category(
                args, data, fmt, c, f"{out.rstrip('/')}/{safe_file_stem(c)}", batch
            )
            for c in categories
        ]
    )
    random_weights = any(s.get("random_weights") for s in lines)
    if random_weights:
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    for summary in lines:
        print_line(summary)
    store = ResultStore(out)
    per_category = {s["line"]: s["metrics"] for s in lines if s.get("metrics")}
    if per_category:
        payload: dict[str, object] = {"categories": summarize(per_category)}
        if random_weights:
            payload["warning"] = RANDOM_WEIGHTS_WARNING
        print(f"metrics (per category and mean): {store.write_json('metrics.json', payload)}")
    run = {
        "warning": RANDOM_WEIGHTS_WARNING if random_weights else None,
        "random_weights": random_weights,
        "data": data,
        "format": fmt,
        "batch": batch,
        "lines": lines,
    }
    print(f"run summary: {store.write_json('run.json', run)}")
    if any(s.get("error") for s in lines):
        return EXIT_NOT_SCORED
    if args.fail_on_set_aside and any(s.get("set_aside") for s in lines):
        return EXIT_SET_ASIDE
    return 0


def _run_rescore(args: argparse.Namespace) -> int:
    summary = with_flow_progress(
        args,
        lambda: rescore(
            line=args.line,
            batch=args.batch,
            storage=args.storage,
            out=args.out,
            interval_ratio=args.interval_ratio,
            rescoring_windows=args.rescoring_windows,
            reference_budget=args.reference_budget,
            reference_nights=args.reference_nights,
            reference_samples=args.reference_samples,
            cluster=args.cluster,
            workers=args.workers,
        )
    )
    if summary.get("random_weights"):
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    print_line(summary)
    return 0


def _run_score_new(args: argparse.Namespace) -> int:
    summary = with_flow_progress(
        args,
        lambda: score_new(
            line=args.line,
            inputs=args.inputs,
            xyz=args.xyz,
            data_format=args.format,
            category=args.category,
            storage=args.storage,
            bank=args.bank,
            bank_nights=args.bank_nights,
            out=args.out,
            reference_budget=args.reference_budget,
            flag_mad_k=args.flag_k,
            weights_2d=args.weights_2d,
            weights_3d=args.weights_3d,
            shard_size=args.shard_size,
            cluster=args.cluster,
            workers=args.workers,
            device=args.device,
            record_as=args.record_as,
        )
    )
    if summary.get("random_weights"):
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    print(
        f"[{summary['line']}] {summary['scored']} new part(s) scored against bank "
        f"{', '.join(summary['bank'])} (pool {summary['pool']}) in {summary['seconds']:.1f} s; "
        f"{len(summary['flagged'])} flagged"
    )
    if summary.get("flag_note"):
        print(f"    no flag threshold: {summary['flag_note']}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items())
    print(f"    stages: {stages}")
    for kind, location in summary["outputs"].items():
        print(f"    {kind:>9}: {location}")
    for name, _path, problem in summary.get("set_aside", []):
        print(f"    set aside {name!r}: {problem}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    options = {**_line_options(args), "reference_nights": 0, "reference_samples": None}
    eval_id = args.batch or default_batch_id()

    def done(category: str, seed: int, index: int, subsets: int, summary: dict) -> None:
        print(
            f"[{category}] seed {seed}, subset {index}/{subsets}: {summary['scored']} samples "
            f"scored in {summary['seconds']:.1f} s ({len(summary['set_aside'])} set aside)"
        )

    result = with_flow_progress(
        args,
        lambda: evaluate_benchmark(
            args.data, args.format, args.out, args.storage, options,
            subsets=args.subsets, seeds=range(args.seeds), categories=args.category,
            eval_id=eval_id, progress=done,
        )
    )
    if result.table["warning"]:
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    print(result.markdown)
    for kind, location in result.outputs.items():
        print(f"    {kind:>9}: {location}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``musc`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        quiet_console()
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
        if args.command == "rescore":
            return _run_rescore(args)
        if args.command == "score-new":
            return _run_score_new(args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "verdict":
            return run_verdict(args)
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
            args.storage = args.storage or str(Path(args.out) / "store")
            return _run_score(args, str(data), "mvtec3d", str(Path(args.out) / "results"))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"musc: error: {error}", file=sys.stderr)
        return EXIT_NOT_SCORED
    except (KeyboardInterrupt, TerminationSignal) as stop:
        # The local Prefect server and the Dask cluster are already shut down by their context
        # managers; leave now instead of waiting for tasks still running in worker threads.
        print(
            "musc: stopped; everything cached so far is kept and a re-run resumes from it",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED if isinstance(stop, KeyboardInterrupt) else EXIT_TERMINATED)
    return 1


if __name__ == "__main__":
    sys.exit(main())

