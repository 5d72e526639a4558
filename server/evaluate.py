"""Global evaluation of the federated models on held-out data no site trains on. Plain functions."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from client.train import (cached_trunk_features, normalize, split_frozen, trunk_features_and_mirror,
                          trunk_fingerprint)
from common.data.sources import EvalData, ProtocolData
from common.metrics import image_quality, pair_scores, verification_metrics
from common.models.federated import FederatedModels
from server.face_judge import FaceJudge, judge_vae


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
    :func:`flip_embed` embeddings. A partly frozen pretrained backbone's trunk runs once per run on these images
    (its features are kept in ``data.cache``); each round then runs only the part that trains."""
    split = split_frozen(model)
    if split is not None:
        trunk, head = split
        scores = pair_scores(*(_head_embed(head, _eval_features(trunk, images, data.cache, name), flip)
                               for name, images in (("a", data.pairs_a), ("b", data.pairs_b))))
        return verification_metrics(scores, data.same)
    rep = (lambda images: flip_embed(model, images)) if flip else (lambda images: embed(model, images))
    scores = pair_scores(rep(data.pairs_a), rep(data.pairs_b))
    return verification_metrics(scores, data.same)


def _eval_features(trunk: nn.Module, images: torch.Tensor, cache: dict, name: str) -> torch.Tensor:
    """``[N, 2, ...]`` trunk features of ``images`` and their mirror images, computed once per trunk."""
    key = (name, trunk_fingerprint(trunk))
    if key not in cache:
        cache[key] = trunk_features_and_mirror(trunk, images)
    return cache[key]


@torch.no_grad()
def _head_embed(head: nn.Module, features: torch.Tensor, flip: bool, batch_size: int = 512) -> torch.Tensor:
    head.eval()
    views = (0, 1) if flip else (0,)
    out = [torch.nn.functional.normalize(sum(head(features[i : i + batch_size, v]) for v in views), dim=1)
           for i in range(0, len(features), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def evaluate_vae(vae: nn.Module, faces: torch.Tensor, batch_size: int = 128, *, judge: FaceJudge | None = None,
                 reference: torch.Tensor | None = None, cache: dict | None = None) -> dict[str, float]:
    """PSNR and SSIM of reconstructions (posterior means) of held-out faces; with a ``judge``, also the face-aware
    metrics of :func:`server.face_judge.judge_vae` (``reference``: disjoint real faces for the Frechet floor)."""
    vae.eval()
    x = faces.float().div(255.0)
    recon = torch.cat([vae.decode(vae.encode(x[i : i + batch_size])[0]) for i in range(0, len(x), batch_size)])
    metrics = image_quality(x, recon)
    if judge is not None and len(faces) >= 2:
        metrics.update(judge_vae(vae, judge, faces, reference, cache=cache, reconstructions=recon))
    return metrics


def evaluate_global(models: FederatedModels, data: EvalData, judge: FaceJudge | None = None) -> dict[str, float]:
    """All global metrics of a round, prefixed by model (``embedding/accuracy``, ``vae/psnr``, ...); the VAE's
    face-aware metrics need the ``judge``."""
    metrics: dict[str, float] = {}
    if models.embedding is not None:
        metrics.update({f"embedding/{k}": float(v) for k, v in evaluate_embedding(models.embedding, data).items()})
    if models.vae is not None:
        metrics.update({f"vae/{k}": float(v) for k, v in evaluate_vae(models.vae, data.faces, judge=judge,
                                                                      reference=data.reference,
                                                                      cache=data.cache).items()})
    return metrics


PROTOCOL_FARS = (1e-2, 1e-3)


def evaluate_protocol(model: nn.Module, protocol: ProtocolData, feature_cache=None) -> dict[str, float]:
    """A model on a dataset's test protocol (``facefl evaluate``), with flip-averaged embeddings:

    - ``accuracy`` (10-fold threshold), ``accuracy_std``, ``roc_auc`` on the protocol's pairs;
    - ``tar@far=1e-2`` / ``1e-3``: matched pairs accepted at a threshold that accepts at most that share of the
      impostor pairs, which are every pair of different people among the images of the pairs (hundreds of
      thousands, so that 1e-3 is measured; the pairs file alone has only hundreds of mismatched pairs);
    - ``rank1``: share of probes (a second image of a test person) whose nearest gallery image (one image of every
      test person) is the same person; ``gallery`` and ``probes`` count them.
    """
    split = split_frozen(model)
    if split is not None and feature_cache is not None:  # a frozen trunk: its features once per face, on disk
        emb = _head_embed(split[1], cached_trunk_features(split[0], protocol.faces, feature_cache), flip=True)
    else:
        emb = flip_embed(model, protocol.faces.images)  # [N, D], unit length
    labels = protocol.faces.labels
    metrics = verification_metrics(pair_scores(emb[protocol.pair_a], emb[protocol.pair_b]), protocol.same)
    metrics = {k: v for k, v in metrics.items() if not k.startswith("tar@")}
    genuine = (emb[protocol.pair_a] * emb[protocol.pair_b]).sum(1)[protocol.same]
    used = torch.unique(torch.cat([protocol.pair_a, protocol.pair_b]))
    sims = emb[used] @ emb[used].T  # [U, U]
    different = labels[used][:, None] != labels[used][None, :]
    impostors = sims[torch.triu(different, diagonal=1)]
    for far in PROTOCOL_FARS:  # NaN where there are too few impostor pairs to measure that rate
        measurable = impostors.numel() * far >= 1
        metrics[f"tar@far={far:.0e}".replace("e-0", "e-")] = tar_at_far(genuine, impostors, far) if measurable \
            else math.nan
    metrics["impostor_pairs"] = float(impostors.numel())
    nearest = (emb[protocol.probes] @ emb[protocol.gallery].T).argmax(1)  # [Q]
    metrics["rank1"] = float((labels[protocol.gallery][nearest] == labels[protocol.probes]).double().mean())
    metrics["gallery"], metrics["probes"] = float(len(protocol.gallery)), float(len(protocol.probes))
    return metrics


def tar_at_far(genuine: torch.Tensor, impostors: torch.Tensor, far: float) -> float:
    """Share of ``genuine`` scores above the lowest threshold at which at most ``far`` of ``impostors`` pass
    ("same" when the score is strictly above the threshold)."""
    if impostors.numel() * far < 1:
        raise ValueError(f"FAR {far:g} needs at least {int(1 / far)} impostor pairs; got {impostors.numel()}.")
    ranked = torch.sort(impostors.flatten(), descending=True).values
    threshold = ranked[int(far * ranked.numel())]  # at most far * n impostors lie strictly above it
    return float((genuine > threshold).double().mean())


def evaluate_command(run_dir: str | None, *, model: str | None = None, data: str | None = None,
                     settings: dict | None = None) -> dict:
    """``facefl evaluate``: the latest checkpoint of ``run_dir``, or the named ``model`` with no training (its
    pretrained weights, or a fresh initialisation; ``settings`` are further run-config values such as
    ``cache-dir``), on ``data``'s test protocol (default: the run's data). Returns a JSON-ready record: what was
    evaluated, on what, and :func:`evaluate_protocol`'s metrics."""
    from common.config import ConfigError, RunConfig
    from common.data.sources import protocol_data
    from common.models.federated import build_models
    from server.rundir import load_run_models

    if (run_dir is None) == (model is None):
        raise ConfigError("Give a run directory (facefl evaluate RUN_DIR) or a model (--model dlib-resnet), "
                          "not both.")
    if run_dir is not None:
        cfg, models, round_ = load_run_models(run_dir)
        cfg = cfg.replace(data=data) if data else cfg  # another dataset's protocol, the same faces pipeline
        what = f"{run_dir} (round {round_}, model {cfg.model})"
    else:
        cfg = RunConfig.from_mapping({"model": model, "task": "embedding", "dp": False, "data": data or "",
                                      **(settings or {})})
        models, what = build_models(cfg), f"{model} with no training"
    if models.embedding is None:
        raise ConfigError(f"{what} has no face-embedding model to evaluate (task={cfg.task}).")
    protocol = protocol_data(cfg)
    started = time.perf_counter()
    from client.site import FEATURES_DIR
    from common.weights import default_cache_dir

    features = Path(cfg.cache_dir or default_cache_dir()) / FEATURES_DIR  # a frozen trunk's features, beside the faces
    metrics = evaluate_protocol(models.embedding.eval(), protocol, feature_cache=features)
    return {"evaluated": what, "model": cfg.model, "data": cfg.data or "synthetic", "protocol": protocol.description,
            "metrics": metrics, "seconds": time.perf_counter() - started}
