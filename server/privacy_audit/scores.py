"""Per-example membership scores of the two models (higher = more likely a training example).

- VAE: the loss it trained on (negative ELBO per pixel value) at the posterior mean, so no sampling noise.
- Embedding, with the site's private margin head: the margin of the true identity's cosine over the best other
  identity's (the confidence a classifier has in the right answer; Carlini et al. 2022 use the same logit margin).
- Embedding, backbone alone: the cosine of a face's embedding to the mean embedding of the same person's other
  training faces at the site. A member was pulled towards them in training; a non-member was not. The number of
  faces in that mean is the same for members and non-members (one face is left out of a non-member's mean at
  random), so the two scores differ only by training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from client.train import normalize
from common.models.vae import vae_loss_terms


@torch.no_grad()
def vae_losses(vae: nn.Module, images: torch.Tensor, *, beta: float, recon: str, batch_size: int = 128) -> np.ndarray:
    """Negative ELBO per pixel value of uint8 ``images`` [N, 3, S, S] at the posterior mean, [N]."""
    was_training = vae.training
    vae.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float().div(255.0)
        mu, logvar = vae.encode(x)
        rec, kl = vae_loss_terms(vae.decode(mu), x, mu, logvar, recon=recon)
        out.append(rec + beta * kl / x[0].numel())
    vae.train(was_training)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit-length embeddings of uint8 ``images``, [N, D]."""
    was_training = backbone.training
    backbone.eval()
    out = [F.normalize(backbone(normalize(images[s : s + batch_size].float().div(255.0))), dim=1)
           for s in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 1)


def head_margins(embeddings: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor) -> np.ndarray:
    """Cosine to the own identity's prototype minus the highest cosine to another's, [N]."""
    cos = embeddings @ F.normalize(head_weight, dim=1).T
    own = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    others = cos.scatter(1, labels.view(-1, 1), float("-inf"))
    best_other = others.max(1).values if cos.shape[1] > 1 else torch.full_like(own, -1.0)
    return (own - best_other).double().numpy()


def centroid_plan(train_labels: torch.Tensor, candidate_labels: torch.Tensor, candidate_is_member: torch.Tensor,
                  candidate_index: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """For each candidate, the indices (into the site's training faces) of the same person's training faces its
    score compares it with: all but itself for a member; all but one chosen at random for a non-member."""
    gen = torch.Generator().manual_seed(seed)
    by_label = {int(k): torch.nonzero(train_labels == k).flatten() for k in torch.unique(candidate_labels)}
    plan = []
    for label, member, index in zip(candidate_labels.tolist(), candidate_is_member.tolist(), candidate_index.tolist()):
        same = by_label[label]
        if member:
            plan.append(same[same != index])
        else:
            drop = int(torch.randint(len(same), (1,), generator=gen))
            plan.append(torch.cat([same[:drop], same[drop + 1 :]]))
    return plan


def centroid_similarity(candidate_embeddings: torch.Tensor, train_embeddings: torch.Tensor,
                        plan: list[torch.Tensor]) -> np.ndarray:
    """Cosine of each candidate's embedding to the mean of the planned training embeddings, [N]."""
    out = torch.empty(len(plan), dtype=torch.float64)
    for i, idx in enumerate(plan):
        centre = F.normalize(train_embeddings[idx].mean(0), dim=0)
        out[i] = float(candidate_embeddings[i] @ centre)
    return out.numpy()
