"""Global evaluation of the federated models on held-out data no site trains on. Plain functions."""

from __future__ import annotations

import torch
from torch import nn

from client.train import normalize
from common.data.sources import EvalData
from common.metrics import image_quality, pair_scores, verification_metrics
from common.models.federated import FederatedModels


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings of uint8 images [N, 3, H, W] (model in eval mode)."""
    model.eval()
    out = [model(normalize(images[i : i + batch_size].float().div(255.0))) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def flip_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each face embedded as the normalised sum of the embeddings of itself and its mirror image (a standard
    test-time trick)."""
    return torch.nn.functional.normalize(embed(model, images) + embed(model, images.flip(-1)), dim=1)


def evaluate_embedding(model: nn.Module, data: EvalData, *, flip: bool = True) -> dict[str, float]:
    """Verification on held-out pairs: accuracy (10-fold threshold), ROC AUC, TAR at FAR; with ``flip``, on
    :func:`flip_embed` embeddings."""
    rep = (lambda images: flip_embed(model, images)) if flip else (lambda images: embed(model, images))
    scores = pair_scores(rep(data.pairs_a), rep(data.pairs_b))
    return verification_metrics(scores, data.same)


@torch.no_grad()
def evaluate_vae(vae: nn.Module, faces: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """PSNR and SSIM of reconstructions (posterior means) of held-out faces."""
    vae.eval()
    x = faces.float().div(255.0)
    recon = torch.cat([vae.decode(vae.encode(x[i : i + batch_size])[0]) for i in range(0, len(x), batch_size)])
    return image_quality(x, recon)


def evaluate_global(models: FederatedModels, data: EvalData) -> dict[str, float]:
    """All global metrics of a round, prefixed by model (``embedding/accuracy``, ``vae/psnr``, ...)."""
    metrics: dict[str, float] = {}
    if models.embedding is not None:
        metrics.update({f"embedding/{k}": float(v) for k, v in evaluate_embedding(models.embedding, data).items()})
    if models.vae is not None:
        metrics.update({f"vae/{k}": float(v) for k, v in evaluate_vae(models.vae, data.faces).items()})
    return metrics
