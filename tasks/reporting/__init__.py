"""What a person reads after a run.

The run report, the line's history page, the heat-map colours and the Prefect artifacts.

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
