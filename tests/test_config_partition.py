"""The run configuration and identity partitioning."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, RunConfig
from common.data.faceset import FaceSet
from common.data.partition import partition_identities, split_heldout_identities, train_val_split

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_equals_the_validated_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_mapping(declared)
    assert cfg == RunConfig(), "pyproject's [tool.flwr.app.config] and RunConfig defaults disagree"
    assert set(declared) == set(RunConfig().to_mapping()), "every RunConfig field is declared in pyproject"


def test_config_rejects_bad_values_with_sentences():
    with pytest.raises(ConfigError, match="triplet.*DP"):
        RunConfig(loss="triplet", dp=True)
    assert RunConfig(loss="triplet", dp=False).loss == "triplet"
    with pytest.raises(ConfigError, match="Unknown run-config key 'num-round'"):
        RunConfig.from_mapping({"num-round": 3})
    with pytest.raises(ConfigError, match="strategy must be one of"):
        RunConfig.from_mapping({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="num-rounds must be a int"):
        RunConfig.from_mapping({"num-rounds": "three"})
    cfg = RunConfig.from_mapping({"num-rounds": "5", "dp": "false", "lr": 1})
    assert (cfg.num_rounds, cfg.dp, cfg.lr) == (5, False, 1.0)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


NAMES = [f"person_{i:03d}" for i in range(50)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_disjoint_and_complete(scheme):
    a = partition_identities(NAMES, 4, seed=7, scheme=scheme, alpha=0.3)
    b = partition_identities(list(reversed(NAMES)), 4, seed=7, scheme=scheme, alpha=0.3)
    assert a == b
    flat = [n for site in a for n in site]
    assert sorted(flat) == sorted(NAMES) and len(flat) == len(set(flat))
    assert min(len(s) for s in a) >= 2
    assert partition_identities(NAMES, 4, seed=8, scheme=scheme, alpha=0.3) != a


def test_iid_is_balanced_and_dirichlet_is_not():
    iid = [len(s) for s in partition_identities(NAMES, 5, seed=0)]
    assert max(iid) - min(iid) <= 1
    skew = [len(s) for s in partition_identities(NAMES, 5, seed=0, scheme="dirichlet", alpha=0.2)]
    assert max(skew) - min(skew) > 3


def test_partition_errors():
    with pytest.raises(ValueError, match="cannot be split"):
        partition_identities(NAMES[:5], 4, seed=0)
    with pytest.raises(ValueError, match="scheme"):
        partition_identities(NAMES, 2, seed=0, scheme="zipf")


def test_heldout_identities_never_reach_a_site():
    train, held = split_heldout_identities(NAMES, 0.2, seed=1)
    assert not set(train) & set(held) and len(held) == 10
    sites = partition_identities(train, 3, seed=1)
    assert not {n for s in sites for n in s} & set(held)


def test_train_val_split_keeps_every_identity_in_training():
    labels = torch.tensor([0] * 2 + [1] * 5 + [2] * 10)
    faces = FaceSet(torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), labels, ("a", "b", "c"),
                    tuple(f"x/{i}" for i in range(len(labels))))
    train, val = train_val_split(faces, 0.2, seed=0)
    assert len(train) + len(val) == len(faces)
    assert set(train.labels.tolist()) == {0, 1, 2}
    assert val.labels.tolist().count(0) == 0 and val.labels.tolist().count(2) == 2
    assert train_val_split(faces, 0.2, seed=0)[1].paths == val.paths


def test_iid_with_image_counts_balances_examples():
    counts = {n: (40 if i % 10 == 0 else 2) for i, n in enumerate(NAMES)}  # a few people with many photos
    sites = partition_identities(NAMES, 3, seed=0, weights=counts)
    totals = [sum(counts[n] for n in s) for s in sites]
    assert max(totals) - min(totals) <= 40 and min(len(s) for s in sites) >= 2
    assert sorted(n for s in sites for n in s) == sorted(NAMES)
    assert partition_identities(NAMES, 3, seed=0, weights=counts) == sites


def test_learning_rate_schedule_optimizer_and_face_pipeline_follow_the_model():
    scratch, tuned = RunConfig(num_rounds=10), RunConfig(model="dlib-resnet", num_rounds=10)
    assert (scratch.embedding_optimizer, scratch.embedding_lr, scratch.face_mode) == ("adamw", 2e-3, "aligned")
    assert (tuned.embedding_optimizer, tuned.embedding_lr, tuned.face_mode) == ("sgd", 0.5, "dlib")  # the recipe
    assert RunConfig(optimizer="sgd", lr=0.05).embedding_lr == 0.05
    factors = [scratch.lr_factor(r) for r in range(1, 13)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors[:9], factors[1:10]))
    assert 0 < factors[9] < 0.05 and factors[10] == factors[11] == factors[9]  # rounds past the plan keep the last
    assert RunConfig(planned_rounds=20, num_rounds=10).lr_factor(10) > 0.5  # the plan, not this run's rounds
    assert RunConfig(lr_schedule="constant").lr_factor(7) == 1.0
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        RunConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="lr must be"):
        RunConfig(lr=-0.1)
