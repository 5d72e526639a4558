"""What a membership-inference attack's scores show: ROC, TPR at low FPR, and the epsilon those rates imply.

A mechanism that is (epsilon, delta)-DP for one example bounds every membership test on that example:
``TPR <= exp(epsilon) * FPR + delta`` and ``1 - FPR <= exp(epsilon) * (1 - TPR) + delta`` (Kairouz et al. 2015).
So measured rates give a lower bound ``epsilon >= log((TPR - delta) / FPR)``. Following Jagielski et al. (2020)
and Nasr et al. (2021), the threshold is chosen on one half of the candidates and the rates are measured on the
other half, with Clopper-Pearson intervals: the bound holds with the stated confidence for this attack. It is a
lower bound: a weak attack proves little, and no audit can show that a model leaks nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist


@dataclass(frozen=True)
class AttackRates:
    """One attack's result on a member/non-member pool (members are the positives)."""

    auc: float
    auc_ci: tuple[float, float]  # 95%, Hanley and McNeil's standard error
    tpr_at_1pct: float  # highest TPR at FPR <= 1%
    tpr_at_01pct: float  # highest TPR at FPR <= 0.1% (below 1 / non-members this is the TPR at no false positive)
    epsilon_lower: float  # the lower bound at the stated confidence (0 when the rates prove nothing)
    epsilon_estimate: float  # the same threshold's point estimate on the evaluation half
    confidence: float
    members: int
    non_members: int
    roc: tuple[tuple[float, ...], tuple[float, ...]]  # (FPR, TPR), thinned to at most 200 points for plotting

    def to_json(self) -> dict:
        return {"auc": self.auc, "auc_ci": list(self.auc_ci), "tpr_at_fpr_1pct": self.tpr_at_1pct,
                "tpr_at_fpr_0.1pct": self.tpr_at_01pct, "epsilon_lower_bound": self.epsilon_lower,
                "epsilon_estimate": self.epsilon_estimate, "confidence": self.confidence, "members": self.members,
                "non_members": self.non_members, "roc_fpr": list(self.roc[0]), "roc_tpr": list(self.roc[1])}


def roc_curve(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold, from (0, 0) to (1, 1); a higher score means "member"."""
    scores = np.concatenate([member_scores, non_member_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return np.r_[0.0, fp / max(len(non_member_scores), 1)], np.r_[0.0, tp / max(len(member_scores), 1)]


def roc_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """The probability that a member scores above a non-member (ties count half): the Mann-Whitney statistic."""
    fpr, tpr = roc_curve(member_scores, non_member_scores)
    return float(np.trapezoid(tpr, fpr))


def auc_interval(auc: float, n_pos: int, n_neg: int, z: float = 1.96) -> tuple[float, float]:
    """Hanley and McNeil's (1982) normal interval for an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / max(n_pos * n_neg, 1)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    return float(tpr[fpr <= target + 1e-12].max())


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided ``1 - alpha`` bounds (lower, upper) of a binomial rate with ``k`` successes in ``n`` trials."""
    lower = 0.0 if k == 0 else float(beta_dist.ppf(alpha, k, n - k + 1))
    upper = 1.0 if k == n else float(beta_dist.ppf(1 - alpha, k + 1, n - k))
    return lower, upper


def _log_ratio(num: float, den: float) -> float:
    if num <= 0:
        return 0.0
    return math.inf if den <= 0 else max(0.0, math.log(num / den))


def _epsilon_at(tp: int, fp: int, n_pos: int, n_neg: int, delta: float, alpha: float, *, upper: bool) -> float:
    """The lower bound (``upper=False``: point estimate instead) of epsilon from one threshold's counts, in the
    better of the two directions of the DP inequality; each rate's bound at ``alpha / 2`` (joint ``1 - alpha``)."""
    if upper:
        tpr, fpr = tp / n_pos, fp / n_neg
        return max(_log_ratio(tpr - delta, fpr), _log_ratio((1 - fpr) - delta, 1 - tpr))
    tpr_lo, tpr_hi = clopper_pearson(tp, n_pos, alpha / 2)
    fpr_lo, fpr_hi = clopper_pearson(fp, n_neg, alpha / 2)
    return max(_log_ratio(tpr_lo - delta, fpr_hi), _log_ratio((1 - fpr_hi) - delta, 1 - tpr_lo))


def _counts(member: np.ndarray, non_member: np.ndarray, threshold: float) -> tuple[int, int]:
    return int((member >= threshold).sum()), int((non_member >= threshold).sum())


def empirical_epsilon(member_scores: np.ndarray, non_member_scores: np.ndarray, *, delta: float,
                      confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """(lower bound at ``confidence``, point estimate) of epsilon: the threshold that gives the highest lower bound
    on a random half of members and non-members, measured on the other half."""
    rng = np.random.default_rng(seed)
    m, n = rng.permutation(member_scores), rng.permutation(non_member_scores)
    m_sel, m_eval = m[: len(m) // 2], m[len(m) // 2 :]
    n_sel, n_eval = n[: len(n) // 2], n[len(n) // 2 :]
    if min(len(m_sel), len(n_sel), len(m_eval), len(n_eval)) == 0:
        return 0.0, 0.0
    alpha = 1.0 - confidence
    candidates = np.unique(np.concatenate([m_sel, n_sel]))
    if len(candidates) > 400:
        candidates = np.quantile(candidates, np.linspace(0, 1, 400))
    best, best_t = -1.0, candidates[0]
    for t in candidates:
        tp, fp = _counts(m_sel, n_sel, t)
        value = _epsilon_at(tp, fp, len(m_sel), len(n_sel), delta, alpha, upper=False)
        if value > best:
            best, best_t = value, t
    tp, fp = _counts(m_eval, n_eval, best_t)
    lower = _epsilon_at(tp, fp, len(m_eval), len(n_eval), delta, alpha, upper=False)
    estimate = _epsilon_at(tp, fp, len(m_eval), len(n_eval), delta, alpha, upper=True)
    return lower, estimate


def attack_rates(member_scores, non_member_scores, *, delta: float, confidence: float = 0.95,
                 seed: int = 0) -> AttackRates:
    """Everything the audit reports about one attack's scores (higher = more likely a member)."""
    member = np.asarray(member_scores, dtype=np.float64)
    non_member = np.asarray(non_member_scores, dtype=np.float64)
    if len(member) == 0 or len(non_member) == 0:
        raise ValueError(f"A membership audit needs members and non-members; got {len(member)} and "
                         f"{len(non_member)}.")
    if not (np.isfinite(member).all() and np.isfinite(non_member).all()):
        raise ValueError("Attack scores contain NaN or Inf; the model under audit produced non-finite outputs.")
    fpr, tpr = roc_curve(member, non_member)
    auc = float(np.trapezoid(tpr, fpr))
    lower, estimate = empirical_epsilon(member, non_member, delta=delta, confidence=confidence, seed=seed)
    keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int), len(fpr) - 1])
    return AttackRates(auc=auc, auc_ci=auc_interval(auc, len(member), len(non_member)),
                       tpr_at_1pct=tpr_at_fpr(fpr, tpr, 0.01), tpr_at_01pct=tpr_at_fpr(fpr, tpr, 0.001),
                       epsilon_lower=lower, epsilon_estimate=estimate, confidence=confidence, members=len(member),
                       non_members=len(non_member),
                       roc=(tuple(round(float(x), 5) for x in fpr[keep]), tuple(round(float(x), 5) for x in tpr[keep])))
