"""How a line's samples are laid out for mutual scoring.

Blocks, pair shards and reductions of a pool, and the reference bank new parts are scored
against.

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
