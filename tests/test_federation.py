"""Whole federations through `facefl simulate` (Flower's simulation engine, Ray) on real LFW faces."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from conftest import MARK, facefl, marked_processes

from common.audit import verify_log


def _leftover_processes() -> list[int]:
    """Live processes (not zombies) that a facefl command of this test started, found by their environment."""
    return sorted(marked_processes(MARK))


def _all_stopped(wait: float = 15.0) -> bool:
    deadline = time.monotonic() + wait
    while _leftover_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.slow
def test_two_site_federation_on_lfw_trains_accounts_declines_and_resumes(federated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(federated_run, run)  # the shared run stays as it was for the report tests
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["status"] == "completed" and metrics["run"]["completed_rounds"] == 2
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == {0, 1, 2}
    for key in ("embedding/accuracy", "embedding/roc_auc", "embedding/tar@far=1e-1", "vae/psnr", "vae/ssim"):
        assert all(key in rounds[r]["global"] for r in rounds), key
    assert set(rounds[1]["sites"]) == set(rounds[2]["sites"]) == {"site-0", "site-1"}
    # Training loss falls at every site (VAE), and both global models improve on held-out people. (A site's own
    # embedding loss is not monotone here: its private margin head was fitted to its own backbone, which the
    # average with the other site replaces, and a few dozen faces per site make DP-SGD noisy.)
    # Two short DP rounds on 60 people move the from-scratch embedding only a little, and on 200 held-out pairs the
    # ROC AUC's standard error is about 0.035: a fixed margin (+0.03 before) passed or failed with the RNG path
    # (the VAE's training draws from the same stream). Both ranking figures must rise.
    for key in ("embedding/roc_auc", "embedding/tar@far=1e-1"):
        assert rounds[2]["global"][key] > rounds[0]["global"][key], key
    assert rounds[2]["global"]["vae/psnr"] > rounds[0]["global"]["vae/psnr"] + 0.5
    for site in ("site-0", "site-1"):
        r1, r2 = rounds[1]["sites"][site], rounds[2]["sites"][site]
        # Learning is checked on the held-out faces above; a site's own VAE loss may plateau within DP noise by
        # round 2 (one run on aligned faces rose 0.2%), but must not climb past that noise.
        assert r2["vae-train-loss"] < r1["vae-train-loss"] * 1.02, (site, r1, r2)
        assert 0 < r1["epsilon"] < r2["epsilon"] <= 50.0 + 1e-6
        assert metrics["privacy"][site]["epsilon"] == pytest.approx(r2["epsilon"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    ckpt = torch.load(run / "checkpoints" / "round-0002.pt", weights_only=True)
    assert ckpt["round"] == 2 and any(k.startswith("vae.") for k in ckpt["state_dict"])
    assert (run / "sites" / "site-0" / "privacy_ledger.json").is_file()
    assert not any(k.startswith("head") or "weight" == k for k in ckpt["state_dict"])  # heads stay at sites

    # Resume for one more round: the budget was planned for 2 rounds, so both sites decline round 3,
    # the run still completes, and the global model is unchanged.
    more = facefl("simulate", "--resume", str(run), "--rounds", "3", "--no-report", progress=run)
    assert more.returncode == 0, more.stdout + more.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    third = [r for r in metrics["rounds"] if r["round"] == 3][0]
    assert set(third["declined"]) == {"site-0", "site-1"}
    assert metrics["run"]["resumed"][0]["from_round"] == 2 and metrics["run"]["completed_rounds"] == 3
    assert metrics["privacy"]["site-0"]["rounds_declined"] == 1
    assert third["global"]["embedding/accuracy"] == pytest.approx(rounds[2]["global"]["embedding/accuracy"])
    last = torch.load(run / "checkpoints" / "round-0003.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(last[k], ckpt["state_dict"][k]) for k in last)
    assert _all_stopped(), f"facefl simulate left processes running: {_leftover_processes()}"

    # The audit logs: the server's and each site's chains verify; the server recorded every site's head hash, which
    # is still in that site's chain; an edited entry is caught by `facefl audit verify`.
    server_log = run / "audit.jsonl"
    report = verify_log(server_log)
    assert report.ok, report.problems
    assert report.events["run-started"] == 2 and report.events["run-finished"] == 2
    assert report.events["round-results"] == 3 and report.events["budget-exhausted"] == 2
    # each server start logs the sites it hears from; the report's images went through the gate
    assert report.events["site-joined"] == 4 and report.events["egress"] > 0
    entries = [json.loads(line) for line in server_log.read_text().splitlines()]
    started = [e for e in entries if e["event"] == "run-started"][0]["data"]
    assert len(started["app_hash"]) == 64 and started["dp"]["target_epsilon"] == 50.0
    heads = [e for e in entries if e["event"] == "round-results"][-1]["data"]["site_audit_heads"]
    assert set(heads) == {"site-0", "site-1"}
    for site, head in heads.items():
        site_report = verify_log(run / "sites" / site / "audit.jsonl", expected_head=head)
        assert site_report.ok and site_report.events == {"round-trained": 2, "budget-exhausted": 1}, site_report
    ok = facefl("audit", "verify", str(server_log))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    lines = server_log.read_text().splitlines()
    lines[3] = lines[3].replace('"round":1', '"round":7', 1)
    (run / "tampered.jsonl").write_text("\n".join(lines) + "\n")
    bad = facefl("audit", "verify", str(run / "tampered.jsonl"))
    assert bad.returncode == 1 and "line 4" in bad.stdout, bad.stdout


def test_cli_bad_input_is_one_line(tmp_path):
    missing = facefl("simulate", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "Dataset path does not exist" in missing.stderr and str(tmp_path / "nowhere") in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = facefl("simulate", "--data", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "identity folders" in empty.stderr
    not_a_run = facefl("simulate", "--resume", str(tmp_path))
    assert not_a_run.returncode == 2 and "not a facefl run directory" in not_a_run.stderr
    bad_key = facefl("simulate", "--set", "num-round=3")
    assert bad_key.returncode == 2 and "Unknown run-config key" in bad_key.stderr
    triplet = facefl("simulate", "--set", "loss=triplet")
    assert triplet.returncode == 2 and "triplet" in triplet.stderr
