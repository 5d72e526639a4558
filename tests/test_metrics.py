"""Verification and image-quality metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import image_quality, pair_scores, roc_curve, verification_metrics


def test_perfect_separation():
    torch.manual_seed(0)
    pos = 0.6 + 0.3 * torch.rand(200)
    neg = -0.5 + 0.8 * torch.rand(200)
    scores = torch.cat([pos, neg])
    is_same = torch.cat([torch.ones(200), torch.zeros(200)]).bool()
    result = verification_metrics(scores, is_same)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["roc_auc"] == 1.0
    assert float(neg.max()) < result["threshold"] <= float(pos.min())
    assert result["tar@far=1e-1"] == 1.0 and result["tar@far=1e-2"] == 1.0
    assert "tar@far=1e-3" not in result  # 200 negatives cannot measure a FAR of 1e-3


def test_random_scores_give_auc_near_half():
    torch.manual_seed(0)
    result = verification_metrics(torch.rand(4000), torch.rand(4000) < 0.5)
    assert result["roc_auc"] == pytest.approx(0.5, abs=0.03)
    assert result["accuracy"] == pytest.approx(0.5, abs=0.04)


def test_auc_and_roc_on_hand_examples():
    scores, is_same = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])
    assert verification_metrics(scores, is_same, folds=2)["roc_auc"] == pytest.approx(0.75)
    fpr, tpr, thresholds = roc_curve(scores, is_same)
    torch.testing.assert_close(fpr, torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(tpr, torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        thresholds, torch.tensor([math.inf, 0.8, 0.4, 0.35, 0.1], dtype=torch.float64), check_dtype=False
    )
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    tied = verification_metrics(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([True, False, False, True]), folds=2)
    assert tied["roc_auc"] == pytest.approx(0.875)


def test_tar_at_far_on_a_constructed_example():
    neg = torch.arange(100, dtype=torch.float64) / 100  # 0.00 .. 0.99
    pos = torch.tensor([0.995, 0.993, 0.95, 0.92, 0.905, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    scores = torch.cat([pos, neg])
    is_same = torch.cat([torch.ones(10), torch.zeros(100)]).bool()
    result = verification_metrics(scores, is_same)
    # FAR <= 0.1 allows the 10 negatives >= 0.90, where 5 of 10 positives are accepted
    assert result["tar@far=1e-1"] == pytest.approx(0.5)
    # FAR <= 0.01 allows the one negative at 0.99: positives 0.995 and 0.993 are accepted
    assert result["tar@far=1e-2"] == pytest.approx(0.2)
    assert "tar@far=1e-3" not in result


def test_fold_accuracy_uses_held_out_thresholds():
    # Interleaved folds: pair i is in fold i % 2. Each fold holds one "odd" pair whose label disagrees
    # with its score, so the best accuracy on either fold is 3/4.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.3, 0.1, 0.85, 0.15])
    is_same = torch.tensor([True, True, True, False, False, False, False, True])
    result = verification_metrics(scores, is_same, folds=2)
    assert 0.0 <= result["accuracy"] <= 0.75
    assert result == verification_metrics(scores, is_same, folds=2)  # deterministic


def test_one_class_only_is_refused():
    with pytest.raises(ValueError, match="both same-identity and different-identity"):
        verification_metrics(torch.rand(10), torch.ones(10, dtype=torch.bool))


def test_image_quality():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    same = image_quality(images, images.clone())
    assert same["psnr"] == math.inf  # exact reproduction: infinite PSNR
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    flat = torch.full((2, 3, 32, 32), 0.5)
    shifted = image_quality(flat, flat + 0.1)  # MSE 0.01 everywhere
    assert shifted["psnr"] == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-4)
    assert image_quality(images, torch.rand(2, 3, 32, 32))["ssim"] < 0.2


def test_pair_scores():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 5.0], [-1.0, 0.0]])
    torch.testing.assert_close(pair_scores(a, b), torch.tensor([0.0, 1.0, -1.0]))
