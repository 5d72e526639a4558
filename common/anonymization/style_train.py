"""Train a :class:`common.anonymization.stylizer.StyleNet` for one style (Johnson et al. 2016), optionally pushing
identity away.

Plain functions with explicit arguments and no file I/O: the caller loads the painting and the face crops
and saves the returned model's state_dict (with :func:`common.anonymization.stylizer.stylenet_config` as metadata).

Loss, per batch of face crops ``x`` in [0, 1] and their stylisation ``y = StyleNet(x)``::

    content_weight  * mean (phi_c(y) - phi_c(x))^2                      (feature net's content layer)
  + style_weight    * mean_l |G_l(y) - G_l(style)|^2 / |G_l(style)|^2     (Gram matrices, style layers)
  + tv_weight       * total_variation(y)
  + identity_weight * mean relu(cos(e(y), e(x)) - identity_margin)       (only with an identity model)

where ``e`` is a frozen face-embedding network applied to the images resized to ``identity_size`` and
mapped to [-1, 1]. The identity term lowers the cosine similarity between the embeddings of a face and
of its stylisation until it falls below ``identity_margin``: the stylizer then also de-identifies.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.anonymization.perceptual import (RandomFeatureNet, content_loss, prepare_style_image, style_grams,
                                             style_loss, total_variation)
from common.anonymization.stylizer import StyleNet

LOG_EVERY = 10  # steps between progress calls and log entries
_FINAL_WINDOW = 10  # "final_*" losses are averaged over this many last steps
_RESIZE_CHUNK = 256  # faces resized per interpolate call


STRUCTURE_LANDMARK_SCALE = 0.02  # landmark error (fraction of the face box) that costs as much as a lost face


@dataclass(frozen=True)
class StyleTrainSettings:
    """Optimisation settings for :func:`train_stylizer`.

    The default loss weights are tuned for :class:`common.anonymization.perceptual.RandomFeatureNet` (the default
    feature network); a VGG-19 trunk gives features of another scale and needs its own weights.

    Parameters
    ----------
    steps : int, default 1500
        Adam steps (one batch each).
    batch_size : int, default 4
        Faces per step; drawn without replacement within an epoch, with replacement when there are
        fewer faces than this.
    image_size : int, default 128
        Side the faces are resized to for training (at least 16; the model itself takes any size).
    lr : float, default 1e-3
        Adam learning rate.
    style_weight : float, default 5.0
        Weight of the Gram-matrix style loss (:func:`common.anonymization.perceptual.style_loss`, a relative error
        that starts near 0.3 to 1 for a face against a painting).
    content_weight : float, default 1.0
        Weight of the feature (content) loss; higher keeps more of the face.
    identity_weight : float, default 1.0
        Weight of the identity term; used only when an identity model is passed (not tuned: no trained
        face recognizer was available when the defaults were chosen).
    tv_weight : float, default 1.0
        Weight of the total-variation smoothness term.
    seed : int, default 0
        Seed of the model initialisation, batch order and flips.
    identity_margin : float, default 0.0
        Cosine similarity in [-1, 1] below which the identity term stops pushing.
    structure_weight : float, default 1.0
        Weight of the face-structure term (the stylized face must still be found by the detector, with its
        landmarks where they were); used only when a structure model is passed.
    """

    steps: int = 1500  # Adam steps
    batch_size: int = 4  # faces per step
    image_size: int = 128  # pixels a side of the training crops
    lr: float = 1e-3  # Adam learning rate
    style_weight: float = 5.0  # Gram-matrix style term
    content_weight: float = 1.0  # feature (content) term
    identity_weight: float = 1.0  # push the identity model's embedding away from the original's
    tv_weight: float = 1.0  # total variation (smoothness)
    seed: int = 0  # initial weights and face order
    identity_margin: float = 0.0  # cosine similarity below which the identity term stops pushing
    structure_weight: float = 1.0  # the detector must still find the face, landmarks in place

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StyleTrainSettings.{name} should be a positive integer, got {value!r}.")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(
                f"StyleTrainSettings.image_size should be an integer of at least 16 pixels, got {self.image_size!r}."
            )
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"StyleTrainSettings.lr should be a finite positive number, got {self.lr!r}.")
        for name in ("style_weight", "content_weight", "identity_weight", "tv_weight", "structure_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"StyleTrainSettings.{name} should be a finite non-negative number, got {value!r}.")
        if self.style_weight == 0 and self.content_weight == 0:
            raise ValueError("style_weight and content_weight are both 0: the stylizer would have nothing to learn.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"StyleTrainSettings.seed should be an integer, got {self.seed!r}.")
        if not _finite(self.identity_margin) or not -1.0 <= self.identity_margin <= 1.0:
            raise ValueError(
                "StyleTrainSettings.identity_margin is a cosine similarity and should be in [-1, 1], "
                f"got {self.identity_margin!r}."
            )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode with ``requires_grad=False`` for the block, then restore both."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def to_float_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) ``[N, 3, H, W]`` -> float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} should be RGB images [N, 3, H, W], got shape {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.is_floating_point():
        if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise ValueError(f"Float {name} should be in [0, 1]; pass uint8 tensors for 0..255 values.")
        return images.float()
    raise ValueError(f"{name} should be uint8 or float, got {images.dtype}.")


def resize_images(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float ``[B, 3, H, W]`` to ``size`` (antialiased when shrinking; differentiable)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def identity_embeddings(identity_model: nn.Module, x: torch.Tensor, identity_size: int) -> torch.Tensor:
    """Embeddings of images ``x`` [B, 3, H, W] in [0, 1], resized to ``identity_size`` and mapped to [-1, 1]."""
    return identity_model(resize_images(x, identity_size) * 2.0 - 1.0)  # [B, D]


def _prepare_faces(faces: torch.Tensor, image_size: int) -> torch.Tensor:
    """Faces resized to ``image_size``, as uint8 ``[N, 3, S, S]`` (kept small in memory; one batch is converted at a time)."""
    if faces.ndim != 4 or faces.shape[0] < 1 or faces.shape[1] != 3:
        raise ValueError(f"faces should be a non-empty batch of RGB crops [N, 3, S, S], got shape {tuple(faces.shape)}.")
    if faces.dtype == torch.uint8 and tuple(faces.shape[-2:]) == (image_size, image_size):
        return faces
    chunks = []
    for start in range(0, faces.shape[0], _RESIZE_CHUNK):
        chunk = to_float_images(faces[start : start + _RESIZE_CHUNK], "faces")
        chunk = resize_images(chunk, image_size)
        chunks.append((chunk.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8))
    return torch.cat(chunks)


def _batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of each step's batch: epochs of random permutations, or draws with replacement when n < batch_size."""
    if n < batch_size:
        for _ in range(steps):
            yield torch.randint(n, (batch_size,), generator=generator)
        return
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_stylizer(
    style: torch.Tensor,
    faces: torch.Tensor,
    *,
    settings: StyleTrainSettings,
    width: str = "half",
    feature_net: nn.Module | None = None,
    identity_model: nn.Module | None = None,
    identity_size: int = 64,
    structure_model: nn.Module | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> tuple[StyleNet, dict]:
    """Train a :class:`StyleNet` that renders face crops in the style of one painting.

    Parameters
    ----------
    style : torch.Tensor
        The painting, uint8 ``[3, H, W]`` (float in [0, 1] is accepted too). It is resized so that its
        shorter side is ``2 * settings.image_size`` before its Gram matrices are taken, which sets the
        size of the brush strokes relative to the faces.
    faces : torch.Tensor
        Face crops, uint8 ``[N, 3, S, S]`` for any S (resized to ``settings.image_size``); any N >= 1.
    settings : StyleTrainSettings
        Steps, batch size, learning rate, loss weights and seed.
    width : {"half", "full"}, default "half"
        StyleNet width; "half" is the fast one (see :mod:`common.anonymization.stylizer`).
    feature_net : nn.Module or None
        Network giving the style and content features (``style_layers``, ``content_layer``); None builds
        :class:`common.anonymization.perceptual.RandomFeatureNet`.
    identity_model : nn.Module or None
        A face-embedding network (``[B, 3, s, s]`` in [-1, 1] -> ``[B, D]``). It is frozen during
        training (eval mode, no parameter gradients; both restored afterwards). With None there is no
        identity term.
    identity_size : int, default 64
        Side the images are resized to before the identity model.
    structure_model : nn.Module or None
        Maps face crops ``[B, 3, S, S]`` in [0, 1] to ``(landmarks [B, 10], face probability [B])``, e.g.
        MTCNN's ONet behind a crop (``server.stylizers.StructureProbe``). The structure term is
        ``-log p(face | stylized) + mean((landmarks(stylized) - landmarks(original)) / 0.02) ** 2``: the
        face must stay detectable and its landmarks in place (0.02 of the box is about 5% of the
        inter-ocular distance). Frozen like the identity model.
    progress : callable or None
        ``progress(step, total, losses)`` every 10 steps and at the last step; ``losses`` holds the
        current step's ``total``, ``content``, ``style``, ``tv`` (unweighted terms) and, with an
        identity model, ``identity`` and ``identity_cosine``.

    Returns
    -------
    model : StyleNet
        The trained network, on the CPU, in eval mode.
    history : dict
        ``steps``; ``final_<term>`` (mean over the last 10 steps) and ``mean_<term>`` (over all steps)
        for every term above, as floats; ``final_identity_cosine`` (mean cosine similarity between the
        embeddings of the originals and their stylisations over the last 10 steps; None without an
        identity model); ``log``, the loss dicts passed to ``progress`` (each with its ``step``).

    Raises
    ------
    ValueError
        If the images have the wrong shape or type.
    RuntimeError
        If the loss becomes NaN or infinite (lower ``lr`` or ``style_weight``).
    """
    if not isinstance(settings, StyleTrainSettings):
        raise TypeError(f"settings should be a StyleTrainSettings, got {type(settings).__name__}.")
    if isinstance(identity_size, bool) or not isinstance(identity_size, int) or identity_size < 1:
        raise ValueError(f"identity_size should be a positive integer (the identity model's input side), got {identity_size!r}.")
    size = settings.image_size
    faces_u8 = _prepare_faces(faces, size)  # [N, 3, S, S] uint8
    style_img = prepare_style_image(style, 2 * size)  # [1, 3, h, w]
    if feature_net is None:
        feature_net = RandomFeatureNet()
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = StyleNet(width)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    use_identity = identity_model is not None

    log: list[dict] = []
    sums: dict[str, float] = {}
    recent: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen(feature_net))
        if use_identity:
            stack.enter_context(frozen(identity_model))
        use_structure = structure_model is not None
        if use_structure:
            stack.enter_context(frozen(structure_model))
        target_grams = style_grams(feature_net, style_img)  # [1, C, C] per style layer
        style_layers = tuple(feature_net.style_layers)
        content_layer = int(feature_net.content_layer)
        batches = _batch_indices(faces_u8.shape[0], settings.batch_size, settings.steps, generator)
        for step, idx in enumerate(batches, start=1):
            x = faces_u8[idx].float() / 255.0  # [B, 3, S, S]
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                target_features = feature_net(x)
                target_emb = identity_embeddings(identity_model, x, identity_size) if use_identity else None
                target_landmarks = structure_model(x)[0] if use_structure else None
            y = model(x)  # [B, 3, S, S]
            features = feature_net(y)
            terms = {
                "content": content_loss(features, target_features, content_layer),
                "style": style_loss(features, target_grams, style_layers),
                "tv": total_variation(y),
            }
            total = (
                settings.content_weight * terms["content"]
                + settings.style_weight * terms["style"]
                + settings.tv_weight * terms["tv"]
            )
            if use_identity:
                with torch.set_grad_enabled(settings.identity_weight > 0):  # only reported when its weight is 0
                    embedding = identity_embeddings(identity_model, y, identity_size)
                    cosine = F.cosine_similarity(embedding, target_emb, dim=1)  # [B]
                    terms["identity"] = F.relu(cosine - settings.identity_margin).mean()
                terms["identity_cosine"] = cosine.detach().mean()
                if settings.identity_weight > 0:
                    total = total + settings.identity_weight * terms["identity"]
            if use_structure:
                landmarks, face_prob = structure_model(y)
                shift = ((landmarks - target_landmarks) / STRUCTURE_LANDMARK_SCALE).pow(2).mean()
                terms["structure"] = -torch.log(face_prob.clamp_min(1e-6)).mean() + shift
                terms["landmark_shift"] = shift.detach().sqrt() * STRUCTURE_LANDMARK_SCALE
                total = total + settings.structure_weight * terms["structure"]
            if not torch.isfinite(total):
                raise RuntimeError(
                    f"The style-transfer loss became {float(total)} at step {step} "
                    f"(terms: { {k: float(v) for k, v in terms.items()} }); lower settings.lr or settings.style_weight."
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

            losses = {"total": float(total.detach())} | {k: float(v.detach()) for k, v in terms.items()}
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            recent = (recent + [losses])[-_FINAL_WINDOW:]
            if step % LOG_EVERY == 0 or step == settings.steps:
                log.append({"step": step} | losses)
                if progress is not None:
                    progress(step, settings.steps, losses)

    model.eval()
    history: dict = {"steps": settings.steps}
    for key in sums:
        if key == "identity_cosine":
            continue
        history[f"final_{key}"] = sum(r[key] for r in recent) / len(recent)
        history[f"mean_{key}"] = sums[key] / settings.steps
    history["final_identity_cosine"] = (
        sum(r["identity_cosine"] for r in recent) / len(recent) if use_identity else None
    )
    history["log"] = log
    return model, history
