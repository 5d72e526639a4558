"""dlib's face ResNet read from its own file into PyTorch: the descriptors equal dlib's on real LFW faces, damaged
or foreign files are refused in one line, the conversion is cached, and Opacus computes exact per-sample gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from common.anonymization.recognizer import SHAPE_PREDICTOR_FILE
from common.dlib_weights import (DlibFormatError, cached_dlib_resnet, default_model_path, dlib_resnet_shapes,
                                 dlib_resnet_state_dict, read_dlib_resnet)
from common.models.dlib_resnet import ChannelAffine, DlibResNet, set_trainable
from common.weights import load_state_dict_checked, sha256_file

dlib = pytest.importorskip("dlib")
N_FACES = 20


@pytest.fixture(scope="module")
def model_file():
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model(model_file) -> DlibResNet:
    net = DlibResNet()
    net.load_state_dict(dlib_resnet_state_dict(model_file))  # strict: every key and shape
    return net.eval()


@pytest.fixture(scope="module")
def chips(lfw_root, model_file) -> np.ndarray:
    """dlib-aligned 150x150 chips of N_FACES different LFW people (image 1 of each), uint8 [N, 150, 150, 3]."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model_file.parent / SHAPE_PREDICTOR_FILE))
    found = []
    for person in sorted(p for p in lfw_root.iterdir() if p.is_dir())[::150]:
        image = np.asarray(Image.open(person / f"{person.name}_0001.jpg").convert("RGB"))
        faces = detector(image, 1)
        if faces:
            found.append(dlib.get_face_chip(image, predictor(image, faces[0]), size=150, padding=0.25))
        if len(found) == N_FACES:
            break
    assert len(found) == N_FACES, f"dlib found faces in only {len(found)} of the people tried"
    return np.stack(found)


def _batch(chips: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).to(dtype)  # [N, 3, 150, 150], 0..255


def test_descriptors_equal_dlibs_own(model, model_file, chips):
    recognizer = dlib.face_recognition_model_v1(str(model_file))
    expected = np.array([recognizer.compute_face_descriptor(chip) for chip in chips])  # [N, 128]
    with torch.no_grad():
        ours = model(_batch(chips)).numpy()
    assert ours.shape == expected.shape == (N_FACES, 128)
    assert np.abs(ours - expected).max() <= 1e-4, np.abs(ours - expected).max()
    # dlib's descriptors are not unit length; normalize=True gives their directions.
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=0.1)
    with torch.no_grad():
        unit = DlibResNet(normalize=True).eval()
        unit.load_state_dict(model.state_dict())
        directions = unit(_batch(chips[:2])).numpy()
    np.testing.assert_allclose(directions, expected[:2] / np.linalg.norm(expected[:2], axis=1, keepdims=True), atol=1e-5)


def test_the_file_holds_the_known_architecture(model, model_file):
    parsed = read_dlib_resnet(model_file)
    assert len(parsed.layers) == 108 and parsed.image_size == 150
    assert parsed.pixel_mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert (parsed.margin, parsed.distance_threshold) == pytest.approx((0.04, 0.6))
    assert sum(layer.name == "con_4" for layer in parsed.layers) == 29
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == dlib_resnet_shapes()
    assert sum(p.numel() for p in model.parameters()) == 5_614_592


def _refusals(tmp_path, model_file) -> dict[str, tuple]:
    data = model_file.read_bytes()
    files = {
        "truncated in the header": (data[:200], "truncated"),
        "truncated in a tensor": (data[: len(data) // 2], "truncated"),
        "bytes left over": (data + b"\x01\x00", "left over"),
        "random bytes": (np.random.default_rng(0).bytes(4096), "not dlib's face-recognition ResNet"),
        "empty": (b"", "empty"),
    }
    cases = {}
    for name, (content, phrase) in files.items():
        path = tmp_path / f"{name.replace(' ', '-')}.dat"
        path.write_bytes(content)
        cases[name] = (path, DlibFormatError, phrase)
    cases["the 5-point shape predictor"] = (model_file.parent / SHAPE_PREDICTOR_FILE, DlibFormatError, "loss_metric_2")
    cases["the mmod detector"] = (model_file.parent / "mmod_human_face_detector.dat", DlibFormatError, "'loss_mmod_'")
    cases["a missing path"] = (tmp_path / "nowhere.dat", FileNotFoundError, "not found")
    return cases


def test_other_files_are_refused_in_one_line(tmp_path, model_file):
    for name, (path, error, phrase) in _refusals(tmp_path, model_file).items():
        with pytest.raises(error) as caught:
            read_dlib_resnet(path)
        message = str(caught.value)
        assert "\n" not in message and phrase in message and str(path) in message, (name, message)
        assert "dlib_face_recognition_resnet_model_v1.dat" in message, (name, message)  # what to pass instead


def test_the_conversion_is_cached_and_checked(tmp_path, model_file):
    path, sha256 = cached_dlib_resnet(tmp_path, model_file)
    assert path == tmp_path / "weights" / "dlib-resnet-v1.pt" and sha256 == sha256_file(path)
    loaded = load_state_dict_checked(path, sha256)
    direct = dlib_resnet_state_dict(model_file)
    assert loaded.keys() == direct.keys() and all(torch.equal(loaded[k], direct[k]) for k in direct)
    written = path.stat().st_mtime_ns
    assert cached_dlib_resnet(tmp_path, model_file) == (path, sha256) and path.stat().st_mtime_ns == written
    path.write_bytes(path.read_bytes()[:-10])  # damaged: the recorded hash no longer matches, so it is rebuilt
    again, sha_again = cached_dlib_resnet(tmp_path, model_file)
    assert again == path and sha_again == sha256_file(path)
    assert load_state_dict_checked(path, sha_again).keys() == direct.keys()


def test_set_trainable_freezes_all_but_the_part(model):
    net = copy.deepcopy(model)
    assert set_trainable(net, "projection") == ["projection.weight"]
    last = set_trainable(net, "last-stage")
    assert {name.split(".")[1] for name in last if name.startswith("blocks.")} == {"10", "11", "12", "13"}
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 4_462_592
    assert len(set_trainable(net, "all")) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="last-stage"):
        set_trainable(net, "head")


# The frozen stem feeds the first trainable block a tensor without gradient; Opacus' hooks are what we test.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_accepts_the_model_and_its_per_sample_gradients_are_exact(model, chips):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    net = copy.deepcopy(model).double().train()
    assert ModuleValidator.validate(net, strict=True) == []
    trainable = set_trainable(net, "last-stage")
    reference = copy.deepcopy(net)
    x = _batch(chips[:3], torch.float64)  # [3, 3, 150, 150]
    target = torch.randn(3, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def losses(out: torch.Tensor) -> torch.Tensor:
        return ((out - target[: len(out)]) ** 2).sum(dim=1)  # [B]: each sample's loss depends on it alone

    gsm = GradSampleModule(net, loss_reduction="sum")
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in net.modules()), "Opacus fell back to functorch"
    losses(gsm(x)).sum().backward()
    params = dict(reference.named_parameters())
    per_sample = {name: [] for name in trainable}
    for i in range(len(x)):
        out = reference(x[i : i + 1])
        grads = torch.autograd.grad(((out - target[i]) ** 2).sum(), [params[n] for n in trainable])
        for name, grad in zip(trainable, grads):
            per_sample[name].append(grad)
    affine_checked = False
    for name, param in gsm._module.named_parameters():
        if name not in per_sample:
            assert not param.requires_grad and getattr(param, "grad_sample", None) is None, name
            continue
        expected = torch.stack(per_sample[name])
        assert param.grad_sample.shape == expected.shape, name
        torch.testing.assert_close(param.grad_sample, expected, rtol=1e-7, atol=1e-8, msg=name)
        affine_checked |= isinstance(gsm._module.get_submodule(name.rsplit(".", 1)[0]), ChannelAffine)
    assert affine_checked
