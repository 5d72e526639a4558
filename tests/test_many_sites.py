"""A hundred simulated sites through Flower's simulation engine, a few sampled each round (fraction-train), with a
min-sites quorum; the per-site accounting that makes many small sites affordable gives the same epsilons."""

from __future__ import annotations

import json

import pytest

from client.privacy import PrivacyLedger, history_epsilon, planned_noise
from conftest import facefl


@pytest.mark.slow
def test_a_hundred_sites_train_a_sampled_few_each_round(lfw_root, cache_dir, tmp_path):
    run = tmp_path / "run"
    done = facefl("simulate", "--data", str(lfw_root), "--sites", "100", "--rounds", "2", "--task", "embedding",
                  "--set", "model=compact", "--set", "validation-people=0", "--set", "max-identities=200", "--set", "fraction-train=0.05", "--set", "min-sites=5",
                  "--set", f"cache-dir={cache_dir}", "--set", "eval-pairs=50", "--out", str(run), "--no-report",
                  progress=run)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["status"] == "completed"
    trained = [set(r["sites"]) for r in metrics["rounds"] if r["round"] > 0]
    assert [len(s) for s in trained] == [5, 5]  # 5% of 100 each round
    everyone = set().union(*trained)
    assert len(everyone) > 5 and all(name.startswith("site-") for name in everyone)  # sampled anew each round
    for name in everyone:  # only the sites that trained spent budget, and each accounted its own rounds
        ledger = PrivacyLedger.load(run / "sites" / name)
        assert 0 < ledger.spent <= 8.0 and len(ledger.rounds) == sum(name in s for s in trained)
    untouched = {f"site-{i}" for i in range(100)} - everyone
    assert all(PrivacyLedger.load(run / "sites" / name) is None for name in untouched)


def test_memoized_accounting_gives_the_accountants_own_figures(monkeypatch):
    """The memoized RDP orders, epsilons and noise search give exactly Opacus' unmemoized floats."""
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp
    from opacus.accountants.utils import get_noise_multiplier

    from client import privacy

    with monkeypatch.context() as plain:  # Opacus as shipped, nothing memoized
        plain.setattr(rdp, "_compute_rdp", privacy._RDP_UNCACHED)
        sigma_ref = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-3, sample_rate=1 / 3, steps=40,
                                         accountant="prv", epsilon_tolerance=0.01)
        acc = create_accountant("prv")
        acc.history = [(sigma_ref, 1 / 3, 40)]
        eps_ref = acc.get_epsilon(delta=1e-3)
    assert getattr(rdp._compute_rdp, "__wrapped__", None) is privacy._RDP_UNCACHED  # the memo is installed
    for memo in (privacy.planned_noise, privacy.history_epsilon, privacy._cached_rdp):
        memo.cache_clear()
    for _ in range(2):  # computed, then from the memo
        assert planned_noise(8.0, 1e-3, 1 / 3, 40, "prv") == sigma_ref
        assert history_epsilon("prv", ((sigma_ref, 1 / 3, 40),), 1e-3) == eps_ref
    assert privacy._cached_rdp.cache_info().hits > 0
    ledger = PrivacyLedger.create(site="s", target_epsilon=8.0, target_delta=1e-3, accountant="prv", num_examples=60)
    assert ledger.plan_noise(sample_rate=1 / 3, steps_per_round=20, budget_rounds=2) == sigma_ref
    assert ledger.epsilon([(sigma_ref, 1 / 3, 40)]) == eps_ref
