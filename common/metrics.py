"""Evaluation metrics as pure functions of tensors: face verification, image quality, Frechet distance."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pair_scores(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair: float [P, D] and [P, D] -> [P] (higher = more alike)."""
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise ValueError(f"pair_scores needs two [P, D] tensors of equal shape, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}.")
    return F.cosine_similarity(emb_a, emb_b, dim=1)


def _check_pairs(scores: torch.Tensor, is_same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scores.detach().reshape(-1).to(torch.float64).cpu()
    is_same = is_same.detach().reshape(-1).to(torch.bool).cpu()
    if scores.shape != is_same.shape:
        raise ValueError(f"Got {scores.numel()} scores but {is_same.numel()} labels.")
    n_pos = int(is_same.sum())
    if n_pos == 0 or n_pos == is_same.numel():
        raise ValueError(
            f"Verification metrics need both same-identity and different-identity pairs; got {n_pos} same of {is_same.numel()}."
        )
    if not torch.isfinite(scores).all():
        raise ValueError("Verification scores contain NaN or infinite values.")
    return scores, is_same


def roc_curve(scores: torch.Tensor, is_same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ROC curve of "same identity iff score >= threshold".

    Returns
    -------
    fpr, tpr, thresholds : torch.Tensor
        float64 [K + 1] for K distinct scores: ``thresholds`` are the distinct scores in decreasing
        order preceded by +inf (where fpr = tpr = 0), as scikit-learn's ``roc_curve`` with
        ``drop_intermediate=False``.
    """
    scores, is_same = _check_pairs(scores, is_same)
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], is_same[order].to(torch.float64)
    last_of_value = torch.ones_like(s, dtype=torch.bool)
    last_of_value[:-1] = s[1:] != s[:-1]  # the last index of each run of equal scores
    tp = torch.cumsum(y, 0)[last_of_value]
    fp = torch.cumsum(1.0 - y, 0)[last_of_value]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp / tp[-1]])
    fpr = torch.cat([zero, fp / fp[-1]])
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), s[last_of_value]])
    return fpr, tpr, thresholds


def _roc_auc(scores: torch.Tensor, is_same: torch.Tensor) -> float:
    """Exact ROC AUC via the Mann-Whitney U statistic, ties counted as one half (as scikit-learn)."""
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0  # 1-based average rank of each value
    ranks = mean_rank[inverse]
    n_pos = int(is_same.sum())
    n_neg = is_same.numel() - n_pos
    return float((ranks[is_same].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _best_threshold(scores: torch.Tensor, is_same: torch.Tensor) -> tuple[float, float]:
    """The threshold t maximising the accuracy of "same iff score >= t", and that accuracy.

    Candidates are the lowest score (all pairs "same"), midpoints between consecutive distinct
    scores, and just above the highest score (none "same"); ties go to the lowest threshold.
    """
    values = torch.unique(scores, sorted=True)
    candidates = torch.cat(
        [values[:1], (values[:-1] + values[1:]) / 2.0, torch.nextafter(values[-1:], values.new_tensor([math.inf]))]
    )
    pos = torch.sort(scores[is_same]).values
    neg = torch.sort(scores[~is_same]).values
    pos_below = torch.searchsorted(pos, candidates, side="left")  # false rejections
    neg_below = torch.searchsorted(neg, candidates, side="left")  # true rejections
    accuracy = (pos.numel() - pos_below + neg_below).to(torch.float64) / scores.numel()
    best = int(torch.argmax(accuracy))
    return float(candidates[best]), float(accuracy[best])


def _far_key(target: float) -> str:
    """1e-1 -> "tar@far=1e-1", 5e-3 -> "tar@far=5e-3"."""
    mantissa, exponent = f"{target:.0e}".split("e")
    return f"tar@far={mantissa}e{int(exponent)}"


def verification_metrics(
    scores: torch.Tensor,
    is_same: torch.Tensor,
    *,
    folds: int = 10,
    far_targets: tuple[float, ...] = (1e-1, 1e-2, 1e-3),
) -> dict[str, float]:
    """Face-verification metrics for similarity scores (higher = more likely the same identity).

    Parameters
    ----------
    scores : torch.Tensor
        float [P], one similarity per pair (e.g. from :func:`pair_scores`).
    is_same : torch.Tensor
        bool [P], whether the pair shows the same identity.
    folds : int, default 10
        Folds for the accuracy estimate (LFW's protocol uses 10). Pair i belongs to fold
        ``i % folds``; the threshold is chosen on the other folds and scored on fold i.
    far_targets : tuple of float, default (1e-1, 1e-2, 1e-3)
        False-accept rates at which to report the true-accept rate.

    Returns
    -------
    dict[str, float]
        ``"accuracy"`` and ``"accuracy_std"`` (mean and population std over folds),
        ``"threshold"`` (the accuracy-maximising threshold on all pairs), ``"roc_auc"`` (exact,
        ties counted as one half), and ``"tar@far=1e-1"`` etc.: the highest TAR over thresholds
        whose FAR is at most the target (that is, at the lowest such threshold). A target is left
        out when there are too few different-identity pairs to measure it (``n_neg * far < 1``).
    """
    scores, is_same = _check_pairs(scores, is_same)
    n = scores.numel()
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be between 2 and the number of pairs ({n}), got {folds}.")
    fold_of = torch.arange(n) % folds
    fold_acc = []
    for k in range(folds):
        test, train = fold_of == k, fold_of != k
        if is_same[train].all():  # degenerate split with one class only: predict that class
            threshold = -math.inf
        elif not is_same[train].any():
            threshold = math.inf
        else:
            threshold, _ = _best_threshold(scores[train], is_same[train])
        fold_acc.append(float(((scores[test] >= threshold) == is_same[test]).to(torch.float64).mean()))
    accuracies = torch.tensor(fold_acc, dtype=torch.float64)
    threshold, _ = _best_threshold(scores, is_same)
    result = {
        "accuracy": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std(unbiased=False)),
        "threshold": threshold,
        "roc_auc": _roc_auc(scores, is_same),
    }
    n_neg = int((~is_same).sum())
    fpr, tpr, _ = roc_curve(scores, is_same)
    for target in far_targets:
        if n_neg * target >= 1:
            result[_far_key(target)] = float(tpr[fpr <= target + 1e-12].max())
    return result


def image_quality(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM of reconstructions, both with data range 1.0.

    Parameters
    ----------
    original, reconstruction : torch.Tensor
        float [B, 3, H, W] in [0, 1] (H, W >= 11 for SSIM's 11x11 window).

    Returns
    -------
    dict[str, float]
        ``"psnr"``: mean over images of 10 * log10(1 / MSE) in dB; ``inf`` when an image is
        reproduced exactly. ``"ssim"``: torchmetrics' mean SSIM (1.0 for identical images).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if original.shape != reconstruction.shape or original.ndim != 4:
        raise ValueError(
            f"image_quality needs two [B, C, H, W] tensors of equal shape, got {tuple(original.shape)} and {tuple(reconstruction.shape)}."
        )
    original = original.detach().float()
    reconstruction = reconstruction.detach().float()
    mse = (original - reconstruction).pow(2).flatten(1).mean(dim=1).to(torch.float64)  # [B]
    psnr = 10.0 * torch.log10(1.0 / mse)  # inf where mse == 0
    ssim = structural_similarity_index_measure(reconstruction, original, data_range=1.0)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim)}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature vectors.

    ``|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, the formula of FID (Heusel et al. 2017), here on
    whatever features are given (float [N, D] and [M, D], N, M >= 2; unbiased covariances, float64). Matrix square
    roots come from symmetric eigendecompositions, with eigenvalues rounded below zero clipped to zero.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs two [N, D] feature sets (N >= 2, same D), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    mean_term = float((a.mean(0) - b.mean(0)).square().sum())
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return mean_term + float(torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross)
