"""What the report computes from a run's latest checkpoint: the ROC and pair distances of the embedding model on
the held-out pairs, and the VAE's reconstructions, samples and a morph. Plain functions of models and data; no
file I/O (the held-out data comes from :func:`common.data.sources.eval_data`, through its cache)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.config import RunConfig
from common.metrics import pair_scores, roc_curve, verification_metrics
from common.models.federated import FederatedModels, build_models
from common.data.sources import EvalData
from server.evaluate import flip_embed
from server.face_judge import FaceJudge, morph_metrics

MORPH_STEPS = 11  # alpha = 0, 0.1, ..., 1


@dataclass
class EmbeddingEval:
    """Verification of held-out pairs by the global embedding model."""

    metrics: dict[str, float]
    fpr: np.ndarray
    tpr: np.ndarray
    matched_distances: np.ndarray  # cosine distance (1 - cosine similarity) of same-person pairs
    mismatched_distances: np.ndarray
    pairs: int

    def summary(self) -> dict:
        return {"pairs": self.pairs, **{k: float(v) for k, v in self.metrics.items()},
                "matched_distance_mean": float(self.matched_distances.mean()),
                "mismatched_distance_mean": float(self.mismatched_distances.mean())}


@dataclass
class VaeImages:
    """uint8 ``[N, 3, S, S]`` images produced by the global VAE (not yet anonymized)."""

    originals: torch.Tensor
    reconstructions: torch.Tensor
    samples: torch.Tensor
    morph: torch.Tensor
    morph_alphas: list[float]
    morph_to_a: list[float] | None = None  # with a judge: each frame's descriptor distance to source face a
    morph_to_b: list[float] | None = None


def models_from_state(cfg: RunConfig, state: dict[str, torch.Tensor]) -> FederatedModels:
    models = build_models(cfg)
    models.load_state_dict(state)
    for module in (models.embedding, models.vae):
        if module is not None:
            module.eval()
    return models


def _thin(fpr: torch.Tensor, tpr: torch.Tensor, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a ROC curve (keeping both ends), for plotting."""
    n = fpr.numel()
    keep = torch.unique(torch.cat([torch.linspace(0, n - 1, min(n, max_points)).round().long(),
                                   torch.tensor([0, n - 1])]))
    return fpr[keep].numpy(), tpr[keep].numpy()


@torch.no_grad()
def evaluate_embedding_pairs(model: torch.nn.Module, data: EvalData) -> EmbeddingEval:
    """ROC, TAR@FAR and the distance distributions of the held-out pairs (flip-averaged embeddings, as in
    :func:`server.evaluate.evaluate_embedding`)."""
    scores = pair_scores(flip_embed(model, data.pairs_a), flip_embed(model, data.pairs_b))
    same = data.same.bool()
    metrics = verification_metrics(scores, same)
    fpr, tpr, _ = roc_curve(scores, same)
    fpr, tpr = _thin(fpr, tpr)
    distance = (1.0 - scores).double().numpy()
    return EmbeddingEval(metrics, fpr, tpr, distance[same.numpy()], distance[~same.numpy()], int(same.numel()))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


@torch.no_grad()
def vae_images(vae: torch.nn.Module, data: EvalData, *, count: int = 8, seed: int = 0,
               morph_steps: int = MORPH_STEPS, judge: FaceJudge | None = None) -> VaeImages:
    """Held-out faces and their reconstructions, ``count`` samples from the prior, and a morph between the two
    people of the first mismatched held-out pair; with a ``judge``, each morph frame's descriptor distance to the two
    source faces."""
    if morph_steps < 11:
        raise ValueError(f"A report morph has at least 11 frames (alpha step 0.1 or finer); got {morph_steps}.")
    originals = data.faces[:count]
    recon = vae.reconstruct(originals.float().div(255)) if len(originals) else originals.float()
    samples = vae.sample(count, generator=torch.Generator().manual_seed(seed))
    different = torch.nonzero(~data.same.bool()).flatten()
    index = int(different[0]) if len(different) else 0
    a, b = data.pairs_a[index].float().div(255), data.pairs_b[index].float().div(255)
    frames = vae.morph(a, b, steps=morph_steps)
    alphas = [round(float(v), 4) for v in torch.linspace(0, 1, morph_steps)]
    images = VaeImages(originals, _to_uint8(recon), _to_uint8(samples), _to_uint8(frames), alphas)
    if judge is not None:
        ends = judge.describe(torch.stack([data.pairs_a[index], data.pairs_b[index]]))
        path = morph_metrics(judge.describe(frames)[None], ends[:1], ends[1:])
        images.morph_to_a, images.morph_to_b = path["to_a"], path["to_b"]
    return images
