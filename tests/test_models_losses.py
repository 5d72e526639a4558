"""Embedding models, checked weight loading, margin and triplet losses, and their behaviour under Opacus."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.models.embedding import (CompactFaceNet, DPConv2d, _conv_grad_sample, build_embedding_model,
                                     build_inception_resnet)
from common.models.losses import MarginHead, check_loss_allowed, margin_softmax_loss, triplet_semihard_loss
from common.weights import load_state_dict_checked, sha256_file

# Opacus hooks the first layer, whose input needs no gradient; PyTorch warns about that, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests run many tiny ops. With two OpenMP threads on cores shared with other processes, every op
    can wait for a descheduled thread (observed here: 0.06 s became 6 s), so use one thread and restore after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception_dp() -> nn.Module:
    torch.manual_seed(0)
    return build_inception_resnet(dp=True)


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 112])
def test_compact_validates_and_embeds_on_unit_sphere(size):
    torch.manual_seed(0)
    model = CompactFaceNet(embedding_dim=128, image_size=size)
    assert ModuleValidator.validate(model, strict=True) == []
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    emb = model(torch.randn(3, 3, size, size))
    assert emb.shape == (3, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_compact_rejects_indivisible_or_unexpected_input_size():
    with pytest.raises(AssertionError, match="divisible by 8"):
        CompactFaceNet()(torch.randn(1, 3, 60, 60))
    with pytest.raises(AssertionError, match="built for 64x64"):
        CompactFaceNet()(torch.randn(1, 3, 72, 72))
    with pytest.raises(ValueError, match="divisible by 8"):
        CompactFaceNet(image_size=60)


def test_inception_needs_the_groupnorm_fix_for_dp(inception_dp):
    plain = build_inception_resnet(dp=False)
    assert _has_batchnorm(plain) and ModuleValidator.validate(plain, strict=False) != []
    assert not _has_batchnorm(inception_dp)
    assert ModuleValidator.validate(inception_dp, strict=True) == []
    emb = inception_dp(torch.randn(2, 3, 96, 96))
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_inception_other_embedding_dim_is_normalised():
    model = build_embedding_model("inception", embedding_dim=64, dp=True)
    emb = model(torch.randn(2, 3, 96, 96))
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="compact, inception"):
        build_embedding_model("resnet", embedding_dim=128, dp=True)


# --- weights ------------------------------------------------------------------------------------


def test_checked_weights_reproduce_the_model(tmp_path):
    torch.manual_seed(1)
    source = CompactFaceNet(embedding_dim=32)
    path = tmp_path / "compact.pt"
    torch.save({"model": source.state_dict(), "step": 3}, path)  # a checkpoint dict
    loaded = build_embedding_model(
        "compact", embedding_dim=32, dp=True, weights_path=str(path), weights_sha256=sha256_file(path).upper()
    )
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)

    raw = tmp_path / "raw.pt"
    torch.save(source.state_dict(), raw)
    state = load_state_dict_checked(raw, sha256_file(raw))
    assert state.keys() == source.state_dict().keys()


def test_wrong_hash_missing_file_and_lone_path_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(CompactFaceNet(embedding_dim=16).state_dict(), path)
    actual = sha256_file(path)
    with pytest.raises(ValueError, match=f"{actual}.*{'0' * 64}.*Re-copy"):
        load_state_dict_checked(path, "0" * 64)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_state_dict_checked(tmp_path / "nothere.pt", actual)
    with pytest.raises(ValueError, match="together"):
        build_embedding_model("compact", embedding_dim=16, dp=True, weights_path=str(path))


def test_inception_loads_checked_weights_ignoring_logits(tmp_path, inception_dp):
    torch.manual_seed(2)
    source = build_inception_resnet(dp=False)
    state = source.state_dict()
    state["logits.weight"] = torch.zeros(10, 512)  # a pretraining classifier, which must be ignored
    path = tmp_path / "inception.pt"
    torch.save(state, path)
    model = build_inception_resnet(dp=True, weights_path=str(path), weights_sha256=sha256_file(path))
    torch.testing.assert_close(model.conv2d_1a.conv.weight, source.conv2d_1a.conv.weight)
    torch.testing.assert_close(model.last_linear.weight, source.last_linear.weight)
    assert not _has_batchnorm(model)


# --- Opacus ------------------------------------------------------------------------------------


def _backbone_and_head(num_classes: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(CompactFaceNet(embedding_dim=32), MarginHead(32, num_classes))
    with torch.no_grad():  # prototypes of different lengths, so the head's normalisation matters
        model[1].weight.mul_(torch.linspace(0.5, 3.0, num_classes)[:, None])
    return model


@pytest.mark.parametrize(
    "c_in,c_out,size,kernel,stride,padding",
    [(5, 7, (9, 11), 3, 1, 1), (4, 6, (7, 7), (3, 5), 1, (0, 2)), (5, 7, (9, 11), 3, 2, 1), (3, 8, (8, 8), 4, 4, 0)],
)
def test_dpconv2d_grad_sampler_matches_opacus(c_in, c_out, size, kernel, stride, padding):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    torch.manual_seed(0)
    fast = DPConv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    stock = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    stock.load_state_dict(fast.state_dict())
    x = torch.randn(3, c_in, *size)
    grad_out = torch.randn_like(stock(x))
    ours, theirs = _conv_grad_sample(fast, [x], grad_out), compute_conv_grad_sample(stock, [x], grad_out)
    torch.testing.assert_close(ours[fast.weight], theirs[stock.weight], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[fast.bias], theirs[stock.bias])


def test_margin_head_validates():
    assert ModuleValidator.validate(MarginHead(16, 4), strict=True) == []


def test_per_sample_gradients_match_one_at_a_time():
    model = _backbone_and_head()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 4, 1])
    gsm = GradSampleModule(model, loss_reduction="sum")
    margin_softmax_loss(gsm(x), y, reduction="sum").backward()
    ref_params = list(reference.parameters())
    one_at_a_time = [
        torch.autograd.grad(margin_softmax_loss(reference(x[i : i + 1]), y[i : i + 1]), ref_params) for i in range(4)
    ]
    for k, (name, p) in enumerate(model.named_parameters()):
        expected = torch.stack([grads[k] for grads in one_at_a_time])
        scale = expected.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(p.grad_sample / scale, expected / scale, rtol=0, atol=2e-5, msg=name)


def test_clipped_per_sample_gradients_have_norm_c_with_zero_noise():
    model = _backbone_and_head()
    x, y = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    xb, yb = next(iter(loader))
    margin_softmax_loss(model(xb), yb).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)  # [B, all parameters]
    raw_norms = per_sample.norm(dim=1)
    clip = float(raw_norms.median())  # a bound between the per-sample norms, so both cases occur
    optimizer.max_grad_norm = clip
    exceeded = raw_norms > clip
    assert exceeded.any() and not exceeded.all(), raw_norms  # both cases are exercised
    factor = (clip / (raw_norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
    clipped_norms = (per_sample * factor[:, None]).norm(dim=1)
    torch.testing.assert_close(clipped_norms[exceeded], torch.full((int(exceeded.sum()),), clip), rtol=1e-5, atol=0)
    torch.testing.assert_close(clipped_norms[~exceeded], raw_norms[~exceeded])
    optimizer.step()
    for p in params:  # the privatised gradient is the mean of the clipped per-sample gradients (noise 0)
        expected = torch.einsum("b,b...->...", factor, p.grad_sample) / len(yb)
        scale = expected.abs().max()
        torch.testing.assert_close(p.grad / scale, expected / scale, rtol=0, atol=1e-4)


# --- losses -------------------------------------------------------------------------------------


def test_arcface_and_cosface_without_margin_are_scaled_softmax():
    torch.manual_seed(0)
    cosine = torch.rand(6, 9) * 2 - 1
    labels = torch.randint(0, 9, (6,))
    plain = F.cross_entropy(30.0 * cosine, labels)
    for kind in ("arcface", "cosface"):
        torch.testing.assert_close(margin_softmax_loss(cosine, labels, kind=kind, margin=0.0), plain)


def test_margin_values_and_reduction():
    cosine = torch.tensor([[0.5, 0.1], [-0.99, 0.2]])
    labels = torch.tensor([0, 0])
    per_sample = margin_softmax_loss(cosine, labels, kind="arcface", margin=0.5, scale=10.0, reduction="none")
    assert per_sample.shape == (2,)
    # sample 0: theta + m < pi, the target logit is cos(theta + m)
    target0 = math.cos(math.acos(0.5) + 0.5)
    expected0 = -torch.log_softmax(10 * torch.tensor([target0, 0.1]), 0)[0]
    # sample 1: theta + m > pi, the target logit falls back to cos(theta) - m sin(m)
    target1 = -0.99 - 0.5 * math.sin(0.5)
    expected1 = -torch.log_softmax(10 * torch.tensor([target1, 0.2]), 0)[0]
    torch.testing.assert_close(per_sample, torch.stack([expected0, expected1]))
    torch.testing.assert_close(
        margin_softmax_loss(cosine, labels, kind="arcface", margin=0.5, scale=10.0), per_sample.mean()
    )
    cos_loss = margin_softmax_loss(cosine, labels, kind="cosface", scale=10.0, reduction="none")  # default m 0.35
    torch.testing.assert_close(cos_loss[0], -torch.log_softmax(10 * torch.tensor([0.5 - 0.35, 0.1]), 0)[0])
    with pytest.raises(ValueError, match="arcface, cosface"):
        margin_softmax_loss(cosine, labels, kind="sphereface")


def test_margin_loss_is_per_sample():
    torch.manual_seed(0)
    cosine, labels = torch.rand(5, 7) * 2 - 1, torch.randint(0, 7, (5,))
    batch = margin_softmax_loss(cosine, labels, reduction="none")
    alone = torch.cat([margin_softmax_loss(cosine[i : i + 1], labels[i : i + 1], reduction="none") for i in range(5)])
    torch.testing.assert_close(batch, alone)


def test_margin_loss_decreases_on_a_separable_toy_problem():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 8), dim=1)
    labels = torch.arange(4).repeat_interleave(8)
    features = centres[labels] + 0.1 * torch.randn(32, 8)
    model = nn.Sequential(nn.Linear(8, 8), MarginHead(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        loss = margin_softmax_loss(model(features), labels, kind="arcface", margin=0.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_triplet_semihard_known_value():
    # 1-D points; squared distances: a0-a1 0.25, a0-n1 1, a0-n2 9, a1-n1 0.25, a1-n2 6.25, n1-n2 4.
    emb = torch.tensor([[0.0], [0.5], [1.0], [3.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # (a0,a1): semi-hard n1 (1 > 0.25): 0.25 - 1 + 1 = 0.25
    # (a1,a0): n1 is not farther than 0.25 (a tie), semi-hard n2: 0.25 - 6.25 + 1 < 0 -> 0
    # (n1,n2): no negative farther than 4, hardest is a1 (0.25): 4 - 0.25 + 1 = 4.75
    # (n2,n1): semi-hard a1 (6.25): 4 - 6.25 + 1 < 0 -> 0
    loss = triplet_semihard_loss(emb, labels, margin=1.0)
    assert loss.item() == pytest.approx((0.25 + 4.75) / 4)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_without_positives_is_zero():
    emb = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    loss = triplet_semihard_loss(emb, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()


def test_check_loss_allowed():
    check_loss_allowed("triplet", dp=False)
    check_loss_allowed("arcface", dp=True)
    check_loss_allowed("cosface", dp=True)
    with pytest.raises(ValueError, match="couples the samples.*arcface or cosface"):
        check_loss_allowed("triplet", dp=True)
    with pytest.raises(ValueError, match="Unknown loss"):
        check_loss_allowed("contrastive", dp=False)
