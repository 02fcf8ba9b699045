"""Dataset layouts and file decoding.

Where a dataset's files live (a folder or objects under an fsspec URL), how each layout is read
into sample records, and how records become preprocessed samples (bad ones set aside).

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
