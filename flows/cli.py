"""The ``musc`` command: synth, score, rescore, score-new, serve, eval, demo (and verdict).

``score`` and ``demo`` run the ``score-line`` Prefect flow once per category (line), against
the Prefect API in ``PREFECT_API_URL`` or, when none is configured, a local server started for
the command (embedded SQLite, 127.0.0.1). ``rescore`` runs the ``rescore`` flow, ``score-new``
the ``score-new`` flow, ``serve`` the inspection station (:mod:`flows.serve_app`), and
``eval`` one ``score-line`` run per category, seed and subset of
a benchmark dataset (the paper's protocol).

Every option is checked before anything starts (:mod:`flows.checks`). The flows run in a
worker thread: the main thread keeps the signals (SIGTERM and Ctrl-C stop the command within a
second) and the stage lines of non-terminals. Nothing heavy (PyTorch, Prefect, Dask, timm) is
imported before a command runs, so ``--help`` answers at once. Exit statuses: ``EXIT_HELP``.
"""

from __future__ import annotations

import argparse
import contextvars
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO, TypeVar

from pydantic import BaseModel

from flows.checks import (
    UsageError,
    check_cluster_option,
    check_counts,
    check_location,
    check_new_batches,
    check_score,
)
from flows.options import add_model_options, model_from_args, option_name
from flows.settings import (
    Algorithm,
    Backbones,
    BankChoice,
    LineInput,
    LineRun,
    NewParts,
    NewPartsChanges,
    NewPartsRun,
    RecordedBatch,
    RescoreRun,
    Rescoring,
    RollingBank,
    Station,
    StationRun,
    SynthLine,
)
from flows.verdict_cli import add_verdict_parser, run_verdict
from musc_core.config import MuscConfig
from tasks.choices import (
    DEFAULT_STORAGE,
    FORMATS,
    RANDOM_WEIGHTS_WARNING,
)

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)
#: Exit statuses (docs/operations.md, "Exit status").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SET_ASIDE = 3
EXIT_NOT_SCORED = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
#: Seconds between two heartbeat lines of a long stage in machine logs.
HEARTBEAT_SECONDS = 60.0
STOPPED_MESSAGE = "musc: stopped; everything cached so far is kept: re-run to resume"

log = logging.getLogger("musc")


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the command (raised in the main thread by its handler).

    Attributes:
        signum: the signal.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class StageProgress:
    """Progress bars on stderr, one per stage, fed by the flow's ``(stage, done, total)``.

    For a terminal; see :class:`StageLog` for logs read by machines.
    """

    def __init__(self) -> None:
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Advance (or open) the bar of ``stage``; close it when the stage is done."""
        from tqdm import tqdm

        if total == 0:
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

    def tick(self) -> None:
        """Nothing to do between reports (the bars show the elapsed time)."""


class StageLog:
    """Stage lines on stderr for logs read by machines (cron mail, CI, a redirected file).

    One line when a stage starts and one when it ends, with task counts and elapsed seconds,
    and a heartbeat line every ``heartbeat`` seconds while a stage runs, written as they
    happen (stderr is flushed after each line).

    Args:
        heartbeat: seconds between heartbeat lines of a running stage.
        stream: where to write (stderr when None).
        clock: monotonic clock (seconds).
    """

    def __init__(
        self,
        heartbeat: float = HEARTBEAT_SECONDS,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat = heartbeat
        self.stream = stream
        self.clock = clock
        self._open: dict[str, tuple[float, int, int]] = {}
        self._last_line = clock()

    def _write(self, text: str) -> None:
        # Written, not printed: the flows run with ``log_prints``, which would take a print.
        stream = self.stream or sys.stderr
        stream.write(f"musc: {text}\n")
        stream.flush()
        self._last_line = self.clock()

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Write the start or end of ``stage``; remember its progress for the heartbeat."""
        now = self.clock()
        started = self._open.get(stage, (now, 0, 0))[0]
        if stage not in self._open or done == 0:
            started = now
            self._write(f"{stage} started: {total} task(s)")
        self._open[stage] = (started, done, total)
        if done >= total:
            del self._open[stage]
            self._write(f"{stage} done: {done}/{total} task(s) in {now - started:.1f} s")

    def tick(self) -> None:
        """Write a heartbeat of the running stages when no line was written for a while."""
        now = self.clock()
        if not self._open or now - self._last_line < self.heartbeat:
            return
        for stage, (started, done, total) in self._open.items():
            self._write(f"{stage} running: {done}/{total} task(s) done after {now - started:.0f} s")


class _DropErrors(logging.Filter):
    """Keep Prefect's console to warnings.

    Errors reach the user as one ``musc: error`` line; the full records, tracebacks
    included, are in the Prefect API.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def quiet_console() -> None:
    """Keep the console to warnings, progress and the summary.

    Run and task logs still reach the Prefect API (and its UI); only the console handler of
    this process is raised to WARNING and that of the Dask workers it starts (through their
    environment) to CRITICAL, errors are left to the command's own one-line message, and the
    Dask cluster's own INFO messages are dropped.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_DropErrors())
    logging.getLogger("distributed").setLevel(logging.WARNING)


class _StderrHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is when they are emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a message that cannot be shown must not fail the command
            self.handleError(record)


def musc_console() -> None:
    """Messages of the ``musc`` logger (shutdown problems, retries given up) on stderr."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("musc: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@contextmanager
def signals_stop() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Stopped` in the main thread, for the duration.

    The flows run in a worker thread (:func:`run_in_thread`), so this handler, not Prefect's,
    receives the signal: the command stops within a second however busy the machine is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_in_thread(run: Callable[[], T], tick: Callable[[], None], poll: float = 0.5) -> T:
    """Run ``run`` in a daemon thread while this thread waits, calling ``tick`` meanwhile.

    A signal handled in this thread (:func:`signals_stop`) interrupts the wait at once; the
    worker thread is then abandoned (the process is about to leave).

    Returns:
        What ``run`` returned.

    Raises:
        BaseException: what ``run`` raised.
    """
    outcome: dict[str, object] = {}
    context = contextvars.copy_context()  # Prefect's settings (API URL) live in context vars

    def target() -> None:
        try:
            outcome["value"] = context.run(run)
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name="musc-flows", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll)
        tick()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def with_flow_progress(
    args: argparse.Namespace,
    run: Callable[[], T],
    modules: Sequence[str] = (),
    first: Callable[[], object] | None = None,
) -> T:
    """Run flows with progress and one Prefect API, in a worker thread.

    Progress: bars on a terminal, stage lines (:class:`StageLog`) otherwise, nothing under
    ``--quiet``. The API is ``PREFECT_API_URL`` when set, else a local server started for
    the command.

    Args:
        args: the parsed command line (``quiet``).
        run: runs the flows; called in a worker thread once the API answers.
        modules: the modules ``run`` imports (the flows, with torch and timm behind them:
            ~10 s). They are imported while the local server starts, which takes as long on
            the other core, instead of after it.
        first: work that ``run`` needs done first (e.g. listing the dataset's categories),
            also done while the server starts, before the imports; what it raises stops the
            server and is raised here.
    """
    from flows.progress import add_reporter, remove_reporter
    from infra.prefect_api import prefect_api

    reporter: StageProgress | StageLog | None = None
    if not args.quiet:
        reporter = StageProgress() if sys.stderr.isatty() else StageLog()
        add_reporter(reporter)
    try:
        def while_starting() -> None:
            if first is not None:
                first()
            for module in modules:
                importlib.import_module(module)

        with prefect_api(while_starting=while_starting):
            return run_in_thread(run, reporter.tick if reporter else lambda: None)
    finally:
        if reporter is not None:
            remove_reporter(reporter)


#: Environment variables that give an option its default (the declaration's otherwise).
ENV_DEFAULTS = {"storage": "MUSC_STORAGE"}


def _add_settings(
    parser: argparse.ArgumentParser,
    models: Sequence[type[BaseModel]],
    exclude: Sequence[str] = (),
    positional: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> None:
    """The options of the settings models (:mod:`flows.settings`), one group per model.

    Args:
        parser: the subcommand's parser.
        models: the models whose fields become options.
        exclude: fields the command sets itself.
        positional: fields given as positional arguments.
        env: the environment giving defaults (:data:`ENV_DEFAULTS`); None for the process's.
    """
    env = os.environ if env is None else env
    for model in models:
        group = parser.add_argument_group(
            model.__name__, (model.__doc__ or "").strip().splitlines()[0]
        )
        add_model_options(
            group, model, exclude, [p for p in positional if p in model.model_fields]
        )
    for field, variable in ENV_DEFAULTS.items():
        if parser.get_default(field) is not None and env.get(variable):
            parser.set_defaults(**{field: env[variable]})


def _add_run_flags(parser: argparse.ArgumentParser, set_aside: bool = True) -> None:
    """Options of the command itself (not settings of a flow)."""
    if set_aside:
        parser.add_argument(
            "--batch", default=None,
            help="batch id of this run, not recorded on its line yet (default: the UTC start "
            "time and a random suffix)",
        )
        parser.add_argument(
            "--fail-on-set-aside",
            action="store_true",
            help=f"exit with status {EXIT_SET_ASIDE} when any sample had to be set aside",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--verbose", action="store_true", help="print Prefect and Dask INFO logs on the console"
    )


#: Settings of a run that scores a dataset's lines (``score``, ``eval``, ``demo``).
LINE_MODELS = (Backbones, Algorithm, RollingBank, LineRun)
#: The category (and line) of the line ``demo`` generates.
DEMO_CATEGORY = "demo_part"
#: Where ``demo`` differs from the declarations: random weights, storage below ``--out``.
DEMO_DEFAULTS = {"weights_2d": "random", "weights_3d": "random", "storage": None}


EXIT_HELP = f"""exit status:
  {EXIT_OK}    every line scored
  {EXIT_INTERNAL}    internal error (a bug, or storage lost or full mid-run)
  {EXIT_USAGE}    usage or configuration error (nothing was started), or the batch was
       recorded by another run meanwhile (its record is kept)
  {EXIT_SET_ASIDE}    a sample was set aside and --fail-on-set-aside was given
  {EXIT_NOT_SCORED}    a line was not scored (fewer than 2 usable samples)
  {EXIT_INTERRUPTED}  stopped by Ctrl-C (SIGINT); re-run to resume
  {EXIT_TERMINATED}  stopped by SIGTERM; re-run to resume
"""


def _shows_default(action: argparse.Action) -> bool:
    return action.default not in (None, False, argparse.SUPPRESS) and bool(action.option_strings)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help names it); the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if _shows_default(action) and "default" not in text:
            text = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text or action.help


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand.

    Args:
        env: the environment that gives some options their default (``$MUSC_STORAGE``);
            None for the process's.
    """
    parser = argparse.ArgumentParser(
        prog="musc",
        description="Zero-shot industrial anomaly detection with MuSc-V2.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic product line (MVTec 3D-AD layout)")
    _add_settings(synth, (SynthLine,))

    score_cmd = sub.add_parser("score", help="score a dataset's lines and write results")
    _add_settings(score_cmd, (LineInput,), exclude=("category",), positional=("data",))
    score_cmd.add_argument("--category", default="all", help="a category name or 'all'")
    score_cmd.add_argument("--out", required=True,
                           help="output folder or s3:// prefix (one sub-folder per line)")
    _add_settings(score_cmd, LINE_MODELS, exclude=("out",), env=env)
    _add_run_flags(score_cmd)

    again = sub.add_parser(
        "rescore", help="score a recorded batch again from cached features (no backbone)"
    )
    _add_settings(again, (RecordedBatch, Rescoring, RescoreRun), positional=("line",), env=env)
    _add_run_flags(again, set_aside=False)

    new = sub.add_parser(
        "score-new",
        help="score new parts against a line's recorded batches (only the parts are extracted)",
    )
    _add_settings(new, (NewParts, BankChoice, NewPartsChanges, NewPartsRun),
                  positional=("line", "inputs"), env=env)
    _add_run_flags(new, set_aside=False)

    station = sub.add_parser(
        "serve",
        help="inspection station: keep a line's bank in memory and score one part per HTTP "
        "request (POST /score, GET /health)",
    )
    _add_settings(station, (Station, BankChoice, NewPartsChanges, StationRun),
                  positional=("line",), env=env)
    station.add_argument(
        "--verbose", action="store_true", help="print Prefect INFO logs on the console"
    )

    bench = sub.add_parser(
        "eval",
        help="paper-style evaluation of a benchmark dataset: every category, g subsets, seeds",
    )
    _add_settings(bench, (LineInput,), exclude=("data_format", "category", "line", "samples"),
                  positional=("data",))
    bench.add_argument("--format", dest="data_format",
                       choices=[f for f in FORMATS if f != "folder"], required=True,
                       help="dataset layout")
    bench.add_argument("--category", nargs="+", default=None,
                       help="categories to evaluate (default: all)")
    bench.add_argument("--subsets", type=int, default=1,
                       help="g: split each category's test set into g random subsets, each "
                       "scored on its own (paper: 1, 2, 3)")
    bench.add_argument("--seeds", type=int, default=10,
                       help="random partitions (seeds 0..N-1) averaged when g > 1 (paper: 10)")
    bench.add_argument("--out", required=True, help="output folder or s3:// prefix")
    _add_settings(bench, LINE_MODELS,
                  exclude=("out", "reference_nights", "reference_samples", "clean_bank"), env=env)
    _add_run_flags(bench)

    demo = sub.add_parser(
        "demo", help="generate a small synthetic line and score it 2D+3D (random weights)"
    )
    demo.add_argument("--out", default="demo", help="folder for the line and the results")
    demo.add_argument("--num-samples", type=int, default=16, help="samples of the line")
    demo.add_argument("--seed", type=int, default=0, help="seed of the line")
    _add_settings(demo, LINE_MODELS, exclude=("out",), env=env)
    _add_run_flags(demo)
    demo.set_defaults(**DEMO_DEFAULTS)
    add_verdict_parser(sub, DEFAULT_STORAGE)
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
        command.epilog = EXIT_HELP
        for action in command._actions:
            if action.help is None and _shows_default(action):
                action.help = "default: %(default)s"
    return parser


def line_settings(args: argparse.Namespace) -> dict[str, BaseModel]:
    """The ``score_line`` settings models the options of ``score``/``eval``/``demo`` hold.

    Raises:
        UsageError: a value a model refuses, named by its option.
    """
    fixed: dict[str, object] = {}
    if args.command == "demo" and args.backbone_3d == "fpfh":
        fixed["weights_3d"] = None  # the demo's random Point-MAE default: not for FPFH
    return {
        "backbones": model_from_args(Backbones, args, **fixed),
        "algorithm": model_from_args(Algorithm, args),
        "bank": model_from_args(RollingBank, args),
        "run": model_from_args(LineRun, args, out=None),
    }


class LineFailed(Exception):
    """A line's run raised: the lines before it are kept, the ones after it not run.

    Attributes:
        lines: summaries of the lines run so far, the failed one last (with ``error``).
        error: what the failed line raised.
    """

    def __init__(self, lines: list[dict], error: Exception) -> None:
        self.lines = lines
        self.error = error
        super().__init__(str(error))


def _score_categories(
    args: argparse.Namespace, data: str, fmt: str, categories: list[str], out: str, batch: str
) -> list[dict]:
    """Run the score-line flow for each category in turn.

    A line that cannot be scored is reported and the next one run; any other error stops
    the run with :class:`LineFailed`, which keeps the summaries of the lines already scored.
    """
    from flows.score_line import LineNotScored, score_line
    from infra.storage import redact
    from tasks.records.result_store import safe_file_stem

    def say(text: str) -> None:
        if not args.quiet:
            print(f"musc: {text}", file=sys.stderr, flush=True)

    lines: list[dict] = []
    settings = args.settings
    for number, category in enumerate(categories, start=1):
        started = time.monotonic()
        say(f"line {category!r} ({number}/{len(categories)}) started")
        destination = f"{out.rstrip('/')}/{safe_file_stem(category)}"
        try:
            summary = score_line(
                data=LineInput(
                    data=data, data_format=fmt, category=category,
                    line=getattr(args, "line", None), samples=getattr(args, "samples", None),
                ),
                batch=batch,
                backbones=settings["backbones"],
                algorithm=settings["algorithm"],
                bank=settings["bank"],
                run=settings["run"].model_copy(update={"out": destination}),
            )
        except LineNotScored as error:
            summary = {
                "line": category,
                "error": str(error),
                "scored": 0,
                "set_aside": [[a.name, a.path, a.problem] for a in error.set_aside],
            }
        except Exception as error:
            lines.append({"line": category, "error": redact(str(error)), "scored": 0,
                          "failed": type(error).__name__})
            raise LineFailed(lines, error) from error
        lines.append(summary)
        say(f"line {category!r} ended: {summary['scored']} sample(s) scored in "
            f"{time.monotonic() - started:.1f} s")
    return lines


def print_line(summary: dict) -> None:
    """One line's outcome on stdout: counts, stages, outputs, metrics, set-aside samples."""
    line = summary["line"]
    if summary.get("failed"):
        print(f"[{line}] FAILED: {summary['error']}")
    elif summary.get("error"):
        print(f"[{line}] NOT SCORED: {summary['error']}")
    else:
        if summary.get("against_bank"):
            what = (f"{summary['scored']} new part(s) scored against bank "
                    f"{', '.join(summary['bank'])}")
        else:
            what = f"{summary['scored']} samples scored"
        print(
            f"[{line}] {what} in {summary['seconds']:.1f} s "
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
    sys.stdout.flush()


def print_summary(summary: dict) -> None:
    """A flow's summary on stdout, after the random-weights warning when it applies."""
    if summary.get("random_weights"):
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    print_line(summary)


def _random_weights_requested(args: argparse.Namespace, config: MuscConfig) -> bool:
    return (config.uses_2d and args.weights_2d == "random") or (
        config.uses_3d and args.backbone_3d == "point-mae" and args.weights_3d == "random"
    )


def _announce_random_weights() -> None:
    """The random-weights warning, first thing on stderr (it is repeated in the summary)."""
    print(f"musc: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr, flush=True)


def _run_score(args: argparse.Namespace, data: str, fmt: str, out: str) -> int:
    from flows.locations import default_batch_id

    batch = args.batch or default_batch_id()
    categories: list[str] = []

    def list_them() -> None:  # while the Prefect server starts: it imports torch
        from tasks.formats.datasets import list_categories

        found = list_categories(data, fmt) if args.category == "all" else [args.category]
        categories.extend(found)

    failure: LineFailed | None = None
    try:
        lines = with_flow_progress(
            args,
            lambda: _score_categories(args, data, fmt, categories, out, batch),
            modules=("flows.score_line",),
            first=list_them,
        )
    except LineFailed as failed:
        lines, failure = failed.lines, failed
    from musc_core.metrics import summarize
    from tasks.records.result_store import ResultStore

    random_weights = any(s.get("random_weights") for s in lines)
    if random_weights:
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    for summary in lines:
        print_line(summary)
    run = {
        "warning": RANDOM_WEIGHTS_WARNING if random_weights else None,
        "random_weights": random_weights,
        "data": data,
        "format": fmt,
        "batch": batch,
        "lines": lines,
        "not_run": categories[len(lines):],
    }
    try:
        store = ResultStore(out)
        per_category = {s["line"]: s["metrics"] for s in lines if s.get("metrics")}
        if per_category:
            payload: dict[str, object] = {"categories": summarize(per_category)}
            if random_weights:
                payload["warning"] = RANDOM_WEIGHTS_WARNING
            print(f"metrics (per category and mean): {store.write_json('metrics.json', payload)}")
        print(f"run summary: {store.write_json('run.json', run)}", flush=True)
    except Exception:
        if failure is None:
            raise
        # The run's own error is the one to show (a full --out can only fail these writes).
    if failure is not None:
        raise failure.error
    if any(s.get("error") for s in lines):
        return EXIT_NOT_SCORED
    if args.fail_on_set_aside and any(s.get("set_aside") for s in lines):
        return EXIT_SET_ASIDE
    return EXIT_OK


def _run_rescore(args: argparse.Namespace) -> int:
    def run() -> dict:
        from flows.rescore import rescore

        return rescore(**args.settings)

    summary = with_flow_progress(args, run, modules=("flows.rescore",))
    print_summary(summary)
    return EXIT_OK


def _run_score_new(args: argparse.Namespace) -> int:
    def run() -> dict:
        from flows.score_new import score_new

        return score_new(**args.settings)

    summary = with_flow_progress(args, run, modules=("flows.score_new",))
    print_summary(summary)
    return EXIT_OK


def _run_serve(args: argparse.Namespace) -> int:
    from flows.serve_app import serve, start_station

    settings = args.settings
    station = start_station(**settings)
    try:
        serve(station, settings["station"])
    except Stopped:
        pass
    finally:
        station.close()
    print("musc serve: stopped", file=sys.stderr, flush=True)
    return EXIT_OK


def _run_eval(args: argparse.Namespace) -> int:
    from flows.locations import default_batch_id
    from flows.paper_eval import evaluate_benchmark

    settings = args.settings
    eval_id = args.batch or default_batch_id()

    def done(category: str, seed: int, index: int, subsets: int, summary: dict) -> None:
        print(
            f"[{category}] seed {seed}, subset {index}/{subsets}: {summary['scored']} samples "
            f"scored in {summary['seconds']:.1f} s ({len(summary['set_aside'])} set aside)",
            flush=True,
        )

    result = with_flow_progress(
        args,
        lambda: evaluate_benchmark(
            args.data, args.data_format, args.out, settings["backbones"], settings["algorithm"],
            settings["run"], settings["bank"].reference_budget, subsets=args.subsets,
            seeds=range(args.seeds), categories=args.category, eval_id=eval_id, progress=done,
        )
    )
    if result.table["warning"]:
        print(f"\n{RANDOM_WEIGHTS_WARNING}\n")
    print(result.markdown)
    for kind, location in result.outputs.items():
        print(f"    {kind:>9}: {location}")
    return EXIT_OK


def synth_arguments(settings: BaseModel) -> dict[str, object]:
    """``generate_line``'s keyword arguments from a :class:`SynthLine` (its preset applied).

    Raises:
        UsageError: an option the preset sets, given a value other than its default.
    """
    from tasks.synthetic.generator import preset_kwargs

    values = settings.model_dump(exclude={"out", "preset"})
    if settings.preset is None:
        return values
    preset = preset_kwargs(settings.preset)
    for field in preset:
        if values[field] != SynthLine.model_fields[field].default:
            raise UsageError(
                "--preset", f"{settings.preset} sets {option_name(field)}: leave it out"
            )
    return {**values, **preset}


def _run_synth(args: argparse.Namespace) -> int:
    from tasks.synthetic.generator import generate_line

    check_counts(args)
    settings = model_from_args(SynthLine, args)
    summary = generate_line(settings.out, **synth_arguments(settings))
    kinds = ", ".join(f"{count} {kind}" for kind, count in summary.counts.items())
    line = summary.root / summary.category
    print(
        f"synthetic line written: {line}\n"
        f"    {summary.num_samples} samples ({kinds}), {summary.image_size}x"
        f"{summary.image_size} px, shape {summary.shape}\n"
        f"    images, XYZ maps and masks: {line / 'test'}/<kind>/{{rgb,xyz,gt}}/\n"
        f"    description: {line / 'line.json'}"
    )
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from tasks.synthetic.generator import generate_line

    data = Path(args.out) / "line"
    generate_line(
        data,
        category=DEMO_CATEGORY,
        num_samples=args.num_samples,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"synthetic line: {data / 'demo_part'}", flush=True)
    args.category = "all"
    return _run_score(args, str(data), "mvtec3d", str(Path(args.out) / "results"))


def command_settings(args: argparse.Namespace) -> dict[str, BaseModel]:
    """The settings models of a flow-running command, validated (the flow's parameters).

    Raises:
        UsageError: a value a model refuses, named by its option.
    """
    if args.command in ("score", "eval", "demo"):
        return line_settings(args)
    if args.command == "rescore":
        return {
            "target": model_from_args(RecordedBatch, args),
            "changes": model_from_args(Rescoring, args),
            "run": model_from_args(RescoreRun, args),
        }
    if args.command == "serve":
        return {
            "station": model_from_args(Station, args),
            "bank": model_from_args(BankChoice, args),
            "changes": model_from_args(NewPartsChanges, args),
            "run": model_from_args(StationRun, args),
        }
    return {
        "parts": model_from_args(NewParts, args),
        "bank": model_from_args(BankChoice, args),
        "changes": model_from_args(NewPartsChanges, args),
        "run": model_from_args(NewPartsRun, args),
    }


def _recorded_batches(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(line, batch id)`` of each record a ``score``, ``eval`` or ``demo`` run would create."""
    from flows.locations import eval_batches, eval_line
    from tasks.formats.datasets import list_categories

    if args.command == "demo":
        return [(DEMO_CATEGORY, args.batch)]
    if args.command == "eval":
        categories = args.category or list_categories(args.data, args.data_format)
        batches = eval_batches(args.batch, args.subsets, range(args.seeds))
        return [(eval_line(c), b) for c in categories for b in batches]
    categories = (
        list_categories(args.data, args.data_format) if args.category == "all"
        else [args.category]
    )
    return [(args.line or category, args.batch) for category in categories]


def check_args(args: argparse.Namespace) -> None:
    """Every up-front check of the command (nothing is started before it passes).

    Raises:
        UsageError: the first problem found, naming its option.
    """
    if args.command in ("score", "eval", "demo"):
        if args.command == "demo":
            args.storage = args.storage or str(Path(args.out) / "store")
        check_counts(args)
        args.settings = command_settings(args)
        config = check_score(args)
        if args.batch:
            check_new_batches(args.storage, _recorded_batches(args), "--batch")
        if _random_weights_requested(args, config):
            _announce_random_weights()
    elif args.command in ("rescore", "score-new"):
        args.settings = command_settings(args)
        if args.command == "rescore":
            # the changed values against the defaults: a range error is found before a start
            changes = {k: v for k, v in args.settings["changes"].model_dump().items()
                       if v is not None and k in Algorithm.model_fields}
            model_from_args(Algorithm, argparse.Namespace(**changes))
        check_cluster_option(args)
        check_location(args.storage, "--storage")
        if args.out:
            check_location(args.out, "--out")
        record_as = getattr(args, "record_as", None)
        if record_as:
            check_new_batches(args.storage, [(args.line, record_as)], "--record-as")
    elif args.command == "serve":
        args.settings = command_settings(args)
        check_location(args.storage, "--storage")
        if args.out:
            check_location(args.out, "--out")


def full_storage_message(error: BaseException, args: argparse.Namespace) -> str:
    """The one line of an error that says a storage has no space left.

    It names the option (``--storage`` or ``--out``) and the storage root given there when
    the full location lies below one (the most specific), else the location itself, and
    says what to do.

    Args:
        error: an error for which :func:`infra.storage.is_full` holds.
        args: the command's arguments.
    """
    from infra.storage import StorageFull, redact, split_url

    full = _cause(error, StorageFull)
    location = full.location if full is not None else ""
    what = f" while writing {full.what}" if full is not None else ""
    named, fix = (f"the storage {location}" if location else "the storage"), "use a larger one"
    if location:
        protocol, path = split_url(location)
        best = -1
        for option in ("storage", "out"):
            root = getattr(args, option, None)
            if not root:
                continue
            root = redact(root)  # as the location is
            root_protocol, root_path = split_url(root)
            inside = path == root_path or path.startswith(root_path.rstrip("/") + "/")
            if root_protocol == protocol and inside and len(root_path) > best:
                best = len(root_path)
                named = f"the storage {root} (--{option})"
                fix = f"point --{option} at a larger one"
    return (f"{named} is full: no space left on the device{what}; free space there or {fix}, "
            "and re-run: what was stored is reused")


def _cause(error: BaseException, kind: type[E]) -> E | None:
    """``error``, or the error it was raised from or during, that is a ``kind`` (or None)."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def _classify(error: BaseException) -> int:
    """Exit status of an error a command raised (see ``EXIT_HELP``)."""
    from infra.storage import is_full, is_unreachable
    from tasks.records.batch_record import BatchExists

    if isinstance(error, (UsageError, BatchExists)):
        return EXIT_USAGE
    if is_unreachable(error) or is_full(error):
        return EXIT_INTERNAL
    if isinstance(error, (ValueError, FileNotFoundError)):
        return EXIT_USAGE
    return EXIT_INTERNAL


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": _run_synth,
    "score": lambda args: _run_score(args, args.data, args.data_format, args.out),
    "rescore": _run_rescore,
    "score-new": _run_score_new,
    "serve": _run_serve,
    "eval": _run_eval,
    "demo": _run_demo,
    "verdict": run_verdict,
}


def _leave(status: int) -> None:
    """End the process now with ``status``, once output and queued Prefect logs are out.

    The outcome is decided and printed; what the libraries do at interpreter exit (joining
    executor threads, closing clusters left behind, sending logs to a server that is gone)
    took over a minute on a loaded machine and may not delay the command or change its status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if "prefect" in sys.modules:
        from infra.prefect_api import flush_logs

        flush_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``musc`` command line; returns the exit status.

    Options are checked before anything starts (status 2 with one ``musc: error`` line);
    SIGTERM and SIGINT stop the command within a second (143, 130) with one line; an error
    of a run is one ``musc: error`` line (the traceback only with ``--verbose``).

    Args:
        argv: the arguments; None for the process's own (``sys.argv``): the process is then
            the command, and it ends as soon as the outcome is printed (see :func:`_leave`).
    """
    status = _main(argv)
    if argv is None:
        _leave(status)
    return status


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    musc_console()
    try:
        with signals_stop():
            check_args(args)
            if not verbose and args.command != "synth":
                quiet_console()
            return COMMANDS[args.command](args)
    except Stopped as stop:
        print(STOPPED_MESSAGE, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave now instead of waiting for tasks still running in the flow's worker thread:
        # every cache entry is atomic, so a re-run resumes from what was stored.
        os._exit(EXIT_INTERRUPTED if stop.signum == signal.SIGINT else EXIT_TERMINATED)
    except KeyboardInterrupt:
        print(STOPPED_MESSAGE, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except Exception as error:
        from infra.storage import StorageUnreachable, is_full, is_unreachable, redact

        if verbose:
            log.exception("the command failed")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if is_full(error):
            first = full_storage_message(error, args)
        elif is_unreachable(error) and not isinstance(error, (StorageUnreachable, UsageError)):
            first = (f"the storage cannot be reached ({type(error).__name__}: {first}); check "
                     "that it is up and re-run: what was stored is reused")
        print(f"musc: error: {redact(first)}", file=sys.stderr, flush=True)
        return _classify(error)


if __name__ == "__main__":
    sys.exit(main())
