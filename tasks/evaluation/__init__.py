"""Metrics of labelled lines and the paper's evaluation protocol.

Image and pixel metrics, the protocol of the paper's tables and its published figures.

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
