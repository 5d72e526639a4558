"""The face prior (a generic face painted over the inner face on the person's landmarks) and the stylizer that ships
with facefl: landmarks land where they should, real faces stop matching their owner's other photo while staying
faces, the shipped file is small, checked and used without training, and the gate checks other photos."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from common.anonymization.face_prior import (FacePrior, fit_face_prior, inner_face_mask, paint_face_prior,
                                             prior_landmarks)
from common.anonymization.styles import (DEFAULT_STYLE, SHIPPED_STYLIZERS, StyleError, load_shipped_stylizer, load_stylizer,
                                         shipped_stylizer)


def _blob_prior(size: int = 128) -> torch.Tensor:
    """A flat prior with a bright Gaussian dot on each of its 5 landmarks."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    img = torch.full((size, size), 0.2)
    for x, y in prior_landmarks(size) + 0.5:
        img += 0.8 * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2))
    return img.clamp(0, 1).expand(3, -1, -1).clone()


def test_prior_lands_on_the_landmarks_exactly():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0.3, 0.7, (3, 220, 240)).astype(np.float32))
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # A face 0.8 x the prior's size, rotated and moved, with each landmark pushed a few pixels off the similarity.
    landmarks = (prior_landmarks(128) - 64) @ rot.T * 0.8 + np.array([120.0, 105.0])
    landmarks += rng.uniform(-3, 3, landmarks.shape)
    out = paint_face_prior(image, landmarks[None], _blob_prior())
    assert out.shape == image.shape and not torch.equal(out, image)
    yy, xx = np.mgrid[0:15, 0:15]
    for x, y in landmarks:  # the centre of mass of each dot (colour matching may saturate its peak)
        x0, y0 = int(round(x)) - 7, int(round(y)) - 7
        window = out[0, y0 : y0 + 15, x0 : x0 + 15].numpy()
        weight = window - window.min()
        cx, cy = x0 + (weight * xx).sum() / weight.sum(), y0 + (weight * yy).sum() / weight.sum()
        assert abs(cx - x) <= 0.5 and abs(cy - y) <= 0.5, (x, y, cx, cy)
    # Far from the face the photo is untouched.
    assert torch.equal(out[:, :10, :10], image[:, :10, :10])


def test_prior_inputs_are_checked():
    with pytest.raises(ValueError, match="at least 50"):
        fit_face_prior(torch.zeros(10, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[3, S, S\]"):
        FacePrior(torch.zeros(3, 32, 40))
    image = torch.rand(3, 64, 64)
    # No face, or landmarks that are not finite: the image comes back unchanged.
    assert torch.equal(paint_face_prior(image, np.zeros((0, 5, 2)), _blob_prior()), image)
    assert torch.equal(paint_face_prior(image, np.full((1, 5, 2), np.nan), _blob_prior()), image)
    mask = inner_face_mask(128)
    assert float(mask[66, 64]) == 1.0 and float(mask[0, 0]) == 0.0


@pytest.fixture(scope="module")
def shipped():
    return load_shipped_stylizer(DEFAULT_STYLE, "half")


def test_shipped_stylizer_is_small_checked_and_has_a_prior(shipped, tmp_path):
    model, meta, path = shipped
    assert path.parent.name == "weights" and path.stat().st_size < 5_000_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED_STYLIZERS[(DEFAULT_STYLE, "half")][1]
    assert meta["shipped"] and "facefl style train" in meta["command"]
    assert model.face_prior.shape == (3, 128, 128)
    # A tampered copy does not load.
    bad = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    shutil.copy(path.with_suffix(".json"), bad.with_suffix(".json"))
    with pytest.raises(StyleError):
        load_stylizer(bad, SHIPPED_STYLIZERS[(DEFAULT_STYLE, "half")][1])
    assert shipped_stylizer("scream", "half") is None
    assert shipped_stylizer("starry-night", "half") is not None  # a second style ships too


def test_the_command_line_defaults_to_the_shipped_style():
    import simulations.cli as cli

    assert cli.DEFAULT_STYLE == DEFAULT_STYLE and shipped_stylizer(DEFAULT_STYLE, "half") is not None


def test_first_use_takes_the_shipped_stylizer_without_training(monkeypatch, tmp_path):
    import common.anonymization.style_train as style_train
    from server.stylizers import build_anonymizer

    def no_training(*args, **kwargs):
        raise AssertionError("the default stylizer must not be trained on first use")

    monkeypatch.setattr(style_train, "train_stylizer", no_training)
    monkeypatch.setenv("FACEFL_CACHE", str(tmp_path / "cache"))
    for styles_dir in (None, str(tmp_path / "no-paintings-here")):  # a device without the paintings too
        anonymizer = build_anonymizer(styles_dir=styles_dir, log=lambda m: None)
        assert anonymizer.face_prior is not None


def test_prior_hides_identity_and_keeps_the_face(shipped, lfw_root):
    """Real LFW test people: with the shipped prior painted over image 1, dlib no longer matches it to the person's
    image 2, while MTCNN still finds the face with its landmarks in place."""
    from common.anonymization.anonymizer import pil_to_tensor, tensor_to_pil
    from common.anonymization.recognizer import DlibRecognizer
    from common.anonymization.reid import lfw_test_people, open_people
    from common.data.preprocess import FaceAligner

    recognizer, aligner = DlibRecognizer(), FaceAligner(min_score=0.9)
    prior = FacePrior(shipped[0].face_prior)
    before = after = found = 0
    shifts = []
    people = open_people(lfw_test_people(lfw_root, 12, skip=200))
    for _, image1, image2 in people:
        boxes1, _, points1 = aligner.detect(image1)
        boxes2, _, _ = aligner.detect(image2)
        assert len(boxes1) and len(boxes2)
        reference = recognizer.describe(np.asarray(image2), boxes2[0])
        painted = tensor_to_pil(prior(pil_to_tensor(image1), points1[:1]))
        d0 = recognizer.distance(recognizer.describe(np.asarray(image1), boxes1[0]), reference)
        d1 = recognizer.distance(recognizer.describe(np.asarray(painted), boxes1[0]), reference)
        before += d0 < recognizer.THRESHOLD
        after += d1 < recognizer.THRESHOLD
        boxes, _, points = aligner.detect(painted)
        if len(boxes):
            found += 1
            iod = float(np.linalg.norm(points1[0][1] - points1[0][0]))
            shifts.append(float(np.linalg.norm(points[0] - points1[0], axis=1).mean()) / iod)
    assert before >= 10, f"dlib should match most originals ({before}/12)"
    assert after <= 1, f"the prior should hide identity from dlib ({after}/12 still matched)"
    assert found == len(people), f"MTCNN should still find every painted face ({found}/{len(people)})"
    assert float(np.median(shifts)) < 0.08, f"landmarks moved {np.median(shifts):.3f} x IOD"
