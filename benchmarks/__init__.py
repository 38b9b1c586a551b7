"""The benchmarks of dho2_tf: scripts that measure what DHO2 and prioritized SGD cost and gain,
and write their results under ``results/`` and their sections of ``BENCHMARKS.md``.

Run a script from the repository root, ``python benchmarks/<script>.py`` (docs/jobs.md lists
them); a script that needs several ranks launches its own ``horovodrun`` workers or is itself
launched under ``horovodrun``. :mod:`benchmarks.common` holds what every script shares (the
machine description, the provenance of a run, the ``--report`` / ``--render-only`` options and
the report sections they write). This package is not part of the installed ``dho2_tf``
distribution: a user imports nothing from here.
"""
