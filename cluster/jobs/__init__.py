"""Batch jobs over Ray: the job spec and its items (``spec``), the Ray-free worker (``worker``), the
driver that keeps workers busy and owns the output (``driver``), and Ray Jobs submission (``submit``).

Nothing is imported here: ``spec`` needs pydantic and ``driver`` / ``submit`` Ray (the ``[cluster]``
extra); import the module you use.
"""
