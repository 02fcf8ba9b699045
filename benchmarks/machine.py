"""The machine a benchmark ran on, recorded in its JSON and printed with its table."""

from __future__ import annotations

import os
from typing import Any

import torch

from musc_core.hardware import cpu_kind


def machine_info() -> dict[str, Any]:
    """Torch version, threads, the CPU kind (model, ISA level, capability, fast bf16), load."""
    kind = cpu_kind()
    return {
        "torch": torch.__version__,
        "threads": kind.threads,
        "cpu_count": os.cpu_count(),
        "cpu_capability": kind.capability,
        "cpu_model": kind.model,
        "cpu_isa": kind.isa,
        "fast_bf16": kind.fast_bf16,
        "cpu_kind": kind.label(),
        "load_average_start": os.getloadavg(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine for a printed table."""
    load = ", ".join(f"{v:.1f}" for v in info["load_average_start"])
    return (
        f"Machine: CPU kind {info['cpu_kind']}, {info['threads']} torch threads of "
        f"{info['cpu_count']} cores, torch {info['torch']}, load average at start {load}"
    )
