"""The synthetic face set is deterministic and learnable; face augmentation is deterministic and exact."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from common.data.augment import AugmentConfig, augment_faces
from common.data.synthetic import make_synthetic_faces

K, M = 32, 10  # the defaults of make_synthetic_faces


@pytest.fixture(scope="module")
def faces():
    return make_synthetic_faces()


def test_synthetic_faces_are_deterministic_and_leave_global_state_alone():
    torch.manual_seed(123)
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    a = make_synthetic_faces(num_identities=4, images_per_identity=3, image_size=64, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    torch.manual_seed(999)
    b = make_synthetic_faces(num_identities=4, images_per_identity=3, image_size=64, seed=7)
    c = make_synthetic_faces(num_identities=4, images_per_identity=3, image_size=64, seed=8)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert torch.equal(a.labels, b.labels) and a.paths == b.paths
    assert not torch.equal(a.images, c.images)


def test_synthetic_faces_shapes_labels_and_names(faces):
    assert faces.images.dtype == torch.uint8 and faces.images.shape == (K * M, 3, 64, 64)
    assert faces.labels.dtype == torch.int64
    assert torch.equal(faces.labels, torch.arange(K).repeat_interleave(M))
    assert faces.identities == tuple(f"synthetic_{k:03d}" for k in range(K))
    assert faces.paths[0] == "synthetic_000/0000" and faces.paths[M + 3] == "synthetic_001/0003"
    assert len(set(faces.paths)) == len(faces) and faces.skipped == {}
    assert int(faces.images.min()) < 40 and int(faces.images.max()) > 215  # uses the dynamic range

    big = make_synthetic_faces(num_identities=2, images_per_identity=2, image_size=128, seed=1)
    assert big.images.shape == (4, 3, 128, 128) and big.image_size == 128


def test_identities_are_told_apart_by_nearest_centroid_yet_images_vary(faces):
    per_identity = faces.to_float().flatten(1).view(K, M, -1)  # images are grouped by identity
    # Fold h holds out image h of every identity; centroids are the means of the other M - 1 images.
    test = per_identity.transpose(0, 1)  # [M folds, K, D]
    centroids = (per_identity.sum(1) - test) / (M - 1)  # [M, K, D]
    predicted = torch.cdist(test, centroids).argmin(-1)  # [M, K]
    accuracy = float((predicted == torch.arange(K)).float().mean())
    assert accuracy > 0.4, f"nearest-centroid accuracy {accuracy:.2f} (chance is {1 / K:.2f})"

    rms = torch.cdist(per_identity, per_identity) / per_identity.shape[-1] ** 0.5  # [K, M, M]
    off_diagonal = rms[:, ~torch.eye(M, dtype=torch.bool)]
    assert off_diagonal.min() > 0.03, "two images of one identity are (nearly) identical"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_identities": 0},
        {"images_per_identity": 1},
        {"image_size": 8},
        {"seed": -1},
        {"num_identities": 2.5},
    ],
)
def test_synthetic_faces_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="should be"):
        make_synthetic_faces(**kwargs)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_augment_keeps_shape_and_range_and_does_not_touch_input():
    x = _batch()
    x_before = x.clone()
    out = augment_faces(x, torch.Generator().manual_seed(0), brightness=0.5, contrast=0.5)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(x, x_before)
    assert not torch.allclose(out, x)


def test_augment_is_deterministic_per_generator():
    x = _batch()
    a = augment_faces(x, torch.Generator().manual_seed(3))
    b = augment_faces(x, torch.Generator().manual_seed(3))
    c = augment_faces(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_certain_flip_without_jitter_mirrors_every_image():
    x = _batch()
    out = augment_faces(x, torch.Generator().manual_seed(0), flip_p=1.0, max_rotation_deg=0.0, max_shift=0.0,
                        brightness=0.0, contrast=0.0)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_zero_strength_is_the_identity():
    x = _batch()
    cfg = AugmentConfig(flip_p=0.0, max_rotation_deg=0.0, max_shift=0.0, brightness=0.0, contrast=0.0)
    assert cfg.is_identity
    torch.testing.assert_close(augment_faces(x, torch.Generator().manual_seed(0), **asdict(cfg)), x, atol=1e-5, rtol=0)
    # Also through the resampling path: a zero rotation and shift must reproduce the pixels exactly.
    torch.testing.assert_close(
        augment_faces(x, torch.Generator().manual_seed(0), flip_p=1e-9, max_rotation_deg=0.0, max_shift=0.0,
                      brightness=0.0, contrast=0.0),
        x, atol=1e-5, rtol=0,
    )


def test_colour_jitter_is_an_offset_and_a_scale_about_the_mean():
    x = 0.4 + 0.2 * _batch()  # far from 0 and 1, so nothing is clamped
    gen = torch.Generator().manual_seed(0)
    shifted = augment_faces(x, gen, flip_p=0.0, max_rotation_deg=0.0, max_shift=0.0, brightness=0.1, contrast=0.0)
    delta = (shifted - x).flatten(1)
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta), atol=1e-6, rtol=0)
    assert float(delta.abs().max()) <= 0.1 + 1e-6

    scaled = augment_faces(x, gen, flip_p=0.0, max_rotation_deg=0.0, max_shift=0.0, brightness=0.0, contrast=0.3)
    torch.testing.assert_close(scaled.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)


def test_augment_on_synthetic_faces_keeps_them_in_range(faces):
    x = faces.to_float()[:16]
    out = augment_faces(x, torch.Generator().manual_seed(1), **asdict(AugmentConfig()))
    assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"flip_p": 1.5}, {"max_rotation_deg": -1.0}, {"max_shift": 0.9}, {"brightness": -0.1}, {"contrast": 2.0}],
)
def test_augment_config_rejects_bad_strengths(kwargs):
    with pytest.raises(ValueError, match="should be"):
        AugmentConfig(**kwargs)
    with pytest.raises(ValueError, match="should be"):
        augment_faces(_batch(), **kwargs)


def test_augment_rejects_non_image_input():
    with pytest.raises(ValueError, match="float images"):
        augment_faces(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float images"):
        augment_faces(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
