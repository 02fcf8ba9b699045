"""Generated product lines.

Synthetic lines in the MVTec 3D-AD layout for the demo, the tests and the benchmarks (no real
dataset can be downloaded here).

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
