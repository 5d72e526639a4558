"""The server side: the ServerApp (``app``) and its round loop (``federation``, ``secure_rounds`` under SecAgg+),
strategies and update checks (``strategy``), global evaluation on held-out people (``evaluate``), the run
directory with its checkpoints (``rundir``), and what the server's host produces from runs: reports
(``server.report``), privacy audits of a run's models by membership inference (``server.privacy_audit``), VAE morphs (``morph``) and the stylizers it trains for sites and devices (``stylizers``).
``server.deployment`` is what runs next to the SuperLink in a hospital deployment (provisioning, the SuperLink,
starting runs). May import ``client`` (the training functions the benchmarks and stylizer training reuse) and
``common``; never ``simulations``.
"""
