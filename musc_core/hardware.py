"""What the machine computes fast: native bfloat16 on the CPU or GPU, and the CPU's kind.

Two x86 CPU kinds are common on scoring nodes: ones with AVX512-BF16 (or AMX), where a bf16
GEMM runs 2–4× faster than float32, and AVX2-only ones, where PyTorch's bf16 GEMM falls back
to a scalar kernel about 300× *slower* than float32. Every dtype decision of the pipeline goes
through :func:`resolve_compute_dtype`, so ``auto`` never picks bf16 where it is slow and an
explicit ``bfloat16`` there is refused with a message instead of running for hours.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import NamedTuple

import torch

from musc_core.config import DISTANCE_DTYPES as COMPUTE_DTYPES
from musc_core.config import MuscConfig

#: The settings that choose a compute dtype (``auto``, ``float32`` or ``bfloat16`` each).
DTYPE_SETTINGS = ("vit_dtype", "point_dtype", "distance_dtype")

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


class CpuKind(NamedTuple):
    """The CPU a process runs on, as benchmarks and run records name it.

    Attributes:
        model: model name from the OS (``/proc/cpuinfo``), or the platform's processor string.
        isa: highest vector ISA level seen: ``AVX512-BF16``, ``AMX``, ``AVX512``, ``AVX2``, …
        capability: ``torch.backends.cpu.get_cpu_capability()`` (the kernels torch dispatches).
        fast_bf16: whether bf16 GEMMs run natively (see :func:`cpu_has_fast_bf16`).
        threads: ``torch.get_num_threads()``.
    """

    model: str
    isa: str
    capability: str
    fast_bf16: bool
    threads: int

    def label(self) -> str:
        """One line for tables: ``AMD EPYC (AVX2, torch AVX2, fast bf16: no, 2 threads)``."""
        fast = "yes" if self.fast_bf16 else "no"
        return (
            f"{self.model} ({self.isa}, torch {self.capability}, fast bf16: {fast}, "
            f"{self.threads} threads)"
        )


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 GEMMs natively (faster than float32).

    On x86 that needs the AVX512-BF16 or AMX instructions: oneDNN also "supports" bf16 on plain
    AVX512 by emulation (no faster than float32), and on AVX2 torch uses a scalar fallback
    (≈ 0.3 GFLOP/s). Elsewhere (Arm) oneDNN's own bf16 support is taken as native.
    """
    try:
        if not (
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ):
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() in _X86:
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def _cpu_flags() -> tuple[str, set[str]]:
    """(model name, flag set) from ``/proc/cpuinfo``; empty flags where it does not exist."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    family = number = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and value and model == (platform.processor() or platform.machine()):
            model = value
        elif key == "cpu family" and not family:
            family = value
        elif key == "model" and not number:
            number = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    if family:  # names such as "AMD EPYC" cover several generations: add family and model
        model = f"{model}, family {family} model {number}"
    return model, flags


def cpu_kind() -> CpuKind:
    """The CPU this process runs on (model, ISA level, torch capability, fast bf16)."""
    model, flags = _cpu_flags()
    if "amx_bf16" in flags:
        isa = "AMX"
    elif "avx512_bf16" in flags:
        isa = "AVX512-BF16"
    elif "avx512f" in flags:
        isa = "AVX512"
    elif "avx2" in flags:
        isa = "AVX2"
    elif flags:
        isa = "other"
    else:
        isa = platform.machine()
    return CpuKind(
        model=model,
        isa=isa,
        capability=str(torch.backends.cpu.get_cpu_capability()),
        fast_bf16=cpu_has_fast_bf16(),
        threads=torch.get_num_threads(),
    )


def _cuda_has_fast_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older signature without including_emulation
            return bool(torch.cuda.is_bf16_supported())


def has_fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products are native (fast) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_has_fast_bf16(device)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_compute_dtype(
    name: str, device: torch.device | str, option: str = "distance_dtype"
) -> torch.dtype:
    """Compute dtype for a config value (``auto``, ``float32``, ``bfloat16``) on a device.

    ``auto`` is bfloat16 where the device has native bf16 (CUDA with bf16, CPUs with
    AVX512-BF16/AMX, oneDNN bf16 on Arm) and float32 elsewhere. An explicit ``bfloat16`` on a
    device without native bf16 is refused: it would compute the same numbers as on a fast
    device but several hundred times slower than float32. float16 is never used.

    Args:
        name: the config value.
        device: where the computation runs.
        option: the setting's name, for the error message.

    Returns:
        ``torch.float32`` or ``torch.bfloat16``.

    Raises:
        ValueError: for an unknown value, or ``bfloat16`` on a device without native bf16.
    """
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name == "float32":
        return torch.float32
    fast = has_fast_bf16(device)
    if name == "bfloat16" and not fast:
        where = cpu_kind().label() if torch.device(device).type == "cpu" else str(device)
        raise ValueError(
            f"{option}=bfloat16 needs native bfloat16 on the device, and {where} has none "
            "(on x86 CPUs: AVX512-BF16 or AMX); bf16 would run several hundred times slower "
            f"than float32 here. Use {option}=auto (float32 on this machine) or float32."
        )
    return torch.bfloat16 if fast else torch.float32


def resolved_dtypes(
    config: MuscConfig, device: torch.device | str, settings: tuple[str, ...] = DTYPE_SETTINGS
) -> dict[str, str]:
    """What each dtype setting computes in on ``device``, by name (:func:`resolve_compute_dtype`).

    Args:
        config: the settings as given (``auto`` allowed).
        device: where the computation runs.
        settings: which of :data:`DTYPE_SETTINGS` to resolve.

    Returns:
        ``{"vit_dtype": "bfloat16", ...}``: ``"float32"`` or ``"bfloat16"`` per setting.

    Raises:
        ValueError: an explicit ``bfloat16`` on a device without native bf16.
    """
    return {
        name: str(resolve_compute_dtype(getattr(config, name), device, name)).removeprefix("torch.")
        for name in settings
    }
