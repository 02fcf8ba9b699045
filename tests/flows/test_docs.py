"""The documentation names only options that exist, and depends on nothing outside the repository.

Every ``--option`` written in README.md or docs/*.md must be an option of some ``musc``
subcommand (collected from the parser of ``flows/cli.py``), unless the docs name it for another
program: then it must exist in that program (a benchmark script's source, or Prefect's CLI).
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
#: Options the docs name for a benchmark script, with the script that defines them.
BENCHMARK_OPTIONS = {
    "--table": "benchmarks/bench_flags.py",
    "--kind": "benchmarks/bench_bank.py",
    "--groups": "benchmarks/bench_fpfh.py",
    "--size": "benchmarks/bench_fpfh.py",
    "--only": "benchmarks/bench_kernels.py",
    "--repeat": "benchmarks/bench_kernels.py",
    "--peak-sizes": "benchmarks/bench_kernels.py",
    "--config": "benchmarks/bench_serve.py",
    "--parts": "benchmarks/bench_serve.py",
    "--warmup": "benchmarks/bench_serve.py",
    "--bank-samples": "benchmarks/bench_serve.py",
    "--sizes": "benchmarks/bench_scale.py",
    "--budget": "benchmarks/bench_scale.py",
    "--plan-sizes": "benchmarks/bench_scale.py",
    "--plan-keys-max": "benchmarks/bench_scale.py",
    "--draws": "benchmarks/bench_references.py",
    "--before": "benchmarks/bench_cli.py",
    "--lines": "benchmarks/bench_fpfh.py",
    "--reps": "benchmarks/bench_flags.py",
    "--n": "benchmarks/bench_cli.py",
    "--runs": "benchmarks/bench_cli.py",
    "--compare": "benchmarks/bench_report.py",
    "--values-per-pass": "benchmarks/bench_report.py",
}
#: Options the docs name for Prefect's CLI (the deployment steps), with their command.
PREFECT_OPTIONS = {
    "--param": ("deployment", "run"),
    "--watch": ("deployment", "run"),
    "--pool": ("worker", "start"),
    "--type": ("work-pool", "create"),
    "--all": ("deploy",),
}


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of a parser and of all its subcommands, recursively."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= parser_options(sub)
    return found


def named_options(text: str) -> set[str]:
    """Every ``--option`` a text names."""
    return set(OPTION.findall(text))


def _docs_options() -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): named_options(p.read_text(encoding="utf-8")) for p in DOCS}


def test_the_option_reader_finds_options_in_prose_tables_and_code():
    text = "use `--flag-k 3`, | `--num-groups`, `--x` |\n  --shard-size=4, not a---b, --- or x--y"
    assert named_options(text) == {"--flag-k", "--num-groups", "--x", "--shard-size"}


def test_every_option_the_docs_name_exists_in_the_musc_cli():
    known = parser_options(build_parser())
    assert {"--verbose", "--interval-ratio", "--rescoring-windows", "--flag-k"} <= known
    others = set(BENCHMARK_OPTIONS) | set(PREFECT_OPTIONS)
    unknown = {
        doc: sorted(found - known - others) for doc, found in _docs_options().items()
    }
    assert {doc: names for doc, names in unknown.items() if names} == {}


def test_the_docs_document_verbose_and_every_rescore_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rescore = parser_options(sub.choices["rescore"]) - {"-h", "--help"}
    named = set().union(*_docs_options().values())
    assert "--verbose" in named
    assert sorted(rescore - named) == []


@pytest.mark.parametrize("option", sorted(BENCHMARK_OPTIONS))
def test_benchmark_options_the_docs_name_exist_in_their_script(option):
    assert option in set().union(*_docs_options().values()), f"{option} no longer in the docs"
    source = (ROOT / BENCHMARK_OPTIONS[option]).read_text(encoding="utf-8")
    assert f'"{option}"' in source


def test_prefect_options_the_docs_name_exist_in_prefect():
    named = set().union(*_docs_options().values())
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for command in sorted(set(PREFECT_OPTIONS.values())):
        result = subprocess.run(
            [sys.executable, "-m", "prefect", *command, "--help"],
            capture_output=True, text=True, env=env, timeout=120,
        )
        shown = named_options(result.stdout + result.stderr)
        for option, owner in PREFECT_OPTIONS.items():
            if owner == command:
                assert option in named, f"{option} no longer in the docs"
                assert option in shown, f"prefect {' '.join(command)} has no {option}"


def test_the_docs_depend_on_no_file_outside_the_repository():
    outside = re.compile(r"SPEC\.md|\.\./shared|shared/SPEC|shared/paper")
    sources = DOCS + sorted(
        p for folder in ("musc_core", "tasks", "flows", "infra", "benchmarks", "tests")
        for p in (ROOT / folder).rglob("*.py")
        if p != Path(__file__).resolve()  # this file names the patterns
    )
    offenders = [
        str(p.relative_to(ROOT)) for p in sources if outside.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_relative_links_of_the_docs_point_at_files_of_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    missing = []
    for path in DOCS:
        for target in link.findall(path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_file():
                missing.append(f"{path.relative_to(ROOT)} → {target}")
    assert missing == []


def test_no_doc_holds_a_merge_conflict_marker():
    marked = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in DOCS
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="
    ]
    assert marked == []
