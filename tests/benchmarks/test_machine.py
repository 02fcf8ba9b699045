"""Every benchmark records the CPU kind through one machine record."""

from benchmarks import bench_bank, bench_flags, bench_fpfh, bench_kernels
from benchmarks.machine import machine_info, machine_line
from musc_core.hardware import cpu_kind


def test_machine_info_names_the_cpu_kind_and_the_table_line_shows_it():
    info = machine_info()
    kind = cpu_kind()
    assert info["cpu_kind"] == kind.label() and info["cpu_isa"] == kind.isa
    assert len(info["load_average_start"]) == 3
    assert f"CPU kind {kind.label()}" in machine_line(info)
    for module in (bench_bank, bench_flags):
        assert module.machine_info is machine_info and module.machine_line is machine_line
    assert bench_fpfh.machine_info is machine_info
    kernels = bench_kernels.machine_info()
    assert kernels["dtypes_measured"] == list(bench_kernels.DTYPES)
    assert {k: kernels[k] for k in info if k != "load_average_start"} == {
        k: v for k, v in info.items() if k != "load_average_start"
    }
