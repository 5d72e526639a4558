"""Deliberately broken DP-SGD, for the tests that check the canary audit catches a broken implementation.

Nothing in facefl's commands or run configuration can turn a fault on: only :func:`broken_dp`, a context manager that
tests call in the process where the sites train (the in-process transport of ``tests/inprocess_grid.py``). While it is
active, the sites it names train with one of these bugs and keep accounting as if they had not:

- ``noise-tenth``: the Gaussian noise is a tenth of what the ledger's noise multiplier says;
- ``no-clipping``: per-sample gradients are not clipped (the noise is still scaled to the clipping bound);
- ``wrong-sample-rate``: the accountant is fed a sampling rate ten times too small (batches are still drawn at the
  real one), so it plans too little noise and reports too small an epsilon.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

FAULTS = ("noise-tenth", "no-clipping", "wrong-sample-rate")
_BROKEN: dict[str, str] = {}  # site name -> fault, only while broken_dp is active


@contextlib.contextmanager
def broken_dp(fault: str, sites: Iterable[str] = ("site-0",)) -> Iterator[None]:
    """Within the block, ``sites`` (their names) train with ``fault``."""
    if fault not in FAULTS:
        raise ValueError(f"Unknown DP fault {fault!r}; choose one of {', '.join(FAULTS)}.")
    names = list(sites)
    _BROKEN.update({name: fault for name in names})
    try:
        yield
    finally:
        for name in names:
            _BROKEN.pop(name, None)


def fault_for(site: str) -> str | None:
    """The fault site ``site`` trains with now (None: a correct implementation)."""
    return _BROKEN.get(site)


def training_noise(fault: str | None, noise_multiplier: float) -> float:
    """The noise multiplier the optimizer really uses."""
    return noise_multiplier / 10 if fault == "noise-tenth" else noise_multiplier


def clipping_bound(fault: str | None, max_grad_norm: float) -> float:
    """The bound per-sample gradients are really clipped to."""
    return math.inf if fault == "no-clipping" else max_grad_norm


def accounted_sample_rate(fault: str | None, sample_rate: float) -> float:
    """The sampling rate the site's accountant is told."""
    return sample_rate / 10 if fault == "wrong-sample-rate" else sample_rate
