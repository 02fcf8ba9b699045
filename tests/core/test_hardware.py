"""CPU kind and compute-dtype resolution (musc_core.hardware)."""

import pytest
import torch

from musc_core import hardware
from musc_core.config import MuscConfig

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_cpu_flags_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    real_path = hardware.Path
    monkeypatch.setattr(
        hardware, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p)
    )
    model, flags = hardware._cpu_flags()
    assert model == "AMD EPYC, family 25 model 1"
    assert flags == {"fpu", "sse2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        ({"avx2"}, "AVX2"),
        ({"avx2", "avx512f"}, "AVX512"),
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "AMX"),
    ],
)
def test_isa_level_is_the_highest_flag(monkeypatch, flags, isa):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: ("some cpu", flags))
    kind = hardware.cpu_kind()
    assert kind.isa == isa
    assert kind.capability == torch.backends.cpu.get_cpu_capability()
    assert kind.fast_bf16 == hardware.cpu_has_fast_bf16()
    assert isa in kind.label() and "fast bf16: " in kind.label()


def test_explicit_bfloat16_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_compute_dtype("auto", "cpu", "vit_dtype") == torch.float32
    with pytest.raises(ValueError, match=r"vit_dtype=bfloat16 needs native bfloat16.*AVX512-BF16"):
        hardware.resolve_compute_dtype("bfloat16", "cpu", "vit_dtype")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_compute_dtype("bfloat16", "cpu", "vit_dtype") == torch.bfloat16
    assert hardware.resolve_compute_dtype("float32", "cpu", "vit_dtype") == torch.float32
    with pytest.raises(ValueError, match="vit_dtype must be one of"):
        hardware.resolve_compute_dtype("float16", "cpu", "vit_dtype")


def test_resolved_dtypes_name_what_each_setting_computes_in(monkeypatch):
    given = MuscConfig(vit_dtype="auto", point_dtype="float32", distance_dtype="auto")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolved_dtypes(given, "cpu") == {
        "vit_dtype": "bfloat16", "point_dtype": "float32", "distance_dtype": "bfloat16"
    }
    assert hardware.resolved_dtypes(given, "cpu", ("distance_dtype",)) == {
        "distance_dtype": "bfloat16"
    }
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolved_dtypes(given, "cpu") == {
        "vit_dtype": "float32", "point_dtype": "float32", "distance_dtype": "float32"
    }
    explicit = MuscConfig(point_dtype="bfloat16")
    with pytest.raises(ValueError, match="point_dtype=bfloat16 needs native bfloat16"):
        hardware.resolved_dtypes(explicit, "cpu")
    assert hardware.resolved_dtypes(explicit, "cpu", ("vit_dtype",)) == {"vit_dtype": "float32"}


def test_this_machine_says_whether_it_has_native_bf16():
    """On x86 the answer is the AVX512-BF16/AMX flags, whatever oneDNN claims."""
    kind = hardware.cpu_kind()
    if kind.isa in ("AVX2", "AVX512"):
        assert not kind.fast_bf16
