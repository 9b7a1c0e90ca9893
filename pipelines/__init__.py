"""Everything that imports Ray or touches storage, in layered rooms:

    io/        storage, planning, reading and validation, the output layout, checkpoints
    runtime/   the Ray session and pool sizing, the worker actors, fan-out and reduction
    stages/    fit, balance, label, verify, nightly: one step of a run each
    commands/  run, curate, train, demo, report: stages chained into a job
    api.py     the Python API (``pseudolabel.KMeans``, ``label``, ``run``)
    cli.py     the command line, a thin layer over the API and the commands

Each room imports only the rooms above it in this list, and ``config.py`` and
``errors.py``, which every room shares.
"""
