"""Attention of the backbones: the native bf16 kernel against the definition, and its routing."""

import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import musc_core.attention as native
from musc_core.attention import (
    attention,
    build_kernel,
    cpu_runs_kernel,
    kernel_preferred,
    native_applies,
    native_attention,
    native_kernel,
    probe_kernel,
    record_path,
    use_native_attention,
)

needs_kernel = pytest.mark.skipif(
    not cpu_runs_kernel(), reason="the native kernel needs an x86 CPU with AVX512-BF16"
)
routes_kernel = pytest.mark.skipif(
    not (cpu_runs_kernel() and kernel_preferred()),
    reason="attention is routed to the native kernel only on AVX512-BF16 CPUs without AMX",
)


def brute_force(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, head by head and row by row, in float64."""
    batch, heads, tokens, dim = q.shape
    out = torch.zeros(batch, heads, tokens, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = (t[b, h].double() for t in (q, k, v))
            for i in range(tokens):
                logits = (kh @ qh[i]) / dim**0.5
                weights = torch.exp(logits - logits.max())
                out[b, h, i] = (weights / weights.sum()) @ vh
    return out


def heads_of(batch: int, heads: int, tokens: int, seed: int, scale: float = 1.5):
    """q, k, v as a transformer makes them: strided views of one (B, N, 3, H, 64) tensor."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, 64, generator=generator) * scale
    return qkv.to(torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("batch", "heads", "tokens"),
    [(1, 1, 1), (1, 2, 2), (2, 3, 17), (1, 2, 47), (1, 1, 48), (2, 1, 49), (1, 2, 100),
     (1, 1, 785), (1, 1, 1024)],
)
def test_attention_matches_the_definition_as_closely_as_torch_bf16(batch, heads, tokens):
    q, k, v = heads_of(batch, heads, tokens, seed=tokens)
    exact = brute_force(q, k, v)
    ours = attention(q, k, v)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    torch_error = relative(F.scaled_dot_product_attention(q, k, v), exact)
    # bf16 rounding of the inputs' products: about 2e-3 relative for both.
    assert relative(ours, exact) <= max(1.1 * torch_error, 1e-6)
    assert relative(ours, exact) < 4e-3


@routes_kernel
def test_native_kernel_is_what_attention_runs_here():
    q, k, v = heads_of(2, 3, 50, seed=1)
    assert native_kernel() is not None
    assert native_applies(q, k, v)
    assert torch.equal(attention(q, k, v), native_attention(q, k, v))


@needs_kernel
def test_native_kernel_follows_the_stated_rounding():
    """float32 logits and softmax, bf16 probabilities times bf16 values, float32 row sums."""
    q, k, v = heads_of(1, 2, 130, seed=2)
    logits = (q.double() @ k.double().transpose(-1, -2) / 8.0).float()
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    sums = weights.sum(-1, keepdim=True)
    emulated = (weights.bfloat16().double() @ v.double()) / sums.double()
    ours = native_attention(q, k, v).double()
    # Only the float32 accumulation order and the final bf16 rounding differ.
    assert float((ours - emulated).abs().max()) <= 2**-7 * float(emulated.abs().max())
    assert relative(ours, emulated) < 2e-3


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernel_gives_the_same_bits_on_any_number_of_threads(threads):
    q, k, v = heads_of(2, 3, 97, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_attention(q, k, v)
        torch.set_num_threads(threads)
        assert torch.equal(native_attention(q, k, v), one)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_native_output_is_a_free_view_of_tokens_by_heads():
    q, k, v = heads_of(2, 4, 33, seed=4)
    out = native_attention(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous() and merged.shape == (2, 33, 4, 64)


@needs_kernel
@pytest.mark.parametrize(("isa", "routed"), [("AMX", False), ("AVX512-BF16", True)])
def test_cpus_with_amx_keep_torchs_attention_where_the_kernel_would_run(
    monkeypatch, isa, routed
):
    kind = native.cpu_kind()
    monkeypatch.setattr(native, "cpu_kind", lambda: kind._replace(isa=isa))
    monkeypatch.setattr(native, "_preference", None)
    q, k, v = heads_of(1, 2, 40, seed=6)
    assert native_applies(q, k, v) is routed
    expected = native_attention(q, k, v) if routed else F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), expected)


def test_float32_and_other_head_sizes_are_torchs_own():
    q, k, v = (t.float() for t in heads_of(1, 2, 40, seed=5))
    assert not native_applies(q, k, v)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    small = [t[..., :32].to(torch.bfloat16) for t in (q, k, v)]
    assert not native_applies(*small)
    assert torch.equal(attention(*small), F.scaled_dot_product_attention(*small))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The kernel compiled once (for real) into a cache folder that did not exist yet."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the kernel is x86 code")
    return build_kernel(tmp_path_factory.mktemp("kernels") / "cache")


def _cache_with(built: Path, folder: Path) -> Path:
    """A private cache folder holding a copy of the built library and its record."""
    folder.mkdir(mode=0o700)
    for source in (built, record_path(built)):
        shutil.copy2(source, folder / source.name)
    return folder / built.name


@pytest.fixture
def compiles(monkeypatch, built) -> list[Path]:
    """Replace the compiler by a copy of the built library; the outputs it was asked for."""
    outputs = []

    def copy(compiler, output):
        outputs.append(Path(output))
        shutil.copyfile(built, output)

    monkeypatch.setattr(native, "_compile", copy)
    return outputs


@pytest.fixture
def fresh_kernel(monkeypatch):
    """native_kernel() as in a new process on a CPU that runs the kernel."""
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_unavailable", None)
    monkeypatch.setattr(native, "cpu_runs_kernel", lambda: True)
    monkeypatch.setattr(native, "_preference", True)  # routed, as on a CPU without AMX


def _fallback_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "native bf16 attention unavailable" in r.message]


def test_kernel_source_compiles_on_any_x86_machine(built, monkeypatch):
    """The build does not depend on the CPU it runs on, only on a C compiler."""
    folder = built.parent
    assert built.is_file() and built.stat().st_size > 0
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # created private
    recorded = record_path(built).read_text().split()
    assert recorded == [_sha256(built), built.name]  # sha256sum's format
    assert not stat.S_IMODE(built.stat().st_mode) & 0o022

    def refuse(*_):
        raise AssertionError("compiled again although the cached library is intact")

    monkeypatch.setattr(native, "_compile", refuse)
    assert build_kernel(folder) == built  # cached: same source, flags and compiler
    assert not list(folder.glob(".attention_bf16-*"))


@pytest.mark.parametrize(
    ("tampered", "reason"),
    [
        ("library", "SHA-256 differs"),
        ("record", "SHA-256 differs"),
        ("record's mode", "writable by its group or by others"),
        ("library's mode", "writable by its group or by others"),
    ],
)
def test_a_tampered_library_is_refused_and_rebuilt(
    built, compiles, tmp_path, caplog, tampered, reason
):
    target = _cache_with(built, tmp_path / "cache")
    changed = target if tampered.startswith("library") else record_path(target)
    if tampered.endswith("mode"):
        changed.chmod(0o666)  # anyone may have rewritten it: its content proves nothing
    else:
        content = bytearray(changed.read_bytes())
        content[len(content) // 2] ^= 0xFF if tampered == "library" else 0x01
        changed.write_bytes(bytes(content))
    with caplog.at_level(logging.WARNING, logger="musc_core.attention"):
        assert build_kernel(tmp_path / "cache") == target
    assert len(compiles) == 1  # compiled again
    assert target.read_bytes() == built.read_bytes()
    assert record_path(target).read_text().split() == [_sha256(built), target.name]
    assert not stat.S_IMODE(record_path(target).stat().st_mode) & 0o022
    assert [r for r in caplog.records if r.levelno == logging.WARNING and reason in r.message]


def test_a_killed_compile_leaves_nothing_that_is_loaded(
    fresh_kernel, built, compiles, tmp_path, monkeypatch
):
    """Leftovers of a killed compile: temporary files and a library without its record."""
    folder = tmp_path / "cache"
    target = _cache_with(built, folder)
    record_path(target).unlink()
    target.write_bytes(target.read_bytes()[:1000])  # the linker was killed mid-write
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = folder / f".attention_bf16-{gone.pid}-x1y2z3.so"
    old = folder / f".attention_bf16-{os.getpid()}-a1b2c3.so"
    live = folder / f".attention_bf16-{os.getpid()}-d4e5f6.so"
    for leftover in (dead, old, live):
        leftover.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * native.STALE_TEMP_AGE,) * 2)
    loaded = []
    monkeypatch.setattr(native, "_load", lambda path: loaded.append(path))
    monkeypatch.setattr(native, "probe_kernel", lambda path: None)
    monkeypatch.setenv(native.CACHE_ENV, str(folder))
    native_kernel()
    assert loaded == [target] and len(compiles) == 1
    assert _sha256(target) == _sha256(built) == record_path(target).read_text().split()[0]
    assert not dead.exists() and not old.exists()
    assert live.exists()  # a live process's fresh file: possibly a compile in progress


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_cache_folder_others_can_write_is_refused_with_one_warning(
    fresh_kernel, monkeypatch, caplog, tmp_path, mode
):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(mode)

    def refuse(*_):
        raise AssertionError("compiled into a folder others can write to")

    monkeypatch.setattr(native, "_compile", refuse)
    monkeypatch.setenv(native.CACHE_ENV, str(folder))
    q, k, v = heads_of(1, 2, 20, seed=8)
    with caplog.at_level(logging.WARNING, logger="musc_core.attention"):
        first = attention(q, k, v)
        attention(q, k, v)
    assert torch.equal(first, F.scaled_dot_product_attention(q, k, v))
    assert "writable by its group or by others" in (native.unavailable_reason() or "")
    assert len(_fallback_warnings(caplog)) == 1
    assert list(folder.iterdir()) == []


def test_a_cache_folder_owned_by_someone_else_is_refused(
    fresh_kernel, built, monkeypatch, caplog, tmp_path
):
    target = _cache_with(built, tmp_path / "cache")
    owner = target.parent.stat().st_uid
    monkeypatch.setattr(native.os, "geteuid", lambda: owner + 4242)  # as another user
    loaded = []
    monkeypatch.setattr(native, "_load", lambda path: loaded.append(path))
    monkeypatch.setenv(native.CACHE_ENV, str(target.parent))
    with caplog.at_level(logging.WARNING, logger="musc_core.attention"):
        assert native_kernel() is None
        assert native_kernel() is None
    assert f"owned by uid {owner}" in (native.unavailable_reason() or "")
    assert loaded == [] and len(_fallback_warnings(caplog)) == 1


def test_a_probe_that_dies_by_signal_falls_back_with_one_warning(
    fresh_kernel, built, monkeypatch, caplog, tmp_path
):
    target = _cache_with(built, tmp_path / "cache")
    probed = []

    def dies(library):
        probed.append(library)
        return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]

    def refuse(_):
        raise AssertionError("loaded a kernel whose probe died")

    monkeypatch.setattr(native, "_probe_command", dies)
    monkeypatch.setattr(native, "_load", refuse)
    monkeypatch.setenv(native.CACHE_ENV, str(target.parent))
    q, k, v = heads_of(1, 2, 20, seed=9)
    with caplog.at_level(logging.WARNING, logger="musc_core.attention"):
        first = attention(q, k, v)
        attention(q, k, v)
    assert torch.equal(first, F.scaled_dot_product_attention(q, k, v))
    assert "SIGILL" in (native.unavailable_reason() or "")
    assert probed == [target]  # probed once for the process
    assert len(_fallback_warnings(caplog)) == 1


def test_the_probe_passes_exactly_where_the_cpu_runs_the_kernel(built):
    assert (probe_kernel(built) is None) == cpu_runs_kernel()


def test_without_a_compiler_attention_falls_back_with_one_warning(
    fresh_kernel, monkeypatch, caplog, tmp_path
):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    q, k, v = heads_of(1, 2, 20, seed=6)
    with caplog.at_level(logging.WARNING, logger="musc_core.attention"):
        first = attention(q, k, v)
        attention(q, k, v)
    assert torch.equal(first, F.scaled_dot_product_attention(q, k, v))
    assert "no C compiler" in (native.unavailable_reason() or "")
    assert len(_fallback_warnings(caplog)) == 1


def test_a_cpu_without_avx512_bf16_never_compiles(monkeypatch):
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_unavailable", None)
    monkeypatch.setattr(native, "cpu_runs_kernel", lambda: False)

    def refuse(*_):
        raise AssertionError("compiled on a CPU that cannot run the kernel")

    monkeypatch.setattr(native, "build_kernel", refuse)
    q, k, v = heads_of(1, 1, 8, seed=7)
    assert not native_applies(q, k, v)
    assert native_kernel() is None


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8
    ).eval()


def _count_qkv_calls(model: torch.nn.Module) -> list[int]:
    """Forward hooks on every block's ``attn.qkv``; the list they count into, one per block."""
    counts = [0] * len(model.blocks)
    for index, block in enumerate(model.blocks):

        def hook(*_, index=index):
            counts[index] += 1

        block.attn.qkv.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("fused", [True, False])
def test_routed_timm_vit_keeps_parameters_and_float32_results(fused):
    plain, routed = _tiny_vit(), _tiny_vit()
    for model in (plain, routed):
        for block in model.blocks:
            block.attn.fused_attn = fused  # timm's two float32 paths: SDPA or explicit softmax
    assert use_native_attention(routed) == len(routed.blocks)
    assert list(routed.state_dict()) == list(plain.state_dict())
    plain_calls, routed_calls = _count_qkv_calls(plain), _count_qkv_calls(routed)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(routed(images), plain(images))
    assert plain_calls == [1] * len(plain.blocks)  # the hooks count what timm computes
    assert routed_calls == [1] * len(routed.blocks)


def test_routed_timm_vit_computes_qkv_once_per_layer_in_bf16():
    """Whichever attention runs (native kernel or PyTorch's), each product runs once."""
    routed = _tiny_vit()
    use_native_attention(routed)
    calls = _count_qkv_calls(routed)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        routed(images)
        routed(images)
    assert calls == [2] * len(routed.blocks)


@routes_kernel
def test_routed_timm_vit_runs_the_native_kernel_once_per_layer_in_bf16(monkeypatch):
    routed = _tiny_vit()
    use_native_attention(routed)
    calls = _count_qkv_calls(routed)
    kernel_calls = []
    kernel = native.native_attention

    def counted(q, k, v):
        kernel_calls.append(q.shape)
        return kernel(q, k, v)

    monkeypatch.setattr(native, "native_attention", counted)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        routed(images)
    assert calls == [1] * len(routed.blocks)
    assert kernel_calls == [(2, 3, 65, 64)] * len(routed.blocks)  # 8x8 patches + class token


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_timm_vit_on_cuda_is_timms_own_with_qkv_once(dtype):
    plain, routed = _tiny_vit().cuda(), _tiny_vit().cuda()
    use_native_attention(routed)
    calls = _count_qkv_calls(routed)
    images = torch.rand(2, 3, 64, 64, device="cuda")
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        assert torch.equal(routed(images), plain(images))
    assert calls == [1] * len(routed.blocks)


def test_routed_timm_vit_leaves_masked_calls_to_timm():
    plain, routed = _tiny_vit(), _tiny_vit()
    use_native_attention(routed)
    calls = _count_qkv_calls(routed)
    tokens = torch.randn(2, 65, 192)
    mask = torch.rand(65, 65) > 0.3
    mask.fill_diagonal_(True)
    with torch.inference_mode():
        ours = routed.blocks[0].attn(tokens, attn_mask=mask)
        theirs = plain.blocks[0].attn(tokens, attn_mask=mask)
    assert torch.equal(ours, theirs)
    assert calls[0] == 1


def test_routed_timm_vit_in_bf16_is_as_close_to_float32_as_timm_bf16():
    plain, routed = _tiny_vit(), _tiny_vit()
    use_native_attention(routed)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        exact = plain.forward_features(images).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = plain.forward_features(images).float()
            ours = routed.forward_features(images).float()
    assert relative(ours, exact) <= 1.5 * relative(theirs, exact) + 1e-4
    assert relative(ours, exact) < 2e-2


def test_attention_with_qk_norm_is_left_to_timm():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
        qk_norm=True,
    )
    assert use_native_attention(model) == 0
