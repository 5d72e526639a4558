"""Never worse than where it started: the defaults are the measured recipe, and the server keeps the previous
global model when a round scores worse on its validation people (never on the test pairs)."""

from __future__ import annotations

import json

import pytest
import torch
from inprocess_grid import InProcessGrid

from client.app import make_client_app
from common.config import RunConfig
from common.data.sources import (evaluation_identities, site_identities, training_identities, validation_data,
                                 validation_identities)
from common.models.federated import build_models
from server.federation import run_federation
from server.round_guard import RoundGuard
from server.rundir import load_run_models


def test_defaults_are_the_measured_recipe(lfw_root):
    real = RunConfig(data=str(lfw_root))
    assert (real.model, real.trainable_part, real.batch_size, real.image_size) == ("dlib-resnet", "projection", 256, 150)
    assert (real.embedding_lr, real.backbone_learning_rate, real.dp, real.target_epsilon) == (0.5, 1e-4, True, 8.0)
    assert real.guards_rounds
    for part in ("last-stage", "all"):  # every trainable part of the pretrained backbone moves gently by default
        assert RunConfig(data=str(lfw_root), trainable=part).backbone_learning_rate == 1e-4
    smoke = RunConfig()  # the synthetic smoke test and the VAE keep the small CNN
    assert (smoke.model, smoke.batch_size) == ("compact", 32)
    assert RunConfig(data=str(lfw_root), task="both").model == "compact"
    scratch = RunConfig(data=str(lfw_root), model="scatternet")  # from scratch, by name, with its own recipe
    assert (scratch.batch_size, RunConfig(data=str(lfw_root), model="scatternet", dp=False).batch_size) == (256, 128)
    assert RunConfig(data=str(lfw_root), batch_size=64).batch_size == 64  # a value given by name is kept


def test_validation_people_are_nobodys(lfw_root):
    cfg = RunConfig(data=str(lfw_root))
    val, train, test = set(validation_identities(cfg)), set(training_identities(cfg)), set(evaluation_identities(cfg))
    assert len(val) == 100 and not val & train and not val & test
    assert not val & set().union(*(site_identities(cfg, i, 4) for i in range(4)))
    assert validation_identities(cfg) == validation_identities(RunConfig(data=str(lfw_root), max_identities=50))
    assert not validation_identities(cfg.replace(validation_people=0))


def test_guard_keeps_the_best_and_rejects_a_worse_aggregate():
    """On the synthetic faces: an equal aggregate is kept, a scrambled one rejected, the best so far remembered."""
    cfg = RunConfig(task="embedding", dp=False)
    pairs = validation_data(cfg)
    assert pairs is not None and pairs.same.any() and (~pairs.same).any()
    torch.manual_seed(0)
    start = build_models(cfg).state_dict()
    guard = RoundGuard(cfg, pairs)
    same = guard.judge(1, start, {k: v.clone() for k, v in start.items()})
    assert same["kept"] and same["validation_auc"] == pytest.approx(same["best_auc_before"])
    scrambled = {k: v.clone() for k, v in start.items()}  # every face gets the same embedding: AUC 0.5
    scrambled["embedding.embed.weight"].zero_()
    scrambled["embedding.embed.bias"].fill_(1.0)
    worse = guard.judge(2, start, scrambled)
    assert not worse["kept"] and worse["validation_auc"] < worse["best_auc_before"]
    assert guard.best == pytest.approx(same["best_auc_before"])  # the rejected round did not lower the bar
    loose = RoundGuard(cfg.replace(reject_worse_rounds=False), pairs)
    assert loose.judge(1, start, scrambled)["kept"]  # the guard switched off keeps every aggregate


def _federation(lfw_root, cache_dir, tmp_path, name: str, **changes):
    """Two sites, one DP round at the defaults (dlib's backbone, the recipe) on a small slice of LFW people."""
    cfg = RunConfig.from_mapping({"data": str(lfw_root), "cache-dir": str(cache_dir), "run-dir": str(tmp_path / name),
                                  "num-rounds": 1, "max-identities": 40, "validation-people": 16, "eval-pairs": 200,
                                  "round-timeout": 600, **changes})
    nodes = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}
    run = run_federation(InProcessGrid(make_client_app(), nodes, cfg.to_mapping()), cfg)
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    return run, rounds


@pytest.mark.slow
def test_a_default_dp_round_does_not_lower_heldout_accuracy(lfw_root, cache_dir, tmp_path):
    run, rounds = _federation(lfw_root, cache_dir, tmp_path, "default")
    start, end = rounds[0]["global"], rounds[-1]["global"]
    assert start["embedding/accuracy"] >= 0.9  # dlib's backbone, zero-shot
    assert end["embedding/accuracy"] >= start["embedding/accuracy"] - 0.01
    guard = rounds[-1]["guard"]
    assert set(guard) >= {"kept", "validation_auc", "best_auc_before"} and guard["validation_auc"] > 0.9


@pytest.mark.slow
def test_a_destructive_round_is_rejected_and_the_model_kept(lfw_root, cache_dir, tmp_path):
    """The projection at a learning rate 10,000 times the recipe's wrecks the model; the guard rejects that round and
    the run ends with the starting model. Without the guard the same round's model is far worse."""
    hostile = {"backbone-lr": 1.0, "dp": False}
    run, rounds = _federation(lfw_root, cache_dir, tmp_path, "guarded", **hostile)
    guard = rounds[-1]["guard"]
    assert guard["kept"] is False and guard["validation_auc"] < guard["best_auc_before"]
    assert rounds[-1]["global"]["embedding/accuracy"] == rounds[0]["global"]["embedding/accuracy"]
    _, models, _ = load_run_models(str(run))
    start = build_models(RunConfig.from_mapping({"data": str(lfw_root)})).state_dict()
    assert all(torch.equal(models.state_dict()[k], v) for k, v in start.items())
    _, unguarded = _federation(lfw_root, cache_dir, tmp_path, "unguarded", **hostile, **{"reject-worse-rounds": False})
    assert unguarded[-1]["guard"]["kept"] is True
    assert unguarded[-1]["global"]["embedding/accuracy"] < rounds[0]["global"]["embedding/accuracy"] - 0.02


def test_a_run_saved_before_the_new_defaults_keeps_its_own_meaning(lfw_root):
    """A config.json written before validation people existed resumes and is audited as it ran: no validation
    people, and dlib's backbone training its last stage at 0.1; a new run's saved config reads back as it was."""
    old = {**RunConfig(data=str(lfw_root)).to_mapping(), "model": "dlib-resnet", "trainable": "auto", "lr": 0.0,
           "backbone-lr": 0.0, "batch-size": 32}
    for key in ("validation-people", "reject-worse-rounds", "reject-tolerance", "mask-probability"):
        old.pop(key)
    cfg = RunConfig.from_saved(old)
    assert (cfg.validation_people, cfg.trainable_part, cfg.embedding_lr, cfg.backbone_learning_rate) == \
        (0, "last-stage", 0.1, 0.1)
    assert training_identities(cfg) == training_identities(RunConfig(data=str(lfw_root), validation_people=0))
    new = RunConfig(data=str(lfw_root))
    assert RunConfig.from_saved(new.to_mapping()) == new
