"""DP-SGD clipping without per-sample gradients: the closed form for a projection-only head and Opacus' ghost
clipping (with the margin head's closed-form norms) must clip exactly what per-sample gradients computed
independently (torch.func) clip, on real LFW faces."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from torch.func import functional_call, grad, vmap

from client.ghost_clipping import clipped_gradient_sum, closed_form_supported
from client.train import EmbeddingClassifier, normalize, quiet_opacus, split_frozen, trunk_features
from common.config import RunConfig
from common.data.datasets import load_faces
from common.models.embedding import build_embedding_model
from common.models.federated import build_models
from common.models.losses import MarginHead, MarginSoftmaxLoss, margin_softmax_loss

PEOPLE = ["Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody", "Al_Gore", "Alejandro_Toledo", "Ali_Naimi"]


def _reference_clipped_sum(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, max_norm: float):
    """Sum over the batch of each sample's gradient clipped to ``max_norm`` (flat), from per-sample gradients that
    torch.func computes one sample at a time; also the per-sample norms."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(p, xi, yi):
        cos = functional_call(model, {**p, **frozen}, (xi[None],))
        return margin_softmax_loss(cos, yi[None], kind="arcface", margin=0.3, scale=30.0)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)  # [B]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", coef, g) for k, g in per_sample.items()}, norms


@pytest.fixture(scope="module")
def projection_batch(lfw_root, cache_dir):
    """dlib's backbone with only its projection trainable, the trunk features of real faces and their labels."""
    faces = load_faces(lfw_root, image_size=150, mode="dlib", identities=PEOPLE, min_images=2, cache_dir=cache_dir,
                       progress=False)
    net = build_models(RunConfig(model="dlib-resnet", trainable="projection")).embedding
    trunk, head = split_frozen(net)
    return head, trunk_features(trunk, faces.images[:24]), faces.labels[:24], faces.num_identities


def test_closed_form_clipping_equals_per_sample_gradients(projection_batch):
    backbone, features, labels, classes = projection_batch
    assert closed_form_supported(backbone)
    torch.manual_seed(0)
    head = MarginHead(128, classes)
    model = EmbeddingClassifier(backbone, head)
    reference, norms = _reference_clipped_sum(model, features, labels, max_norm=1.0)
    max_norm = float(norms.median())  # about half the samples are clipped, half are not
    reference, _ = _reference_clipped_sum(model, features, labels, max_norm)
    model.zero_grad(set_to_none=True)
    cos, losses = clipped_gradient_sum(
        backbone, head, features,
        lambda c: margin_softmax_loss(c, labels, kind="arcface", margin=0.3, scale=30.0, reduction="none"),
        max_norm)
    assert cos.shape == (len(labels), classes) and losses.shape == (len(labels),)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference[name], rtol=1e-4, atol=1e-5)


def test_closed_form_refuses_a_head_it_cannot_clip():
    compact = build_embedding_model("compact", embedding_dim=128, dp=True, image_size=32)
    assert not closed_form_supported(compact)
    with pytest.raises(ValueError, match="bias-free projection"):
        clipped_gradient_sum(compact, MarginHead(128, 3), torch.zeros(2, 3, 32, 32), lambda c: c.sum(1), 1.0)


def _assert_ghost_clipping_matches(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Opacus' ghost clipping of ``model`` (noise off) puts the per-sample reference's clipped sum in ``.grad``."""
    _, norms = _reference_clipped_sum(model, x, labels, max_norm=1.0)
    max_norm = float(norms.median())
    reference, _ = _reference_clipped_sum(model, x, labels, max_norm)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=len(x))
    with quiet_opacus():
        wrapped, dp_opt, criterion, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=MarginSoftmaxLoss("arcface", 0.3, 30.0),
            noise_multiplier=0.0, max_grad_norm=max_norm, poisson_sampling=True, grad_sample_mode="ghost")
        criterion(wrapped(x), labels).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:  # float32 sums in another order: agreement to 1e-4 of the gradient's scale
            scale = float(reference[name].abs().max())
            torch.testing.assert_close(param.grad, reference[name], rtol=1e-3, atol=1e-4 * scale)
    wrapped.remove_hooks()


def test_opacus_ghost_clipping_of_the_compact_model_equals_per_sample_gradients(lfw_root, cache_dir):
    """The compact model from scratch: convolutions on large feature maps by their formed per-sample gradients, on
    small ones by ghost norms, the margin head by its closed form."""
    faces = load_faces(lfw_root, image_size=32, mode="aligned", identities=PEOPLE, min_images=2, cache_dir=cache_dir,
                       progress=False)
    torch.manual_seed(0)
    model = EmbeddingClassifier(build_embedding_model("compact", embedding_dim=128, dp=True, image_size=32),
                                MarginHead(128, faces.num_identities))
    _assert_ghost_clipping_matches(model, normalize(faces.images[:16].float().div(255.0)), faces.labels[:16])


def test_opacus_ghost_clipping_of_dlibs_last_stage_equals_per_sample_gradients(lfw_root, cache_dir):
    """dlib's backbone with its last stage trainable, on cached trunk features: 3x3 convolutions at 4x4 and 2x2 by
    ghost norms, the per-channel affines by their per-sample gradients."""
    faces = load_faces(lfw_root, image_size=150, mode="dlib", identities=PEOPLE, min_images=2, cache_dir=cache_dir,
                       progress=False)
    net = build_models(RunConfig(model="dlib-resnet", trainable="last-stage")).embedding
    trunk, head = split_frozen(net)
    torch.manual_seed(0)
    model = EmbeddingClassifier(head, MarginHead(128, faces.num_identities))
    _assert_ghost_clipping_matches(model, trunk_features(trunk, faces.images[:8]), faces.labels[:8])
