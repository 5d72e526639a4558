"""Reference models for difficulty calibration (Watson et al. 2022, "On the importance of difficulty calibration
in membership inference attacks").

Some faces are easy for any model (a plain background, a frontal pose) and some are hard, whoever trained on them;
an attack that thresholds the raw loss mostly measures that. A reference model trained the same way on people of
the same distribution that are neither members nor non-members of the audit tells how easy each face is, and the
calibrated score is the target model's score relative to the reference's. The reference population is the run's
evaluation people (LFW ``peopleDevTest``; the held-out identities of another dataset), which no site trains on and
the audit does not use as candidates. References train without DP (they are never released) and are cached by
what defines them, so auditing several runs of one configuration trains them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from client.site import embedding_settings
from client.train import train_embedding, train_vae
from common.atomic import atomic_torch_save
from common.config import RunConfig
from common.data.faceset import FaceSet
from common.data.datasets import load_faces
from common.data.sources import evaluation_identities, image_count, protocol_data
from common.models.federated import build_models
from common.models.losses import MarginHead
from common.weights import default_cache_dir

log = logging.getLogger("facefl.privacy_audit")

CACHE_SUBDIR = "privacy-audit"
# The configuration keys a reference model depends on (anything else, such as DP, rounds or sites, does not).
_DEFINING = ("data", "image-size", "model", "embedding-dim", "latent-channels", "vae-beta", "vae-recon", "loss",
             "margin", "scale", "augment", "batch-size", "optimizer", "lr", "weights-path", "trainable",
             "heldout-fraction", "seed")


MAX_POPULATION = 2000  # faces; enough to tell easy from hard faces, and the reference VAE trains in minutes
MIN_POPULATION = 200


def population(cfg: RunConfig, max_faces: int = MAX_POPULATION) -> FaceSet:
    """The reference population: the run's evaluation people (never a site's, never an audit candidate), at most
    ``max_faces`` faces of them (whole people, in a seeded order). The audit asks for about as many faces as it
    audits (at least 200): a reference trained on far more faces than the target would judge difficulty by a
    different standard, and a small run's audit stays quick."""
    if not cfg.data:
        faces = protocol_data(cfg, progress=False).faces
        names, counts = list(faces.identities), torch.bincount(faces.labels, minlength=faces.num_identities).tolist()
    else:  # choose the people first from their image counts: only their faces are prepared and loaded
        names = sorted(evaluation_identities(cfg))
        counts = [image_count(cfg, name) for name in names]
        faces = None
    if sum(counts) > max_faces:
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        chosen, total = [], 0
        for k in order:
            if total + counts[k] > max_faces:
                continue
            chosen.append(names[k])
            total += counts[k]
        names = sorted(chosen)
    if faces is not None:
        return faces.by_identity(names)
    return load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=names, min_images=1,
                      cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, progress=False)


def _key(cfg: RunConfig, kind: str, epochs: int, faces: FaceSet) -> str:
    mapping = cfg.to_mapping()
    defining = {k: mapping[k] for k in _DEFINING} | {"dp-architecture": cfg.dp and cfg.model == "inception",
                                                      "kind": kind, "epochs": epochs, "faces": len(faces),
                                                      "people": faces.num_identities, "format": 1}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def _cached(cfg: RunConfig, kind: str, epochs: int, faces: FaceSet, model: nn.Module, train) -> nn.Module:
    folder = Path(cfg.cache_dir or default_cache_dir()) / CACHE_SUBDIR
    path = folder / f"{kind}-{_key(cfg, kind, epochs, faces)}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is retrained, not trusted
            log.warning("Reference model %s is unreadable (%s); training it again.", path, exc)
    train(model)
    atomic_torch_save(path, model.state_dict())
    return model.eval()


def reference_vae(cfg: RunConfig, faces: FaceSet, *, epochs: int) -> nn.Module:
    """A VAE of the run's architecture, trained without DP on ``faces`` for ``epochs`` epochs (cached)."""
    vae = build_models(cfg.replace(task="vae"), seed=cfg.seed + 1).vae

    def train(model: nn.Module) -> None:
        log.info("Training the reference VAE on %d faces (%d epochs) ...", len(faces), epochs)
        train_vae(model, faces, epochs=epochs, batch_size=cfg.batch_size, lr=1e-3, beta=cfg.vae_beta,
                  recon=cfg.vae_recon, augment=cfg.augment, dp=None, seed=cfg.seed + 7)

    return _cached(cfg, "vae", epochs, faces, vae, train)


def reference_embedding(cfg: RunConfig, faces: FaceSet, *, epochs: int) -> nn.Module:
    """An embedding backbone of the run's architecture, trained without DP with the run's margin loss on the people
    of ``faces`` with two or more images, for ``epochs`` epochs (cached)."""
    counts = torch.bincount(faces.labels, minlength=faces.num_identities)
    people = faces.by_identity([faces.identities[k] for k in torch.nonzero(counts >= 2).flatten().tolist()])
    backbone = build_models(cfg.replace(task="embedding"), seed=cfg.seed + 1).embedding  # the run's architecture

    def train(model: nn.Module) -> None:
        log.info("Training the reference embedding on %d faces of %d people (%d epochs) ...", len(people),
                 people.num_identities, epochs)
        settings = embedding_settings(cfg.replace(dp=False, loss="arcface" if cfg.loss == "triplet" else cfg.loss), 1)
        settings.update(epochs=epochs, lr=settings["lr"])
        train_embedding(model, MarginHead(cfg.embedding_dim, people.num_identities), people, dp=None,
                        seed=cfg.seed + 7, **settings)

    return _cached(cfg, "embedding", epochs, people, backbone, train)
