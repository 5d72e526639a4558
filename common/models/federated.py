"""The federated models of a run, and their exchange format (one flat state dict with task prefixes).

Only the backbone of the embedding model and the VAE are federated. The margin head (one prototype per identity
of a site) and the VAE-GAN discriminator (it sees a site's raw faces) stay at the site. Of a pretrained backbone
(``model = "dlib-resnet"``) only the part that trains (``trainable``) travels: every site and the server load the
frozen rest from the same local weights, checked by SHA-256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.config import ConfigError, RunConfig
from common.models.dlib_resnet import DlibResNet, set_trainable
from common.models.embedding import build_embedding_model
from common.models.scattering import ScatterNet
from common.models.vae import ConvVAE, VAEConfig

EMBEDDING_PREFIX = "embedding."
VAE_PREFIX = "vae."


@dataclass
class FederatedModels:
    embedding: nn.Module | None
    vae: nn.Module | None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat CPU state dict with ``embedding.`` / ``vae.`` prefixes: what a site sends and the server averages.
        Of a partly frozen model (a pretrained backbone) only the trainable parameters."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in ((EMBEDDING_PREFIX, self.embedding), (VAE_PREFIX, self.vae)):
            if module is not None:
                out.update({prefix + k: v.detach().cpu().clone() for k, v in _exchanged(module).items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a flat state dict, checking that it has exactly the expected keys, shapes and dtypes, and only
        finite values; anything else is a ``ValueError`` that names the offending entry."""
        check_state(self.state_dict(), state)
        for prefix, module in ((EMBEDDING_PREFIX, self.embedding), (VAE_PREFIX, self.vae)):
            if module is not None:
                part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                module.load_state_dict(part, strict=len(part) == len(module.state_dict()))  # keys checked above


def _exchanged(module: nn.Module) -> dict[str, torch.Tensor]:
    """What of ``module`` travels: its whole state, or only its trainable parameters when some are frozen."""
    params = dict(module.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return module.state_dict()
    return {name: p for name, p in params.items() if p.requires_grad}


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"Model update has the wrong entries (missing {missing[:3]}, unexpected {extra[:3]}).")
    for key, ref in expected.items():
        value = got[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Model update entry {key} is a {type(value).__name__}, not a tensor.")
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(f"Model update entry {key} is {value.dtype} {tuple(value.shape)}; expected "
                             f"{ref.dtype} {tuple(ref.shape)}.")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"Model update entry {key} contains NaN or Inf.")


def build_models(cfg: RunConfig, *, seed: int | None = None) -> FederatedModels:
    """Freshly initialised models for ``cfg`` (same seed, same weights on every machine)."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    embedding = vae = None
    if cfg.trains_embedding and cfg.model == "dlib-resnet":
        embedding = build_dlib_backbone(cfg)
    elif cfg.trains_embedding and cfg.model == "scatternet":
        embedding = ScatterNet(cfg.embedding_dim, image_size=cfg.image_size)
        if cfg.weights_path:
            from common.weights import load_state_dict_checked

            embedding.load_state_dict(load_state_dict_checked(cfg.weights_path, cfg.weights_sha256))
    elif cfg.trains_embedding:
        embedding = build_embedding_model(
            cfg.model,
            embedding_dim=cfg.embedding_dim,
            dp=cfg.dp,
            image_size=cfg.image_size,
            weights_path=cfg.weights_path or None,
            weights_sha256=cfg.weights_sha256 or None,
        )
    if cfg.trains_vae:
        vae = ConvVAE(VAEConfig(image_size=cfg.image_size, latent_channels=cfg.latent_channels, beta=cfg.vae_beta,
                                recon=cfg.vae_recon))
    return FederatedModels(embedding, vae)


def build_dlib_backbone(cfg: RunConfig) -> DlibResNet:
    """dlib's pretrained face ResNet with its weights (``weights-path``, a ``.dat`` file, or the one the installed
    ``face-recognition-models`` package ships), converted once into the cache and loaded by SHA-256; unit-length
    embeddings of [-1, 1] inputs like the other backbones; ``cfg.trainable_part`` trains, the rest is frozen."""
    from common.dlib_weights import cached_dlib_resnet
    from common.weights import default_cache_dir, load_state_dict_checked, sha256_file

    source = cfg.weights_path or None
    if source is not None and sha256_file(source) != cfg.weights_sha256.lower():
        raise ConfigError(f"weights-path {source} does not have the SHA-256 given in weights-sha256; check the file "
                          "(a damaged copy?) or the hash.")
    path, sha256 = cached_dlib_resnet(cfg.cache_dir or default_cache_dir(), source=source)
    model = DlibResNet(normalize=True, signed_input=True)
    model.load_state_dict(load_state_dict_checked(path, sha256))
    set_trainable(model, cfg.trainable_part)
    return model


def update_norm(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``new - old`` over all floating-point entries."""
    total = 0.0
    for key, value in new.items():
        if value.is_floating_point():
            total += float((value - old[key]).double().pow(2).sum())
    return math.sqrt(total)
