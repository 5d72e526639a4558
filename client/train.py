"""Local training of a site's models, with or without DP-SGD (Opacus). Plain functions, no Flower.

Each function trains in place, returns its metrics and the DP mechanisms it ran as
``(noise_multiplier, sample_rate, steps)`` for the site's privacy ledger (empty without DP).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client import dp_faults
from client.canaries import CanaryInjector, SiteCanaries
from client.ghost_clipping import clipped_gradient_sum, closed_form_supported
from common.atomic import atomic_torch_save
from common.data.augment import AugmentConfig, augment_faces
from common.data.faceset import FaceSet
from common.models.losses import MarginHead, MarginSoftmaxLoss, margin_softmax_loss, triplet_semihard_loss
from common.models.vae import Discriminator, lsgan_discriminator_loss, lsgan_generator_loss, vae_loss

# The embedding's augmentation: mirror images and mild brightness/contrast, no rotation or shift. The faces are
# aligned (5 points) and the networks' global depthwise head reads features by where they lie on the face; on LFW
# View 1 a from-scratch model reached 0.84 after 12 epochs with these and 0.59 with the default rotations and shifts.
EMBEDDING_AUGMENT = AugmentConfig(max_rotation_deg=0.0, max_shift=0.0, brightness=0.1, contrast=0.1)

Mechanism = tuple[float, float, int]


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters for one round: Gaussian noise ``noise_multiplier * max_grad_norm`` is added to the
    sum of per-sample gradients clipped to ``max_grad_norm``; batches are Poisson-sampled."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass
class LocalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    mechanisms: list[Mechanism] = field(default_factory=list)
    optimizer_state: dict[str, torch.Tensor] | None = None  # flat (see optimizer_state_to_flat), for the next round


def _batches(loader, epochs: int):
    """(epoch, batch) for ``epochs`` passes over ``loader``, with expected warnings silenced."""
    with quiet_opacus():
        for epoch in range(epochs):
            for batch in loader:
                yield epoch, batch


def _empty_batch_step(optimizer, dp: DPSettings | None, before_step: Callable[[], None] | None = None) -> None:
    """Poisson sampling can draw an empty batch. DP-SGD must still release a noised (zero) gradient then:
    skipping the step would reveal that no example was sampled, which the accounting does not allow for.
    ``before_step`` (the canary audit's gradient canaries) adds to the zero gradient before the step."""
    optimizer.zero_grad(set_to_none=True)
    if dp is None:
        return
    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):  # it noises the clipped sum in .grad
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    if before_step is not None:
        before_step()
    optimizer.step()


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; DP-SGD samples each example with probability ``1 / steps_per_epoch``."""
    return max(1, math.ceil(num_examples / batch_size))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map float images in [0, 1] to the [-1, 1] range the embedding networks take."""
    return x.mul(2.0).sub_(1.0)


class EmbeddingClassifier(nn.Module):
    """Backbone plus the site's private margin head: ``forward(x) -> cosine [B, num_identities]``."""

    def __init__(self, backbone: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _loader(faces: FaceSet, batch_size: int, generator: torch.Generator, *, by_index: bool = False) -> DataLoader:
    """Batches of (images, labels), or of (indices, labels) with ``by_index`` (inputs looked up elsewhere)."""
    inputs = torch.arange(len(faces)) if by_index else faces.images
    data = TensorDataset(inputs, faces.labels)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)


def split_frozen(backbone: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(frozen trunk, trainable head) of a partly frozen pretrained backbone, else None (see
    ``common.models.dlib_resnet.DlibResNet.split_frozen``)."""
    split = getattr(backbone, "split_frozen", None)
    return split() if callable(split) else None


@torch.no_grad()
def trunk_features(trunk: nn.Module, images: torch.Tensor, *, flip: bool = False,
                   batch_size: int = 128) -> torch.Tensor:
    """The frozen trunk's output for uint8 faces ``[N, 3, S, S]`` (their mirror images with ``flip``)."""
    trunk.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        out.append(trunk(normalize((x.flip(-1) if flip else x).float().div(255.0))))
    return torch.cat(out)


def trunk_features_and_mirror(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[N, 2, ...]``: :func:`trunk_features` of each face and of its mirror image."""
    return torch.stack([trunk_features(trunk, images), trunk_features(trunk, images, flip=True)], dim=1)


def trunk_fingerprint(trunk: nn.Module) -> str:
    """SHA-256 of a trunk's weights and where it ends: equal fingerprints compute equal features."""
    digest = hashlib.sha256(str(getattr(trunk, "num_blocks", "")).encode())
    state = trunk.state_dict()
    for name, value in sorted(state.items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    for name, value in sorted(trunk.named_buffers()):  # fixed buffers that are not saved (a scattering's filters)
        if name not in state:
            digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_trunk_features(trunk: nn.Module, faces: FaceSet, cache_dir: Path | None) -> torch.Tensor:
    """``[N, 2, ...]``: the trunk's output for each face and for its mirror image (the one augmentation a frozen
    trunk keeps), computed once per face.

    Kept in ``cache_dir/<trunk fingerprint>/`` (the machine's own face cache, beside the face crops themselves: it
    never leaves the site), one file per identity holding each image's features under the SHA-1 of its pixels, so
    later rounds, and other runs over the same faces, read them instead of running the trunk again. A file that is
    damaged or does not cover the faces asked for is recomputed."""
    features: list[torch.Tensor | None] = [None] * len(faces)
    hashes = [hashlib.sha1(faces.images[i].contiguous().numpy().tobytes()).hexdigest() for i in range(len(faces))]
    folder = Path(cache_dir) / f"trunk-{trunk_fingerprint(trunk)[:24]}" if cache_dir is not None else None
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(faces.paths):
        groups.setdefault(path.split("/", 1)[0], []).append(i)
    for identity, rows in groups.items():
        file = folder / f"{hashlib.sha1(identity.encode()).hexdigest()[:20]}.pt" if folder is not None else None
        stored = _read_features(file)
        missing = [i for i in rows if hashes[i] not in stored]
        if missing:
            computed = trunk_features_and_mirror(trunk, faces.images[missing])
            stored.update({hashes[i]: f for i, f in zip(missing, computed)})
            if file is not None:
                atomic_torch_save(file, stored, durable=False)
        for i in rows:
            features[i] = stored[hashes[i]]
    return torch.stack(features) if features else torch.empty(0)  # type: ignore[arg-type]


def _read_features(file: Path | None) -> dict[str, torch.Tensor]:
    if file is None or not file.is_file():
        return {}
    try:
        stored = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
        return {}
    ok = isinstance(stored, dict) and all(isinstance(v, torch.Tensor) and v.shape[:1] == (2,) for v in stored.values())
    return stored if ok else {}


@contextlib.contextmanager
def quiet_opacus():
    """Silence Opacus/PyTorch warnings that are expected here (and say nothing about privacy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        yield


def _privatize(model, optimizer, loader, dp: DPSettings, generator: torch.Generator):
    engine = PrivacyEngine(accountant="rdp")  # its own accountant is unused: the site's ledger accounts.
    with quiet_opacus():
        return engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )


def _privatize_embedding(model: nn.Module, optimizer, loader, dp: DPSettings, generator: torch.Generator,
                         criterion: nn.Module, *, closed_form: bool, broken_dp: str | None = None):
    """(model, optimizer, loader, criterion) for DP-SGD training of an embedding with its margin head, clipped
    without per-sample gradients (a margin head of C identities would cost a [B, C, D] tensor per step).

    ``closed_form``: the model is left as it is and the caller puts the sum of clipped gradients in ``.grad``
    (:func:`client.ghost_clipping.clipped_gradient_sum`); Opacus samples the batches and noises the sum, with the
    sample rate and expected batch size ``make_private`` would use. Otherwise Opacus' ghost clipping: per-sample
    norms from activations and backprops (the margin head's in closed form, see
    ``common.models.losses._margin_head_norm_sample``) and a second, reweighted backward pass inside
    ``criterion(cosine, labels).backward()``."""
    noise = dp_faults.training_noise(broken_dp, dp.noise_multiplier)  # dp.noise_multiplier unless a test breaks it
    if not closed_form:
        engine = PrivacyEngine(accountant="rdp")  # its own accountant is unused: the site's ledger accounts.
        with quiet_opacus():
            model, optimizer, criterion, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                noise_multiplier=noise, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
                noise_generator=generator, grad_sample_mode="ghost")
        model.max_grad_norm = dp_faults.clipping_bound(broken_dp, dp.max_grad_norm)  # the bound the clipping uses
        return model, optimizer, loader, criterion
    sample_rate = 1 / len(loader)
    optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise, max_grad_norm=dp.max_grad_norm,
        expected_batch_size=int(len(loader.dataset) * sample_rate), loss_reduction="mean", generator=generator)
    return model, optimizer, DPDataLoader.from_data_loader(loader), criterion


def _proximal_step(model: nn.Module, anchor: dict[str, torch.Tensor] | None, lr: float, mu: float) -> None:
    """FedProx: move towards the global weights, ``w -= lr * mu * (w - w_global)``.

    Applied after the (noised) optimizer step; it uses no data, so it is post-processing under DP."""
    if anchor is None or mu <= 0:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in anchor:
                p.sub_(lr * mu * (p - anchor[name]))


def train_embedding(
    backbone: nn.Module,
    head: MarginHead,
    faces: FaceSet,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    loss: str = "arcface",
    margin: float = 0.3,
    scale: float = 30.0,
    augment: bool = True,
    dp: DPSettings | None = None,
    proximal_mu: float = 0.0,
    seed: int = 0,
    feature_cache: Path | None = None,
    backbone_lr: float | None = None,
    optimizer: str = "sgd",
    optimizer_state: dict[str, torch.Tensor] | None = None,
    canaries: SiteCanaries | None = None,
    broken_dp: str | None = None,
) -> LocalResult:
    """Train ``backbone`` (federated) and ``head`` (site-private identity prototypes) on ``faces``.

    ``backbone_lr`` (default ``lr``) is the backbone's learning rate: a pretrained backbone is fine-tuned far more
    gently than its new margin head learns. With ``dp`` set, both are trained with DP-SGD: each sample's gradient
    clipped to ``dp.max_grad_norm`` (ghost clipping, no per-sample gradient materialised: see
    :func:`_privatize_embedding`), Gaussian noise, Poisson sampling; ``loss`` must then be per-sample (arcface,
    cosface).
    A partly frozen pretrained backbone trains its head on the frozen trunk's features, computed once for each face
    and its mirror image (and kept in ``feature_cache``, see :func:`cached_trunk_features`); augmentation is then
    the mirror image only. The mechanism is the same: each example is a face, its gradient is clipped, and what
    the trunk computes from it is a fixed function of that face.

    ``optimizer`` is ``"sgd"`` (momentum 0.9, weight decay 5e-4) or ``"adamw"`` (weight decay 0.05). Its state
    (momenta) continues from ``optimizer_state``, the previous call's ``LocalResult.optimizer_state``, when that fits
    the parameters, and starts afresh otherwise: a site keeps it between rounds, private like its margin head (under
    DP it is computed from the noised gradients only). In one in-process 4-site simulation from scratch, keeping it
    gave 0.791 View-1 accuracy where restarting AdamW every round had given 0.759; single runs vary by 2-3 points.

    ``canaries`` (a simulated canary audit only) inserts the site's planned canaries as :mod:`client.canaries` says.
    ``broken_dp`` is for tests only (:mod:`client.dp_faults`): None in every run facefl's commands start.
    """
    if dp is not None and loss == "triplet":
        raise ValueError("Triplet loss couples the samples of a batch; it cannot be trained with DP-SGD.")
    if canaries is not None and loss == "triplet":
        raise ValueError("Canaries need a per-sample loss (arcface or cosface), not triplet.")
    gen = torch.Generator().manual_seed(seed)
    anchor = {f"backbone.{k}": v.detach().clone() for k, v in backbone.named_parameters()} if proximal_mu else None
    split = split_frozen(backbone)
    canary_inputs = None  # every input canary as the network takes it (no augmentation; a frozen trunk's features)
    if split is not None:
        features = cached_trunk_features(split[0], faces, feature_cache)  # [N, 2, ...]
        inputs = _feature_inputs(features, augment, gen)
        model: nn.Module = EmbeddingClassifier(split[1], head)
        if canaries is not None and canaries.inputs is not None:
            canary_inputs = trunk_features(split[0], canaries.inputs.images)
    else:
        inputs = _image_inputs(augment, gen)
        model = EmbeddingClassifier(backbone, head)
        if canaries is not None and canaries.inputs is not None:
            canary_inputs = normalize(canaries.inputs.images.float().div(255.0))
    model.train()
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad],
               "lr": lr if backbone_lr is None else backbone_lr}, {"params": list(model.head.parameters())}]
    opt = _optimizer(optimizer, [g for g in groups if g["params"]], lr)
    resumed = load_optimizer_state(opt, optimizer_state)
    loader = _loader(faces, batch_size, gen, by_index=split is not None)
    criterion: nn.Module | None = MarginSoftmaxLoss(loss, margin, scale) if loss != "triplet" else None
    closed_form = dp is not None and closed_form_supported(model.backbone)
    if dp is not None:
        model, opt, loader, criterion = _privatize_embedding(model, opt, loader, dp, gen, criterion,
                                                             closed_form=closed_form, broken_dp=broken_dp)
    inner = model._module if dp is not None and not closed_form else model
    clip = dp_faults.clipping_bound(broken_dp, dp.max_grad_norm) if dp is not None else None
    injector = (CanaryInjector(canaries, backbone, 1.0 / steps_per_epoch(len(faces), batch_size), clip=clip)
                if canaries is not None else None)
    last_epoch_started = False  # loss and accuracy are reported for the last local epoch
    steps, seen, processed, total_loss, correct = 0, 0, 0, 0.0, 0
    start = time.perf_counter()
    for epoch, (images, labels) in _batches(loader, epochs):
        steps += 1
        if epoch == epochs - 1 and epochs > 1 and not last_epoch_started:
            last_epoch_started, seen, total_loss, correct = True, 0, 0.0, 0
        sampled, sampled_inputs = injector.draw() if injector is not None else (None, None)
        real = len(labels)

        def add_canaries() -> None:
            if injector is not None:
                injector.add_gradients(sampled, real_batch=real)

        if real == 0 and (sampled_inputs is None or len(sampled_inputs) == 0):
            _empty_batch_step(opt, dp, add_canaries)
            continue
        if sampled_inputs is not None and len(sampled_inputs):
            extra_x, extra_labels = injector.input_batch(canary_inputs, sampled_inputs)
            x = torch.cat([inputs(images), extra_x]) if real else extra_x
            labels = torch.cat([labels, extra_labels])
        else:
            x = inputs(images)
        if loss == "triplet":
            opt.zero_grad(set_to_none=True)
            emb = inner.backbone(x)
            batch_loss = triplet_semihard_loss(emb, labels)
            with torch.no_grad():
                cosine = inner.head(emb)
            batch_loss.backward()
            opt.step()
        else:
            cosine, batch_loss = embedding_step(model, opt, criterion, x, labels,
                                                closed_form_clip=clip if closed_form else None,
                                                before_step=add_canaries if injector is not None else None,
                                                loss_weight=len(labels) / real if dp is None and real else 1.0)
        _proximal_step(inner, anchor, lr, proximal_mu)
        seen += real
        processed += real
        total_loss += float(batch_loss.detach()) * real
        correct += int((cosine[:real].argmax(1) == labels[:real]).sum())
    elapsed = time.perf_counter() - start
    result = LocalResult(
        metrics={
            "train-loss": total_loss / max(seen, 1),
            "train-accuracy": correct / max(seen, 1),
            "steps": float(steps),
            "images-per-second": processed / max(elapsed, 1e-9),
            "optimizer-resumed": float(resumed),
        },
        optimizer_state=optimizer_state_to_flat(opt.original_optimizer if dp is not None else opt),
    )
    if dp is not None:
        result.mechanisms.append((dp.noise_multiplier, 1.0 / steps_per_epoch(len(faces), batch_size), steps))
        _release_hooks(model)
    return result


def embedding_step(model: nn.Module, opt: torch.optim.Optimizer, criterion: nn.Module, x: torch.Tensor,
                   labels: torch.Tensor, *, closed_form_clip: float | None = None,
                   before_step: Callable[[], None] | None = None,
                   loss_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of an :class:`EmbeddingClassifier` with a margin-softmax ``criterion``; returns
    (cosine, mean loss), detached. Non-DP, or DP-SGD as :func:`_privatize_embedding` set it up: Opacus' ghost
    clipping (inside ``criterion(...).backward()``), or with ``closed_form_clip`` (the clipping norm) the closed form
    of :mod:`client.ghost_clipping` on the unwrapped model. ``before_step`` runs between the gradient and the step
    (the canary audit adds its gradient canaries there); ``loss_weight`` scales a non-DP batch's mean loss (to the sum
    over the batch divided by its real examples, when input canaries were appended)."""
    opt.zero_grad(set_to_none=True)
    if closed_form_clip is not None:
        def per_sample(cosine: torch.Tensor) -> torch.Tensor:
            return margin_softmax_loss(cosine, labels, kind=criterion.kind, margin=criterion.margin,
                                       scale=criterion.scale, reduction="none")
        cosine, losses = clipped_gradient_sum(model.backbone, model.head, x, per_sample, closed_form_clip)
        loss = losses.mean()
    else:
        cosine = model(x)
        batch_loss = criterion(cosine, labels)
        (batch_loss * loss_weight if loss_weight != 1.0 else batch_loss).backward()
        cosine, loss = cosine.detach(), batch_loss.detach()
    if before_step is not None:
        before_step()
    opt.step()
    return cosine, loss


def optimizer_state_to_flat(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as ``{"<param index>.<name>": tensor}`` (what Flower's node state and
    ``torch.save(weights_only=True)`` hold); the learning rates are not kept, they come from each round's config."""
    flat = {}
    for index, entries in opt.state_dict()["state"].items():
        for name, value in entries.items():
            flat[f"{index}.{name}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_state(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor] | None) -> bool:
    """Continue ``opt`` from :func:`optimizer_state_to_flat`'s output; False (and nothing loaded) when there is
    none or it does not fit ``opt``'s parameters (another model, another number of identities)."""
    if not flat:
        return False
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, entries in state.items():
            shape = params[index].shape
            if set(entries) != _STATE_NAMES.get(type(opt)) or any(v.dim() > 0 and v.shape != shape
                                                                    for v in entries.values()):
                return False
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    except (ValueError, IndexError, KeyError):
        return False
    return True


_STATE_NAMES = {torch.optim.SGD: {"momentum_buffer"}, torch.optim.AdamW: {"step", "exp_avg", "exp_avg_sq"}}


def _optimizer(kind: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.05)
    raise ValueError(f"optimizer must be sgd or adamw, got {kind!r}.")


def _image_inputs(augment: bool, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 faces of a batch -> the network's input (augmented when asked, see ``EMBEDDING_AUGMENT``)."""
    def inputs(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return normalize(augment_faces(x, gen, **asdict(EMBEDDING_AUGMENT)) if augment else x)
    return inputs


def _feature_inputs(features: torch.Tensor, augment: bool,
                    gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Indices of a batch -> precomputed trunk features, each face or (with ``augment``, half the time) its mirror."""
    def inputs(index: torch.Tensor) -> torch.Tensor:
        view = torch.randint(0, 2, (len(index),), generator=gen) if augment else torch.zeros_like(index)
        return features[index, view]
    return inputs


@torch.no_grad()
def evaluate_identification(backbone: nn.Module, head: MarginHead, faces: FaceSet, batch_size: int = 256) -> dict:
    """Closed-set identification accuracy of a site's validation images against its own prototypes."""
    if len(faces) == 0:
        return {"val-accuracy": float("nan")}
    backbone.eval()
    correct = 0
    for start in range(0, len(faces), batch_size):
        x = normalize(faces.images[start : start + batch_size].float().div(255.0))
        correct += int((head(backbone(x)).argmax(1) == faces.labels[start : start + batch_size]).sum())
    backbone.train()
    return {"val-accuracy": correct / len(faces)}


def train_vae(
    vae: nn.Module,
    faces: FaceSet,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    beta: float = 1.0,
    recon: str = "l1",
    augment: bool = True,
    dp: DPSettings | None = None,
    discriminator: Discriminator | None = None,
    adversarial_weight: float = 0.05,
    proximal_mu: float = 0.0,
    seed: int = 0,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 0.0,
) -> LocalResult:
    """Train the VAE (and, when given, its site-private discriminator: VAE-GAN with a least-squares loss).

    Under DP both networks get DP-SGD, each with its own Poisson sampling of the site's faces; that is two
    mechanisms per step, both recorded for the ledger. ``perceptual`` (a frozen per-sample distance such as
    :class:`common.models.face_perceptual.FacePerceptualLoss`) adds ``perceptual_weight`` times its batch mean; it
    has no trainable weights, so it needs no mechanism of its own.
    """
    gen = torch.Generator().manual_seed(seed)
    anchor = {k: v.detach().clone() for k, v in vae.named_parameters()} if proximal_mu else None
    vae.train()
    model: nn.Module = vae
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.5, 0.999) if discriminator else (0.9, 0.999))
    loader = _loader(faces, batch_size, gen)
    if dp is not None:
        model, optimizer, loader = _privatize(model, optimizer, loader, dp, gen)
    d_model = d_opt = d_loader = None
    if discriminator is not None:
        discriminator.train()
        d_model = discriminator
        d_opt = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        d_loader = _loader(faces, batch_size, gen)
        if dp is not None:
            d_model, d_opt, d_loader = _privatize(discriminator, d_opt, d_loader, dp, gen)
    inner = model._module if dp is not None else model
    steps, seen, processed, total, d_total = 0, 0, 0, 0.0, 0.0
    start = time.perf_counter()
    d_batches = (b for _, b in _batches(d_loader, epochs)) if d_loader is not None else None
    last_epoch_started = False  # the loss is reported for the last local epoch
    for epoch, (images, _labels) in _batches(loader, epochs):
        steps += 1
        if epoch == epochs - 1 and epochs > 1 and not last_epoch_started:
            last_epoch_started, seen, total = True, 0, 0.0
        if d_batches is not None:
            d_total += _discriminator_step(d_model, d_opt, next(d_batches, None), inner, gen, augment, dp)
        if len(images) == 0:
            _empty_batch_step(optimizer, dp)
            continue
        x = images.float().div_(255.0)
        if augment:
            x = augment_faces(x, gen, max_rotation_deg=4.0, max_shift=0.03)
        optimizer.zero_grad(set_to_none=True)
        out, mu, logvar = model(x)
        batch_loss = vae_loss(out, x, mu, logvar, beta=beta, recon=recon)
        if perceptual is not None and perceptual_weight:
            batch_loss = batch_loss + perceptual_weight * perceptual(out, x).mean()
        if d_model is not None:
            # The discriminator is frozen for the generator step, from its forward to after the backward.
            _set_requires_grad(d_model, False)
            batch_loss = batch_loss + adversarial_weight * lsgan_generator_loss(d_model(out))
        batch_loss.backward()
        optimizer.step()
        if d_model is not None:
            _set_requires_grad(d_model, True)
        _proximal_step(inner, anchor, lr, proximal_mu)
        seen += len(images)
        processed += len(images)
        total += float(batch_loss.detach()) * len(images)
    elapsed = time.perf_counter() - start
    result = LocalResult(
        metrics={
            "train-loss": total / max(seen, 1),
            "steps": float(steps),
            "images-per-second": processed / max(elapsed, 1e-9),
        }
    )
    if discriminator is not None:
        result.metrics["disc-loss"] = d_total / max(steps, 1)
    if dp is not None:
        q = 1.0 / steps_per_epoch(len(faces), batch_size)
        result.mechanisms.append((dp.noise_multiplier, q, steps))
        _release_hooks(model)
        if d_model is not None:
            result.mechanisms.append((dp.noise_multiplier, q, steps))
            _release_hooks(d_model)
    return result


def _set_requires_grad(model: nn.Module, flag: bool) -> None:
    """Freeze or unfreeze ``model``; under Opacus also switch its per-sample-gradient hooks off or on."""
    for p in model.parameters():
        p.requires_grad_(flag)
    toggle = getattr(model, "enable_hooks" if flag else "disable_hooks", None)
    if callable(toggle):
        toggle()


def _discriminator_step(d_model, d_opt, batch, vae: nn.Module, gen: torch.Generator, augment: bool,
                        dp: DPSettings | None) -> float:
    d_opt.zero_grad(set_to_none=True)
    if batch is None or len(batch[0]) == 0:
        _empty_batch_step(d_opt, dp)
        return 0.0
    x = batch[0].float().div_(255.0)
    if augment:
        x = augment_faces(x, gen, max_rotation_deg=4.0, max_shift=0.03)
    with torch.no_grad():
        fake, _, _ = vae(x)
    loss = _paired_d_loss(d_model, x, fake)
    loss.backward()
    d_opt.step()
    return float(loss.detach())


def _paired_d_loss(d_model: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """LSGAN loss of example i = its real image and its own reconstruction, scored in two forward passes.

    Opacus sums the per-sample gradients of the two passes for each example before clipping, so the pair is
    clipped as one example (the reconstruction is derived from that same private image)."""
    return lsgan_discriminator_loss(d_model(real), d_model(fake))


@torch.no_grad()
def evaluate_vae(vae: nn.Module, faces: FaceSet, *, beta: float = 1.0, recon: str = "l1", batch_size: int = 128) -> dict:
    if len(faces) == 0:
        return {"val-loss": float("nan")}
    vae.eval()
    total = 0.0
    for start in range(0, len(faces), batch_size):
        x = faces.images[start : start + batch_size].float().div(255.0)
        out, mu, logvar = vae(x)
        total += float(vae_loss(out, x, mu, logvar, beta=beta, recon=recon)) * len(x)
    vae.train()
    return {"val-loss": total / len(faces)}


def _release_hooks(model: nn.Module) -> None:
    """Detach Opacus' hooks so the wrapped module can be reused (serialised, evaluated) afterwards."""
    remove = getattr(model, "_close", None) or getattr(model, "remove_hooks", None)
    if callable(remove):
        remove()
