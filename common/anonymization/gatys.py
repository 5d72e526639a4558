"""Gatys et al. (2016) style transfer by optimising the pixels: the slow reference for
:mod:`common.anonymization.stylizer`.

One image at a time, with the loss terms of :mod:`common.anonymization.style_train` (content, Gram style, total
variation and the optional identity term). The pixels are parameterised as ``sigmoid(z)`` and ``z`` is
optimised with Adam, so the image stays in [0, 1] without clamping (which would stop the gradient).
No I/O happens here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from common.anonymization import perceptual
from common.anonymization.style_train import StyleTrainSettings, frozen, identity_embeddings

_DEFAULTS = StyleTrainSettings()
_LOGIT_EPS = 1e-3  # content pixels are clamped to [eps, 1 - eps] before the logit
INIT_NOISE = 0.1  # std of the Gaussian noise added to the initial logits (drawn from ``seed``)


def gatys_stylize(
    content: torch.Tensor,
    style: torch.Tensor,
    *,
    feature_net: nn.Module | None = None,
    steps: int = 200,
    style_weight: float = _DEFAULTS.style_weight,
    content_weight: float = _DEFAULTS.content_weight,
    tv_weight: float = _DEFAULTS.tv_weight,
    identity_model: nn.Module | None = None,
    identity_size: int = 64,
    identity_weight: float = 0.0,
    identity_margin: float = _DEFAULTS.identity_margin,
    lr: float = 0.05,
    seed: int = 0,
) -> torch.Tensor:
    """Stylise one image by optimising its pixels (Gatys et al.), starting from the image itself.

    Parameters
    ----------
    content : torch.Tensor
        float ``[3, H, W]`` in [0, 1] (uint8 is accepted too).
    style : torch.Tensor
        The painting, uint8 ``[3, h, w]`` or float in [0, 1]; resized so its shorter side is
        ``2 * min(H, W)``, as in training.
    feature_net : nn.Module or None
        Style/content features (``style_layers``, ``content_layer``); None builds
        :class:`common.anonymization.perceptual.RandomFeatureNet`.
    steps : int, default 200
        Adam steps on the pixel logits.
    style_weight, content_weight, tv_weight : float
        Loss weights; the defaults are :class:`common.anonymization.style_train.StyleTrainSettings`'s.
    identity_model : nn.Module or None
        Optional face-embedding network (frozen while used); with ``identity_weight > 0`` the loss adds
        ``identity_weight * relu(cos(e(y), e(content)) - identity_margin)``.
    identity_size : int, default 64
        Side the images are resized to before the identity model (which sees them in [-1, 1]).
    identity_weight : float, default 0.0
        Weight of the identity term.
    identity_margin : float, default 0.0
        Cosine similarity below which the identity term stops pushing.
    lr : float, default 0.05
        Adam learning rate on the logits.
    seed : int, default 0
        Seed of the small noise (std 0.1 in logit space) added to the starting point, which gives the
        optimiser texture to work from in flat regions.

    Returns
    -------
    torch.Tensor
        float ``[3, H, W]`` in [0, 1], detached, on the CPU.
    """
    if content.ndim != 3 or content.shape[0] != 3:
        raise ValueError(f"content should be an RGB image [3, H, W], got shape {tuple(content.shape)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps should be a positive integer, got {steps!r}.")
    if lr <= 0:
        raise ValueError(f"lr should be positive, got {lr!r}.")
    for name, value in (
        ("style_weight", style_weight),
        ("content_weight", content_weight),
        ("tv_weight", tv_weight),
        ("identity_weight", identity_weight),
    ):
        if not value >= 0:
            raise ValueError(f"{name} should be a non-negative number, got {value!r}.")
    if content.dtype == torch.uint8:
        x = content.float() / 255.0
    elif content.is_floating_point():
        x = content.detach().float()
        if float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise ValueError("A float content image should be in [0, 1]; pass uint8 for 0..255 values.")
    else:
        raise ValueError(f"content should be uint8 or float, got {content.dtype}.")
    x = x[None]  # [1, 3, H, W]
    h, w = x.shape[-2:]
    style_img = perceptual.prepare_style_image(style, 2 * min(h, w))  # [1, 3, h', w']
    if feature_net is None:
        feature_net = perceptual.RandomFeatureNet()
    use_identity = identity_model is not None and identity_weight > 0

    generator = torch.Generator().manual_seed(seed)
    start = torch.logit(x.clamp(_LOGIT_EPS, 1.0 - _LOGIT_EPS))
    z = (start + INIT_NOISE * torch.randn(start.shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen(feature_net))
        target_grams = perceptual.style_grams(feature_net, style_img)
        style_layers, content_layer = tuple(feature_net.style_layers), int(feature_net.content_layer)
        with torch.no_grad():
            target_features = feature_net(x)
        if use_identity:
            stack.enter_context(frozen(identity_model))
            with torch.no_grad():
                target_emb = identity_embeddings(identity_model, x, identity_size)
        for step in range(1, steps + 1):
            y = torch.sigmoid(z)  # [1, 3, H, W]
            features = feature_net(y)
            loss = (
                content_weight * perceptual.content_loss(features, target_features, content_layer)
                + style_weight * perceptual.style_loss(features, target_grams, style_layers)
                + tv_weight * perceptual.total_variation(y)
            )
            if use_identity:
                cosine = F.cosine_similarity(identity_embeddings(identity_model, y, identity_size), target_emb, dim=1)
                loss = loss + identity_weight * F.relu(cosine - identity_margin).mean()
            if not torch.isfinite(loss):
                raise RuntimeError(f"The Gatys loss became {float(loss)} at step {step}; lower lr or style_weight.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return torch.sigmoid(z.detach())[0]  # [3, H, W]
