"""What a run leaves on storage for later runs and for people.

Batch records (the contract between nights and between flows), the run summary, operators'
verdicts, and the result store that writes them.

Plain Python, no Prefect tasks: the task modules of :mod:`tasks` import from here, never the
other way round.
"""
