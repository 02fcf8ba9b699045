"""Imports go one way only: flows → tasks → musc_core, and infra stands alone.

Every ``import`` and ``from … import`` of every source file is read with :mod:`ast` (at module
level, inside functions, under ``TYPE_CHECKING``, relative or absolute) and checked against the
packages its layer may not depend on.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The first-party packages (top-level folders of the repository that hold Python sources).
FIRST_PARTY = ("musc_core", "tasks", "flows", "infra", "benchmarks", "tests")
#: Packages each layer must not import.
FORBIDDEN = {
    "musc_core": {"tasks", "flows", "infra", "benchmarks", "tests"},
    "tasks": {"flows", "benchmarks", "tests"},
    "flows": {"benchmarks", "tests"},
    "infra": set(FIRST_PARTY) - {"infra"},
}


def imported_modules(source: str, module: str) -> list[str]:
    """Absolute names of every module a source imports, wherever the import statement is.

    Args:
        source: Python source text.
        module: dotted name of the module the source is (to resolve relative imports).

    Returns:
        The imported module names (``from a.b import c`` gives ``a.b``).
    """
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_import_reader_sees_function_level_relative_and_aliased_imports():
    source = (
        "import numpy as np\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from flows.cli import main\n"
        "def f():\n    import tasks.cache\n    from . import keys\n    from ..infra import hub\n"
    )
    found = imported_modules(source, "tasks.sub.mod")
    assert found == ["numpy", "typing", "flows.cli", "tasks.cache", "tasks.sub", "tasks.infra"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_from_the_layers_above_it(layer):
    files = _sources(layer)
    assert len(files) >= 3, f"found only {len(files)} sources in {layer}/"
    offenders = []
    for path in files:
        for name in imported_modules(path.read_text(encoding="utf-8"), _module_name(path)):
            if name.split(".")[0] in FORBIDDEN[layer]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def _task_modules() -> set[str]:
    """The modules of ``tasks/`` itself (the Prefect tasks and what they share)."""
    paths = (ROOT / "tasks").glob("*.py")
    return {f"tasks.{path.stem}" for path in paths if path.stem != "__init__"}


def test_the_role_subpackages_of_tasks_import_no_task_module():
    subpackages = sorted(p for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").is_file())
    assert len(subpackages) >= 5, [p.name for p in subpackages]
    modules = _task_modules()
    allowed = {"tasks.choices"}  # names shared with the command line, importable at no cost
    offenders = []
    for package in subpackages:
        for path in sorted(package.rglob("*.py")):
            for name in imported_modules(path.read_text(encoding="utf-8"), _module_name(path)):
                if name in modules - allowed or any(
                    name.startswith(f"{m}.") for m in modules - allowed
                ):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_only_the_task_modules_define_prefect_tasks():
    defining = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tasks").rglob("*.py")
        if "@task(" in path.read_text(encoding="utf-8")
    )
    assert defining and all(path.count("/") == 1 for path in defining), defining


@pytest.mark.parametrize("package", ["flows", "tasks"])
def test_no_module_shadows_a_standard_or_installed_module(package):
    """Prefect loads a flow file as a script, which puts its folder first on ``sys.path``.

    A module named like an installed one (``flows/requests.py``) then replaces it for every
    library imported afterwards (Docker's client imports ``requests``).
    """
    import importlib.util
    import sys

    names = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
    shadowing = [
        name for name in names
        if name in sys.stdlib_module_names or importlib.util.find_spec(name) is not None
    ]
    assert shadowing == []
