"""Scaled dot-product attention of the backbones, with a native bfloat16 kernel on x86 CPUs.

Both backbones spend much of their bf16 time in attention: PyTorch's CPU kernels run its two
64-wide products at 15–20 % of an AVX512-BF16 CPU's bf16 matmul rate. :func:`attention` runs
``softmax(q kᵀ / √d) v`` there (AVX512-BF16 without AMX: :func:`kernel_preferred`) with a small
C kernel (``kernels/attention_bf16.c``, compiled with the system's C compiler on first use into
a private per-user cache, checked against the SHA-256 recorded when it was built, and run once
in a child process before it is loaded) and everywhere else — float32, CUDA, other head sizes, a
CPU without AVX512-BF16, no compiler, a cache folder others can write to — with
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
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
#: Name prefix of a compilation's temporary files (followed by the compiling process's id).
TEMP_PREFIX = ".attention_bf16-"
#: Seconds after which a temporary file is stale whoever left it (> COMPILE_TIMEOUT).
STALE_TEMP_AGE = 600.0
#: Why a library that was never built here is not loaded.
MISSING = "it is missing"
#: Why a library without its SHA-256 record is not loaded.
NO_RECORD = "it has no SHA-256 record"
#: The cache folder's build lock.
LOCK_NAME = "attention_bf16.lock"
#: Seconds the instruction-set probe may take.
PROBE_TIMEOUT = 60.0
#: The probe (:func:`probe_kernel`): ctypes only. Two tokens whose keys are equal get equal
#: logits, so each output row is the mean of the two value rows, j + 1 exactly in bf16.
PROBE_SOURCE = """
import ctypes, struct, sys
lib = ctypes.CDLL(sys.argv[1])
i64 = ctypes.c_int64
run = lib.musc_attention_bf16
run.argtypes = [ctypes.c_void_p] * 4 + [i64] * 3 + [ctypes.POINTER(i64)] * 4 + [
    ctypes.c_float, i64, i64]
run.restype = ctypes.c_int
lib.musc_attention_blocks.argtypes = [i64]
lib.musc_attention_blocks.restype = i64
def bf16(x):
    return struct.unpack("<I", struct.pack("<f", x))[0] >> 16
d, n = 64, 2
rows = ctypes.c_uint16 * (n * d)
q, k = rows(*[bf16(0.25)] * (n * d)), rows(*[bf16(0.5)] * (n * d))
v = rows(*[bf16(j) for j in range(d)], *[bf16(j + 2) for j in range(d)])
o = rows()
strides = (i64 * 3)(n * d, n * d, d)
code = run(q, k, v, o, 1, n, d, strides, strides, strides, strides, d ** -0.5, 0,
           lib.musc_attention_blocks(n))
sys.exit(0 if code == 0 and list(o) == [bf16(j + 1) for j in range(d)] * n else 3)
"""

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
    """Where compiled kernels are kept: ``$MUSC_KERNEL_CACHE``, else ``~/.cache/musc/kernels``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` where it is set. The folder is only used when
    it is this user's alone (:func:`private_cache_dir`).
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "musc" / "kernels"


class UnsafeCacheError(RuntimeError):
    """The kernel cache folder, or a file in it, is not this user's alone."""


def _require_private(path: Path, info: os.stat_result) -> None:
    user = os.geteuid()
    if info.st_uid != user:
        raise UnsafeCacheError(
            f"{path} is owned by uid {info.st_uid}, not by this user (uid {user})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(
            f"{path} is writable by its group or by others (mode {stat.S_IMODE(info.st_mode):o})"
        )


def private_cache_dir(directory: Path | None = None) -> Path:
    """The kernel cache folder, created with mode 0700 if missing and checked to be private.

    Args:
        directory: the folder (default :func:`kernel_cache_dir`); missing parents are created
            with the default mode, the folder itself with mode 0700.

    Returns:
        The folder.

    Raises:
        UnsafeCacheError: it is not a folder, is owned by another user, or is writable by its
            group or by others (nothing in it is then read, loaded or written).
        OSError: it could not be created.
    """
    folder = directory or kernel_cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheError(f"{folder} is not a folder")
    _require_private(folder, info)
    return folder


def record_path(library: Path) -> Path:
    """The file next to a library that records its SHA-256 (``sha256sum`` format)."""
    return library.with_name(library.name + ".sha256")


def _untrusted(library: Path) -> str | None:
    """Why a cached library must not be loaded (None: it matches its record).

    Both files must be regular files (not links) owned by this user and writable by nobody
    else, and the library's SHA-256 must be the one recorded when it was built.
    """
    record = record_path(library)
    if not os.path.lexists(library):
        return MISSING
    try:
        infos = [os.lstat(library), os.lstat(record)]
    except FileNotFoundError:
        return NO_RECORD
    for path, info in zip((library, record), infos, strict=True):
        if not stat.S_ISREG(info.st_mode):
            return f"{path.name} is not a regular file"
        try:
            _require_private(path, info)
        except UnsafeCacheError as error:
            return str(error)
    recorded = record.read_text(encoding="ascii", errors="replace").split()
    actual = hashlib.sha256(library.read_bytes()).hexdigest()
    if not recorded or recorded[0] != actual:
        return "its SHA-256 differs from the one recorded when it was built"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, now: float | None = None) -> list[Path]:
    """Delete what killed compilations left: ``.attention_bf16-<pid>-*`` temporary files.

    A temporary file is stale when it is older than :data:`STALE_TEMP_AGE` (a live
    compilation gives up after :data:`COMPILE_TIMEOUT`) or when the process named in it is
    gone. Called with the cache's build lock held. Temporary files are never loaded.

    Args:
        folder: the (private) cache folder.
        now: the current time in seconds since the epoch (default ``time.time()``).

    Returns:
        The files removed.
    """
    now = time.time() if now is None else now
    removed = []
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        owner = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        dead = owner.isdigit() and not _pid_alive(int(owner))
        if dead or now - info.st_mtime > STALE_TEMP_AGE:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        _LOG.info("removed %d stale temporary kernel files from %s", len(removed), folder)
    return removed


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold the cache folder's build lock (``flock`` on ``attention_bf16.lock``).

    Raises:
        RuntimeError: another process held it for longer than a compilation may take.
    """
    import fcntl

    handle = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + COMPILE_TIMEOUT + 30.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"another process holds {folder / LOCK_NAME} for too long"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(handle)


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


def _compile(compiler: str, output: Path) -> None:
    """Compile :data:`SOURCE` with :data:`CFLAGS` into ``output``.

    Raises:
        RuntimeError: the compiler failed (its message is included) or timed out.
    """
    try:
        done = subprocess.run(
            [compiler, *CFLAGS, "-o", str(output), str(SOURCE)],
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{compiler} took over {COMPILE_TIMEOUT:.0f} s") from error
    if done.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")


def _temporary(folder: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder
    )
    os.close(handle)
    return Path(name)


def _compile_into(compiler: str, target: Path) -> None:
    """Compile into a temporary file, record its SHA-256, then rename both into place.

    The record is renamed first and the library last, so a library under its final name
    always has its record next to it; a compilation killed on the way leaves only
    temporary files (removed by :func:`remove_stale_temporaries`) or a record without a
    library, neither of which is ever loaded.
    """
    partial = _temporary(target.parent, ".so")
    pending = _temporary(target.parent, ".sha256")
    try:
        _compile(compiler, partial)
        os.chmod(partial, 0o700)
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        with open(pending, "w", encoding="ascii") as out:
            out.write(f"{digest}  {target.name}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(pending, record_path(target))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        pending.unlink(missing_ok=True)


def build_kernel(directory: Path | None = None) -> Path:
    """Compile the kernel into the cache (once per source, flags and compiler); its path.

    The cache folder must be this user's alone (:func:`private_cache_dir`). A library is
    returned only when it matches the SHA-256 recorded when it was built; a library that does
    not (changed, not a private regular file, without its record) is removed and compiled
    again, with a warning (an INFO line where only the record is missing, as for a library
    an earlier version built). Compilations hold the folder's lock, so processes that start
    together compile once, and they clear what killed compilations left
    (:func:`remove_stale_temporaries`).

    Args:
        directory: the cache folder (default :func:`kernel_cache_dir`).

    Returns:
        The shared library's path, verified against its record.

    Raises:
        UnsafeCacheError: the cache folder is not private.
        RuntimeError: no C compiler, the compilation failed (its message is included), or
            another process held the build lock too long.
        OSError: the folder or a file in it could not be created, read or renamed.
    """
    folder = private_cache_dir(directory)
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _compiler_version(compiler).encode()
    ).hexdigest()[:16]
    target = folder / f"attention_bf16-{digest}.so"
    if _untrusted(target) is None:
        return target
    with _build_lock(folder):
        remove_stale_temporaries(folder)
        problem = _untrusted(target)
        if problem is None:
            return target
        if problem != MISSING:
            # Without a record the library is an earlier version's or a partial one: nothing
            # was checked against it, so it is replaced quietly; anything else is reported.
            level = logging.INFO if problem == NO_RECORD else logging.WARNING
            _LOG.log(level, "refusing %s: %s; compiling it again", target, problem)
            target.unlink(missing_ok=True)
            record_path(target).unlink(missing_ok=True)
        _compile_into(compiler, target)
    return target


def _probe_command(library: Path) -> list[str]:
    """The command that runs :data:`PROBE_SOURCE` on a library in a fresh interpreter."""
    return [sys.executable, "-I", "-S", "-c", PROBE_SOURCE, str(library)]


def probe_kernel(library: Path) -> str | None:
    """Run a library's kernel once on a tiny input in a child process.

    The child loads the library with ctypes alone (no torch) and checks the kernel's output
    for two tokens with equal logits, so a CPU that cannot execute the kernel's instructions
    (SIGILL) or a library that computes something else fails there, not in this process.

    Args:
        library: the shared library.

    Returns:
        None when the kernel ran and gave the exact answer, else why not.
    """
    try:
        done = subprocess.run(
            _probe_command(library), capture_output=True, text=True, timeout=PROBE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"the kernel's probe took over {PROBE_TIMEOUT:.0f} s"
    except OSError as error:
        return f"the kernel's probe did not start ({error})"
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"the kernel's probe died with {name} (this CPU cannot run the kernel)"
    if done.returncode != 0:
        return f"the kernel's probe failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
    return None


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
    """The kernel, compiled, verified, probed and loaded on first use; None where it cannot run.

    Where the CPU lacks AVX512-BF16 this is None without compiling. Otherwise the library
    comes from :func:`build_kernel` (a private cache folder, checked against its recorded
    SHA-256) and runs once in a child process (:func:`probe_kernel`) before this process
    loads it. Any failure — an unsafe cache folder, no compiler, a failed compilation, a
    probe that dies (e.g. SIGILL) — is logged once as a warning naming the reason, remembered
    for the process, and attention falls back to PyTorch's.
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
            library = build_kernel()
            problem = probe_kernel(library)
            if problem is not None:
                raise RuntimeError(problem)
            _kernel = _load(library)
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


_preference: bool | None = None


def _preferred() -> bool:
    """:func:`kernel_preferred`, decided once per process."""
    global _preference
    if _preference is None:
        _preference = kernel_preferred()
    return _preference


def kernel_preferred() -> bool:
    """Whether the native kernel is faster here than PyTorch's bf16 attention.

    PyTorch's CPU attention runs its bf16 block products on oneDNN, which uses AMX tiles where
    the CPU has them: on a 2-core Sapphire Rapids slice it ran the ViT-B/8 and Point-MAE
    shapes at 540–690 GFLOP/s against the kernel's 200 (VDPBF16PS), so CPUs with AMX keep
    PyTorch's attention. On AVX512-BF16 CPUs without AMX (AMD Zen 4 and 5) the kernel is
    2.1–2.5× faster than PyTorch's.
    """
    return cpu_kind().isa != "AMX"


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native kernel can compute these inputs (and is available)."""
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape or q.requires_grad:
        return False
    if any(t.stride(3) != 1 for t in (q, k, v)) or q.shape[2] < 1:
        return False
    kernel = native_kernel()
    return kernel is not None and q.shape[3] == kernel.head_dim


def native_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` runs these inputs on the native kernel.

    CPU bf16 inputs with 64-wide heads, the kernel available, and :func:`kernel_preferred`.
    """
    return _preferred() and _kernel_takes(q, k, v)  # no build where it is not used


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
    if not _kernel_takes(q, k, v):
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
