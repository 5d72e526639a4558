"""The privacy ledger: pinned epsilons, an independent check, cumulative accounting, restarts, declines."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from client.privacy import LEDGER_FILE, PrivacyBudgetError, PrivacyLedger, newest


def _ledger(**kw) -> PrivacyLedger:
    args = dict(site="a", target_epsilon=8.0, target_delta=1e-5, accountant="rdp", num_examples=60_000)
    args.update(kw)
    return PrivacyLedger.create(**args)


@pytest.mark.parametrize(
    "accountant,expected",
    # DP-SGD on MNIST-sized data (Abadi et al. setting): sigma 1.1, batch 256 of 60,000, 60 epochs, delta 1e-5.
    [("rdp", 2.5966), ("prv", 2.3917)],
)
def test_pinned_epsilon_for_known_mechanism(accountant, expected):
    ledger = _ledger(accountant=accountant)
    eps = ledger.epsilon([(1.1, 256 / 60_000, 14_062)])
    assert eps == pytest.approx(expected, abs=2e-3)


def test_prv_matches_exact_gaussian_mechanism():
    """With sampling rate 1 and one step, DP-SGD is the Gaussian mechanism, whose exact (eps, delta) curve is
    known in closed form (Balle & Wang 2018); the PRV accountant must agree to within its error bound."""
    sigma, delta = 1.0, 1e-5

    def exact_delta(eps: float) -> float:
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)

    exact_eps = brentq(lambda e: exact_delta(e) - delta, 0.01, 20)
    ledger = _ledger(accountant="prv", target_delta=delta, num_examples=1000)
    assert ledger.epsilon([(sigma, 1.0, 1)]) == pytest.approx(exact_eps, abs=0.05)


def test_ledger_is_cumulative_across_rounds_and_never_decreases():
    ledger = _ledger()
    q = 0.01
    eps = [ledger.record_round(r, [(1.0, q, 100)]) for r in range(1, 5)]
    assert all(b > a for a, b in zip(eps, eps[1:]))
    single = RDPAccountant()
    single.history = [(1.0, q, 400)]
    assert eps[-1] == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    assert ledger.total_steps == 400 and [r["round"] for r in ledger.rounds] == [1, 2, 3, 4]


def test_noise_is_planned_to_spend_exactly_the_budget_and_then_decline():
    ledger = _ledger(target_epsilon=3.0, num_examples=2000)
    q, steps = 1 / 63, 63
    sigma = ledger.plan_noise(sample_rate=q, steps_per_round=steps, budget_rounds=3)
    assert ledger.plan_noise(sample_rate=q, steps_per_round=steps, budget_rounds=99) == sigma  # fixed once
    for r in range(1, 4):
        fits, projected = ledger.fits([(sigma, q, steps)])
        assert fits, (r, projected)
        ledger.record_round(r, [(sigma, q, steps)])
    assert 2.9 < ledger.spent <= 3.0 + 1e-6
    fits, projected = ledger.fits([(sigma, q, steps)])
    assert not fits and projected > 3.0


def test_ledger_survives_a_restart(tmp_path):
    ledger = _ledger()
    ledger.record_round(1, [(1.0, 0.01, 100)])
    ledger.save(tmp_path)
    restored = PrivacyLedger.load(tmp_path)
    assert restored.spent == pytest.approx(ledger.spent) and restored.rounds == ledger.rounds
    # A stale in-memory copy (fewer steps) never wins over the file.
    stale = _ledger()
    assert newest(stale, restored) is restored
    assert PrivacyLedger.load(tmp_path / "elsewhere") is None


def test_corrupt_ledger_is_an_error_not_a_reset(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(PrivacyBudgetError, match="unreadable"):
        PrivacyLedger.load(tmp_path)
    data = json.loads(_ledger().to_json())
    data["history"] = [[1.0, 7.0, 10]]  # sample rate above 1
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(PrivacyBudgetError):
        PrivacyLedger.load(tmp_path)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(PrivacyBudgetError, match="below 1/N"):
        _ledger(target_delta=1e-3, num_examples=2000)
    assert _ledger(target_delta=0.0, num_examples=2000).delta == pytest.approx(1 / 20_000)
