"""The membership-inference audit: its rates and bounds, and that it sees leakage in a real federation trained to
overfit and much less in the same federation under DP; run tracking in a real MLflow store."""

from __future__ import annotations

import json
import math
import shutil
import socket
import time

import numpy as np
import pytest
import torch

from client.app import make_client_app
from common.config import ConfigError, RunConfig
from conftest import facefl
from inprocess_grid import InProcessGrid
from server.federation import run_federation
from server.privacy_audit.audit_run import AUDIT_FILE, audit_run
from server.privacy_audit.rates import attack_rates, clopper_pearson, empirical_epsilon, roc_auc


# ----------------------------------------------------------------------------------------------- rates
def test_auc_is_the_mann_whitney_statistic_with_ties():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 6, 300).astype(float), rng.integers(0, 5, 200).astype(float)  # many ties
    brute = ((a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()) / (len(a) * len(b))
    assert roc_auc(a, b) == pytest.approx(brute, abs=1e-12)


def test_clopper_pearson_matches_its_closed_form_at_zero():
    lower, upper = clopper_pearson(0, 10, 0.05)
    assert lower == 0.0 and upper == pytest.approx(1 - 0.05 ** (1 / 10), rel=1e-9)


def test_the_epsilon_bound_is_tight_but_sound_on_randomized_response():
    """Randomized response with epsilon = 1 is exactly 1-DP: the audit's lower bound must come close to 1 with many
    samples and stay below it; with no difference between members and non-members it must prove nothing."""
    rng = np.random.default_rng(0)
    n, eps = 40_000, 1.0
    p = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(n) < p).astype(float)
    non_members = (rng.random(n) < 1 - p).astype(float)
    lower, estimate = empirical_epsilon(members, non_members, delta=0.0)
    assert 0.9 <= lower <= eps and estimate == pytest.approx(eps, abs=0.05)
    same = rng.random(n), rng.random(n)
    assert empirical_epsilon(*same, delta=1e-5)[0] == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        attack_rates(np.array([1.0, np.nan]), np.array([0.0]), delta=1e-5)


# ----------------------------------------------------------------------------------------------- a real federation
def _federation(lfw_root, cache_dir, run_dir, **overrides) -> RunConfig:
    """A 2-site in-process federation of the embedding on 40 LFW people, trained to overfit: few people, many
    local epochs, no augmentation, a third of each person's faces kept out (the non-members: 43 here)."""
    values = {"data": str(lfw_root), "cache-dir": str(cache_dir), "run-dir": str(run_dir), "task": "embedding",
              "model": "compact", "validation-people": 0,
              "num-rounds": 2, "min-sites": 2, "local-epochs": 10, "batch-size": 16, "max-identities": 40,
              "augment": False,
              "val-fraction": 0.34, "eval-pairs": 100, "round-timeout": 900, "accountant": "rdp"}
    cfg = RunConfig.from_mapping({**values, **overrides})
    nodes = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}
    run_federation(InProcessGrid(make_client_app(), nodes, cfg.to_mapping()), cfg)
    return cfg


@pytest.fixture(scope="module")
def overfit_runs(lfw_root, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    _federation(lfw_root, cache_dir, root / "plain", dp=False, tracking="mlflow")
    # Under DP the batch is four times larger (as in the measured recipes): the same 10 epochs in a quarter of the
    # DP-SGD steps; at epsilon 1 the model still learns next to nothing about a face.
    _federation(lfw_root, cache_dir, root / "private", dp=True, **{"target-epsilon": 1.0, "batch-size": 64})
    return root / "plain", root / "private", audit_run(root / "plain"), audit_run(root / "private")


@pytest.mark.slow
def test_the_audit_sees_an_overfit_model_leak_and_dp_leak_far_less(overfit_runs):
    plain_dir, _, plain, private = overfit_runs
    plain, private = plain["models"]["embedding"], private["models"]["embedding"]
    margin, margin_dp = plain["attacks"]["margin"], private["attacks"]["margin"]
    assert margin["non_members"] >= 40 and margin["members"] == margin["non_members"]  # as many per person
    assert margin["auc"] >= 0.65, margin  # members sit on their prototypes; their held-out faces do not (0.77 here)
    assert margin_dp["auc"] <= margin["auc"] - 0.12, (margin_dp, margin)  # 0.51 here
    assert math.isinf(plain["accountant_epsilon"]) and 0 < private["accountant_epsilon"] <= 1.0
    for attack in private["attacks"].values():  # the bound must never exceed what the accountant proved
        assert attack["epsilon_lower_bound"] <= private["accountant_epsilon"]
    assert set(plain["attacks"]) == {"margin", "calibrated"}
    written = json.loads((plain_dir / AUDIT_FILE).read_text())
    assert written["models"]["embedding"]["attacks"]["margin"]["auc"] == margin["auc"]
    assert len(written["models"]["embedding"]["attacks"]["margin"]["roc_fpr"]) >= 10


@pytest.mark.slow
def test_the_audit_game_is_fair_for_a_model_that_trained_on_neither(overfit_runs, tmp_path):
    """The round-0 model trained on no face: members and non-members must look alike to every attack."""
    run = tmp_path / "untrained"
    shutil.copytree(overfit_runs[0], run)
    ckpt = torch.load(run / "checkpoints" / "round-0002.pt", weights_only=True)
    from common.models.federated import build_models

    ckpt["state_dict"] = build_models(RunConfig.from_mapping(ckpt["config"])).state_dict()
    torch.save(ckpt, run / "checkpoints" / "round-0002.pt")
    result = audit_run(run, write=False)["models"]["embedding"]
    for name, attack in result["attacks"].items():
        if name == "margin":  # the site's head still knows the training faces' directions; not a fair control
            continue
        assert abs(attack["auc"] - 0.5) <= 0.15, (name, attack["auc"])
        assert attack["epsilon_lower_bound"] == 0.0


@pytest.mark.slow
def test_audit_command_and_its_errors(overfit_runs, tmp_path):
    done = facefl("audit", "privacy", str(overfit_runs[1]))
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "margin: AUC" in said and "epsilon >=" in said
    missing = facefl("audit", "privacy", str(tmp_path / "nowhere"))
    said = (missing.stdout + missing.stderr).strip()
    assert missing.returncode == 2 and "not a facefl run directory" in said and len(said.splitlines()) == 1


# ----------------------------------------------------------------------------------------------- MLflow
@pytest.mark.slow
def test_a_tracked_run_logs_config_rounds_epsilons_audit_and_report_to_mlflow(overfit_runs, tmp_path):
    from mlflow import MlflowClient

    from server.report.build import build_report

    run = overfit_runs[0]  # tracked; its audit was written (and logged) by the fixture
    build_report([run], out=tmp_path / "report.html", log_fn=lambda _: None, privacy_audit=False)
    info = json.loads((run / "tracking.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    logged = client.get_run(info["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["local-epochs"] == "10" and logged.data.params["dp"] == "False"
    metrics = json.loads((run / "metrics.json").read_text())
    history = client.get_metric_history(info["run_id"], "embedding/accuracy")
    assert [m.step for m in history] == [r["round"] for r in metrics["rounds"]]
    assert [m.value for m in history] == pytest.approx([r["global"]["embedding/accuracy"] for r in metrics["rounds"]])
    trained = [r["round"] for r in metrics["rounds"] if "site-1" in r.get("sites", {})]
    assert trained == [1, 2]  # each site's epsilon from the first round it reported
    assert [m.step for m in client.get_metric_history(info["run_id"], "privacy/site-1/epsilon")] == trained
    audit = json.loads((run / AUDIT_FILE).read_text())
    assert client.get_run(info["run_id"]).data.metrics["audit/embedding/margin/auc"] == pytest.approx(
        audit["models"]["embedding"]["attacks"]["margin"]["auc"])
    artifacts = {a.path for a in client.list_artifacts(info["run_id"], "report")}
    assert artifacts == {"report/report.html", "report/summary.json"}


def test_tracking_settings_are_validated_and_an_unreachable_server_fails_fast(tmp_path):
    with pytest.raises(ConfigError, match="tracking must be one of"):
        RunConfig(tracking="wandb")
    from server.tracking import MlflowTracker

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = RunConfig(tracking="mlflow", tracking_uri=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="Cannot reach the MLflow tracking server"):
        MlflowTracker.start(cfg, tmp_path / "run")
    assert time.monotonic() - start < 30 and not (tmp_path / "run" / "tracking.json").exists()
