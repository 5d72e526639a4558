"""Fast style transfer: the StyleNet, the feature networks and losses, training and the Gatys reference.

Real data only: Starry Night from ``../shared/data/styles`` and LFW face crops; the models are real too
(a random-weight feature network, a randomly initialised VGG-19 written to disk and read back).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from common.anonymization.gatys import gatys_stylize
from common.anonymization.perceptual import (RandomFeatureNet, VGG19Features, build_feature_net, gram_matrix,
                                             prepare_style_image, style_grams, style_loss, total_variation)
from common.anonymization.style_train import StyleTrainSettings, train_stylizer
from common.anonymization.stylizer import STYLENET_WIDTHS, StyleNet, build_stylenet, stylenet_config
from common.data.preprocess import center_crop_face, image_to_tensor
from common.models.embedding import build_embedding_model
from common.weights import sha256_file

FACE_SIZE = 64


@pytest.fixture(scope="module")
def starry_night(shared_data: Path) -> torch.Tensor:
    path = shared_data / "styles" / "neural-style" / "starry_night.jpg"
    if not path.is_file():
        pytest.skip(f"style image not found at {path}")
    with Image.open(path) as img:
        return image_to_tensor(img)  # uint8 [3, H, W]


@pytest.fixture(scope="module")
def lfw_faces(lfw_root: Path) -> torch.Tensor:
    """The first image of each of the first 8 LFW people, centre-cropped to 64x64: uint8 [8, 3, 64, 64]."""
    people = sorted(p for p in lfw_root.iterdir() if p.is_dir())[:8]
    faces = []
    for person in people:
        with Image.open(sorted(person.glob("*.jpg"))[0]) as img:
            faces.append(center_crop_face(img, FACE_SIZE))
    return torch.stack(faces)


def _float(faces: torch.Tensor) -> torch.Tensor:
    return faces.float() / 255.0


# -- StyleNet -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", sorted(STYLENET_WIDTHS))
def test_stylenet_keeps_any_shape_and_range(width: str, lfw_faces: torch.Tensor):
    torch.manual_seed(0)
    model = StyleNet(width).eval()
    with torch.inference_mode():
        for shape in [(2, 3, 61, 77), (1, 3, 16, 16), (1, 3, 18, 35)]:
            y = model(torch.rand(shape))
            assert y.shape == shape
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        faces = _float(lfw_faces[:3])
        y = model(faces)
    assert y.shape == faces.shape and torch.isfinite(y).all()
    assert model.base == STYLENET_WIDTHS[width] and model.num_residual == 5


def test_stylenet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        StyleNet("quarter")
    with pytest.raises(ValueError, match="num_residual"):
        StyleNet("half", num_residual=-1)
    with pytest.raises(AssertionError):
        StyleNet("half")(torch.rand(1, 3, 12, 40))


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_stylenet_script_and_trace_match_eager(lfw_faces: torch.Tensor):
    torch.manual_seed(1)
    model = StyleNet("half", num_residual=2).eval()
    odd = torch.rand(2, 3, 61, 77)
    with torch.inference_mode():
        eager = model(odd)
        eager_faces = model(_float(lfw_faces[:2]))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, odd, check_trace=False)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(odd), eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(traced(odd), eager, atol=1e-5, rtol=0)
        # The scripted model keeps the padding logic for other sizes too.
        torch.testing.assert_close(scripted(_float(lfw_faces[:2])), eager_faces, atol=1e-5, rtol=0)


def test_stylenet_config_round_trip():
    model = StyleNet("half", num_residual=3)
    config = stylenet_config(model)
    assert config == {"width": "half", "num_residual": 3}
    rebuilt = build_stylenet(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="Unknown StyleNet config keys"):
        build_stylenet({"width": "half", "depth": 3})
    with pytest.raises(ValueError, match="width"):
        build_stylenet({"num_residual": 3})


# -- feature networks and losses ----------------------------------------------------------------------------


def test_random_feature_net_is_fixed_and_leaves_global_rng_alone(lfw_faces: torch.Tensor):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = RandomFeatureNet(), RandomFeatureNet()
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training
    assert not torch.equal(RandomFeatureNet(seed=1).convs[0].weight, a.convs[0].weight)

    x = _float(lfw_faces[:2])
    fa, fb = a(x), b(x)
    assert len(fa) == len(a.widths) and a.content_layer in range(len(fa))
    assert set(a.style_layers) <= set(range(len(fa)))
    for i, (ma, mb) in enumerate(zip(fa, fb)):
        assert torch.equal(ma, mb)
        assert ma.shape == (2, a.widths[i], FACE_SIZE >> i, FACE_SIZE >> i)
        # Kaiming scaling keeps every stage alive: a fair share of units fire, at a sane scale.
        active = float((ma > 0).float().mean())
        assert 0.1 < active < 0.9, (i, active)
        assert 1e-2 < float(ma.pow(2).mean()) < 1e2, i


def test_gram_matrix_and_total_variation_values():
    f = torch.arange(12.0).view(1, 2, 2, 3)  # two channels of six values
    flat = f.view(2, 6)
    expected = flat @ flat.T / 12.0
    torch.testing.assert_close(gram_matrix(f)[0], expected)
    flat_image = torch.full((1, 3, 8, 8), 0.3)
    assert float(total_variation(flat_image)) == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0  # alternating columns: every horizontal step changes by 1
    assert float(total_variation(stripes)) == pytest.approx(1.0)


def test_style_loss_is_zero_for_the_style_itself(starry_night: torch.Tensor, lfw_faces: torch.Tensor):
    net = RandomFeatureNet()
    style = prepare_style_image(starry_night, 64)
    assert style.shape[-2] == 64 or style.shape[-1] == 64
    grams = style_grams(net, style)
    assert float(style_loss(net(style), grams, net.style_layers)) == pytest.approx(0.0, abs=1e-6)
    face_loss = float(style_loss(net(_float(lfw_faces[:4])), grams, net.style_layers))
    assert 0.05 < face_loss < 10.0


def test_build_feature_net_needs_a_hash_with_a_path(tmp_path: Path):
    assert isinstance(build_feature_net(), RandomFeatureNet)
    with pytest.raises(ValueError, match="sha256"):
        build_feature_net(str(tmp_path / "vgg19.pth"))
    with pytest.raises(ValueError, match="vgg19_path"):
        build_feature_net(vgg19_sha256="0" * 64)


def test_vgg19_features_load_a_local_hashed_state_dict(tmp_path: Path, lfw_faces: torch.Tensor):
    from torchvision.models import vgg19

    torch.manual_seed(0)
    # torchvision's key format; the 470 MB classifier (ignored by the loader) is left out to keep the test light,
    # except one key that shows non-feature keys are skipped.
    full = vgg19(weights=None).state_dict()
    state = {k: v for k, v in full.items() if k.startswith("features.")}
    state["classifier.6.bias"] = full["classifier.6.bias"]
    del full
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    digest = sha256_file(path)

    net = build_feature_net(str(path), digest)
    assert isinstance(net, VGG19Features)
    torch.testing.assert_close(net.trunk[28].weight, state["features.28.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        features = net(_float(lfw_faces[:1]))
    assert [f.shape[1] for f in features] == [64, 128, 256, 512, 512, 512]
    assert [f.shape[-1] for f in features] == [64, 32, 16, 8, 8, 4]
    assert net.style_layers == (0, 1, 2, 3, 5) and net.content_layer == 4
    assert all(float(f.min()) >= 0.0 for f in features)  # ReLU outputs

    with pytest.raises(ValueError, match="SHA-256"):
        build_feature_net(str(path), "0" * 64)
    del state, net


# -- training -----------------------------------------------------------------------------------------------


def test_train_stylizer_learns_the_style(starry_night: torch.Tensor, lfw_faces: torch.Tensor):
    settings = StyleTrainSettings(steps=30, batch_size=4, image_size=FACE_SIZE, seed=0)
    logged: list[tuple[int, int, dict]] = []
    model, history = train_stylizer(
        starry_night, lfw_faces, settings=settings, width="half", progress=lambda s, t, l: logged.append((s, t, l))
    )
    assert [s for s, _, _ in logged] == [10, 20, 30] and all(t == 30 for _, t, _ in logged)
    first, last = logged[0][2]["style"], logged[-1][2]["style"]
    assert last < 0.8 * first, (first, last)
    assert logged[-1][2]["content"] < logged[0][2]["content"]  # it also learns to draw the faces
    assert not model.training and model.width == "half"
    assert history["steps"] == 30 and history["final_identity_cosine"] is None
    for key in ("total", "content", "style", "tv"):
        assert isinstance(history[f"final_{key}"], float) and isinstance(history[f"mean_{key}"], float)
    assert [entry["step"] for entry in history["log"]] == [10, 20, 30]

    faces = _float(lfw_faces)
    with torch.inference_mode():
        stylized = model(faces)
    assert stylized.shape == faces.shape
    assert float((stylized - faces).abs().mean()) > 0.05


def test_train_stylizer_is_deterministic_and_handles_few_faces(starry_night: torch.Tensor, lfw_faces: torch.Tensor):
    settings = StyleTrainSettings(steps=3, batch_size=4, image_size=32, seed=7)
    before = torch.random.get_rng_state()
    a, ha = train_stylizer(starry_night, lfw_faces[:2], settings=settings)  # 2 faces < batch of 4
    b, hb = train_stylizer(starry_night, lfw_faces[:2], settings=settings)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert ha["final_total"] == hb["final_total"]
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_train_stylizer_reports_identity_cosine(starry_night: torch.Tensor, lfw_faces: torch.Tensor):
    torch.manual_seed(0)
    identity = build_embedding_model("compact", embedding_dim=32, dp=False, image_size=FACE_SIZE)
    identity.train()
    settings = StyleTrainSettings(steps=10, batch_size=4, image_size=FACE_SIZE, identity_weight=1.0)
    logged: list[dict] = []
    _, history = train_stylizer(
        starry_night,
        lfw_faces,
        settings=settings,
        identity_model=identity,
        identity_size=FACE_SIZE,
        progress=lambda s, t, l: logged.append(l),
    )
    cosine = history["final_identity_cosine"]
    assert isinstance(cosine, float) and -1.0 <= cosine <= 1.0
    assert "final_identity" in history and "identity_cosine" in logged[-1]
    # The identity model is frozen only while training: its mode and flags come back.
    assert identity.training and all(p.requires_grad for p in identity.parameters())


def test_style_train_settings_are_validated():
    with pytest.raises(ValueError, match="steps"):
        StyleTrainSettings(steps=0)
    with pytest.raises(ValueError, match="style_weight"):
        StyleTrainSettings(style_weight=-1.0)
    with pytest.raises(ValueError, match="identity_margin"):
        StyleTrainSettings(identity_margin=2.0)
    with pytest.raises(ValueError, match="image_size"):
        StyleTrainSettings(image_size=8)


# -- Gatys --------------------------------------------------------------------------------------------------


def test_gatys_moves_the_grams_towards_the_style(starry_night: torch.Tensor, lfw_faces: torch.Tensor):
    net = RandomFeatureNet()
    content = _float(lfw_faces[0])
    out = gatys_stylize(content, starry_night, feature_net=net, steps=20)
    assert out.shape == content.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    grams = style_grams(net, prepare_style_image(starry_night, 2 * FACE_SIZE))
    with torch.no_grad():
        before = float(style_loss(net(content[None]), grams, net.style_layers))
        after = float(style_loss(net(out[None]), grams, net.style_layers))
    assert after < 0.7 * before, (before, after)
    assert float((out - content).abs().mean()) > 0.01


def test_identity_adversary_trains_from_scratch_and_is_cached(tmp_path, monkeypatch):
    """``--identity auto`` trains the stylizer's identity adversary here (never dlib), then reuses it."""
    from server.stylizers import identity_model

    monkeypatch.setenv("FACEFL_CACHE", str(tmp_path))
    lines: list[str] = []
    probe, desc = identity_model("auto", None, epochs=1, log=lines.append)
    assert probe is not None and "CompactFaceNet trained 1 epochs" in desc and "synthetic" in desc
    assert any("identity model epoch 1/1" in line for line in lines)
    lines.clear()
    assert identity_model("auto", None, epochs=1, log=lines.append)[1] == desc and not lines  # from the cache
