"""One training round at one site, as a plain function: global weights in, update and metrics out.

The ClientApp (``client/app.py``) only translates Flower messages to and from :func:`run_round`.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client import dp_faults
from client.canaries import planned_canaries
from client.privacy import PrivacyLedger, newest
from client.train import DPSettings, evaluate_identification, evaluate_vae, steps_per_epoch, train_embedding, train_vae
from common.atomic import atomic_torch_save
from common.audit import AuditLog
from common.config import RunConfig
from common.data.faceset import FaceSet
from common.data.sources import load_site_folder, site_faces
from common.models.federated import build_models
from common.models.losses import MarginHead
from common.models.vae import Discriminator
from common.weights import default_cache_dir


@functools.lru_cache(maxsize=2)
def _perceptual_loss(cache_dir: str):
    """The VAE's perceptual term on dlib's pretrained face ResNet from the installed ``face-recognition-models``
    package (converted once into ``cache_dir``, loaded by SHA-256; once per process)."""
    from common.dlib_weights import cached_dlib_resnet
    from common.models.dlib_resnet import DlibResNet
    from common.models.face_perceptual import FacePerceptualLoss
    from common.weights import load_state_dict_checked

    path, sha256 = cached_dlib_resnet(cache_dir)
    net = DlibResNet()
    net.load_state_dict(load_state_dict_checked(path, sha256))
    return FacePerceptualLoss(net)

log = logging.getLogger("facefl.site")

HEAD_FILE = "margin_head.pt"
AUDIT_FILE = "audit.jsonl"
DISCRIMINATOR_FILE = "discriminator.pt"
OPTIMIZER_FILE = "optimizer.pt"  # the embedding optimizer's momenta, kept between rounds like the margin head
RECEIVED_FILE = "received_model.pt"  # the global model of the site's latest round, for `facefl audit site`
FEATURES_DIR = "features"  # in the face cache: a frozen pretrained trunk's outputs for the faces (client.train)


@dataclass(frozen=True)
class Site:
    """Who a site is and where its data and state live.

    In a simulation a site is partition ``index`` of ``num_sites``; in a deployment it reads ``data_path``.
    """

    name: str
    state_dir: Path
    index: int | None = None
    num_sites: int | None = None
    data_path: str | None = None

    @classmethod
    def from_node_config(cls, node_config: dict, default_state_root: str | Path) -> Site:
        if "data-path" in node_config:
            name = str(node_config.get("site-name") or Path(str(node_config["data-path"])).name)
            state = node_config.get("state-dir") or Path(default_state_root) / name
            return cls(name=name, state_dir=Path(str(state)), data_path=str(node_config["data-path"]))
        if "partition-id" not in node_config:
            raise ValueError("This site has no data: start it with --node-config \"data-path='/path/to/faces'\".")
        index, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        name = str(node_config.get("site-name") or f"site-{index}")
        state = node_config.get("state-dir") or Path(default_state_root) / name
        return cls(name=name, state_dir=Path(str(state)), index=index, num_sites=num)


@dataclass
class SiteState:
    """What a site keeps between rounds (in Flower's node state and in its state directory)."""

    ledger: PrivacyLedger | None = None
    head: dict[str, torch.Tensor] | None = None
    discriminator: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, torch.Tensor] | None = None  # the embedding optimizer's momenta (client.train)


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    declined: bool = False
    message: str = ""
    site_state: SiteState = field(default_factory=SiteState)
    audit_head: str = ""  # hash of the site's newest audit entry, reported to the server (which logs it)


@functools.lru_cache(maxsize=4)
def load_data(cfg: RunConfig, site: Site) -> tuple[FaceSet, FaceSet]:
    """The site's (train, validation) faces; loaded once per process (faces are cached on disk as well)."""
    if site.data_path is not None:
        return load_site_folder(cfg, site.data_path)
    return site_faces(cfg, site.index, site.num_sites)


def restore_state(site: Site, in_memory: SiteState) -> SiteState:
    """Merge the node-state copy with the state directory's copy (the newer ledger wins)."""
    ledger = newest(in_memory.ledger, PrivacyLedger.load(site.state_dir))
    def stored(value, file: str):
        if value is None and (site.state_dir / file).exists():
            return torch.load(site.state_dir / file, map_location="cpu", weights_only=True)
        return value
    return SiteState(ledger, stored(in_memory.head, HEAD_FILE), stored(in_memory.discriminator, DISCRIMINATOR_FILE),
                     stored(in_memory.optimizer, OPTIMIZER_FILE))


def embedding_settings(cfg: RunConfig, server_round: int) -> dict:
    """:func:`client.train.train_embedding`'s settings from the run config in round ``server_round`` (the learning
    rates follow the schedule); a centralized epoch that stands for a round uses them too (``facefl bench``)."""
    factor = cfg.lr_factor(server_round)
    return {"epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "lr": cfg.embedding_lr * factor,
            "backbone_lr": cfg.backbone_learning_rate * factor, "optimizer": cfg.embedding_optimizer, "loss": cfg.loss,
            "margin": cfg.margin, "scale": cfg.scale, "augment": cfg.augment,
            "feature_cache": Path(cfg.cache_dir or default_cache_dir()) / FEATURES_DIR}


IMAGE_SKIPS = ("unreadable", "not-an-image", "no-face")
IDENTITY_SKIPS = ("too-few-images", "missing-identity")


def skipped_counts(faces: FaceSet) -> dict[str, float]:
    """Inputs the site skipped while loading its data (bad files, no face, one-image people), for the run log."""
    return {"skipped-images": float(sum(faces.skipped.get(k, 0) for k in IMAGE_SKIPS)),
            "skipped-identities": float(sum(faces.skipped.get(k, 0) for k in IDENTITY_SKIPS))}


def metric_keys(cfg: RunConfig) -> list[str]:
    """Keys every reply of a run carries (Flower requires the same keys from every site)."""
    keys = ["num-examples", "num-identities", "declined", "epsilon", "target-epsilon", "delta", "noise-multiplier",
            "sample-rate", "train-seconds", "fit-seconds", "skipped-images", "skipped-identities"]
    if cfg.trains_embedding:
        keys += ["embedding-train-loss", "embedding-train-accuracy", "embedding-val-accuracy"]
    if cfg.trains_vae:
        keys += ["vae-train-loss", "vae-val-loss"]
    return keys


def run_round(cfg: RunConfig, site: Site, global_state: dict[str, torch.Tensor], server_round: int,
              site_state: SiteState) -> RoundResult:
    """Train this site's models for one round, within its privacy budget.

    Returns the updated federated weights and the metrics to report, or a declined result (no weights) when
    the round would exceed the site's remaining budget.
    """
    start = time.perf_counter()
    audit = AuditLog(site.state_dir / AUDIT_FILE, actor=f"site:{site.name}")
    train, val = load_data(cfg, site)
    state = restore_state(site, site_state)
    metrics = {k: float("nan") for k in metric_keys(cfg)}
    metrics.update({"num-examples": float(len(train)), "num-identities": float(train.num_identities),
                    "declined": 0.0, "epsilon": 0.0, "target-epsilon": cfg.target_epsilon if cfg.dp else 0.0,
                    "delta": 0.0, "noise-multiplier": 0.0,
                    "sample-rate": 1.0 / steps_per_epoch(len(train), cfg.batch_size)})
    metrics.update(skipped_counts(train))

    fault = dp_faults.fault_for(site.name)  # None, except in the tests that break DP on purpose
    atomic_torch_save(site.state_dir / RECEIVED_FILE, {"round": server_round, "config": cfg.to_mapping(),
                                                       "state_dict": global_state}, durable=False)
    dp = None
    if cfg.dp:
        ledger = state.ledger or PrivacyLedger.create(site=site.name, target_epsilon=cfg.target_epsilon,
                                                      target_delta=cfg.target_delta, accountant=cfg.accountant,
                                                      num_examples=len(train))
        state.ledger = ledger
        steps = cfg.local_epochs * steps_per_epoch(len(train), cfg.batch_size)
        q = dp_faults.accounted_sample_rate(fault, 1.0 / steps_per_epoch(len(train), cfg.batch_size))
        mechanisms_per_round = int(cfg.trains_embedding) + int(cfg.trains_vae) * (1 + int(cfg.vae_adversarial))
        sigma = ledger.plan_noise(sample_rate=q, steps_per_round=steps * mechanisms_per_round,
                                  budget_rounds=cfg.budget_rounds)
        metrics.update({"delta": ledger.delta, "noise-multiplier": sigma, "epsilon": ledger.spent})
        fits, projected = ledger.fits([(sigma, q, steps)] * mechanisms_per_round)
        if not fits:
            ledger.record_decline(server_round, projected)
            ledger.save(site.state_dir)
            message = (f"site {site.name} declines round {server_round}: it would reach epsilon {projected:.2f}, "
                       f"above its budget of {cfg.target_epsilon:g} (spent {ledger.spent:.2f}).")
            log.warning(message)
            entry = audit.append("budget-exhausted", round=server_round, spent=ledger.spent, projected=projected,
                                 budget=cfg.target_epsilon, delta=ledger.delta)
            metrics["declined"] = 1.0
            metrics["train-seconds"] = time.perf_counter() - start
            return RoundResult(None, metrics, declined=True, message=message, site_state=state, audit_head=entry.hash)
        dp = DPSettings(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm)

    models = build_models(cfg)
    models.load_state_dict(global_state)
    seed = cfg.seed * 100_003 + server_round * 101 + (site.index or 0)
    mechanisms: list[tuple[float, float, int]] = []
    metrics["fit-seconds"] = 0.0  # of train-seconds, the time in training steps (the rest is fixed cost per round)
    if models.embedding is not None:
        fit_start = time.perf_counter()
        head = MarginHead(cfg.embedding_dim, train.num_identities)
        if state.head is not None and state.head.get("weight", torch.empty(0)).shape == head.weight.shape:
            head.load_state_dict(state.head)
        canaries = (planned_canaries(cfg, site.index, server_round, train.num_identities, models.embedding)
                    if site.index is not None else None)
        res = train_embedding(models.embedding, head, train, dp=dp, seed=seed, optimizer_state=state.optimizer,
                              proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
                              canaries=canaries, broken_dp=fault, **embedding_settings(cfg, server_round))
        metrics["fit-seconds"] += time.perf_counter() - fit_start
        mechanisms += res.mechanisms
        state.head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        state.optimizer = res.optimizer_state
        metrics["embedding-train-loss"] = res.metrics["train-loss"]
        metrics["embedding-train-accuracy"] = res.metrics["train-accuracy"]
        metrics["embedding-val-accuracy"] = evaluate_identification(models.embedding, head, val)["val-accuracy"]
    if models.vae is not None:
        disc = None
        if cfg.vae_adversarial:
            disc = Discriminator(image_size=cfg.image_size)
            if state.discriminator is not None:
                disc.load_state_dict(state.discriminator)
        vae_dp = DPSettings(dp.noise_multiplier, cfg.vae_max_grad_norm) if dp is not None else None
        fit_start = time.perf_counter()
        res = train_vae(models.vae, train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                        lr=cfg.vae_learning_rate, beta=cfg.vae_beta, recon=cfg.vae_recon, augment=cfg.augment,
                        dp=vae_dp, discriminator=disc,
                        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0, seed=seed + 1,
                        perceptual=_perceptual_loss(str(cfg.cache_dir or default_cache_dir()))
                        if cfg.vae_perceptual else None,
                        perceptual_weight=cfg.vae_perceptual)
        metrics["fit-seconds"] += time.perf_counter() - fit_start
        mechanisms += res.mechanisms
        if disc is not None:
            state.discriminator = {k: v.detach().clone() for k, v in disc.state_dict().items()}
        metrics["vae-train-loss"] = res.metrics["train-loss"]
        metrics["vae-val-loss"] = evaluate_vae(models.vae, val, beta=cfg.vae_beta, recon=cfg.vae_recon)["val-loss"]

    if state.ledger is not None:
        if fault is not None:
            mechanisms = [(s, dp_faults.accounted_sample_rate(fault, q), n) for s, q, n in mechanisms]
        metrics["epsilon"] = state.ledger.record_round(server_round, mechanisms)
        state.ledger.save(site.state_dir)
    if state.head is not None:
        atomic_torch_save(site.state_dir / HEAD_FILE, state.head)
    if state.discriminator is not None:
        atomic_torch_save(site.state_dir / DISCRIMINATOR_FILE, state.discriminator)
    if state.optimizer is not None:
        atomic_torch_save(site.state_dir / OPTIMIZER_FILE, state.optimizer)
    metrics["train-seconds"] = time.perf_counter() - start
    entry = audit.append("round-trained", round=server_round, examples=len(train), identities=train.num_identities,
                         dp=cfg.dp, epsilon=metrics["epsilon"], delta=metrics["delta"],
                         noise_multiplier=metrics["noise-multiplier"], sample_rate=metrics["sample-rate"],
                         skipped_images=metrics["skipped-images"])
    return RoundResult(models.state_dict(), metrics, site_state=state, audit_head=entry.hash)
