"""musc_core is a pure library: no orchestration, storage or file-format code."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import musc_core

ORCHESTRATION_AND_STORAGE = ("prefect", "dask", "distributed", "zarr", "fsspec", "s3fs")
FILE_FORMATS = ("PIL", "tifffile", "yaml", "csv", "json", "imageio", "cv2")


def test_importing_the_core_loads_no_orchestration_or_storage_library():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import musc_core\n"
        "for m in pkgutil.iter_modules(musc_core.__path__):\n"
        "    importlib.import_module('musc_core.' + m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out.strip().splitlines()[-1])
    assert "musc_core.pipeline" in modules  # the walk really imported the stages
    leaked = sorted({m.split(".")[0] for m in modules} & set(ORCHESTRATION_AND_STORAGE))
    assert leaked == [], f"importing musc_core loaded {leaked}"


def test_core_sources_import_no_file_format_library():
    offenders = []
    for path in Path(musc_core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in FILE_FORMATS + ORCHESTRATION_AND_STORAGE]
            offenders += [f"{path.name}: {n}" for n in bad]
    assert offenders == []
