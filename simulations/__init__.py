"""Running facefl on one machine: a federation on Flower's simulation engine (``simulate``), named scenarios
(``scenarios``), the benchmarks that print their figures (``bench``, ``bench_style``, ``bench_anonymize``), and
the ``facefl`` command line (``cli``, with the deployment commands in ``deploy_cli``), a thin table of commands
that call into ``server``, ``client`` and ``common``. Nothing imports ``simulations``.
"""
