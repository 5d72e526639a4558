"""Named simulation scenarios: ``facefl simulate --scenario NAME`` (options given on the command line win).

Each scenario is a set of run-config values plus a number of sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    description: str
    sites: int
    config: dict = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    "smoke": Scenario("Synthetic faces, 2 sites, 2 rounds, both models, DP: runs anywhere in about a minute.",
                      sites=2, config={"task": "both", "num-rounds": 2, "dp": True}),
    "lfw-view1": Scenario(
        "LFW View 1: 4 sites share the peopleDevTrain identities (>= 2 images), verification on pairsDevTest, "
        "DP at epsilon 8; the scattering network from scratch with the recipe of `facefl bench train`.", sites=4,
        config={"task": "embedding", "model": "scatternet", "num-rounds": 20, "local-epochs": 1, "dp": True,
                "target-epsilon": 8.0, "batch-size": 256, "margin": 0.2}),
    "lfw-view1-nodp": Scenario("LFW View 1 without DP (baseline for lfw-view1).", sites=4,
                               config={"task": "embedding", "model": "scatternet", "num-rounds": 20,
                                       "dp": False, "batch-size": 128, "margin": 0.2}),
    "lfw-noniid": Scenario("LFW, 8 sites of very unequal size (Dirichlet alpha 0.3), FedProx, DP.", sites=8,
                           config={"task": "embedding", "num-rounds": 10, "partition": "dirichlet",
                                   "dirichlet-alpha": 0.3, "strategy": "fedprox", "proximal-mu": 0.01,
                                   "batch-size": 128}),
    "lfw-vae": Scenario("Face VAE on LFW at 64x64, 4 sites, DP at epsilon 8.", sites=4,
                        config={"task": "vae", "num-rounds": 10, "dp": True, "batch-size": 256}),
    "hospital-budget": Scenario(
        "A small budget (epsilon 2) planned for 3 rounds but run for 5: sites decline once it is spent.",
        sites=3, config={"task": "embedding", "num-rounds": 5, "planned-rounds": 3, "target-epsilon": 2.0}),
}


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise KeyError(f"Unknown scenario {name!r}; choose from {', '.join(sorted(SCENARIOS))}.")
    return SCENARIOS[name]
