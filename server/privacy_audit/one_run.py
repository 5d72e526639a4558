"""The epsilon lower bound of one training run with canaries (Steinke, Nasr and Jagielski, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023).

The game: m canaries, each included in training independently with probability 1/2 (the plan's coin, kept apart from
training). After the run the auditor scores every canary, guesses "included" for the ``k`` highest scores and "not
included" for the ``k`` lowest, abstains on the rest (r = 2k guesses), and counts v correct guesses. If the run is
(epsilon, delta)-DP with respect to each canary, then (their Theorem 5.2, Algorithm 2)

    P[V >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha(v),
    alpha(v) = max_{1 <= i <= v} P[v - i <= Binomial(r, e^eps / (1 + e^eps)) < v] / i,

so the run is *not* (eps, delta)-DP for any eps whose right-hand side is below beta: the largest such eps is the bound
at confidence 1 - beta. The number of guesses is chosen before looking, from a fixed grid; the bound reported is the
largest over the grid, each taken at beta / (size of the grid) (Bonferroni), so it holds at 1 - beta.

What it is not: a lower bound is what these canaries and this scoring proved about this run; it can show that a run
leaks more than its accountant claims (a broken implementation), never that it leaks less. Even with every guess
correct, m canaries can certify at most :func:`max_certifiable` (reported beside every bound).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

# Guesses on each side, as fractions of the canaries: k = fraction * m, r = 2k (at least one on each side).
GUESS_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability, under the hypothesis that the run is (``epsilon``, ``delta``)-DP for each of ``m`` canaries,
    of ``v`` or more correct guesses out of ``r`` (Steinke et al. 2023, Algorithm 2)."""
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"A one-run audit needs 0 <= v <= r <= m, epsilon >= 0 and delta in [0, 1]; got m={m}, "
                         f"r={r}, v={v}, epsilon={epsilon}, delta={delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v > B >= v - i], i = 1..v
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_bound(m: int, r: int, v: int, *, delta: float, beta: float) -> float:
    """The largest epsilon at which ``v`` correct guesses of ``r`` has probability below ``beta`` (bisection); 0 when
    even epsilon = 0 explains them."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, high * 2
        if high > 1e3:
            return math.inf
    for _ in range(50):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


def guess_counts(m: int) -> list[int]:
    """The grid of guesses on each side, k, for m canaries (distinct, at least 1, at most m // 2)."""
    return sorted({min(m // 2, max(1, int(round(f * m)))) for f in GUESS_FRACTIONS if m >= 2})


@dataclass(frozen=True)
class OneRunBound:
    """A one-run audit's result: the bound and what it rests on."""

    epsilon_lower_bound: float  # the run is not (eps, delta)-DP for any smaller eps, at this confidence
    max_certifiable: float  # the largest bound these m canaries could give at all (every guess right, best r)
    canaries: int  # m
    included: int  # how many the plan's coins put in
    guesses: int  # r at the bound
    correct: int  # v at the bound
    delta: float
    confidence: float

    def to_json(self) -> dict:
        return asdict(self)


def one_run_bound(scores, included, *, delta: float, confidence: float = 0.95) -> OneRunBound:
    """Guess from ``scores`` (higher = more likely included) the membership of the canaries whose coins are
    ``included`` and turn the correct guesses into a lower bound on epsilon at ``confidence``."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"One score per canary is needed; got {scores.shape} scores for {included.shape} canaries.")
    if not np.isfinite(scores).all():
        raise ValueError("Canary scores contain NaN or Inf; the run under audit produced non-finite updates.")
    m = len(scores)
    grid = guess_counts(m)
    beta = (1.0 - confidence) / max(1, len(grid))
    # Ties are broken by a fixed permutation, not by the coins: a score equal for an included and an excluded canary
    # must not be guessed right by its position.
    order = np.lexsort((np.random.default_rng(0).permutation(m), scores))  # ascending
    best: tuple[float, int, int] | None = None
    ceiling = 0.0
    for k in grid:
        low, high = order[:k], order[m - k :]
        v = int((~included[low]).sum() + included[high].sum())
        eps = epsilon_bound(m, 2 * k, v, delta=delta, beta=beta)
        if best is None or eps > best[0]:
            best = (eps, 2 * k, v)
        ceiling = max(ceiling, epsilon_bound(m, 2 * k, 2 * k, delta=delta, beta=beta))
    best = best or (0.0, 0, 0)
    return OneRunBound(epsilon_lower_bound=best[0], max_certifiable=ceiling, canaries=m,
                       included=int(included.sum()), guesses=best[1], correct=best[2], delta=delta,
                       confidence=confidence)
