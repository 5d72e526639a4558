"""Empirical privacy audits of a run's models: membership-inference attacks (``scores``: what each attack
computes per face; ``reference``: the reference models of the calibrated attack), the rates and the epsilon lower
bound they imply (``rates``), and the audit of a finished run (``audit_run``)."""
