"""Scaled dot-product attention of the backbones, with a native bfloat16 kernel on x86 CPUs.

Both backbones spend much of their bf16 time in attention: PyTorch's CPU kernels run its two
64-wide products at 15–20 % of an AVX512-BF16 CPU's bf16 matmul rate. :func:`attention` runs
``softmax(q kᵀ / √d) v`` there with a small C kernel (``kernels/attention_bf16.c``, compiled
with the system's C compiler on first use and kept in a per-user cache) and everywhere else —
float32, CUDA, other head sizes, a CPU without AVX512-BF16, no compiler — with
:func:`torch.nn.functional.scaled_dot_product_attention`, so float32 results are PyTorch's.

The native kernel computes what PyTorch's bf16 flash attention computes (float32 products and
softmax, bf16 probabilities times bf16 values, float32 row sums); its error against the exact
float64 attention is the same size (``tests/core/test_attention.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MethodType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from musc_core.hardware import cpu_kind

_LOG = logging.getLogger(__name__)

#: The kernel's source, next to this module.
SOURCE = Path(__file__).with_name("kernels") / "attention_bf16.c"
#: Compiler flags: the AVX512 subsets the kernel uses (AVX512-BF16 for VDPBF16PS).
CFLAGS = (
    "-O3", "-shared", "-fPIC", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl",
    "-mavx512dq", "-mavx512bf16", "-mfma",
)
#: Seconds a compilation may take before the kernel is given up for this process.
COMPILE_TIMEOUT = 120.0
#: Environment variable naming the folder of compiled kernels (default: the user's cache).
CACHE_ENV = "MUSC_KERNEL_CACHE"

_I64x3 = ctypes.c_int64 * 3


class NativeKernel(NamedTuple):
    """The loaded kernel library.

    Attributes:
        path: the shared library.
        run: ``musc_attention_bf16`` (see the C source for its arguments).
        blocks: ``musc_attention_blocks(n)``: query blocks per head.
        head_dim: the head dimension the kernel computes.
    """

    path: Path
    run: ctypes._CFuncPtr
    blocks: ctypes._CFuncPtr
    head_dim: int


_lock = threading.Lock()
_kernel: NativeKernel | None = None
_unavailable: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$MUSC_KERNEL_CACHE``, else ``~/.cache/musc/kernels``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "musc" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.splitlines()[0] if done.stdout else ""


def build_kernel(directory: Path | None = None) -> Path:
    """Compile the kernel into the cache (once per source, flags and compiler); its path.

    The library is written under a temporary name and renamed into place, so processes that
    compile at the same time never load a half-written file.

    Args:
        directory: the cache folder (default :func:`kernel_cache_dir`).

    Returns:
        The shared library's path.

    Raises:
        RuntimeError: no C compiler, or the compilation failed (its message is included).
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(
        source + " ".join(CFLAGS).encode() + _compiler_version(compiler).encode()
    ).hexdigest()[:16]
    folder = directory or kernel_cache_dir()
    target = folder / f"attention_bf16-{digest}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".attention_bf16-", suffix=".so", dir=folder)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *CFLAGS, "-o", partial, str(SOURCE)],
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{compiler} took over {COMPILE_TIMEOUT:.0f} s") from error
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load(path: Path) -> NativeKernel:
    library = ctypes.CDLL(str(path))
    run = library.musc_attention_bf16
    pointer = ctypes.POINTER(ctypes.c_int64)
    run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [pointer] * 4 + [
        ctypes.c_float, ctypes.c_int64, ctypes.c_int64,
    ]
    run.restype = ctypes.c_int
    blocks = library.musc_attention_blocks
    blocks.argtypes = [ctypes.c_int64]
    blocks.restype = ctypes.c_int64
    head_dim = library.musc_attention_head_dim
    head_dim.argtypes = []
    head_dim.restype = ctypes.c_int64
    return NativeKernel(path, run, blocks, int(head_dim()))


def cpu_runs_kernel() -> bool:
    """Whether this CPU executes the kernel's instructions (x86 with AVX512-BF16)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return cpu_kind().isa in ("AVX512-BF16", "AMX")


def native_kernel() -> NativeKernel | None:
    """The kernel, compiled and loaded on first use; None where it cannot run.

    Where the CPU lacks AVX512-BF16 this is None without compiling. A failed compilation
    is logged once (as a warning naming the reason) and attention falls back to PyTorch's.
    """
    global _kernel, _unavailable
    if _kernel is not None or _unavailable is not None:
        return _kernel
    with _lock:
        if _kernel is not None or _unavailable is not None:
            return _kernel
        if not cpu_runs_kernel():
            _unavailable = "this CPU has no AVX512-BF16"
            return None
        try:
            _kernel = _load(build_kernel())
        except (RuntimeError, OSError, AttributeError) as error:
            _unavailable = str(error)
            _LOG.warning(
                "native bf16 attention unavailable (%s); using PyTorch's attention, which is "
                "about 2x slower in bf16 on this CPU", error,
            )
        return _kernel


def unavailable_reason() -> str | None:
    """Why :func:`native_kernel` gave None (None when it loaded or was not tried yet)."""
    return _unavailable


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_threads
    with _lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="musc-attention")
            _pool_threads = threads
        return _pool


def _strides(tensor: torch.Tensor) -> ctypes.Array:
    return _I64x3(*tensor.stride()[:3])


def native_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` runs these inputs on the native kernel."""
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape or q.requires_grad:
        return False
    if any(t.stride(3) != 1 for t in (q, k, v)) or q.shape[2] < 1:
        return False
    kernel = native_kernel()
    return kernel is not None and q.shape[3] == kernel.head_dim


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / √d) v`` on the native kernel, split over ``torch.get_num_threads()``.

    Args:
        q: (B, H, N, d) bfloat16 queries, any strides but a contiguous last dimension.
        k: (B, H, N, d) keys, as ``q``.
        v: (B, H, N, d) values, as ``q``.

    Returns:
        (B, H, N, d) bfloat16: a view of a contiguous (B, N, H, d) tensor, so
        ``out.transpose(1, 2).reshape(B, N, H * d)`` copies nothing.

    Raises:
        RuntimeError: inputs the kernel does not take (see :func:`native_applies`).
    """
    if not native_applies(q, k, v):
        raise RuntimeError("native attention needs CPU bf16 (B, H, N, 64) inputs and the kernel")
    kernel = native_kernel()
    assert kernel is not None
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, dtype=torch.bfloat16)
    if out.numel() == 0:
        return out.transpose(1, 2)
    q_strides, k_strides, v_strides = _strides(q), _strides(k), _strides(v)
    o_strides = _I64x3(tokens * heads * dim, dim, heads * dim)
    units = batch * heads * int(kernel.blocks(tokens))
    threads = max(1, min(torch.get_num_threads(), units))
    bounds = [units * t // threads for t in range(threads + 1)]

    def run(part: int) -> int:
        return kernel.run(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), heads, tokens, dim,
            q_strides, k_strides, v_strides, o_strides, dim**-0.5, bounds[part],
            bounds[part + 1],
        )

    others = []
    if threads > 1:
        pool = _thread_pool(threads - 1)
        others = [pool.submit(run, part) for part in range(1, threads)]
    codes = [run(0), *(future.result() for future in others)]
    if any(codes):
        raise RuntimeError(f"native attention failed with codes {codes}")
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention ``softmax(q kᵀ / √d) v``, no mask, no dropout.

    Args:
        q: (B, H, N, d) queries.
        k: (B, H, N, d) keys.
        v: (B, H, N, d) values.

    Returns:
        (B, H, N, d) in the inputs' dtype: from the native kernel for CPU bf16 inputs with
        d = 64 where it runs, else from ``F.scaled_dot_product_attention``.
    """
    if native_applies(q, k, v):
        return native_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _timm_forward(
    module: nn.Module,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """A plain timm ``Attention.forward`` that computes ``qkv`` once on every path.

    Masked, causal and training calls go to timm's own forward. Otherwise the ``qkv``
    projection runs once and its heads go to the native kernel where it applies
    (:func:`native_applies`: CPU bf16 inference, 64-wide heads), and else through the rest of
    timm's forward, the same operations in the same order (``F.scaled_dot_product_attention``
    where timm's ``fused_attn`` is set, its explicit softmax otherwise), so float32, CUDA and
    AVX2 results are timm's bit for bit. Only layers :func:`_plain_timm_attention` accepts
    (identity q/k norms and output norm, no gate) are routed here.

    Args:
        module: the routed ``timm.layers.attention.Attention``.
        x: (B, N, C) tokens.
        attn_mask: timm's mask argument (a mask sends the call to timm's forward).
        is_causal: timm's causal flag (True sends the call to timm's forward).

    Returns:
        (B, N, C_out) tokens after the output projection.
    """
    if attn_mask is not None or is_causal or module.training:
        return type(module).forward(module, x, attn_mask, is_causal)
    batch, tokens, _ = x.shape
    qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if native_applies(q, k, v):
        out = native_attention(q, k, v)
    elif module.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    else:
        weights = ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = module.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(batch, tokens, module.attn_dim)
    return module.proj_drop(module.proj(out))


def _plain_timm_attention(module: nn.Module) -> bool:
    """A timm ``Attention`` that is exactly qkv → attention → proj (no norms, no gate)."""
    try:
        from timm.layers.attention import Attention
    except ImportError:
        return False
    return (
        type(module) is Attention
        and isinstance(module.q_norm, nn.Identity)
        and isinstance(module.k_norm, nn.Identity)
        and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)
        and getattr(module, "gate", None) is None
        and all(
            hasattr(module, name)
            for name in ("num_heads", "head_dim", "attn_dim", "scale", "fused_attn", "attn_drop")
        )
    )


def use_native_attention(model: nn.Module) -> int:
    """Route a timm model's plain attention layers through :func:`attention`'s native path.

    Each plain ``timm.layers.attention.Attention`` gets an instance ``forward``
    (:func:`_timm_forward`) that computes ``qkv`` once, runs unmasked bf16 inference on the
    native kernel and finishes everything else (float32, CUDA, a CPU without AVX512-BF16) as
    timm's own ``forward`` does; masked, causal and training calls go to timm's ``forward``.
    Parameters and their names are unchanged.

    Args:
        model: a timm model (e.g. a VisionTransformer).

    Returns:
        How many attention layers were routed.
    """
    routed = 0
    for module in model.modules():
        if _plain_timm_attention(module):
            module.forward = MethodType(_timm_forward, module)
            routed += 1
    return routed
