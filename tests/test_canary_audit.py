"""The one-run canary audit (Steinke et al. 2023): its bound, the seeded plan, that a canary changes nothing but its
own contribution, that the audit catches DP broken on purpose at a site and never accuses a correct one, and a site
auditing itself."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import binom

from client.canaries import SiteCanaries
from client.dp_faults import FAULTS, broken_dp
from client.site import Site, SiteState, run_round
from client.train import DPSettings, train_embedding
from common.canary_plan import (canary_coordinates, gradient_canaries, input_canaries, step_generator,
                                trainable_shapes)
from common.config import ConfigError, RunConfig
from common.data.synthetic import make_synthetic_faces
from common.models.embedding import build_embedding_model
from common.models.federated import build_models
from common.models.losses import MarginHead
from server.privacy_audit.canaries import UpdateRecorder, white_box_scores
from server.privacy_audit.one_run import epsilon_bound, guess_counts, one_run_bound, p_value


# ----------------------------------------------------------------------------------------------- the bound
def test_the_p_value_is_the_binomial_tail_plus_the_delta_term():
    q = 1 / (1 + math.exp(-1.5))
    assert p_value(100, 40, 33, 1.5, 0.0) == pytest.approx(binom.sf(32, 40, q), rel=1e-12)
    assert p_value(100, 40, 33, 1.5, 1e-4) > p_value(100, 40, 33, 1.5, 0.0)
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)


def test_the_bound_is_sound_and_close_on_randomized_response():
    """Randomized response at epsilon 2 is exactly 2-DP: with 4,000 canaries the bound must stay below 2 and come
    near it; scores that say nothing must prove nothing; all guesses right reach the largest certifiable bound."""
    rng = np.random.default_rng(0)
    m, eps = 4000, 2.0
    included = rng.random(m) < 0.5
    answer = np.where(rng.random(m) < 1 / (1 + math.exp(-eps)), included, ~included)
    bound = one_run_bound(answer + rng.random(m) * 1e-3, included, delta=0.0)
    assert 1.5 <= bound.epsilon_lower_bound <= eps and bound.canaries == m
    assert one_run_bound(rng.normal(size=m), included, delta=1e-5).epsilon_lower_bound <= 0.3
    perfect = one_run_bound(included.astype(float), included, delta=1e-5)
    assert 5.0 <= perfect.epsilon_lower_bound <= perfect.max_certifiable  # about 2,000 in: m / 2 guesses a side
    assert perfect.correct >= perfect.guesses - 62
    # more canaries can certify more; a larger delta less
    ceiling = [max(epsilon_bound(m, 2 * k, 2 * k, delta=1e-5, beta=0.05 / len(guess_counts(m)))
                   for k in guess_counts(m)) for m in (100, 1000)]
    assert ceiling[0] < ceiling[1]
    assert epsilon_bound(1000, 200, 190, delta=1e-4, beta=0.05) < epsilon_bound(1000, 200, 190, delta=0.0, beta=0.05)


# ----------------------------------------------------------------------------------------------- the plan
def test_the_plan_is_seeded_and_kept_apart():
    shapes = {"a.weight": torch.Size([64, 32]), "b.bias": torch.Size([10])}
    plans = [gradient_canaries(shapes, site_index=k, per_site=300, seed=3) for k in range(4)]
    again = gradient_canaries(shapes, site_index=2, per_site=300, seed=3)
    assert torch.equal(plans[2].index, again.index) and torch.equal(plans[2].included, again.included)
    flat = torch.cat([p.index + torch.tensor([0, 64 * 32])[p.param] for p in plans])
    assert len(torch.unique(flat)) == 1200  # no two canaries share a coordinate
    assert torch.equal(flat, canary_coordinates(shapes, 1200, 3))
    assert all(0.4 < float(p.included.float().mean()) < 0.6 for p in plans)
    inputs = input_canaries(site_index=1, per_site=20, num_identities=7, image_size=64, seed=3)
    assert inputs.images.shape == (20, 3, 64, 64) and int(inputs.labels.max()) < 7
    with pytest.raises(ValueError, match="do not fit"):
        gradient_canaries(shapes, site_index=3, per_site=600, seed=3)
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig(canary_gradients=10, secure_aggregation=True)
    with pytest.raises(ConfigError, match="face-embedding"):
        RunConfig(canary_inputs=10, task="vae")


def test_the_server_records_every_site_at_every_canary_and_scores_them(tmp_path):
    """Replies arrive in any order: each round's record holds every site at every site's canaries. Scores: real-data
    drift shared by the sites and a per-coordinate noise level cancel out, the canaries stand out."""
    cfg = RunConfig(model="compact", canary_gradients=40, canary_seed=2)
    recorder = UpdateRecorder(cfg, tmp_path)
    plans = [gradient_canaries(recorder.shapes, site_index=k, per_site=40, seed=2) for k in range(3)]
    sent = build_models(cfg).state_dict()
    rng = torch.Generator().manual_seed(0)
    flat_sizes = [int(torch.Size(s).numel()) for s in recorder.shapes.values()]
    level = torch.rand(sum(flat_sizes), generator=rng) * 10 + 0.1  # each coordinate its own noise level
    for server_round in (1, 2):
        drift = torch.randn(sum(flat_sizes), generator=rng) * level * 5  # what the real faces do, at every site
        for k in (2, 0, 1):
            update = drift + torch.randn(sum(flat_sizes), generator=rng) * level
            plan = plans[k]
            starts = torch.tensor([0, *np.cumsum(flat_sizes)[:-1].tolist()])
            flat = starts[plan.param] + plan.index
            update[flat] -= plan.sign * plan.included.float() * level[flat] * 4  # a canary moves against its sign
            parts = torch.split(update, flat_sizes)
            state = {f"embedding.{n}": sent[f"embedding.{n}"] + p.view(recorder.shapes[n])
                     for n, p in zip(recorder.names, parts)}
            recorder(server_round, f"site-{k}", state, sent)
    saved = torch.load(tmp_path / "canaries" / "updates.pt", weights_only=True)["rounds"]
    assert all(len(v) == 120 for r in saved.values() for v in r.values()) and set(saved[1]) == {"site-0", "site-1",
                                                                                              "site-2"}
    scores = white_box_scores(saved, [p.sign for p in plans])
    included = torch.cat([p.included for p in plans]).numpy()
    from server.privacy_audit.rates import roc_auc

    assert roc_auc(scores[included], scores[~included]) >= 0.95 and scores[included].mean() > 4
    assert abs(float(np.median(scores[~included]))) < 1.0  # the drift and each coordinate's level cancel out


def _train(canaries: SiteCanaries | None, dp: DPSettings | None, faces, seed: int = 5):
    torch.manual_seed(0)
    backbone = build_embedding_model("compact", embedding_dim=32, dp=True, image_size=48)
    before = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    head = MarginHead(32, faces.num_identities)
    train_embedding(backbone, head, faces, epochs=1, batch_size=len(faces), lr=0.1, optimizer="sgd", augment=True,
                    dp=dp, seed=seed, canaries=canaries)
    return {k: (v.detach() - before[k]) for k, v in backbone.named_parameters()}


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=0.7, max_grad_norm=1.0)], ids=["non-DP", "DP"])
def test_a_canary_changes_nothing_but_its_own_contribution(dp):
    """One step over all faces (sampling rate 1): canaries that the plan left out give the very same update as no
    canaries (their draws take nothing from training's generators); included ones change exactly their coordinates,
    by the learning rate times their clipped gradient over the expected batch (DP) or the batch (non-DP)."""
    faces = make_synthetic_faces(4, 3, 48, 0)
    shapes = trainable_shapes(build_embedding_model("compact", embedding_dim=32, dp=True, image_size=48))
    plan = gradient_canaries(shapes, site_index=0, per_site=50, seed=1)
    norm = 10.0

    def canaries(included, raw_norm=norm):
        return SiteCanaries(dataclasses.replace(plan, included=included), None, raw_norm, step_generator(1, 0, 1))

    plain = _train(None, dp, faces)
    none_in = _train(canaries(torch.zeros(50, dtype=torch.bool)), dp, faces)
    assert all(torch.equal(plain[k], none_in[k]) for k in plain)
    all_in = _train(canaries(torch.ones(50, dtype=torch.bool)), dp, faces)
    names = list(shapes)
    expected_step = 0.1 * (min(norm, dp.max_grad_norm) if dp else norm) / len(faces)
    touched = 0
    for k, name in enumerate(names):
        diff = (all_in[name] - plain[name]).reshape(-1)
        rows = plan.param == k
        mine = torch.zeros_like(diff, dtype=torch.bool)
        mine[plan.index[rows]] = True
        assert torch.all(diff[~mine] == 0), name  # nothing else moved
        if rows.any():  # SGD moves against the gradient: -lr * sign * clipped norm / B
            assert torch.allclose(diff[plan.index[rows]], -plan.sign[rows] * expected_step, rtol=1e-3, atol=1e-7)
            touched += int(rows.sum())
    assert touched == 50
    if dp is not None:  # DP-SGD clips a canary like any example: its raw size beyond the bound changes nothing
        huge = _train(canaries(torch.ones(50, dtype=torch.bool), raw_norm=1000.0), dp, faces)
        assert all(torch.equal(huge[k], all_in[k]) for k in all_in)


# ----------------------------------------------------------------------------------------------- catching broken DP
def _site_run(lfw_root, cache_dir, tmp: Path, fault: str | None) -> tuple[float, float, float]:
    """Three rounds of one simulated site (its real round: ledger, DP-SGD, canaries), the server's white-box view of
    its updates, and the audit: (bound, the ledger's epsilon, the largest certifiable bound). Sampling rate 1 (the
    batch holds every face) makes the per-round updates the steps themselves, so the audit can be tight. The
    canaries' raw gradient is 1,000 clipping bounds: DP-SGD clips it to one, so a correct run is unaffected, and a
    run that does not clip shows it."""
    cfg = RunConfig.from_mapping({
        "model": "dlib-resnet", "data": str(lfw_root), "cache-dir": str(cache_dir), "run-dir": str(tmp),
        "num-rounds": 3, "dp": True, "target-epsilon": 1.0, "target-delta": 1e-5, "accountant": "rdp",
        "batch-size": 512, "max-identities": 12, "validation-people": 0, "canary-gradients": 1000,
        "canary-norm": 1000.0})
    site = Site(name="site-0", state_dir=tmp / "site-0", index=0, num_sites=1)
    recorder = UpdateRecorder(cfg, tmp)
    state, site_state = build_models(cfg).state_dict(), SiteState()
    with broken_dp(fault) if fault else contextlib.nullcontext():
        for server_round in (1, 2, 3):
            result = run_round(cfg, site, state, server_round, site_state)
            recorder(server_round, site.name, result.state, state)
            state, site_state = result.state, result.site_state
    plan = gradient_canaries(recorder.shapes, site_index=0, per_site=1000, seed=cfg.canary_seed)
    bound = one_run_bound(white_box_scores(recorder.records, [plan.sign]), plan.included.numpy(),
                          delta=site_state.ledger.delta)
    return bound.epsilon_lower_bound, site_state.ledger.spent, bound.max_certifiable


@pytest.mark.parametrize("fault", [None, *FAULTS])
def test_the_audit_catches_broken_dp_and_never_accuses_a_correct_site(fault, lfw_root, cache_dir, tmp_path):
    """Accountant epsilon 1: a correct site's bound stays below it (0.2 here); a tenth of the noise (3.1 here), no
    clipping (4.3) or a sampling rate ten times too small in the accountant (1.4) push the bound above it."""
    bound, epsilon, ceiling = _site_run(lfw_root, cache_dir, tmp_path, fault)
    assert 0.9 <= epsilon <= 1.0 and ceiling > 4
    if fault is None:
        assert bound <= epsilon, bound
    else:
        assert bound > epsilon, (fault, bound, epsilon)


def test_faults_cannot_be_set_from_the_run_config():
    with pytest.raises(ConfigError, match="Unknown run-config key"):
        RunConfig.from_mapping({"broken-dp": "noise-tenth"})
    with pytest.raises(ValueError, match="Unknown DP fault"):
        with broken_dp("half-noise"):
            pass


# ----------------------------------------------------------------------------------------------- a federation
@pytest.fixture(scope="module")
def canary_run(lfw_root, cache_dir, tmp_path_factory):
    """Two sites through Flower's server loop (in-process transport), DP at epsilon 2, both kinds of canaries, tracked
    in MLflow; then the canary audit as `facefl simulate` runs it."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from inprocess_grid import InProcessGrid

    from client.app import make_client_app
    from server.federation import run_federation
    from server.privacy_audit.canaries import canary_audit

    run_dir = tmp_path_factory.mktemp("canaries") / "run"
    cfg = RunConfig.from_mapping({
        "model": "dlib-resnet", "data": str(lfw_root), "cache-dir": str(cache_dir), "run-dir": str(run_dir),
        "num-rounds": 2, "min-sites": 2, "dp": True, "target-epsilon": 2.0, "target-delta": 1e-5,
        "accountant": "rdp", "batch-size": 512, "max-identities": 12, "validation-people": 0, "eval-pairs": 10,
        "round-timeout": 600, "canary-gradients": 300, "canary-inputs": 20, "tracking": "mlflow"})
    nodes = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}
    run_federation(InProcessGrid(make_client_app(), nodes, cfg.to_mapping()), cfg)
    return run_dir, canary_audit(run_dir)


def test_a_canary_run_is_audited_into_privacy_audit_json_the_report_and_mlflow(canary_run):
    from mlflow import MlflowClient

    from server.privacy_audit.audit_run import load_audit
    from server.report.render import canary_rows
    from server.report.sections import RunSection

    run_dir, result = canary_run
    assert set(result["settings"]) == {"white-box", "black-box"} and result["sites"] == 2
    white, black = result["settings"]["white-box"], result["settings"]["black-box"]
    assert white["canaries"] == 600 and black["canaries"] == 40 and white["guesses"] > 0
    assert 1.0 <= result["accountant_epsilon"] <= 2.0
    for entry in (white, black):  # a correct implementation: never above the accountant's epsilon
        assert entry["epsilon_lower_bound"] <= result["accountant_epsilon"] and entry["consistent"]
        assert entry["epsilon_lower_bound"] <= entry["max_certifiable"] and entry["correct"] <= entry["guesses"]
    written = load_audit(run_dir)
    assert written["canaries"]["settings"]["white-box"] == white and written["round"] == 2
    rows = canary_rows([RunSection(data=SimpleNamespace(name="run"), privacy_audit=written)])["rows"]
    assert [r[1] for r in rows] == ["white-box", "black-box"] and rows[0][2] == 600
    info = json.loads((run_dir / "tracking.json").read_text())
    logged = MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"]).data.metrics
    assert logged["audit/canaries/white-box/epsilon_lower_bound"] == pytest.approx(white["epsilon_lower_bound"])
    assert logged["audit/canaries/black-box/max_certifiable"] == pytest.approx(black["max_certifiable"])


def test_a_site_audits_the_model_it_received_on_its_own_faces(canary_run, lfw_root, cache_dir):
    from common.audit import verify_log
    from common.data.sources import site_faces
    from server.privacy_audit.site_audit import SELF_AUDIT_FILE, SelfAuditError, self_audit

    run_dir, _ = canary_run
    state = run_dir / "sites" / "site-1"
    cfg = RunConfig.from_saved(torch.load(state / "received_model.pt", weights_only=True)["config"])
    result = self_audit(state, faces=site_faces(cfg, 1, 2))
    assert result["site"] == "site-1" and result["round"] == 2 and result["members"] == result["non_members"] > 0
    assert set(result["attacks"]) == {"margin", "similarity"} and 0.0 <= result["best_auc"] <= 1.0
    assert result["epsilon_lower_bound"] <= result["accountant_epsilon"]
    assert json.loads((state / SELF_AUDIT_FILE).read_text())["best_auc"] == result["best_auc"]
    log = (state / "audit.jsonl").read_text().splitlines()
    entry = json.loads(log[-1])
    assert entry["event"] == "privacy-self-audit" and "scores" not in json.dumps(entry)
    assert verify_log(state / "audit.jsonl").ok
    with pytest.raises(SelfAuditError, match="has not trained a round yet"):
        self_audit(run_dir / "sites" / "nobody", faces=site_faces(cfg, 1, 2))
