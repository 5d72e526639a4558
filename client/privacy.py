"""A site's privacy ledger: cumulative DP-SGD accounting across rounds and restarts.

What the epsilon covers: example-level (eps, delta)-DP of everything one site releases (its model updates of
every round, for every model it trains with DP), with respect to adding or removing one face image of that
site's training set. It is per site: sites do not share a budget and nothing here bounds what several sites
together reveal about a person whose photos are at more than one site. Person-level protection would need
one example per person (or group privacy, which multiplies epsilon by the number of images per person).

The ledger keeps every mechanism the site has run, as (noise multiplier, sample rate, steps) entries, and
computes epsilon from the whole history with Opacus' PRV or RDP accountant. A fresh ``PrivacyEngine`` per
round would report only that round's epsilon; the ledger never forgets. It is written atomically to the site's
state directory after every change and mirrored into Flower's node state, so it survives a restart of the
site process; the version with more recorded steps wins, so epsilon never decreases.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as _opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from common.atomic import atomic_write_json

log = logging.getLogger("facefl.privacy")


# Accounting is most of a small site's fixed cost per round: Opacus' PRV accountant sizes its domain with the RDP of
# every (sampling rate, noise) pair at ~150 orders, a pure-Python series per fractional order (about 0.3 s a call),
# and the noise search repeats it some 15 times. The three pure functions below are memoized for the life of the
# process, which gives the same floats as before: ``_compute_rdp(q, sigma, alpha)`` (shared by every site with the
# same sampling rate, and by the search's bisection steps, which coincide across sites until their budgets part),
# the epsilon of a history, and the planned noise multiplier.
_RDP_UNCACHED = getattr(_opacus_rdp._compute_rdp, "__wrapped__", _opacus_rdp._compute_rdp)


@functools.lru_cache(maxsize=1 << 16)
def _cached_rdp(q: float, sigma: float, alpha: float) -> float:
    return _RDP_UNCACHED(q, sigma, alpha)


def _install_rdp_cache() -> None:
    if getattr(_opacus_rdp._compute_rdp, "__wrapped__", None) is not _RDP_UNCACHED:
        def compute_rdp(q: float, sigma: float, alpha: float) -> float:
            return _cached_rdp(float(q), float(sigma), float(alpha))

        compute_rdp.__wrapped__ = _RDP_UNCACHED
        _opacus_rdp._compute_rdp = compute_rdp


_install_rdp_cache()


@functools.lru_cache(maxsize=4096)
def history_epsilon(accountant: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon of a merged mechanism history at ``delta`` (memoized: a round asks for it several times)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def planned_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` in ``steps`` steps (memoized)."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.01))

LEDGER_FILE = "privacy_ledger.json"
LEDGER_VERSION = 1


class PrivacyBudgetError(ValueError):
    """The site's privacy settings are impossible (for example delta not below 1/N)."""


@dataclass
class PrivacyLedger:
    """Cumulative privacy spending of one site.

    Attributes
    ----------
    site : str
        Site name.
    target_epsilon : float
        The site's total budget; the site declines any round that would exceed it.
    delta : float
        The delta of the guarantee, fixed at the first round; must be below 1/N for N training examples.
    accountant : {"prv", "rdp"}
        Opacus accountant used to turn the history into epsilon.
    num_examples : int
        N, the number of training examples the budget was planned for.
    noise_multiplier : float or None
        The noise multiplier chosen (at the first round) so that the planned rounds exactly fit the budget.
    history : list of [noise_multiplier, sample_rate, steps]
        Every DP mechanism run so far (adjacent identical mechanisms merged).
    rounds : list of dict
        One entry per round: ``{"round", "status" ("trained" | "declined"), "steps", "epsilon"}``.
    """

    site: str
    target_epsilon: float
    delta: float
    accountant: str = "prv"
    num_examples: int = 0
    noise_multiplier: float | None = None
    history: list[list[float]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls, *, site: str, target_epsilon: float, target_delta: float, accountant: str, num_examples: int
    ) -> PrivacyLedger:
        """A new, empty ledger; ``target_delta=0`` picks delta = 1 / (10 N)."""
        if num_examples < 1:
            raise PrivacyBudgetError(f"Site {site!r} has no training examples; nothing to account.")
        delta = target_delta or 1.0 / (10.0 * num_examples)
        if delta >= 1.0 / num_examples:
            raise PrivacyBudgetError(
                f"target-delta={target_delta} is not below 1/N = {1.0 / num_examples:.3g} for site {site!r} with "
                f"N={num_examples} examples: such a delta allows leaking one example outright. Lower target-delta "
                "(or set it to 0 for 1/(10N))."
            )
        if target_epsilon <= 0:
            raise PrivacyBudgetError(f"target-epsilon must be positive; got {target_epsilon}.")
        return cls(site=site, target_epsilon=target_epsilon, delta=delta, accountant=accountant,
                   num_examples=num_examples)

    # ------------------------------------------------------------------ accounting
    @property
    def total_steps(self) -> int:
        return int(sum(steps for _, _, steps in self.history))

    def epsilon(self, extra: list[tuple[float, float, int]] | tuple = ()) -> float:
        """Epsilon of the whole history (plus ``extra`` planned mechanisms) at this ledger's delta."""
        return history_epsilon(self.accountant, tuple(_merge([*map(tuple, self.history), *extra])), self.delta)

    @property
    def spent(self) -> float:
        return self.epsilon()

    def plan_noise(self, *, sample_rate: float, steps_per_round: int, budget_rounds: int) -> float:
        """Fix the noise multiplier (once) so that ``budget_rounds`` rounds spend exactly the budget."""
        if self.noise_multiplier is None:
            total = steps_per_round * budget_rounds
            self.noise_multiplier = planned_noise(self.target_epsilon, self.delta, sample_rate, total, self.accountant)
            log.info("site %s: noise multiplier %.4f for %d steps at q=%.4f (eps %.2f, delta %.2e)",
                     self.site, self.noise_multiplier, total, sample_rate, self.target_epsilon, self.delta)
        return self.noise_multiplier

    def fits(self, planned: list[tuple[float, float, int]]) -> tuple[bool, float]:
        """Whether running ``planned`` mechanisms stays within the budget, and the epsilon it would reach."""
        projected = self.epsilon(planned)
        return projected <= self.target_epsilon * (1 + 1e-6), projected

    def record_round(self, server_round: int, mechanisms: list[tuple[float, float, int]]) -> float:
        """Add the mechanisms a round actually ran; returns the cumulative epsilon."""
        self.history = [list(m) for m in _merge([*map(tuple, self.history), *mechanisms])]
        eps = self.spent
        steps = int(sum(m[2] for m in mechanisms))
        self.rounds.append({"round": int(server_round), "status": "trained", "steps": steps, "epsilon": eps})
        return eps

    def record_decline(self, server_round: int, projected: float) -> None:
        self.rounds.append({"round": int(server_round), "status": "declined", "steps": 0,
                            "epsilon": self.spent, "projected_epsilon": projected})

    def summary(self) -> dict:
        trained = [r for r in self.rounds if r["status"] == "trained"]
        declined = [r for r in self.rounds if r["status"] == "declined"]
        return {
            "site": self.site,
            "epsilon": self.spent,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "num_examples": self.num_examples,
            "steps": self.total_steps,
            "rounds_trained": len(trained),
            "rounds_declined": len(declined),
        }

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        return json.dumps({"version": LEDGER_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data = json.loads(text)
        if data.pop("version", None) != LEDGER_VERSION:
            raise ValueError("Unsupported privacy ledger version.")
        ledger = cls(**data)
        for s, q, n in ledger.history:
            if not (s >= 0 and 0 < q <= 1 and n >= 0 and math.isfinite(s)):
                raise ValueError(f"Privacy ledger holds an invalid mechanism ({s}, {q}, {n}).")
        return ledger

    def save(self, state_dir: str | Path) -> Path:
        path = Path(state_dir) / LEDGER_FILE
        atomic_write_json(path, json.loads(self.to_json()))
        return path

    @classmethod
    def load(cls, state_dir: str | Path) -> PrivacyLedger | None:
        """The ledger saved in ``state_dir``, or None when the site has never trained there.

        A ledger file that exists but cannot be read is an error, never a silent reset of the budget.
        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return None
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as exc:
            raise PrivacyBudgetError(
                f"The privacy ledger {path} is unreadable ({exc}); refusing to train with an unknown spent budget. "
                "Restore it from backup; delete it only if this site's data has never been used before."
            ) from exc


def newest(*ledgers: PrivacyLedger | None) -> PrivacyLedger | None:
    """The ledger with the most recorded steps (then the most rounds): epsilon never goes backwards."""
    found = [led for led in ledgers if led is not None]
    if not found:
        return None
    return max(found, key=lambda led: (led.total_steps, len(led.rounds)))


def _merge(history: list[tuple]) -> list[tuple[float, float, int]]:
    merged: list[tuple[float, float, int]] = []
    for s, q, n in history:
        if n <= 0:
            continue
        if merged and merged[-1][0] == s and merged[-1][1] == q:
            merged[-1] = (s, q, merged[-1][2] + int(n))
        else:
            merged.append((float(s), float(q), int(n)))
    return merged
