"""The feature cache and the keys of its entries.

A content-addressed store of named arrays (chunked Zarr v3 on any fsspec URL) and the content
address of every stage's output.

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
